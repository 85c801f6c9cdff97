//! `qlog-footprint`: the agent's footprint and end-to-end latency, each beside a peer.
//!
//! Both run a real systemd-journald in a private mount namespace (so they need root),
//! a real qlogd, and the real agent through the qrexec double, and feed journald at a
//! steady rate through one `systemd-cat` process.
//!
//! - `agent`: the agent's RSS (journalctl's reported apart), CPU per 1,000 events,
//!   bytes written to storage, wake-ups while idle and binary size; the peer is
//!   `journalctl -o export --follow | cat`, the least any journald forwarder must do.
//! - `latency`: journald entry to `qlog tail -f` output, p50/p99/p99.9; the peer is
//!   `journalctl -f` on the same journal, which involves no transport at all.
//!
//! Results go to `bench-results/agent.json` and `bench-results/latency.json`. This is a
//! benchmark, not a test: nothing here asserts a number.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use qlog_tests::agent::{AgentOptions, RunningAgent};
use qlog_tests::journal::JournalNamespace;
use qlog_tests::machine;
use qlog_tests::sink::{RunningSink, SinkOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "agent".into());
    let mut seconds = 30u64;
    let mut rate = 1000u64;
    let mut out = PathBuf::from("bench-results");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().context("--seconds needs a number")?.parse()?,
            "--rate" => rate = args.next().context("--rate needs events per second")?.parse()?,
            "--out" => out = args.next().context("--out needs a directory")?.into(),
            other => bail!("unknown option {other}; usage: qlog-footprint agent|latency [--seconds N] [--rate N] [--out DIR]"),
        }
    }
    if !JournalNamespace::require_root() {
        bail!("qlog-footprint runs a private journald and needs root");
    }
    std::fs::create_dir_all(&out)?;
    match what.as_str() {
        "agent" => agent(seconds, rate, &out),
        "latency" => latency(seconds, rate, &out),
        other => bail!("unknown benchmark {other}; available: agent, latency"),
    }
}

fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Writes `rate` lines a second into journald through one systemd-cat, each carrying its
/// send time, until `stop`.
fn start_writer(
    journal: &JournalNamespace,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Child> {
    let mut cat = journal
        .command("systemd-cat")
        .args(["-t", "qlog-bench"])
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot start systemd-cat")?;
    let mut stdin = cat.stdin.take().expect("stdin is piped");
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // Paced by the schedule, not by sleeps of fixed length, so the rate holds.
            let due = start + Duration::from_micros(n * 1_000_000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if writeln!(stdin, "bench {n} sent={}", now_usec()).is_err() {
                return;
            }
            n += 1;
        }
    });
    Ok(cat)
}

#[derive(Debug, Default, Clone, Copy)]
struct ProcStat {
    cpu_ticks: u64,
    rss_kib: u64,
    write_bytes: u64,
    voluntary_switches: u64,
}

fn proc_stat(pid: u32) -> ProcStat {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let write_bytes = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    ProcStat {
        // utime and stime are the 12th and 13th fields after the name.
        cpu_ticks: ticks(11) + ticks(12),
        rss_kib: field("VmRSS:"),
        write_bytes,
        voluntary_switches: field("voluntary_ctxt_switches:"),
    }
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn agent(seconds: u64, rate: u64, out: &Path) -> anyhow::Result<()> {
    let journal = JournalNamespace::start();
    let sink =
        RunningSink::start(SinkOptions { log_level: Some("warn".into()), ..Default::default() });
    let agent = RunningAgent::spawn(AgentOptions::new(&sink, "bench-vm").journal(&journal));
    // The peer: what any forwarder reading journald at least costs.
    let mut peer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {} -o export --follow --all --boot | cat > /dev/null",
            journal.journalctl_wrapper().display()
        ))
        .spawn()
        .context("cannot start the journalctl | cat peer")?;

    // Warm up, then measure over the window.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = start_writer(&journal, rate, Arc::clone(&stop))?;
    std::thread::sleep(Duration::from_secs(5));
    let Some(journalctl) = agent.journalctl_pid() else {
        bail!(
            "the agent runs no journalctl; its children: {:?}\n{}",
            agent.children(),
            agent.log_tail()
        );
    };
    let peer_pids = qlog_tests::agent::children_of(peer.id());
    let (a0, j0) = (proc_stat(agent.pid()), proc_stat(journalctl));
    let p0: u64 = peer_pids.iter().map(|(p, _)| proc_stat(*p).cpu_ticks).sum::<u64>()
        + proc_stat(peer.id()).cpu_ticks;
    let start = Instant::now();
    let mut max_rss = 0;
    let mut max_jrss = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        max_rss = max_rss.max(proc_stat(agent.pid()).rss_kib);
        max_jrss = max_jrss.max(proc_stat(journalctl).rss_kib);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (a1, j1) = (proc_stat(agent.pid()), proc_stat(journalctl));
    let p1: u64 = peer_pids.iter().map(|(p, _)| proc_stat(*p).cpu_ticks).sum::<u64>()
        + proc_stat(peer.id()).cpu_ticks;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.wait();

    // Idle: no writes; count the agent's wake-ups.
    std::thread::sleep(Duration::from_secs(2));
    let idle0 = proc_stat(agent.pid()).voluntary_switches;
    std::thread::sleep(Duration::from_secs(10));
    let idle1 = proc_stat(agent.pid()).voluntary_switches;
    let _ = peer.kill();

    let events = rate as f64 * elapsed;
    let tps = ticks_per_sec();
    let agent_cpu_ms = (a1.cpu_ticks - a0.cpu_ticks) as f64 / tps * 1000.0 / (events / 1000.0);
    let jctl_cpu_ms = (j1.cpu_ticks - j0.cpu_ticks) as f64 / tps * 1000.0 / (events / 1000.0);
    let peer_cpu_ms = (p1 - p0) as f64 / tps * 1000.0 / (events / 1000.0);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let release_agent = qlog_tests::bin_path("qlog-agent")
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("release-agent/qlog-agent"));
    let binary =
        release_agent.filter(|p| p.exists()).unwrap_or_else(|| qlog_tests::bin_path("qlog-agent"));

    println!("machine: {}", machine());
    println!("agent footprint at {rate} events/s over {elapsed:.0} s");
    println!("  agent RSS (max)            {:>8} KiB", max_rss);
    println!(
        "  journalctl RSS (max)       {:>8} KiB  (the agent's child, reported apart)",
        max_jrss
    );
    println!("  agent CPU per 1,000 events {:>8.2} ms", agent_cpu_ms);
    println!("  + its journalctl           {:>8.2} ms", jctl_cpu_ms);
    println!(
        "  peer journalctl|cat        {:>8.2} ms  (ratio agent+journalctl / peer: x{:.2})",
        peer_cpu_ms,
        (agent_cpu_ms + jctl_cpu_ms) / peer_cpu_ms
    );
    println!("  bytes written to storage   {:>8}", a1.write_bytes);
    println!("  idle wake-ups              {:>8.2} /s", (idle1 - idle0) as f64 / 10.0);
    println!("  binary {}: {} bytes", binary.display(), size(&binary));
    let doc = serde_json::json!({
        "benchmark": "agent", "machine": machine(), "rate": rate, "seconds": elapsed,
        "agent_rss_kib_max": max_rss, "journalctl_rss_kib_max": max_jrss,
        "agent_cpu_ms_per_1000": agent_cpu_ms, "journalctl_cpu_ms_per_1000": jctl_cpu_ms,
        "peer_cpu_ms_per_1000": peer_cpu_ms, "bytes_written": a1.write_bytes,
        "idle_wakeups_per_sec": (idle1 - idle0) as f64 / 10.0,
        "binary": binary.display().to_string(), "binary_bytes": size(&binary),
    });
    std::fs::write(out.join("agent.json"), serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}

