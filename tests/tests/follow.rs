//! Following qlogd's store live: records of every VM merged in key order, history and
//! live part joined without a gap or a duplicate, and followers that cannot keep up
//! (or never read) that never slow ingest down.
//!
//! Ingest here is [`ingest_events`] sessions, which return only once qlogd has made
//! everything durable; what a follower must have received is then known exactly.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qlog_rpc::message::encode_json;
use qlog_rpc::query::{EventsQuery, Record, RecordKind, Request};
use qlog_rpc::{fields, Event, FrameType};
use qlog_tests::query::FollowItem;
use qlog_tests::{ingest_events, query_events, Follower, RunningSink, SinkOptions, IO_TIMEOUT};

/// A generous bound on a hang, for debug builds on a shared two-core machine.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(120);

fn numbered(vm: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
    seqs.map(|seq| {
        let mut event = Event::new();
        event.push(fields::MESSAGE, format!("{vm} event {seq}"));
        event
    })
    .collect()
}

/// Sends `vm`'s events `first..=last` in sessions of `per_session`.
fn send_in_sessions(sink: &RunningSink, vm: &str, first: u64, last: u64, per_session: u64) {
    let mut next = first;
    while next <= last {
        let end = (next + per_session - 1).min(last);
        let stored = ingest_events(sink, vm, "journal", &numbered(vm, next..=end))
            .expect("qlogd stores the events");
        assert_eq!(stored, end);
        next = end + 1;
    }
}

fn key(record: &Record) -> (u64, &str, u64) {
    (record.received_usec, record.vm.as_str(), record.seq)
}

#[test]
fn follower_merges_vms_in_key_order_including_one_that_connects_later() {
    let sink = RunningSink::start(SinkOptions::default());
    send_in_sessions(&sink, "sd-app", 1, 100, 100);
    let mut follower = Follower::start(sink.query_socket(), EventsQuery::default())
        .expect("qlogd accepts a follow query");
    let history = follower.wait_done(IO_TIMEOUT);
    assert_eq!(history.len(), 100);

    // sd-proxy is unknown when the follow starts; both send at once, so their records
    // share commits.
    std::thread::scope(|scope| {
        scope.spawn(|| send_in_sessions(&sink, "sd-app", 101, 2_100, 500));
        scope.spawn(|| send_in_sessions(&sink, "sd-proxy", 1, 2_000, 500));
    });
    let live = follower.next_records(4_000, FOLLOW_TIMEOUT);
    // A few dozen commits at most, far below the 256 a follower may fall behind.
    assert!(follower.lagged().is_empty(), "{:?}", follower.lagged());

    for pair in live.windows(2) {
        assert!(key(&pair[0]) < key(&pair[1]), "out of order: {:?} then {:?}", pair[0], pair[1]);
    }
    let mut per_vm: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for record in &live {
        per_vm.entry(record.vm.as_str()).or_default().push(record.seq);
    }
    assert_eq!(per_vm["sd-app"], (101..=2_100).collect::<Vec<_>>());
    assert_eq!(per_vm["sd-proxy"], (1..=2_000).collect::<Vec<_>>());
    assert_eq!(per_vm.len(), 2);

    // History and live part together are exactly what a later query returns, in its
    // order.
    let stored = query_events(sink.query_socket(), &EventsQuery::default()).expect("answers");
    let followed: Vec<Record> = history.into_iter().chain(live).collect();
    assert_eq!(followed, stored);
}

