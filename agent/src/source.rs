//! Where events come from: journalctl, or standard input.
//!
//! Owns the reading loops and what they push into the window: filtered, fitted events and
//! the gaps the agent can vouch for. For the journal that means [`RunningJournalctl`]
//! (killed with its process group on drop), the resume-cursor check, the fallback when
//! journalctl rejects a cursor, and restarts with backoff from the last entry read. For
//! stdin it means the three input formats and the end of input.
//!
//! The journal source needs no state of its own on disk: qlogd's resume cursor says where
//! to start, and the journal itself holds whatever the window could not take. The stdin
//! source has no such buffer. Its unacknowledged events live only in the window, so they
//! are lost if the agent is killed, and a new agent cannot tell; it records no gap for
//! that (qlogd cannot know either), and this is a documented limit of `--source stdin`.

use std::ffi::OsString;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, ExitStatus, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;

use qlog_rpc::fields::CURSOR;
use qlog_rpc::{Limits, ResumePoint};

use crate::backoff::Backoff;
use crate::config::{InputFormat, Source};
use crate::export::ExportParser;
use crate::filter::Filters;
use crate::input::{is_blank, json_entry, line_entry, parse_error_entry, LineSplitter};
use crate::limits::{finish, fits, RawEntry, ReadLimits};
use crate::log::Log;
use crate::process;
use crate::shared::{Shared, Stopped};
use crate::supervisor::Msg;

/// The gap reason for journal entries that may be missing because a cursor was lost.
pub const GAP_CURSOR_LOST: &str = "cursor-lost";

const READ_CHUNK: usize = 64 * 1024;

/// Parse errors logged one by one before the rest are only counted.
const PARSE_ERRORS_LOGGED: u64 = 10;

/// What a source needs from the rest of the agent.
pub struct SourceContext {
    pub shared: Arc<Shared>,
    pub to: Sender<Msg>,
    pub log: Log,
    pub filters: Filters,
    /// The limits of the first welcome, which events are fitted to as they are read.
    pub limits: Limits,
    pub backoff: Backoff,
}

/// The supervisor's hold on a running source.
#[derive(Debug)]
pub struct SourceHandle {
    journal: Option<Arc<KillSwitch>>,
}

impl SourceHandle {
    /// Stops reading at shutdown. The journal source kills journalctl, which ends a read
    /// that could otherwise wait forever on an idle journal; a stdin read cannot be cut
    /// short, so that thread is left to end with the process.
    pub fn stop(&self) {
        if let Some(switch) = &self.journal {
            switch.trip();
        }
    }
}

/// Starts the source thread, which reads until shutdown (or the end of stdin).
pub fn start(
    source: &Source,
    resume: &ResumePoint,
    ctx: SourceContext,
) -> io::Result<SourceHandle> {
    let builder = thread::Builder::new().stack_size(512 * 1024);
    match source {
        Source::Journal { journalctl, directory } => {
            let switch = Arc::new(KillSwitch::default());
            let journal = JournalSource {
                program: journalctl.clone(),
                directory: directory.clone(),
                switch: Arc::clone(&switch),
                forwarder: Forwarder::new(&ctx),
                log: ctx.log,
                backoff: ctx.backoff,
                shared: ctx.shared,
            };
            let start = match &resume.cursor {
                Some(cursor) => Start::Cursor(cursor.clone()),
                None => Start::Boot,
            };
            builder.name("journal".into()).spawn(move || journal.run(start))?;
            Ok(SourceHandle { journal: Some(switch) })
        }
        Source::Stdin { format } => {
            let format = *format;
            let mut forwarder = Forwarder::new(&ctx);
            let (log, shared, to) = (ctx.log, ctx.shared, ctx.to);
            builder.name("stdin".into()).spawn(move || {
                if read_stdin(format, &mut forwarder, log).is_ok() {
                    log.info(format_args!(
                        "stdin ended after {} events ({} filtered out); waiting for qlogd to \
                         acknowledge them",
                        forwarder.forwarded, forwarder.filtered
                    ));
                    shared.finish_input();
                    let _ = to.send(Msg::InputDone);
                }
            })?;
            Ok(SourceHandle { journal: None })
        }
    }
}

/// Filters, fits and pushes entries; shared by every source.
struct Forwarder {
    shared: Arc<Shared>,
    filters: Filters,
    limits: Limits,
    read: ReadLimits,
    forwarded: u64,
    filtered: u64,
}

