//! `qlogd`: parses flags and the environment, installs logging, runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qlog_sink::committer::Settings;
use qlog_sink::daemon::{self, Config};

/// qlogd: the qlog sink for the Qubes log qube.
///
/// qrexec connects to the ingest socket once per `qlog.Ingest` call and names the calling
/// VM in its descriptor; that name, and nothing the VM sends, is what events are stored
/// under. The `qlog` CLI reads the store through the query socket. Nothing listens on a
/// network. Readiness is reported through NOTIFY_SOCKET when set (systemd Type=notify).
#[derive(Debug, Parser)]
#[command(name = "qlogd", version)]
struct Args {
    /// Directory holding the store and its lock file.
    #[arg(long, env = "QLOG_STATE_DIR", default_value = "/var/lib/qlog")]
    state_dir: PathBuf,

    /// Unix socket qrexec connects to; link /etc/qubes-rpc/qlog.Ingest to it.
    #[arg(long, env = "QLOG_INGEST_SOCKET", default_value = "/run/qlog/ingest.sock")]
    ingest_socket: PathBuf,

    /// Unix socket the qlog CLI queries (mode 0660; see --query-group).
    #[arg(long, env = "QLOG_QUERY_SOCKET", default_value = "/run/qlog/query.sock")]
    query_socket: PathBuf,

    /// Group to own the ingest socket (qrexec's documentation recommends qubes).
    #[arg(long, env = "QLOG_INGEST_GROUP")]
    ingest_group: Option<String>,

    /// Group whose members may query; everyone else is refused by the socket's mode.
    #[arg(long, env = "QLOG_QUERY_GROUP")]
    query_group: Option<String>,

    /// Bytes each VM may keep stored; over it, that VM's oldest events are removed.
    #[arg(long, env = "QLOG_VM_QUOTA", default_value_t = 1 << 30)]
    vm_quota: u64,

    /// Days events are kept before age-based retention removes them.
    #[arg(long, env = "QLOG_RETENTION_DAYS", default_value_t = 30)]
    retention_days: u64,

    /// Bytes of page cache for the store.
    #[arg(long, default_value_t = 64 << 20)]
    cache_bytes: u64,

    /// Most ingest connections at once over all VMs.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,

    /// Most ingest connections at once from one VM.
    #[arg(long, default_value_t = 16)]
    max_connections_per_vm: usize,

    /// Seconds a new ingest connection has to send its descriptor and hello.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,

    /// Log filter for qlogd's own logs on stderr (tracing's EnvFilter syntax).
    #[arg(long, env = "QLOG_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let config = Config {
        state_dir: args.state_dir,
        ingest_socket: args.ingest_socket,
        query_socket: args.query_socket,
        ingest_group: args.ingest_group,
        query_group: args.query_group,
        settings: Settings {
            vm_quota_bytes: args.vm_quota,
            retention: Duration::from_secs(args.retention_days.saturating_mul(86_400)),
        },
        cache_bytes: args.cache_bytes,
        max_connections: args.max_connections,
        max_connections_per_vm: args.max_connections_per_vm,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("qlogd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