#[test]
fn thirty_two_followers_and_one_that_never_reads_do_not_slow_ingest() {
    const PER_VM: u64 = 50_000;
    const VMS: [&str; 2] = ["sd-app", "sd-proxy"];
    /// Sent last, alone: its commit is the last, which every follower receives.
    const SENTINEL_VM: &str = "sd-last";
    let sink = RunningSink::start(SinkOptions::default());

    let mut followers: Vec<Follower> = (0..31)
        .map(|_| {
            Follower::start(sink.query_socket(), EventsQuery::default())
                .expect("qlogd accepts a follow query")
        })
        .collect();
    for follower in &mut followers {
        assert!(follower.wait_done(IO_TIMEOUT).is_empty());
    }
    // The 32nd sends its query and never reads a byte of the answer.
    let mut stalled = UnixStream::connect(sink.query_socket()).expect("the socket accepts");
    let query = Request::Events(EventsQuery { follow: true, ..EventsQuery::default() });
    stalled.write_all(&encode_json(FrameType::Query, &query)).expect("qlogd reads the query");

    // Each session fails after IO_TIMEOUT without an ack, so ingest held up by the
    // followers would fail here.
    std::thread::scope(|scope| {
        for vm in VMS {
            let sink = &sink;
            scope.spawn(move || send_in_sessions(sink, vm, 1, PER_VM, PER_VM));
        }
    });
    send_in_sessions(&sink, SENTINEL_VM, 1, 1, 1);
    let total = PER_VM * VMS.len() as u64 + 1;

    let mut lagged_followers = 0;
    for (i, follower) in followers.iter_mut().enumerate() {
        let seen = follow_to_the_sentinel(follower, SENTINEL_VM);
        let what = format!("follower {i}: {seen:?}");
        if seen.lagged.is_empty() {
            assert_eq!(seen.received, total, "{what}");
        } else {
            lagged_followers += 1;
            // Lagged.missed counts what was skipped, unless the follower lagged before
            // its first commit, when it is 0 (PROTOCOL.md 6.4).
            let missed: u64 = seen.lagged.iter().sum();
            if seen.lagged_before_any_record {
                assert!(seen.received + missed <= total, "{what}");
            } else {
                assert_eq!(seen.received + missed, total, "{what}");
            }
        }
    }
    eprintln!("{lagged_followers} of 31 reading followers were told they lagged");
    let stored = query_events(sink.query_socket(), &EventsQuery::default()).expect("answers");
    assert_eq!(stored.len() as u64, total);
    drop(stalled);
}

/// What one follower received until the sentinel's record.
#[derive(Debug)]
struct Followed {
    received: u64,
    lagged: Vec<u64>,
    lagged_before_any_record: bool,
}

/// Reads `follower` until a record of `sentinel_vm` arrives, checking on the way that
/// each VM's records come in sequence order, each at most once.
fn follow_to_the_sentinel(follower: &mut Follower, sentinel_vm: &str) -> Followed {
    let deadline = Instant::now() + FOLLOW_TIMEOUT;
    let mut seen = Followed { received: 0, lagged: Vec::new(), lagged_before_any_record: false };
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match follower.recv(left) {
            Some(FollowItem::Record(record)) => {
                seen.received += 1;
                assert_eq!(record.kind, RecordKind::Event, "{record:?}");
                let last = last_seq.entry(record.vm.clone()).or_default();
                assert!(record.seq > *last, "{} seq {} after {last}", record.vm, record.seq);
                *last = record.seq;
                if record.vm == sentinel_vm {
                    return seen;
                }
            }
            Some(FollowItem::Lagged(lagged)) => {
                seen.lagged_before_any_record |= seen.received == 0;
                seen.lagged.push(lagged.missed);
            }
            Some(other) => panic!("the follow ended: {other:?} after {seen:?}"),
            None => panic!("no sentinel within {FOLLOW_TIMEOUT:?}: {seen:?}"),
        }
    }
}

#[test]
fn follower_started_during_ingest_gets_history_then_live_without_gap_or_duplicate() {
    const SESSION: u64 = 1_000;
    const SESSIONS: u64 = 20;
    const TOTAL: u64 = SESSION * SESSIONS;
    let sink = RunningSink::start(SinkOptions::default());
    send_in_sessions(&sink, "sd-app", 1, SESSION, SESSION);

    // The first follower starts between two sessions, so both of its parts hold
    // records; the others start wherever the concurrent ingest happens to be.
    let start = || {
        let mut follower = Follower::start(sink.query_socket(), EventsQuery::default())
            .expect("qlogd accepts a follow query");
        let history = follower.wait_done(IO_TIMEOUT);
        let matched = follower.done().expect("Done has arrived").matched;
        assert_eq!(matched, history.len() as u64, "Done counts the history part");
        (follower, history)
    };
    let mut followers = vec![start()];
    std::thread::scope(|scope| {
        let ingest = scope.spawn(|| send_in_sessions(&sink, "sd-app", SESSION + 1, TOTAL, SESSION));
        while !ingest.is_finished() && followers.len() < 8 {
            followers.push(start());
        }
    });
    assert_eq!(followers[0].1.len() as u64, SESSION);

    for (i, (follower, history)) in followers.iter_mut().enumerate() {
        let mut seqs: Vec<u64> = history.iter().map(|r| r.seq).collect();
        let live = TOTAL - seqs.len() as u64;
        seqs.extend(follower.next_records(live as usize, FOLLOW_TIMEOUT).iter().map(|r| r.seq));
        assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>(), "follower {i}");
        assert!(follower.lagged().is_empty(), "follower {i}: {:?}", follower.lagged());
        assert!(
            follower.try_next_record(Duration::ZERO).is_none(),
            "follower {i} got a record twice"
        );
    }
}
