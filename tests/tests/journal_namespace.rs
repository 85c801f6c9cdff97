//! The private journald recipe works on this machine: what goes in comes back out.
//!
//! These tests pin down the journald behaviour the agent tests build on, through every
//! way in the harness offers (`systemd-cat`, `logger`, the native protocol) and the way
//! the agent reads (`journalctl -o export`, also through the wrapper script).

use std::path::Path;

use qlog_tests::{parse_export, JournalNamespace};

fn messages(entries: &[qlog_rpc::Event]) -> Vec<&str> {
    entries.iter().map(|e| e.get_str("MESSAGE").expect("every entry has a MESSAGE")).collect()
}

#[test]
fn systemd_cat_messages_read_back_with_journalctl() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    journal.systemd_cat("qlog-ns-cat", 6, "first message");
    journal.systemd_cat("qlog-ns-cat", 4, "second, line one\nsecond, line two\n");
    journal.systemd_cat("qlog-ns-cat", 3, "third message");

    let entries = journal.entries(Some("qlog-ns-cat"));
    // The stdout transport makes one entry per line: a multi-line write is two entries.
    assert_eq!(
        messages(&entries),
        ["first message", "second, line one", "second, line two", "third message"]
    );
    let priorities: Vec<_> = entries.iter().map(|e| e.get_str("PRIORITY").unwrap()).collect();
    assert_eq!(priorities, ["6", "4", "4", "3"]);
    for entry in &entries {
        assert_eq!(entry.get_str("_TRANSPORT"), Some("stdout"));
        assert!(entry.get_str("__CURSOR").is_some_and(|c| c.starts_with("s=")));
        assert!(entry.get_str("__REALTIME_TIMESTAMP").is_some());
    }
}

#[test]
fn native_protocol_keeps_multi_line_and_binary_values() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let binary: &[u8] = &[0, 0xff, 0x1b, b'[', b'2', b'J', b'\n', 0xc3];
    journal.send(&[
        ("SYSLOG_IDENTIFIER", b"qlog-ns-native"),
        ("MESSAGE", b"line one\nline two"),
        ("PRIORITY", b"5"),
        ("QLOG_TEST_BINARY", binary),
    ]);

    let entries = journal.entries(Some("qlog-ns-native"));
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].get_str("MESSAGE"), Some("line one\nline two"));
    assert_eq!(entries[0].get("QLOG_TEST_BINARY"), Some(binary));
    assert_eq!(entries[0].get_str("_TRANSPORT"), Some("journal"));
}

#[test]
fn logger_reaches_the_private_journal_as_syslog() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    journal.logger("qlog-ns-logger", 3, "from logger");

    let entries = journal.entries(Some("qlog-ns-logger"));
    assert_eq!(messages(&entries), ["from logger"]);
    assert_eq!(entries[0].get_str("_TRANSPORT"), Some("syslog"));
    assert_eq!(entries[0].get_str("PRIORITY"), Some("3"));
    assert_eq!(entries[0].get_str("SYSLOG_FACILITY"), Some("1"));
}

#[test]
fn journalctl_wrapper_reads_the_private_journal() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    journal.systemd_cat("qlog-ns-wrapper", 6, "seen through the wrapper");
    journal.sync();

    // This is how the agent will run it: the wrapper path as its --journalctl.
    let output = std::process::Command::new(journal.journalctl_wrapper())
        .args(["-o", "export", "SYSLOG_IDENTIFIER=qlog-ns-wrapper"])
        .output()
        .expect("the wrapper runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let entries = parse_export(&output.stdout).unwrap();
    assert_eq!(messages(&entries), ["seen through the wrapper"]);
}

#[test]
fn namespace_leaves_the_machines_run_alone() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(ns("self"), ns(&journal.holder_pid().to_string()));
    assert_eq!(ns(&journal.holder_pid().to_string()), ns(&journal.journald_pid().to_string()));

    // The drop-in exists inside and not outside.
    let drop_in = "/run/systemd/journald.conf.d/zz-qlog-tests.conf";
    assert!(!Path::new(drop_in).exists());
    let inside = format!("/proc/{}/root{drop_in}", journal.holder_pid());
    assert!(Path::new(&inside).exists());
}

#[test]
fn entries_come_back_in_the_order_written() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let lines: String = (0..200).map(|i| format!("line {i}\n")).collect();
    journal.systemd_cat("qlog-ns-order", 6, &lines);

    let entries = journal.entries(Some("qlog-ns-order"));
    let expected: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
    assert_eq!(messages(&entries), expected);
}
