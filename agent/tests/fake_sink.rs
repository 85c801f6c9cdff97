//! Black-box tests of the agent binary against a scripted fake sink.
//!
//! The agent runs this very test binary as its `--qrexec-client`: started with
//! `QLOG_FAKE_QREXEC_SOCKET` set, it acts as a stand-in for `qrexec-client-vm`, relaying its
//! stdin and stdout to a Unix socket on which the test plays qlogd frame by frame. So the
//! agent is exercised as a real process, over real pipes, with real signals, and each
//! test decides exactly when the sink acks, closes or errs. The cross-process suite with a
//! real qlogd lives in the workspace's tests/ crate; these tests pin the agent's side of
//! the protocol on their own.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use qlog_rpc::event::decode_event_payload;
use qlog_rpc::frame::{FrameDecoder, FrameType};
use qlog_rpc::message::{decode_json, decode_u64, encode_json, encode_u64};
use qlog_rpc::{ErrorCode, ErrorFrame, Event, Frame, Gap, Hello, Limits, ResumePoint, Welcome};

const SOCKET_ENV: &str = "QLOG_FAKE_QREXEC_SOCKET";
const TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    if let Some(socket) = std::env::var_os(SOCKET_ENV) {
        std::process::exit(relay(Path::new(&socket)));
    }
    let tests: &[(&str, fn())] = &[
        ("stdin_lines_are_delivered_and_the_agent_exits_zero", stdin_lines_are_delivered),
        ("unacked_events_are_replayed_with_their_seq_after_reconnect", replays_after_reconnect),
        ("journal_resume_cursor_entry_is_skipped", journal_resume_cursor_is_skipped),
        ("journal_lost_cursor_records_a_gap_first", journal_lost_cursor_records_a_gap),
        ("journal_rejected_cursor_restarts_from_oldest", journal_rejected_cursor_restarts),
        ("journalctl_death_restarts_from_the_last_entry_read", journalctl_death_restarts),
        ("a_full_window_stops_reading_until_acked", full_window_stops_reading),
        ("sigterm_without_ack_exits_nonzero_with_count", sigterm_without_ack_reports_count),
        ("qrexec_exit_codes_are_explained", qrexec_exit_codes_are_explained),
        ("sink_error_frame_is_printed", sink_error_frame_is_printed),
        ("heartbeats_flow_while_idle", heartbeats_flow_while_idle),
        ("telemetry_samples_flow_and_count", telemetry_samples_flow_and_count),
        ("oversized_lines_are_cut_to_the_welcome_limits", oversized_lines_are_cut),
        ("bad_json_lines_are_forwarded_with_parse_error", bad_json_lines_are_forwarded),
        ("missing_log_vm_is_a_clear_error", missing_log_vm_is_a_clear_error),
    ];
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut failed = Vec::new();
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        print!("test {name} ... ");
        io::stdout().flush().ok();
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("ok"),
            Err(_) => {
                println!("FAILED");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailed: {failed:?}");
        std::process::exit(1);
    }
    println!("\nall fake-sink tests passed");
}

/// The fake qrexec client: stdin to the socket, the socket to stdout. Like
/// qrexec-client-vm with a socket service it exits 0 once the sink closes, whatever is
/// still unsent, and 125 if nothing listens.
fn relay(socket: &Path) -> i32 {
    let Ok(stream) = UnixStream::connect(socket) else { return 125 };
    let mut to_sink = stream.try_clone().expect("a unix stream can be cloned");
    thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut to_sink);
        let _ = to_sink.shutdown(std::net::Shutdown::Write);
    });
    let mut from_sink = stream;
    let mut stdout = io::stdout().lock();
    let mut buf = [0u8; 8192];
    while let Ok(n) = from_sink.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).and_then(|_| stdout.flush()).is_err() {
            break;
        }
    }
    0
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("qlog-agent-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Sink {
    listener: UnixListener,
    socket: PathBuf,
}

impl Sink {
    fn new(scratch: &Scratch) -> Sink {
        let socket = scratch.path("ingest.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        Sink { listener, socket }
    }

    fn accept(&self) -> Conn {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                    return Conn { stream, decoder: FrameDecoder::new(Limits::DEFAULT) };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("the agent did not connect: {e}"),
            }
        }
    }
}

