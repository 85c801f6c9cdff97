//! A real `qlogd` for a test: started in its own directory, stopped when the guard drops.
//!
//! Owns qlogd's command line as tests rely on it (`--state-dir`, `--ingest-socket`,
//! `--query-socket`, `--vm-quota`, `--retention-days`, `--log-level`), waiting for its
//! `READY=1`, crashing and restarting it over the same state, and a stand-in for the log
//! VM's `/etc/qubes-rpc` that the qrexec double can look `qlog.Ingest` up in. What qlogd
//! does with its sockets is for the tests to find out.
//!
//! Everything lives in one temp dir under `/tmp`, kept while the guard lives:
//!
//! ```text
//! ingest.sock  query.sock  notify.sock  qlogd.log (stdout and stderr, every start)
//! state/                 (unless SinkOptions::state_dir names another)
//! services/qlog.Ingest   (a symlink to ingest.sock)
//! ```

use std::ffi::OsString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::notify::NotifySocket;
use crate::process::{die_with_parent_thread, kill_and_reap, log_marker, log_stdio, quote_log};
use crate::{bin_path, IO_TIMEOUT, STARTUP_TIMEOUT};

/// qlogd's own debug logs without sled's, which would bury them.
pub const DEFAULT_LOG_LEVEL: &str = "info,qlog_sink=debug,qlogd=debug";

