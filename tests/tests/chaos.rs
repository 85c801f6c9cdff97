//! Chaos: eight VMs stream while qlogd, agents, qrexec clients and journalctl are
//! `kill -9`ed at random points, cycle after cycle, and after every cycle the store
//! holds every acknowledged event exactly once, opened without repairing acknowledged
//! data, and qlogd served again quickly after each restart.
//!
//! Seven VMs run `qlog-agent --source stdin` fed by the test; one (as root) reads a real
//! journald in a private mount namespace, so its journalctl is killed too. Every cycle
//! draws a victim and a kill point from a seeded RNG (the seed is printed; set
//! `QLOG_CHAOS_SEED` to replay it), writes a batch of lines to every VM, waits until
//! qlogd has committed the drawn number of new events, kills, and brings the path back.
//! Kill points are event counts seen on qlogd's live feed, never sleeps.
//!
//! What "acknowledged" means here. Acks are qlogd's durable watermark: the committer
//! raises them and publishes to the live feed only after the commit is flushed, so every
//! record the test saw on the feed before a kill was durable, and everything acked is
//! below the stream's resume point. The checks after each cycle, per VM:
//!
//! - sequence numbers are 1, 2, 3, ... with no gap record and nothing twice: no hole
//!   below the resume point, no duplicate;
//! - the VM's highest stored seq is at least the highest seq seen before the kill: what
//!   was durable (so everything acked) survived;
//! - stdin VMs: each agent incarnation's lines appear in order without a skip, and a
//!   later incarnation only starts after the earlier one's last stored line. A killed
//!   stdin agent loses what it held unacknowledged (there is nowhere else it lives), so
//!   its stored lines are a prefix of what it was fed; every other kind of kill loses
//!   nothing. The journal VM loses nothing whatever is killed: journald is its buffer;
//! - no surviving agent logs that qlogd resumed below what it had acknowledged
//!   (`Resumed::SinkBehind`, the agent's own check of acked-but-lost) or above what it
//!   sent (`SinkAhead`, a duplicate numbering).
//!
//! "Opens without repair" means: every restart logs `store opened; cut only what was
//! never acknowledged`, that is, no indexed byte was missing. Cutting unindexed segment
//! tails and removing unreferenced segment files is allowed and counted: a `kill -9`
//! between a segment write and its index flush leaves exactly that, and none of it was
//! ever acknowledged.
//!
//! At the end every agent stops cleanly (exit 0 means every event it read was acked) and
//! the whole store is checked once more.
//!
//! The short version (default, `cargo test`) runs 50 cycles over a store pre-filled with
//! 16 MiB. The long version: `QLOG_CHAOS_CYCLES=500 QLOG_CHAOS_STORE_GIB=1`, which
//! pre-fills about 1 GiB of incompressible events before the chaos starts. Every restart's
//! time from spawn to a first answered query is printed; `QLOG_CHAOS_MAX_RESTART_MS`
//! (by default 10000, a hang detector) bounds it. Those times are a performance figure,
//! so measure them with `cargo test --release`: a debug build opens the store about ten
//! times slower.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qlog_rpc::fields::{MESSAGE, SYSLOG_IDENTIFIER};
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind};
use qlog_rpc::{ErrorCode, Event};
use qlog_tests::agent::{children_of, kill9_pid};
use qlog_tests::query::{FollowItem, QueryError};
use qlog_tests::{
    ingest_events, query_events, query_vms, AgentOptions, Follower, JournalNamespace, RunningAgent,
    RunningSink, SinkOptions, IO_TIMEOUT,
};

/// The journal VM's entries carry this identifier and a `QLOG_TEST_INDEX`.
const IDENTIFIER: &str = "qlog-chaos";
const JOURNAL_VM: &str = "sd-journal";
/// Lines written to each VM per cycle are drawn from this range.
const LINES_PER_CYCLE: std::ops::Range<u64> = 40..240;
/// A generous bound on a hang, for debug builds on a shared two-core machine.
const STALL_TIMEOUT: Duration = Duration::from_secs(90);
/// Bytes of each pre-fill event: random, so compression cannot shrink the store.
const PREFILL_EVENT_BYTES: usize = 32 * 1024;
/// The two agent complaints that mean acknowledged data went missing or was doubled.
const AGENT_ALARMS: [&str; 2] = ["below seq", "past this agent's last seq"];
/// What qlogd logs on open when no indexed byte was missing.
const OPENED_INTACT: &str = "store opened; cut only what was never acknowledged";

