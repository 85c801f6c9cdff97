//! Command line, environment and qubesdb: everything that becomes a [`Config`].
//!
//! Owns the CLI definition (flags, environment variables, help text) and the precedence
//! rule: a flag beats its environment variable, which beats the VM's qubesdb key under
//! `/vm-config/` (read with `qubesdb-read` where that program is on `PATH`), which beats
//! the built-in default. Validation happens here, once, so the rest of the agent can trust
//! its `Config`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use qlog_rpc::message::{validate_stream_name, DEFAULT_STREAM};

use crate::filter::{parse_drop_field, parse_priority, Filters};
use crate::log::{Level, Log};

/// The stream name for `--source stdin` when none is given.
pub const DEFAULT_STDIN_STREAM: &str = "stdin";

const QUBESDB_LOG_VM: &str = "/vm-config/qlog-log-vm";
const QUBESDB_PRIORITY: &str = "/vm-config/qlog-priority";
const QUBESDB_STREAM: &str = "/vm-config/qlog-stream";

const ABOUT: &str = "Forward this VM's journal (or stdin) to qlogd in the log VM over qrexec";

// clap is built without `wrap_help` (it would add a terminal-size dependency), so the
// long texts are wrapped by hand, under 90 columns.
const LONG_ABOUT: &str = "\
Forward this VM's journal (or stdin) to qlogd in the log VM over qrexec.

qlog-agent runs `qrexec-client-vm LOGVM qlog.Ingest` and speaks the qlog protocol over
the child's stdin and stdout. Every event gets a sequence number and stays in memory
until qlogd acknowledges it as durable; after a reconnect every unacknowledged event is
sent again under the same number, so nothing is lost or stored twice. The agent keeps no
state on disk: qlogd tells it where to resume.

With --source journal (the default) the journal itself is the buffer: qlogd hands back
the cursor of the last stored entry and journalctl starts there, so even a killed agent
loses nothing the journal still holds. A cursor the journal no longer holds (vacuumed,
rotated, or a fresh DisposableVM) is recorded as a `cursor-lost` gap.

With --source stdin there is no cursor. Events not yet acknowledged are held only in
memory and are LOST IF THE AGENT ITSELF IS KILLED (SIGKILL, OOM, power loss); qlogd
cannot tell that this happened, so no gap records it. When stdin ends the agent sends
everything, waits for the last acknowledgement (reconnecting as needed; bound the wait
with timeout(1), whose SIGTERM starts a clean shutdown) and exits 0 only if every event
was acknowledged.";

const AFTER_HELP: &str = "\
Defaults from qubesdb:
  Where qubesdb-read is on PATH, --log-vm, --priority and --stream default to the
  qubesdb keys /vm-config/qlog-log-vm, /vm-config/qlog-priority and /vm-config/qlog-stream.
  Set them in dom0 with `qvm-features THISVM vm-config.qlog-log-vm LOGVM` (likewise
  vm-config.qlog-priority and vm-config.qlog-stream). Flags and environment variables win.

Signals:
  SIGTERM or SIGINT: stop reading, send End, wait up to --shutdown-timeout-ms for the
  last acknowledgement. A second signal exits at once.

Logging:
  Lines go to stderr as `qlog-agent: LEVEL: message`; QLOG_AGENT_LOG=debug says more.

Exit status:
  0  every event read was acknowledged by qlogd
  1  events were left unacknowledged (the count is printed), or a fatal error
  2  invalid configuration or usage";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The systemd journal, read with `journalctl --output=export --follow`.
    Journal,
    /// Standard input, in the format given by --input-format.
    Stdin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    /// Each line is one event's MESSAGE; bytes are kept as they are.
    Lines,
    /// One journalctl-style JSON object per line (as `journalctl -o json` writes).
    Json,
    /// The journal export format (as `journalctl -o export` writes).
    Export,
}

#[derive(Debug, Parser)]
#[command(
    name = "qlog-agent",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
)]
pub struct Args {
    /// The log VM that runs qlogd (required, here or in qubesdb)
    #[arg(long, env = "QLOG_LOG_VM", value_name = "VM")]
    pub log_vm: Option<String>,

    /// Where events come from
    #[arg(long, env = "QLOG_SOURCE", value_enum, default_value_t = SourceKind::Journal)]
    pub source: SourceKind,