struct Conn {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl Conn {
    /// The next frame, or `None` at end of stream.
    fn frame(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(frame);
            }
            let n = self.stream.read(&mut buf).expect("the agent sends within the timeout");
            if n == 0 {
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    /// The next frame that is not a heartbeat or a telemetry sample.
    fn data(&mut self) -> Frame {
        loop {
            let frame = self.frame().expect("a frame, not the end of the stream");
            if !matches!(frame.ty, FrameType::Heartbeat | FrameType::Telemetry) {
                return frame;
            }
        }
    }

    fn hello(&mut self) -> Hello {
        let frame = self.frame().expect("a hello");
        assert_eq!(frame.ty, FrameType::Hello);
        decode_json(frame.ty, &frame.payload).unwrap()
    }

    fn welcome(&mut self, last_seq: u64, cursor: Option<&str>, limits: Limits) -> Hello {
        let hello = self.hello();
        let welcome = Welcome {
            version: 1,
            sink: "fake-sink".into(),
            vm: "test-vm".into(),
            stream: hello.stream.clone(),
            limits,
            resume: ResumePoint { last_seq, cursor: cursor.map(str::to_string) },
        };
        self.send(&encode_json(FrameType::Welcome, &welcome));
        hello
    }

    fn event(&mut self) -> (u64, Event) {
        let frame = self.data();
        assert_eq!(frame.ty, FrameType::Event, "{frame:?}");
        decode_event_payload(&frame.payload, &Limits::DEFAULT).unwrap()
    }

    fn end(&mut self) -> u64 {
        let frame = self.data();
        assert_eq!(frame.ty, FrameType::End, "{frame:?}");
        decode_u64(frame.ty, &frame.payload).unwrap()
    }

    /// Asserts that nothing but heartbeats and telemetry arrives for `quiet`.
    fn nothing_for(&mut self, quiet: Duration) {
        self.stream.set_read_timeout(Some(quiet)).unwrap();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + quiet;
        while Instant::now() < deadline {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                assert!(
                    matches!(frame.ty, FrameType::Heartbeat | FrameType::Telemetry),
                    "unexpected {frame:?}"
                );
                continue;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the agent closed the stream"),
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read failed: {e}"),
            }
        }
        self.stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn ack(&mut self, seq: u64) {
        self.send(&encode_u64(FrameType::Ack, seq));
    }

    /// Acks the agent's end and ends the stream, as qlogd does.
    fn close_cleanly(mut self, last_seq: u64) {
        self.ack(last_seq);
        self.send(&encode_u64(FrameType::End, last_seq));
        drop(self);
    }
}

struct Agent {
    child: Child,
    stderr: PathBuf,
}

fn start_agent(scratch: &Scratch, sink: &Sink, args: &[&str]) -> Agent {
    let stderr = scratch.path("agent.stderr");
    let child = Command::new(env!("CARGO_BIN_EXE_qlog-agent"))
        .args(["--log-vm", "test-log", "--backoff-initial-ms", "20", "--backoff-max-ms", "100"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(SOCKET_ENV, &sink.socket)
        .env("QLOG_QREXEC_CLIENT", std::env::current_exe().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    Agent { child, stderr }
}

impl Agent {
    fn write_stdin(&mut self, bytes: &[u8]) {
        self.child.stdin.as_mut().expect("stdin is open").write_all(bytes).unwrap();
    }

    fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the child is ours and alive.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit; stderr: {}", self.log());
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message(event: &Event) -> &str {
    event.get_str("MESSAGE").expect("a MESSAGE field")
}

fn stdin_lines_are_delivered() {
    let scratch = Scratch::new("lines");
    let sink = Sink::new(&scratch);
    let mut agent = start_agent(&scratch, &sink, &["--source", "stdin"]);
    agent.write_stdin(b"first\nsecond\xff\nthird");
    agent.close_stdin();

    let mut conn = sink.accept();
    let hello = conn.welcome(10, None, Limits::DEFAULT);
    assert_eq!(hello.stream, "stdin");
    assert_eq!(hello.versions, qlog_rpc::PROTOCOL_VERSIONS);
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e)), (11, "first"));
    let (seq, e) = conn.event();
    assert_eq!((seq, e.get("MESSAGE").unwrap()), (12, &b"second\xff"[..]));
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e)), (13, "third"));
    assert_eq!(conn.end(), 13);
    conn.close_cleanly(13);

