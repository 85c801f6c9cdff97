//! The actors of the flood-fairness scenario, shared by `tests/tests/flood_fairness.rs`
//! and `qlog-bench flood` so that the test and the benchmark run the same setup.
//!
//! Owns three kinds of sender, all talking to qlogd's ingest socket directly as qrexec
//! would relay them: an honest VM that sends at a fixed pace ([`paced_vm`]), a flooder
//! that sends as fast as it can on several streams and mixes in garbage frames and
//! garbage connections ([`Flooder`]), and a one-connection burst ([`burst`]). What qlogd
//! makes of them is for the callers to check.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qlog_rpc::event::encode_event_payload;
use qlog_rpc::frame::encode;
use qlog_rpc::message::{decode_json, decode_u64, encode_json, encode_u64};
use qlog_rpc::{fields, Event, FrameType, Welcome};

use crate::ingest::{descriptor, hello, RawIngest};
use crate::wire::FrameReader;
use crate::IO_TIMEOUT;

/// The field every paced event carries: the sender's wall clock when it wrote the event
/// (µs since the epoch), which a follower turns into ingest-to-visible latency.
pub const SENT_USEC: &str = "FLOOD_SENT_USEC";

/// Events a flooder session sends before it ends, cleanly or with garbage.
const FLOOD_SESSION_EVENTS: u64 = 5_000;

/// The message of event `seq` of (`vm`, `stream`): what the checks compare.
pub fn message(vm: &str, stream: &str, seq: u64) -> String {
    format!("{vm} {stream} {seq}")
}

fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn event(vm: &str, stream: &str, seq: u64) -> Event {
    let mut e = Event::new();
    e.push(fields::MESSAGE, message(vm, stream, seq));
    e.push(fields::PRIORITY, "6");
    e.push(SENT_USEC, now_usec().to_string());
    e
}

/// Sends `count` events as `vm` on stream `journal`, one every `1/rate` s on a fixed
/// schedule (a late event does not push the later ones back), then ends the session and
/// waits until all are acknowledged. Returns the last sequence number.
///
/// # Panics
///
/// If the sink refuses the session or does not acknowledge everything in time.
pub fn paced_vm(ingest: &Path, vm: &str, rate: u64, count: u64) -> u64 {
    let (mut conn, welcome) = RawIngest::handshake(ingest, vm, "journal");
    let first = welcome.resume.last_seq + 1;
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for (i, seq) in (first..first + count).enumerate() {
        // Pacing, not synchronisation: this is the sender's own schedule.
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        conn.send_event(seq, &event(vm, "journal", seq)).expect("the sink reads the event");
    }
    let last = first + count - 1;
    conn.send_end(last).expect("the sink reads the end");
    conn.expect_ack(last, IO_TIMEOUT);
    last
}

/// What a [`Flooder`] sent, for the accounting checks.
#[derive(Debug, Clone, Default)]
pub struct FloodReport {
    /// Per stream: the highest sequence number sent. qlogd read every one of them (the
    /// garbage comes after them), so each is stored or refused.
    pub streams: Vec<(String, u64)>,
    /// Sessions that ended with End, and those that ended with a garbage frame.
    pub clean_sessions: u64,
    pub garbage_sessions: u64,
    /// Connections that sent garbage instead of the protocol.
    pub garbage_connections: u64,
    /// Sessions whose welcome resumed exactly where the previous one ended.
    pub resumes_checked: u64,
}

/// Sets the calling thread's nice level (Linux: per thread); 0 leaves it alone.
fn renice_this_thread(nice: i32) {
    if nice != 0 {
        // SAFETY: plain syscalls on our own thread id.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        assert_eq!(rc, 0, "setpriority: {}", std::io::Error::last_os_error());
    }
}

/// What one flooder stream sent.
struct StreamOutcome {
    stream: String,
    last: u64,
    clean: u64,
    garbage: u64,
    resumes: u64,
}

/// A VM sending as fast as it can on `streams` streams at once, each a sequence of
/// sessions of [`FLOOD_SESSION_EVENTS`] events written without waiting, every other
/// session ending in a garbage frame instead of End; plus one thread opening garbage
/// connections. Stops when asked, after the sessions in flight.
pub struct Flooder {
    stop: Arc<AtomicBool>,
    garbage_connections: Arc<AtomicU64>,
    streams: Vec<JoinHandle<StreamOutcome>>,
    garbage: JoinHandle<()>,
}

