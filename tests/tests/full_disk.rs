//! qlogd on a full disk: it stops acknowledging rather than lie, keeps answering
//! queries, says so in one ERROR, and resumes by itself when space returns; and quotas
//! keep a store whose quotas fit the disk from ever filling it.
//!
//! Each test puts qlogd's state dir on a small tmpfs mounted in a private mount
//! namespace, held by a process of its own (as `JournalNamespace` does), so nothing is
//! mounted on the machine and the mount ends with its holder whatever happens to the
//! test. qlogd, which runs in our namespace, reaches the tmpfs through the holder's
//! `/proc/PID/root`; so does the test, to fill it with a ballast file and delete it
//! again. Needs root, for the namespace and the mount.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qlog_rpc::fields::MESSAGE;
use qlog_rpc::query::{EventsQuery, Filter, RecordKind};
use qlog_rpc::{Event, FrameType};
use qlog_tests::agent::wait_for_records;
use qlog_tests::process::{die_with_parent_thread, kill_and_reap, log_stdio, quote_log};
use qlog_tests::{
    ingest_events, query_events, query_vms, AgentOptions, JournalNamespace, RawIngest,
    RunningAgent, RunningSink, SinkOptions, IO_TIMEOUT,
};

/// A generous bound on how long qlogd may take to notice, retry or recover.
const DEADLINE: Duration = Duration::from_secs(60);
/// What qlogd logs when a commit first fails, and when commits work again.
const COMMIT_FAILED: &str = "commit failed: acks are held";
const COMMIT_RETRY: &str = "commit failed again";
const COMMIT_RECOVERED: &str = "commits succeed again";

/// The holder's script: mount a tmpfs of `$1` bytes on `$2`, say `ok`, sleep.
const HOLDER_SCRIPT: &str = "\
set -e
mount -t tmpfs -o size=\"$1\",mode=0755 qlog-full-disk \"$2\"
echo ok
exec sleep infinity
";

/// A tmpfs of a fixed size in a mount namespace of its own. Dropping it kills the
/// holder, which ends the namespace and the mount (drop qlogd first).
struct TinyFs {
    holder: Child,
    /// The mount as this namespace reaches it.
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(bytes: u64) -> TinyFs {
        let dir = tempfile::Builder::new().prefix("qlog-disk.").tempdir_in("/tmp").unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let log = dir.path().join("holder.log");
        let (_, stderr) = log_stdio(&log);
        let mut command = Command::new("unshare");
        command
            .args(["-m", "--propagation", "private", "--", "sh", "-c", HOLDER_SCRIPT, "sh"])
            .arg(bytes.to_string())
            .arg(&mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        die_with_parent_thread(&mut command);
        let mut holder = command.spawn().expect("unshare can be spawned");
        let mut line = String::new();
        let read = BufReader::new(holder.stdout.take().expect("piped")).read_line(&mut line);
        if read.is_err() || line.trim_end() != "ok" {
            kill_and_reap(&mut holder);
            panic!("cannot mount the tmpfs ({line:?}){}", quote_log("the holder", &log));
        }
        let root = PathBuf::from(format!("/proc/{}/root", holder.id()))
            .join(mountpoint.strip_prefix("/").expect("temp dirs are absolute"));
        TinyFs { holder, root, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.root
    }

    /// Bytes free for an unprivileged writer, as qlogd's own check sees them.
    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.root.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs is plain data; the path is a valid C string.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0, "statvfs");
        stat.f_bavail * stat.f_frsize
    }

    /// Writes a file until the filesystem is full; returns its size.
    fn fill(&self, name: &str) -> u64 {
        let mut file = File::create(self.root.join(name)).expect("the tmpfs is writable");
        let mut written = 0u64;
        for chunk in [1 << 20, 4096, 1] {
            let block = vec![0x5au8; chunk];
            loop {
                match file.write(&block) {
                    Ok(n) if n > 0 => written += n as u64,
                    _ => break,
                }
            }
        }
        written
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        kill_and_reap(&mut self.holder);
    }
}

/// qlogd's user plus system CPU time so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("qlogd runs");
    let after_comm = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the comm.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Waits, polling qlogd's log, until `ready` holds for it.