/// SplitMix64: small, seedable, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, r: std::ops::Range<u64>) -> u64 {
        r.start + self.below(r.end - r.start)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Sink,
    /// qlogd killed, restarted, and killed again at once, while agents reconnect.
    SinkTwice,
    Agent(usize),
    QrexecClient(usize),
    Journalctl,
    /// qlogd and one agent in the same instant.
    SinkAndAgent(usize),
}

/// One simulated VM: its agent, and what the checker knows of its stream so far.
struct Vm {
    name: String,
    journal: bool,
    agent: RunningAgent,
    /// Which agent this is (stdin VMs number their lines per incarnation).
    incarnation: u64,
    /// Lines fed to the current incarnation (stdin) or entries logged (journal).
    fed: u64,
    /// Highest seq checked so far, and its receive time.
    checked_seq: u64,
    checked_usec: u64,
    /// Stdin: the incarnation and line number of the last line checked.
    last_line: Option<(u64, u64)>,
    /// Journal: the next `QLOG_TEST_INDEX` expected.
    next_index: u64,
    /// Highest seq seen on the live feed before the latest kill: durable then.
    durable_seen: u64,
}

struct Chaos {
    rng: Rng,
    sink: RunningSink,
    journal: Option<JournalNamespace>,
    vms: Vec<Vm>,
    restarts_ms: Vec<u128>,
    kills: BTreeMap<&'static str, u64>,
    /// Kills that found no process to kill (a qrexec client between calls, say).
    misses: u64,
    cut_bytes: u64,
    removed_segments: u64,
    /// How long each open's repair scan took, as qlogd logged it.
    open_ms: Vec<u64>,
    max_restart_ms: u128,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is past 1970").as_micros() as u64
}

fn stdin_agent(sink: &RunningSink, vm: &str) -> RunningAgent {
    let options =
        AgentOptions::new(sink, vm).args(["--source", "stdin", "--input-format", "lines"]);
    RunningAgent::spawn(options.fast_backoff())
}

fn journal_agent(sink: &RunningSink, journal: &JournalNamespace) -> RunningAgent {
    let options = AgentOptions::new(sink, JOURNAL_VM).journal(journal).fast_backoff();
    RunningAgent::spawn(options)
}

fn line(vm: &str, incarnation: u64, n: u64) -> String {
    format!("{vm} inc {incarnation} line {n}\n")
}

/// Parses a line written by [`line`] back into (incarnation, line number).
fn parse_line(message: &str) -> Option<(u64, u64)> {
    let mut words = message.split(' ').skip(1);
    let inc = words.next().filter(|w| *w == "inc").and(words.next())?.parse().ok()?;
    let n = words.next().filter(|w| *w == "line").and(words.next())?.parse().ok()?;
    Some((inc, n))
}

