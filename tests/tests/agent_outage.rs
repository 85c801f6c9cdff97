//! The log qube away for a long time, or refusing the call: the agent waits with flat
//! memory, says why at every attempt, keeps trying, and catches up exactly once.
//!
//! While qlogd is down the journal is the buffer: the agent holds at most its in-flight
//! window in memory and leaves the rest in journald, so its resident memory must stay
//! flat however much is logged. Refusals are the qrexec double's exit codes as the real
//! client gives them: 126 (policy, or a target dom0 does not know), 127 (no `qlog.Ingest`
//! service in the log VM) and 125 (the service exists but nobody listens).

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;

use qlog_rpc::fields::{CURSOR, MESSAGE, SYSLOG_IDENTIFIER};
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind};
use qlog_tests::agent::wait_for_records;
use qlog_tests::{
    query_events, AgentOptions, JournalNamespace, RunningAgent, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

const SOURCE_VM: &str = "sd-app";
const IDENTIFIER: &str = "qlog-outage";

/// Entries logged while qlogd is away: three times the agent's default window of 4,096
/// events, so a window that did not bound memory would show.
const DURING_OUTAGE: usize = 12_000;

/// How much the agent's resident memory may grow while qlogd is away, whatever the
/// backlog: the default window's byte budget (`--max-in-flight-bytes`, 8 MiB). Here its
/// event budget (4,096) binds first, at about 4 MiB of entries of about 1 KiB (journald
/// adds its trusted fields); an agent that buffered the whole outage would need 12 MiB.
const RSS_GROWTH_BOUND_KIB: u64 = 8 * 1024;

/// The refusal messages, as the agent words them.
const POLICY_REFUSED: &str = "refused by qrexec policy";
const NOT_INSTALLED: &str = "service qlog.Ingest is not installed in the log VM";
const NOT_LISTENING: &str = "qlogd is not listening in the log VM";

fn ours() -> Filter {
    Filter { identifiers: vec![IDENTIFIER.to_owned()], ..Filter::default() }
}

/// Logs entries `first..first + count`, each about 200 bytes of message.
fn log(journal: &JournalNamespace, first: usize, count: usize) {
    let padding = "p".repeat(180);
    for i in first..first + count {
        let message = format!("entry {i} {padding}");
        journal.send(&[
            (SYSLOG_IDENTIFIER, IDENTIFIER.as_bytes()),
            (MESSAGE, message.as_bytes()),
            ("QLOG_TEST_INDEX", i.to_string().as_bytes()),
        ]);
    }
}

/// Checks that qlogd holds entries `0..count` of ours exactly once, in order, and that
/// the whole stream is gapless and numbered 1, 2, 3, ...
fn assert_each_entry_once(records: &[Record], count: usize) {
    let mut cursors = BTreeSet::new();
    let mut indexes: Vec<usize> = Vec::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.kind, RecordKind::Event, "seq {}: {:?}", record.seq, record.event);
        assert_eq!(record.seq, i as u64 + 1, "sequence numbers are contiguous");
        assert_eq!(record.vm, SOURCE_VM);
        let cursor = record.event.get(CURSOR).expect("every entry has a cursor").to_vec();
        assert!(cursors.insert(cursor), "seq {} repeats an entry", record.seq);
        if record.event.get_str(SYSLOG_IDENTIFIER) == Some(IDENTIFIER) {
            indexes.push(record.event.get_str("QLOG_TEST_INDEX").unwrap().parse().unwrap());
        }
    }
    assert_eq!(indexes.len(), count, "entries stored, of {count} logged");
    assert!(indexes.iter().copied().eq(0..count), "every entry once, in journal order");
}

fn all_records(sink: &RunningSink) -> Vec<Record> {
    query_events(sink.query_socket(), &EventsQuery::default()).expect("qlogd answers a query")
}