impl Flooder {
    pub fn start(ingest: &Path, vm: &str, streams: usize) -> Flooder {
        Flooder::start_niced(ingest, vm, streams, 0)
    }

    /// [`Flooder::start`] with the flooder's threads at nice level `nice`. A flooding VM
    /// runs on its own vCPUs, not the log qube's; on a benchmark machine with few cores
    /// a positive nice level keeps the sender's own work from posing as qlogd's.
    pub fn start_niced(ingest: &Path, vm: &str, streams: usize, nice: i32) -> Flooder {
        let stop = Arc::new(AtomicBool::new(false));
        let garbage_connections = Arc::new(AtomicU64::new(0));
        let handles = (0..streams)
            .map(|i| {
                let (ingest, vm, stop) = (ingest.to_owned(), vm.to_owned(), Arc::clone(&stop));
                std::thread::spawn(move || {
                    renice_this_thread(nice);
                    flood_stream(&ingest, &vm, &format!("flood-{i}"), &stop)
                })
            })
            .collect();
        let garbage = {
            let (ingest, vm, stop) = (ingest.to_owned(), vm.to_owned(), Arc::clone(&stop));
            let count = Arc::clone(&garbage_connections);
            std::thread::spawn(move || {
                renice_this_thread(nice);
                garbage_connections_loop(&ingest, &vm, &stop, &count)
            })
        };
        Flooder { stop, garbage_connections, streams: handles, garbage }
    }

    /// Stops sending and returns what was sent.
    pub fn stop(self) -> FloodReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = FloodReport::default();
        for h in self.streams {
            let StreamOutcome { stream, last, clean, garbage, resumes } =
                h.join().expect("flooder threads do not panic");
            report.streams.push((stream, last));
            report.clean_sessions += clean;
            report.garbage_sessions += garbage;
            report.resumes_checked += resumes;
        }
        self.garbage.join().expect("the garbage thread does not panic");
        report.garbage_connections = self.garbage_connections.load(Ordering::Relaxed);
        report
    }
}

/// One stream of the flooder: sessions back to back until told to stop.
fn flood_stream(ingest: &Path, vm: &str, stream: &str, stop: &AtomicBool) -> StreamOutcome {
    let (mut last, mut clean, mut garbage, mut resumes) = (0u64, 0u64, 0u64, 0u64);
    let mut payload = Vec::new();
    let mut session = 0u64;
    while !stop.load(Ordering::Relaxed) {
        session += 1;
        let mut sock = UnixStream::connect(ingest).expect("the ingest socket accepts");
        sock.set_read_timeout(Some(IO_TIMEOUT)).expect("a socket takes a timeout");
        let mut head = descriptor(vm, "");
        head.extend(encode_json(FrameType::Hello, &hello(stream)));
        sock.write_all(&head).expect("the sink reads the hello");
        let mut reader = FrameReader::new(sock.try_clone().expect("a socket can be cloned"));
        let welcome: Welcome = match reader.next_frame() {
            Ok(Some(f)) if f.ty == FrameType::Welcome => {
                decode_json(f.ty, &f.payload).expect("the welcome is valid JSON")
            }
            other => panic!("{vm}/{stream}: expected a welcome, got {other:?}"),
        };
        // The resume point moves past refused events too, or the agent would send
        // them again.
        // A new flooder continues where an earlier one on the same sink left off.
        if session == 1 {
            last = welcome.resume.last_seq;
        } else {
            assert_eq!(welcome.resume.last_seq, last, "{vm}/{stream} resumed elsewhere");
            resumes += 1;
        }

        let mut frames = Vec::with_capacity(FLOOD_SESSION_EVENTS as usize * 96);
        for seq in last + 1..=last + FLOOD_SESSION_EVENTS {
            payload.clear();
            encode_event_payload(seq, &event(vm, stream, seq), &mut payload);
            encode(FrameType::Event, &payload, &mut frames);
        }
        last += FLOOD_SESSION_EVENTS;
        let with_garbage = session.is_multiple_of(2);
        if with_garbage {
            // A frame of a type the protocol does not have (length, type, payload): the
            // sink ends the session.
            frames.extend_from_slice(&7u32.to_be_bytes());
            frames.push(0xee);
            frames.extend_from_slice(b"garbage");
        } else {
            frames.extend(encode_u64(FrameType::End, last));
        }
        // Acks are not read while writing, as a hostile sender would not: the sink
        // coalesces them.
        sock.write_all(&frames).expect("the sink reads the flood");
        loop {
            match reader.next_frame() {
                Ok(Some(f)) if f.ty == FrameType::End => {
                    assert_eq!(decode_u64(f.ty, &f.payload).expect("a u64"), last);
                    break;
                }
                Ok(Some(f)) if matches!(f.ty, FrameType::Ack | FrameType::Error) => {}
                Ok(Some(f)) => panic!("{vm}/{stream}: unexpected {:?} frame", f.ty),
                Ok(None) => break,
                Err(e) if e.is_reset() => break,
                Err(e) => panic!("{vm}/{stream}: reading the sink's answer: {e}"),
            }
        }
        if with_garbage {
            garbage += 1;
        } else {
            clean += 1;
        }
    }
    StreamOutcome { stream: stream.to_owned(), last, clean, garbage, resumes }
}

