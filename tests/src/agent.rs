//! A real `qlog-agent` for a test, calling the sink through the qrexec double.
//!
//! Owns the agent's environment as a source VM would give it: `QLOG_QREXEC_CLIENT` is
//! the double, which is told where the log VM's services are (`QREXEC_DOUBLE_SERVICE_DIR`),
//! which VM is calling (`QREXEC_DOUBLE_SOURCE_VM`) and which target exists
//! (`QREXEC_DOUBLE_TARGET`, the `--log-vm`). What the agent sends is for the tests to
//! check; the agent's flags beyond `--log-vm` are the test's to pass.
//!
//! Each agent has its own temp dir with `agent.log` (stdout and stderr) and
//! `qrexec-calls.log` (one line per qrexec call the agent made). Waiting for either to
//! say something is event-driven: an inotify watch on that dir wakes the waiter whenever
//! a file in it changes, and the condition is checked again.
//!
//! For the tests that crash things, it also finds the agent's children (the qrexec client
//! and journalctl) and reads the agent's resident memory, and [`wait_for_records`] waits
//! for a count of stored records by following the sink's live feed.

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use qlog_rpc::query::{EventsQuery, Filter, Record};
use tempfile::TempDir;

use crate::bin_path;
use crate::journal::JournalNamespace;
use crate::process::{
    die_with_parent_thread, kill_and_reap, log_stdio, poll_readable, quote_log, wait_timeout,
};
use crate::query::{FollowItem, Follower};
use crate::sink::RunningSink;

/// The log VM's name in tests, as in the deployment this was written for.
pub const DEFAULT_LOG_VM: &str = "sd-log";

/// How to start an agent. Build it with [`AgentOptions::new`] and add to it.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The VM the agent runs in, as dom0 would name it in the descriptor.
    pub source_vm: String,
    /// The log VM's `/etc/qubes-rpc`, usually [`RunningSink::service_dir`].
    pub service_dir: PathBuf,
    /// `--log-vm`, and the only target the double's policy knows; by default `sd-log`.
    pub log_vm: String,
    /// Appended after `--log-vm VM`.
    pub args: Vec<OsString>,
    /// Set last, so it can override the double's settings (`QREXEC_DOUBLE_POLICY=deny`,
    /// `QREXEC_DOUBLE_DIE_AFTER_BYTES=N`) or the agent's.
    pub env: Vec<(OsString, OsString)>,
}

impl AgentOptions {
    /// An agent in `source_vm` sending to `sink`.
    pub fn new(sink: &RunningSink, source_vm: &str) -> AgentOptions {
        AgentOptions {
            source_vm: source_vm.to_owned(),
            service_dir: sink.service_dir().to_owned(),
            log_vm: DEFAULT_LOG_VM.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> AgentOptions {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> AgentOptions
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> AgentOptions {
        self.env.push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// `--source journal`, reading `journal` through its journalctl wrapper.
    pub fn journal(self, journal: &JournalNamespace) -> AgentOptions {
        self.args(["--source", "journal"]).arg("--journalctl").arg(journal.journalctl_wrapper())
    }

    /// Reconnects and journalctl restarts after 50 ms, backing off to at most 500 ms, so
    /// that tests which break things do not wait out the default backoff.
    pub fn fast_backoff(self) -> AgentOptions {
        self.args(["--backoff-initial-ms", "50", "--backoff-max-ms", "500"])
    }
}

/// A running qlog-agent with its stdin piped. Dropping it SIGKILLs the agent (and prints
/// its log if the test is failing).
#[derive(Debug)]
pub struct RunningAgent {
    /// `None` once the agent has been reaped.
    child: Option<Child>,
    /// `None` once closed, which is the agent's end of input with `--source stdin`.
    stdin: Option<ChildStdin>,
    log_path: PathBuf,
    call_log: PathBuf,
    dir: TempDir,
}

impl RunningAgent {
    /// Starts the agent. It is not waited for: an agent has no readiness signal, and the
    /// test waits for what it expects the agent to do.
    pub fn spawn(options: AgentOptions) -> RunningAgent {
        let dir = tempfile::Builder::new()
            .prefix("qlog-agent.")
            .tempdir_in("/tmp")
            .expect("/tmp is writable");
        let log_path = dir.path().join("agent.log");
        let call_log = dir.path().join("qrexec-calls.log");

        let mut command = Command::new(bin_path("qlog-agent"));
        // Settings from the developer's shell must not leak into the double or the agent.
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("QREXEC_DOUBLE_") || name_text.starts_with("QLOG_") {
                command.env_remove(&name);
            }
        }
        let (stdout, stderr) = log_stdio(&log_path);
        command
            .arg("--log-vm")
            .arg(&options.log_vm)
            .args(&options.args)
            .env("QLOG_QREXEC_CLIENT", bin_path("qrexec-client-vm"))
            .env("QREXEC_DOUBLE_SERVICE_DIR", &options.service_dir)
            .env("QREXEC_DOUBLE_SOURCE_VM", &options.source_vm)
            .env("QREXEC_DOUBLE_TARGET", &options.log_vm)
            .env("QREXEC_DOUBLE_CALL_LOG", &call_log)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr);
        die_with_parent_thread(&mut command);

        let mut child = command.spawn().expect("qlog-agent can be spawned");
        let stdin = child.stdin.take();
        RunningAgent { child: Some(child), stdin, log_path, call_log, dir }
    }

    /// The agent's stdin.
    ///
    /// # Panics
    ///
    /// If it has been closed.
    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("the agent's stdin is still open")
    }

    /// Writes `bytes` to the agent's stdin.
    ///
    /// # Panics
    ///
    /// If the write fails, quoting the agent's log (a dead agent is the usual cause).
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stdin().write_all(bytes).and_then(|()| self.stdin().flush()) {
            panic!("cannot write to the agent's stdin: {e}{}", self.quoted_log());
        }
    }