/// Logs [`DURING_OUTAGE`] entries in chunks and returns the agent's largest RSS, sampled
/// after each chunk.
fn log_through_outage(journal: &JournalNamespace, agent: &RunningAgent, first: usize) -> u64 {
    let mut max_rss = agent.vm_rss_kib();
    let chunk_len = DURING_OUTAGE / 12;
    for chunk in 0..12 {
        log(journal, first + chunk * chunk_len, chunk_len);
        max_rss = max_rss.max(agent.vm_rss_kib());
    }
    journal.sync();
    max_rss.max(agent.vm_rss_kib())
}

#[test]
fn a_long_outage_keeps_memory_flat_and_then_catches_up_exactly_once() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let mut sink = RunningSink::start(SinkOptions::default());
    let options = AgentOptions::new(&sink, SOURCE_VM).journal(&journal).fast_backoff();
    let mut agent = RunningAgent::spawn(options);
    // journald's own start-up entries are stored once journalctl is following.
    wait_for_records(sink.query_socket(), &Filter::default(), 1, IO_TIMEOUT);
    log(&journal, 0, 200);
    wait_for_records(sink.query_socket(), &ours(), 200, IO_TIMEOUT);
    let rss_before = agent.vm_rss_kib();

    // qlogd crashes: its socket file stays, and nobody listens on it.
    sink.kill9();
    let max_rss = log_through_outage(&journal, &agent, 200);
    let calls = agent.qrexec_calls().len();
    agent.wait_for_calls(calls + 3, IO_TIMEOUT);
    let max_rss = max_rss.max(agent.vm_rss_kib());
    eprintln!("agent VmRSS: {rss_before} KiB connected, at most {max_rss} KiB in the outage");
    assert!(
        max_rss <= rss_before + RSS_GROWTH_BOUND_KIB,
        "the agent grew to {max_rss} KiB (from {rss_before} KiB) while qlogd was away"
    );
    agent.wait_for_log_lines(NOT_LISTENING, 3, IO_TIMEOUT);

    sink.restart();
    wait_for_records(sink.query_socket(), &ours(), 200 + DURING_OUTAGE, IO_TIMEOUT);
    let (status, _) = agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", agent.log_tail());
    assert_each_entry_once(&all_records(&sink), 200 + DURING_OUTAGE);
}

#[test]
fn an_agent_started_during_an_outage_forwards_the_whole_boot_once_qlogd_is_back() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    // qlogd has never run: its state is empty and nothing listens on its socket.
    let mut sink = RunningSink::start(SinkOptions::default());
    sink.kill9();
    // The log VM does not even have the service yet.
    let services = tempfile::Builder::new().prefix("qlog-services.").tempdir_in("/tmp").unwrap();
    let mut options = AgentOptions::new(&sink, SOURCE_VM).journal(&journal).fast_backoff();
    options.service_dir = services.path().to_owned();
    let mut agent = RunningAgent::spawn(options);
    agent.wait_for_log_lines(NOT_INSTALLED, 1, IO_TIMEOUT);
    let rss_before = agent.vm_rss_kib();

    log(&journal, 0, 2000);
    let not_installed = agent.wait_for_log_lines(NOT_INSTALLED, 3, IO_TIMEOUT);
    // Then the service is installed, but qlogd still does not listen.
    symlink(sink.ingest_socket(), services.path().join(qlog_rpc::INGEST_SERVICE)).unwrap();
    log(&journal, 2000, 2000);
    let not_listening = agent.wait_for_log_lines(NOT_LISTENING, 3, IO_TIMEOUT);
    for line in not_installed.iter().chain(&not_listening) {
        assert!(line.starts_with("qlog-agent: error: "), "{line}");
        assert!(line.contains("; reconnecting in "), "{line}");
    }
    journal.sync();
    let rss = agent.vm_rss_kib();
    eprintln!("agent VmRSS: {rss_before} KiB at start, {rss} KiB after 4000 entries unsent");
    assert!(rss <= rss_before + RSS_GROWTH_BOUND_KIB, "{rss} KiB, from {rss_before} KiB");

    sink.restart();
    agent.wait_for_log("the welcome", IO_TIMEOUT, |log| log.contains("connected to qlogd"));
    // Entries are forwarded in journal order: once this one is stored, so is every entry
    // before it that the agent meant to send.
    log(&journal, 4000, 1);
    let last = Filter {
        matches: vec![("QLOG_TEST_INDEX".to_owned(), "4000".to_owned())],
        ..Filter::default()
    };
    wait_for_records(sink.query_socket(), &last, 1, IO_TIMEOUT);
    let (status, _) = agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", agent.log_tail());

    let records = all_records(&sink);
    let forwarded =
        records.iter().filter(|r| r.event.get_str(SYSLOG_IDENTIFIER) == Some(IDENTIFIER)).count();
    // Whatever the VM logged before qlogd first answered is forwarded too.
    assert_eq!(forwarded, 4001, "entries of the outage forwarded, of 4001 logged");
    assert_each_entry_once(&records, 4001);
}