    /// How --source stdin is parsed; bad lines are forwarded with QLOG_PARSE_ERROR
    #[arg(long, env = "QLOG_INPUT_FORMAT", value_enum, default_value_t = InputFormat::Lines)]
    pub input_format: InputFormat,

    /// The stream name qlogd files events under [default: "journal" or "stdin"]
    #[arg(long, env = "QLOG_STREAM", value_name = "NAME")]
    pub stream: Option<String>,

    /// The qrexec client program, run as `PROGRAM LOGVM qlog.Ingest`
    #[arg(
        long,
        env = "QLOG_QREXEC_CLIENT",
        value_name = "PATH",
        default_value = "qrexec-client-vm"
    )]
    pub qrexec_client: PathBuf,

    /// The journalctl program for --source journal
    #[arg(long, env = "QLOG_JOURNALCTL", value_name = "PATH", default_value = "journalctl")]
    pub journalctl: PathBuf,

    /// Read the journal from DIR (`journalctl -D DIR`) instead of the system journal
    #[arg(long, env = "QLOG_JOURNAL_DIRECTORY", value_name = "DIR")]
    pub journal_directory: Option<PathBuf>,

    /// Seconds between heartbeats to qlogd, busy or idle
    #[arg(
        long,
        env = "QLOG_HEARTBEAT_INTERVAL",
        value_name = "SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u32).range(1..=86_400)
    )]
    pub heartbeat_interval: u32,

    /// Seconds between telemetry samples (load, memory, disks, uptime, the agent's own
    /// counters); 0 sends none
    #[arg(
        long,
        env = "QLOG_TELEMETRY_INTERVAL",
        value_name = "SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(0..=86_400)
    )]
    pub telemetry_interval: u32,

    /// Forward only events with PRIORITY at most this: 0-7 or emerg..debug
    ///
    /// Names: emerg alert crit err warning notice info debug. Events without one are kept.
    #[arg(long, env = "QLOG_PRIORITY", value_name = "N|NAME")]
    pub priority: Option<String>,

    /// Forward only events whose _SYSTEMD_UNIT matches this glob (repeatable)
    #[arg(long, env = "QLOG_INCLUDE_UNIT", value_name = "UNIT", value_delimiter = ',')]
    pub include_unit: Vec<String>,

    /// Drop events whose _SYSTEMD_UNIT matches this glob (repeatable)
    #[arg(long, env = "QLOG_EXCLUDE_UNIT", value_name = "UNIT", value_delimiter = ',')]
    pub exclude_unit: Vec<String>,

    /// Forward only events whose SYSLOG_IDENTIFIER matches this glob (repeatable)
    #[arg(long, env = "QLOG_INCLUDE_IDENTIFIER", value_name = "ID", value_delimiter = ',')]
    pub include_identifier: Vec<String>,

    /// Drop events whose SYSLOG_IDENTIFIER matches this glob (repeatable)
    #[arg(long, env = "QLOG_EXCLUDE_IDENTIFIER", value_name = "ID", value_delimiter = ',')]
    pub exclude_identifier: Vec<String>,

    /// Remove this field from every event before sending (repeatable)
    #[arg(long, env = "QLOG_DROP_FIELD", value_name = "NAME", value_delimiter = ',')]
    pub drop_field: Vec<String>,

    /// Most events held unacknowledged; when full the agent stops reading its source
    #[arg(
        long,
        env = "QLOG_MAX_IN_FLIGHT_EVENTS",
        value_name = "N",
        default_value_t = 4096,
        value_parser = clap::value_parser!(u64).range(1..=10_000_000)
    )]
    pub max_in_flight_events: u64,

    /// Most bytes held unacknowledged; when full the agent stops reading its source
    #[arg(
        long,
        env = "QLOG_MAX_IN_FLIGHT_BYTES",
        value_name = "BYTES",
        default_value_t = 8 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(4096..=(1 << 40))
    )]
    pub max_in_flight_bytes: u64,

    /// On SIGTERM/SIGINT, how long to wait for the last acknowledgement
    #[arg(long, env = "QLOG_SHUTDOWN_TIMEOUT_MS", value_name = "MS", default_value_t = 5000)]
    pub shutdown_timeout_ms: u64,

    /// First delay before reconnecting or restarting journalctl
    #[arg(
        long,
        env = "QLOG_BACKOFF_INITIAL_MS",
        value_name = "MS",
        default_value_t = 1000,
        hide = true
    )]
    pub backoff_initial_ms: u64,

    /// Longest delay between reconnects; delays double up to it, with jitter
    #[arg(long, env = "QLOG_BACKOFF_MAX_MS", value_name = "MS", default_value_t = 60_000)]
    pub backoff_max_ms: u64,

    /// How much the agent says on stderr: error, warn, info or debug
    #[arg(long, env = "QLOG_AGENT_LOG", value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Where events come from, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Journal { journalctl: PathBuf, directory: Option<PathBuf> },
    Stdin { format: InputFormat },
}

