//! The qrexec connection to qlogd: the client process, the handshake and the two threads
//! that move frames over it.
//!
//! Owns [`RunningQrexecClient`] (the `qrexec-client-vm LOGVM qlog.Ingest` child, killed
//! with its process group on drop), the hello, the ack reader (sink to agent: welcome,
//! acks, end, errors) and the writer (agent to sink: events and gaps from the window,
//! heartbeats, end), and what a client exit status means to an operator. It decides
//! nothing about reconnecting: every thread reports to the supervisor's channel and stops.
//! The agent never opens a socket; qrexec is its only way out of the VM.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qlog_rpc::frame::{FrameDecoder, FrameType};
use qlog_rpc::message::{decode_json, decode_u64, encode_json, encode_u64};
use qlog_rpc::{ErrorFrame, Frame, Heartbeat, Hello, Limits, Welcome, INGEST_SERVICE};

use crate::limits::{finish, within, RawEntry};
use crate::log::{Level, Log};
use crate::process;
use crate::shared::{Shared, State};
use crate::signals;
use crate::supervisor::Msg;
use crate::window::Item;

/// The most the agent accepts from a sink, whatever its welcome says. It bounds the
/// agent's memory against a sink (or a bug) announcing absurd limits.
pub const AGENT_LIMITS: Limits = Limits {
    max_frame_len: 16 * 1024 * 1024,
    max_control_len: 1024 * 1024,
    max_fields: 4096,
    max_value_len: 16 * 1024 * 1024,
    max_name_len: 64,
};

/// Bytes the writer gathers under the lock before one `write`.
const WRITE_BATCH: usize = 256 * 1024;

const READ_CHUNK: usize = 64 * 1024;

/// Why a connection ended, as seen from inside the agent.
#[derive(Debug)]
pub enum CloseReason {
    /// The sink's side closed between frames.
    Eof,
    /// The sink's side closed inside a frame.
    Truncated {
        buffered: usize,
    },
    ReadFailed(io::Error),
    WriteFailed(io::Error),
    /// The sink sent an error frame, and closes after it.
    SinkError(ErrorFrame),
    /// The sink broke the protocol.
    Protocol(String),
    /// No welcome came within the handshake timeout.
    HandshakeTimeout(Duration),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Eof => write!(f, "qlogd closed the stream"),
            CloseReason::Truncated { buffered } => {
                write!(f, "the stream from qlogd ended inside a frame ({buffered} bytes of it)")
            }
            CloseReason::ReadFailed(e) => write!(f, "cannot read from the qrexec client: {e}"),
            CloseReason::WriteFailed(e) => write!(f, "cannot write to the qrexec client: {e}"),
            CloseReason::SinkError(e) => {
                // The wire spelling (`unknown-vm`) is what qlogd's own logs and docs use.
                let code = serde_json::to_value(e.code).ok();
                let code = code.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown");
                write!(f, "qlogd refused the stream: {code}: {}", e.message)
            }
            CloseReason::Protocol(what) => write!(f, "qlogd broke the protocol: {what}"),
            CloseReason::HandshakeTimeout(after) => {
                write!(f, "qlogd did not answer the hello within {} s", after.as_secs())
            }
        }
    }
}

impl CloseReason {
    /// How loud the reason itself should be; transport-level ends are explained by the
    /// client's exit status instead.
    pub fn level(&self) -> Level {
        match self {
            CloseReason::SinkError(_)
            | CloseReason::Protocol(_)
            | CloseReason::HandshakeTimeout(_) => Level::Error,
            CloseReason::Truncated { .. } => Level::Warn,
            CloseReason::Eof | CloseReason::ReadFailed(_) | CloseReason::WriteFailed(_) => {
                Level::Debug
            }
        }
    }
}

/// The running `qrexec-client-vm`; dropping it kills its process group and reaps it.
#[derive(Debug)]
pub struct RunningQrexecClient {
    child: std::process::Child,
    status: Option<ExitStatus>,
}

impl RunningQrexecClient {
    /// Starts `PROGRAM LOGVM qlog.Ingest` with piped stdin and stdout; its stderr (where
    /// qrexec itself explains a refusal) goes to ours.
    pub fn spawn(
        program: &Path,
        log_vm: &str,
    ) -> io::Result<(RunningQrexecClient, ChildStdin, ChildStdout)> {
        let mut child = process::command(program)
            .args([log_vm, INGEST_SERVICE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        Ok((RunningQrexecClient { child, status: None }, stdin, stdout))
    }

    /// Waits up to `timeout` for the client to exit on its own.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = process::wait_timeout(&mut self.child, timeout).ok().flatten();
        }
        self.status
    }

