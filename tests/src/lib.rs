//! The harness for qlog's cross-process tests in `tests/tests/`.
//!
//! Owns starting and stopping the real programs (`qlogd`, `qlog-agent`, a private
//! systemd-journald) and talking to them the way their peers do: a query client, a raw
//! ingest client for hostile tests, and a well-behaved ingest session. It leaves the
//! assertions to the tests and the wire format to `qlog_rpc`, whose encoders and decoders
//! it uses rather than retyping them.
//!
//! Conventions every helper here follows:
//!
//! - Conditions are waited for as events with a deadline (a readiness datagram, a pidfd, a
//!   frame, a channel), never by sleeping; a missed deadline panics with the tail of the
//!   program's own log, which is usually the fastest way to see why.
//! - Each running program is a guard whose Drop kills it (`RunningSink`, `RunningAgent`,
//!   `JournalNamespace`), and each keeps its sockets and logs in its own directory under
//!   `/tmp`, short enough for a socket path and shared with the journal namespace.
//! - Every child is also asked to die with the thread that started it
//!   (`PR_SET_PDEATHSIG`), so a test binary that is killed leaves nothing behind. The
//!   price: start a program on the thread that will use it, not on a helper thread that
//!   ends first.
//! - The binaries are the ones `cargo test --workspace` built; see [`bin_path`].

pub mod agent;
pub mod flood;
pub mod ingest;
pub mod journal;
pub mod notify;
pub mod process;
pub mod query;
pub mod sink;
pub mod wire;
/// The workload generator lives in its own crate so the CLI's demo can use it too.
pub use qlog_workload as workload;

use std::path::PathBuf;
use std::time::Duration;

pub use agent::{AgentOptions, RunningAgent};
pub use ingest::{hello, ingest_events, ingest_events_at, RawIngest};
pub use journal::{parse_export, JournalNamespace};
pub use query::{
    query_events, query_events_reply, query_stats, query_vms, EventsReply, Follower, QueryError,
};
pub use sink::{RunningSink, SinkOptions};

/// How long a program may take to report readiness: generous, because CI shares two
/// cores with other builds and a debug qlogd opening its store is not instant.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one reply, frame or exit may take before a test gives up on it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Locates a binary of this workspace (`qlogd`, `qlog-agent`, `qlog`, `qrexec-client-vm`)
/// in the target profile directory of the running test.
///
/// A test executable lives in `target/<profile>/deps/`, the binaries one level up. Cargo
/// only builds the binaries of the package under test, so tests that run other packages'
/// binaries need `cargo test --workspace` (or a `cargo build --workspace` first).
///
/// # Panics
///
/// If the binary is not there, with a message saying how to build it.
/// Calls `check` until it returns something, failing the test after `timeout` with
/// `what` and the last state `check` described. Tests wait on conditions this way, never
/// on sleeps; the timeout only bounds how long a failure takes to show.
pub fn poll_until<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) if std::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {state}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running test has a path");
    let mut dir = exe.parent().expect("an executable lives in a directory").to_path_buf();
    if dir.file_name().is_some_and(|d| d == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} is not built: {} does not exist (build it with cargo build --workspace, \
         or run the tests with cargo test --workspace)",
        path.display()
    );
    path
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` in UTC, a form journalctl and qlog both accept as a time.
pub fn utc_timestamp(usec: u64) -> String {
    chrono::DateTime::from_timestamp_micros(usec as i64)
        .expect("test times are within chrono's range")
        .format("%Y-%m-%d %H:%M:%S%.6f")
        .to_string()
}

/// The processor and core count, printed beside every benchmark figure.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}