/// Fills the store with about `bytes` of incompressible events under VMs of their own,
/// so restarts are timed on a store of that size. Events go in through the harness's
/// well-behaved ingest session, which is much faster than an agent.
fn prefill(sink: &RunningSink, bytes: u64, rng: &mut Rng) {
    let per_vm = 256 << 20;
    let started = Instant::now();
    let mut left = bytes;
    let mut vm = 0;
    while left > 0 {
        let vm_bytes = left.min(per_vm);
        left -= vm_bytes;
        let name = format!("bulk-{vm}");
        vm += 1;
        let mut sent = 0u64;
        while sent < vm_bytes {
            let events: Vec<Event> = (0..128)
                .map(|_| {
                    let mut payload = vec![0u8; PREFILL_EVENT_BYTES];
                    for chunk in payload.chunks_mut(8) {
                        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
                    }
                    let mut event = Event::new();
                    event.push(MESSAGE, "bulk");
                    event.push("BULK", payload);
                    event
                })
                .collect();
            ingest_events(sink, &name, "bulk", &events).expect("qlogd stores the pre-fill");
            sent += (events.len() * PREFILL_EVENT_BYTES) as u64;
        }
    }
    eprintln!(
        "pre-filled {} MiB in {:.1} s; store is {} MiB on disk",
        bytes >> 20,
        started.elapsed().as_secs_f64(),
        dir_size(&sink.state_dir().join("segments")) >> 20
    );
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Chaos {
    fn start(seed: u64, prefill_bytes: u64) -> Chaos {
        let mut rng = Rng(seed);
        // Room for the pre-fill VMs on top of the chaos VMs, whatever the default quota.
        let sink = RunningSink::start(SinkOptions {
            vm_quota: Some(4 << 30),
            log_level: Some("info".to_owned()),
            ..SinkOptions::default()
        });
        if prefill_bytes > 0 {
            prefill(&sink, prefill_bytes, &mut rng);
        }
        let journal = JournalNamespace::require_root().then(JournalNamespace::start);
        let mut vms = Vec::new();
        let stdin_vms = if journal.is_some() { 7 } else { 8 };
        for i in 0..stdin_vms {
            let name = format!("sd-vm{i}");
            vms.push(Vm::new(&name, false, stdin_agent(&sink, &name)));
        }
        if let Some(journal) = &journal {
            vms.push(Vm::new(JOURNAL_VM, true, journal_agent(&sink, journal)));
        }
        Chaos {
            rng,
            sink,
            journal,
            vms,
            restarts_ms: Vec::new(),
            kills: BTreeMap::new(),
            misses: 0,
            cut_bytes: 0,
            removed_segments: 0,
            open_ms: Vec::new(),
            max_restart_ms: u128::from(env_u64("QLOG_CHAOS_MAX_RESTART_MS").unwrap_or(10_000)),
        }
    }

    fn draw_victim(&mut self) -> Victim {
        let vm = self.rng.below(self.vms.len() as u64) as usize;
        match self.rng.below(12) {
            0..=2 => Victim::Sink,
            3 => Victim::SinkTwice,
            4..=5 => Victim::Agent(vm),
            6..=8 => Victim::QrexecClient(vm),
            9..=10 if self.journal.is_some() => Victim::Journalctl,
            9..=10 => Victim::QrexecClient(vm),
            _ => Victim::SinkAndAgent(vm),
        }
    }

    fn cycle(&mut self, cycle: u64) {
        let victim = self.draw_victim();
        let lines = self.rng.range(LINES_PER_CYCLE);
        // Which VM's progress triggers the kill, and after how many new records.
        let (watched, kill_after) = match victim {
            Victim::Agent(vm) | Victim::QrexecClient(vm) | Victim::SinkAndAgent(vm) => {
                (Some(vm), 1 + self.rng.below(lines))
            }
            Victim::Journalctl => {
                (self.vms.iter().position(|v| v.journal), 1 + self.rng.below(lines))
            }
            Victim::Sink | Victim::SinkTwice => {
                (None, 1 + self.rng.below(lines * self.vms.len() as u64))
            }
        };
        eprintln!("cycle {cycle}: {victim:?} after {kill_after} new records, {lines} lines per VM");

        // Subscribed before anything new is written, so every new commit is seen.
        let since = now_usec();
        let filter = Filter { since_usec: Some(since), ..Filter::default() };
        let mut follower =
            Follower::start(self.sink.query_socket(), EventsQuery { filter, ..Default::default() })
                .expect("qlogd accepts a follow query");
        follower.wait_done(IO_TIMEOUT);

        // The journal VM's entries go to journald at once; the stdin VMs are fed on
        // threads, since a write blocks while the agent's window is full.
        if let Some(journal) = &self.journal {
            let vm = self.vms.iter_mut().find(|v| v.journal).expect("the journal VM exists");
            for i in vm.fed..vm.fed + lines {
                let message = format!("chaos entry {i}");
                journal.send(&[
                    (SYSLOG_IDENTIFIER, IDENTIFIER.as_bytes()),
                    (MESSAGE, message.as_bytes()),
                    ("QLOG_TEST_INDEX", i.to_string().as_bytes()),
                ]);
            }
            vm.fed += lines;
        }
        let feeds: Vec<(File, String)> = self
            .vms
            .iter_mut()
            .filter(|vm| !vm.journal)
            .map(|vm| {
                let text: String =
                    (vm.fed..vm.fed + lines).map(|n| line(&vm.name, vm.incarnation, n)).collect();
                vm.fed += lines;
                // A second handle on the agent's stdin, so the agent stays ours to kill.
                let fd = vm.agent.stdin().as_fd().try_clone_to_owned().expect("dup stdin");
                (File::from(fd), text)
            })
            .collect();

        std::thread::scope(|scope| {
            for (mut stdin, text) in feeds {
                // A killed agent breaks its pipe; what it did not take is lost with it.
                scope.spawn(move || {
                    let _ = stdin.write_all(text.as_bytes());
                });
            }
            self.wait_for_kill_point(&mut follower, watched, kill_after);
            drop(follower);
            self.kill(victim);
        });

        self.replace_killed_agents(victim);
        self.check_all(false);
    }

    /// Waits until `kill_after` new records of `watched` (or of any VM) are committed, and
    /// remembers the highest seq seen per VM: durable, so it must survive the kill.
    fn wait_for_kill_point(
        &mut self,
        follower: &mut Follower,
        watched: Option<usize>,
        kill_after: u64,
    ) {
        let deadline = Instant::now() + STALL_TIMEOUT;
        let mut seen = 0u64;
        while seen < kill_after {
            let left = deadline.saturating_duration_since(Instant::now());
            let record = match follower.recv(left) {
                Some(FollowItem::Record(record)) => record,
                Some(FollowItem::Lagged(lagged)) => {
                    // Missed records still count as progress, if not as seen seqs.
                    seen += lagged.missed;
                    continue;
                }
                Some(FollowItem::Done(_)) => continue,
                Some(ended) => panic!("the follow ended: {ended:?}{}", self.sink.log_tail()),
                None => panic!(
                    "only {seen} of {kill_after} new records within {STALL_TIMEOUT:?}\n{}",
                    self.sink.log_tail()
                ),
            };
            let Some(i) = self.vms.iter().position(|v| v.name == record.vm) else { continue };
            let vm = &mut self.vms[i];
            vm.durable_seen = vm.durable_seen.max(record.seq);
            if watched.is_none_or(|w| w == i) {
                seen += 1;
            }
        }
    }

    fn kill(&mut self, victim: Victim) {
        let name = match victim {
            Victim::Sink => {
                self.sink.kill9();
                self.restart_sink();
                "qlogd"
            }
            Victim::SinkTwice => {
                self.sink.kill9();
                self.restart_sink();
                self.sink.kill9();
                self.restart_sink();
                "qlogd twice"
            }
            // Killed and reaped, so it is certainly gone when the cycle checks for the dead.
            Victim::Agent(vm) => {
                self.vms[vm].agent.kill9();
                "agent"
            }
            Victim::SinkAndAgent(vm) => {
                self.vms[vm].agent.kill9();
                self.sink.kill9();
                self.restart_sink();
                "qlogd and agent"
            }
            Victim::QrexecClient(vm) => {
                let agent = self.vms[vm].agent.pid();
                let client = children_of(agent).into_iter().find(|(_, comm)| comm != "journalctl");
                match client {
                    Some((pid, _)) => kill9_pid(pid),
                    None => self.misses += 1,
                }
                "qrexec client"
            }
            Victim::Journalctl => {
                let vm = self.vms.iter().find(|v| v.journal).expect("the journal VM exists");
                match vm.agent.journalctl_pid() {
                    Some(pid) => kill9_pid(pid),
                    None => self.misses += 1,
                }
                "journalctl"
            }
        };
        *self.kills.entry(name).or_default() += 1;
    }

    /// Restarts qlogd, timing spawn to a first answered query, and checks what it
    /// repaired on open.
    fn restart_sink(&mut self) {
        let log_before = std::fs::metadata(self.sink.log_path()).map_or(0, |m| m.len());
        let started = Instant::now();
        self.sink.restart();
        query_vms(self.sink.query_socket()).expect("a restarted qlogd answers");
        let elapsed = started.elapsed().as_millis();
        self.restarts_ms.push(elapsed);
        assert!(
            elapsed <= self.max_restart_ms,
            "qlogd took {elapsed} ms to serve again (bound {} ms)",
            self.max_restart_ms
        );

        let log = std::fs::read(self.sink.log_path()).expect("qlogd's log is readable");
        let this_start = String::from_utf8_lossy(&log[log_before as usize..]).into_owned();
        let opened = this_start
            .lines()
            .find(|l| l.contains("store opened"))
            .unwrap_or_else(|| panic!("qlogd logged no store opened line:\n{this_start}"));
        assert!(opened.contains(OPENED_INTACT), "qlogd repaired acknowledged data: {opened}");
        self.cut_bytes += field(opened, "cut_bytes");
        self.removed_segments += field(opened, "removed_segments");
        self.open_ms.push(field(opened, "elapsed_ms"));
    }

    /// Starts a new agent for every VM whose agent is dead, after checking its log.
    fn replace_killed_agents(&mut self, victim: Victim) {
        let killed = match victim {
            Victim::Agent(vm) | Victim::SinkAndAgent(vm) => Some(vm),
            _ => None,
        };
        for i in 0..self.vms.len() {
            let vm = &mut self.vms[i];
            if !vm.agent.is_running() {
                if Some(i) != killed {
                    let status = vm.agent.wait(IO_TIMEOUT);
                    let log = std::fs::read_to_string(vm.agent.log_path()).unwrap_or_default();
                    panic!("the agent of {} exited by itself: {status}\n{log}", vm.name);
                }
                check_agent_log(&vm.name, &vm.agent);
                vm.agent.kill9();
                vm.agent = if vm.journal {
                    journal_agent(&self.sink, self.journal.as_ref().expect("journal VM"))
                } else {
                    stdin_agent(&self.sink, &vm.name)
                };
                vm.incarnation += 1;
                if !vm.journal {
                    vm.fed = 0;
                }
            }
        }
    }

    /// Checks every VM's new records. With `finished`, every VM must also hold
    /// everything it was fed.
    fn check_all(&mut self, finished: bool) {
        for i in 0..self.vms.len() {
            let vm = &self.vms[i];
            let filter = Filter { since_usec: Some(vm.checked_usec), ..Filter::default() };
            let query = EventsQuery { vms: vec![vm.name.clone()], filter, ..Default::default() };
            let records = vm_records(&self.sink, &query);
            self.vms[i].check(&records);
            let vm = &self.vms[i];
            assert!(
                vm.checked_seq >= vm.durable_seen,
                "{}: seq {} was durable before the kill, but the store ends at {}",
                vm.name,
                vm.durable_seen,
                vm.checked_seq
            );
            if finished {
                let expected = if vm.journal {
                    vm.next_index
                } else {
                    vm.last_line.map_or(0, |(inc, n)| if inc == vm.incarnation { n + 1 } else { 0 })
                };
                assert_eq!(expected, vm.fed, "{}: not everything fed was stored", vm.name);
            }
        }
    }

    fn finish(&mut self) {
        // Every agent drains: stdin agents exit 0 once everything they read is acked.
        let (journal_vms, stdin_vms): (Vec<&mut Vm>, Vec<&mut Vm>) =
            self.vms.iter_mut().partition(|v| v.journal);
        for vm in stdin_vms {
            vm.agent.close_stdin();
            let status = vm.agent.wait(STALL_TIMEOUT);
            assert!(status.success(), "agent of {}: {status}\n{}", vm.name, vm.agent.log_tail());
            check_agent_log(&vm.name, &vm.agent);
        }
        for vm in journal_vms {
            let filter = Filter { identifiers: vec![IDENTIFIER.to_owned()], ..Filter::default() };
            qlog_tests::agent::wait_for_records(
                self.sink.query_socket(),
                &filter,
                vm.fed as usize,
                STALL_TIMEOUT,
            );
            let (status, _) = vm.agent.terminate(IO_TIMEOUT);
            assert!(status.success(), "agent of {}: {status}\n{}", vm.name, vm.agent.log_tail());
            check_agent_log(&vm.name, &vm.agent);
        }
        self.check_all(true);

        // And the store from scratch, as a fresh qlogd over it sees it.
        self.restart_sink();
        for vm in &mut self.vms {
            let query = EventsQuery { vms: vec![vm.name.clone()], ..Default::default() };
            let records = vm_records(&self.sink, &query);
            let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (1..=vm.checked_seq).collect::<Vec<_>>(), "{}", vm.name);
        }
        let table = query_vms(self.sink.query_socket()).expect("qlogd answers");
        for vm in &self.vms {
            let info = table.vms.iter().find(|i| i.vm == vm.name).expect("every VM is listed");
            assert_eq!(info.events_stored, vm.checked_seq, "{info:?}");
            // The resume point is the last stored seq: nothing above it, no hole below.
            let resume: Vec<u64> = info.streams.iter().map(|s| s.last_seq).collect();
            assert_eq!(resume, vec![vm.checked_seq], "{info:?}");
        }
    }
}

