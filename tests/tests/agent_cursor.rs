//! The resume cursor qlogd hands back: when the journal no longer holds its entry, the
//! agent records one `cursor-lost` gap and goes on, neither stalling nor sending the
//! journal again; when it does, the agent resumes right after it.
//!
//! The journals are real: a fresh DisposableVM is a new journal namespace with a machine
//! ID and boot ID of its own, behind a cursor from another VM's journal; a vacuumed cursor
//! is a journal rotated and vacuumed between two agent runs; a cursor journalctl cannot
//! parse at all is planted through the stdin source, which sends whatever `__CURSOR` it
//! is given.

use qlog_rpc::fields::{BOOT_ID, CURSOR, MESSAGE, QLOG_GAP, SYSLOG_IDENTIFIER};
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind};
use qlog_tests::agent::wait_for_records;
use qlog_tests::{
    query_events, AgentOptions, JournalNamespace, RunningAgent, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

/// A DisposableVM keeps its name across restarts when it is a named one, so its stream
/// and resume cursor in qlogd outlive each of its journals.
const SOURCE_VM: &str = "sd-viewer";
const IDENTIFIER: &str = "qlog-cursor";

/// The field the sink stores a `Gap` frame's reason in.
const GAP_REASON: &str = "GAP_REASON";
const CURSOR_LOST: &str = "cursor-lost";

/// The agent's warning when the entry at the cursor is gone.
const NO_LONGER_HOLDS: &str = "the journal no longer holds the entry at cursor";

fn ours() -> Filter {
    Filter { identifiers: vec![IDENTIFIER.to_owned()], ..Filter::default() }
}

fn cursor_lost_gaps() -> Filter {
    Filter { matches: vec![(GAP_REASON.to_owned(), CURSOR_LOST.to_owned())], ..Filter::default() }
}

/// Logs entries `first..first + count` of ours, tagged with `batch`.
fn log(journal: &JournalNamespace, batch: &str, first: usize, count: usize) {
    for i in first..first + count {
        let message = format!("{batch} entry {i}");
        journal.send(&[
            (SYSLOG_IDENTIFIER, IDENTIFIER.as_bytes()),
            (MESSAGE, message.as_bytes()),
            ("QLOG_TEST_BATCH", batch.as_bytes()),
        ]);
    }
}

fn spawn_agent(journal: &JournalNamespace, sink: &RunningSink) -> RunningAgent {
    RunningAgent::spawn(AgentOptions::new(sink, SOURCE_VM).journal(journal).fast_backoff())
}

/// Stops the agent cleanly, which it does only once all it read is acknowledged.
fn stop(mut agent: RunningAgent) -> String {
    let (status, _) = agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", agent.log_tail());
    std::fs::read_to_string(agent.log_path()).expect("the agent's log is readable")
}

/// One agent run on `journal` that forwards `count` entries of `batch` and ends cleanly.
fn forward_batch(journal: &JournalNamespace, sink: &RunningSink, batch: &str, count: usize) {
    let agent = spawn_agent(journal, sink);
    let before = query_events(sink.query_socket(), &EventsQuery::default()).unwrap().len();
    // A first record of this run stored means journalctl has found its starting point.
    wait_for_records(sink.query_socket(), &Filter::default(), before + 1, IO_TIMEOUT);
    log(journal, batch, 0, count);
    let filter = Filter {
        matches: vec![("QLOG_TEST_BATCH".to_owned(), batch.to_owned())],
        ..Filter::default()
    };
    wait_for_records(sink.query_socket(), &filter, count, IO_TIMEOUT);
    stop(agent);
}

fn all_records(sink: &RunningSink) -> Vec<Record> {
    query_events(sink.query_socket(), &EventsQuery::default()).expect("qlogd answers a query")
}

/// Checks the stream is numbered 1, 2, 3, ..., holds no entry twice, and holds exactly one
/// gap record, a `cursor-lost` one; returns the records before it and those after it.
fn split_at_the_one_gap(records: &[Record]) -> (&[Record], &[Record]) {
    let mut cursors = std::collections::BTreeSet::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1, "sequence numbers are contiguous");
        assert_eq!(record.vm, SOURCE_VM);
        if let Some(cursor) = record.event.get(CURSOR) {
            assert!(cursors.insert(cursor.to_vec()), "seq {} repeats an entry", record.seq);
        }
    }
    let gaps: Vec<usize> =
        (0..records.len()).filter(|&i| records[i].kind == RecordKind::Gap).collect();
    let [gap] = gaps[..] else { panic!("expected one gap record, found {}", gaps.len()) };
    let event = &records[gap].event;
    assert_eq!(event.get_str(GAP_REASON), Some(CURSOR_LOST), "{event:?}");
    assert_eq!(event.get_str(QLOG_GAP), Some("agent"), "the agent vouched for it");
    assert!(event.get_str(MESSAGE).is_some_and(|m| m.contains(CURSOR_LOST)), "{event:?}");
    (&records[..gap], &records[gap + 1..])
}