    /// Kills the client's process group unless it already exited, and reaps it. Returns
    /// the exit status if it exited on its own.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let status = process::kill_and_reap(&mut self.child);
            // A status of "killed by SIGKILL" is our doing, not the client's.
            self.status = status.filter(|s| s.signal() != Some(libc::SIGKILL));
            return self.status;
        }
        self.status
    }
}

impl Drop for RunningQrexecClient {
    fn drop(&mut self) {
        if self.status.is_none() {
            process::kill_and_reap(&mut self.child);
        }
    }
}

/// The first frame of every connection.
pub fn hello_frame(
    stream: &str,
    heartbeat_interval: Duration,
    telemetry_interval: Option<Duration>,
) -> Vec<u8> {
    let hello = Hello {
        versions: qlog_rpc::PROTOCOL_VERSIONS.to_vec(),
        agent: format!("qlog-agent/{}", env!("CARGO_PKG_VERSION")),
        stream: stream.to_string(),
        limits: Some(AGENT_LIMITS),
        heartbeat_interval_secs: Some(
            u32::try_from(heartbeat_interval.as_secs()).unwrap_or(u32::MAX),
        ),
        telemetry_interval_secs: telemetry_interval
            .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
    };
    encode_json(FrameType::Hello, &hello)
}

/// What one connection's threads need.
#[derive(Debug, Clone)]
pub struct ConnContext {
    /// This connection's number; the supervisor ignores messages from older ones.
    pub conn: u64,
    pub shared: Arc<Shared>,
    pub to: Sender<Msg>,
    pub log: Log,
}

/// Starts the thread that reads the sink's frames and reports them.
pub fn spawn_reader(ctx: ConnContext, stdout: ChildStdout) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(format!("ack-reader-{}", ctx.conn)).stack_size(256 * 1024).spawn(
        move || {
            let reason = read_frames(&ctx, stdout);
            // The supervisor outlives every connection; a failed send means it is gone.
            let _ = ctx.to.send(Msg::Closed { conn: ctx.conn, reason });
        },
    )
}

fn read_frames(ctx: &ConnContext, mut stdout: ChildStdout) -> CloseReason {
    let mut decoder = FrameDecoder::new(AGENT_LIMITS);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut welcomed = false;
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => {
                return match decoder.finish() {
                    Ok(()) => CloseReason::Eof,
                    Err(_) => CloseReason::Truncated { buffered: decoder.buffered() },
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return CloseReason::ReadFailed(e),
        };
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(reason) = handle_frame(ctx, frame, &mut welcomed) {
                        return reason;
                    }
                }
                Ok(None) => break,
                Err(e) => return CloseReason::Protocol(format!("bad frame: {e}")),
            }
        }
    }
}

fn handle_frame(ctx: &ConnContext, frame: Frame, welcomed: &mut bool) -> Result<(), CloseReason> {
    let bad = |e: qlog_rpc::MessageError| CloseReason::Protocol(e.to_string());
    match frame.ty {
        FrameType::Welcome if !*welcomed => {
            let welcome: Welcome = decode_json(frame.ty, &frame.payload).map_err(bad)?;
            if !qlog_rpc::PROTOCOL_VERSIONS.contains(&welcome.version) {
                return Err(CloseReason::Protocol(format!(
                    "it chose protocol version {}, but this agent speaks {:?}",
                    welcome.version,
                    qlog_rpc::PROTOCOL_VERSIONS
                )));
            }
            *welcomed = true;
            let limits = welcome.limits.intersect(AGENT_LIMITS);
            let resumed = ctx.shared.update(|state| {
                state.limits = limits;
                if state.started {
                    Some(state.window.resume(welcome.resume.last_seq))
                } else {
                    state.window.start_after(welcome.resume.last_seq);
                    state.started = true;
                    None
                }
            });
            let _ = ctx.to.send(Msg::Welcome { conn: ctx.conn, welcome, resumed });
        }
        FrameType::Ack if *welcomed => {
            let seq = decode_u64(frame.ty, &frame.payload).map_err(bad)?;
            let outcome = ctx.shared.ack(seq);
            let _ = ctx.to.send(Msg::Acked { conn: ctx.conn, seq, outcome });
        }
        FrameType::End if *welcomed => {
            let last_seq = decode_u64(frame.ty, &frame.payload).map_err(bad)?;
            let _ = ctx.to.send(Msg::SinkEnd { conn: ctx.conn, last_seq });
        }
        FrameType::Error => {
            return Err(match decode_json::<ErrorFrame>(frame.ty, &frame.payload) {
                Ok(error) => CloseReason::SinkError(error),
                Err(e) => bad(e),
            });
        }
        other => {
            let when = if *welcomed { "after the welcome" } else { "before a welcome" };
            return Err(CloseReason::Protocol(format!("unexpected {other:?} frame {when}")));
        }
    }
    Ok(())
}

