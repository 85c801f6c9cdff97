//! qlog-agent forwards a real journald's entries to a real qlogd, each exactly once and
//! byte for byte.
//!
//! Entries reach journald every way a VM's programs log: the stdout stream
//! (`systemd-cat`), the syslog socket (`logger`) and the native protocol, which carries
//! multi-line, binary and invalid UTF-8 values. What qlogd stores is compared with what
//! `journalctl -o export` says the journal holds. journald logs entries of its own too, so
//! the tests pick theirs out by `SYSLOG_IDENTIFIER`.

use std::collections::HashMap;

use qlog_rpc::fields::{CURSOR, MESSAGE, PRIORITY, SYSLOG_IDENTIFIER};
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind};
use qlog_rpc::Event;
use qlog_tests::agent::wait_for_records;
use qlog_tests::{
    query_events, AgentOptions, JournalNamespace, RunningAgent, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

const SOURCE_VM: &str = "sd-app";

const CAT_ID: &str = "qlog-aj-cat";
const LOGGER_ID: &str = "qlog-aj-logger";
const NATIVE_ID: &str = "qlog-aj-native";

/// A value with every byte journald's export format has to frame: NUL, newline, an
/// escape sequence, a byte that is not UTF-8.
const BINARY: &[u8] = b"\x00\x01\xff\xfe\x1b[2J\nafter newline\r\x7f\xc3(";

fn identifiers(ids: &[&str]) -> Filter {
    Filter { identifiers: ids.iter().map(|id| (*id).to_owned()).collect(), ..Filter::default() }
}

/// The MESSAGE of native entry `i`: multi-line, not UTF-8, large (40 KiB, under the
/// sink's 48 KiB value limit) or ending in a newline.
fn native_message(i: usize) -> Vec<u8> {
    match i % 4 {
        0 => format!("native {i}\nsecond line\n\tthird line, indented").into_bytes(),
        1 => [format!("native {i} not UTF-8: ").as_bytes(), b"\xc0\xaf\xed\xa0\x80"].concat(),
        2 => format!("native {i} {}", "x".repeat(40 * 1024)).into_bytes(),
        _ => format!("native {i} trailing newline kept\n").into_bytes(),
    }
}

/// Logs `count` entries through the native protocol, each with a binary field, an empty
/// one and its index.
fn send_native(journal: &JournalNamespace, first: usize, count: usize) {
    for i in first..first + count {
        let message = native_message(i);
        let priority = (i % 8).to_string();
        let index = i.to_string();
        journal.send(&[
            (SYSLOG_IDENTIFIER, NATIVE_ID.as_bytes()),
            (MESSAGE, &message),
            (PRIORITY, priority.as_bytes()),
            ("QLOG_TEST_BINARY", BINARY),
            ("QLOG_TEST_INDEX", index.as_bytes()),
            ("QLOG_TEST_EMPTY", b""),
        ]);
    }
}

fn cat_lines(journal: &JournalNamespace, first: usize, count: usize) {
    let text: String = (first..first + count).map(|i| format!("cat line {i}\n")).collect();
    journal.systemd_cat(CAT_ID, 5, &text);
}

/// Every record qlogd holds, after the agent has ended cleanly.
fn all_records(sink: &RunningSink) -> Vec<Record> {
    query_events(sink.query_socket(), &EventsQuery::default()).expect("qlogd answers a query")
}

/// Starts an agent on `journal` and waits until a first record is stored (journald's own
/// start-up entries, usually), which proves journalctl has found its starting point.
fn following_agent(journal: &JournalNamespace, sink: &RunningSink) -> RunningAgent {
    let agent =
        RunningAgent::spawn(AgentOptions::new(sink, SOURCE_VM).journal(journal).fast_backoff());
    wait_for_records(sink.query_socket(), &Filter::default(), 1, IO_TIMEOUT);
    agent
}

fn ours(records: &[Record], ids: &[&str]) -> Vec<Record> {
    records
        .iter()
        .filter(|r| r.event.get_str(SYSLOG_IDENTIFIER).is_some_and(|id| ids.contains(&id)))
        .cloned()
        .collect()
}

#[test]
fn entries_logged_while_the_agent_follows_arrive_once_with_every_field_intact() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let sink = RunningSink::start(SinkOptions::default());
    let mut agent = following_agent(&journal, &sink);

    cat_lines(&journal, 0, 150);
    send_native(&journal, 0, 20);
    for i in 0..20u8 {
        journal.logger(LOGGER_ID, i % 8, &format!("logger message {i}"));
    }
    send_native(&journal, 20, 20);
    cat_lines(&journal, 150, 150);

    let ids = [CAT_ID, LOGGER_ID, NATIVE_ID];
    let expected: Vec<Event> = journal
        .entries(None)
        .into_iter()
        .filter(|e| e.get_str(SYSLOG_IDENTIFIER).is_some_and(|id| ids.contains(&id)))
        .collect();
    assert_eq!(expected.len(), 300 + 20 + 40, "journald stored what was logged");
    wait_for_records(sink.query_socket(), &identifiers(&ids), expected.len(), IO_TIMEOUT);

    // A clean stop: the agent sends End and exits 0 only once everything is acknowledged,
    // so nothing it read can still be on its way when the store is read below.
    let (status, _) = agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", agent.log_tail());
    // All of it over one long-lived qrexec call, as the transport asks.
    assert_eq!(agent.qrexec_calls().len(), 1, "{:?}", agent.qrexec_calls());

    let records = all_records(&sink);
    // Every record is an event of this VM's journal stream, numbered 1, 2, 3, ... with no
    // gap: nothing was skipped, and a duplicate would have needed a number of its own.
    for (i, record) in records.iter().enumerate() {
        assert_eq!((record.vm.as_str(), record.stream.as_str()), (SOURCE_VM, "journal"));
        assert_eq!(record.kind, RecordKind::Event, "record {i}: {:?}", record.event);
        assert_eq!(record.seq, i as u64 + 1, "sequence numbers are contiguous");
    }
    let mut by_cursor: HashMap<&[u8], &Record> = HashMap::new();
    for record in &records {
        let cursor = record.event.get(CURSOR).expect("every forwarded entry has its __CURSOR");
        if let Some(first) = by_cursor.insert(cursor, record) {
            panic!("entry stored twice, as seq {} and seq {}", first.seq, record.seq);
        }
    }

    // Each entry of ours is stored once, with exactly the fields journalctl exports for
    // it, in the same order and byte for byte.
    let ours = ours(&records, &ids);
    assert_eq!(ours.len(), expected.len(), "no entry of ours is missing or doubled");
    for entry in &expected {
        let cursor = entry.get(CURSOR).expect("journalctl exports a __CURSOR");
        let Some(record) = by_cursor.get(cursor) else {
            panic!("entry missing from qlogd: {:?}", entry.get_str(MESSAGE));
        };
        assert_eq!(record.event.fields, entry.fields, "fields differ for seq {}", record.seq);
    }

    // And the ugly values made it as they were sent, not only as journalctl shows them.
    let native: Vec<&Record> =
        ours.iter().filter(|r| r.event.get_str(SYSLOG_IDENTIFIER) == Some(NATIVE_ID)).collect();
    assert_eq!(native.len(), 40);
    for record in &native {
        let event = &record.event;
        let index: usize = event.get_str("QLOG_TEST_INDEX").unwrap().parse().unwrap();
        assert_eq!(event.get("QLOG_TEST_BINARY"), Some(BINARY));
        assert_eq!(event.get("QLOG_TEST_EMPTY"), Some(&b""[..]));
        assert_eq!(event.get_str(PRIORITY), Some((index % 8).to_string().as_str()));
        assert_eq!(event.get(MESSAGE), Some(&native_message(index)[..]));
    }
    let by_id = |id: &str, field: &str| -> Vec<String> {
        ours.iter()
            .filter(|r| r.event.get_str(SYSLOG_IDENTIFIER) == Some(id))
            .map(|r| r.event.get_str(field).unwrap().to_owned())
            .collect()
    };
    let logged: Vec<String> = (0..20).map(|i| (i % 8).to_string()).collect();
    assert_eq!(by_id(LOGGER_ID, PRIORITY), logged);
    let lines: Vec<String> = (0..300).map(|i| format!("cat line {i}")).collect();
    assert_eq!(by_id(CAT_ID, MESSAGE), lines);
}

