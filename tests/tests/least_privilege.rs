//! Least privilege, tested with real users: who may query, who may reach the ingest
//! socket, that qlogd runs as an unprivileged user of its own, and that no qlog process
//! opens a network socket.
//!
//! Every test here needs root (CI runs them as root): they create groups with `groupadd`
//! (removed again on drop), give qlogd's sockets to them, and run `qlog`, qlogd and raw
//! socket clients under unprivileged uids that have no account, switching with
//! setgroups, setgid and setuid between fork and exec. Run as another user they say they
//! were skipped, and under `CI=true` they fail instead.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use qlog_rpc::fields::MESSAGE;
use qlog_rpc::query::EventsQuery;
use qlog_rpc::{Event, FrameType};
use qlog_tests::ingest::descriptor;
use qlog_tests::notify::NotifySocket;
use qlog_tests::process::{die_with_parent_thread, kill_and_reap, log_stdio, poll_readable};
use qlog_tests::{
    bin_path, hello, ingest_events, ingest_events_at, query_events, AgentOptions, JournalNamespace,
    RunningAgent, RunningSink, SinkOptions, IO_TIMEOUT, STARTUP_TIMEOUT,
};

/// Uids with no account and no group of their own: an operator outside every qlog group,
/// one inside the query group, and qlogd's own user.
const OUTSIDER: u32 = 64_101;
const MEMBER: u32 = 64_102;
const DAEMON_USER: u32 = 64_103;

fn message(text: &str) -> Event {
    let mut event = Event::new();
    event.push(MESSAGE, text);
    event
}

fn stored_messages(query_socket: &Path, vm: &str) -> Vec<String> {
    let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
    match query_events(query_socket, &query) {
        Ok(records) => records
            .iter()
            .map(|r| r.event.get_str(MESSAGE).unwrap_or_default().to_owned())
            .collect(),
        Err(e) if e.refusal().is_some_and(|f| f.code == qlog_rpc::ErrorCode::UnknownVm) => {
            Vec::new()
        }
        Err(e) => panic!("qlogd answers an events query: {e}"),
    }
}

/// Serialises groupadd and groupdel within this test binary: both lock /etc/group, and
/// one that finds the lock taken fails instead of waiting.
static ETC_GROUP: Mutex<()> = Mutex::new(());

/// A group made for one test with `groupadd`; dropping it runs `groupdel`.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn create(purpose: &str) -> TempGroup {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("qlt-{purpose}-{}-{n}", std::process::id());
        assert!(name.len() <= 32, "group names are at most 32 characters: {name}");
        let _lock = ETC_GROUP.lock().unwrap_or_else(|e| e.into_inner());
        run_group_tool("groupadd", &name);
        let gid = group_gid(&name).unwrap_or_else(|| panic!("groupadd made no group {name}"));
        TempGroup { name, gid }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _lock = ETC_GROUP.lock().unwrap_or_else(|e| e.into_inner());
        run_group_tool("groupdel", &self.name);
    }
}

/// Runs groupadd or groupdel, retrying while another process (another test binary,
/// apt) holds the lock on /etc/group: exit status 10 is "cannot lock".
fn run_group_tool(tool: &str, name: &str) {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let output = Command::new(tool).arg(name).output().unwrap_or_else(|e| {
            panic!("cannot run {tool} (these tests need the shadow utilities): {e}")
        });
        if output.status.success() {
            return;
        }
        let locked = output.status.code() == Some(10);
        assert!(
            locked && Instant::now() < deadline,
            "{tool} {name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        // Only a retry pace: success is decided by the tool's exit status.
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn group_gid(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group is readable");
    groups.lines().find_map(|line| {
        let mut parts = line.split(':');
        (parts.next() == Some(name)).then(|| parts.nth(1)?.parse().ok()).flatten()
    })
}

/// Makes `command` run as `uid` with primary group `gid` and exactly the supplementary
/// `groups`, and still die with the thread that spawns it.
fn run_as<'a>(command: &'a mut Command, uid: u32, gid: u32, groups: &[u32]) -> &'a mut Command {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: between fork and exec the closure makes only async-signal-safe system
    // calls and does not allocate (the group list was built before the fork).
    unsafe {
        command.pre_exec(move || drop_privileges(uid, gid, &groups));
    }
    // The parent-death signal is cleared when credentials change, so it is set after.
    die_with_parent_thread(command)
}

