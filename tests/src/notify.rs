//! The receiving end of systemd's readiness protocol (`sd_notify`), for our daemons.
//!
//! Owns the datagram socket a child finds in `NOTIFY_SOCKET` and waiting for its
//! `READY=1`. A daemon sends newline-separated `KEY=VALUE` assignments in one datagram;
//! only `READY=1` matters here. Waiting watches the child's pidfd too, so a daemon that
//! dies during startup fails the test at once instead of at the deadline.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::process::{pidfd_open, poll_readable};

/// Why a child did not become ready.
#[derive(Debug)]
pub enum NotReady {
    /// It exited first.
    Exited(ExitStatus),
    TimedOut(Duration),
    Io(io::Error),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Exited(status) => write!(f, "it exited before sending READY=1 ({status})"),
            NotReady::TimedOut(after) => write!(f, "it sent no READY=1 within {after:?}"),
            NotReady::Io(error) => write!(f, "waiting for READY=1 failed: {error}"),
        }
    }
}

/// A bound `NOTIFY_SOCKET`. The socket file is removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a datagram socket at `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> io::Result<NotifySocket> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = UnixDatagram::bind(path)?;
        socket.set_nonblocking(true)?;
        Ok(NotifySocket { socket, path: path.to_owned() })
    }

    /// The value for the child's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Discards every datagram already queued, so a restarted child's `READY=1` cannot be
    /// confused with one its predecessor sent.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        while self.socket.recv(&mut buf).is_ok() {}
    }

    /// Waits until `child` sends `READY=1`, exits, or `timeout` passes.
    pub fn wait_ready(&self, child: &mut Child, timeout: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        let pidfd = pidfd_open(child.id()).map_err(NotReady::Io)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Take every queued datagram before looking at the child: a daemon may send
            // READY=1 and exit soon after, and the readiness still counts.
            loop {
                match self.socket.recv(&mut buf) {
                    Ok(n) if is_ready(&buf[..n]) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(NotReady::Io(e)),
                }
            }
            if let Some(status) = child.try_wait().map_err(NotReady::Io)? {
                return Err(NotReady::Exited(status));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NotReady::TimedOut(timeout));
            }
            poll_readable(&[self.socket.as_raw_fd(), pidfd.as_raw_fd()], left)
                .map_err(NotReady::Io)?;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// True if and only if one of the datagram's assignments is `READY=1`.
fn is_ready(datagram: &[u8]) -> bool {
    datagram.split(|&b| b == b'\n').any(|line| line == b"READY=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ready_among_other_assignments() {
        assert!(is_ready(b"READY=1"));
        assert!(is_ready(b"STATUS=Processing requests...\nREADY=1\n"));
        assert!(!is_ready(b"READY=10\nSTATUS=READY=1"));
        assert!(!is_ready(b"STOPPING=1"));
    }
}
