//! `qlog-bench`: qlog's performance claims, each measured beside a peer in the same run.
//!
//! `qlog-bench ingest` feeds the same generated stream (see `qlog_tests::workload`) to
//! systemd-journal-remote and to qlogd with durable acks, once from one VM and once from
//! eight VMs at once, and prints entries/s, MB/s, peak RSS and bytes on disk per entry
//! for both, with qlogd's figures as ratios of the peer's. Results also go to a JSON
//! file. This is a benchmark, not a test: nothing here asserts a number.
//!
//! `qlog-bench query` stores the same generated events from ten VMs in qlogd (through
//! its ingest socket, as `ingest` does) and in journal files (through
//! systemd-journal-remote), then times whole `qlog` and `journalctl` processes side by
//! side, interleaved, on the same questions: the last 100 events of one VM, a filtered
//! query, a 1% time window, a regex scan and a full JSON dump. It prints the medians and
//! journalctl's time over qlog's, and writes them to a JSON file. `--cases` picks some
//! of the questions (tail, filter, window, grep, dump), and `--journal-cache DIR` keeps
//! the journal files for the next run of the same events, which skips journal-remote's
//! writing (12 of a 10-million-event run's 30 minutes).
//!
//! `qlog-bench flood` runs the flood-fairness scenario of `tests/tests/flood_fairness.rs`
//! (the actors are `qlog_tests::flood`) against one qlogd: seven VMs at 200 events/s
//! each, first alone, then while an eighth floods as fast as it can with garbage mixed
//! in, held by its token bucket. The peer is the same honest traffic without the flood:
//! it prints the ingest-to-visible latency (send to arrival on a live follower) of the
//! honest events, p50 and p99 for both phases and the ratio, what the bucket refused,
//! and qlogd's peak RSS after a one-VM burst of `--events` events (1,000,000 by
//! default), once under the default limits and once with rate limits off.
//!
//! The ingest and query benchmarks turn qlogd's rate limit off: they measure how fast it
//! stores, not how it refuses.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qlog_rpc::event::encode_event_payload;
use qlog_rpc::frame::{encode, FrameDecoder, FrameType};
use qlog_rpc::message::{decode_json, encode_json, encode_u64};
use qlog_rpc::{Hello, Limits, Welcome};
use qlog_tests::machine;
use qlog_tests::workload::{write_export, Workload};

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";
/// qlogd flags that turn its per-VM rate limit off.
const NO_RATE_LIMIT: [&str; 4] =
    ["--rate-limit-events-per-sec", "0", "--rate-limit-bytes-per-sec", "0"];

struct Options {
    events: u64,
    /// VM counts to run; by default 1 and 8.
    vm_counts: Vec<usize>,
    /// Keep the work directories for inspection.
    keep: bool,
    seed: u64,
    out: PathBuf,
    /// Timed runs of each command in `query`; by default 20.
    runs: usize,
    /// Seconds of each phase of each round of `flood`; by default 10.
    seconds: u64,
    /// Rounds of `flood` (a phase without the flooder, then one with); by default 4.
    rounds: u64,
    /// Nice level of the flooder's sending threads in `flood`; by default 0, the same
    /// as qlogd's (see `Flooder::start_niced`).
    flooder_nice: i32,
    /// The flooder's bucket in `flood`: events/s and burst; by default 1,000 and 10,000.
    flood_rate: u64,
    flood_burst: u64,
    /// Alternating on/off pairs in `telemetry`; by default 5.
    pairs: usize,
    /// `query`: keep the journal files here and reuse them when a later run asks for
    /// the same events (journal-remote's writing is most of a long run's setup).
    journal_cache: Option<PathBuf>,
    /// `query`: the cases to run, by key (see [`query_cases`]); all by default.
    cases: Option<Vec<String>>,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "ingest".into());
    let mut opts = Options {
        events: 1_000_000,
        vm_counts: vec![1, 8],
        keep: false,
        seed: 1,
        out: PathBuf::from("bench-results"),
        runs: 20,
        seconds: 10,
        rounds: 4,
        flooder_nice: 0,
        flood_rate: 1_000,
        flood_burst: 10_000,
        pairs: TELEMETRY_RUNS,
        journal_cache: None,
        cases: None,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--events" => opts.events = args.next().context("--events needs a number")?.parse()?,
            "--vms" => opts.vm_counts = args.next().context("--vms needs a list like 1,8")?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--keep" => opts.keep = true,
            "--seed" => opts.seed = args.next().context("--seed needs a number")?.parse()?,
            "--out" => opts.out = args.next().context("--out needs a directory")?.into(),
            "--runs" => opts.runs = args.next().context("--runs needs a number")?.parse()?,
            "--seconds" => opts.seconds = args.next().context("--seconds needs a number")?.parse()?,
            "--rounds" => opts.rounds = args.next().context("--rounds needs a number")?.parse()?,
            "--flooder-nice" => opts.flooder_nice = args.next().context("--flooder-nice needs a number")?.parse()?,
            "--flood-rate" => opts.flood_rate = args.next().context("--flood-rate needs a number")?.parse()?,
            "--flood-burst" => opts.flood_burst = args.next().context("--flood-burst needs a number")?.parse()?,
            "--pairs" => opts.pairs = args.next().context("--pairs needs a number")?.parse()?,
            "--journal-cache" => opts.journal_cache = Some(args.next().context("--journal-cache needs a directory")?.into()),
            "--cases" => opts.cases = Some(args.next().context("--cases needs a list like tail,filter")?.split(',').map(str::to_owned).collect()),
            other => bail!("unknown option {other}; usage: qlog-bench [ingest|query|flood|telemetry|all] [--events N] [--vms 1,8] [--runs N] [--seconds N] [--rounds N] [--flooder-nice N] [--flood-rate N] [--flood-burst N] [--seed N] [--out DIR] [--keep] [--journal-cache DIR] [--cases tail,filter,window,grep,dump]"),
        }
    }
    match what.as_str() {
        "ingest" => ingest(&opts),
        "query" => query(&opts),
        "flood" => flood(&opts),
        "telemetry" => telemetry(&opts),
        "all" => all(&opts),
        other => {
            bail!("unknown benchmark {other}; available: ingest, query, flood, telemetry, all")
        }
    }
}

