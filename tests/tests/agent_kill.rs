//! `kill -9` anywhere on the path, mid-stream and again and again, loses no journal entry
//! and stores none twice.
//!
//! Each test kills one process of the path a few times while entries stream: the agent
//! (a new one resumes from qlogd's cursor), qlogd (restarted over its state; the agent
//! replays what was not acknowledged), the qrexec client between them (the agent
//! reconnects) and the agent's journalctl (the agent restarts it from the last entry it
//! read). Kills are triggered by progress seen in qlogd's store, never by the clock. At the
//! end the agent stops cleanly, and every entry must be stored exactly once, in journal
//! order, with contiguous sequence numbers and no gap record. A last test has qlogd die
//! at the one moment the loop above cannot aim at: after accepting a call, before its
//! welcome.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixListener;

use qlog_rpc::fields::{CURSOR, MESSAGE, SYSLOG_IDENTIFIER};
use qlog_rpc::query::{EventsQuery, Filter, RecordKind};
use qlog_tests::agent::{kill9_pid, wait_for_records, DEFAULT_LOG_VM};
use qlog_tests::{
    query_events, AgentOptions, JournalNamespace, RunningAgent, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

const SOURCE_VM: &str = "sd-app";
const IDENTIFIER: &str = "qlog-kill";

/// How often each process is killed.
const CYCLES: usize = 3;
/// Entries logged before each kill; the kill comes once some of them are stored.
const BATCH: usize = 600;
/// Entries logged while the killed process is down, where it stays down a while.
const WHILE_DOWN: usize = 200;

/// The debug line the agent logs each time it starts journalctl.
const JOURNALCTL_STARTED: &str = "\"--output=export\"";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Agent,
    Sink,
    QrexecClient,
    Journalctl,
}

/// One journal, one qlogd and one agent, and how many entries have been logged.
struct Path {
    journal: JournalNamespace,
    sink: RunningSink,
    agent: RunningAgent,
    logged: usize,
}

impl Path {
    fn start() -> Path {
        let journal = JournalNamespace::start();
        let sink = RunningSink::start(SinkOptions::default());
        let agent = spawn_agent(&journal, &sink);
        // journald's own start-up entries are stored once journalctl is following.
        wait_for_records(sink.query_socket(), &Filter::default(), 1, IO_TIMEOUT);
        Path { journal, sink, agent, logged: 0 }
    }

    /// Logs `count` more entries, numbered on from the last.
    fn log(&mut self, count: usize) {
        for i in self.logged..self.logged + count {
            let message = format!("entry {i}");
            self.journal.send(&[
                (SYSLOG_IDENTIFIER, IDENTIFIER.as_bytes()),
                (MESSAGE, message.as_bytes()),
                ("QLOG_TEST_INDEX", i.to_string().as_bytes()),
            ]);
        }
        self.logged += count;
    }

    /// Waits until qlogd holds at least `count` of our entries; returns how many it holds.
    fn stored(&self, count: usize) -> usize {
        wait_for_records(self.sink.query_socket(), &ours(), count, IO_TIMEOUT).len()
    }

    /// How many of our entries qlogd holds now.
    fn count(&self) -> usize {
        let query = EventsQuery { filter: ours(), ..EventsQuery::default() };
        query_events(self.sink.query_socket(), &query).expect("qlogd answers a query").len()
    }

    fn journalctl_starts(&self) -> usize {
        self.agent.wait_for_log_lines(JOURNALCTL_STARTED, 1, IO_TIMEOUT).len()
    }

    /// Kills `victim` and waits until the path is whole again.
    fn kill(&mut self, victim: Victim) {
        match victim {
            Victim::Agent => {
                self.agent.kill9();
                self.log(WHILE_DOWN);
                self.agent = spawn_agent(&self.journal, &self.sink);
                // Waiting for the new journalctl keeps each cycle's kill after a restart;
                // the backlog itself is covered by agent_cursor.rs.
                let started = self.agent.wait_for_log_lines(JOURNALCTL_STARTED, 1, IO_TIMEOUT);
                // The new agent knows nothing; it starts where qlogd's cursor says.
                assert!(started[0].contains("\"--cursor="), "{}", started[0]);
            }
            Victim::Sink => {
                self.sink.kill9();
                self.log(WHILE_DOWN);
                // The agent keeps calling while nobody listens; two refused calls prove it.
                let calls = self.agent.qrexec_calls().len();
                self.agent.wait_for_calls(calls + 2, IO_TIMEOUT);
                self.sink.restart();
            }
            Victim::QrexecClient => {
                let calls = self.agent.qrexec_calls().len();
                let pid = self.agent.qrexec_client_pid().expect("the agent's qrexec client runs");
                kill9_pid(pid);
                self.agent.wait_for_calls(calls + 1, IO_TIMEOUT);
            }
            Victim::Journalctl => {
                let starts = self.journalctl_starts();
                let pid = self.agent.journalctl_pid().expect("the agent's journalctl runs");
                kill9_pid(pid);
                // As for the agent: each cycle kills a journalctl that has started.
                self.agent.wait_for_log_lines(JOURNALCTL_STARTED, starts + 1, IO_TIMEOUT);
            }
        }
    }
}

