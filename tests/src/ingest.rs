//! Ingest clients that talk to qlogd's socket directly, without the agent or qrexec.
//!
//! Owns two things: [`RawIngest`], which sends whatever a hostile test wants (a forged
//! descriptor, garbage, frames out of order) and reads back what the sink answers; and
//! [`ingest_events`], one complete well-behaved session, for tests that need events in
//! the store and do not care how they got there. Because the socket is reached directly,
//! the descriptor that qrexec would write is the client's to send.

use std::io::{BufWriter, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qlog_rpc::event::encode_event_payload;
use qlog_rpc::frame::encode_to_vec;
use qlog_rpc::message::{decode_json, decode_u64, encode_json, encode_u64};
use qlog_rpc::{ErrorFrame, Event, Frame, FrameType, Gap, Heartbeat, Hello, Welcome};

use crate::sink::RunningSink;
use crate::wire::{FrameReader, ReadError};
use crate::IO_TIMEOUT;

/// A hello as the agent would send it, announcing `stream` and every version we speak.
pub fn hello(stream: &str) -> Hello {
    Hello {
        versions: qlog_rpc::PROTOCOL_VERSIONS.to_vec(),
        agent: concat!("qlog-tests/", env!("CARGO_PKG_VERSION")).to_owned(),
        stream: stream.to_owned(),
        limits: None,
        heartbeat_interval_secs: None,
        telemetry_interval_secs: None,
    }
}

/// The descriptor qrexec writes for a call of `qlog.Ingest+argument` from `vm`.
pub fn descriptor(vm: &str, argument: &str) -> Vec<u8> {
    format!("{}+{argument} {vm}\0", qlog_rpc::INGEST_SERVICE).into_bytes()
}

/// One raw connection to the ingest socket. Every send is written at once; reads wait
/// for a whole frame up to a deadline.
#[derive(Debug)]
pub struct RawIngest {
    reader: FrameReader<UnixStream>,
}

impl RawIngest {
    pub fn connect(ingest_socket: &Path) -> std::io::Result<RawIngest> {
        let stream = UnixStream::connect(ingest_socket)?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(RawIngest { reader: FrameReader::new(stream) })
    }

    /// Connects, sends the descriptor and hello for (`vm`, `stream`), and returns the
    /// connection with the sink's welcome.
    ///
    /// # Panics
    ///
    /// If the sink does not welcome the session.
    pub fn handshake(ingest_socket: &Path, vm: &str, stream: &str) -> (RawIngest, Welcome) {
        let mut conn = RawIngest::connect(ingest_socket).expect("the ingest socket accepts");
        conn.send_descriptor(vm, "").expect("the sink reads the descriptor");
        conn.send_hello(&hello(stream)).expect("the sink reads the hello");
        let welcome = conn.expect_welcome(IO_TIMEOUT);
        (conn, welcome)
    }

    pub fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    /// Writes `bytes` as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream().write_all(bytes)
    }

    /// Writes the descriptor qrexec would send for `vm` calling `qlog.Ingest+argument`.
    pub fn send_descriptor(&mut self, vm: &str, argument: &str) -> std::io::Result<()> {
        self.send_bytes(&descriptor(vm, argument))
    }

    /// Writes one frame with any type and payload.
    pub fn send_frame(&mut self, ty: FrameType, payload: &[u8]) -> std::io::Result<()> {
        self.send_bytes(&encode_to_vec(ty, payload))
    }

    pub fn send_hello(&mut self, hello: &Hello) -> std::io::Result<()> {
        self.send_bytes(&encode_json(FrameType::Hello, hello))
    }

    pub fn send_event(&mut self, seq: u64, event: &Event) -> std::io::Result<()> {
        self.send_bytes(&event_frame(seq, event))
    }

    pub fn send_gap(&mut self, gap: &Gap) -> std::io::Result<()> {
        self.send_bytes(&encode_json(FrameType::Gap, gap))
    }

    pub fn send_heartbeat(&mut self, heartbeat: &Heartbeat) -> std::io::Result<()> {
        self.send_bytes(&encode_json(FrameType::Heartbeat, heartbeat))
    }

    pub fn send_end(&mut self, last_seq: u64) -> std::io::Result<()> {
        self.send_bytes(&encode_u64(FrameType::End, last_seq))
    }

    /// Closes our sending side only, as qrexec does at the caller's stdin EOF.
    pub fn half_close(&mut self) -> std::io::Result<()> {
        self.stream().shutdown(Shutdown::Write)
    }

    /// The next frame from the sink, `Ok(None)` once it has closed cleanly.
    pub fn read_frame(&mut self, timeout: Duration) -> Result<Option<Frame>, ReadError> {
        self.stream().set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        self.reader.next_frame()
    }

    /// Reads the welcome.
    ///
    /// # Panics
    ///
    /// If the next frame is anything else (an error frame is quoted).
    pub fn expect_welcome(&mut self, timeout: Duration) -> Welcome {
        let frame = self.expect_frame(timeout);
        match frame.ty {
            FrameType::Welcome => {
                decode_json(frame.ty, &frame.payload).expect("the welcome is valid JSON")
            }
            FrameType::Error => panic!("expected a welcome, got {:?}", error_of(&frame)),
            ty => panic!("expected a welcome, got a {ty:?} frame"),
        }
    }

    /// Reads the error frame the sink sends before closing on purpose.
    ///
    /// # Panics
    ///
    /// If the next frame is anything else, or none comes.
    pub fn expect_error(&mut self, timeout: Duration) -> ErrorFrame {
        let frame = self.expect_frame(timeout);
        match frame.ty {
            FrameType::Error => error_of(&frame),
            ty => panic!("expected an error frame, got a {ty:?} frame"),
        }
    }

    /// Reads acks until the cumulative ack reaches `seq`, returning the last one.
    ///
    /// # Panics
    ///
    /// On any other frame, or if the ack does not come in time.
    pub fn expect_ack(&mut self, seq: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let frame = self.expect_frame(deadline.saturating_duration_since(Instant::now()));
            match frame.ty {
                FrameType::Ack => {
                    let acked = decode_u64(frame.ty, &frame.payload).expect("an ack is a u64");
                    if acked >= seq {
                        return acked;
                    }
                }
                FrameType::Error => panic!("expected ack {seq}, got {:?}", error_of(&frame)),
                ty => panic!("expected ack {seq}, got a {ty:?} frame"),
            }
        }
    }

    /// Reads until the sink closes the connection, returning the frames it sent first.
    /// A reset counts as a close: that is what a Unix socket closed with unread data
    /// gives its peer.
    ///
    /// # Panics
    ///
    /// If the connection is still open after `timeout`, or a frame is malformed.
    pub fn expect_closed(&mut self, timeout: Duration) -> Vec<Frame> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            match self.read_frame(deadline.saturating_duration_since(Instant::now())) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return frames,
                Err(e) if e.is_reset() => return frames,
                Err(e) if e.is_timeout() => {
                    panic!("the sink kept the connection open for {timeout:?}; sent {frames:?}")
                }
                Err(e) => panic!("reading until close failed: {e}"),
            }
        }
    }

    fn expect_frame(&mut self, timeout: Duration) -> Frame {
        match self.read_frame(timeout) {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("the sink closed the connection instead of answering"),
            Err(e) => panic!("no frame from the sink within {timeout:?}: {e}"),
        }
    }
}

