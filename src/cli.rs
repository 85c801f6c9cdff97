//! The command line: subcommands, journalctl-style filters, and turning them into a
//! query for qlogd.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use qlog_rpc::query::{EventsQuery, Filter, Grep, Request};

use crate::client::{self, Client, Reply};
use crate::output::{Format, Printer};
use crate::{timespec, vms};

/// qlog: tail, search and inspect the logs of many Qubes VMs.
///
/// qlog talks to qlogd's local query socket. Every VM name shown comes from qrexec, not
/// from the VM; anything else in an event is what the VM claims, and is escaped before it
/// reaches your terminal.
#[derive(Debug, Parser)]
#[command(name = "qlog", version, propagate_version = true)]
pub struct Cli {
    /// qlogd's query socket.
    #[arg(long, global = true, env = "QLOG_QUERY_SOCKET", default_value_os_t = client::default_socket())]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the last events, then follow new ones until Ctrl-C.
    Tail {
        /// How many stored events to show first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: u64,
        /// Stop after the stored events instead of following.
        #[arg(long)]
        no_follow: bool,
        #[command(flatten)]
        select: Selection,
    },
    /// Search stored events; prints every match unless -n limits it.
    Query {
        /// Show only the last N matches.
        #[arg(short = 'n', long)]
        lines: Option<u64>,
        /// Newest first.
        #[arg(short = 'r', long)]
        reverse: bool,
        #[command(flatten)]
        select: Selection,
    },
    /// One row per known VM: health and why, what is stored, quota use, drops, streams.
    Vms {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rates and gauges over time, per VM, as terminal charts (from qlogd's rollups).
    Stats(crate::stats::StatsArgs),
    /// A live view of every VM, busiest first, with its health; q quits.
    Top(crate::top::TopArgs),
    /// Current per-VM values in OpenMetrics text format, for a textfile collector.
    Metrics,
    /// Write a redacted support bundle: events, VM table, report, manifest (.tar.zst).
    ///
    /// Only allowlisted fields leave, and every value in them (VM names included) is
    /// redacted: addresses, host names, user names, IDs and secrets become tokens, the
    /// same value the same token throughout the bundle. Use --dry-run to see what would
    /// be replaced. Set SOURCE_DATE_EPOCH (or --created-at) and --key-file for a
    /// byte-identical bundle from the same store.
    Export(crate::bundle::ExportArgs),
    /// Check or summarise a support bundle written by qlog export.
    Bundle {
        #[command(subcommand)]
        command: crate::bundle::BundleCommand,
    },
    /// Check every VM's hash chain over its stored batches; exits 1 naming the first
    /// broken link of each VM whose chain is broken.
    ///
    /// qlogd recomputes each batch's content hash and link from the VM's anchor (where
    /// quota and retention last trimmed it) to its head, so a batch changed, removed,
    /// reordered or added behind qlogd's back shows. Reads every stored byte: it takes a
    /// while on a big store, and ingest goes on meanwhile.
    Verify(crate::verify::VerifyArgs),
    /// See qlog work on this machine: qlogd, four simulated VMs (one hostile), live tail.
    ///
    /// Needs no Qubes and no root. Build everything first: cargo build --release --workspace
    Demo {
        /// Keep the temporary state directory (store, sockets, qlogd.log) afterwards.
        #[arg(long)]
        keep: bool,
        /// How long the live tail runs.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Also forward this machine's own journal as the VM "this-machine".
        #[arg(long)]
        journal: bool,
    },
    /// Print a shell completion script (for packaging).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page in roff, or with --dir write one page per subcommand there
    /// (qlog.1, qlog-tail.1, qlog-bundle-verify.1, ...), for packaging.
    #[command(hide = true)]
    Man {
        /// Directory to write every page into; it must exist.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// Which events: journalctl's filters, shared by every command that selects events.
#[derive(Debug, Clone, Args)]
pub struct Filters {
    /// VM names, and FIELD=VALUE matches (same field twice is OR, different fields AND).
    #[arg(value_name = "VM|FIELD=VALUE")]
    pub terms: Vec<String>,
    /// Priority: a name or number (err means err and worse) or a range warning..err.
    #[arg(short = 'p', long)]
    pub priority: Option<String>,
    /// Only this systemd unit (".service" is implied; globs allowed). Repeatable.
    #[arg(short = 'u', long = "unit")]
    pub units: Vec<String>,
    /// Only this SYSLOG_IDENTIFIER. Repeatable.
    #[arg(short = 't', long = "identifier")]
    pub identifiers: Vec<String>,
    /// Regular expression on MESSAGE; case-insensitive if it has no upper-case letter.
    #[arg(short = 'g', long)]
    pub grep: Option<String>,
    /// Make --grep case-sensitive even for an all-lower-case pattern.
    #[arg(long)]
    pub case_sensitive: bool,
    /// Received at or after: "2026-12-03 10:00", "today", "yesterday", "-1h", ...
    #[arg(short = 'S', long, allow_hyphen_values = true)]
    pub since: Option<String>,
    /// Received at or before, in the same syntax as --since.
    #[arg(short = 'U', long, allow_hyphen_values = true)]
    pub until: Option<String>,
}

/// Which events, and how to print them.
#[derive(Debug, Args)]
pub struct Selection {
    #[command(flatten)]
    pub filters: Filters,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Short)]
    pub output: Format,
    /// Never colour output (NO_COLOR in the environment does the same).
    #[arg(long)]
    pub no_color: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Tail { lines, no_follow, select } => {
            events(&cli.socket, &select, Some(lines), false, !no_follow)
        }
        Command::Query { lines, reverse, select } => {
            events(&cli.socket, &select, lines, reverse, false)
        }
        Command::Vms { json } => vms::show(&cli.socket, json),
        Command::Stats(args) => crate::stats::show(&cli.socket, &args),
        Command::Top(args) => crate::top::run(&cli.socket, &args),
        Command::Metrics => crate::metrics::show(&cli.socket),
        // Their code lives in the helper binary: see helper.rs.
        Command::Export(_) | Command::Bundle { .. } => Err(crate::helper::exec_helper()),
        Command::Verify(args) => crate::verify::run(&cli.socket, &args),
        Command::Demo { keep, seconds, journal } => {
            crate::demo::run(crate::demo::DemoOptions { keep, seconds, journal })
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "qlog", &mut script);
            std::io::stdout().write_all(&script).context("cannot write the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match dir {
                // Hidden subcommands (these generators, the demo's helpers) get no page.
                Some(dir) => clap_mangen::generate_to(cmd, &dir).with_context(|| {
                    format!(
                        "cannot write the man pages into {}: it must be a writable directory",
                        dir.display()
                    )
                })?,
                None => clap_mangen::Man::new(cmd)
                    .render(&mut std::io::stdout())
                    .context("cannot write the man page")?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The process's exit status for what a command returned; an error is printed first.
pub fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            // A closed pipe (`qlog query | head`) is the reader's choice, not a failure.
            let broken_pipe = error
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("qlog: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses journalctl's priority syntax into an inclusive range.
pub fn parse_priority(s: &str) -> anyhow::Result<(u8, u8)> {
    fn one(s: &str) -> anyhow::Result<u8> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "emerg" | "0" => 0,
            "alert" | "1" => 1,
            "crit" | "2" => 2,
            "err" | "error" | "3" => 3,
            "warning" | "warn" | "4" => 4,
            "notice" | "5" => 5,
            "info" | "6" => 6,
            "debug" | "7" => 7,
            other => bail!(
                "unknown priority {other:?}: use emerg, alert, crit, err, warning, notice, info, debug or 0-7"
            ),
        })
    }
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            Ok((a.min(b), a.max(b)))
        }
        None => Ok((0, one(s)?)),
    }
}