impl Vm {
    fn new(name: &str, journal: bool, agent: RunningAgent) -> Vm {
        Vm {
            name: name.to_owned(),
            journal,
            agent,
            incarnation: 0,
            fed: 0,
            checked_seq: 0,
            checked_usec: 0,
            last_line: None,
            next_index: 0,
            durable_seen: 0,
        }
    }

    /// Checks records received at or after `checked_usec`, in store order.
    fn check(&mut self, records: &[Record]) {
        for record in records {
            if record.seq <= self.checked_seq {
                continue;
            }
            let name = &self.name;
            assert_eq!(record.kind, RecordKind::Event, "{name} seq {}: {:?}", record.seq, record);
            assert_eq!(record.seq, self.checked_seq + 1, "{name}: seqs skip or repeat");
            self.checked_seq = record.seq;
            self.checked_usec = record.received_usec;
            if self.journal {
                if record.event.get_str(SYSLOG_IDENTIFIER) != Some(IDENTIFIER) {
                    continue;
                }
                let index: u64 = record
                    .event
                    .get_str("QLOG_TEST_INDEX")
                    .and_then(|i| i.parse().ok())
                    .expect("our entries carry an index");
                assert_eq!(index, self.next_index, "{name}: entries skip or repeat");
                self.next_index += 1;
                continue;
            }
            let message = record.event.get_str(MESSAGE).unwrap_or_default();
            let (inc, n) = parse_line(message)
                .unwrap_or_else(|| panic!("{name} seq {}: not our line: {message:?}", record.seq));
            match self.last_line {
                // The same agent: the next line, nothing skipped, nothing twice.
                Some((last_inc, last_n)) if inc == last_inc => {
                    assert_eq!(n, last_n + 1, "{name}: lines of agent {inc} skip or repeat")
                }
                // A new agent: an earlier one never comes back, and the new one starts at
                // its first line. (The earlier one lost only what it held unacked.)
                Some((last_inc, _)) => {
                    assert!(inc > last_inc, "{name}: agent {last_inc}'s lines after agent {inc}'s");
                    assert_eq!(n, 0, "{name}: agent {inc} starts at line {n}")
                }
                None => assert_eq!(n, 0, "{name}: the first line is {n}"),
            }
            self.last_line = Some((inc, n));
        }
    }
}

