//! SIGTERM and SIGINT, turned into messages for the supervisor.
//!
//! Owns the signal mask: both signals are blocked before any thread starts (threads inherit
//! the mask), and one thread takes them with `sigwait` and sends each to the supervisor's
//! channel. So no signal handler runs, no flag is global, and shutdown is an ordinary
//! message handled in one place ([`crate::supervisor`]). Children get a clean mask from
//! std's process spawning.
//!
//! Children run in process groups of their own ([`crate::process`]), so a terminal's
//! Ctrl-C reaches only the agent. A systemd unit must likewise use `KillMode=mixed`: with
//! the default, SIGTERM also reaches qrexec-client-vm, which dies before it can carry the
//! agent's End, and unacknowledged stdin events are lost.

use std::io;
use std::sync::mpsc::Sender;
use std::thread;

use crate::supervisor::Msg;

/// Blocks SIGTERM and SIGINT in the calling thread and forwards them from a new thread.
///
/// Call it before starting any other thread, or that thread may take the signal itself
/// and be killed by its default action.
pub fn forward_termination_signals(to: Sender<Msg>) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame, and the null old-mask
    // pointer is allowed by pthread_sigmask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    thread::Builder::new().name("signals".into()).stack_size(64 * 1024).spawn(move || loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` and `signal` are valid for the call; the signals are blocked in
        // every thread, as sigwait requires.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        if rc != 0 {
            continue;
        }
        if to.send(Msg::Signal(signal)).is_err() {
            return;
        }
    })?;
    Ok(())
}

/// The conventional name of a signal number, for log lines.
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".to_string(),
        libc::SIGINT => "SIGINT".to_string(),
        libc::SIGKILL => "SIGKILL".to_string(),
        libc::SIGHUP => "SIGHUP".to_string(),
        libc::SIGPIPE => "SIGPIPE".to_string(),
        other => format!("signal {other}"),
    }
}