/// setgroups, setgid, setuid: in that order, since each needs the privilege the next
/// one gives up.
fn drop_privileges(uid: u32, gid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0
        || unsafe { libc::setgid(gid) } != 0
        || unsafe { libc::setuid(uid) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to the Unix socket at `path` as `uid` with `groups`, as any local user can
/// try, and writes `bytes` (a forged descriptor, a hello, events) if the connection is
/// made. The error is the one `connect` gave.
///
/// The connection is made in a child between fork and exec, so that the test process
/// keeps its own credentials; an error there comes back as the error of `spawn`.
fn connect_as(path: &Path, uid: u32, groups: &[u32], bytes: Vec<u8>) -> io::Result<()> {
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value to fill in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path_bytes = path.as_os_str().as_bytes();
    assert!(path_bytes.len() < addr.sun_path.len(), "socket path too long: {}", path.display());
    for (dst, &src) in addr.sun_path.iter_mut().zip(path_bytes) {
        *dst = src as libc::c_char;
    }
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut command = Command::new("true");
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: between fork and exec the closure makes only async-signal-safe system
    // calls on values prepared before the fork, and does not allocate.
    unsafe {
        command.pre_exec(move || {
            drop_privileges(uid, uid, &groups)?;
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut sent = 0;
            while sent < bytes.len() {
                let n = libc::write(fd, bytes[sent..].as_ptr().cast(), bytes.len() - sent);
                if n <= 0 {
                    return Err(io::Error::last_os_error());
                }
                sent += n as usize;
            }
            // The descriptor is closed at exec: that is the peer's end of stream.
            Ok(())
        });
    }
    let status = command.spawn()?.wait()?;
    assert!(status.success(), "true exited with {status}");
    Ok(())
}

/// Lets users other than root traverse (not list) a test directory, as /run/qlog is
/// for the packaged qlogd.
fn open_for_traversal(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .expect("root can change the mode of its temp dir");
}

/// Runs the `qlog` CLI as `uid` with `groups`, against `socket`.
fn qlog_as(uid: u32, groups: &[u32], socket: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(bin_path("qlog"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("QLOG_") {
            command.env_remove(&name);
        }
    }
    command.arg("--socket").arg(socket).args(args).stdin(Stdio::null());
    run_as(&mut command, uid, uid, groups);
    command.output().expect("qlog can be run as another user")
}

#[test]
fn query_socket_admits_its_group_and_tells_everyone_else_which_group_that_is() {
    if !JournalNamespace::require_root() {
        return;
    }
    let readers = TempGroup::create("q");
    let args = vec!["--query-group".into(), readers.name.clone().into()];
    let sink = RunningSink::start(SinkOptions { args, ..SinkOptions::default() });
    open_for_traversal(sink.dir());
    ingest_events(&sink, "sd-app", "journal", &[message("only for the query group")])
        .expect("qlogd stores the event");

    let meta = std::fs::metadata(sink.query_socket()).expect("the query socket exists");
    assert_eq!(meta.mode() & 0o7777, 0o660, "the query socket's mode");
    assert_eq!(meta.gid(), readers.gid, "the query socket's group");

    // Outside the group: refused by the socket's mode, with a message that names the
    // socket and the group, and says how to join it.
    let socket = sink.query_socket().display().to_string();
    for args in [&["vms"][..], &["tail", "--no-follow", "sd-app"], &["query", "sd-app"]] {
        let refused = qlog_as(OUTSIDER, &[], sink.query_socket(), args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "qlog {args:?} as an outsider: {stderr}");
        assert!(refused.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&refused.stdout));
        assert!(stderr.contains(&format!("permission denied on {socket}")), "{stderr}");
        assert!(stderr.contains(&format!("only members of group {}", readers.name)), "{stderr}");
        assert!(stderr.contains(&format!("adduser $USER {}", readers.name)), "{stderr}");
    }

    // A member, through a supplementary group as `adduser` would make it.
    let admitted = qlog_as(MEMBER, &[readers.gid], sink.query_socket(), &["vms"]);
    let stdout = String::from_utf8_lossy(&admitted.stdout);
    assert!(admitted.status.success(), "{}", String::from_utf8_lossy(&admitted.stderr));
    assert!(stdout.contains("sd-app"), "{stdout}");
    let admitted =
        qlog_as(MEMBER, &[readers.gid], sink.query_socket(), &["tail", "--no-follow", "sd-app"]);
    let stdout = String::from_utf8_lossy(&admitted.stdout);
    assert!(admitted.status.success(), "{}", String::from_utf8_lossy(&admitted.stderr));
    assert!(stdout.contains("only for the query group"), "{stdout}");
}

#[test]
fn unreachable_query_socket_is_explained_without_blaming_the_group() {
    if !JournalNamespace::require_root() {
        return;
    }
    // The sink's own directory is root's, mode 0700: the socket cannot even be looked
    // at, so qlog must not guess a group.
    let sink = RunningSink::start(SinkOptions::default());
    std::fs::set_permissions(sink.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let refused = qlog_as(OUTSIDER, &[], sink.query_socket(), &["vms"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    let socket = sink.query_socket().display();
    assert!(stderr.contains(&format!("permission denied on {socket}")), "{stderr}");
    assert!(stderr.contains("a directory on the way to it is closed to you"), "{stderr}");
}

#[test]
fn ingest_socket_refuses_local_users_outside_its_group() {
    if !JournalNamespace::require_root() {
        return;
    }
    // In production the group is qubes, whose members qrexec's agent may run as.
    let qrexec = TempGroup::create("i");
    let args = vec!["--ingest-group".into(), qrexec.name.clone().into()];
    let sink = RunningSink::start(SinkOptions { args, ..SinkOptions::default() });
    open_for_traversal(sink.dir());

    let meta = std::fs::metadata(sink.ingest_socket()).expect("the ingest socket exists");
    assert_eq!(meta.mode() & 0o7777, 0o660, "the ingest socket's mode");
    assert_eq!(meta.gid(), qrexec.gid, "the ingest socket's group");
    // SAFETY: geteuid has no preconditions; qlogd runs as this test's user.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() }, "owned by qlogd's user");

    let forged = |vm: &str| {
        let mut bytes = descriptor(vm, "");
        bytes.extend(qlog_rpc::message::encode_json(FrameType::Hello, &hello("journal")));
        let mut payload = Vec::new();
        qlog_rpc::event::encode_event_payload(1, &message("forged"), &mut payload);
        bytes.extend(qlog_rpc::frame::encode_to_vec(FrameType::Event, &payload));
        bytes
    };

    // A local user outside the group cannot connect at all, so cannot name a VM.
    let error = connect_as(sink.ingest_socket(), OUTSIDER, &[], forged("sd-forged"))
        .expect_err("an outsider's connect is refused");
    assert_eq!(error.raw_os_error(), Some(libc::EACCES), "{error}");
    // Neither through the qrexec double (the path a caller's tooling would take).
    let status = {
        let mut command = Command::new(bin_path("qrexec-client-vm"));
        command
            .args(["sd-log", qlog_rpc::INGEST_SERVICE])
            .env("QREXEC_DOUBLE_SERVICE_DIR", sink.service_dir())
            .env("QREXEC_DOUBLE_SOURCE_VM", "sd-forged")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run_as(&mut command, OUTSIDER, OUTSIDER, &[]);
        command.status().expect("the double runs")
    };
    assert_eq!(status.code(), Some(125), "qrexec's 'cannot connect' exit code");

    // A member of the group is trusted as qrexec is: whatever descriptor it writes is
    // believed. That is why the group must hold nobody but qrexec's agent.
    connect_as(sink.ingest_socket(), MEMBER, &[qrexec.gid], forged("sd-member"))
        .expect("a member of the ingest group connects");
    let member = wait_for_messages(sink.query_socket(), "sd-member", 1);
    assert_eq!(member, ["forged"]);
    assert!(stored_messages(sink.query_socket(), "sd-forged").is_empty());
}

/// Waits until qlogd holds `count` events of `vm`, following its live feed. Every VM is
/// followed, since a query naming a VM not yet known is refused.
fn wait_for_messages(query_socket: &Path, vm: &str, count: usize) -> Vec<String> {
    let mut follower =
        qlog_tests::Follower::start(query_socket, EventsQuery::default()).expect("follow");
    let mut records: Vec<_> =
        follower.wait_done(IO_TIMEOUT).into_iter().filter(|r| r.vm == vm).collect();
    while records.len() < count {
        let record = follower.next_record(IO_TIMEOUT);
        if record.vm == vm {
            records.push(record);
        }
    }
    records.iter().map(|r| r.event.get_str(MESSAGE).unwrap_or_default().to_owned()).collect()
}

/// A qlogd this file starts itself, for what the harness does not do: another uid, a
/// umask of 0. Dropping it SIGKILLs qlogd.
struct OwnQlogd {
    child: Child,
    log: PathBuf,
}

impl OwnQlogd {
    /// Starts qlogd with `args` and waits for its readiness, or for it to exit.
    fn start(
        dir: &Path,
        args: &[&std::ffi::OsStr],
        setup: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
    ) -> Result<OwnQlogd, (String, String)> {
        let notify = NotifySocket::bind(&dir.join("notify.sock")).expect("bind notify socket");
        // The daemon may run as another user, which must be able to send to it.
        std::fs::set_permissions(notify.path(), std::fs::Permissions::from_mode(0o666))
            .expect("root can open its notify socket");
        let log = dir.join("qlogd.log");
        let (stdout, stderr) = log_stdio(&log);
        let mut command = Command::new(bin_path("qlogd"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("QLOG_") {
                command.env_remove(&name);
            }
        }
        command
            .args(args)
            .args(["--log-level", "info"])
            .env("NOTIFY_SOCKET", notify.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the callers' closures make only async-signal-safe calls.
        unsafe { command.pre_exec(setup) };
        die_with_parent_thread(&mut command);
        let mut child = command.spawn().expect("qlogd can be spawned");
        match notify.wait_ready(&mut child, STARTUP_TIMEOUT) {
            Ok(()) => Ok(OwnQlogd { child, log }),
            Err(why) => {
                kill_and_reap(&mut child);
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Err((why.to_string(), text))
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OwnQlogd {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if std::thread::panicking() {
            eprintln!("----- qlogd's log -----\n{}", self.log());
        }
    }
}

fn status_line(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("qlogd runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn qlogd_runs_as_an_unprivileged_user_that_owns_its_state() {
    if !JournalNamespace::require_root() {
        return;
    }
    // The packaged layout: /run/qlog and /var/lib/qlog belong to qlogd's user.
    let dir = tempfile::Builder::new().prefix("qlog-lp.").tempdir_in("/tmp").expect("tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    let state = dir.path().join("state");
    for (path, mode) in [(&run, 0o755), (&state, 0o750)] {
        std::fs::create_dir(path).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(path, Some(DAEMON_USER), Some(DAEMON_USER)).unwrap();
    }
    let ingest = run.join("ingest.sock");
    let query = run.join("query.sock");
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--ingest-socket".as_ref(),
        ingest.as_os_str(),
        "--query-socket".as_ref(),
        query.as_os_str(),
    ];
    let qlogd =
        OwnQlogd::start(dir.path(), &args, || drop_privileges(DAEMON_USER, DAEMON_USER, &[]))
            .unwrap_or_else(|(why, log)| panic!("qlogd as uid {DAEMON_USER}: {why}\n{log}"));

    // No privilege of any kind: every uid and gid is its own, no capability.
    let pid = qlogd.child.id();
    let uid = DAEMON_USER.to_string();
    assert_eq!(status_line(pid, "Uid:"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_line(pid, "Gid:"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_line(pid, "Groups:"), "");
    assert_eq!(status_line(pid, "CapEff:"), "0000000000000000");
    assert!(!qlogd.log().contains("running as root"), "{}", qlogd.log());

    // Ingest (root stands in for qrexec's agent) and queries work.
    let events: Vec<Event> = (1..=100).map(|i| message(&format!("unprivileged {i}"))).collect();
    assert_eq!(ingest_events_at(&ingest, "sd-app", "journal", &events).expect("stored"), 100);
    let stored = stored_messages(&query, "sd-app");
    assert_eq!(stored.len(), 100);
    assert_eq!(stored[99], "unprivileged 100");

    // Everything it wrote is its own.
    let mut pending = vec![state.clone()];
    let mut files = 0;
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.uid(), DAEMON_USER, "{} belongs to qlogd's user", path.display());
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        files += 1;
    }
    assert!(files > 2, "the store has files");
    for socket in [&ingest, &query] {
        let meta = std::fs::metadata(socket).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (DAEMON_USER, 0o660), "{socket:?}");
    }
}

#[test]
fn qlogd_as_an_unprivileged_user_names_the_state_dir_it_cannot_write() {
    if !JournalNamespace::require_root() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("qlog-lp.").tempdir_in("/tmp").expect("tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // root's, mode 0755: readable, not writable, by qlogd's user.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let ingest = dir.path().join("ingest.sock");
    let query = dir.path().join("query.sock");
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--ingest-socket".as_ref(),
        ingest.as_os_str(),
        "--query-socket".as_ref(),
        query.as_os_str(),
    ];
    let (why, log) =
        match OwnQlogd::start(dir.path(), &args, || drop_privileges(DAEMON_USER, DAEMON_USER, &[]))
        {
            Ok(_) => panic!("qlogd started over a state dir it cannot write"),
            Err(failure) => failure,
        };
    assert!(why.contains("exited"), "{why}");
    assert!(log.contains(&state.display().to_string()), "the error names the state dir: {log}");
}

#[test]
fn qlogd_started_as_root_warns_that_it_needs_no_privileges() {
    if !JournalNamespace::require_root() {
        return;
    }
    // A warning, not a refusal: developers and these tests start qlogd as root.
    let sink = RunningSink::start(SinkOptions::default());
    let log = sink.log_tail();
    assert!(log.contains("running as root: qlogd needs no privileges"), "{log}");
}

/// An inotify instance watching one directory for new files and mode changes.
struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    fn new(dir: &Path) -> DirWatch {
        // SAFETY: inotify_init1 takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(fd >= 0, "inotify_init1: {}", io::Error::last_os_error());
        // SAFETY: the kernel just gave us this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(dir.as_os_str().as_bytes()).expect("no NUL in temp paths");
        let mask = libc::IN_CREATE | libc::IN_ATTRIB;
        // SAFETY: the descriptor is an inotify instance and the path a valid C string.
        let rc = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
        assert!(rc >= 0, "inotify_add_watch: {}", io::Error::last_os_error());
        DirWatch { fd }
    }

    /// Waits up to `timeout` for events; returns the names they concern.
    fn names(&self, timeout: Duration) -> Vec<String> {
        let _ = poll_readable(&[self.fd.as_raw_fd()], timeout);
        let mut names = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: buf is valid for its length; the descriptor is non-blocking.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return names;
            }
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote a whole inotify_event at `at`; read_unaligned
                // copies it out whatever the buffer's alignment.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + header..at + header + event.len as usize];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                names.push(String::from_utf8_lossy(&name[..end]).into_owned());
                at += header + event.len as usize;
            }
        }
    }
}

#[test]
fn sockets_are_never_connectable_by_others_while_qlogd_sets_them_up() {
    if !JournalNamespace::require_root() {
        return;
    }
    // Under a umask of 0 a freshly bound socket would be mode 0777, connectable by
    // every local user until qlogd changed it: qlogd must not depend on its umask.
    let ingest_group = TempGroup::create("u");
    let dir = tempfile::Builder::new().prefix("qlog-lp.").tempdir_in("/tmp").expect("tmp");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let state = dir.path().join("state");
    let watch = DirWatch::new(&run);
    let (ingest, query) = (run.join("ingest.sock"), run.join("query.sock"));
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--ingest-socket".as_ref(),
        ingest.as_os_str(),
        "--query-socket".as_ref(),
        query.as_os_str(),
        "--ingest-group".as_ref(),
        ingest_group.name.as_ref(),
    ];

    // Every state a socket file is seen in, from its creation on, until qlogd is ready.
    let seen: Arc<Mutex<Vec<(String, u32, u32)>>> = Arc::default();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let watcher = {
        let seen = Arc::clone(&seen);
        let run = run.clone();
        std::thread::spawn(move || loop {
            for name in watch.names(Duration::from_millis(50)) {
                if let Ok(meta) = std::fs::symlink_metadata(run.join(&name)) {
                    seen.lock().unwrap().push((name, meta.mode() & 0o7777, meta.gid()));
                }
            }
            if stop_rx.try_recv().is_ok() {
                return;
            }
        })
    };
    let qlogd = OwnQlogd::start(dir.path(), &args, || {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(0) };
        Ok(())
    })
    .unwrap_or_else(|(why, log)| panic!("qlogd under umask 0: {why}\n{log}"));
    stop_tx.send(()).unwrap();
    watcher.join().unwrap();

    let own_gid = std::fs::metadata(dir.path()).unwrap().gid();
    let seen = seen.lock().unwrap().clone();
    for socket in ["ingest.sock", "query.sock"] {
        let states: Vec<_> = seen.iter().filter(|(name, ..)| name == socket).collect();
        assert!(!states.is_empty(), "{socket} was seen: {seen:?}");
        let final_gid = if socket == "ingest.sock" { ingest_group.gid } else { own_gid };
        for (_, mode, gid) in &states {
            let owner_only = *mode == 0o600;
            let final_state = *mode == 0o660 && *gid == final_gid;
            assert!(owner_only || final_state, "{socket} was mode {mode:o} gid {gid}: {states:?}");
        }
        let meta = std::fs::metadata(run.join(socket)).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o660, final_gid), "{socket}");
    }
    eprintln!("socket states seen while qlogd started under umask 0: {seen:?}");
    drop(qlogd);
}

/// The socket inodes a process holds, from its /proc/PID/fd links.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inodes listed in /proc/PID/net/TABLE (the process's network namespace).
fn table_inodes(pid: u32, table: &str) -> HashSet<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
    // unix: Num RefCount Protocol Flags Type St Inode [Path]; tcp, udp and raw (and
    // their 6 forms): sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
    let column = if table == "unix" { 6 } else { 9 };
    text.lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(column)?.parse().ok())
        .collect()
}