fn messages_of(records: &[Record], batch: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.event.get_str("QLOG_TEST_BATCH") == Some(batch))
        .map(|r| r.event.get_str(MESSAGE).unwrap().to_owned())
        .collect()
}

fn expected_messages(batch: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{batch} entry {i}")).collect()
}

#[test]
fn a_new_disposable_vm_behind_another_journals_cursor_records_a_gap_and_forwards_its_own() {
    if !JournalNamespace::require_root() {
        return;
    }
    let sink = RunningSink::start(SinkOptions::default());
    let old_vm = JournalNamespace::start();
    forward_batch(&old_vm, &sink, "old", 20);
    let old_machine = old_vm.machine_id();
    drop(old_vm);

    // The same VM name, restarted: a new machine, a new boot, a new journal, which
    // already holds entries when its agent starts.
    let new_vm = JournalNamespace::start_as_new_machine();
    assert_ne!(new_vm.machine_id(), old_machine);
    log(&new_vm, "new", 0, 5);
    let agent = spawn_agent(&new_vm, &sink);
    wait_for_records(sink.query_socket(), &cursor_lost_gaps(), 1, IO_TIMEOUT);
    log(&new_vm, "new", 5, 30);
    wait_for_records(sink.query_socket(), &ours(), 20 + 35, IO_TIMEOUT);
    let log_text = stop(agent);
    // One warning for the lost cursor, and nothing an operator would have to act on.
    assert_eq!(log_text.matches(NO_LONGER_HOLDS).count(), 1, "{log_text}");
    assert!(!log_text.contains(": error: "), "{log_text}");

    let records = all_records(&sink);
    let (before, after) = split_at_the_one_gap(&records);
    assert_eq!(messages_of(before, "old"), expected_messages("old", 20));
    assert_eq!(messages_of(after, "new"), expected_messages("new", 35));
    // Everything after the gap is the new machine's, whose journal was sent in full.
    let new_boot = new_vm.entries(None)[0].get(BOOT_ID).unwrap().to_vec();
    assert!(before.iter().all(|r| r.event.get(BOOT_ID) != Some(&new_boot[..])));
    assert!(after.iter().all(|r| r.event.get(BOOT_ID) == Some(&new_boot[..])));
    assert_eq!(after.len(), new_vm.entries(None).len(), "every entry of the new journal");
}

