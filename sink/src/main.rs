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
use qlog_sink::health::HealthSettings;
use qlog_sink::rate_limit::{RateLimit, RateOverride};

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

    /// Most ingest connections still in their handshake at once; more are closed at
    /// once [default: 256].
    #[arg(long)]
    max_handshakes: Option<usize>,

    /// Seconds a new ingest connection has to send its descriptor and hello [default: 10].
    #[arg(long)]
    handshake_timeout: Option<u64>,

    /// Seconds an established stream may go without a complete frame, whatever its
    /// heartbeat interval (for tests of idle peers).
    #[arg(long, hide = true)]
    idle_timeout_seconds: Option<u64>,

    /// Events per second each VM may send beyond its burst; over it, events are refused
    /// and recorded as a gap. 0 turns the event limit off [default: 1000].
    #[arg(long)]
    rate_limit_events_per_sec: Option<u64>,

    /// Events each VM may send at once above its rate [default: 300000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rate_limit_burst_events: Option<u64>,

    /// Payload bytes per second each VM may send (also "4MiB"). 0 turns the byte limit
    /// off [default: 4MiB].
    #[arg(long, value_parser = config::parse_bytes)]
    rate_limit_bytes_per_sec: Option<u64>,

    /// Payload bytes each VM may send at once above its rate [default: 256MiB].
    #[arg(long, value_parser = config::parse_bytes)]
    rate_limit_burst_bytes: Option<u64>,

    /// Log filter for qlogd's own logs on stderr (tracing's EnvFilter syntax).
    #[arg(long, env = "QLOG_LOG", default_value = "info")]
    log_level: String,

    /// The log qube's own name: qlogd stores its health events and its own metrics
    /// under it, like a VM's. By default, this machine's hostname (in Qubes, the
    /// qube's name).
    #[arg(long, env = "QLOG_SINK_NAME", value_parser = parse_vm_name)]
    name: Option<String>,

    /// Turns rollups and health off, for the benchmark that measures their cost.
    #[arg(long, hide = true)]
    no_telemetry: bool,

    /// Days to keep per-minute telemetry rollups (by default 400; events have their own
    /// retention).
    #[arg(long)]
    rollup_retention_days: Option<u64>,

    #[command(subcommand)]
    command: Option<Command>,
}

fn parse_vm_name(s: &str) -> Result<String, String> {
    qlog_rpc::descriptor::validate_vm_name(s).map(|_| s.to_owned()).map_err(|e| e.to_string())
}