const INET_TABLES: [&str; 6] = ["tcp", "tcp6", "udp", "udp6", "raw", "raw6"];

/// Asserts every socket `pid` holds is AF_UNIX and none is an inet socket; returns how
/// many sockets it holds.
fn assert_only_unix_sockets(what: &str, pid: u32) -> usize {
    let unix_before = table_inodes(pid, "unix");
    let held = socket_inodes(pid);
    let unix: HashSet<u64> = unix_before.union(&table_inodes(pid, "unix")).copied().collect();
    for table in INET_TABLES {
        let inet = table_inodes(pid, table);
        let found: Vec<_> = held.iter().filter(|inode| inet.contains(inode)).collect();
        assert!(found.is_empty(), "{what} (pid {pid}) holds {table} sockets {found:?}");
    }
    // A socket closed between the two reads is gone from both lists: only the ones it
    // still holds count.
    let still_held: HashSet<u64> = socket_inodes(pid).into_iter().collect();
    let other: Vec<_> =
        held.iter().filter(|i| !unix.contains(i) && still_held.contains(i)).collect();
    assert!(other.is_empty(), "{what} (pid {pid}) holds non-Unix sockets {other:?}");
    held.len()
}

/// Makes the calling thread, and every process it spawns from now on, die by SIGSYS at
/// any attempt to create an AF_INET or AF_INET6 socket. Only this thread is filtered.
fn forbid_inet_sockets_from_this_thread() {
    // The audit architecture the kernel reports for this build's system calls; on any
    // other architecture the filter would let everything through, and the probe in the
    // test says so.
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const AUDIT_ARCH: u32 = 0;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // seccomp_data: nr at 0, arch at 4, args[0] (low half, little-endian) at 16.
    let mut program = [
        insn(LD_W_ABS, 0, 0, 4),
        insn(JEQ_K, 0, 5, AUDIT_ARCH),
        insn(LD_W_ABS, 0, 0, 0),
        insn(JEQ_K, 0, 3, libc::SYS_socket as u32),
        insn(LD_W_ABS, 0, 0, 16),
        insn(JEQ_K, 2, 0, libc::AF_INET as u32),
        insn(JEQ_K, 1, 0, libc::AF_INET6 as u32),
        insn(RET_K, 0, 0, RET_ALLOW),
        insn(RET_K, 0, 0, RET_KILL_PROCESS),
    ];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY: prctl with these options reads only the program, which outlives the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let rc = libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog);
        assert_eq!(rc, 0, "cannot install the seccomp filter: {}", io::Error::last_os_error());
    }
}