/// Splits positional terms into VM names and FIELD=VALUE matches.
fn split_terms(terms: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut vms = Vec::new();
    let mut matches = Vec::new();
    for t in terms {
        match t.split_once('=') {
            Some((field, value)) => matches.push((field.to_owned(), value.to_owned())),
            None => vms.push(t.clone()),
        }
    }
    (vms, matches)
}

pub fn build_query(
    select: &Filters,
    limit: Option<u64>,
    reverse: bool,
    follow: bool,
) -> anyhow::Result<EventsQuery> {
    let now = chrono::Local::now();
    let (vms, matches) = split_terms(&select.terms);
    let time = |s: &Option<String>| {
        s.as_deref().map(|s| timespec::parse(s, now)).transpose().map_err(anyhow::Error::msg)
    };
    let grep = select.grep.as_ref().map(|pattern| Grep {
        case_insensitive: !select.case_sensitive && !pattern.chars().any(char::is_uppercase),
        pattern: pattern.clone(),
    });
    Ok(EventsQuery {
        vms,
        filter: Filter {
            priority: select.priority.as_deref().map(parse_priority).transpose()?,
            units: select.units.clone(),
            identifiers: select.identifiers.clone(),
            grep,
            since_usec: time(&select.since)?,
            until_usec: time(&select.until)?,
            matches,
        },
        limit,
        reverse,
        follow,
    })
}

