//! qlogd against abusive connections, all on one qlogd while a well-behaved VM streams
//! beside them through the real agent and the qrexec double: slowloris peers trickling
//! their descriptor, their Hello or a frame at one byte a second; 1,000 connections
//! opened as fast as possible; half-open connections; a peer that never reads its acks.
//!
//! What must hold under each: the well-behaved VM's events keep arriving while the abuse
//! goes on (each is seen by a follower before the next is sent, and the abuse is still
//! running when the round trips start); none is lost or duplicated; every abusive
//! connection is closed within its timeout and qlogd gives its sockets back; qlogd's
//! peak RSS (VmHWM, reset before each case through /proc/PID/clear_refs) stays under
//! [`MAX_PEAK_RSS_KIB`]. The figures are printed (`cargo test ... -- --nocapture`).
//!
//! The timeouts are shortened with qlogd's `--handshake-timeout` and the hidden
//! `--idle-timeout-seconds`, so the whole file takes about half a minute. The deep
//! version of the peer that never reads (200,000 events) is in `hostile_inputs.rs`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qlog_rpc::fields::MESSAGE;
use qlog_rpc::message::{decode_json, encode_u64};
use qlog_rpc::query::{EventsQuery, Filter};
use qlog_rpc::{ErrorCode, ErrorFrame, Event, Frame, FrameType};
use qlog_tests::agent::wait_for_records;
use qlog_tests::ingest::{descriptor, event_frame, hello_frame};
use qlog_tests::process::poll_readable;
use qlog_tests::{
    hello, ingest_events, query_events, query_vms, AgentOptions, Follower, RawIngest, RunningAgent,
    RunningSink, SinkOptions, IO_TIMEOUT,
};

/// The well-behaved VM.
const BYSTANDER: &str = "sd-app";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Five heartbeats of the bystander's agent, so a busy CI machine cannot make it look
/// idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous for a debug qlogd (it idles near 20 MiB here), far below what holding a
/// buffer per abusive connection, or the never-reading peer's acks, would take.
const MAX_PEAK_RSS_KIB: u64 = 128 * 1024;

fn message(text: &str) -> Event {
    let mut event = Event::new();
    event.push(MESSAGE, text);
    event
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    let last = frames.last().filter(|f| f.ty == FrameType::Error)?;
    let error: ErrorFrame = decode_json(last.ty, &last.payload).expect("an Error frame is JSON");
    Some(error.code)
}

/// The VM sending alongside the abuse: the real agent reading lines on stdin, through the
/// qrexec double, and a follower of its events on the query socket.
struct Bystander {
    agent: RunningAgent,
    follower: Follower,
    /// Events sent so far, which is also the last sequence number.
    sent: u64,
}

impl Bystander {
    fn start(sink: &RunningSink) -> Bystander {
        // A heartbeat every second keeps it inside the shortened idle timeout.
        let options = AgentOptions::new(sink, BYSTANDER)
            .args(["--source", "stdin", "--heartbeat-interval", "1"])
            .fast_backoff();
        let mut agent = RunningAgent::spawn(options);
        agent.write_stdin(b"bystander 1\n");
        let first = Filter {
            matches: vec![(MESSAGE.to_owned(), "bystander 1".to_owned())],
            ..Filter::default()
        };
        wait_for_records(sink.query_socket(), &first, 1, IO_TIMEOUT);
        let query = EventsQuery { vms: vec![BYSTANDER.to_owned()], ..EventsQuery::default() };
        let mut follower = Follower::start(sink.query_socket(), query).expect("qlogd follows");
        assert_eq!(follower.wait_done(IO_TIMEOUT).len(), 1);
        Bystander { agent, follower, sent: 1 }
    }

    /// Sends one event and waits until the follower receives it.
    fn round_trip(&mut self) {
        self.sent += 1;
        let text = format!("bystander {}", self.sent);
        self.agent.write_stdin(format!("{text}\n").as_bytes());
        let record = self.follower.next_record(IO_TIMEOUT);
        assert_eq!((record.seq, record.event.get_str(MESSAGE)), (self.sent, Some(text.as_str())));
    }
}

/// Runs `abuse` on its own thread while the bystander makes round trips, and returns
/// what it returned and how many round trips completed while it ran.
fn during<T: Send>(bystander: &mut Bystander, abuse: impl FnOnce() -> T + Send) -> (T, u64) {
    std::thread::scope(|scope| {
        let abuse = scope.spawn(abuse);
        let mut trips = 0;
        while !abuse.is_finished() {
            bystander.round_trip();
            trips += 1;
        }
        (abuse.join().expect("the abuse does not panic"), trips)
    })
}