/// Every benchmark in one run: ingest and query here, the agent's footprint and the
/// end-to-end latency through `qlog-footprint` (which needs root for its journald).
/// Each writes its own JSON file; `summary.json` gathers them.
fn all(opts: &Options) -> anyhow::Result<()> {
    ingest(opts)?;
    query(opts)?;
    flood(opts)?;
    telemetry(opts)?;
    let footprint = sibling_binary("qlog-footprint")?;
    for what in ["agent", "latency"] {
        let status = Command::new(&footprint).arg(what).arg("--out").arg(&opts.out).status()?;
        if !status.success() {
            eprintln!("qlog-footprint {what} failed ({status}); its results are missing");
        }
    }
    let mut summary = serde_json::Map::new();
    for name in ["ingest", "query", "flood", "telemetry", "agent", "latency"] {
        let path = opts.out.join(format!("{name}.json"));
        if let Ok(bytes) = std::fs::read(&path) {
            summary.insert(name.into(), serde_json::from_slice(&bytes)?);
        }
    }
    let path = opts.out.join("summary.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("\nall results: {}", path.display());
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
struct Measure {
    system: String,
    vms: usize,
    entries: u64,
    input_bytes: u64,
    seconds: f64,
    entries_per_sec: f64,
    mb_per_sec: f64,
    peak_rss_kib: u64,
    disk_bytes: u64,
    bytes_per_entry: f64,
}

fn measure(
    system: &str,
    vms: usize,
    entries: u64,
    input_bytes: u64,
    seconds: f64,
    peak_rss_kib: u64,
    disk_bytes: u64,
) -> Measure {
    Measure {
        system: system.into(),
        vms,
        entries,
        input_bytes,
        seconds,
        entries_per_sec: entries as f64 / seconds,
        mb_per_sec: input_bytes as f64 / seconds / 1e6,
        peak_rss_kib,
        disk_bytes,
        bytes_per_entry: disk_bytes as f64 / entries as f64,
    }
}

fn ingest(opts: &Options) -> anyhow::Result<()> {
    let qlogd = sibling_binary("qlogd")?;
    std::fs::create_dir_all(&opts.out)?;
    let mut results = Vec::new();
    println!("machine: {}", machine());
    println!("workload: {} generated journald entries, seed {}\n", opts.events, opts.seed);
    for &vms in &opts.vm_counts {
        let names: Vec<String> = (0..vms).map(|i| format!("bench-vm{i}")).collect();
        let per_vm = opts.events / vms as u64;
        let work = tempdir()?;

        // One export stream for the peer, one frame stream per VM for qlogd: the same
        // entries, generated once, before any clock starts.
        let export_path = work.join("stream.export");
        let mut export = std::io::BufWriter::new(std::fs::File::create(&export_path)?);
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for name in &names {
            let mut w = Workload::new(opts.seed, name);
            let mut buf = Vec::new();
            let mut payload = Vec::new();
            for seq in 1..=per_vm {
                let e = w.next_event();
                write_export(&e, &mut export)?;
                payload.clear();
                encode_event_payload(seq, &e, &mut payload);
                encode(FrameType::Event, &payload, &mut buf);
            }
            frames.push(buf);
        }
        export.flush()?;
        drop(export);
        let input_bytes = std::fs::metadata(&export_path)?.len();
        let entries = per_vm * vms as u64;

        if Path::new(JOURNAL_REMOTE).exists() {
            let m =
                run_journal_remote(&export_path, &work.join("remote"), vms, entries, input_bytes)?;
            results.push(m);
        } else {
            eprintln!("peer missing: install systemd-journal-remote (apt-get install systemd-journal-remote) for the comparison");
        }
        let m = run_qlogd(&qlogd, &work.join("qlogd"), &names, frames, entries, input_bytes, &[])?;
        results.push(m);
        if opts.keep {
            println!("kept {}", work.display());
        } else {
            let _ = std::fs::remove_dir_all(&work);
        }
    }

    println!(
        "{:<22} {:>4} {:>10} {:>11} {:>8} {:>10} {:>10}",
        "system", "vms", "entries", "entries/s", "MB/s", "peak RSS", "B/entry"
    );
    for m in &results {
        println!(
            "{:<22} {:>4} {:>10} {:>11.0} {:>8.1} {:>7} MiB {:>10.1}",
            m.system,
            m.vms,
            m.entries,
            m.entries_per_sec,
            m.mb_per_sec,
            m.peak_rss_kib / 1024,
            m.bytes_per_entry
        );
    }
    println!();
    for &vms in &opts.vm_counts {
        let peer = results.iter().find(|m| m.vms == vms && m.system == "journal-remote");
        let ours = results.iter().find(|m| m.vms == vms && m.system == "qlogd");
        if let (Some(p), Some(o)) = (peer, ours) {
            println!(
                "{vms} VM(s): qlogd/journal-remote  entries/s x{:.2}   bytes/entry x{:.3}   peak RSS x{:.2}",
                o.entries_per_sec / p.entries_per_sec,
                o.bytes_per_entry / p.bytes_per_entry,
                o.peak_rss_kib as f64 / p.peak_rss_kib as f64
            );
        }
    }
    let path = opts.out.join("ingest.json");
    let doc = serde_json::json!({ "benchmark": "ingest", "machine": machine(), "events": opts.events, "seed": opts.seed, "results": results });
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    println!("\nresults written to {}", path.display());
    Ok(())
}

/// Events between two heartbeat-and-sample pairs per VM in the telemetry benchmark. At
/// this benchmark's rate (some 30,000 events/s per VM) that is a pair every one or two
/// seconds, where a real agent sends a heartbeat every 30 s and a sample every 60 s.
const SAMPLE_EVERY: u64 = 50_000;
/// Timed runs of each variant, alternating, so drift on a shared machine hits both.
const TELEMETRY_RUNS: usize = 5;

/// What telemetry costs ingest. The same entries from 8 VMs go to qlogd as it runs by
/// default (rollups counted and committed with every batch, health judged every second,
/// its own metrics sampled) with a heartbeat and a telemetry sample every
/// [`SAMPLE_EVERY`] events per VM, and to qlogd started with `--no-telemetry` without
/// them. The variants alternate, [`TELEMETRY_RUNS`] runs each; medians are compared.
fn telemetry(opts: &Options) -> anyhow::Result<()> {
    let qlogd = sibling_binary("qlogd")?;
    std::fs::create_dir_all(&opts.out)?;
    let vms = opts.vm_counts.iter().copied().max().unwrap_or(8);
    let names: Vec<String> = (0..vms).map(|i| format!("bench-vm{i}")).collect();
    let per_vm = opts.events / vms as u64;
    let entries = per_vm * vms as u64;
    let sample = {
        let values: serde_json::Map<String, serde_json::Value> = [
            ("load1", 0.42),
            ("load5", 0.37),
            ("load15", 0.30),
            ("mem_used_bytes", 812e6),
            ("mem_available_bytes", 3.1e9),
            ("disk_root_used_bytes", 7.2e9),
            ("disk_root_total_bytes", 20e9),
            ("disk_rw_used_bytes", 1.1e9),
            ("disk_rw_total_bytes", 2e9),
            ("uptime_secs", 86_400.0),
            ("agent_events_read", 12_345.0),
            ("agent_events_sent", 12_340.0),
            ("agent_events_acked", 12_300.0),
            ("agent_reconnects", 1.0),
            ("agent_in_flight", 40.0),
            ("agent_lag_secs", 0.2),
            ("agent_journal_restarts", 0.0),
            ("agent_gaps", 0.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), serde_json::json!(v)))
        .collect();
        serde_json::to_vec(&serde_json::json!({ "sent_usec": now_usec(), "values": values }))?
    };
    let heartbeat =
        serde_json::to_vec(&serde_json::json!({ "sent_usec": now_usec(), "interval_secs": 30 }))?;
    let (mut plain, mut with) = (Vec::new(), Vec::new());
    let mut input_bytes = 0u64;
    for name in &names {
        let mut w = Workload::new(opts.seed, name);
        let (mut a, mut b, mut payload) = (Vec::new(), Vec::new(), Vec::new());
        for seq in 1..=per_vm {
            let e = w.next_event();
            payload.clear();
            encode_event_payload(seq, &e, &mut payload);
            encode(FrameType::Event, &payload, &mut a);
            encode(FrameType::Event, &payload, &mut b);
            if seq % SAMPLE_EVERY == 0 {
                encode(FrameType::Heartbeat, &heartbeat, &mut b);
                encode(FrameType::Telemetry, &sample, &mut b);
            }
        }
        input_bytes += a.len() as u64;
        plain.push(a);
        with.push(b);
    }
    println!("machine: {}", machine());
    println!(
        "workload: {entries} entries from {vms} VMs, a heartbeat and an 18-value sample every {SAMPLE_EVERY} events per VM\n"
    );
    let work = tempdir()?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for run in 0..opts.pairs.max(1) * 2 {
        let telemetry = run % 2 == 0;
        let dir = work.join(format!("run{run}"));
        let (frames, args): (Vec<Vec<u8>>, &[&str]) =
            if telemetry { (with.clone(), &[]) } else { (plain.clone(), &["--no-telemetry"]) };
        let m = run_qlogd(&qlogd, &dir, &names, frames, entries, input_bytes, args)?;
        println!(
            "run {}: {:<13} {:>9.0} entries/s",
            run + 1,
            if telemetry { "telemetry on" } else { "telemetry off" },
            m.entries_per_sec
        );
        if telemetry {
            on.push(m.entries_per_sec)
        } else {
            off.push(m.entries_per_sec)
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&work);
    let (on_median, off_median) = (median(&on), median(&off));
    // Each "on" run against the "off" run right after it: drift over the whole benchmark
    // cancels out within a pair.
    let pairs: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    let pair_median = median(&pairs);
    let cost = 1.0 - on_median / off_median;
    println!(
        "\nmedian: telemetry on {on_median:.0} entries/s, off {off_median:.0} entries/s: on/off x{:.3} ({:+.1}% throughput)",
        on_median / off_median,
        -cost * 100.0
    );
    let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.3}")).collect();
    println!("on/off per pair: {} (median x{pair_median:.3})", shown.join(", "));
    let path = opts.out.join("telemetry.json");
    let doc = serde_json::json!({
        "benchmark": "telemetry", "machine": machine(), "entries": entries, "vms": vms,
        "sample_every_events": SAMPLE_EVERY, "runs_each": opts.pairs,
        "entries_per_sec_on": on, "entries_per_sec_off": off,
        "median_on": on_median, "median_off": off_median, "ratio_on_off": on_median / off_median,
        "ratio_per_pair": pairs, "median_ratio_per_pair": pair_median,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    println!("results written to {}", path.display());
    Ok(())
}

fn run_journal_remote(
    input: &Path,
    out_dir: &Path,
    vms: usize,
    entries: u64,
    input_bytes: u64,
) -> anyhow::Result<Measure> {
    std::fs::create_dir_all(out_dir)?;
    let out_file = out_dir.join("remote.journal");
    let start = Instant::now();
    let child = Command::new(JOURNAL_REMOTE)
        .arg(format!("--output={}", out_file.display()))
        .arg("-")
        .stdin(std::fs::File::open(input)?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start systemd-journal-remote")?;
    let (status, rss) = wait_with_rusage(child)?;
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("systemd-journal-remote failed: {status}");
    }
    Ok(measure("journal-remote", vms, entries, input_bytes, seconds, rss, disk_usage(out_dir)))
}

fn run_qlogd(
    qlogd: &Path,
    dir: &Path,
    names: &[String],
    frames: Vec<Vec<u8>>,
    entries: u64,
    input_bytes: u64,
    extra_args: &[&str],
) -> anyhow::Result<Measure> {
    std::fs::create_dir_all(dir)?;
    let ingest = dir.join("ingest.sock");
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut child = Command::new(qlogd)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--ingest-socket")
        .arg(&ingest)
        .arg("--query-socket")
        .arg(dir.join("query.sock"))
        .args(NO_RATE_LIMIT)
        .args(extra_args)
        .arg("--log-level")
        .arg("warn")
        .env("NOTIFY_SOCKET", &notify_path)
        .spawn()
        .context("cannot start qlogd")?;
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).context("qlogd did not report READY=1 within 30 s")?;
    if !buf[..n].starts_with(b"READY=1") {
        bail!("unexpected notification from qlogd: {:?}", String::from_utf8_lossy(&buf[..n]));
    }

    let start = Instant::now();
    let handles: Vec<_> = names
        .iter()
        .cloned()
        .zip(frames)
        .map(|(vm, frames)| {
            let ingest = ingest.clone();
            std::thread::spawn(move || send_stream(&ingest, &vm, frames, 0))
        })
        .collect();
    let mut acked = 0;
    for h in handles {
        acked += h.join().expect("sender threads do not panic")?;
    }
    let seconds = start.elapsed().as_secs_f64();
    if acked != entries {
        bail!("qlogd acknowledged {acked} of {entries} entries");
    }
    let rss = peak_rss_kib(child.id());
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    Ok(measure(
        "qlogd",
        names.len(),
        entries,
        input_bytes,
        seconds,
        rss,
        disk_usage(&dir.join("state")),
    ))
}

/// One well-behaved stream: descriptor, hello, all events, End; returns the final ack.
/// `resume` is the last sequence number the store already holds for the stream, which
/// the frames must continue from.
fn send_stream(ingest: &Path, vm: &str, frames: Vec<u8>, resume: u64) -> anyhow::Result<u64> {
    let mut sock = UnixStream::connect(ingest)?;
    let mut head = format!("qlog.Ingest+ {vm}\0").into_bytes();
    let hello = Hello {
        versions: vec![1],
        agent: "qlog-bench".into(),
        stream: "journal".into(),
        limits: None,
        heartbeat_interval_secs: None,
        telemetry_interval_secs: None,
    };
    head.extend(encode_json(FrameType::Hello, &hello));
    sock.write_all(&head)?;
    let mut reader = sock.try_clone()?;
    let mut dec = FrameDecoder::new(Limits::DEFAULT);
    let mut rbuf = vec![0u8; 64 * 1024];
    let welcome: Welcome = loop {
        if let Some(f) = dec.next_frame()? {
            if f.ty != FrameType::Welcome {
                bail!("expected Welcome, got {:?}: {}", f.ty, String::from_utf8_lossy(&f.payload));
            }
            break decode_json(f.ty, &f.payload)?;
        }
        let n = reader.read(&mut rbuf)?;
        if n == 0 {
            bail!("qlogd closed before Welcome");
        }
        dec.feed(&rbuf[..n]);
    };
    if welcome.resume.last_seq != resume {
        bail!(
            "benchmark expects the store to hold {resume} events of {vm}, not {}",
            welcome.resume.last_seq
        );
    }
    let count = resume + count_frames(&frames);
    // Acks are read concurrently, as an agent does, so the socket never fills both ways.
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        sock.write_all(&frames)?;
        sock.write_all(&encode_u64(FrameType::End, count))?;
        Ok(())
    });
    let mut last_ack = 0;
    loop {
        while let Some(f) = dec.next_frame()? {
            match f.ty {
                FrameType::Ack => last_ack = qlog_rpc::message::decode_u64(f.ty, &f.payload)?,
                FrameType::End => {
                    writer.join().expect("writer thread does not panic")?;
                    return Ok(last_ack);
                }
                other => bail!("unexpected {other:?}: {}", String::from_utf8_lossy(&f.payload)),
            }
        }
        let n = reader.read(&mut rbuf)?;
        if n == 0 {
            bail!("qlogd closed the stream at ack {last_ack}");
        }
        dec.feed(&rbuf[..n]);
    }
}