    /// Closes the agent's stdin: end of input for `--source stdin`.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the agent to exit.
    ///
    /// # Panics
    ///
    /// If it is still running after `timeout` (it is SIGKILLed), or was already reaped.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the agent has not been reaped yet");
        match wait_timeout(&mut child, timeout) {
            Ok(Some(status)) => status,
            outcome => {
                kill_and_reap(&mut child);
                panic!(
                    "the agent did not exit within {timeout:?} ({outcome:?}){}",
                    self.quoted_log()
                )
            }
        }
    }

    /// Sends SIGTERM and waits, returning the exit status and how long it took.
    ///
    /// # Panics
    ///
    /// As [`RunningAgent::wait`].
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let child = self.child.as_mut().expect("the agent has not been reaped yet");
        crate::process::signal(child, libc::SIGTERM);
        let signalled = Instant::now();
        let status = self.wait(timeout);
        (status, signalled.elapsed())
    }

    /// SIGKILLs the agent and reaps it. Does nothing if it has been reaped.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// True if and only if the agent has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// # Panics
    ///
    /// If the agent has been reaped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent has not been reaped yet").id()
    }

    /// The file collecting the agent's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log_tail(&self) -> String {
        crate::process::tail(&self.log_path)
    }

    /// One line per qrexec call the agent has made so far, in order, as the double logged
    /// them: `target=T service=S+A pid=P`.
    pub fn qrexec_calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.call_log)
            .map(|text| text.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The agent's temp dir, for files a test wants beside it (a state file, say).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until `ready` holds for the agent's log so far, and returns that log.
    ///
    /// # Panics
    ///
    /// If it does not hold within `timeout`, quoting the log and naming `what`.
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> bool,
    ) -> String {
        let read = || std::fs::read(&self.log_path).unwrap_or_default();
        let found = wait_for_dir_change(self.dir.path(), timeout, || {
            let text = String::from_utf8_lossy(&read()).into_owned();
            ready(&text).then_some(text)
        });
        found.unwrap_or_else(|| {
            panic!("the agent's log did not show {what} within {timeout:?}{}", self.quoted_log())
        })
    }

    /// Waits until the log holds at least `count` lines containing `needle`; returns them.
    pub fn wait_for_log_lines(&self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        let what = format!("{count} lines with {needle:?}");
        let text = self.wait_for_log(&what, timeout, |text| {
            text.lines().filter(|l| l.contains(needle)).count() >= count
        });
        text.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }

    /// Waits until the agent has made at least `count` qrexec calls; returns them all.
    ///
    /// # Panics
    ///
    /// If it has not within `timeout`, quoting the agent's log.
    pub fn wait_for_calls(&self, count: usize, timeout: Duration) -> Vec<String> {
        let found = wait_for_dir_change(self.dir.path(), timeout, || {
            let calls = self.qrexec_calls();
            (calls.len() >= count).then_some(calls)
        });
        found.unwrap_or_else(|| {
            panic!(
                "the agent made {} of {count} qrexec calls within {timeout:?}{}",
                self.qrexec_calls().len(),
                self.quoted_log()
            )
        })
    }

    /// The agent's resident memory, `VmRSS` from `/proc/PID/status`, in KiB.
    ///
    /// # Panics
    ///
    /// If the agent has been reaped or the line is missing.
    pub fn vm_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("a running agent has a /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS line in the agent's status:\n{status}"))
    }

    /// The agent's living children, as `(pid, comm)`.
    pub fn children(&self) -> Vec<(u32, String)> {
        children_of(self.pid())
    }

    /// The pid of the agent's running qrexec client: the pid of the latest call in the
    /// call log, if that process is still alive and the agent's child.
    pub fn qrexec_client_pid(&self) -> Option<u32> {
        let last = self.qrexec_calls().pop()?;
        let pid: u32 = last.rsplit_once("pid=")?.1.trim().parse().ok()?;
        self.children().iter().any(|(child, _)| *child == pid).then_some(pid)
    }

    /// The pid of the agent's running journalctl (the `--journalctl` wrapper execs into
    /// it, so it is the agent's child), if there is one.
    pub fn journalctl_pid(&self) -> Option<u32> {
        self.children().into_iter().find(|(_, comm)| comm == "journalctl").map(|(pid, _)| pid)
    }

    fn quoted_log(&self) -> String {
        quote_log("qlog-agent", &self.log_path)
    }
}