#[test]
fn a_vacuumed_resume_cursor_records_a_gap_without_stalling_or_resending() {
    if !JournalNamespace::require_root() {
        return;
    }
    let sink = RunningSink::start(SinkOptions::default());
    let journal = JournalNamespace::start();
    forward_batch(&journal, &sink, "first", 20);

    // Between two agent runs the entry at qlogd's cursor goes: its journal file is
    // archived, more is logged to the next one, and the archive is vacuumed.
    let journalctl = |args: &[&str]| {
        let output = journal.command("journalctl").args(args).output().expect("journalctl runs");
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    journalctl(&["--rotate"]);
    log(&journal, "second", 0, 5);
    journalctl(&["--vacuum-files=1"]);
    assert!(messages_of_entries(&journal, "first").is_empty(), "the vacuum removed the cursor");

    let agent = spawn_agent(&journal, &sink);
    wait_for_records(sink.query_socket(), &cursor_lost_gaps(), 1, IO_TIMEOUT);
    log(&journal, "third", 0, 20);
    wait_for_records(sink.query_socket(), &ours(), 20 + 5 + 20, IO_TIMEOUT);
    let log_text = stop(agent);
    // One warning for the lost cursor, and nothing an operator would have to act on.
    assert_eq!(log_text.matches(NO_LONGER_HOLDS).count(), 1, "{log_text}");
    assert!(!log_text.contains(": error: "), "{log_text}");

    let records = all_records(&sink);
    let (before, after) = split_at_the_one_gap(&records);
    assert_eq!(messages_of(before, "first"), expected_messages("first", 20));
    assert_eq!(messages_of(after, "second"), expected_messages("second", 5));
    assert_eq!(messages_of(after, "third"), expected_messages("third", 20));
    assert_eq!(after.len(), journal.entries(None).len(), "what the journal holds, once");
}

fn messages_of_entries(journal: &JournalNamespace, batch: &str) -> Vec<String> {
    journal
        .entries(Some(IDENTIFIER))
        .iter()
        .filter(|e| e.get_str("QLOG_TEST_BATCH") == Some(batch))
        .map(|e| e.get_str(MESSAGE).unwrap().to_owned())
        .collect()
}

#[test]
fn a_backlog_behind_the_resume_cursor_is_forwarded_without_waiting_for_new_entries() {
    if !JournalNamespace::require_root() {
        return;
    }
    let sink = RunningSink::start(SinkOptions::default());
    let journal = JournalNamespace::start();
    forward_batch(&journal, &sink, "first", 3);
    // Logged while no agent runs, then nothing more: the journal is idle from here on,
    // which freezing journald makes certain.
    log(&journal, "backlog", 0, 50);
    journal.freeze_journald();

    let agent = spawn_agent(&journal, &sink);
    // `--follow` alone means `--lines=10`: without the agent's `--no-tail`, journalctl
    // would show only ten entries from the cursor until the journal next changed.
    wait_for_records(sink.query_socket(), &ours(), 3 + 50, IO_TIMEOUT);
    let log_text = stop(agent);
    assert!(!log_text.contains(NO_LONGER_HOLDS), "{log_text}");

    let records = all_records(&sink);
    assert!(records.iter().all(|r| r.kind == RecordKind::Event), "no gap for a valid cursor");
    assert_eq!(messages_of(&records, "first"), expected_messages("first", 3));
    assert_eq!(messages_of(&records, "backlog"), expected_messages("backlog", 50));
}

#[test]
fn a_cursor_journalctl_rejects_restarts_at_the_oldest_entry_with_a_gap() {
    if !JournalNamespace::require_root() {
        return;
    }
    let sink = RunningSink::start(SinkOptions::default());
    // An agent of another build left a cursor this journalctl cannot parse.
    let planter = AgentOptions::new(&sink, SOURCE_VM).args([
        "--source",
        "stdin",
        "--input-format",
        "export",
        "--stream",
        "journal",
    ]);
    let mut planter = RunningAgent::spawn(planter);
    planter.write_stdin(b"__CURSOR=not-a-journal-cursor\nMESSAGE=planted\n\n");
    planter.close_stdin();
    let status = planter.wait(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", planter.log_tail());

    let journal = JournalNamespace::start();
    log(&journal, "held", 0, 50);
    let agent = spawn_agent(&journal, &sink);
    agent.wait_for_log("the rejected cursor", IO_TIMEOUT, |log| {
        log.contains("journalctl rejected the cursor")
    });
    wait_for_records(sink.query_socket(), &cursor_lost_gaps(), 1, IO_TIMEOUT);
    // Entries are forwarded in journal order: once this one is stored, so is every entry
    // before it that the agent meant to send.
    log(&journal, "later", 0, 1);
    let later = Filter {
        matches: vec![("QLOG_TEST_BATCH".to_owned(), "later".to_owned())],
        ..Filter::default()
    };
    wait_for_records(sink.query_socket(), &later, 1, IO_TIMEOUT);
    stop(agent);

    let records = all_records(&sink);
    let (before, after) = split_at_the_one_gap(&records);
    assert_eq!(before.len(), 1, "the planted event");
    // After the rejection the agent starts at the oldest entry: everything, not the
    // last ten entries `--follow` alone would show.
    assert_eq!(messages_of(after, "held"), expected_messages("held", 50));
    assert_eq!(after.len(), journal.entries(None).len(), "the whole journal, once");
}
