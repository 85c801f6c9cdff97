//! The `qlog` binary's own command line: errors an operator can act on without a
//! running qlogd.
//!
//! Being an integration test of the `qlog` package also makes `cargo test --workspace`
//! build the `qlog` binary that the cross-process tests in tests/ run.

use std::process::Command;

fn qlog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlog"))
}

#[test]
fn a_missing_qlogd_is_reported_with_what_to_do() {
    let out = qlog().args(["--socket", "/nonexistent/query.sock", "vms"]).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is qlogd running?") && err.contains("QLOG_QUERY_SOCKET"), "{err}");
}

#[test]
fn bad_time_syntax_is_refused_before_connecting() {
    let out =
        qlog().args(["--socket", "/nonexistent", "query", "-S", "soon"]).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid time \"soon\"") && err.contains("2026-12-03 10:00"), "{err}");
}