    let status = agent.wait();
    assert_eq!(status.code(), Some(0), "stderr: {}", agent.log());
}

fn replays_after_reconnect() {
    let scratch = Scratch::new("replay");
    let sink = Sink::new(&scratch);
    let mut agent = start_agent(&scratch, &sink, &["--source", "stdin"]);
    agent.write_stdin(b"a\nb\nc\nd\ne\n");
    agent.close_stdin();

    let mut conn = sink.accept();
    conn.welcome(0, None, Limits::DEFAULT);
    let seqs: Vec<u64> = (0..5).map(|_| conn.event().0).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    conn.ack(2);
    // The sink stores 3 but dies before acking it.
    drop(conn);

    let mut conn = sink.accept();
    conn.welcome(3, None, Limits::DEFAULT);
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e)), (4, "d"));
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e)), (5, "e"));
    assert_eq!(conn.end(), 5);
    conn.close_cleanly(5);

    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());
    assert!(agent.log().contains("resending"), "{}", agent.log());
}

/// A fake journalctl that logs its arguments and prints two entries, then follows.
fn fake_journalctl(scratch: &Scratch) -> PathBuf {
    let args = scratch.path("journalctl.args");
    scratch.script(
        "journalctl",
        &format!(
            "echo \"$@\" >> '{}'\n\
             printf '__CURSOR=c1\\nMESSAGE=one\\n\\n__CURSOR=c2\\nMESSAGE=two\\nPRIORITY=6\\n\\n'\n\
             exec sleep 60",
            args.display()
        ),
    )
}

fn journal_resume_cursor_is_skipped() {
    let scratch = Scratch::new("cursor");
    let sink = Sink::new(&scratch);
    let journalctl = fake_journalctl(&scratch);
    let mut agent = start_agent(&scratch, &sink, &["--journalctl", journalctl.to_str().unwrap()]);
    let mut conn = sink.accept();
    assert_eq!(conn.welcome(7, Some("c1"), Limits::DEFAULT).stream, "journal");
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e), e.get_str("__CURSOR")), (8, "two", Some("c2")));
    conn.ack(8);
    thread::sleep(Duration::from_millis(100));
    let args = fs::read_to_string(scratch.path("journalctl.args")).unwrap();
    assert_eq!(args.trim(), "--output=export --follow --no-tail --all --cursor=c1");

    agent.signal(libc::SIGTERM);
    assert_eq!(conn.end(), 8);
    conn.close_cleanly(8);
    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());
}

fn journal_lost_cursor_records_a_gap() {
    let scratch = Scratch::new("lost");
    let sink = Sink::new(&scratch);
    let journalctl = fake_journalctl(&scratch);
    let mut agent = start_agent(
        &scratch,
        &sink,
        &["--journalctl", journalctl.to_str().unwrap(), "--priority", "notice"],
    );
    let mut conn = sink.accept();
    conn.welcome(0, Some("vacuumed"), Limits::DEFAULT);
    let frame = conn.data();
    assert_eq!(frame.ty, FrameType::Gap);
    let gap: Gap = decode_json(frame.ty, &frame.payload).unwrap();
    assert_eq!((gap.seq, gap.reason.as_str()), (1, "cursor-lost"));
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e)), (2, "one"));
    // "two" has PRIORITY=6 (info), above the notice threshold, so it is filtered out.
    conn.ack(2);
    agent.signal(libc::SIGINT);
    assert_eq!(conn.end(), 2);
    conn.close_cleanly(2);
    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());
}