/// The answer to a query of one VM; none yet if qlogd has never heard of it (an agent
/// that has not connected so far).
fn vm_records(sink: &RunningSink, query: &EventsQuery) -> Vec<Record> {
    match query_events(sink.query_socket(), query) {
        Ok(records) => records,
        Err(QueryError::Refused(e)) if e.code == ErrorCode::UnknownVm => Vec::new(),
        Err(e) => panic!("qlogd does not answer a query of {:?}: {e}", query.vms),
    }
}

fn check_agent_log(vm: &str, agent: &RunningAgent) {
    let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    for alarm in AGENT_ALARMS {
        assert!(!log.contains(alarm), "the agent of {vm} says {alarm:?}:\n{log}");
    }
}

/// The number after `name=` in a tracing line, or 0.
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn every_acked_event_survives_random_kills_exactly_once() {
    let seed =
        env_u64("QLOG_CHAOS_SEED").unwrap_or_else(|| now_usec() ^ u64::from(std::process::id()));
    let cycles = env_u64("QLOG_CHAOS_CYCLES").unwrap_or(50);
    let prefill_bytes = env_u64("QLOG_CHAOS_STORE_GIB").map_or(16 << 20, |gib| gib << 30);
    eprintln!("chaos: seed {seed} (replay with QLOG_CHAOS_SEED={seed}), {cycles} cycles");

    let started = Instant::now();
    let mut chaos = Chaos::start(seed, prefill_bytes);
    // The first restart, on the pre-filled store alone.
    chaos.restart_sink();
    for cycle in 0..cycles {
        chaos.cycle(cycle);
    }
    chaos.finish();

    let mut restarts = chaos.restarts_ms.clone();
    restarts.sort_unstable();
    let median = restarts[restarts.len() / 2];
    let max = *restarts.last().expect("qlogd was restarted");
    eprintln!(
        "chaos: seed {seed}: {cycles} cycles in {:.1} s, kills {:?} ({} found nothing to \
         kill); {} qlogd restarts on a {} MiB store: median {median} ms, max {max} ms to \
         serving (the repair scan itself at most {} ms); open cut {} unacked bytes and \
         removed {} unreferenced segments; {} events checked",
        started.elapsed().as_secs_f64(),
        chaos.kills,
        chaos.misses,
        restarts.len(),
        dir_size(&chaos.sink.state_dir().join("segments")) >> 20,
        chaos.open_ms.iter().max().copied().unwrap_or(0),
        chaos.cut_bytes,
        chaos.removed_segments,
        chaos.vms.iter().map(|v| v.checked_seq).sum::<u64>(),
    );
}