impl Forwarder {
    fn new(ctx: &SourceContext) -> Forwarder {
        Forwarder {
            shared: Arc::clone(&ctx.shared),
            filters: ctx.filters.clone(),
            limits: ctx.limits,
            read: ReadLimits::from_limits(&ctx.limits),
            forwarded: 0,
            filtered: 0,
        }
    }

    fn forward(&mut self, mut entry: RawEntry) -> Result<(), Stopped> {
        if !self.filters.keep(&entry) {
            self.filtered += 1;
            return Ok(());
        }
        self.filters.strip(&mut entry);
        if entry.fields.is_empty() && entry.dropped_fields == 0 {
            self.filtered += 1;
            return Ok(());
        }
        let event = finish(entry, &self.limits);
        debug_assert!(fits(&event, &self.limits), "finish fits every event to the limits");
        self.shared.push_event(&event, self.limits)?;
        self.forwarded += 1;
        Ok(())
    }

    fn gap(&mut self, reason: &str, detail: String) -> Result<(), Stopped> {
        self.shared.push_gap(reason, detail).map(drop)
    }
}

/// Lets the supervisor kill the current journalctl from another thread, safely: the pid
/// is forgotten before the child is reaped, so a reused pid is never signalled.
#[derive(Debug, Default)]
struct KillSwitch {
    state: Mutex<SwitchState>,
}

#[derive(Debug, Default)]
struct SwitchState {
    pid: Option<u32>,
    /// True once the supervisor asked for the source to stop.
    tripped: bool,
}

impl KillSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, SwitchState> {
        self.state.lock().expect("no thread panics while holding the kill switch")
    }

    /// Records the running journalctl; false if the source is already stopping.
    fn arm(&self, pid: u32) -> bool {
        let mut state = self.lock();
        if state.tripped {
            return false;
        }
        state.pid = Some(pid);
        true
    }

    fn disarm(&self) {
        self.lock().pid = None;
    }

    fn trip(&self) {
        let mut state = self.lock();
        state.tripped = true;
        if let Some(pid) = state.pid {
            process::kill_group_id(pid);
        }
    }
}

/// The running journalctl; dropping it kills its process group and reaps it.
struct RunningJournalctl {
    child: Child,
    switch: Arc<KillSwitch>,
}

impl RunningJournalctl {
    /// Starts journalctl, or returns `Ok(None)` if the source is stopping.
    fn spawn(
        program: &Path,
        args: &[OsString],
        switch: &Arc<KillSwitch>,
    ) -> io::Result<Option<(RunningJournalctl, ChildStdout)>> {
        let mut child = process::command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let armed = switch.arm(child.id());
        let running = RunningJournalctl { child, switch: Arc::clone(switch) };
        Ok(armed.then_some((running, stdout)))
    }

    /// Reaps journalctl once its output has ended.
    fn wait(mut self) -> Option<ExitStatus> {
        self.switch.disarm();
        self.child.wait().ok()
    }
}

impl Drop for RunningJournalctl {
    fn drop(&mut self) {
        self.switch.disarm();
        process::kill_and_reap(&mut self.child);
    }
}

/// Where journalctl starts reading.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    /// The beginning of the current boot: a stream qlogd has never seen.
    Boot,
    /// At this cursor, inclusive: the first entry is checked against it.
    Cursor(String),
    /// The oldest entry the journal holds, after a rejected cursor.
    Oldest,
}

fn journalctl_args(start: &Start, directory: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> =
        // `--follow` alone implies `--lines=10`: without `--no-tail` journalctl would skip
        // all but the last ten entries of the backlog, silently.
        ["--output=export", "--follow", "--no-tail", "--all"].iter().map(OsString::from).collect();
    if let Some(dir) = directory {
        args.push("--directory".into());
        args.push(dir.into());
    }
    match start {
        Start::Boot => args.push("--boot".into()),
        Start::Cursor(cursor) => args.push(format!("--cursor={cursor}").into()),
        Start::Oldest => {}
    }
    args
}

/// How one journalctl run ended.
#[derive(Debug)]
enum RunEnd {
    CannotStart(io::Error),
    Exited { entries: u64, status: Option<ExitStatus> },
}

struct JournalSource {
    program: PathBuf,
    directory: Option<PathBuf>,
    switch: Arc<KillSwitch>,
    forwarder: Forwarder,
    log: Log,
    backoff: Backoff,
    shared: Arc<Shared>,
}