fn journal_rejected_cursor_restarts() {
    let scratch = Scratch::new("rejected");
    let sink = Sink::new(&scratch);
    let args = scratch.path("journalctl.args");
    let journalctl = scratch.script(
        "journalctl",
        &format!(
            "echo \"$@\" >> '{}'\n\
             case \"$*\" in *--cursor=*) echo 'Failed to seek to cursor' >&2; exit 1;; esac\n\
             printf '__CURSOR=old1\\nMESSAGE=oldest\\n\\n'\n\
             exec sleep 60",
            args.display()
        ),
    );
    let mut agent = start_agent(&scratch, &sink, &["--journalctl", journalctl.to_str().unwrap()]);
    let mut conn = sink.accept();
    conn.welcome(4, Some("garbage"), Limits::DEFAULT);
    let frame = conn.data();
    assert_eq!(frame.ty, FrameType::Gap);
    let gap: Gap = decode_json(frame.ty, &frame.payload).unwrap();
    assert_eq!((gap.seq, gap.reason.as_str()), (5, "cursor-lost"));
    let (seq, e) = conn.event();
    assert_eq!((seq, message(&e)), (6, "oldest"));
    let args = fs::read_to_string(&args).unwrap();
    let runs: Vec<&str> = args.lines().collect();
    assert_eq!(
        runs,
        [
            "--output=export --follow --no-tail --all --cursor=garbage",
            "--output=export --follow --no-tail --all"
        ]
    );
    conn.ack(6);
    agent.signal(libc::SIGTERM);
    assert_eq!(conn.end(), 6);
    conn.close_cleanly(6);
    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());
}

fn journalctl_death_restarts() {
    let scratch = Scratch::new("restart");
    let sink = Sink::new(&scratch);
    let args = scratch.path("journalctl.args");
    // The first run prints two entries and dies; a run from cursor c2 goes on from there.
    let journalctl = scratch.script(
        "journalctl",
        &format!(
            "echo \"$@\" >> '{}'\n\
             case \"$*\" in\n\
             *--cursor=c2*) printf '__CURSOR=c2\\nMESSAGE=two\\n\\n__CURSOR=c3\\nMESSAGE=three\\n\\n'; \
             exec sleep 60;;\n\
             esac\n\
             printf '__CURSOR=c1\\nMESSAGE=one\\n\\n__CURSOR=c2\\nMESSAGE=two\\n\\n__CURSOR=c9\\nMESSAGE=cut sh'\n\
             exit 1",
            args.display()
        ),
    );
    let mut agent = start_agent(&scratch, &sink, &["--journalctl", journalctl.to_str().unwrap()]);
    let mut conn = sink.accept();
    conn.welcome(0, None, Limits::DEFAULT);
    let got: Vec<(u64, String)> = (0..3)
        .map(|_| {
            let (seq, e) = conn.event();
            (seq, message(&e).to_string())
        })
        .collect();
    // The entry cut off by the death is not sent half; no gap, no duplicate of "two".
    assert_eq!(got, [(1, "one".into()), (2, "two".into()), (3, "three".into())]);
    let runs = fs::read_to_string(&args).unwrap();
    let runs: Vec<&str> = runs.lines().collect();
    assert_eq!(
        runs,
        [
            "--output=export --follow --no-tail --all --boot",
            "--output=export --follow --no-tail --all --cursor=c2"
        ]
    );
    assert!(agent.log().contains("journalctl exited (status 1)"), "{}", agent.log());
    conn.ack(3);
    agent.signal(libc::SIGTERM);
    assert_eq!(conn.end(), 3);
    conn.close_cleanly(3);
    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());
}

fn full_window_stops_reading() {
    let scratch = Scratch::new("window");
    let sink = Sink::new(&scratch);
    let mut agent =
        start_agent(&scratch, &sink, &["--source", "stdin", "--max-in-flight-events", "2"]);
    agent.write_stdin(b"1\n2\n3\n4\n");
    agent.close_stdin();
    let mut conn = sink.accept();
    conn.welcome(0, None, Limits::DEFAULT);
    assert_eq!(conn.event().0, 1);
    assert_eq!(conn.event().0, 2);
    conn.nothing_for(Duration::from_millis(300));
    conn.ack(1);
    assert_eq!(conn.event().0, 3);
    conn.nothing_for(Duration::from_millis(100));
    conn.ack(3);
    assert_eq!(conn.event().0, 4);
    assert_eq!(conn.end(), 4);
    conn.close_cleanly(4);
    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());
}