/// SIGKILLs a process that is not our child (the agent's qrexec client or journalctl).
/// Callers find the pid right before, so it cannot have been reused in between unless
/// the process exited in that instant, which a test of crashes tolerates.
pub fn kill9_pid(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("Linux pids fit in pid_t");
    assert!(pid > 1, "refusing to signal pid {pid}");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The living children of `parent`, as `(pid, comm)`, found by scanning `/proc`.
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut children = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split at
        // the last `)`.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next();
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && state != Some("Z") {
            children.push((pid, comm));
        }
    }
    children
}

/// Waits until qlogd holds at least `count` records matching `filter`, and returns the
/// matches in the order received (stored ones first, then live ones).
///
/// It follows the sink's live feed, so it wakes on every commit rather than polling; if
/// the follower lags, it starts over with a fresh query.
///
/// # Panics
///
/// If the count is not reached within `timeout`, or the follow breaks (qlogd died).
pub fn wait_for_records(
    query_socket: &Path,
    filter: &Filter,
    count: usize,
    timeout: Duration,
) -> Vec<Record> {
    let deadline = Instant::now() + timeout;
    'query: loop {
        let query = EventsQuery { filter: filter.clone(), ..EventsQuery::default() };
        let mut follower = Follower::start(query_socket, query)
            .unwrap_or_else(|e| panic!("cannot follow qlogd's records: {e}"));
        let mut records = follower.wait_done(deadline.saturating_duration_since(Instant::now()));
        while records.len() < count {
            match follower.recv(deadline.saturating_duration_since(Instant::now())) {
                Some(FollowItem::Record(record)) => records.push(record),
                Some(FollowItem::Done(_)) => {}
                Some(FollowItem::Lagged(_)) => continue 'query,
                Some(ended) => {
                    panic!("the follow ended after {} records: {ended:?}", records.len())
                }
                None => panic!(
                    "qlogd holds {} of {count} expected records after {timeout:?}",
                    records.len()
                ),
            }
        }
        return records;
    }
}

/// Calls `check` now and after every change to a file in `dir`, until it returns `Some`
/// or `timeout` passes (`None`). The watch is set before the first check, so a change
/// between a check and the wait still wakes the wait.
fn wait_for_dir_change<T>(
    dir: &Path,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let watch = DirWatch::new(dir).expect("an inotify watch can be set on the agent's dir");
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        watch.wait(left);
    }
}

/// An inotify watch for writes and new files in one directory.
struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    fn new(dir: &Path) -> io::Result<DirWatch> {
        // SAFETY: inotify_init1 takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(dir.as_os_str().as_bytes()).expect("temp paths hold no NUL");
        let mask = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO;
        // SAFETY: the descriptor is an inotify instance and the path a valid C string.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// Waits up to `timeout` for a change, then drains the queued events.
    fn wait(&self, timeout: Duration) {
        let _ = poll_readable(&[self.fd.as_raw_fd()], timeout);
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for its length; the descriptor is non-blocking, so this
        // stops with EAGAIN once the queue is empty.
        while unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.quoted_log());
        }
    }
}
