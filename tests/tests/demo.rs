//! `qlog demo`, run as a newcomer runs it: it shows the honest VMs' tail, the VM table
//! with the flooder held to its quota, and writes a redacted bundle that verifies; and
//! whether it ends normally or by Ctrl-C, nothing it started keeps running and its
//! state directory is gone.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use qlog_tests::bin_path;
use qlog_tests::process::wait_timeout;

/// Processes whose command line names the demo's state directory.
fn leftovers(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc is readable").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(cmdline);
        }
    }
    found
}

/// Waits until no process names `marker`: children die with the demo, but the kernel
/// reaps them a moment after it exits.
fn assert_nothing_left(marker: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers(marker);
        if left.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still running after the demo: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_shows_the_vms_contains_the_flooder_and_writes_a_verifiable_bundle() {
    let cwd = tempfile::tempdir().expect("a temp dir");
    let mut child = Command::new(bin_path("qlog"))
        .args(["demo", "--seconds", "2"])
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qlog demo starts");
    let pid = child.id();
    let status = wait_timeout(&mut child, Duration::from_secs(120))
        .expect("waitable")
        .expect("the demo ends on its own");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("piped"), &mut out)
        .expect("utf-8");
    assert!(status.success(), "demo failed: {out}");

    for needle in [
        "── qlog tail sd-app sd-proxy sd-devices ──",
        "── qlog vms ──",
        "sd-compromised",
        "claims host \"sd-app\"",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    // The flooder lost its own oldest events to its quota; the honest VMs lost nothing.
    let row = |vm: &str| {
        out.lines()
            .find(|l| l.starts_with(vm))
            .unwrap_or_else(|| panic!("no row for {vm}:\n{out}"))
            .to_owned()
    };
    let dropped = |line: &str| -> u64 {
        line.split_whitespace().rev().nth(2).and_then(|v| v.parse().ok()).expect("a DROPPED column")
    };
    assert!(dropped(&row("sd-compromised")) > 0, "{}", row("sd-compromised"));
    for vm in ["sd-app ", "sd-proxy ", "sd-devices "] {
        assert_eq!(dropped(&row(vm)), 0, "{}", row(vm));
    }

    let bundle = std::fs::read_dir(cwd.path())
        .expect("readable")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "zst"))
        .unwrap_or_else(|| panic!("no bundle written:\n{out}"));
    assert!(out.contains(&bundle.display().to_string()), "the demo says where the bundle is");
    let verify = Command::new(bin_path("qlog"))
        .args(["bundle", "verify"])
        .arg(&bundle)
        .output()
        .expect("runs");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    let state = std::env::temp_dir().join(format!("qlog-demo-{pid}"));
    assert!(!state.exists(), "{} was left behind", state.display());
    assert_nothing_left(&state.display().to_string());
}

#[test]
fn ctrl_c_stops_everything_and_leaves_nothing_on_disk() {
    let cwd = tempfile::tempdir().expect("a temp dir");
    let mut child = Command::new(bin_path("qlog"))
        .args(["demo", "--seconds", "600"])
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qlog demo starts");
    let pid = child.id();
    // Interrupt once the live tail is running.
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    for line in lines.by_ref() {
        if line.expect("utf-8").starts_with("── qlog tail") {
            break;
        }
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = wait_timeout(&mut child, Duration::from_secs(60))
        .expect("waitable")
        .expect("the demo stops on Ctrl-C");
    assert!(status.success(), "Ctrl-C exits 0: {rest:?}");

    let state = std::env::temp_dir().join(format!("qlog-demo-{pid}"));
    assert!(!state.exists(), "{} was left behind", state.display());
    assert!(
        std::fs::read_dir(cwd.path()).expect("readable").next().is_none(),
        "no bundle after Ctrl-C"
    );
    assert_nothing_left(&state.display().to_string());
    assert!(!Path::new(&state).exists());
}