impl JournalSource {
    fn run(mut self, mut start: Start) {
        // The cursor of the last entry read, filtered or not: where a restart resumes.
        let mut last_cursor: Option<String> = None;
        loop {
            let end = match self.run_once(&start, &mut last_cursor) {
                Ok(end) => end,
                Err(Stopped) => return,
            };
            let delay = match end {
                RunEnd::CannotStart(e) => {
                    let delay = self.backoff.next_delay();
                    self.log.error(format_args!(
                        "cannot run {} ({e}): is systemd installed? set --journalctl or \
                         QLOG_JOURNALCTL; retrying in {:.1} s",
                        self.program.display(),
                        delay.as_secs_f64()
                    ));
                    delay
                }
                // Only an error exit counts as a rejection: a journalctl killed by a signal
                // (the OOM killer, say) said nothing about the cursor, and falling back to
                // the oldest entry would send the whole journal again.
                RunEnd::Exited { entries: 0, status }
                    if matches!(start, Start::Cursor(_))
                        && status.and_then(|s| s.code()).is_some_and(|code| code != 0) =>
                {
                    self.log.warn(format_args!(
                        "journalctl rejected the cursor ({}): restarting from the oldest entry \
                         the journal holds",
                        describe_status(status)
                    ));
                    let detail = "journalctl rejected the resume cursor, so reading restarted at \
                                  the oldest entry the journal holds; entries between the two may \
                                  be missing"
                        .to_string();
                    if self.forwarder.gap(GAP_CURSOR_LOST, detail).is_err() {
                        return;
                    }
                    start = Start::Oldest;
                    continue;
                }
                RunEnd::Exited { entries, status } => {
                    if entries > 0 {
                        self.backoff.reset();
                    }
                    if let Some(cursor) = &last_cursor {
                        start = Start::Cursor(cursor.clone());
                    }
                    let delay = self.backoff.next_delay();
                    self.shared.update(|state| state.counters.journal_restarts += 1);
                    self.log.warn(format_args!(
                        "journalctl exited ({}); restarting it in {:.1} s from the last entry read",
                        describe_status(status),
                        delay.as_secs_f64()
                    ));
                    delay
                }
            };
            if self.shared.sleep_unless_stopping(delay).is_err() {
                return;
            }
        }
    }

    fn run_once(
        &mut self,
        start: &Start,
        last_cursor: &mut Option<String>,
    ) -> Result<RunEnd, Stopped> {
        let args = journalctl_args(start, self.directory.as_deref());
        let (journalctl, mut stdout) =
            match RunningJournalctl::spawn(&self.program, &args, &self.switch) {
                Ok(Some(running)) => running,
                Ok(None) => return Err(Stopped),
                Err(e) => return Ok(RunEnd::CannotStart(e)),
            };
        self.log.debug(format_args!("started {} {args:?}", self.program.display()));

        // A new parser per run: a partial entry left by a dead journalctl is read again
        // in full after the restart, from its cursor.
        let mut parser = ExportParser::new(self.forwarder.read);
        let mut entries = 0u64;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log.warn(format_args!("cannot read from journalctl: {e}"));
                    break;
                }
            };
            let forwarder = &mut self.forwarder;
            let log = self.log;
            parser.feed(&buf[..n], |entry| {
                entries += 1;
                let cursor = entry.get(CURSOR).map(|c| String::from_utf8_lossy(c).into_owned());
                if entries == 1 {
                    if let Start::Cursor(expected) = start {
                        if cursor.as_deref() == Some(expected.as_str()) {
                            // The entry at the cursor is the one qlogd (or we) already have.
                            *last_cursor = cursor;
                            return Ok(());
                        }
                        log.warn(format_args!(
                            "the journal no longer holds the entry at cursor {expected}: \
                             recording a {GAP_CURSOR_LOST} gap"
                        ));
                        forwarder.gap(GAP_CURSOR_LOST, cursor_lost_detail(expected))?;
                    }
                }
                if cursor.is_some() {
                    *last_cursor = cursor;
                }
                forwarder.forward(entry)
            })?;
        }
        if parser.malformed() > 0 {
            self.log.warn(format_args!(
                "journalctl wrote {} binary fields without their closing newline",
                parser.malformed()
            ));
        }
        let status = journalctl.wait();
        if self.shared.lock().stopping {
            return Err(Stopped);
        }
        Ok(RunEnd::Exited { entries, status })
    }
}

fn cursor_lost_detail(cursor: &str) -> String {
    format!(
        "the journal no longer holds the entry at cursor {cursor} (vacuumed, rotated, or a new \
         DisposableVM); entries logged between it and the next event may be missing"
    )
}

fn describe_status(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.map(|s| (s.code(), s.signal())) {
        Some((Some(code), _)) => format!("status {code}"),
        Some((None, Some(signal))) => format!("killed by {}", crate::signals::name(signal)),
        Some((None, None)) => "ended".to_string(),
        None => "status unknown".to_string(),
    }
}