/// Stores `events` for (`vm`, `stream`) through one well-behaved session on the sink's
/// ingest socket, and returns the last sequence number stored.
pub fn ingest_events(
    sink: &RunningSink,
    vm: &str,
    stream: &str,
    events: &[Event],
) -> anyhow::Result<u64> {
    ingest_events_at(sink.ingest_socket(), vm, stream, events)
}

/// [`ingest_events`] on any ingest socket.
///
/// The session: descriptor, hello, welcome, the events numbered from the welcome's
/// `resume.last_seq + 1`, end, and the sink's end reply once everything is durable. Acks
/// are read on a second thread while the events are written, so a sink that acks as it
/// goes can never fill the socket and stall us.
pub fn ingest_events_at(
    ingest_socket: &Path,
    vm: &str,
    stream: &str,
    events: &[Event],
) -> anyhow::Result<u64> {
    let connection = UnixStream::connect(ingest_socket)
        .with_context(|| format!("cannot connect to {}", ingest_socket.display()))?;
    connection.set_read_timeout(Some(IO_TIMEOUT))?;
    connection.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = FrameReader::new(connection.try_clone()?);
    let mut writer = BufWriter::with_capacity(256 * 1024, &connection);

    writer.write_all(&descriptor(vm, ""))?;
    writer.write_all(&encode_json(FrameType::Hello, &hello(stream)))?;
    writer.flush()?;
    let welcome = match reader.next_frame().context("waiting for the welcome")? {
        Some(frame) if frame.ty == FrameType::Welcome => {
            decode_json::<Welcome>(frame.ty, &frame.payload)?
        }
        Some(frame) if frame.ty == FrameType::Error => {
            bail!("the sink refused the session: {:?}", error_of(&frame))
        }
        Some(frame) => bail!("expected a welcome, got a {:?} frame", frame.ty),
        None => bail!("the sink closed the connection instead of welcoming"),
    };
    if welcome.vm != vm || welcome.stream != stream {
        bail!("welcomed as {}/{}, not {vm}/{stream}", welcome.vm, welcome.stream);
    }

    // Everything after the welcome is read on a thread, in order, until the sink closes.
    let (tx, frames) = mpsc::channel();
    let acks = std::thread::spawn(move || loop {
        let item = reader.next_frame();
        let last = !matches!(item, Ok(Some(_)));
        if tx.send(item).is_err() || last {
            return;
        }
    });

    let first = welcome.resume.last_seq + 1;
    let last = welcome.resume.last_seq + events.len() as u64;
    let written = events
        .iter()
        .zip(first..)
        .try_for_each(|(event, seq)| writer.write_all(&event_frame(seq, event)))
        .and_then(|()| writer.write_all(&encode_u64(FrameType::End, last)))
        .and_then(|()| writer.flush());
    drop(writer);

    // Whatever happened to the writes, the sink's answer says more: an error frame
    // explains a broken pipe.
    let outcome = wait_for_end(&frames, last);
    let _ = connection.shutdown(Shutdown::Both);
    let _ = acks.join();
    match (outcome, written) {
        (Ok(()), Ok(())) => Ok(last),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(write)) => Err(e.context(format!("writing events failed: {write}"))),
        (Ok(()), Err(write)) => bail!("the sink ended the session, but writing failed: {write}"),
    }
}