/// The validated configuration of one agent run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub log_vm: String,
    pub source: Source,
    pub stream: String,
    pub qrexec_client: PathBuf,
    pub heartbeat_interval: Duration,
    /// `None` when telemetry is off.
    pub telemetry_interval: Option<Duration>,
    pub filters: Filters,
    pub max_in_flight_events: usize,
    pub max_in_flight_bytes: usize,
    pub shutdown_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub log: Log,
}

/// Looks up a qubesdb key; `None` if it is unset or qubesdb is not there.
pub type QubesDbLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads `/vm-config/NAME` keys with `qubesdb-read -q`, if that program is on `PATH`.
pub fn system_qubesdb() -> impl Fn(&str) -> Option<String> {
    let program = find_on_path("qubesdb-read");
    move |key: &str| {
        let output = Command::new(program.as_ref()?)
            .args(["-q", key])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let value = String::from_utf8_lossy(&output.stdout).trim().to_string();
        (!value.is_empty()).then_some(value)
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| {
        candidate.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

impl Config {
    /// Resolves and validates `args`, consulting `qubesdb` for what they leave unset.
    pub fn from_args(args: Args, qubesdb: QubesDbLookup<'_>) -> anyhow::Result<Config> {
        let level = Level::parse(&args.log_level).with_context(|| {
            format!("invalid log level {:?}: use error, warn, info or debug", args.log_level)
        })?;

        let log_vm = match args.log_vm.or_else(|| qubesdb(QUBESDB_LOG_VM)) {
            Some(vm) => vm.trim().to_string(),
            None => bail!(
                "no log VM configured: pass --log-vm VM, set QLOG_LOG_VM, or set the qubesdb \
                 key {QUBESDB_LOG_VM} (in dom0: qvm-features THISVM vm-config.qlog-log-vm VM)"
            ),
        };
        if log_vm.is_empty() || log_vm.starts_with('-') || log_vm.contains(char::is_whitespace) {
            bail!("invalid log VM name {log_vm:?}: give a VM name such as sys-log");
        }

        let source = match args.source {
            SourceKind::Journal => {
                Source::Journal { journalctl: args.journalctl, directory: args.journal_directory }
            }
            SourceKind::Stdin => Source::Stdin { format: args.input_format },
        };
        let default_stream =
            if args.source == SourceKind::Journal { DEFAULT_STREAM } else { DEFAULT_STDIN_STREAM };
        let stream = args
            .stream
            .or_else(|| qubesdb(QUBESDB_STREAM))
            .unwrap_or_else(|| default_stream.to_string());
        validate_stream_name(&stream).with_context(|| "check --stream or QLOG_STREAM")?;

        let max_priority = match args.priority {
            Some(text) => Some(parse_priority(&text).map_err(anyhow::Error::msg)?),
            None => match qubesdb(QUBESDB_PRIORITY) {
                Some(text) => Some(
                    parse_priority(&text)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("from qubesdb key {QUBESDB_PRIORITY}"))?,
                ),
                None => None,
            },
        };
        let drop_fields = args
            .drop_field
            .iter()
            .map(|name| parse_drop_field(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let filters = Filters {
            max_priority,
            include_units: args.include_unit,
            exclude_units: args.exclude_unit,
            include_identifiers: args.include_identifier,
            exclude_identifiers: args.exclude_identifier,
            drop_fields,
        };

        Ok(Config {
            log_vm,
            source,
            stream,
            qrexec_client: args.qrexec_client,
            heartbeat_interval: Duration::from_secs(args.heartbeat_interval.into()),
            telemetry_interval: (args.telemetry_interval > 0)
                .then(|| Duration::from_secs(args.telemetry_interval.into())),
            filters,
            max_in_flight_events: usize::try_from(args.max_in_flight_events)
                .expect("clap bounds the event limit far below usize::MAX"),
            max_in_flight_bytes: usize::try_from(args.max_in_flight_bytes).unwrap_or(usize::MAX),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
            backoff_initial: Duration::from_millis(args.backoff_initial_ms),
            backoff_max: Duration::from_millis(args.backoff_max_ms),
            log: Log::new(level),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Args {
        let mut argv = vec!["qlog-agent"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).unwrap()
    }

    fn no_qubesdb(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn missing_log_vm_says_how_to_set_it() {
        // The environment could set QLOG_LOG_VM; build Args by hand to stay independent.
        let mut args = parse(&["--log-vm", "x"]);
        args.log_vm = None;
        let err = Config::from_args(args, &no_qubesdb).unwrap_err().to_string();
        assert!(err.contains("--log-vm"), "{err}");
        assert!(err.contains("QLOG_LOG_VM"), "{err}");
        assert!(err.contains("vm-config.qlog-log-vm"), "{err}");
    }

    #[test]
    fn defaults_follow_the_source() {
        let c = Config::from_args(parse(&["--log-vm", "sys-log"]), &no_qubesdb).unwrap();
        assert_eq!(c.stream, "journal");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!((c.max_in_flight_events, c.max_in_flight_bytes), (4096, 8 << 20));
        assert!(matches!(c.source, Source::Journal { .. }));
        let c = Config::from_args(
            parse(&["--log-vm", "sys-log", "--source", "stdin", "--input-format", "json"]),
            &no_qubesdb,
        )
        .unwrap();
        assert_eq!(c.stream, "stdin");
        assert_eq!(c.source, Source::Stdin { format: InputFormat::Json });
    }

    #[test]
    fn qubesdb_fills_what_flags_leave_unset() {
        let db = |key: &str| match key {
            QUBESDB_LOG_VM => Some("db-log".to_string()),
            QUBESDB_PRIORITY => Some("warning".to_string()),
            QUBESDB_STREAM => Some("db-stream".to_string()),
            _ => None,
        };
        let mut args = parse(&["--log-vm", "x"]);
        args.log_vm = None;
        args.stream = None;
        args.priority = None;
        let c = Config::from_args(args, &db).unwrap();
        assert_eq!((c.log_vm.as_str(), c.stream.as_str()), ("db-log", "db-stream"));
        assert_eq!(c.filters.max_priority, Some(4));

        let c = Config::from_args(
            parse(&["--log-vm", "flag-log", "--stream", "s", "--priority", "2"]),
            &db,
        )
        .unwrap();
        assert_eq!((c.log_vm.as_str(), c.stream.as_str()), ("flag-log", "s"));
        assert_eq!(c.filters.max_priority, Some(2));
    }

    #[test]
    fn rejects_bad_values_with_the_way_out() {
        let bad = |args: &[&str]| Config::from_args(parse(args), &no_qubesdb).unwrap_err();
        assert!(format!("{:#}", bad(&["--log-vm", "l", "--stream", "a b"])).contains("--stream"));
        assert!(bad(&["--log-vm", "l", "--priority", "loud"]).to_string().contains("0-7"));
        assert!(bad(&["--log-vm=-x"]).to_string().contains("log VM"));
        assert!(bad(&["--log-vm", "l", "--drop-field", "__CURSOR"])
            .to_string()
            .contains("resumes"));
        assert!(bad(&["--log-vm", "l", "--log-level", "loud"]).to_string().contains("debug"));
        assert!(Args::try_parse_from(["qlog-agent", "--heartbeat-interval", "0"]).is_err());
    }

    #[test]
    fn repeatable_filters_collect_every_value() {
        let c = Config::from_args(
            parse(&[
                "--log-vm",
                "l",
                "--exclude-unit",
                "a.service",
                "--exclude-unit",
                "b.service,c.service",
                "--drop-field",
                "_cmdline",
            ]),
            &no_qubesdb,
        )
        .unwrap();
        assert_eq!(c.filters.exclude_units, ["a.service", "b.service", "c.service"]);
        assert_eq!(c.filters.drop_fields, ["_CMDLINE"]);
    }
}