/// How to start qlogd. By default: a fresh state dir, qlogd's own quota and retention,
/// and [`DEFAULT_LOG_LEVEL`] so the log in a failure message says what happened.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// `--vm-quota BYTES`; by default, qlogd's default.
    pub vm_quota: Option<u64>,
    /// `--retention-days N`; by default, qlogd's default.
    pub retention_days: Option<u32>,
    /// `--log-level FILTER` (tracing's EnvFilter syntax); by default
    /// [`DEFAULT_LOG_LEVEL`]. `None` passes no flag.
    pub log_level: Option<String>,
    /// A state dir to use instead of a fresh one, for a sink that takes over the state
    /// of an earlier one. The caller keeps it alive.
    pub state_dir: Option<PathBuf>,
    /// Appended to the command line after the flags above.
    pub args: Vec<OsString>,
    /// Set in qlogd's environment after the harness's own variables.
    pub env: Vec<(OsString, OsString)>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            vm_quota: None,
            retention_days: None,
            log_level: Some(DEFAULT_LOG_LEVEL.to_owned()),
            state_dir: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running qlogd. Dropping it SIGKILLs qlogd (and prints its log if the test is
/// failing); the directory goes with it.
#[derive(Debug)]
pub struct RunningSink {
    options: SinkOptions,
    state_dir: PathBuf,
    ingest_socket: PathBuf,
    query_socket: PathBuf,
    service_dir: PathBuf,
    log_path: PathBuf,
    notify: NotifySocket,
    /// `None` between a kill or terminate and the next restart.
    child: Option<Child>,
    /// How many times qlogd has been started, for the markers in the log.
    starts: u32,
    /// Declared last so it is removed after the notify socket inside it.
    dir: TempDir,
}

impl RunningSink {
    /// Starts qlogd and waits for its `READY=1`.
    ///
    /// # Panics
    ///
    /// If qlogd exits or stays silent for [`STARTUP_TIMEOUT`], quoting its log.
    pub fn start(options: SinkOptions) -> RunningSink {
        let dir = tempfile::Builder::new()
            .prefix("qlog-sink.")
            .tempdir_in("/tmp")
            .expect("/tmp is writable");
        let state_dir = match &options.state_dir {
            Some(state_dir) => state_dir.clone(),
            None => {
                let state_dir = dir.path().join("state");
                std::fs::create_dir(&state_dir).expect("the fresh temp dir is writable");
                state_dir
            }
        };
        let ingest_socket = dir.path().join("ingest.sock");
        let service_dir = dir.path().join("services");
        std::fs::create_dir(&service_dir).expect("the fresh temp dir is writable");
        symlink(&ingest_socket, service_dir.join(qlog_rpc::INGEST_SERVICE))
            .expect("the fresh temp dir is writable");
        let notify = NotifySocket::bind(&dir.path().join("notify.sock"))
            .expect("a datagram socket can be bound in the fresh temp dir");

        let mut sink = RunningSink {
            options,
            state_dir,
            ingest_socket,
            query_socket: dir.path().join("query.sock"),
            service_dir,
            log_path: dir.path().join("qlogd.log"),
            notify,
            child: None,
            starts: 0,
            dir,
        };
        sink.spawn_and_wait_ready();
        sink
    }

    /// Starts qlogd again over the same state dir and socket paths, SIGKILLing it first
    /// if it is still running. qlogd itself replaces the stale socket files.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn_and_wait_ready();
    }

    /// Stops qlogd with SIGTERM, as systemd would, and starts it again over the same
    /// state dir and socket paths.
    ///
    /// # Panics
    ///
    /// As [`RunningSink::terminate`] does, and if qlogd exits other than cleanly.
    pub fn restart_cleanly(&mut self) {
        let (status, _) = self.terminate();
        assert!(status.success(), "qlogd exited with {status} on SIGTERM");
        self.spawn_and_wait_ready();
    }

    /// SIGKILLs qlogd, as a crash or power loss would end it, and reaps it. Does nothing
    /// if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Sends SIGTERM and waits for qlogd to exit, returning its status and how long it
    /// took from the signal.
    ///
    /// # Panics
    ///
    /// If qlogd is not running, or does not exit within [`IO_TIMEOUT`] (it is SIGKILLed
    /// then, and the panic quotes its log).
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("terminate needs a running qlogd");
        crate::process::signal(&mut child, libc::SIGTERM);
        let signalled = Instant::now();
        match crate::process::wait_timeout(&mut child, IO_TIMEOUT) {
            Ok(Some(status)) => (status, signalled.elapsed()),
            outcome => {
                kill_and_reap(&mut child);
                panic!(
                    "qlogd did not exit within {IO_TIMEOUT:?} of SIGTERM ({outcome:?}){}",
                    quote_log("qlogd", &self.log_path)
                );
            }
        }
    }

    /// The pid of the running qlogd.
    ///
    /// # Panics
    ///
    /// If qlogd was killed or terminated and not restarted.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("qlogd is not running").id()
    }

    /// True if and only if qlogd has been started and has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn ingest_socket(&self) -> &Path {
        &self.ingest_socket
    }

    pub fn query_socket(&self) -> &Path {
        &self.query_socket
    }

    /// A directory holding `qlog.Ingest`, a symlink to the ingest socket: the value for
    /// `QREXEC_DOUBLE_SERVICE_DIR`. It stays valid across restarts.
    pub fn service_dir(&self) -> &Path {
        &self.service_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The file collecting qlogd's stdout and stderr over every start.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The end of qlogd's log, for assertions and messages.
    pub fn log_tail(&self) -> String {
        crate::process::tail(&self.log_path)
    }

    /// The sink's temp dir, for files a test wants to keep beside it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn_and_wait_ready(&mut self) {
        self.starts += 1;
        log_marker(&self.log_path, &format!("qlogd start #{}", self.starts));
        self.notify.drain();

        let mut command = Command::new(bin_path("qlogd"));
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--ingest-socket")
            .arg(&self.ingest_socket)
            .arg("--query-socket")
            .arg(&self.query_socket);
        if let Some(quota) = self.options.vm_quota {
            command.arg("--vm-quota").arg(quota.to_string());
        }
        if let Some(days) = self.options.retention_days {
            command.arg("--retention-days").arg(days.to_string());
        }
        if let Some(level) = &self.options.log_level {
            command.arg("--log-level").arg(level);
        }
        // The developer's own settings (QLOG_STATE_DIR, QLOG_LOG, ...) must not redirect
        // or reconfigure a test's qlogd.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("QLOG_") {
                command.env_remove(&name);
            }
        }
        let (stdout, stderr) = log_stdio(&self.log_path);
        command
            .args(&self.options.args)
            .env("NOTIFY_SOCKET", self.notify.path())
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        die_with_parent_thread(&mut command);

        let mut child = command.spawn().expect("qlogd can be spawned");
        if let Err(why) = self.notify.wait_ready(&mut child, STARTUP_TIMEOUT) {
            kill_and_reap(&mut child);
            panic!("qlogd did not become ready: {why}{}", quote_log("qlogd", &self.log_path));
        }
        self.child = Some(child);
    }
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", quote_log("qlogd", &self.log_path));
        }
    }
}