/// Opens connections that break the protocol in turn: bytes that are no descriptor, a
/// descriptor and a broken frame header, a descriptor and a frame before the hello.
fn garbage_connections_loop(ingest: &Path, vm: &str, stop: &AtomicBool, count: &AtomicU64) {
    let kinds: [Vec<u8>; 3] = [
        b"\x00\xff\xfe garbage, not a descriptor".to_vec(),
        [descriptor(vm, ""), vec![0xff; 64]].concat(),
        [descriptor(vm, ""), encode_u64(FrameType::End, 1)].concat(),
    ];
    let mut i = 0;
    let mut sink = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut sock) = UnixStream::connect(ingest) else { continue };
        let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
        let _ = sock.write_all(&kinds[i % kinds.len()]);
        // Read the sink's error and its close, so the next one does not pile up.
        while matches!(sock.read(&mut sink), Ok(n) if n > 0) {}
        count.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
}

/// Sends `count` small events as `vm` on stream `burst` over one connection, as fast as
/// the socket takes them, then End; waits for the end reply and returns it. The frames
/// are generated as they are written, so the sender's memory stays flat.
///
/// # Panics
///
/// If the sink refuses the session or does not answer the end in time.
pub fn burst(ingest: &Path, vm: &str, count: u64) -> u64 {
    let (conn, welcome) = RawIngest::handshake(ingest, vm, "burst");
    let first = welcome.resume.last_seq + 1;
    let last = first + count - 1;
    let mut writer = conn.stream().try_clone().expect("a socket can be cloned");
    let vm_owned = vm.to_owned();
    let sender = std::thread::spawn(move || {
        let mut frames = Vec::with_capacity(1 << 20);
        let mut payload = Vec::new();
        let mut e = Event::new();
        for seq in first..=last {
            e.fields.clear();
            e.push(fields::MESSAGE, message(&vm_owned, "burst", seq));
            e.push(fields::PRIORITY, "6");
            payload.clear();
            encode_event_payload(seq, &e, &mut payload);
            encode(FrameType::Event, &payload, &mut frames);
            if frames.len() >= 1 << 20 {
                writer.write_all(&frames).expect("the sink reads the burst");
                frames.clear();
            }
        }
        frames.extend(encode_u64(FrameType::End, last));
        writer.write_all(&frames).expect("the sink reads the burst");
    });
    let mut reader = FrameReader::new(conn.stream().try_clone().expect("a socket can be cloned"));
    conn.stream().set_read_timeout(Some(Duration::from_secs(120))).expect("a timeout");
    let ended = loop {
        match reader.next_frame() {
            Ok(Some(f)) if f.ty == FrameType::End => {
                break decode_u64(f.ty, &f.payload).expect("a u64")
            }
            Ok(Some(f)) if f.ty == FrameType::Ack => {}
            other => panic!("{vm}: the burst ended without an end reply: {other:?}"),
        }
    };
    sender.join().expect("the burst sender does not panic");
    ended
}

/// `VmHWM` (peak resident set) of a process, in KiB.
///
/// # Panics
///
/// If the process is gone.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("/proc/PID/status has VmHWM")
}

/// Writes a qlogd configuration file giving `vm` its own bucket, and returns its path
/// (inside `dir`).
pub fn write_flood_config(dir: &Path, vm: &str, events_per_sec: u64, burst_events: u64) -> PathBuf {
    let path = dir.join("flood.toml");
    let text = format!(
        "[vm.{vm}]\nrate_limit_events_per_sec = {events_per_sec}\nrate_limit_burst_events = {burst_events}\n"
    );
    std::fs::write(&path, text).expect("the directory is writable");
    path
}
