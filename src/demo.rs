//! `qlog demo`: qlog working end to end on one machine, with no Qubes and no root.
//!
//! Starts qlogd on a temporary state directory and simulated VMs, each running the real
//! `qlog-agent` through the qrexec test double, which plays qrexec's part (it names the
//! calling VM in the descriptor, as dom0 does). Three VMs send realistic traffic; one
//! compromised VM floods, claims to be other VMs, and sends garbage. The demo shows a live
//! tail of the honest VMs, then the VM table with the flooder held to its own quota, and
//! writes a redacted support bundle of it all to the current directory.
//! Every child dies with the demo (PR_SET_PDEATHSIG), and the state directory is removed
//! at the end unless `--keep`.

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qlog_rpc::query::{EventsQuery, Request};
use qlog_workload::{write_export, Workload};

use crate::client::{Client, Reply};
use crate::output::{Format, Printer};

const HONEST_VMS: &[&str] = &["sd-app", "sd-proxy", "sd-devices"];
const FLOODER: &str = "sd-compromised";
/// Small enough that the flooder reaches it within the demo.
const DEMO_QUOTA: &str = "4MiB";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub struct DemoOptions {
    pub keep: bool,
    pub seconds: u64,
    pub journal: bool,
}

/// The demo's processes; dropping it stops them all.
struct Running {
    children: Vec<(String, Child)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn run(opts: DemoOptions) -> anyhow::Result<ExitCode> {
    let bin = sibling_dir()?;
    for name in ["qlogd", "qlog-agent", "qrexec-client-vm"] {
        if !bin.join(name).exists() {
            bail!("{} is missing next to qlog: build everything first with cargo build --release --workspace", name);
        }
    }
    install_interrupt_handler();
    let dir = std::env::temp_dir().join(format!("qlog-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = demo(&bin, &dir, &opts);
    if opts.keep {
        println!("\nstate kept in {} (qlogd.log, store, sockets)", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn demo(bin: &Path, dir: &Path, opts: &DemoOptions) -> anyhow::Result<ExitCode> {
    let mut running = Running { children: Vec::new() };
    let ingest = dir.join("ingest.sock");
    let query = dir.join("query.sock");
    let rpc_dir = dir.join("qubes-rpc");
    std::fs::create_dir_all(&rpc_dir)?;
    std::os::unix::fs::symlink(&ingest, rpc_dir.join("qlog.Ingest"))?;

    println!("qlog demo: starting qlogd in {} (per-VM quota {DEMO_QUOTA})", dir.display());
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;
    let log = std::fs::File::create(dir.join("qlogd.log"))?;
    let qlogd = with_parent_death(Command::new(bin.join("qlogd")))
        .args(["--config", "/dev/null", "--vm-quota", DEMO_QUOTA, "--state-dir"])
        .arg(dir.join("store"))
        .arg("--ingest-socket")
        .arg(&ingest)
        .arg("--query-socket")
        .arg(&query)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start qlogd")?;
    running.children.push(("qlogd".into(), qlogd));
    let mut buf = [0u8; 64];
    notify
        .recv(&mut buf)
        .context("qlogd did not become ready within 30 s; see qlogd.log with --keep")?;

    // Honest VMs: a steady trickle of realistic journald entries each.
    for (i, vm) in HONEST_VMS.iter().enumerate() {
        let child = spawn_agent(bin, &rpc_dir, vm, "journal")?;
        running.children.push(((*vm).into(), child));
        let stdin = running
            .children
            .last_mut()
            .expect("just pushed")
            .1
            .stdin
            .take()
            .expect("stdin is piped");
        let workload = Workload::new(i as u64 + 1, vm).starting_at(now_usec());
        feed(stdin, workload, Duration::from_millis(150), false);
    }
    // The compromised VM: as fast as it can, lying about who it is.
    let child = spawn_agent(bin, &rpc_dir, FLOODER, "journal")?;
    running.children.push((FLOODER.into(), child));
    let stdin =
        running.children.last_mut().expect("just pushed").1.stdin.take().expect("stdin is piped");
    feed(stdin, Workload::new(99, FLOODER), Duration::ZERO, true);
    // ... and garbage on fresh connections, as a broken or hostile qrexec client would send.
    let garbage_stop = Arc::new(AtomicBool::new(false));
    spawn_garbage(&ingest, Arc::clone(&garbage_stop));

    if opts.journal
        && (Path::new("/run/log/journal").exists() || Path::new("/var/log/journal").exists())
    {
        let child = spawn_agent(bin, &rpc_dir, "this-machine", "journal-source")?;
        running.children.push(("this-machine".into(), child));
    }

    println!(
        "simulated VMs: {} (honest), {FLOODER} (floods, forges names, sends garbage)\n",
        HONEST_VMS.join(", ")
    );
    println!(
        "── qlog tail {} ── (live for {} s; Ctrl-C stops the demo)",
        HONEST_VMS.join(" "),
        opts.seconds
    );
    tail(&query, opts.seconds)?;
    garbage_stop.store(true, Ordering::Relaxed);
    if INTERRUPTED.load(Ordering::Relaxed) {
        println!("\ninterrupted: stopping everything");
        return Ok(ExitCode::SUCCESS);
    }

    // The containment shown next is the quota at work: wait until it has acted.
    let trimmed = flooder_trimmed(&query, Duration::from_secs(60))?;
    if INTERRUPTED.load(Ordering::Relaxed) {
        println!("\ninterrupted: stopping everything");
        return Ok(ExitCode::SUCCESS);
    }
    if !trimmed {
        println!("\n({FLOODER} has not reached its quota yet on this machine)");
    }
    println!("\n── what {FLOODER} claimed (qlog query {FLOODER} -n 3) ──");
    show(&query, &[FLOODER], 3)?;
    println!("\n── qlog vms ──");
    crate::vms::show(&query, false)?;
    println!(
        "\n{FLOODER} is held to its own {DEMO_QUOTA} quota: its oldest events were removed (DROPPED) and its"
    );
    println!("garbage connections rejected (REJECTED), while the honest VMs lost nothing.");
    println!("Its events are stored under its own name whatever they claim (see the [claims ...] marks).");
    // A redacted support bundle of what was just collected, as an operator would make one
    // for support staff: it stays in the current directory.
    let bundle = std::env::current_dir()?.join(format!("qlog-demo-{}.tar.zst", std::process::id()));
    println!("\n── qlog export -o {} ──", bundle.display());
    let qlog = std::env::current_exe().context("cannot find the qlog binary's own path")?;
    let status = Command::new(&qlog)
        .arg("--socket")
        .arg(&query)
        .arg("export")
        .arg("-o")
        .arg(&bundle)
        .status()?;
    if status.success() {
        let _ = Command::new(&qlog).args(["bundle", "inspect"]).arg(&bundle).status();
        println!("\nredacted support bundle written to {}", bundle.display());
        println!(
            "(addresses, onion services, names, keys and VM names are replaced by keyed tokens;"
        );
        println!(" check it with: qlog bundle verify {})", bundle.display());
    } else {
        println!("the export failed ({status}); nothing was written");
    }
    if opts.keep {
        println!("\nTry it yourself: QLOG_QUERY_SOCKET={} qlog tail", query.display());
    } else {
        println!("\nTo look around yourself, run the demo with --keep.");
    }
    Ok(ExitCode::SUCCESS)
}

/// True once the flooder has lost events to its quota, false if `limit` passes first.
fn flooder_trimmed(query: &Path, limit: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
        let vms = Client::vms(query)?;
        if vms.vms.iter().any(|v| v.vm == FLOODER && v.events_dropped_quota > 0) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(false)
}

fn spawn_agent(bin: &Path, rpc_dir: &Path, vm: &str, stream: &str) -> anyhow::Result<Child> {
    let mut cmd = with_parent_death(Command::new(bin.join("qlog-agent")));
    cmd.args([
        "--log-vm",
        "sd-log",
        "--stream",
        stream,
        "--backoff-initial-ms",
        "200",
        "--backoff-max-ms",
        "2000",
    ])
    .arg("--qrexec-client")
    .arg(bin.join("qrexec-client-vm"))
    .env("QREXEC_DOUBLE_SERVICE_DIR", rpc_dir)
    .env("QREXEC_DOUBLE_SOURCE_VM", vm)
    .env("QREXEC_DOUBLE_TARGET", "sd-log")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if stream == "journal-source" {
        cmd.args(["--source", "journal"]);
    } else {
        cmd.args(["--source", "stdin", "--input-format", "export"]).stdin(Stdio::piped());
    }
    cmd.spawn().with_context(|| format!("cannot start qlog-agent for {vm}"))
}

/// Writes generated entries to an agent's stdin from a thread, every `pace`.
fn feed(mut stdin: std::process::ChildStdin, mut workload: Workload, pace: Duration, lie: bool) {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        loop {
            let mut e = workload.next_event();
            if lie {
                // A compromised VM can put anything in its own fields.
                e.fields.retain(|f| f.name != "_HOSTNAME");
                e.push("_HOSTNAME", "sd-app");
                e.push("_QLOG_VM", "dom0");
            }
            buf.clear();
            if write_export(&e, &mut buf).is_err() || stdin.write_all(&buf).is_err() {
                return;
            }
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
    });
}

/// Connects as qrexec would for the flooder, then sends bytes that are not the protocol.
fn spawn_garbage(ingest: &Path, stop: Arc<AtomicBool>) {
    let ingest = ingest.to_owned();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut s) = UnixStream::connect(&ingest) {
                let mut junk = format!("qlog.Ingest+ {FLOODER}\0").into_bytes();
                junk.extend((0..512).map(|i| (i as u64 * 2_654_435_761 + n) as u8));
                let _ = s.write_all(&junk);
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
    });
}

fn tail(query: &Path, seconds: u64) -> anyhow::Result<()> {
    let vms = HONEST_VMS.iter().map(|s| s.to_string()).collect();
    let q = EventsQuery {
        vms: vms_with_wait(query, vms)?,
        limit: Some(5),
        follow: true,
        ..Default::default()
    };
    let mut client = Client::connect(query)?;
    client.send(&Request::Events(q))?;
    let printer = Printer {
        format: Format::Short,
        color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // The follow connection would block in a read; a watcher ends it at the deadline.
    let stop = client.try_clone_stream()?;
    std::thread::spawn(move || {
        while Instant::now() < deadline && !INTERRUPTED.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = stop.shutdown(std::net::Shutdown::Both);
    });
    let mut out = std::io::stdout().lock();
    while let Ok(Some(reply)) = client.next_reply() {
        if let Reply::Record(r) = reply {
            printer.print(&r.view()?, &mut out)?;
            out.flush()?;
        }
    }
    Ok(())
}

/// The honest VMs appear once their agents' first events are stored.
fn vms_with_wait(query: &Path, vms: Vec<String>) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let known = Client::vms(query)?.vms.into_iter().map(|v| v.vm).collect::<Vec<_>>();
        if vms.iter().all(|v| known.contains(v)) {
            return Ok(vms);
        }
        if Instant::now() > deadline {
            bail!("the simulated VMs did not connect within 30 s; rerun with --keep and read qlogd.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn show(query: &Path, vms: &[&str], n: u64) -> anyhow::Result<()> {
    let q = EventsQuery {
        vms: vms.iter().map(|s| s.to_string()).collect(),
        limit: Some(n),
        ..Default::default()
    };
    let mut client = Client::connect(query)?;
    client.send(&Request::Events(q))?;
    let printer = Printer { format: Format::Short, color: false };
    let mut out = std::io::stdout().lock();
    while let Some(Reply::Record(r)) = client.next_reply()? {
        printer.print(&r.view()?, &mut out)?;
    }
    Ok(())
}

fn now_usec() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn with_parent_death(mut cmd: Command) -> Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

fn install_interrupt_handler() {
    extern "C" fn on_sigint(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

fn sibling_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the qlog binary's own path")?;
    Ok(exe.parent().context("the qlog binary has a directory")?.to_owned())
}
