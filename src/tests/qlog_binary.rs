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

/// `qlog` execs `qlog-bundle` for the bundle commands (src/helper.rs): a copy of `qlog`
/// laid out as the Debian package installs it finds the helper in `lib/qlog/`, and one
/// without a helper says what is missing instead of failing obscurely.
#[test]
fn bundle_commands_run_in_the_helper_wherever_it_is_installed() {
    let root = tempfile::tempdir().expect("a temporary directory");
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_qlog"), bin.join("qlog")).unwrap();
    let verify_missing = |qlog: &std::path::Path| {
        Command::new(qlog)
            .args(["bundle", "verify", "/nonexistent/bundle.tar.zst"])
            .output()
            .expect("runs")
    };

    let out = verify_missing(&bin.join("qlog"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lib = root.path().join("lib/qlog");
    assert!(
        err.contains("the helper qlog-bundle, which is not installed")
            && err.contains(&bin.join("qlog-bundle").display().to_string())
            && err.contains(&lib.join("qlog-bundle").display().to_string()),
        "{err}"
    );

    std::fs::create_dir_all(&lib).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_qlog-bundle"), lib.join("qlog-bundle")).unwrap();
    let out = verify_missing(&bin.join("qlog"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("qlog: cannot open /nonexistent/bundle.tar.zst"), "{err}");
}

#[test]
fn the_helper_refuses_every_other_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_qlog-bundle"))
        .args(["--socket", "/nonexistent", "vms"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("qlog-bundle runs only qlog export and qlog bundle"), "{err}");
}