/// Sets qlogd's VmHWM back to its current RSS, so the next reading is this case's peak.
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs is writable");
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("qlogd runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// How many sockets qlogd holds: its listeners, followers and connections. (Its other
/// descriptors grow with the store: a new VM's segment file stays open.)
fn open_sockets(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    dir.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Waits until qlogd holds at most `baseline` sockets: every connection of the case has
/// been given back. Polls /proc, which has no change notification.
fn wait_for_sockets(pid: u32, baseline: usize) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while open_sockets(pid) > baseline {
        assert!(
            Instant::now() < deadline,
            "qlogd still holds {} sockets, {baseline} before the case",
            open_sockets(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One case's figures, for the summary.
struct CaseReport {
    name: &'static str,
    peak_rss_kib: u64,
    round_trips: u64,
    detail: String,
}

/// Runs one case: resets the peak, runs `abuse` beside the bystander, checks memory and
/// that every descriptor came back, and reports.
fn case(
    sink: &RunningSink,
    bystander: &mut Bystander,
    name: &'static str,
    abuse: impl FnOnce() -> String + Send,
) -> CaseReport {
    let pid = sink.pid();
    let sockets = open_sockets(pid);
    reset_peak_rss(pid);
    let (detail, round_trips) = during(bystander, abuse);
    let peak_rss_kib = status_kib(pid, "VmHWM:");
    wait_for_sockets(pid, sockets);
    eprintln!(
        "{name}: qlogd peak RSS {:.1} MiB; {round_trips} bystander round trips during it; {detail}",
        peak_rss_kib as f64 / 1024.0
    );
    assert!(peak_rss_kib < MAX_PEAK_RSS_KIB, "{name}: qlogd peaked at {peak_rss_kib} KiB");
    assert!(round_trips > 0, "{name}: the bystander made no round trip during the abuse");
    CaseReport { name, peak_rss_kib, round_trips, detail }
}

/// How a trickling peer was cut.
#[derive(Debug)]
struct Cut {
    /// From before the connection was made to qlogd's close.
    after: Duration,
    bytes_sent: usize,
    code: Option<ErrorCode>,
}

/// Writes `bytes` one a second on `conn` until qlogd answers or closes, then reads to
/// the close.
fn trickle(mut conn: RawIngest, started: Instant, bytes: &[u8]) -> Cut {
    let mut bytes_sent = 0;
    for &byte in bytes {
        if conn.send_bytes(&[byte]).is_err() {
            break;
        }
        bytes_sent += 1;
        // The pace of the trickle; the wait ends early once qlogd has something to say.
        let fd = conn.stream().as_raw_fd();
        if poll_readable(&[fd], Duration::from_secs(1)).expect("poll")[0] {
            break;
        }
    }
    assert!(bytes_sent < bytes.len(), "the whole trickle was sent before qlogd cut it");
    let frames = conn.expect_closed(IO_TIMEOUT);
    Cut { after: started.elapsed(), bytes_sent, code: error_code(&frames) }
}

fn slowloris(sink: &RunningSink) -> String {
    const PER_KIND: usize = 10;
    let socket = sink.ingest_socket();
    let cuts: Vec<(&str, Cut)> = std::thread::scope(|scope| {
        let mut peers = Vec::new();
        for i in 0..PER_KIND {
            peers.push((
                "descriptor",
                scope.spawn(move || {
                    let started = Instant::now();
                    let conn = RawIngest::connect(socket).expect("the socket accepts");
                    trickle(conn, started, &descriptor(&format!("sd-slow-d{i}"), ""))
                }),
            ));
            peers.push((
                "hello",
                scope.spawn(move || {
                    let started = Instant::now();
                    let mut conn = RawIngest::connect(socket).expect("the socket accepts");
                    conn.send_descriptor(&format!("sd-slow-h{i}"), "").expect("qlogd reads");
                    trickle(conn, started, &hello_frame("journal"))
                }),
            ));
            peers.push((
                "frame",
                scope.spawn(move || {
                    let started = Instant::now();
                    let (conn, _) = RawIngest::handshake(socket, "sd-slow-f", "journal");
                    trickle(conn, started, &event_frame(1, &message("one byte a second")))
                }),
            ));
        }
        // Someone else connecting while they hang on gets served at once.
        let newcomer: Vec<Event> = (1..=100).map(|i| message(&format!("newcomer {i}"))).collect();
        assert_eq!(ingest_events(sink, "sd-newcomer", "journal", &newcomer).expect("served"), 100);
        peers.into_iter().map(|(kind, peer)| (kind, peer.join().expect("a peer"))).collect()
    });

    let mut longest = BTreeMap::new();
    for (kind, cut) in &cuts {
        let (timeout, code) = match *kind {
            "frame" => (IDLE_TIMEOUT, ErrorCode::IdleTimeout),
            _ => (HANDSHAKE_TIMEOUT, ErrorCode::BadHello),
        };
        assert_eq!(cut.code, Some(code), "{kind} trickle: {cut:?}");
        assert!(cut.after >= timeout, "{kind} trickle cut before its timeout: {cut:?}");
        let entry = longest.entry(*kind).or_insert((Duration::ZERO, 0));
        entry.0 = entry.0.max(cut.after);
        entry.1 = entry.1.max(cut.bytes_sent);
    }
    let summary: Vec<String> = longest
        .iter()
        .map(|(kind, (after, bytes))| {
            format!("{PER_KIND} {kind} trickles cut within {after:.1?} after at most {bytes} bytes")
        })
        .collect();
    summary.join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BurstKind {
    Garbage,
    DescriptorOnly,
    Nothing,
}

fn burst(sink: &RunningSink) -> String {
    const CONNECTIONS: usize = 1000;
    const OPENERS: usize = 4;
    let socket = sink.ingest_socket();
    let started = Instant::now();
    let opened: Vec<(BurstKind, Option<RawIngest>)> = std::thread::scope(|scope| {
        let openers: Vec<_> = (0..OPENERS)
            .map(|opener| {
                scope.spawn(move || {
                    let mut garbage_state = 0x9e37_79b9_u32 ^ opener as u32;
                    (opener..CONNECTIONS)
                        .step_by(OPENERS)
                        .map(|i| {
                            let kind =
                                [BurstKind::Garbage, BurstKind::DescriptorOnly, BurstKind::Nothing]
                                    [i % 3];
                            let Ok(mut conn) = RawIngest::connect(socket) else {
                                return (kind, None);
                            };
                            // qlogd may have closed it already (over a limit): a failed
                            // write is part of the outcome, not an error of the test.
                            let _ = match kind {
                                BurstKind::Garbage => conn.send_bytes(&garbage(&mut garbage_state)),
                                BurstKind::DescriptorOnly => {
                                    conn.send_descriptor(&format!("sd-burst-{}", i % 7), "")
                                }
                                BurstKind::Nothing => Ok(()),
                            };
                            (kind, Some(conn))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        openers.into_iter().flat_map(|o| o.join().expect("an opener")).collect()
    });
    let opened_in = started.elapsed();

    // Every one is held open until qlogd closes it.
    let mut outcomes: BTreeMap<(BurstKind, String), usize> = BTreeMap::new();
    for (kind, conn) in opened {
        let outcome = match conn {
            None => "connect failed".to_owned(),
            Some(mut conn) => match error_code(&conn.expect_closed(IO_TIMEOUT)) {
                None => "closed unread".to_owned(),
                Some(code) => {
                    let allowed: &[ErrorCode] = match kind {
                        BurstKind::Garbage => &[ErrorCode::BadDescriptor, ErrorCode::BadHello],
                        _ => &[ErrorCode::BadHello],
                    };
                    assert!(allowed.contains(&code), "{kind:?} answered with {code:?}");
                    format!("{code:?}")
                }
            },
        };
        *outcomes.entry((kind, outcome)).or_default() += 1;
    }
    let closed_in = started.elapsed();
    let failed: usize =
        outcomes.iter().filter(|((_, o), _)| o == "connect failed").map(|(_, n)| n).sum();
    assert_eq!(failed, 0, "every connect reaches qlogd's backlog: {outcomes:?}");
    let counts: Vec<String> =
        outcomes.iter().map(|((kind, outcome), n)| format!("{kind:?} {outcome}: {n}")).collect();
    format!(
        "{CONNECTIONS} connections opened in {opened_in:.2?}, all closed by qlogd within \
         {closed_in:.2?} ({})",
        counts.join(", ")
    )
}

/// 64 bytes of noise ending in a NUL, so qlogd can tell at once it is no descriptor.
fn garbage(state: &mut u32) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..63)
        .map(|_| {
            *state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (*state >> 24) as u8
        })
        .collect();
    bytes.push(0);
    bytes
}

/// Waits, without reading, until qlogd has closed its end of `stream`.
fn closed_by_peer(stream: &UnixStream, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: pfd is one valid pollfd for the whole call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc == 1 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

fn half_open(sink: &RunningSink) -> String {
    const EACH: usize = 40;
    const EVENTS: u64 = 5;
    let socket = sink.ingest_socket();
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..EACH {
        // A whole session in one write, then our sending side shut: qlogd must commit
        // the events and close, though its Welcome and acks are never read.
        let mut session = descriptor(&format!("sd-half-{i:02}"), "");
        session.extend(hello_frame("journal"));
        for seq in 1..=EVENTS {
            session.extend(event_frame(seq, &message(&format!("half-open {i} {seq}"))));
        }
        let stream = UnixStream::connect(socket).expect("the socket accepts");
        (&stream).write_all(&session).expect("qlogd reads");
        stream.shutdown(std::net::Shutdown::Write).expect("a half-close");
        held.push(("events then half-close", stream));

        let stream = UnixStream::connect(socket).expect("the socket accepts");
        let mut handshake = descriptor(&format!("sd-quiet-{i:02}"), "");
        handshake.extend(hello_frame("journal"));
        (&stream).write_all(&handshake).expect("qlogd reads");
        stream.shutdown(std::net::Shutdown::Write).expect("a half-close");
        held.push(("hello then half-close", stream));

        held.push(("connect, never send", UnixStream::connect(socket).expect("accepts")));
    }
    // Kind by kind, the quick ones first, so each time is that kind's own.
    let mut slowest: Vec<(&str, Duration)> = Vec::new();
    for kind in ["events then half-close", "hello then half-close", "connect, never send"] {
        for (_, stream) in held.iter().filter(|(k, _)| *k == kind) {
            assert!(closed_by_peer(stream, IO_TIMEOUT), "qlogd kept a {kind} connection open");
        }
        slowest.push((kind, started.elapsed()));
    }
    let table = query_vms(sink.query_socket()).expect("qlogd answers");
    for i in 0..EACH {
        let vm = format!("sd-half-{i:02}");
        let info = table.vms.iter().find(|v| v.vm == vm).unwrap_or_else(|| panic!("{vm} known"));
        assert_eq!((info.events_stored, info.frames_rejected), (EVENTS, 0), "{info:?}");
    }
    let closed: Vec<String> =
        slowest.iter().map(|(kind, t)| format!("{EACH} {kind} closed within {t:.2?}")).collect();
    format!("{}; every half-open session's {EVENTS} events stored", closed.join(", "))
}

fn never_reads(sink: &RunningSink) -> String {
    const FLOOD: u64 = 20_000;
    let mut flood = descriptor("sd-deaf", "");
    flood.extend(hello_frame("journal"));
    for seq in 1..=FLOOD {
        flood.extend(event_frame(seq, &message(&format!("deaf {seq}"))));
    }
    flood.extend(encode_u64(FrameType::End, FLOOD));
    let last = Filter {
        matches: vec![(MESSAGE.to_owned(), format!("deaf {FLOOD}"))],
        ..Filter::default()
    };
    // Written whole and never read from: acks and the final End pile up unread.
    let deaf = UnixStream::connect(sink.ingest_socket()).expect("the socket accepts");
    let started = Instant::now();
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| (&deaf).write_all(&flood));
        wait_for_records(sink.query_socket(), &last, 1, Duration::from_secs(120));
        writer.join().expect("the writer").expect("qlogd reads the whole flood");
    });
    let stored_in = started.elapsed();
    let table = query_vms(sink.query_socket()).expect("qlogd answers");
    let info = table.vms.iter().find(|v| v.vm == "sd-deaf").expect("sd-deaf is known");
    assert_eq!(info.events_stored, FLOOD, "{info:?}");
    drop(deaf);
    format!("{FLOOD} events ({} KiB) stored in {stored_in:.2?}, no ack read", flood.len() / 1024)
}

/// Raises this process's descriptor limit to its hard limit, before qlogd inherits it:
/// the burst holds 1,000 connections, and a soft limit of 1,024 is common.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_cur >= 2048, "the burst needs 2,048 descriptors; the limit is {limit:?}");
}

#[test]
fn abusive_connections_neither_starve_a_streaming_vm_nor_grow_memory() {
    raise_descriptor_limit();
    let args = [
        "--handshake-timeout".to_owned(),
        HANDSHAKE_TIMEOUT.as_secs().to_string(),
        "--idle-timeout-seconds".to_owned(),
        IDLE_TIMEOUT.as_secs().to_string(),
    ];
    let mut sink = RunningSink::start(SinkOptions {
        args: args.into_iter().map(Into::into).collect(),
        ..SinkOptions::default()
    });
    let mut bystander = Bystander::start(&sink);
    let idle_rss = status_kib(sink.pid(), "VmRSS:");

    let shared: &RunningSink = &sink;
    let reports = [
        case(shared, &mut bystander, "slowloris", || slowloris(shared)),
        case(shared, &mut bystander, "1,000 connections at once", || burst(shared)),
        case(shared, &mut bystander, "half-open connections", || half_open(shared)),
        case(shared, &mut bystander, "peer that never reads", || never_reads(shared)),
    ];
    for _ in 0..10 {
        bystander.round_trip();
    }

    // The bystander lost nothing, got nothing twice, and was never rejected.
    let query = EventsQuery { vms: vec![BYSTANDER.to_owned()], ..EventsQuery::default() };
    let records = query_events(sink.query_socket(), &query).expect("qlogd answers");
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=bystander.sent).collect::<Vec<_>>(), "the bystander's sequence");
    let table = query_vms(sink.query_socket()).expect("qlogd answers");
    let info = table.vms.iter().find(|v| v.vm == BYSTANDER).expect("the bystander is known");
    assert_eq!(info.frames_rejected, 0, "{info:?}");
    assert!(sink.is_running(), "qlogd died{}", sink.log_tail());
    assert!(bystander.agent.is_running(), "the agent died{}", bystander.agent.log_tail());
    // One connection for the whole run: the abuse never cut the bystander off.
    assert_eq!(bystander.agent.qrexec_calls().len(), 1, "{:?}", bystander.agent.qrexec_calls());

    let log = std::fs::read_to_string(sink.log_path()).unwrap_or_default();
    let refusals = log.matches("too many ingest connections are still in their handshake").count();
    eprintln!("qlogd idle RSS before the abuse: {:.1} MiB", idle_rss as f64 / 1024.0);
    for r in &reports {
        eprintln!(
            "| {} | {:.1} MiB | {} | {} |",
            r.name,
            r.peak_rss_kib as f64 / 1024.0,
            r.round_trips,
            r.detail
        );
    }
    eprintln!(
        "bystander: {} events, all stored once in order; handshake-pool refusal lines \
         logged: {refusals}",
        bystander.sent
    );
}

/// Opens a connection that sends nothing and is held in its handshake.
fn silent(sink: &RunningSink) -> RawIngest {
    RawIngest::connect(sink.ingest_socket()).expect("the socket accepts")
}

#[test]
fn handshake_pool_is_capped_and_the_excess_is_closed_unread() {
    const POOL: usize = 8;
    // A handshake timeout far beyond the test, so nothing leaves the pool by itself.
    let args = ["--max-handshakes", "8", "--handshake-timeout", "300"];
    let sink = RunningSink::start(SinkOptions {
        args: args.map(Into::into).to_vec(),
        ..SinkOptions::default()
    });
    let mut pool: Vec<RawIngest> = (0..POOL).map(|_| silent(&sink)).collect();

    // qlogd accepts in order, so the ninth finds the pool full: closed without a word.
    let mut excess = silent(&sink);
    assert!(excess.expect_closed(IO_TIMEOUT).is_empty(), "closed unread, not answered");
    for conn in &pool {
        assert!(!closed_by_peer(conn.stream(), Duration::ZERO), "the pool's peers stay");
    }
    // A well-behaved peer is refused alike while the pool is full...
    let mut refused = silent(&sink);
    let _ = refused.send_descriptor("sd-app", "");
    let _ = refused.send_hello(&hello("journal"));
    assert!(refused.expect_closed(IO_TIMEOUT).is_empty());

    // ...and served once a place is free: qlogd frees it when it sees the EOF.
    drop(pool.pop());
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let mut conn = silent(&sink);
        let _ = conn.send_descriptor("sd-app", "");
        let _ = conn.send_hello(&hello("journal"));
        match conn.read_frame(IO_TIMEOUT) {
            Ok(Some(frame)) if frame.ty == FrameType::Welcome => break,
            Ok(Some(frame)) => panic!("expected a welcome or a close, got {frame:?}"),
            // Closed unread: the freed place was not given back yet.
            _ => {
                assert!(Instant::now() < deadline, "no place was freed{}", sink.log_tail());
                // Only a retry pace: whether a place is free is what the welcome says.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let log = sink.log_tail();
    assert!(log.contains("too many ingest connections are still in their handshake"), "{log}");
    assert!(log.contains("limit=8"), "{log}");
}