fn sigterm_without_ack_reports_count() {
    let scratch = Scratch::new("sigterm");
    let sink = Sink::new(&scratch);
    let mut agent =
        start_agent(&scratch, &sink, &["--source", "stdin", "--shutdown-timeout-ms", "300"]);
    agent.write_stdin(b"x\ny\n");
    let mut conn = sink.accept();
    conn.welcome(0, None, Limits::DEFAULT);
    conn.event();
    conn.event();
    conn.ack(1);
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    agent.signal(libc::SIGTERM);
    assert_eq!(conn.end(), 2);
    let status = agent.wait();
    assert!(started.elapsed() < Duration::from_secs(3), "the shutdown timeout bounds the wait");
    assert_eq!(status.code(), Some(1));
    assert!(agent.log().contains("1 events not acknowledged"), "{}", agent.log());
}

fn qrexec_exit_codes_are_explained() {
    let scratch = Scratch::new("exitcodes");
    let sink = Sink::new(&scratch);
    let client = scratch.script("qrexec-client-vm", "echo Request refused >&2; exit 126");
    let mut agent = start_agent(&scratch, &sink, &["--qrexec-client", client.to_str().unwrap()]);
    let deadline = Instant::now() + TIMEOUT;
    while !agent.log().contains("check dom0 policy for qlog.Ingest") {
        assert!(Instant::now() < deadline, "no policy message; stderr: {}", agent.log());
        thread::sleep(Duration::from_millis(20));
    }
    assert!(agent.log().contains("reconnecting in"), "{}", agent.log());
    // Nothing was ever read, so nothing is owed: a signal ends the agent with success.
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait().code(), Some(0), "stderr: {}", agent.log());

    let client = scratch.script("qrexec-127", "exit 127");
    let mut agent = start_agent(&scratch, &sink, &["--qrexec-client", client.to_str().unwrap()]);
    while !agent.log().contains("not installed in the log VM") {
        assert!(Instant::now() < deadline, "no 127 message; stderr: {}", agent.log());
        thread::sleep(Duration::from_millis(20));
    }
    agent.signal(libc::SIGTERM);
    assert!(agent.wait().success());
}

fn sink_error_frame_is_printed() {
    let scratch = Scratch::new("errorframe");
    let sink = Sink::new(&scratch);
    let mut agent = start_agent(&scratch, &sink, &["--source", "stdin"]);
    let mut conn = sink.accept();
    conn.hello();
    conn.send(&ErrorFrame::new(ErrorCode::UnknownVm, "vm test-vm may not log here").encode());
    drop(conn);
    let deadline = Instant::now() + TIMEOUT;
    while !agent.log().contains("vm test-vm may not log here") {
        assert!(Instant::now() < deadline, "no error message; stderr: {}", agent.log());
        thread::sleep(Duration::from_millis(20));
    }
    assert!(agent.log().contains("refused the stream: unknown-vm:"), "{}", agent.log());
    // It keeps trying.
    let mut conn = sink.accept();
    conn.hello();
    agent.signal(libc::SIGTERM);
    // Stopped before stdin ended, so the rest of the input was never delivered.
    assert_eq!(agent.wait().code(), Some(1), "stderr: {}", agent.log());
    assert!(agent.log().contains("before the end of stdin"), "{}", agent.log());
}

/// A sample right after the welcome, then one per interval, with the system's numbers
/// and the agent's own counters, all of which the sink's validation accepts.
fn telemetry_samples_flow_and_count() {
    let scratch = Scratch::new("telemetry");
    let sink = Sink::new(&scratch);
    let mut agent = start_agent(
        &scratch,
        &sink,
        &["--source", "stdin", "--heartbeat-interval", "60", "--telemetry-interval", "1"],
    );
    let mut conn = sink.accept();
    assert_eq!(conn.welcome(0, None, Limits::DEFAULT).telemetry_interval_secs, Some(1));
    agent.write_stdin(b"one\ntwo\n");
    let mut last_read = 0.0;
    let mut samples = 0;
    // Samples keep coming; the counters catch up with the two lines.
    while last_read < 2.0 {
        let frame = conn.frame().expect("frames until the counters show both lines");
        if frame.ty != FrameType::Telemetry {
            continue;
        }
        samples += 1;
        let sample: qlog_rpc::telemetry::Sample = decode_json(frame.ty, &frame.payload).unwrap();
        let valid = sample.validated();
        assert_eq!(valid.rejected, 0, "{sample:?}");
        let get = |n: &str| valid.values.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert!(get("load1").is_some() && get("mem_available_bytes").is_some(), "{sample:?}");
        last_read = get("agent_events_read").unwrap();
        assert!(get("agent_in_flight").unwrap() <= 2.0);
    }
    // And the next interval brings another.
    while conn.frame().expect("another sample").ty != FrameType::Telemetry {}
    assert!(samples >= 1);
    agent.close_stdin();
    assert_eq!(conn.end(), 2);
    conn.close_cleanly(2);
    assert!(agent.wait().success(), "stderr: {}", agent.log());
}