fn latency(seconds: u64, rate: u64, out: &Path) -> anyhow::Result<()> {
    let journal = JournalNamespace::start();
    let sink =
        RunningSink::start(SinkOptions { log_level: Some("warn".into()), ..Default::default() });
    let _agent = RunningAgent::spawn(AgentOptions::new(&sink, "bench-vm").journal(&journal));
    // Prime the stream so the VM is known before the follower starts.
    journal.systemd_cat("qlog-bench", 6, "prime");
    let primed =
        qlog_rpc::query::Filter { identifiers: vec!["qlog-bench".into()], ..Default::default() };
    qlog_tests::agent::wait_for_records(sink.query_socket(), &primed, 1, Duration::from_secs(30));

    let mut tail = Command::new(qlog_tests::bin_path("qlog"))
        .args(["--socket"])
        .arg(sink.query_socket())
        .args(["tail", "-n", "0", "-o", "cat", "bench-vm"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start qlog tail")?;
    let mut peer = journal
        .command("journalctl")
        .args(["-f", "-n", "0", "-o", "cat", "-t", "qlog-bench"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start journalctl -f")?;
    let collect = |stdout: std::process::ChildStdout| {
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let now = now_usec();
                if let Some(sent) =
                    line.rsplit_once("sent=").and_then(|(_, v)| v.trim().parse::<u64>().ok())
                {
                    lat.push(now.saturating_sub(sent));
                }
            }
            lat
        })
    };
    let ours = collect(tail.stdout.take().expect("piped"));
    let theirs = collect(peer.stdout.take().expect("piped"));

    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = start_writer(&journal, rate, Arc::clone(&stop))?;
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let _ = writer.wait();
    // Let the last events arrive before stopping the readers.
    std::thread::sleep(Duration::from_secs(2));
    let _ = tail.kill();
    let _ = peer.kill();
    let mut ours = ours.join().expect("reader threads do not panic");
    let mut theirs = theirs.join().expect("reader threads do not panic");
    let pct = |v: &mut Vec<u64>, p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
    };
    let (o50, o99, o999) = (pct(&mut ours, 0.5), pct(&mut ours, 0.99), pct(&mut ours, 0.999));
    let (t50, t99, t999) = (pct(&mut theirs, 0.5), pct(&mut theirs, 0.99), pct(&mut theirs, 0.999));
    println!("machine: {}", machine());
    println!("end-to-end latency at {rate} events/s for {seconds} s (ms)");
    println!("  {:<34} {:>8} {:>8} {:>8} {:>8}", "", "events", "p50", "p99", "p99.9");
    println!(
        "  {:<34} {:>8} {:>8.2} {:>8.2} {:>8.2}",
        "journald -> agent -> qlogd -> tail",
        ours.len(),
        o50,
        o99,
        o999
    );
    println!(
        "  {:<34} {:>8} {:>8.2} {:>8.2} {:>8.2}",
        "journald -> journalctl -f (peer)",
        theirs.len(),
        t50,
        t99,
        t999
    );
    println!("  ratio p99 qlog/journalctl: x{:.1}", o99 / t99);
    let doc = serde_json::json!({
        "benchmark": "latency", "machine": machine(), "rate": rate, "seconds": seconds,
        "qlog": {"events": ours.len(), "p50_ms": o50, "p99_ms": o99, "p999_ms": o999},
        "journalctl_follow": {"events": theirs.len(), "p50_ms": t50, "p99_ms": t99, "p999_ms": t999},
    });
    std::fs::write(out.join("latency.json"), serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}
