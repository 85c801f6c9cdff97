//! qlogd's lifecycle as its peers see it: a clean stop on SIGTERM in the middle of
//! ingest, and the per-stream position (sequence numbers, resume point, cursor) that
//! carries a stream across connections and restarts.
//!
//! The stop is checked against the real agent, which must finish once qlogd is back;
//! the sequence and resume rules are checked with [`RawIngest`], which numbers events
//! however the test says, so jumps and replays can be sent on purpose.

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qlog_rpc::event::encode_event_payload;
use qlog_rpc::frame::encode_to_vec;
use qlog_rpc::message::{decode_u64, encode_json};
use qlog_rpc::query::{EventsQuery, Record, RecordKind, Request};
use qlog_rpc::{fields, Event, FrameType, Gap, ResumePoint};
use qlog_tests::ingest::descriptor;
use qlog_tests::{
    hello, query_events, AgentOptions, Follower, RawIngest, RunningAgent, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

/// PROTOCOL.md 5.9 and the daemon's shutdown design: connections get 1.5 s to finish
/// their closing steps, and the whole stop stays under two seconds.
const MAX_SHUTDOWN: Duration = Duration::from_secs(2);
/// A generous bound on a hang, for debug builds on a shared two-core machine.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

fn records_of(sink: &RunningSink, vm: &str) -> Vec<Record> {
    let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
    query_events(sink.query_socket(), &query).expect("qlogd answers an events query")
}

fn event(text: &str, cursor: Option<&str>) -> Event {
    let mut event = Event::new();
    if let Some(cursor) = cursor {
        event.push(fields::CURSOR, cursor);
    }
    event.push(fields::MESSAGE, text);
    event
}

/// Sends `End(last)`, half-closes and reads the sink's reply to the close: acks up to
/// `last`, then its own `End(last)`.
fn end_session(mut conn: RawIngest, last: u64) {
    conn.send_end(last).expect("qlogd reads the end");
    conn.half_close().expect("a connected socket can be half-closed");
    let frames = conn.expect_closed(IO_TIMEOUT);
    let (end, acks) = frames.split_last().expect("qlogd answers the end");
    assert_eq!(end.ty, FrameType::End, "{frames:?}");
    assert_eq!(decode_u64(end.ty, &end.payload).expect("an End is a u64"), last);
    for ack in acks {
        assert_eq!(ack.ty, FrameType::Ack, "{frames:?}");
        assert!(decode_u64(ack.ty, &ack.payload).expect("an Ack is a u64") <= last);
    }
}

fn feed(agent: &mut RunningAgent, lines: std::ops::RangeInclusive<u64>) {
    let mut stdin = BufWriter::new(agent.stdin());
    for n in lines {
        writeln!(stdin, "line {n}").expect("the agent reads its stdin");
    }
    stdin.flush().expect("the agent reads its stdin");
}

#[test]
fn sigterm_during_ingest_stops_cleanly_and_the_agent_finishes_after_restart() {
    const LINES: u64 = 20_000;
    const BEFORE_STOP: usize = 500;
    let mut sink = RunningSink::start(SinkOptions::default());
    let options = AgentOptions::new(&sink, "sd-app").args([
        "--source",
        "stdin",
        "--backoff-initial-ms",
        "50",
        "--backoff-max-ms",
        "200",
    ]);
    let mut agent = RunningAgent::spawn(options);
    let mut progress = Follower::start(sink.query_socket(), EventsQuery::default())
        .expect("qlogd accepts a follow query");
    progress.wait_done(IO_TIMEOUT);

    // The stop comes while the agent is mid-stream: its input is not even all written.
    let (status, took) = std::thread::scope(|scope| {
        let feeder = scope.spawn(|| feed(&mut agent, 1..=LINES / 2));
        progress.next_records(BEFORE_STOP, FINISH_TIMEOUT);
        let stopped = sink.terminate();
        sink.restart();
        feeder.join().expect("the feeder does not panic");
        stopped
    });
    eprintln!("qlogd stopped {took:?} after SIGTERM during ingest");
    assert!(status.success(), "qlogd exited with {status}{}", sink.log_tail());
    assert!(took < MAX_SHUTDOWN, "qlogd took {took:?} to stop{}", sink.log_tail());

    feed(&mut agent, LINES / 2 + 1..=LINES);
    agent.close_stdin();
    let status = agent.wait(FINISH_TIMEOUT);
    assert!(status.success(), "{status}{}", agent.log_tail());
    let records = records_of(&sink, "sd-app");
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=LINES).collect::<Vec<_>>(), "every line once, in order");
    for record in &records {
        let expected = format!("line {}", record.seq);
        assert_eq!(record.event.get_str(fields::MESSAGE), Some(expected.as_str()));
    }
}