/// Runs an agent whose calls qrexec refuses (`env` says how) until it has tried a few
/// times, stops it, and checks it said why exactly once per attempt.
fn refused_calls_are_reported_and_retried(env: (&str, &str)) {
    let journal = JournalNamespace::start();
    let sink = RunningSink::start(SinkOptions::default());
    let options = AgentOptions::new(&sink, SOURCE_VM).journal(&journal).fast_backoff();
    let mut agent = RunningAgent::spawn(options.env(env.0, env.1));
    agent.wait_for_calls(5, IO_TIMEOUT);

    let (status, took) = agent.terminate(IO_TIMEOUT);
    // Nothing was read, so nothing is unacknowledged: the exit says nothing was lost.
    assert!(status.success(), "{status}\n{}", agent.log_tail());
    assert!(took < IO_TIMEOUT / 2, "SIGTERM during the backoff took {took:?}");

    // Every attempt but perhaps the one SIGTERM cut short left one line, an error that
    // names the policy, with the delay before the next attempt.
    let calls = agent.qrexec_calls();
    assert!(calls.iter().all(|c| c.starts_with("target=sd-log service=qlog.Ingest+")), "{calls:?}");
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains(POLICY_REFUSED)).collect();
    assert!(
        refused.len() == calls.len() || refused.len() + 1 == calls.len(),
        "{} calls, {} messages:\n{log}",
        calls.len(),
        refused.len()
    );
    for line in &refused {
        assert!(line.starts_with("qlog-agent: error: "), "{line}");
        assert!(line.contains("check dom0 policy for qlog.Ingest"), "{line}");
        let delay = line.rsplit_once("reconnecting in ").expect("the line says when").1;
        let delay: f64 = delay.trim_end_matches(" s").parse().expect("a delay in seconds");
        assert!(delay <= 0.5, "backoff above --backoff-max-ms: {line}");
    }
    // Nothing else is worth a warning or an error.
    let others: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("qlog-agent: error") || l.starts_with("qlog-agent: warning"))
        .filter(|l| !l.contains(POLICY_REFUSED))
        .collect();
    assert!(others.is_empty(), "{others:?}");
    assert!(query_vms_is_empty(&sink), "qlogd heard nothing from the refused agent");
}

fn query_vms_is_empty(sink: &RunningSink) -> bool {
    qlog_tests::query_vms(sink.query_socket()).expect("qlogd answers").vms.is_empty()
}

#[test]
fn a_policy_refusal_is_reported_at_every_attempt_and_retried() {
    if !JournalNamespace::require_root() {
        return;
    }
    refused_calls_are_reported_and_retried(("QREXEC_DOUBLE_POLICY", "deny"));
}

#[test]
fn a_log_vm_that_dom0_does_not_know_is_reported_at_every_attempt_and_retried() {
    if !JournalNamespace::require_root() {
        return;
    }
    // The policy knows only sys-other, so the call to sd-log is refused like a missing VM.
    refused_calls_are_reported_and_retried(("QREXEC_DOUBLE_TARGET", "sys-other"));
}
