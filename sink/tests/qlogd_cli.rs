//! qlogd's command line as packaging and operators use it: `check-config` accepts the
//! shipped configuration and names the line and column of a mistake.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build
//! the `qlogd` binary that the cross-process tests in tests/ run.

use std::process::Command;

fn qlogd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlogd"))
}

#[test]
fn check_config_accepts_the_shipped_file_and_prints_the_settings() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/qlogd.toml");
    let out = qlogd().args(["check-config", shipped]).output().expect("qlogd runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": ok"), "{text}");
    assert!(text.contains("state_dir = "), "{text}");
}

#[test]
fn check_config_names_the_line_and_column_of_a_mistake() {
    let dir = std::env::temp_dir().join(format!("qlogd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "retention_days = 30\nvm_qouta = \"1GiB\"\n").expect("write");
    let out = qlogd().arg("check-config").arg(&bad).output().expect("qlogd runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:1:") && err.contains("vm_qouta"), "{err}");
}

#[test]
fn help_names_the_environment_variables_packaging_relies_on() {
    let out = qlogd().arg("--help").output().expect("qlogd runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ["QLOG_STATE_DIR", "QLOG_INGEST_SOCKET", "QLOG_QUERY_SOCKET"] {
        assert!(help.contains(var), "{var} missing from --help");
    }
}