/// Starts the thread that sends the window's items, heartbeats and the end of stream.
///
/// It starts at the first unacknowledged item, so a new connection replays everything the
/// sink has not confirmed, and exits once `state.active_conn` is no longer its connection.
pub fn spawn_writer(
    ctx: ConnContext,
    stdin: ChildStdin,
    intervals: Intervals,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(format!("writer-{}", ctx.conn)).stack_size(256 * 1024).spawn(
        move || {
            if let Err(e) = write_frames(&ctx, stdin, intervals) {
                let _ = ctx.to.send(Msg::Closed { conn: ctx.conn, reason: e });
            }
        },
    )
}

/// How often the writer sends heartbeats and, if at all, telemetry.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    pub heartbeat: Duration,
    pub telemetry: Option<Duration>,
}

fn write_frames(
    ctx: &ConnContext,
    mut stdin: ChildStdin,
    intervals: Intervals,
) -> Result<(), CloseReason> {
    let heartbeat_interval = intervals.heartbeat;
    let mut next = ctx.shared.lock().window.first_unacked();
    ctx.log.debug(format_args!("connection {}: sending from seq {next}", ctx.conn));
    let mut end_sent = false;
    let mut next_heartbeat = Instant::now() + heartbeat_interval;
    // The first sample goes out soon after connecting, so a new VM has numbers at once.
    let mut next_telemetry = intervals.telemetry.map(|_| Instant::now());
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        batch.clear();
        let mut state = ctx.shared.lock();
        loop {
            if state.active_conn != ctx.conn {
                return Ok(());
            }
            let now = Instant::now();
            // Heartbeats go out on time even while events flow; nothing follows an end.
            if now >= next_heartbeat && !end_sent {
                batch.extend(heartbeat_frame(heartbeat_interval));
                next_heartbeat = now + heartbeat_interval;
            }
            if let (Some(at), Some(every)) = (next_telemetry, intervals.telemetry) {
                if now >= at && !end_sent {
                    batch.extend(crate::telemetry::telemetry_frame(&state, now));
                    next_telemetry = Some(now + every);
                }
            }
            // Items the sink acknowledged meanwhile (a resume point, say) need not go out.
            next = next.max(state.window.first_unacked());
            let first = next;
            while next < state.window.next_seq() && batch.len() < WRITE_BATCH {
                append_item(&state, next, &mut batch);
                next += 1;
            }
            state.counters.sent += next - first;
            if next == state.window.next_seq() && state.finishing && !end_sent {
                batch.extend(encode_u64(FrameType::End, state.window.last_assigned()));
                end_sent = true;
            }
            if !batch.is_empty() {
                break;
            }
            let wake = next_telemetry.map_or(next_heartbeat, |t| t.min(next_heartbeat));
            state = if end_sent {
                ctx.shared.wait(state)
            } else {
                ctx.shared.wait_timeout(state, wake.saturating_duration_since(now))
            };
        }
        drop(state);
        stdin.write_all(&batch).map_err(CloseReason::WriteFailed)?;
    }
}

fn append_item(state: &State, seq: u64, out: &mut Vec<u8>) {
    let item = state.window.get(seq).expect("every seq from first unacked to next is held");
    match item {
        Item::Event { frame, limits } if within(limits, &state.limits) => out.extend(frame),
        Item::Event { frame, .. } => {
            // This connection's sink allows less than the one the event was read under, so
            // the event is fitted again. A value cut a second time is marked with its
            // length after the first cut, the original being no longer known.
            let event = finish(RawEntry::from_event(Item::decode_event(frame)), &state.limits);
            if let Item::Event { frame, .. } = Item::event(seq, &event, state.limits) {
                out.extend(frame);
            }
        }
        Item::Gap(gap) => out.extend(encode_json(FrameType::Gap, gap)),
    }
}

