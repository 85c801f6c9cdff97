//! Starting and stopping the agent's children, journalctl and qrexec-client-vm.
//!
//! Owns the rules every child follows: it runs in a process group of its own, so a Ctrl-C
//! on the terminal reaches only the agent (which then ends the stream cleanly instead of
//! losing its qrexec client first), and it is stopped by killing that whole group, so a
//! wrapper script cannot leave a grandchild holding our pipes open. The guard types that
//! use this live in [`crate::source`] and [`crate::transport`].

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// A command for `program` that will start in its own process group.
pub fn command(program: &Path) -> Command {
    let mut command = Command::new(program);
    command.process_group(0);
    command
}

/// Sends SIGKILL to the process group led by `child`. Call it only before the child has
/// been reaped, while its pid (and so its group id) cannot have been reused.
pub fn kill_group(child: &Child) {
    kill_group_id(child.id());
}

/// Sends SIGKILL to the process group `pgid`, under the same rule as [`kill_group`]: the
/// leader must be our child and not yet reaped.
pub fn kill_group_id(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid names a group, and
    // the group is ours because its leader is our unreaped child.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Waits up to `timeout` for `child` to exit; `Ok(None)` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        // std has no wait with a timeout; a short poll is cheap for the rare teardown.
        thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// Kills the group if the child is still running, then reaps it.
pub fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    kill_group(child);
    child.wait().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn killing_the_group_stops_a_wrapper_and_its_children() {
        let mut child =
            command(Path::new("/bin/sh")).args(["-c", "sleep 30 & wait"]).spawn().unwrap();
        assert_eq!(wait_timeout(&mut child, Duration::from_millis(50)).unwrap(), None);
        let status = kill_and_reap(&mut child).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn children_start_with_no_blocked_signals() {
        // The agent blocks SIGTERM and SIGINT in its own threads; std resets the mask in
        // children, which journalctl and qrexec-client-vm rely on to be stoppable.
        // SAFETY: the set is initialised by sigemptyset; only this test thread's mask
        // changes, and it is restored below.
        let out = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let out = command(Path::new("/bin/sh"))
                .args(["-c", "grep SigBlk /proc/self/status"])
                .output();
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            out.unwrap()
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim_end().ends_with("0000000000000000"), "{text}");
    }
}