#[test]
fn sigterm_stops_within_two_seconds_even_with_peers_that_never_read() {
    const FLOOD: u64 = 100_000;
    let mut sink = RunningSink::start(SinkOptions::default());

    // A follower that never reads: qlogd's writes to it block once its socket is full.
    let mut stalled_follower =
        UnixStream::connect(sink.query_socket()).expect("the query socket accepts");
    let query = Request::Events(EventsQuery { follow: true, ..EventsQuery::default() });
    stalled_follower.write_all(&encode_json(FrameType::Query, &query)).expect("qlogd reads");

    // An ingest peer that keeps sending and never reads an ack.
    let mut flood = descriptor("sd-flood", "");
    flood.extend(encode_json(FrameType::Hello, &hello("journal")));
    for seq in 1..=FLOOD {
        let mut payload = Vec::new();
        encode_event_payload(seq, &event(&format!("flood {seq}"), None), &mut payload);
        flood.extend(encode_to_vec(FrameType::Event, &payload));
    }
    let flooder = UnixStream::connect(sink.ingest_socket()).expect("the ingest socket accepts");
    let mut progress = Follower::start(sink.query_socket(), EventsQuery::default())
        .expect("qlogd accepts a follow query");
    progress.wait_done(IO_TIMEOUT);

    let (status, took) = std::thread::scope(|scope| {
        // The write fails once qlogd is gone, which is all it can do.
        scope.spawn(|| (&flooder).write_all(&flood));
        progress.next_records(1_000, FINISH_TIMEOUT);
        let stopped = sink.terminate();
        let _ = flooder.shutdown(std::net::Shutdown::Both);
        stopped
    });
    eprintln!("qlogd stopped {took:?} after SIGTERM with peers that never read");
    assert!(status.success(), "qlogd exited with {status}{}", sink.log_tail());
    assert!(took < MAX_SHUTDOWN, "qlogd took {took:?} to stop{}", sink.log_tail());

    // Whatever was committed before the stop is there after a restart, without a hole:
    // the flooder's stored events are a prefix of what it sent.
    sink.restart();
    let seqs: Vec<u64> = records_of(&sink, "sd-flood").iter().map(|r| r.seq).collect();
    assert!(seqs.len() >= 1_000, "only {} flood events survived", seqs.len());
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    drop(stalled_follower);
}

#[test]
fn sequence_jump_is_stored_as_a_seq_gap_record() {
    let sink = RunningSink::start(SinkOptions::default());
    let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-jump", "journal");
    for seq in [1, 2, 5] {
        conn.send_event(seq, &event(&format!("event {seq}"), None)).expect("qlogd reads");
    }
    end_session(conn, 5);

    // A jump across connections: the next connection starts above its resume point.
    let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-jump", "journal");
    assert_eq!(welcome.resume.last_seq, 5, "the jump's target is the resume point");
    conn.send_event(9, &event("event 9", None)).expect("qlogd reads");
    end_session(conn, 9);

    let records = records_of(&sink, "sd-jump");
    let shape: Vec<(u64, RecordKind)> = records.iter().map(|r| (r.seq, r.kind)).collect();
    assert_eq!(
        shape,
        [
            (1, RecordKind::Event),
            (2, RecordKind::Event),
            (3, RecordKind::Gap),
            (5, RecordKind::Event),
            (6, RecordKind::Gap),
            (9, RecordKind::Event),
        ]
    );
    for (gap, from, to, count) in [(&records[2], 2, 5, "2"), (&records[4], 5, 9, "3")] {
        assert_eq!((gap.vm.as_str(), gap.stream.as_str()), ("sd-jump", "journal"));
        assert_eq!(gap.event.get_str(fields::QLOG_GAP), Some("seq"), "{gap:?}");
        assert_eq!(gap.event.get_str(fields::QLOG_GAP_COUNT), Some(count), "{gap:?}");
        assert_eq!(gap.event.get_str(fields::PRIORITY), Some("4"), "{gap:?}");
        let message = format!(
            "{count} events of stream journal never arrived (sequence jumped from {from} to {to})"
        );
        assert_eq!(gap.event.get_str(fields::MESSAGE), Some(message.as_str()), "{gap:?}");
    }
}