fn events(
    socket: &std::path::Path,
    select: &Selection,
    limit: Option<u64>,
    reverse: bool,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let query = build_query(&select.filters, limit, reverse, follow)?;
    let color = !select.no_color
        && std::env::var_os("NO_COLOR").is_none()
        && std::io::stdout().is_terminal();
    let printer = Printer { format: select.output, color };
    let mut client = Client::connect(socket)?;
    client.send(&Request::Events(query.clone()))?;
    if follow {
        exit_zero_on_interrupt();
    }
    let stdout = std::io::stdout();
    // Large writes: a stored trace can be kilobytes, and a pipe reader pays per write.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    loop {
        let reply = match client.next_reply() {
            Ok(reply) => reply,
            Err(e) if client::is_unknown_vm(&e) => {
                return Err(vms::unknown_vm_error(socket, &query.vms, e))
            }
            Err(e) => return Err(e),
        };
        match reply {
            Some(Reply::Record(r)) => {
                printer.print(&r.view()?, &mut out).context("cannot write output")?
            }
            Some(Reply::Done) => {
                out.flush().context("cannot write output")?;
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Some(Reply::Lagged(missed)) => {
                out.flush().context("cannot write output")?;
                eprintln!("qlog: -- this follower fell behind and missed {missed} events (they are stored; run qlog query to see them) --");
            }
            None if follow => bail!("qlogd closed the stream (was it stopped?)"),
            None => bail!("qlogd closed the stream before the query finished"),
        }
        // Following is interactive: show each event as it comes.
        if follow {
            out.flush().context("cannot write output")?;
        }
    }
}

/// Ctrl-C ends a follow as the normal way out: exit 0, not 130.
fn exit_zero_on_interrupt() {
    extern "C" fn on_sigint(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe; output was flushed after every event.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: installing a handler that only calls an async-signal-safe function.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_journalctl() {
        assert_eq!(parse_priority("err").unwrap(), (0, 3));
        assert_eq!(parse_priority("4").unwrap(), (0, 4));
        assert_eq!(parse_priority("warning..err").unwrap(), (3, 4));
        assert_eq!(parse_priority("debug..info").unwrap(), (6, 7));
        assert!(parse_priority("loud").unwrap_err().to_string().contains("use emerg"));
    }

    #[test]
    fn terms_split_into_vms_and_matches() {
        let terms = vec!["sd-app".to_owned(), "_PID=1".to_owned(), "MESSAGE=a=b".to_owned()];
        let (vms, matches) = split_terms(&terms);
        assert_eq!(vms, ["sd-app"]);
        assert_eq!(
            matches,
            [("_PID".to_owned(), "1".to_owned()), ("MESSAGE".to_owned(), "a=b".to_owned())]
        );
    }
}
