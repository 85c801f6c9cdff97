//! A real `qlog-agent` for a test, calling the sink through the qrexec double.
//!
//! Owns the agent's environment as a source VM would give it: `QLOG_QREXEC_CLIENT` is
//! the double, which is told where the log VM's services are (`QREXEC_DOUBLE_SERVICE_DIR`),
//! which VM is calling (`QREXEC_DOUBLE_SOURCE_VM`) and which target exists
//! (`QREXEC_DOUBLE_TARGET`, the `--log-vm`). What the agent sends is for the tests to
//! check; the agent's flags beyond `--log-vm` are the test's to pass.
//!
//! Each agent has its own temp dir with `agent.log` (stdout and stderr) and
//! `qrexec-calls.log` (one line per qrexec call the agent made).

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::bin_path;
use crate::process::{die_with_parent_thread, kill_and_reap, log_stdio, quote_log, wait_timeout};
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

    fn quoted_log(&self) -> String {
        quote_log("qlog-agent", &self.log_path)
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
