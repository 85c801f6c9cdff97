//! qlogd killed with SIGKILL in the middle of ingest: the agents reconnect to the
//! restarted qlogd, resend what was not acknowledged, and every event ends up stored
//! exactly once; and a second qlogd cannot open a store that a running one holds.
//!
//! The kills are placed by observation, not by the clock: after each start the test
//! follows the store until qlogd has committed some events of every agent, then kills
//! it while the agents still have input left to send (their stdin is fed one phase at a
//! time, so they cannot have finished), and kills the restarted qlogd once more straight
//! away, while the agents are reconnecting.

use std::io::{BufWriter, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qlog_rpc::fields;
use qlog_rpc::query::{EventsQuery, RecordKind};
use qlog_tests::process::{die_with_parent_thread, wait_timeout};
use qlog_tests::{
    bin_path, ingest_events, query_events, query_vms, AgentOptions, Follower, RunningAgent,
    RunningSink, SinkOptions, IO_TIMEOUT,
};

const VMS: [&str; 3] = ["sd-app", "sd-proxy", "sd-viewer"];
const KILLS: u64 = 5;
/// Lines each agent reads per phase; there is one phase before each kill and one after
/// the last.
const LINES_PER_PHASE: u64 = 3_000;
/// Records of each VM qlogd must have committed since it (re)started before it is
/// killed, so that every agent is mid-stream at every kill.
const PROGRESS_BEFORE_KILL: usize = 200;
/// A generous bound on a hang, for debug builds on a shared two-core machine.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

fn line(vm: &str, n: u64) -> String {
    format!("{vm} line {n}\n")
}

fn feed(agent: &mut RunningAgent, vm: &str, lines: std::ops::RangeInclusive<u64>) {
    let mut stdin = BufWriter::new(agent.stdin());
    for n in lines {
        stdin.write_all(line(vm, n).as_bytes()).expect("the agent reads its stdin");
    }
    stdin.flush().expect("the agent reads its stdin");
}

/// Waits until `follower` has seen [`PROGRESS_BEFORE_KILL`] new records of every VM.
fn wait_for_progress_of_every_vm(follower: &mut Follower) {
    let deadline = Instant::now() + FINISH_TIMEOUT;
    let mut seen = [0usize; VMS.len()];
    while seen.iter().any(|&n| n < PROGRESS_BEFORE_KILL) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(record) = follower.try_next_record(left) else {
            panic!("no progress within {FINISH_TIMEOUT:?}: new records per VM {seen:?}");
        };
        let vm = VMS.iter().position(|vm| *vm == record.vm).expect("only our VMs send");
        seen[vm] += 1;
    }
}

#[test]
fn agents_finish_exactly_once_across_repeated_sink_kills() {
    let mut sink = RunningSink::start(SinkOptions::default());
    let mut agents: Vec<RunningAgent> = VMS
        .iter()
        .map(|vm| {
            RunningAgent::spawn(AgentOptions::new(&sink, vm).args([
                "--source",
                "stdin",
                "--input-format",
                "lines",
                "--backoff-initial-ms",
                "50",
                "--backoff-max-ms",
                "200",
            ]))
        })
        .collect();

    for phase in 0..=KILLS {
        let lines = phase * LINES_PER_PHASE + 1..=(phase + 1) * LINES_PER_PHASE;
        let kill = phase < KILLS;
        // Subscribed before the phase's input is written, so what it sees was committed
        // by this qlogd, after its start.
        let mut progress = kill.then(|| {
            let mut follower = Follower::start(sink.query_socket(), EventsQuery::default())
                .expect("qlogd accepts a follow query");
            follower.wait_done(IO_TIMEOUT);
            follower
        });
        std::thread::scope(|scope| {
            for (vm, agent) in VMS.iter().zip(agents.iter_mut()) {
                let lines = lines.clone();
                scope.spawn(move || feed(agent, vm, lines));
            }
            // The feeders block while qlogd is down; the restart lets them finish.
            if let Some(follower) = progress.as_mut() {
                wait_for_progress_of_every_vm(follower);
                sink.kill9();
                sink.restart();
                // And once more at once, while the agents are reconnecting: a crash in
                // the middle of a handshake must not strand an agent either.
                sink.kill9();
                sink.restart();
            }
        });
    }

    // An agent exits 0 only once every event it read has been acknowledged.
    let total = (KILLS + 1) * LINES_PER_PHASE;
    for (vm, agent) in VMS.iter().zip(agents.iter_mut()) {
        agent.close_stdin();
        let status = agent.wait(FINISH_TIMEOUT);
        assert!(status.success(), "agent of {vm}: {status}\n{}", agent.log_tail());
        // Each kill cut a live connection, so each agent had to call again.
        let calls = agent.qrexec_calls();
        assert!(calls.len() as u64 > KILLS, "{vm} called only {} times: {calls:?}", calls.len());
    }

    for vm in VMS {
        let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
        let records = query_events(sink.query_socket(), &query).expect("qlogd answers");
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "{vm}: every line once, in order");
        for record in &records {
            // A gap record here would mean a resend skipped a number.
            assert_eq!(record.kind, RecordKind::Event, "{record:?}");
            assert_eq!(record.stream, "stdin");
            let expected = line(vm, record.seq);
            let message = record.event.get(fields::MESSAGE).unwrap_or_default();
            assert_eq!(message, expected.trim_end().as_bytes(), "{vm} seq {}", record.seq);
        }
    }
    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    for info in &table.vms {
        assert_eq!(info.events_stored, total, "{info:?}");
        assert_eq!(info.frames_rejected, 0, "{info:?}");
    }
}

#[test]
fn second_sink_on_the_same_state_dir_fails_at_once_naming_the_holder() {
    let sink = RunningSink::start(SinkOptions::default());
    let mut second = Command::new(bin_path("qlogd"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QLOG_") {
            second.env_remove(&name);
        }
    }
    // Sockets of its own, so the store's lock is the only thing the two share.
    second
        .arg("--state-dir")
        .arg(sink.state_dir())
        .arg("--ingest-socket")
        .arg(sink.dir().join("second-ingest.sock"))
        .arg("--query-socket")
        .arg(sink.dir().join("second-query.sock"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent_thread(&mut second);
    let mut second = second.spawn().expect("qlogd can be spawned");

    let status = wait_timeout(&mut second, IO_TIMEOUT).expect("qlogd can be waited for");
    let Some(status) = status else {
        let _ = second.kill();
        panic!("a second qlogd on a store in use kept running");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("piped"), &mut stderr)
        .expect("stderr is readable");
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("in use by another qlogd"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", sink.pid())), "{stderr}");
    assert!(!sink.dir().join("second-ingest.sock").exists(), "it bound a socket first");

    // The first one is untouched.
    let mut event = qlog_rpc::Event::new();
    event.push(fields::MESSAGE, "still serving");
    assert_eq!(ingest_events(&sink, "sd-app", "journal", &[event]).expect("stored"), 1);
}