fn wait_for_log(sink: &RunningSink, what: &str, mut ready: impl FnMut(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = std::fs::read_to_string(sink.log_path()).unwrap_or_default();
        if ready(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "qlogd's log did not show {what}:\n{}", sink.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn line(n: u64) -> String {
    format!("sd-app line {n}\n")
}

fn event(n: u64) -> Event {
    let mut event = Event::new();
    event.push(MESSAGE, format!("raw event {n}"));
    event
}

#[test]
fn a_full_disk_holds_acks_keeps_queries_and_resumes_when_space_returns() {
    if !JournalNamespace::require_root() {
        return;
    }
    let fs = TinyFs::mount(32 << 20);
    let mut sink = RunningSink::start(SinkOptions {
        state_dir: Some(fs.path().join("state")),
        vm_quota: Some(1 << 30),
        log_level: Some("info,qlog_sink=debug".to_owned()),
        ..SinkOptions::default()
    });
    let mut agent = RunningAgent::spawn(
        AgentOptions::new(&sink, "sd-app")
            .args(["--source", "stdin", "--input-format", "lines"])
            .fast_backoff(),
    );
    let first: String = (1..=100).map(line).collect();
    agent.write_stdin(first.as_bytes());
    let app = Filter { matches: vec![("_QLOG_VM".into(), "sd-app".into())], ..Filter::default() };
    wait_for_records(sink.query_socket(), &app, 100, IO_TIMEOUT);
    let (mut raw, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-raw", "raw");
    assert_eq!(welcome.resume.last_seq, 0);

    // Full: nothing is left for qlogd.
    let ballast = fs.fill("ballast");
    assert!(fs.free() < 64 * 1024, "the ballast left {} bytes", fs.free());
    eprintln!("ballast of {} KiB fills the tmpfs", ballast >> 10);

    // First a commit that only touches the index: a VM's malformed frame is counted in
    // its accounting. On a full disk sled must not even try it (it would fail for good).
    let (mut bad, _) = RawIngest::handshake(sink.ingest_socket(), "sd-bad", "bad");
    bad.send_frame(FrameType::Event, b"\xff").unwrap();
    bad.expect_error(IO_TIMEOUT);
    wait_for_log(&sink, "the first failed commit", |log| count(log, COMMIT_FAILED) >= 1);

    // 2,000 more lines for the agent, on a thread: it may stop reading while nothing is
    // acked. And 10 events on the raw session, whose acks we read ourselves.
    let mut stdin = File::from(agent.stdin().as_fd().try_clone_to_owned().unwrap());
    let feeder = std::thread::spawn(move || {
        let more: String = (101..=2100).map(line).collect();
        stdin.write_all(more.as_bytes()).expect("the agent reads its stdin");
    });
    for n in 1..=10 {
        raw.send_event(n, &event(n)).expect("qlogd reads the raw session");
    }

    // One ERROR, then retries with backoff at DEBUG.
    let cpu_before = cpu_ticks(sink.pid());
    let full_since = Instant::now();
    let log = wait_for_log(&sink, "three commit retries", |log| count(log, COMMIT_RETRY) >= 3);
    assert!(sink.is_running(), "qlogd exited on a full disk:\n{}", sink.log_tail());
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "one ERROR while the disk is full: {errors:#?}");
    assert!(errors[0].contains(COMMIT_FAILED), "{}", errors[0]);
    assert!(errors[0].contains("no room for a commit"), "{}", errors[0]);
    eprintln!("qlogd on a full disk logs:\n{}", errors[0]);

    // Nothing acknowledged that is not stored, and queries are answered meanwhile.
    loop {
        match raw.read_frame(Duration::from_millis(200)) {
            Err(e) if e.is_timeout() => break,
            Ok(Some(frame)) if frame.ty == FrameType::Ack => {
                let acked = qlog_rpc::message::decode_u64(frame.ty, &frame.payload).unwrap();
                assert_eq!(acked, 0, "qlogd acked seq {acked} on a full disk");
            }
            other => panic!("unexpected on the raw session while full: {other:?}"),
        }
    }
    let stored = query_events(sink.query_socket(), &EventsQuery::default()).expect("answers");
    assert_eq!(stored.len(), 100, "only what was stored before the disk filled");
    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    assert!(table.vms.iter().any(|v| v.vm == "sd-app" && v.events_stored == 100), "{table:?}");

    // Not spinning: retries back off, so qlogd uses a small part of one core.
    let wall = full_since.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (cpu_ticks(sink.pid()) - cpu_before) as f64 / ticks_per_sec;
    eprintln!("while full: {cpu:.2} s of CPU in {wall:.1} s");
    assert!(cpu < wall * 0.5, "qlogd used {cpu:.2} s of CPU in {wall:.1} s on a full disk");

    // Space returns: qlogd resumes on its own, and every event is acked and stored once.
    std::fs::remove_file(fs.path().join("ballast")).unwrap();
    let log = wait_for_log(&sink, "recovery", |log| count(log, COMMIT_RECOVERED) >= 1);
    let recovered = log.lines().find(|l| l.contains(COMMIT_RECOVERED)).expect("waited for");
    eprintln!("and once space returns:\n{recovered}");
    assert_eq!(raw.expect_ack(10, DEADLINE), 10);
    raw.send_end(10).unwrap();
    feeder.join().expect("every line was written");
    agent.close_stdin();
    let status = agent.wait(DEADLINE);
    assert!(status.success(), "every line acked: {status}\n{}", agent.log_tail());

    let check = |sink: &RunningSink| {
        let query = EventsQuery { vms: vec!["sd-app".into()], ..EventsQuery::default() };
        let records = query_events(sink.query_socket(), &query).expect("qlogd answers");
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=2100).collect::<Vec<_>>(), "every line once");
        for r in &records {
            assert_eq!(r.kind, RecordKind::Event);
            assert_eq!(r.event.get(MESSAGE), Some(line(r.seq).trim_end().as_bytes()));
        }
        let query = EventsQuery { vms: vec!["sd-raw".into()], ..EventsQuery::default() };
        let records = query_events(sink.query_socket(), &query).expect("qlogd answers");
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    };
    check(&sink);

    // And a qlogd started over the store finds nothing acknowledged to repair.
    sink.restart();
    let log = std::fs::read_to_string(sink.log_path()).unwrap();
    let opened = log.lines().rfind(|l| l.contains("store opened")).unwrap();
    assert!(opened.contains("cut only what was never acknowledged"), "{opened}");
    check(&sink);
}

#[test]
fn quotas_that_fit_the_disk_keep_a_flood_from_filling_it() {
    if !JournalNamespace::require_root() {
        return;
    }
    // Three VMs of 16 MiB each on 64 MiB, each sending 40 MiB of incompressible events.
    let fs = TinyFs::mount(64 << 20);
    let sink = RunningSink::start(SinkOptions {
        state_dir: Some(fs.path().join("state")),
        vm_quota: Some(16 << 20),
        ..SinkOptions::default()
    });
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut lowest_free = u64::MAX;
    for round in 0..40 {
        for vm in ["sd-a", "sd-b", "sd-c"] {
            let events: Vec<Event> = (0..64)
                .map(|i| {
                    let mut payload = vec![0u8; 16 * 1024];
                    for chunk in payload.chunks_mut(8) {
                        chunk.copy_from_slice(&random().to_le_bytes());
                    }
                    let mut event = Event::new();
                    event.push(MESSAGE, format!("{vm} round {round} event {i}"));
                    event.push("PAYLOAD", payload);
                    event
                })
                .collect();
            // Every session ends with everything acked: nothing is refused for space.
            ingest_events(&sink, vm, "flood", &events).expect("qlogd stores the flood");
            lowest_free = lowest_free.min(fs.free());
        }
    }
    eprintln!("lowest free space during a 120 MiB flood on 64 MiB: {} KiB", lowest_free >> 10);

    let log = std::fs::read_to_string(sink.log_path()).unwrap();
    assert_eq!(count(&log, "commit failed"), 0, "{}", sink.log_tail());
    assert!(count(&log, "over quota") > 0, "the quota trimmed the flood: {}", sink.log_tail());
    let table = query_vms(sink.query_socket()).expect("qlogd answers");
    for vm in ["sd-a", "sd-b", "sd-c"] {
        let info = table.vms.iter().find(|i| i.vm == vm).expect("every flooder is listed");
        assert!(info.events_dropped_quota > 0, "{info:?}");
    }
}

#[test]
fn qlogd_restarted_on_a_full_disk_serves_queries_and_stores_once_space_returns() {
    if !JournalNamespace::require_root() {
        return;
    }
    let fs = TinyFs::mount(24 << 20);
    let mut sink = RunningSink::start(SinkOptions {
        state_dir: Some(fs.path().join("state")),
        ..SinkOptions::default()
    });
    let first: Vec<Event> = (1..=100).map(event).collect();
    assert_eq!(ingest_events(&sink, "sd-app", "raw", &first).unwrap(), 100);

    // A crash, or a reboot, while the disk is full: qlogd must come back for queries.
    fs.fill("ballast");
    sink.kill9();
    sink.restart();
    let stored = query_events(sink.query_socket(), &EventsQuery::default()).expect("answers");
    assert_eq!(stored.len(), 100);

    // New events wait for space, then are stored once.
    let ingest_socket = sink.ingest_socket().to_owned();
    let sender = std::thread::spawn(move || {
        let more: Vec<Event> = (101..=200).map(event).collect();
        qlog_tests::ingest::ingest_events_at(&ingest_socket, "sd-app", "raw", &more)
    });
    wait_for_log(&sink, "the failed commit", |log| count(log, COMMIT_FAILED) >= 1);
    std::fs::remove_file(fs.path().join("ballast")).unwrap();
    assert_eq!(sender.join().unwrap().expect("stored once space returned"), 200);
    let stored = query_events(sink.query_socket(), &EventsQuery::default()).expect("answers");
    assert_eq!(stored.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
}
