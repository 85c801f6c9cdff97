//! Child-process plumbing shared by the guards: waiting with a deadline, signals, logs.
//!
//! Owns the Linux specifics (pidfds, `PR_SET_PDEATHSIG`) so the guards read as what they
//! do. Waiting for exit uses a pidfd, which becomes readable when the process exits, so a
//! deadline costs no polling loop.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How much of a log the panic messages quote.
const TAIL_BYTES: u64 = 6 * 1024;

/// Opens a pidfd for `pid`: readable once the process has exited.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).expect("Linux pids fit in pid_t");
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).expect("descriptors fit in an int");
    // SAFETY: the kernel just gave us this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which were readable.
pub fn poll_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let deadline = Instant::now() + timeout;
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so a deadline a few microseconds away is not a busy loop of 0 ms polls.
        let left_ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        let nfds = libc::nfds_t::try_from(pfds.len()).expect("a handful of descriptors");
        // SAFETY: pfds is a valid array of nfds pollfd structs for the whole call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, left_ms) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        return Ok(pfds.iter().map(|p| p.revents != 0).collect());
    }
}

/// Waits for `child` to exit for at most `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait()? {
        return Ok(Some(status));
    }
    // The child is not reaped until we wait for it, so its pid cannot be reused between
    // the check above and opening the pidfd.
    let pidfd = pidfd_open(child.id())?;
    if poll_readable(&[pidfd.as_raw_fd()], timeout)?[0] {
        return child.wait().map(Some);
    }
    Ok(None)
}

/// Sends `signal` to the child unless it has already been reaped.
pub fn signal(child: &mut Child, signal: libc::c_int) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = libc::pid_t::try_from(child.id()).expect("Linux pids fit in pid_t");
    // SAFETY: the child is not reaped yet, so the pid still names it.
    unsafe { libc::kill(pid, signal) };
}

/// SIGKILLs the child and reaps it.
pub fn kill_and_reap(child: &mut Child) {
    signal(child, libc::SIGKILL);
    let _ = child.wait();
}

/// Makes the command's process receive SIGKILL when the thread that spawned it exits.
pub fn die_with_parent_thread(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and calls only prctl, which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Opens `path` for appending, for a child's stdout and stderr; both can share it.
pub fn log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Appends a marker line to a log, so restarts are visible in it.
pub fn log_marker(path: &Path, text: &str) {
    if let Ok(mut file) = log_file(path) {
        let _ = writeln!(file, "----- qlog-tests: {text} -----");
    }
}

/// Stdio handles that append the child's output to `path`.
pub fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let out = log_file(path).expect("the test's temp dir is writable");
    let err = out.try_clone().expect("a file descriptor can be duplicated");
    (Stdio::from(out), Stdio::from(err))
}

/// The last few KiB of a log, for panic messages.
pub fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("({} does not exist)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).and_then(|_| file.read_to_end(&mut bytes)).is_err() {
        return format!("({} is unreadable)", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    // Start at a line boundary unless the whole file fit.
    let text = match (start, text.find('\n')) {
        (0, _) | (_, None) => &text[..],
        (_, Some(newline)) => &text[newline + 1..],
    };
    if text.trim().is_empty() {
        format!("({} is empty)", path.display())
    } else {
        text.to_owned()
    }
}

/// Formats a log tail for a panic message.
pub fn quote_log(what: &str, path: &Path) -> String {
    format!("\n----- last lines of {what} ({}) -----\n{}", path.display(), tail(path))
}