#[test]
fn no_qlog_process_opens_a_network_socket() {
    if !JournalNamespace::require_root() {
        return;
    }
    // Everything runs on a thread of its own whose seccomp filter every child inherits:
    // a network socket anywhere kills its process, which the checks below would see.
    std::thread::spawn(no_network_sockets_while_everything_runs).join().expect("the checks passed");
}

/// Writes a line to the agent and waits for `qlog tail -f` to print it: proof that
/// events are flowing through every process at this moment.
fn marker(agent: &mut RunningAgent, tail: &mpsc::Receiver<String>, sink: &RunningSink, n: u32) {
    let text = format!("network check marker {n}");
    agent.write_stdin(format!("{text}\n").as_bytes());
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tail
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("qlog tail -f did not show {text:?}{}", sink.log_tail()));
        if line.contains(&text) {
            return;
        }
    }
}

fn no_network_sockets_while_everything_runs() {
    forbid_inet_sockets_from_this_thread();
    // The filter has teeth: a child of this thread that asks for an inet socket dies.
    let mut probe = Command::new("true");
    // SAFETY: socket is async-signal-safe; the child is killed inside it.
    unsafe {
        probe.pre_exec(|| {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            Ok(())
        });
    }
    let status = probe.status().expect("the probe runs");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGSYS),
        "{status}"
    );
    let sink = RunningSink::start(SinkOptions::default());
    // Enough stored that `qlog query -o json` fills its stdout pipe and stays connected
    // while we look at it.
    let bulk: Vec<Event> = (0..20_000).map(|i| message(&format!("bulk event {i:05}"))).collect();
    ingest_events(&sink, "sd-bulk", "journal", &bulk).expect("qlogd stores the bulk events");

    let mut agent = RunningAgent::spawn(
        AgentOptions::new(&sink, "sd-app").args(["--source", "stdin"]).fast_backoff(),
    );
    let mut tail = Command::new(bin_path("qlog"));
    // Every VM: sd-app is not known yet, and `qlog tail sd-app` would refuse it.
    tail.arg("--socket").arg(sink.query_socket()).arg("tail");
    tail.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    die_with_parent_thread(&mut tail);
    let mut tail = tail.spawn().expect("qlog tail -f runs");
    let (lines_tx, tail_lines) = mpsc::channel();
    let tail_out = tail.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(tail_out).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    marker(&mut agent, &tail_lines, &sink, 1);

    let mut query = Command::new(bin_path("qlog"));
    query.arg("--socket").arg(sink.query_socket()).args(["query", "sd-bulk", "-o", "json"]);
    query.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    die_with_parent_thread(&mut query);
    let mut query = query.spawn().expect("qlog query runs");
    let mut query_out = BufReader::new(query.stdout.take().expect("piped"));
    let mut first = String::new();
    query_out.read_line(&mut first).expect("qlog query writes records");
    assert!(first.contains("bulk event 00000"), "{first}");

    // Now every part is busy: events flow agent → double → qlogd → tail, and the query
    // is mid-reply, blocked on the pipe we stopped reading.
    for round in 2..=3 {
        marker(&mut agent, &tail_lines, &sink, round);
        let double = agent.qrexec_client_pid().expect("the agent's qrexec call is running");
        let processes = [
            ("qlogd", sink.pid()),
            ("qlog-agent", agent.pid()),
            ("qrexec-client-vm", double),
            ("qlog tail -f", tail.id()),
            ("qlog query", query.id()),
        ];
        let mut held = Vec::new();
        for (what, pid) in processes {
            held.push((what, assert_only_unix_sockets(what, pid)));
        }
        eprintln!("sockets held, all AF_UNIX (round {round}): {held:?}");
        for (what, count) in &held {
            // The agent talks to its qrexec client over pipes and holds no socket.
            if *what != "qlog-agent" {
                assert!(*count > 0, "{what} holds a socket while active: {held:?}");
            }
        }
    }
    assert!(query.try_wait().unwrap().is_none(), "qlog query is still mid-reply");
    assert!(tail.try_wait().unwrap().is_none(), "qlog tail -f still follows");
    assert!(agent.is_running(), "the agent was not killed{}", agent.log_tail());
    let mut sink = sink;
    assert!(sink.is_running(), "qlogd was not killed{}", sink.log_tail());
    kill_and_reap(&mut tail);
    kill_and_reap(&mut query);
}