fn heartbeats_flow_while_idle() {
    let scratch = Scratch::new("heartbeat");
    let sink = Sink::new(&scratch);
    let mut agent = start_agent(
        &scratch,
        &sink,
        &["--source", "stdin", "--heartbeat-interval", "1", "--telemetry-interval", "0"],
    );
    let mut conn = sink.accept();
    let hello = conn.welcome(0, None, Limits::DEFAULT);
    assert_eq!(hello.heartbeat_interval_secs, Some(1));
    assert_eq!(hello.telemetry_interval_secs, None);
    let started = Instant::now();
    let frame = conn.frame().unwrap();
    assert_eq!(frame.ty, FrameType::Heartbeat);
    assert!(started.elapsed() >= Duration::from_millis(800));
    let frame = conn.frame().unwrap();
    assert_eq!(frame.ty, FrameType::Heartbeat);
    agent.close_stdin();
    assert_eq!(conn.end(), 0);
    conn.close_cleanly(0);
    assert!(agent.wait().success(), "stderr: {}", agent.log());
}

fn oversized_lines_are_cut() {
    let scratch = Scratch::new("oversized");
    let sink = Sink::new(&scratch);
    let mut agent =
        start_agent(&scratch, &sink, &["--source", "stdin", "--input-format", "export"]);
    let mut input = format!("MESSAGE={}\nlower-name=v\n", "m".repeat(5000)).into_bytes();
    input.extend_from_slice(b"BIN\n");
    input.extend_from_slice(&3000u64.to_le_bytes());
    input.extend_from_slice(&[0u8; 3000]);
    input.extend_from_slice(b"\n\n");
    agent.write_stdin(&input);
    agent.close_stdin();
    let mut conn = sink.accept();
    conn.welcome(0, None, Limits { max_value_len: 1000, ..Limits::DEFAULT });
    let (_, e) = conn.event();
    assert_eq!(e.get("MESSAGE").unwrap().len(), 1000);
    assert_eq!(e.get("LOWER_NAME"), Some(&b"v"[..]));
    assert_eq!(e.get("BIN").unwrap().len(), 1000);
    let marks: Vec<_> =
        e.fields.iter().filter(|f| f.name == "QLOG_TRUNCATED").map(|f| f.value.clone()).collect();
    assert_eq!(marks, [b"MESSAGE:5000".to_vec(), b"BIN:3000".to_vec()]);
    assert_eq!(conn.end(), 1);
    conn.close_cleanly(1);
    assert!(agent.wait().success(), "stderr: {}", agent.log());
}

fn bad_json_lines_are_forwarded() {
    let scratch = Scratch::new("json");
    let sink = Sink::new(&scratch);
    let mut agent = start_agent(&scratch, &sink, &["--source", "stdin", "--input-format", "json"]);
    agent.write_stdin(b"{\"MESSAGE\":\"good\",\"PRIORITY\":\"3\"}\nnot json\n\n");
    agent.close_stdin();
    let mut conn = sink.accept();
    conn.welcome(0, None, Limits::DEFAULT);
    let (_, e) = conn.event();
    assert_eq!((message(&e), e.get_str("PRIORITY")), ("good", Some("3")));
    let (_, e) = conn.event();
    assert_eq!(message(&e), "not json");
    assert!(e.get_str("QLOG_PARSE_ERROR").unwrap().contains("invalid JSON"));
    assert_eq!(conn.end(), 2);
    conn.close_cleanly(2);
    assert!(agent.wait().success(), "stderr: {}", agent.log());
    assert!(agent.log().contains("1 of 3 stdin lines"), "{}", agent.log());
}

fn missing_log_vm_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_qlog-agent"))
        .env_clear()
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("no log VM configured"), "{text}");
    assert!(text.contains("vm-config.qlog-log-vm"), "{text}");
    assert!(output.status.signal().is_none());
}