#[test]
fn resume_point_survives_a_crash_and_replays_below_it_are_dropped() {
    let mut sink = RunningSink::start(SinkOptions::default());
    let cursor = |n: u64| format!("s=0123;i={n:x};b=boot;m={n:x};t={n:x};x=0");

    let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-resume", "journal");
    assert_eq!(welcome.resume, ResumePoint { last_seq: 0, cursor: None });
    for n in 1..=10 {
        let sent = event(&format!("first {n}"), Some(&cursor(n)));
        conn.send_event(n, &sent).expect("qlogd reads the event");
    }
    end_session(conn, 10);

    // Acknowledged means durable: a SIGKILL loses none of it.
    sink.kill9();
    sink.restart();
    let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-resume", "journal");
    assert_eq!(welcome.resume, ResumePoint { last_seq: 10, cursor: Some(cursor(10)) });
    // An agent replaying from 5 with different content: the sink compares numbers only.
    for n in 5..=15 {
        let sent = event(&format!("second {n}"), Some(&cursor(n)));
        conn.send_event(n, &sent).expect("qlogd reads the event");
    }
    end_session(conn, 15);

    let records = records_of(&sink, "sd-resume");
    let stored: Vec<(u64, &str)> = records
        .iter()
        .map(|r| (r.seq, r.event.get_str(fields::MESSAGE).expect("UTF-8 messages")))
        .collect();
    let expected: Vec<(u64, String)> = (1..=15)
        .map(|n| (n, if n <= 10 { format!("first {n}") } else { format!("second {n}") }))
        .collect();
    let expected: Vec<(u64, &str)> = expected.iter().map(|(n, m)| (*n, m.as_str())).collect();
    assert_eq!(stored, expected);
    assert!(records.iter().all(|r| r.kind == RecordKind::Event), "a replay is not a jump");

    let (conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-resume", "journal");
    assert_eq!(welcome.resume, ResumePoint { last_seq: 15, cursor: Some(cursor(15)) });
    end_session(conn, 15);
}

#[test]
fn resume_cursor_is_kept_across_a_gap_and_cleared_by_an_event_without_one() {
    let sink = RunningSink::start(SinkOptions::default());
    let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-cursor", "journal");
    conn.send_event(1, &event("with a cursor", Some("cursor-1"))).expect("qlogd reads");
    let gap = Gap {
        seq: 2,
        reason: "cursor-lost".to_owned(),
        missed: Some(7),
        detail: "the journal was vacuumed".to_owned(),
    };
    conn.send_gap(&gap).expect("qlogd reads the gap");
    end_session(conn, 2);

    let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-cursor", "journal");
    let kept = ResumePoint { last_seq: 2, cursor: Some("cursor-1".to_owned()) };
    assert_eq!(welcome.resume, kept, "a gap keeps the cursor of the event before it");
    conn.send_event(3, &event("without a cursor", None)).expect("qlogd reads");
    end_session(conn, 3);

    let (conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-cursor", "journal");
    assert_eq!(welcome.resume, ResumePoint { last_seq: 3, cursor: None });
    end_session(conn, 3);

    let records = records_of(&sink, "sd-cursor");
    let gap = &records[1];
    assert_eq!((gap.seq, gap.kind), (2, RecordKind::Gap));
    assert_eq!(gap.event.get_str(fields::QLOG_GAP), Some("agent"));
    assert_eq!(gap.event.get_str(fields::QLOG_GAP_COUNT), Some("7"));
    assert_eq!(gap.event.get_str("GAP_REASON"), Some("cursor-lost"));
    assert_eq!(
        gap.event.get_str(fields::MESSAGE),
        Some("the agent reported missing events (cursor-lost): the journal was vacuumed")
    );
}
