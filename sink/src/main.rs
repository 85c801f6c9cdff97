//! `qlogd`: parses flags, the environment and the configuration file, installs logging,
//! runs the daemon.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use qlog_sink::committer::{Settings, VmLimits};
use qlog_sink::config::{self, FileConfig, DEFAULT_CONFIG};
use qlog_sink::daemon::{self, Config};

/// qlogd: the qlog sink for the Qubes log qube.
///
/// qrexec connects to the ingest socket once per `qlog.Ingest` call and names the calling
/// VM in its descriptor; that name, and nothing the VM sends, is what events are stored
/// under. The `qlog` CLI reads the store through the query socket. Nothing listens on a
/// network. Readiness and watchdog pings go to NOTIFY_SOCKET when set (systemd
/// Type=notify). Settings come from flags, then environment variables, then the
/// configuration file, then the defaults shown.
#[derive(Debug, Parser)]
#[command(name = "qlogd", version)]
struct Args {
    /// Configuration file (TOML); a missing default file is not an error.
    #[arg(long, env = "QLOG_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,

    /// Directory holding the store and its lock file [default: /var/lib/qlog].
    #[arg(long, env = "QLOG_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Unix socket qrexec connects to for qlog.Ingest [default: /run/qlog/ingest.sock].
    #[arg(long, env = "QLOG_INGEST_SOCKET")]
    ingest_socket: Option<PathBuf>,

    /// Unix socket the qlog CLI queries, mode 0660 [default: /run/qlog/query.sock].
    #[arg(long, env = "QLOG_QUERY_SOCKET")]
    query_socket: Option<PathBuf>,

    /// Group to own the ingest socket (qrexec's documentation recommends qubes).
    #[arg(long, env = "QLOG_INGEST_GROUP")]
    ingest_group: Option<String>,

    /// Group whose members may query; everyone else is refused by the socket's mode.
    #[arg(long, env = "QLOG_QUERY_GROUP")]
    query_group: Option<String>,

    /// Bytes each VM may keep stored (also "512MiB", "2GiB"); over it, that VM's oldest
    /// events are removed [default: 1GiB].
    #[arg(long, env = "QLOG_VM_QUOTA", value_parser = config::parse_bytes)]
    vm_quota: Option<u64>,

    /// Days events are kept before age-based retention removes them [default: 30].
    #[arg(long, env = "QLOG_RETENTION_DAYS")]
    retention_days: Option<u64>,

    /// Seconds events are kept; overrides --retention-days (for tests of retention).
    #[arg(long, hide = true)]
    retention_seconds: Option<u64>,

    /// Bytes of page cache for the store index.
    #[arg(long, default_value_t = 32 << 20)]
    cache_bytes: u64,

    /// Most ingest connections at once over all VMs [default: 512].
    #[arg(long)]
    max_connections: Option<usize>,

    /// Most ingest connections at once from one VM [default: 16].
    #[arg(long)]
    max_connections_per_vm: Option<usize>,

    /// Seconds a new ingest connection has to send its descriptor and hello [default: 10].
    #[arg(long)]
    handshake_timeout: Option<u64>,

    /// Log filter for qlogd's own logs on stderr (tracing's EnvFilter syntax).
    #[arg(long, env = "QLOG_LOG", default_value = "info")]
    log_level: String,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a configuration file and print the settings it results in.
    CheckConfig {
        /// The file to check [default: the --config file].
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::CheckConfig { file }) = &args.command {
        let path = file.clone().unwrap_or_else(|| args.config.clone());
        return check_config(&args, &path);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let file = match read_config(&args.config, true) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("qlogd: {error}");
            return ExitCode::FAILURE;
        }
    };
    match daemon::run(merge(&args, file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("qlogd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the configuration file; the default path may be absent, an explicit one not.
fn read_config(path: &Path, missing_ok: bool) -> Result<FileConfig, String> {
    if missing_ok && path == Path::new(DEFAULT_CONFIG) && !path.exists() {
        return Ok(FileConfig::default());
    }
    config::load(path)
}

fn check_config(args: &Args, path: &Path) -> ExitCode {
    match read_config(path, false) {
        Ok(file) => {
            let c = merge(args, file);
            println!("{}: ok", path.display());
            println!("state_dir = {}", c.state_dir.display());
            println!("ingest_socket = {}", c.ingest_socket.display());
            println!("query_socket = {}", c.query_socket.display());
            println!("vm_quota = {} bytes", c.settings.vm_quota_bytes);
            println!("retention_days = {}", c.settings.retention.as_secs() / 86_400);
            println!("expected_vms = {:?}", c.settings.expected_vms);
            for (vm, o) in &c.settings.overrides {
                println!(
                    "[vm.{vm}] quota = {:?}, retention_days = {:?}",
                    o.quota_bytes,
                    o.retention.map(|r| r.as_secs() / 86_400)
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("qlogd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn merge(args: &Args, file: FileConfig) -> Config {
    let days = |d: u64| Duration::from_secs(d.saturating_mul(86_400));
    let overrides = file
        .vm
        .iter()
        .map(|(vm, o)| {
            (
                vm.clone(),
                VmLimits {
                    quota_bytes: o.quota.map(|b| b.0),
                    retention: o.retention_days.map(days),
                },
            )
        })
        .collect();
    Config {
        state_dir: args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| "/var/lib/qlog".into()),
        ingest_socket: args
            .ingest_socket
            .clone()
            .or(file.ingest_socket)
            .unwrap_or_else(|| "/run/qlog/ingest.sock".into()),
        query_socket: args
            .query_socket
            .clone()
            .or(file.query_socket)
            .unwrap_or_else(|| "/run/qlog/query.sock".into()),
        ingest_group: args.ingest_group.clone().or(file.ingest_group),
        query_group: args.query_group.clone().or(file.query_group),
        settings: Settings {
            vm_quota_bytes: args.vm_quota.or(file.vm_quota.map(|b| b.0)).unwrap_or(1 << 30),
            retention: match args.retention_seconds {
                Some(secs) => Duration::from_secs(secs),
                None => days(args.retention_days.or(file.retention_days).unwrap_or(30)),
            },
            overrides,
            expected_vms: file.expected_vms,
        },
        cache_bytes: args.cache_bytes,
        max_connections: args.max_connections.or(file.max_connections).unwrap_or(512),
        max_connections_per_vm: args
            .max_connections_per_vm
            .or(file.max_connections_per_vm)
            .unwrap_or(16),
        handshake_timeout: Duration::from_secs(
            args.handshake_timeout.or(file.handshake_timeout_secs).unwrap_or(10),
        ),
    }
}