fn ours() -> Filter {
    Filter { identifiers: vec![IDENTIFIER.to_owned()], ..Filter::default() }
}

fn spawn_agent(journal: &JournalNamespace, sink: &RunningSink) -> RunningAgent {
    let options = AgentOptions::new(sink, SOURCE_VM).journal(journal).fast_backoff();
    RunningAgent::spawn(options.args(["--log-level", "debug"]))
}

/// Kills `victim` [`CYCLES`] times while entries stream, then checks every entry is
/// stored exactly once.
fn survives_repeated_kills(victim: Victim) {
    if !JournalNamespace::require_root() {
        return;
    }
    let mut path = Path::start();
    for cycle in 0..CYCLES {
        // What was stored before the path is whole again does not count as progress: a
        // killed qlogd, say, may have committed more than its followers were shown.
        let before = path.count();
        path.log(BATCH);
        // Once more is stored, the whole path works again, and is likely busy with the
        // rest of the batch (if it was quicker than this test, the kill is no less valid,
        // only less interesting).
        let stored = path.stored(before + 1);
        eprintln!("cycle {cycle}: killing {victim:?} with {stored} of {} stored", path.logged);
        path.kill(victim);
    }
    path.log(BATCH);
    path.stored(path.logged);

    let (status, _) = path.agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", path.agent.log_tail());
    let records = query_events(path.sink.query_socket(), &EventsQuery::default())
        .expect("qlogd answers a query");

    // No gap record, and sequence numbers 1, 2, 3, ...: nothing was skipped and nothing
    // was numbered twice. Each entry once, by cursor and by its own index.
    let mut cursors = BTreeMap::new();
    let mut indexes: Vec<usize> = Vec::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.kind, RecordKind::Event, "seq {}: {:?}", record.seq, record.event);
        assert_eq!(record.seq, i as u64 + 1, "sequence numbers are contiguous");
        assert_eq!(record.vm, SOURCE_VM);
        let cursor = record.event.get(CURSOR).expect("every entry has a cursor");
        if let Some(first) = cursors.insert(cursor.to_vec(), record.seq) {
            panic!("one entry stored as seq {first} and seq {}", record.seq);
        }
        if record.event.get_str(SYSLOG_IDENTIFIER) == Some(IDENTIFIER) {
            indexes.push(record.event.get_str("QLOG_TEST_INDEX").unwrap().parse().unwrap());
        }
    }
    let expected: Vec<usize> = (0..path.logged).collect();
    assert_eq!(indexes, expected, "every entry once, in journal order");
}

#[test]
fn killing_the_agent_mid_stream_loses_and_duplicates_nothing() {
    survives_repeated_kills(Victim::Agent);
}

#[test]
fn killing_qlogd_mid_stream_loses_and_duplicates_nothing() {
    survives_repeated_kills(Victim::Sink);
}

#[test]
fn killing_the_qrexec_client_mid_stream_loses_and_duplicates_nothing() {
    survives_repeated_kills(Victim::QrexecClient);
}

#[test]
fn killing_journalctl_mid_stream_loses_and_duplicates_nothing() {
    survives_repeated_kills(Victim::Journalctl);
}

#[test]
fn qlogd_dying_between_accept_and_welcome_makes_the_agent_call_again() {
    // A stand-in for qlogd that accepts one call, reads its descriptor and the start of
    // the hello, and dies without a word, as a qlogd killed at that moment would.
    let dir = tempfile::Builder::new().prefix("qlog-kill.").tempdir_in("/tmp").unwrap();
    let socket = dir.path().join("ingest.sock");
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    std::os::unix::fs::symlink(&socket, services.join(qlog_rpc::INGEST_SERVICE)).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    let doomed = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the agent calls");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        // The descriptor, its NUL, and the hello's 5-byte frame header.
        let hello_started =
            |r: &[u8]| r.iter().position(|&b| b == 0).is_some_and(|nul| r.len() >= nul + 6);
        while !hello_started(&received) {
            let n = stream.read(&mut buf).expect("the hello arrives");
            assert!(n > 0, "the call ended before its hello: {received:?}");
            received.extend_from_slice(&buf[..n]);
        }
        // Dropping the listener too: the next call finds nobody listening.
    });

    let options = AgentOptions {
        source_vm: SOURCE_VM.to_owned(),
        service_dir: services,
        log_vm: DEFAULT_LOG_VM.to_owned(),
        args: Vec::new(),
        env: Vec::new(),
    };
    let agent = RunningAgent::spawn(options.args(["--source", "stdin"]).fast_backoff());
    doomed.join().expect("the stand-in saw the hello");

    // The real qrexec-client-vm exits 0 when the service closes (shared/QREXEC.md, A1),
    // even while the caller is silent, and the agent then calls again.
    agent.wait_for_calls(2, IO_TIMEOUT);
}