fn heartbeat_frame(interval: Duration) -> Vec<u8> {
    let sent_usec = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let heartbeat = Heartbeat {
        sent_usec,
        interval_secs: Some(u32::try_from(interval.as_secs()).unwrap_or(u32::MAX)),
    };
    encode_json(FrameType::Heartbeat, &heartbeat)
}

/// What a qrexec client exit means, for the operator: `status` is `None` if the agent had
/// to kill the client.
pub fn describe_exit(status: Option<ExitStatus>, unacked: usize) -> (Level, String) {
    let resent = if unacked > 0 {
        format!("; {unacked} events not yet acknowledged will be resent")
    } else {
        String::new()
    };
    let Some(status) = status else {
        return (Level::Warn, format!("the qrexec client was stopped{resent}"));
    };
    let (level, what) = match (status.code(), status.signal()) {
        (Some(0), _) if unacked == 0 => return (Level::Info, "the sink closed the stream".into()),
        (Some(0), _) => (Level::Warn, "the sink closed the stream".to_string()),
        (Some(126), _) => (
            Level::Error,
            "refused by qrexec policy (or the log VM cannot be started): check dom0 policy for \
             qlog.Ingest"
                .to_string(),
        ),
        (Some(127), _) => {
            (Level::Error, "service qlog.Ingest is not installed in the log VM".to_string())
        }
        (Some(125), _) => (Level::Error, "qlogd is not listening in the log VM".to_string()),
        (Some(255), _) => (Level::Warn, "the log VM died mid-stream".to_string()),
        (Some(1), _) => {
            (Level::Warn, "local qrexec problem (is qrexec-agent running?)".to_string())
        }
        (Some(code), _) => (Level::Warn, format!("the qrexec client exited with status {code}")),
        (None, Some(signal)) => {
            (Level::Warn, format!("the qrexec client was killed by {}", signals::name(signal)))
        }
        (None, None) => (Level::Warn, "the qrexec client ended".to_string()),
    };
    (level, format!("{what}{resent}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> Option<ExitStatus> {
        Some(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn maps_qrexec_exit_codes_to_operator_messages() {
        let msg = |code, unacked| describe_exit(exit(code), unacked);
        assert_eq!(msg(126, 0).0, Level::Error);
        assert!(msg(126, 0).1.contains("check dom0 policy for qlog.Ingest"));
        assert!(msg(127, 0).1.contains("not installed in the log VM"));
        assert!(msg(125, 0).1.contains("not listening"));
        assert!(msg(255, 0).1.contains("died mid-stream"));
        assert!(msg(1, 0).1.contains("qrexec-agent running"));
        assert_eq!(msg(0, 0), (Level::Info, "the sink closed the stream".to_string()));
        assert_eq!(
            msg(0, 7).1,
            "the sink closed the stream; 7 events not yet acknowledged will be resent"
        );
        assert!(msg(3, 0).1.contains("status 3"));
        let killed = describe_exit(Some(ExitStatus::from_raw(libc::SIGTERM)), 0);
        assert!(killed.1.contains("SIGTERM"), "{}", killed.1);
        assert!(describe_exit(None, 2).1.contains("2 events"));
    }

    #[test]
    fn hello_announces_versions_stream_and_heartbeat() {
        let frame = hello_frame("journal", Duration::from_secs(30), Some(Duration::from_secs(60)));
        let mut decoder = FrameDecoder::new(Limits::DEFAULT);
        decoder.feed(&frame);
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.ty, FrameType::Hello);
        let hello: Hello = decode_json(frame.ty, &frame.payload).unwrap();
        assert_eq!(hello.versions, qlog_rpc::PROTOCOL_VERSIONS);
        assert_eq!(hello.stream, "journal");
        assert_eq!(hello.heartbeat_interval_secs, Some(30));
        assert_eq!(hello.telemetry_interval_secs, Some(60));
        assert!(hello.agent.starts_with("qlog-agent/"));
    }
}