/// The hostname if it is a valid qube name, else `log-qube`.
fn own_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    match qlog_rpc::descriptor::validate_vm_name(host) {
        Ok(_) => host.to_owned(),
        Err(_) => "log-qube".to_owned(),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a configuration file and print the settings it results in.
    CheckConfig {
        /// The file to check [default: the --config file].
        file: Option<PathBuf>,
    },
    /// Check every VM's hash chain in a store qlogd is not running on (else use `qlog
    /// verify`); exits 1 naming the first broken link of each broken chain.
    ///
    /// Opens the store under its lock and reads it without repairing anything.
    Verify {
        /// The store [default: --state-dir before the subcommand, the config file's, or
        /// /var/lib/qlog].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// VMs to check; none means every VM with a chain or stored batches.
        vms: Vec<String>,
        /// Print the result as `qlog verify --json` does.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::CheckConfig { file }) = &args.command {
        let path = file.clone().unwrap_or_else(|| args.config.clone());
        return check_config(&args, &path);
    }
    if let Some(Command::Verify { state_dir, vms, json }) = &args.command {
        let state_dir = match state_dir {
            Some(dir) => dir.clone(),
            None => match read_config(&args.config, true) {
                Ok(file) => merge(&args, file).state_dir,
                Err(error) => {
                    eprintln!("qlogd: {error}");
                    return ExitCode::FAILURE;
                }
            },
        };
        return verify_offline(&state_dir, vms, *json, args.cache_bytes);
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

fn verify_offline(state_dir: &Path, vms: &[String], json: bool, cache_bytes: u64) -> ExitCode {
    let reply = match qlog_sink::chain::verify_offline(state_dir, vms, cache_bytes) {
        Ok(reply) => reply,
        Err(error) => {
            eprintln!("qlogd: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reply).expect("replies serialise"));
    }
    let mut broken = 0;
    for vm in &reply.vms {
        let name = vm.vm.escape_debug();
        match &vm.first_break {
            None if !json => println!(
                "{name}: ok, {} batches checked ({} unchained, {} trimmed), head {}",
                vm.batches_checked, vm.unchained, vm.trimmed, vm.head
            ),
            None => {}
            Some(b) => {
                broken += 1;
                eprintln!(
                    "qlogd: the hash chain of VM {name} is broken: first broken link at batch {} (chain position {}): {}: {} ({} breaks in all)",
                    b.batch_id.map_or_else(|| "-".to_owned(), |id| id.to_string()),
                    b.position,
                    b.kind.as_str(),
                    b.detail.escape_debug(),
                    vm.broken_links
                );
            }
        }
    }
    if broken > 0 {
        eprintln!(
            "qlogd: {broken} of {} chains in {} are broken",
            reply.vms.len(),
            state_dir.display()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
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
            println!("name = {}", c.settings.sink_name);
            println!("rollup_retention_days = {}", c.settings.rollup_retention.as_secs() / 86_400);
            let h = &c.settings.health;
            println!(
                "[health] lag_secs = {}, flood_factor = {}, flood_floor_per_minute = {}, startup_grace_secs = {}",
                h.lag_secs, h.flood_factor, h.flood_floor_per_minute, h.startup_grace_secs
            );
            println!("rate_limit = {}", c.settings.rate_limit.describe());
            for (vm, o) in &c.settings.overrides {
                println!(
                    "[vm.{vm}] quota = {:?}, retention_days = {:?}, rate_limit = {}",
                    o.quota_bytes,
                    o.retention.map(|r| r.as_secs() / 86_400),
                    c.settings.rate_limit(vm).describe()
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
                    rate: o.rate(),
                },
            )
        })
        .collect();
    // A flag beats the file, which beats the built-in default, key by key.
    let rate_limit = RateLimit::default().with(&file.rate()).with(&RateOverride {
        events_per_sec: args.rate_limit_events_per_sec,
        burst_events: args.rate_limit_burst_events,
        bytes_per_sec: args.rate_limit_bytes_per_sec,
        burst_bytes: args.rate_limit_burst_bytes,
    });
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
            rate_limit,
            expected_vms: file.expected_vms,
            sink_name: args.name.clone().or(file.name).unwrap_or_else(own_name),
            telemetry: !args.no_telemetry,
            rollup_retention: days(
                args.rollup_retention_days.or(file.rollup_retention_days).unwrap_or(400),
            ),
            health: {
                let d = HealthSettings::default();
                HealthSettings {
                    lag_secs: file.health.lag_secs.map_or(d.lag_secs, |s| s as f64),
                    flood_factor: file.health.flood_factor.map_or(d.flood_factor, |f| f as f64),
                    flood_floor_per_minute: file
                        .health
                        .flood_floor_per_minute
                        .unwrap_or(d.flood_floor_per_minute),
                    startup_grace_secs: file
                        .health
                        .startup_grace_secs
                        .unwrap_or(d.startup_grace_secs),
                    ..d
                }
            },
        },
        cache_bytes: args.cache_bytes,
        max_connections: args.max_connections.or(file.max_connections).unwrap_or(512),
        max_connections_per_vm: args
            .max_connections_per_vm
            .or(file.max_connections_per_vm)
            .unwrap_or(16),
        max_handshakes: args
            .max_handshakes
            .or(file.max_handshakes)
            .unwrap_or(qlog_sink::ingest::DEFAULT_MAX_HANDSHAKES),
        handshake_timeout: Duration::from_secs(
            args.handshake_timeout.or(file.handshake_timeout_secs).unwrap_or(10),
        ),
        idle_timeout: args.idle_timeout_seconds.map(|s| Duration::from_secs(s.max(1))),
    }
}
