//! `qlog-bench`: qlog's performance claims, each measured beside a peer in the same run.
//!
//! `qlog-bench ingest` feeds the same generated stream (see `qlog_tests::workload`) to
//! systemd-journal-remote and to qlogd with durable acks, once from one VM and once from
//! eight VMs at once, and prints entries/s, MB/s, peak RSS and bytes on disk per entry
//! for both, with qlogd's figures as ratios of the peer's. Results also go to a JSON
//! file. This is a benchmark, not a test: nothing here asserts a number.

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
use qlog_tests::workload::{write_export, Workload};

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";

struct Options {
    events: u64,
    /// VM counts to run; by default 1 and 8.
    vm_counts: Vec<usize>,
    /// Keep the work directories for inspection.
    keep: bool,
    seed: u64,
    out: PathBuf,
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
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--events" => opts.events = args.next().context("--events needs a number")?.parse()?,
            "--vms" => opts.vm_counts = args.next().context("--vms needs a list like 1,8")?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--keep" => opts.keep = true,
            "--seed" => opts.seed = args.next().context("--seed needs a number")?.parse()?,
            "--out" => opts.out = args.next().context("--out needs a directory")?.into(),
            other => bail!("unknown option {other}; usage: qlog-bench [ingest] [--events N] [--vms 1,8] [--seed N] [--out DIR] [--keep]"),
        }
    }
    match what.as_str() {
        "ingest" => ingest(&opts),
        other => bail!("unknown benchmark {other}; available: ingest"),
    }
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
        let m = run_qlogd(&qlogd, &work.join("qlogd"), &names, frames, entries, input_bytes)?;
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
            std::thread::spawn(move || send_stream(&ingest, &vm, frames))
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
fn send_stream(ingest: &Path, vm: &str, frames: Vec<u8>) -> anyhow::Result<u64> {
    let mut sock = UnixStream::connect(ingest)?;
    let mut head = format!("qlog.Ingest+ {vm}\0").into_bytes();
    let hello = Hello {
        versions: vec![1],
        agent: "qlog-bench".into(),
        stream: "journal".into(),
        limits: None,
        heartbeat_interval_secs: None,
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
    if welcome.resume.last_seq != 0 {
        bail!("benchmark expects an empty store");
    }
    let count = count_frames(&frames);
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

fn count_frames(frames: &[u8]) -> u64 {
    let mut dec = FrameDecoder::new(Limits::DEFAULT);
    dec.feed(frames);
    let mut n = 0;
    while let Ok(Some(_)) = dec.next_frame() {
        n += 1;
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

fn tempdir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("QLOG_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base.join(format!("qlog-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}