/// Event frames in `frames`: the sequence numbers they take (heartbeats and telemetry
/// samples take none).
fn count_frames(frames: &[u8]) -> u64 {
    let mut dec = FrameDecoder::new(Limits::DEFAULT);
    dec.feed(frames);
    let mut n = 0;
    while let Ok(Some(f)) = dec.next_frame() {
        n += u64::from(f.ty == FrameType::Event);
    }
    n
}

fn wait_with_rusage(child: std::process::Child) -> anyhow::Result<(std::process::ExitStatus, u64)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid initial value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if rc < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    Ok((std::process::ExitStatus::from_raw(status), usage.ru_maxrss as u64))
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes actually allocated on disk under `dir` (st_blocks), the same for both systems.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("the bench binary has a directory")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first with cargo build --release --workspace",
            path.display()
        );
    }
    Ok(path)
}

/// How an x86-64 ELF binary is linked: "dynamic" if it names a program interpreter,
/// "static-pie" if it is position-independent without one, else "static".
fn linkage(path: &Path) -> anyhow::Result<&'static str> {
    let elf = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    // ELF, 64-bit (class 2), little-endian (data 1): the offsets below are for that.
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        bail!("{} is not a 64-bit little-endian ELF binary", path.display());
    }
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at =
        |at: usize| elf.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let (Some(kind), Some(phoff), Some(phentsize), Some(phnum)) =
        (u16_at(16), u64_at(32), u16_at(54), u16_at(56))
    else {
        bail!("{} is not an ELF binary", path.display());
    };
    const ET_DYN: u16 = 3;
    const PT_INTERP: u32 = 3;
    let interp = (0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        elf.get(at..at + 4).is_some_and(|b| u32::from_le_bytes(b.try_into().unwrap()) == PT_INTERP)
    });
    Ok(match (interp, kind == ET_DYN) {
        (true, _) => "dynamic",
        (false, true) => "static-pie",
        (false, false) => "static",
    })
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("QLOG_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base.join(format!("qlog-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// ---- qlog-bench query ------------------------------------------------------------------

/// VMs in the query benchmark's store.
const QUERY_VMS: usize = 10;
/// Ingest rounds: each sends every VM's next 1/ROUNDS of its events, so the receive
/// times of round r lie between two clock readings and a round is an exact 1% window.
const ROUNDS: u64 = 100;
/// The round whose receive-time window the 1% query selects: one in the middle.
const WINDOW_ROUND: u64 = ROUNDS / 2;
/// The time the generated entries span, as the VMs' clocks count it: a week of logs,
/// so that "the last hour" is a small part of the store, as it is in a log qube.
const QUERY_SPAN_USEC: u64 = 7 * 24 * 3_600_000_000;
const HOUR_USEC: u64 = 3_600_000_000;
/// Mean gap between a workload's entries at spacing 1, in µs.
const WORKLOAD_MEAN_STEP_USEC: u64 = 1_200;
/// A case whose counting run of journalctl took longer than this is not run again: the
/// counting runs of both, whose output goes through the same pipe to the line counter,
/// are its timing (a full dump of ten million entries takes journalctl ten minutes).
const SLOW_CASE: Duration = Duration::from_secs(30);
const JOURNALCTL: &str = "journalctl";

/// One question asked of both systems.
struct QueryCase {
    /// What `--cases` calls it.
    key: &'static str,
    name: &'static str,
    qlog: Vec<String>,
    journalctl: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct QueryMeasure {
    query: String,
    qlog_args: Vec<String>,
    journalctl_args: Vec<String>,
    /// Entries each printed, counted once with `-o json`.
    qlog_matches: u64,
    journalctl_matches: u64,
    runs: usize,
    /// One run each, with `-o json` through a pipe to the line counter: see [`SLOW_CASE`].
    timed_while_counting: bool,
    qlog_median_ms: f64,
    journalctl_median_ms: f64,
    qlog_runs_ms: Vec<f64>,
    journalctl_runs_ms: Vec<f64>,
    /// journalctl's median over qlog's: above 1 means qlog is faster.
    ratio: f64,
}

fn query(opts: &Options) -> anyhow::Result<()> {
    let qlogd = sibling_binary("qlogd")?;
    let qlog = sibling_binary("qlog")?;
    let linkage = linkage(&qlog)?;
    if linkage != "static-pie" {
        println!(
            "note: {} is {linkage}; the package ships it static-pie, which starts faster \
             (build with packaging/build-binaries.sh to measure that)",
            qlog.display()
        );
    }
    if !Path::new(JOURNAL_REMOTE).exists() {
        bail!("{JOURNAL_REMOTE} is missing: install systemd-journal-remote for the comparison");
    }
    std::fs::create_dir_all(&opts.out)?;
    let names: Vec<String> = (0..QUERY_VMS).map(|i| format!("bench-vm{i}")).collect();
    let per_vm = opts.events / QUERY_VMS as u64;
    let entries = per_vm * QUERY_VMS as u64;
    let spacing = QUERY_SPAN_USEC.div_ceil(per_vm.max(1) * WORKLOAD_MEAN_STEP_USEC);
    println!("machine: {}", machine());
    println!(
        "workload: {entries} generated journald entries from {QUERY_VMS} VMs, seed {}, {} timed runs each\n",
        opts.seed, opts.runs
    );
    let work = tempdir()?;

    // The same events twice, before any clock starts: journal files, then qlogd.
    let t = Instant::now();
    let (journal_dir, written) = match &opts.journal_cache {
        Some(cache) => cached_journal(cache, &names, per_vm, opts.seed, spacing)?,
        None => {
            let dir = work.join("journal");
            std::fs::create_dir_all(&dir)?;
            let written =
                write_journal(&dir.join("remote.journal"), &names, per_vm, opts.seed, spacing)?;
            (dir, written)
        }
    };
    let (first_realtime, last_realtime) = (written.first, written.last);
    // journalctl's last hour, and where it starts in each VM's stream: qlogd receives
    // each VM's entries before that point, then a clock reading, then the rest, so that
    // both systems' "last hour" holds the same entries.
    let hour_start = last_realtime.saturating_sub(HOUR_USEC);
    let hour_cut: Vec<u64> = written
        .realtimes
        .iter()
        .map(|times| times.partition_point(|&t| t < hour_start) as u64)
        .collect();
    let journal_files = journal_files(&journal_dir)?;
    println!(
        "journal: {} file(s), {} MiB, {} in {:.1} s",
        journal_files.len(),
        disk_usage(&journal_dir) >> 20,
        if written.reused { "its entries' times regenerated" } else { "written" },
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let sink = QuerySink::start(&qlogd, &work.join("qlogd"))?;
    let (marks, hour_mark) = sink.ingest_rounds(&names, per_vm, opts.seed, spacing, &hour_cut)?;
    println!(
        "qlogd: {} MiB, ingested in {:.1} s\n",
        disk_usage(&work.join("qlogd/state")) >> 20,
        t.elapsed().as_secs_f64()
    );

    // journalctl reads one file with --file; rotated files need the directory.
    let source: Vec<String> = match journal_files.as_slice() {
        [one] => vec!["--file".into(), one.display().to_string()],
        _ => vec!["--directory".into(), journal_dir.display().to_string()],
    };
    let window_journal = |fraction: f64| {
        let span = (last_realtime - first_realtime) as f64;
        utc_timestamp_utc(first_realtime + (span * fraction) as u64)
    };
    let cases = query_cases(
        &names[3],
        // The last hour, as each system's clock counts it: qlog's receive times, the
        // VMs' own timestamps for journalctl (whose `-1h` would mean something else).
        (utc_timestamp_utc(hour_mark + 1), utc_timestamp_utc(hour_start)),
        (
            utc_timestamp_utc(marks[WINDOW_ROUND as usize - 1] + 1),
            utc_timestamp_utc(marks[WINDOW_ROUND as usize]),
        ),
        (
            window_journal(WINDOW_ROUND as f64 / ROUNDS as f64),
            window_journal((WINDOW_ROUND + 1) as f64 / ROUNDS as f64),
        ),
    );

    if let Some(wanted) = &opts.cases {
        if let Some(bad) = wanted.iter().find(|w| !cases.iter().any(|c| c.key == w.as_str())) {
            let keys: Vec<&str> = cases.iter().map(|c| c.key).collect();
            bail!("unknown case {bad}; the cases are {}", keys.join(", "));
        }
    }
    let mut results = Vec::new();
    for case in
        cases.iter().filter(|c| opts.cases.as_ref().is_none_or(|w| w.iter().any(|w| w == c.key)))
    {
        let mut qlog_args = vec!["--socket".to_owned(), sink.query_socket.display().to_string()];
        qlog_args.extend(case.qlog.iter().cloned());
        let mut journalctl_args = source.clone();
        journalctl_args.extend(["--no-pager".to_owned(), "-q".to_owned()]);
        journalctl_args.extend(case.journalctl.iter().cloned());
        let m = time_case(case.name, &qlog, &qlog_args, &journalctl_args, opts.runs)?;
        println!(
            "{:<24} qlog {:>9.1} ms  journalctl {:>9.1} ms  x{:<7.2} ({} / {} entries){}",
            m.query,
            m.qlog_median_ms,
            m.journalctl_median_ms,
            m.ratio,
            m.qlog_matches,
            m.journalctl_matches,
            if m.timed_while_counting { ", one run each, -o json through a pipe" } else { "" }
        );
        results.push(m);
    }
    drop(sink);

    println!(
        "\nmedians of {} runs, wall clock of the whole process, output to /dev/null",
        opts.runs
    );
    println!(
        "{:<24} {:>12} {:>14} {:>8} {:>10} {:>10}",
        "query", "qlog ms", "journalctl ms", "ratio", "qlog n", "jctl n"
    );
    for m in &results {
        println!(
            "{:<24} {:>12.1} {:>14.1} {:>8.2} {:>10} {:>10}",
            m.query,
            m.qlog_median_ms,
            m.journalctl_median_ms,
            m.ratio,
            m.qlog_matches,
            m.journalctl_matches
        );
    }
    println!("ratio = journalctl time / qlog time (above 1: qlog is faster)");
    let path = opts.out.join("query.json");
    let doc = serde_json::json!({
        "benchmark": "query",
        "machine": machine(),
        "events": entries,
        "vms": QUERY_VMS,
        "seed": opts.seed,
        "runs": opts.runs,
        "journal_files": journal_files.len(),
        "workload_spacing": spacing,
        "qlog_linkage": linkage,
        "span_hours": (last_realtime - first_realtime) as f64 / HOUR_USEC as f64,
        "results": results,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    println!("\nresults written to {}", path.display());
    if opts.keep {
        println!("kept {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// The questions, as each tool spells them. `hour` is where the last hour starts for
/// qlog and for journalctl; the windows are (since, until) for qlog and for journalctl.
fn query_cases(
    vm: &str,
    hour: (String, String),
    qlog_window: (String, String),
    journal_window: (String, String),
) -> Vec<QueryCase> {
    let v = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<String>>();
    let pattern = "export file [0-9a-f]+: permission";
    vec![
        QueryCase {
            key: "tail",
            name: "tail one VM, -n 100",
            qlog: v(&["tail", vm, "-n", "100", "--no-follow"]),
            journalctl: v(&["-n", "100", &format!("_HOSTNAME={vm}")]),
        },
        QueryCase {
            key: "filter",
            name: "err + unit + last hour",
            qlog: v(&["query", "-p", "err", "-u", "qubes-qrexec-agent", "-S", &hour.0]),
            journalctl: v(&["-p", "err", "-u", "qubes-qrexec-agent", "-S", &hour.1]),
        },
        QueryCase {
            key: "window",
            name: "1% time window",
            qlog: v(&["query", "-S", &qlog_window.0, "-U", &qlog_window.1]),
            journalctl: v(&["-S", &journal_window.0, "-U", &journal_window.1]),
        },
        QueryCase {
            key: "grep",
            name: "regex scan (-g)",
            qlog: v(&["query", "-g", pattern]),
            journalctl: v(&["-g", pattern]),
        },
        QueryCase {
            key: "dump",
            name: "full -o json dump",
            qlog: v(&["query", "-o", "json"]),
            journalctl: v(&["-o", "json"]),
        },
    ]
}

/// Counts each side's matches once (which also warms the page cache), then times
/// `runs` runs of each, alternating, so drift on a shared machine hits both alike.
fn time_case(
    name: &str,
    qlog: &Path,
    qlog_args: &[String],
    journalctl_args: &[String],
    runs: usize,
) -> anyhow::Result<QueryMeasure> {
    let with_json = |args: &[String]| {
        let mut args = args.to_vec();
        if !args.iter().any(|a| a == "json") {
            args.extend(["-o".to_owned(), "json".to_owned()]);
        }
        args
    };
    let ms = |since: Instant| since.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let qlog_matches = count_lines(qlog, &with_json(qlog_args))?;
    let qlog_counting_ms = ms(started);
    let started = Instant::now();
    let journalctl_matches = count_lines(Path::new(JOURNALCTL), &with_json(journalctl_args))?;
    let journalctl_counting_ms = ms(started);
    let timed_while_counting = journalctl_counting_ms > SLOW_CASE.as_secs_f64() * 1e3;
    let (mut ours, mut theirs) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    if timed_while_counting {
        (ours, theirs) = (vec![qlog_counting_ms], vec![journalctl_counting_ms]);
    } else {
        for _ in 0..runs {
            ours.push(time_once(qlog, qlog_args)?);
            theirs.push(time_once(Path::new(JOURNALCTL), journalctl_args)?);
        }
    }
    let runs = ours.len();
    let (qlog_median_ms, journalctl_median_ms) = (median(&ours), median(&theirs));
    Ok(QueryMeasure {
        query: name.to_owned(),
        qlog_args: qlog_args.to_vec(),
        journalctl_args: journalctl_args.to_vec(),
        qlog_matches,
        journalctl_matches,
        runs,
        timed_while_counting,
        qlog_median_ms,
        journalctl_median_ms,
        qlog_runs_ms: ours,
        journalctl_runs_ms: theirs,
        ratio: journalctl_median_ms / qlog_median_ms,
    })
}

fn bench_command(program: &Path, args: &[String]) -> Command {
    let mut command = Command::new(program);
    command.args(args).env("TZ", "UTC").env_remove("NO_COLOR").stdin(Stdio::null());
    command
}

/// journalctl exits 1 when `--grep` matched nothing; that is an answer, not a failure.
fn check_status(
    program: &Path,
    status: std::process::ExitStatus,
    stderr: &[u8],
) -> anyhow::Result<()> {
    let grep_found_nothing =
        program == Path::new(JOURNALCTL) && status.code() == Some(1) && stderr.is_empty();
    if !status.success() && !grep_found_nothing {
        bail!("{} failed: {status}: {}", program.display(), String::from_utf8_lossy(stderr));
    }
    Ok(())
}

/// Runs the command with stdout to /dev/null; returns its wall-clock time in ms.
fn time_once(program: &Path, args: &[String]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = bench_command(program, args)
        .stdout(std::fs::File::create("/dev/null")?)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    check_status(program, out.status, &out.stderr)?;
    Ok(ms)
}

/// Runs the command and counts the lines it prints, streaming, without keeping them.
fn count_lines(program: &Path, args: &[String]) -> anyhow::Result<u64> {
    let mut child = bench_command(program, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = 0u64;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let out = child.wait_with_output()?;
    check_status(program, out.status, &out.stderr)?;
    Ok(lines)
}

fn median(ms: &[f64]) -> f64 {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// What [`write_journal`] wrote: the first and last `__REALTIME_TIMESTAMP`, and every
/// VM's timestamps in order.
struct Written {
    first: u64,
    last: u64,
    realtimes: Vec<Vec<u64>>,
    /// The journal came from `--journal-cache`, written by an earlier run.
    reused: bool,
}

/// The journal of these events in `cache`, written there first if it does not hold
/// them yet: `params.json` says which events a cached journal holds.
fn cached_journal(
    cache: &Path,
    names: &[String],
    per_vm: u64,
    seed: u64,
    spacing: u64,
) -> anyhow::Result<(PathBuf, Written)> {
    let params =
        serde_json::json!({ "vms": names, "per_vm": per_vm, "seed": seed, "spacing": spacing });
    let params_path = cache.join("params.json");
    let dir = cache.join("journal");
    let have = std::fs::read(&params_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if have.as_ref() == Some(&params) && !journal_files(&dir)?.is_empty() {
        return Ok((dir, generated_realtimes(names, per_vm, seed, spacing)));
    }
    let _ = std::fs::remove_file(&params_path);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let written = write_journal(&dir.join("remote.journal"), names, per_vm, seed, spacing)?;
    std::fs::write(&params_path, serde_json::to_vec_pretty(&params)?)?;
    Ok((dir, written))
}

/// What [`write_journal`] returns, without writing: the workload is deterministic.
fn generated_realtimes(names: &[String], per_vm: u64, seed: u64, spacing: u64) -> Written {
    let realtimes: Vec<Vec<u64>> = names
        .iter()
        .map(|n| {
            let mut w = Workload::new(seed, n).spaced(spacing);
            (0..per_vm)
                .map(|_| {
                    let e = w.next_event();
                    e.get_str("__REALTIME_TIMESTAMP")
                        .and_then(|t| t.parse().ok())
                        .expect("the workload stamps every event")
                })
                .collect()
        })
        .collect();
    let first = realtimes.iter().filter_map(|t| t.first().copied()).min().unwrap_or(u64::MAX);
    let last = realtimes.iter().filter_map(|t| t.last().copied()).max().unwrap_or(0);
    Written { first, last, realtimes, reused: true }
}

/// Writes every VM's events, merged in time order as one journald would have them, into
/// systemd-journal-remote.
fn write_journal(
    output: &Path,
    names: &[String],
    per_vm: u64,
    seed: u64,
    spacing: u64,
) -> anyhow::Result<Written> {
    let mut remote = Command::new(JOURNAL_REMOTE)
        .arg(format!("--output={}", output.display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start systemd-journal-remote")?;
    let stdin = remote.stdin.take().expect("stdin is piped");
    let realtime = |e: &qlog_rpc::Event| -> u64 {
        e.get_str("__REALTIME_TIMESTAMP")
            .and_then(|t| t.parse().ok())
            .expect("the workload stamps every event")
    };
    let mut workloads: Vec<Workload> =
        names.iter().map(|n| Workload::new(seed, n).spaced(spacing)).collect();
    let mut realtimes = vec![Vec::with_capacity(per_vm as usize); names.len()];
    let mut left = vec![per_vm; names.len()];
    let mut heads: Vec<Option<qlog_rpc::Event>> =
        workloads.iter_mut().map(|w| (per_vm > 0).then(|| w.next_event())).collect();
    let (mut first, mut last) = (u64::MAX, 0);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdin);
    // A k-way merge of ten streams that are each in time order.
    while let Some(i) = (0..heads.len())
        .filter(|&i| heads[i].is_some())
        .min_by_key(|&i| realtime(heads[i].as_ref().expect("filtered")))
    {
        let event = heads[i].take().expect("filtered");
        let t = realtime(&event);
        (first, last) = (first.min(t), last.max(t));
        realtimes[i].push(t);
        write_export(&event, &mut out)?;
        left[i] -= 1;
        if left[i] > 0 {
            heads[i] = Some(workloads[i].next_event());
        }
    }
    out.flush()?;
    drop(out);
    let result = remote.wait_with_output()?;
    if !result.status.success() {
        bail!(
            "systemd-journal-remote failed: {}: {}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
    }
    Ok(Written { first, last, realtimes, reused: false })
}

/// The journal files journal-remote left in `dir`: one, or more if it rotated.
fn journal_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "journal"))
        .collect();
    files.sort();
    Ok(files)
}

/// qlogd for the query benchmark; SIGTERMed on drop.
struct QuerySink {
    child: std::process::Child,
    ingest_socket: PathBuf,
    query_socket: PathBuf,
    /// Kept open until qlogd has exited: it reports stopping there too.
    _notify: std::os::unix::net::UnixDatagram,
}

impl QuerySink {
    fn start(qlogd: &Path, dir: &Path) -> anyhow::Result<QuerySink> {
        std::fs::create_dir_all(dir)?;
        let notify_path = dir.join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (ingest_socket, query_socket) = (dir.join("ingest.sock"), dir.join("query.sock"));
        let child = Command::new(qlogd)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--ingest-socket")
            .arg(&ingest_socket)
            .arg("--query-socket")
            .arg(&query_socket)
            .args(NO_RATE_LIMIT)
            .arg("--log-level")
            .arg("warn")
            .env("NOTIFY_SOCKET", &notify_path)
            .spawn()
            .context("cannot start qlogd")?;
        let mut buf = [0u8; 256];
        let received = notify.recv(&mut buf);
        let sink = QuerySink { child, ingest_socket, query_socket, _notify: notify };
        let n = received.context("qlogd did not report READY=1 within 30 s")?;
        if !buf[..n].starts_with(b"READY=1") {
            bail!("unexpected notification from qlogd: {:?}", String::from_utf8_lossy(&buf[..n]));
        }
        Ok(sink)
    }

    /// Sends every VM's events in [`ROUNDS`] rounds, each VM's slice in its own session,
    /// and returns the clock after each round (µs since the epoch), and the clock
    /// reading taken once every VM had sent its first `hour_cut[vm]` events. Every
    /// receive time of round r is after `marks[r - 1]` and at most `marks[r]`.
    fn ingest_rounds(
        &self,
        names: &[String],
        per_vm: u64,
        seed: u64,
        spacing: u64,
        hour_cut: &[u64],
    ) -> anyhow::Result<(Vec<u64>, u64)> {
        let mut workloads: Vec<Workload> =
            names.iter().map(|n| Workload::new(seed, n).spaced(spacing)).collect();
        let mut marks = Vec::with_capacity(ROUNDS as usize);
        let mut hour_mark = None;
        let mut sent = vec![0u64; names.len()];
        let mut send_up_to = |ends: &dyn Fn(usize) -> u64| -> anyhow::Result<()> {
            for (i, (name, workload)) in names.iter().zip(&mut workloads).enumerate() {
                let (from, to) = (sent[i], ends(i).max(sent[i]));
                if from == to {
                    continue;
                }
                let mut frames = Vec::new();
                let mut payload = Vec::new();
                for seq in from + 1..=to {
                    payload.clear();
                    encode_event_payload(seq, &workload.next_event(), &mut payload);
                    encode(FrameType::Event, &payload, &mut frames);
                }
                send_stream(&self.ingest_socket, name, frames, from)?;
                sent[i] = to;
            }
            Ok(())
        };
        for round in 0..ROUNDS {
            let (start, end) = (round * per_vm / ROUNDS, (round + 1) * per_vm / ROUNDS);
            // The last hour starts inside this round for some VM: split the round there.
            if hour_mark.is_none() && hour_cut.iter().any(|&cut| cut < end) {
                if hour_cut.iter().any(|&cut| cut < start) {
                    bail!("the last hour starts in different rounds for different VMs; use more --events");
                }
                send_up_to(&|i| hour_cut[i])?;
                hour_mark = Some(now_usec());
            }
            send_up_to(&|_| end)?;
            marks.push(now_usec());
        }
        let hour_mark = hour_mark.unwrap_or_else(now_usec);
        Ok((marks, hour_mark))
    }
}

impl Drop for QuerySink {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn now_usec() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The shared UTC timestamp with the zone spelled out.
fn utc_timestamp_utc(usec: u64) -> String {
    format!("{} UTC", qlog_tests::utc_timestamp(usec))
}

// ---- qlog-bench flood ------------------------------------------------------------------

/// Honest VMs in the flood benchmark, and the events/s each sends.
const FLOOD_HONEST_VMS: usize = 7;
const FLOOD_HONEST_RATE: u64 = 200;
const FLOODER: &str = "bench-flooder";
/// Streams the flooder sends on at once.
const FLOOD_STREAMS: usize = 4;

#[derive(Debug, Clone, serde::Serialize)]
struct LatencyPhase {
    phase: String,
    /// Honest events sent, and how many arrived on the follower.
    sent: u64,
    seen: u64,
    /// Events the follower was told it missed (a lagging follower).
    lagged: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the follower saw of one phase: latencies in ms, events sent, events missed.
#[derive(Default)]
struct PhaseSamples {
    latencies: Vec<f64>,
    sent: u64,
    lagged: u64,
}

impl PhaseSamples {
    fn add(&mut self, other: PhaseSamples) {
        self.latencies.extend(other.latencies);
        self.sent += other.sent;
        self.lagged += other.lagged;
    }

    fn summary(mut self, phase: &str) -> LatencyPhase {
        self.latencies.sort_by(f64::total_cmp);
        let l = &self.latencies;
        LatencyPhase {
            phase: phase.to_owned(),
            sent: self.sent,
            seen: l.len() as u64,
            lagged: self.lagged,
            p50_ms: percentile(l, 50.0),
            p99_ms: percentile(l, 99.0),
            p999_ms: percentile(l, 99.9),
            max_ms: l.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// One phase: the honest VMs send for `seconds` (the flooder, if any, is already
/// running), and a follower started before them measures each event's latency.
fn honest_phase(
    sink: &qlog_tests::RunningSink,
    names: &[String],
    seconds: u64,
) -> anyhow::Result<PhaseSamples> {
    use qlog_rpc::query::EventsQuery;
    use qlog_tests::query::FollowItem;

    let per_vm = FLOOD_HONEST_RATE * seconds;
    let sent = per_vm * names.len() as u64;
    // Every VM, filtered here: a follow query may only name VMs qlogd already knows.
    let query = EventsQuery::default();
    let honest = names.to_vec();
    let mut follower = qlog_tests::Follower::start(sink.query_socket(), query)?;
    follower.wait_done(Duration::from_secs(60));
    let collector = std::thread::spawn(move || {
        let mut latencies = Vec::with_capacity(sent as usize);
        let deadline = Instant::now() + Duration::from_secs(seconds + 60);
        while (latencies.len() as u64 + follower.lagged_missed()) < sent {
            let left = deadline.saturating_duration_since(Instant::now());
            match follower.recv(left) {
                Some(FollowItem::Record(r)) if honest.contains(&r.vm) => {
                    let now = now_usec();
                    let sent_usec: Option<u64> =
                        r.event.get_str(qlog_tests::flood::SENT_USEC).and_then(|v| v.parse().ok());
                    if let Some(t) = sent_usec {
                        latencies.push(now.saturating_sub(t) as f64 / 1e3);
                    }
                }
                Some(FollowItem::Record(_) | FollowItem::Done(_) | FollowItem::Lagged(_)) => {}
                Some(_) | None => break,
            }
        }
        (latencies, follower.lagged_missed())
    });
    std::thread::scope(|scope| {
        for vm in names {
            let ingest = sink.ingest_socket();
            scope.spawn(move || qlog_tests::flood::paced_vm(ingest, vm, FLOOD_HONEST_RATE, per_vm));
        }
    });
    let (latencies, lagged) = collector.join().expect("the collector does not panic");
    Ok(PhaseSamples { latencies, sent, lagged })
}

#[derive(Debug, Clone, serde::Serialize)]
struct BurstMeasure {
    limits: String,
    events: u64,
    seconds: f64,
    stored: u64,
    refused: u64,
    peak_rss_kib: u64,
}

/// A fresh qlogd takes a burst of `events` from one VM; its peak RSS afterwards.
fn burst_phase(events: u64, limits: &str, args: &[&str]) -> anyhow::Result<BurstMeasure> {
    let sink = qlog_tests::RunningSink::start(qlog_tests::SinkOptions {
        log_level: Some("warn".into()),
        args: args.iter().map(Into::into).collect(),
        ..qlog_tests::SinkOptions::default()
    });
    let start = Instant::now();
    let last = qlog_tests::flood::burst(sink.ingest_socket(), "bench-burst", events);
    let seconds = start.elapsed().as_secs_f64();
    if last != events {
        bail!("qlogd ended the burst at {last}, not {events}");
    }
    let peak_rss_kib = qlog_tests::flood::peak_rss_kib(sink.pid());
    let vms = qlog_tests::query_vms(sink.query_socket())?;
    let info = vms.vms.iter().find(|v| v.vm == "bench-burst").context("the burst VM is known")?;
    Ok(BurstMeasure {
        limits: limits.to_owned(),
        events,
        seconds,
        stored: info.events_stored,
        refused: info.events_refused_rate,
        peak_rss_kib,
    })
}

fn flood(opts: &Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    let work = tempdir()?;
    println!("machine: {}", machine());
    println!(
        "flood: {FLOOD_HONEST_VMS} VMs at {FLOOD_HONEST_RATE} events/s, {} rounds of {} s alone then {} s beside {FLOODER} \
         ({FLOOD_STREAMS} streams as fast as it can, garbage mixed in; bucket {} events/s, burst {})",
        opts.rounds, opts.seconds, opts.seconds, opts.flood_rate, opts.flood_burst
    );
    println!(
        "the flooder's sending threads run at nice {}{}\n",
        opts.flooder_nice,
        if opts.flooder_nice == 0 { ", competing with qlogd for the same cores" } else { "" }
    );
    let config =
        qlog_tests::flood::write_flood_config(&work, FLOODER, opts.flood_rate, opts.flood_burst);
    let sink = qlog_tests::RunningSink::start(qlog_tests::SinkOptions {
        log_level: Some("warn".into()),
        args: vec!["--config".into(), config.into_os_string()],
        ..qlog_tests::SinkOptions::default()
    });
    let names: Vec<String> = (0..FLOOD_HONEST_VMS).map(|i| format!("bench-honest{i}")).collect();

    // Rounds of without, then with, so that drift on a shared machine (other builds,
    // the disk's own moods) hits both phases alike.
    let (mut alone, mut flooded) = (PhaseSamples::default(), PhaseSamples::default());
    let mut report = qlog_tests::flood::FloodReport::default();
    for round in 1..=opts.rounds {
        alone.add(honest_phase(&sink, &names, opts.seconds)?);
        let flooder = qlog_tests::flood::Flooder::start_niced(
            sink.ingest_socket(),
            FLOODER,
            FLOOD_STREAMS,
            opts.flooder_nice,
        );
        flooded.add(honest_phase(&sink, &names, opts.seconds)?);
        let r = flooder.stop();
        report.streams = r.streams;
        report.clean_sessions += r.clean_sessions;
        report.garbage_sessions += r.garbage_sessions;
        report.garbage_connections += r.garbage_connections;
        eprintln!("round {round} of {} done", opts.rounds);
    }
    let (alone, flooded) = (alone.summary("without flood"), flooded.summary("with flood"));
    let flood_rss_kib = qlog_tests::flood::peak_rss_kib(sink.pid());
    let vms = qlog_tests::query_vms(sink.query_socket())?;
    let flood_info =
        vms.vms.iter().find(|v| v.vm == FLOODER).context("the flooder is known")?.clone();
    let honest_refused: u64 =
        vms.vms.iter().filter(|v| v.vm != FLOODER).map(|v| v.events_refused_rate).sum();
    let flood_sent: u64 = report.streams.iter().map(|(_, last)| last).sum();
    drop(sink);

    let bursts = vec![
        burst_phase(opts.events, "default", &[])?,
        burst_phase(opts.events, "off", &NO_RATE_LIMIT)?,
    ];

    println!(
        "{:<14} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "phase", "sent", "seen", "lagged", "p50 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    for p in [&alone, &flooded] {
        println!(
            "{:<14} {:>8} {:>8} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            p.phase, p.sent, p.seen, p.lagged, p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms
        );
    }
    let ratio = flooded.p99_ms / alone.p99_ms;
    println!(
        "\np99 with flood / p99 without: x{ratio:.2} (p50 x{:.2})",
        flooded.p50_ms / alone.p50_ms
    );
    println!(
        "{FLOODER}: sent {flood_sent} events in {} sessions ({} ended in garbage) plus {} garbage connections; \
         stored {}, refused {}, rejected {}; honest VMs refused {honest_refused}",
        report.clean_sessions + report.garbage_sessions,
        report.garbage_sessions,
        report.garbage_connections,
        flood_info.events_stored,
        flood_info.events_refused_rate,
        flood_info.frames_rejected
    );
    println!("qlogd peak RSS over both phases: {} MiB", flood_rss_kib / 1024);
    println!();
    for b in &bursts {
        println!(
            "burst of {} events from one VM, rate limits {:<7}: {:.1} s, stored {}, refused {}, qlogd peak RSS {} MiB",
            b.events,
            b.limits,
            b.seconds,
            b.stored,
            b.refused,
            b.peak_rss_kib / 1024
        );
    }

    let path = opts.out.join("flood.json");
    let doc = serde_json::json!({
        "benchmark": "flood",
        "machine": machine(),
        "seconds": opts.seconds,
        "rounds": opts.rounds,
        "flooder_nice": opts.flooder_nice,
        "honest_vms": FLOOD_HONEST_VMS,
        "honest_rate": FLOOD_HONEST_RATE,
        "flood_bucket": { "events_per_sec": opts.flood_rate, "burst_events": opts.flood_burst },
        "phases": [alone, flooded],
        "p99_ratio": ratio,
        "flooder": {
            "sent": flood_sent,
            "sessions": report.clean_sessions + report.garbage_sessions,
            "garbage_sessions": report.garbage_sessions,
            "garbage_connections": report.garbage_connections,
            "stored": flood_info.events_stored,
            "refused": flood_info.events_refused_rate,
            "rejected": flood_info.frames_rejected,
        },
        "honest_refused": honest_refused,
        "peak_rss_kib": flood_rss_kib,
        "bursts": bursts,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    println!("\nresults written to {}", path.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