type FrameResult = Result<Option<Frame>, ReadError>;

/// Reads acks until the end reply; fails on an error frame, a wrong end or a close.
fn wait_for_end(frames: &mpsc::Receiver<FrameResult>, last: u64) -> anyhow::Result<()> {
    loop {
        let frame = match frames.recv() {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => bail!("the sink closed the connection before its end reply"),
            Ok(Err(e)) => return Err(e).context("waiting for the end reply"),
            Err(_) => bail!("the reader thread ended early"),
        };
        match frame.ty {
            FrameType::Ack => {}
            FrameType::End => {
                let stored = decode_u64(frame.ty, &frame.payload)?;
                if stored != last {
                    bail!("the sink's end reply says {stored}, but we ended at {last}");
                }
                return Ok(());
            }
            FrameType::Error => bail!("the sink ended the session: {:?}", error_of(&frame)),
            ty => bail!("unexpected {ty:?} frame during ingest"),
        }
    }
}

/// One `Event` frame, as an agent writes it.
pub fn event_frame(seq: u64, event: &Event) -> Vec<u8> {
    let mut payload = Vec::new();
    encode_event_payload(seq, event, &mut payload);
    encode_to_vec(FrameType::Event, &payload)
}

/// The `Hello` frame of [`hello`]`(stream)`.
pub fn hello_frame(stream: &str) -> Vec<u8> {
    encode_json(FrameType::Hello, &hello(stream))
}

fn error_of(frame: &Frame) -> ErrorFrame {
    decode_json(frame.ty, &frame.payload).unwrap_or_else(|e| {
        ErrorFrame::new(qlog_rpc::ErrorCode::Other, format!("unparseable error frame: {e}"))
    })
}