#[test]
fn entries_logged_before_the_agent_starts_are_forwarded_from_the_start_of_the_boot() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let sink = RunningSink::start(SinkOptions::default());
    // A VM boots and logs long before its agent first reaches qlogd.
    cat_lines(&journal, 0, 100);
    send_native(&journal, 0, 8);
    let expected: Vec<Event> = journal.entries(None);

    let mut agent = following_agent(&journal, &sink);
    // Entries are forwarded in journal order, so once this later one is stored, every
    // entry before it that the agent meant to send is stored too.
    journal.logger(LOGGER_ID, 6, "logged after the agent started");
    wait_for_records(sink.query_socket(), &identifiers(&[LOGGER_ID]), 1, IO_TIMEOUT);
    let (status, _) = agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", agent.log_tail());

    let records = all_records(&sink);
    let stored: Vec<&[u8]> = records.iter().filter_map(|r| r.event.get(CURSOR)).collect();
    let missing: Vec<&str> = expected
        .iter()
        .filter(|e| !stored.contains(&e.get(CURSOR).unwrap()))
        .map(|e| e.get_str(MESSAGE).unwrap_or("(binary)"))
        .collect();
    // The whole boot, not the last ten entries that `--follow` without `--no-tail`
    // would give.
    assert!(
        missing.is_empty(),
        "{} of {} entries logged before the agent started never reached qlogd, the first \
         {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(3)]
    );
    assert_eq!(records.len(), expected.len() + 1, "each entry once, then the later one");
}