/// The parser for one `--input-format`.
enum StdinParser {
    Lines(LineSplitter),
    Json(LineSplitter),
    Export(ExportParser),
}

/// Reads stdin to its end; `Err(Stopped)` if shutdown came first.
fn read_stdin(format: InputFormat, forwarder: &mut Forwarder, log: Log) -> Result<(), Stopped> {
    let read = forwarder.read;
    let mut parser = match format {
        InputFormat::Lines => StdinParser::Lines(LineSplitter::new(read.max_value_len)),
        // A JSON line is parsed whole, so it may be as long as a frame.
        InputFormat::Json => StdinParser::Json(LineSplitter::new(read.max_entry_bytes)),
        InputFormat::Export => StdinParser::Export(ExportParser::new(read)),
    };
    let mut json = JsonLines { log, line_no: 0, bad: 0 };
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log.error(format_args!("cannot read stdin ({e}): treating it as ended"));
                break;
            }
        };
        let bytes = &buf[..n];
        match &mut parser {
            StdinParser::Lines(lines) => {
                lines.feed(bytes, |line| forwarder.forward(line_entry(line)))?
            }
            StdinParser::Json(lines) => {
                lines.feed(bytes, |line| json.forward(line, forwarder, &read))?
            }
            StdinParser::Export(export) => export.feed(bytes, |entry| forwarder.forward(entry))?,
        }
    }

    match &mut parser {
        StdinParser::Lines(lines) => lines.finish(|line| forwarder.forward(line_entry(line)))?,
        StdinParser::Json(lines) => lines.finish(|line| json.forward(line, forwarder, &read))?,
        StdinParser::Export(export) => {
            if export.malformed() > 0 {
                log.warn(format_args!(
                    "stdin had {} binary fields without their closing newline",
                    export.malformed()
                ));
            }
            let finished = export.finish();
            if finished.cut_mid_field {
                log.warn("stdin ended inside an entry: forwarding what was read of it");
            }
            if let Some(entry) = finished.entry {
                forwarder.forward(entry)?;
            }
        }
    }
    if json.bad > 0 {
        log.warn(format_args!(
            "{} of {} stdin lines were not journal JSON objects; they were forwarded as MESSAGE \
             with QLOG_PARSE_ERROR",
            json.bad, json.line_no
        ));
    }
    Ok(())
}

/// `--input-format json` line handling, with its parse-error count.
struct JsonLines {
    log: Log,
    line_no: u64,
    bad: u64,
}

impl JsonLines {
    fn forward(
        &mut self,
        line: crate::input::Line<'_>,
        forwarder: &mut Forwarder,
        read: &ReadLimits,
    ) -> Result<(), Stopped> {
        self.line_no += 1;
        if is_blank(line.bytes) {
            return Ok(());
        }
        let entry = match json_entry(line, read) {
            Ok(entry) => entry,
            Err(why) => {
                self.bad += 1;
                if self.bad <= PARSE_ERRORS_LOGGED {
                    self.log.warn(format_args!(
                        "stdin line {} is not a journal JSON object ({why}): forwarding it as \
                         MESSAGE with QLOG_PARSE_ERROR{}",
                        self.line_no,
                        if self.bad == PARSE_ERRORS_LOGGED {
                            "; further bad lines are only counted"
                        } else {
                            ""
                        }
                    ));
                }
                parse_error_entry(line, &why, read)
            }
        };
        forwarder.forward(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journalctl_starts_at_the_boot_the_cursor_or_the_oldest_entry() {
        let text = |start, dir: Option<&Path>| -> Vec<String> {
            journalctl_args(&start, dir).iter().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(
            text(Start::Boot, None),
            ["--output=export", "--follow", "--no-tail", "--all", "--boot"]
        );
        assert_eq!(
            text(Start::Cursor("s=1;i=2".into()), Some(Path::new("/j"))),
            [
                "--output=export",
                "--follow",
                "--no-tail",
                "--all",
                "--directory",
                "/j",
                "--cursor=s=1;i=2"
            ]
        );
        assert_eq!(
            text(Start::Oldest, None),
            ["--output=export", "--follow", "--no-tail", "--all"]
        );
    }

    #[test]
    fn a_tripped_kill_switch_refuses_new_children() {
        let switch = KillSwitch::default();
        assert!(switch.arm(1));
        switch.disarm();
        switch.trip();
        assert!(!switch.arm(2));
    }
}
