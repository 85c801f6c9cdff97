//! The ingest plane: one task per qrexec connection on the ingest socket.
//!
//! A connection is: the qrexec descriptor (the only source of the VM's identity), a Hello
//! within the handshake timeout, our Welcome with the resume point, then events until End
//! or EOF. Reading and acking run concurrently: a writer task sends the ack watermark
//! whenever the committer raises it, coalescing acks the peer is too slow to read, so a
//! peer that never reads cannot make us buffer. Everything a connection does wrong ends
//! that connection only, with an Error frame saying why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qlog_rpc::descriptor::{self, Descriptor};
use qlog_rpc::event::{decode_event_payload, scan_event_payload, EventScan};
use qlog_rpc::frame::{Frame, FrameDecoder, FrameType};
use qlog_rpc::message::{self, decode_json, encode_json, encode_u64, negotiate_version};
use qlog_rpc::{ErrorCode, ErrorFrame, Gap, Heartbeat, Hello, Limits, Welcome, INGEST_SERVICE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::committer::{Chunk, Item, Request};
use crate::log_events;
use crate::rate_limit::{Buckets, Rejections, SharedBucket};
use crate::shared::Shared;
use qlog_rpc::telemetry::Sample;

/// Most events one chunk carries to the committer.
const CHUNK_EVENTS: usize = 1024;
/// Most payload bytes one chunk carries; with the committer's queue depth this bounds
/// what ingest can hold in memory.
const CHUNK_BYTES: usize = 256 * 1024;
/// How long a final reply may take to write before we give up on a peer that won't read.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest cursor kept as a resume point; journald cursors are about 150 bytes.
const MAX_CURSOR_LEN: usize = 1024;
/// How long a closing connection waits for its last events to become durable.
const FINAL_ACK_TIMEOUT: Duration = Duration::from_secs(30);

pub struct IngestContext {
    pub committer: mpsc::Sender<Request>,
    pub shared: Arc<Shared>,
    /// Limits announced to agents. Slightly below the protocol defaults so that a stored
    /// record (event plus the sink's own fields) still fits in one query frame.
    pub limits: Limits,
    pub handshake_timeout: Duration,
    pub max_connections_per_vm: usize,
    per_vm: Mutex<HashMap<String, usize>>,
    /// Connections still in their handshake (descriptor and Hello not both read yet).
    /// Such a peer has proved nothing, so it gets a pool of its own: over it, a new
    /// connection is closed at once, and a flood of silent or trickling peers cannot use
    /// up `max_connections` for the streams that did complete a handshake. By default,
    /// [`DEFAULT_MAX_HANDSHAKES`]. FIXME(per-VM handshakes): the pool is shared, so one
    /// VM's silent calls, or its rejected ones waiting out their penalty, can fill it and
    /// delay other VMs' new connections by up to the handshake timeout; real qrexec
    /// holds a qube to about 10 to 25 concurrent calls, far below it, but counting each
    /// VM's handshakes from its descriptor would close this if a deployment ever allowed
    /// more.
    handshakes: Arc<Semaphore>,
    max_handshakes: usize,
    /// Replaces the idle timeout derived from the agent's heartbeat interval; only the
    /// hidden `--idle-timeout-seconds` sets it, for tests. By default, `None`.
    idle_timeout_override: Option<Duration>,
    /// Each VM's token bucket, shared by all of its connections; checked for every event
    /// and gap before it is queued to the committer (see `rate_limit.rs`).
    buckets: Buckets,
    /// Each VM's budget of rejected connections before their replies are delayed.
    rejections: Rejections,
    /// Flips to true when qlogd starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// Longest a chunk of nothing but rate-limit refusals waits before it goes to the
/// committer; its acks wait as long.
const HOLD_REFUSALS: Duration = Duration::from_millis(100);

/// Telemetry samples one connection queues between two flushes; more are dropped and
/// counted, so a VM sending samples in a tight loop costs the committer little.
const MAX_PENDING_SAMPLES: usize = 4;

/// Most connections in their handshake at once, when the configuration says nothing.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

impl IngestContext {
    pub fn new(
        committer: mpsc::Sender<Request>,
        shared: Arc<Shared>,
        handshake_timeout: Duration,
        max_connections_per_vm: usize,
        shutdown: watch::Receiver<bool>,
    ) -> IngestContext {
        let limits =
            Limits { max_frame_len: Limits::DEFAULT.max_frame_len - 64 * 1024, ..Limits::DEFAULT };
        IngestContext {
            committer,
            shared,
            limits,
            handshake_timeout,
            max_connections_per_vm,
            per_vm: Mutex::new(HashMap::new()),
            handshakes: Arc::new(Semaphore::new(DEFAULT_MAX_HANDSHAKES)),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            idle_timeout_override: None,
            buckets: Buckets::default(),
            rejections: Rejections::default(),
            shutdown,
        }
    }

    /// Sets how many connections may be in their handshake at once (at least 1).
    pub fn with_max_handshakes(mut self, max: usize) -> IngestContext {
        let max = max.max(1);
        self.handshakes = Arc::new(Semaphore::new(max));
        self.max_handshakes = max;
        self
    }

    /// Sets a fixed idle timeout for established streams, whatever their heartbeat.
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> IngestContext {
        self.idle_timeout_override = timeout;
        self
    }
}

/// Why a connection ended early, for the peer and for our log.
struct Rejection {
    code: ErrorCode,
    message: String,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection { code, message: message.into() }
    }
}

/// Counts a VM's open connections; dropping it releases the slot.
struct VmSlot {
    ctx: Arc<IngestContext>,
    vm: String,
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let mut per_vm = self.ctx.per_vm.lock().expect("per-VM table lock is never poisoned");
        if let Some(n) = per_vm.get_mut(&self.vm) {
            *n -= 1;
            if *n == 0 {
                per_vm.remove(&self.vm);
            }
        }
    }
}

/// A place in the handshake pool, or `None` (after logging it) when the pool is full:
/// the caller then drops the connection unread, since answering would cost a flood's
/// sender nothing and us a write per connection. Taken in the accept loop, so that
/// connections get places in the order they were accepted.
pub fn handshake_place(ctx: &IngestContext) -> Option<OwnedSemaphorePermit> {
    let place = Arc::clone(&ctx.handshakes).try_acquire_owned().ok();
    if place.is_none() {
        log_events::too_many_handshakes(ctx.max_handshakes);
    }
    place
}

/// Serves one connection; `handshake` is its place in the handshake pool, given back
/// once the Hello is read.
pub async fn serve(stream: UnixStream, ctx: Arc<IngestContext>, handshake: OwnedSemaphorePermit) {
    let (mut rd, mut wr) = stream.into_split();
    let mut decoder = FrameDecoder::new(ctx.limits);

    // The whole handshake shares one deadline, so a peer that trickles bytes cannot
    // hold a connection slot for longer than that.
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let desc = match tokio::time::timeout_at(deadline, read_descriptor(&mut rd, &mut decoder)).await
    {
        Ok(Ok(desc)) => desc,
        Ok(Err(rejection)) => return reject(&ctx, &mut wr, None, rejection).await,
        Err(_) => {
            // Every handshake timeout is `bad-hello` (rpc/PROTOCOL.md), whichever part
            // was late.
            let r = Rejection::new(
                ErrorCode::BadHello,
                "no qrexec descriptor within the handshake timeout",
            );
            return reject(&ctx, &mut wr, None, r).await;
        }
    };
    let hello = match tokio::time::timeout_at(deadline, read_hello(&mut rd, &mut decoder)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(rejection)) => return reject(&ctx, &mut wr, Some(desc.source_vm), rejection).await,
        Err(_) => {
            // A slow peer is not a malformed one: it is not counted against the VM.
            let r =
                Rejection::new(ErrorCode::BadHello, "no Hello frame within the handshake timeout");
            return reject(&ctx, &mut wr, None, r).await;
        }
    };
    drop(handshake);
    let vm = desc.source_vm.clone();

    let Some(_slot) = take_slot(&ctx, &vm) else {
        log_events::too_many_connections(&vm, ctx.max_connections_per_vm);
        let r = Rejection::new(
            ErrorCode::TooManyConnections,
            format!("this VM already has {} connections open", ctx.max_connections_per_vm),
        );
        return reject(&ctx, &mut wr, Some(vm), r).await;
    };
    let version = match negotiate_version(&hello.versions) {
        Ok(v) => v,
        Err(e) => {
            return reject(
                &ctx,
                &mut wr,
                Some(vm),
                Rejection::new(ErrorCode::UnsupportedVersion, e.to_string()),
            )
            .await
        }
    };
    if let Err(e) = message::validate_stream_name(&hello.stream) {
        return reject(&ctx, &mut wr, Some(vm), Rejection::new(ErrorCode::BadHello, e.to_string()))
            .await;
    }
    let limits = hello.limits.map_or(ctx.limits, |l| ctx.limits.intersect(l));
    decoder.set_limits(limits);

    // Register with the committer: it owns the stream's durable position.
    let key = (vm.clone(), hello.stream.clone());
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let (reply_tx, reply_rx) = oneshot::channel();
    let heartbeat_secs = hello.heartbeat_interval_secs;
    let _ = ctx.committer.send(Request::Hello { vm: vm.clone(), heartbeat_secs }).await;
    let registered = ctx
        .committer
        .send(Request::Register { key: key.clone(), acks: ack_tx, reply: reply_tx })
        .await;
    let resume = match (registered, reply_rx.await) {
        (Ok(()), Ok(resume)) => resume,
        _ => {
            let r =
                Rejection::new(ErrorCode::ShuttingDown, "qlogd is shutting down; reconnect later");
            return reject(&ctx, &mut wr, Some(vm), r).await;
        }
    };
    let _connected = ctx.shared.connection(key.clone());
    log_events::stream_opened(&vm, &hello.stream, resume.last_seq, &truncate(&hello.agent, 64));

    let welcome = Welcome {
        version,
        sink: concat!("qlogd/", env!("CARGO_PKG_VERSION")).to_owned(),
        vm: vm.clone(),
        stream: hello.stream.clone(),
        limits,
        resume: resume.clone(),
    };
    let (ctl_tx, ctl_rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::spawn(write_loop(
        wr,
        encode_json(FrameType::Welcome, &welcome),
        ack_rx.clone(),
        resume.last_seq,
        ctl_rx,
    ));

    let idle_timeout =
        ctx.idle_timeout_override.unwrap_or_else(|| idle_timeout(hello.heartbeat_interval_secs));
    let mut conn = Connection {
        ctx: Arc::clone(&ctx),
        key,
        limits,
        last_seq: 0,
        max_seq: resume.last_seq,
        chunk: Chunk::default(),
        pending: Vec::new(),
        bucket: ctx.buckets.for_vm(&vm, ctx.shared.settings().rate_limit(&vm)),
        held_since: None,
        refused_bytes: 0,
    };
    conn.chunk.key = conn.key.clone();
    let outcome = conn.read_loop(&mut rd, decoder, idle_timeout).await;
    let clean = matches!(outcome, Outcome::End);

    // Whatever ended the stream, events already received are valid: make them durable
    // and tell the peer, which may still be reading after its half-close.
    let flushed = conn.flush().await;
    let target = conn.max_seq;
    let mut acks = ack_rx;
    let durable = flushed
        && tokio::time::timeout(FINAL_ACK_TIMEOUT, acks.wait_for(|seq| *seq >= target))
            .await
            .is_ok_and(|r| r.is_ok());
    match outcome {
        Outcome::End if durable => {
            let _ = ctl_tx.send(encode_u64(FrameType::End, target)).await;
        }
        Outcome::Rejected(r) => {
            log_events::connection_rejected(&vm, &r.message);
            penalise(&ctx, &vm).await;
            let _ = ctx.committer.send(Request::Rejected { vm: vm.clone() }).await;
            let _ = ctl_tx.send(ErrorFrame::new(r.code, r.message).encode()).await;
        }
        Outcome::Shutdown => {
            let frame =
                ErrorFrame::new(ErrorCode::ShuttingDown, "qlogd is shutting down; reconnect later");
            let _ = ctl_tx.send(frame.encode()).await;
        }
        _ => {}
    }
    drop(ctl_tx);
    // The writer exits once it has sent what is queued; a peer that never reads must not
    // keep the task alive.
    let writer_abort = writer.abort_handle();
    if tokio::time::timeout(FINAL_WRITE_TIMEOUT, writer).await.is_err() {
        writer_abort.abort();
    }
    log_events::stream_closed(&vm, &conn.key.1, clean, target);
}

/// How long an established stream may stay silent: three missed heartbeats, or 15
/// minutes for an agent that promised none. Bounded so a connection that only holds a
/// slot is eventually closed.
fn idle_timeout(heartbeat_secs: Option<u32>) -> Duration {
    let secs = heartbeat_secs.map_or(900, |h| u64::from(h).saturating_mul(3));
    Duration::from_secs(secs.clamp(60, 3600))
}

fn take_slot(ctx: &Arc<IngestContext>, vm: &str) -> Option<VmSlot> {
    let mut per_vm = ctx.per_vm.lock().expect("per-VM table lock is never poisoned");
    let n = per_vm.entry(vm.to_owned()).or_default();
    if *n >= ctx.max_connections_per_vm {
        return None;
    }
    *n += 1;
    Some(VmSlot { ctx: Arc::clone(ctx), vm: vm.to_owned() })
}

async fn reject(ctx: &IngestContext, wr: &mut OwnedWriteHalf, vm: Option<String>, r: Rejection) {
    log_events::connection_rejected(vm.as_deref().unwrap_or("unknown"), &r.message);
    if let Some(vm) = vm {
        penalise(ctx, &vm).await;
        let _ = ctx.committer.send(Request::Rejected { vm }).await;
    }
    let frame = ErrorFrame::new(r.code, r.message).encode();
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, async {
        wr.write_all(&frame).await?;
        wr.shutdown().await
    })
    .await;
}

/// Waits before a rejected connection of `vm` is answered, once the VM has spent its
/// budget of rejections (see `rate_limit.rs`). The caller keeps its handshake place or
/// connection slot meanwhile, so a VM cannot have more delayed connections than those.
/// Connections without a VM (no valid descriptor) are not delayed: qrexec always
/// writes one, so they come from the log qube itself, and holding their places would
/// only fill the handshake pool sooner.
async fn penalise(ctx: &IngestContext, vm: &str) {
    if let Some(wait) = ctx.rejections.penalty(vm, Instant::now()) {
        let mut shutdown = ctx.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
    }
}

/// Reads up to and including the descriptor's NUL; bytes after it go to the decoder.
async fn read_descriptor(
    rd: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
) -> Result<Descriptor, Rejection> {
    let bad = |m: String| Rejection::new(ErrorCode::BadDescriptor, m);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n =
            rd.read(&mut chunk).await.map_err(|e| bad(format!("reading the descriptor: {e}")))?;
        if n == 0 {
            return Err(bad("connection closed before the qrexec descriptor ended".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match descriptor::find_end(&buf) {
            Ok(Some(end)) => {
                let desc = descriptor::parse(&buf[..end], INGEST_SERVICE)
                    .map_err(|e| bad(e.to_string()))?;
                decoder.feed(&buf[end..]);
                return Ok(desc);
            }
            Ok(None) => continue,
            Err(e) => return Err(bad(e.to_string())),
        }
    }
}

async fn read_frame(
    rd: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
) -> Result<Option<Frame>, Rejection> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(frame) =
            decoder.next_frame().map_err(|e| Rejection::new(ErrorCode::BadFrame, e.to_string()))?
        {
            return Ok(Some(frame));
        }
        let n = rd
            .read(&mut chunk)
            .await
            .map_err(|e| Rejection::new(ErrorCode::BadFrame, e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        decoder.feed(&chunk[..n]);
    }
}

async fn read_hello(
    rd: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
) -> Result<Hello, Rejection> {
    match read_frame(rd, decoder).await? {
        Some(Frame { ty: FrameType::Hello, payload }) => decode_json(FrameType::Hello, &payload)
            .map_err(|e| Rejection::new(ErrorCode::BadHello, e.to_string())),
        Some(f) => Err(Rejection::new(
            ErrorCode::UnexpectedFrame,
            format!("expected a Hello frame first, got {:?}", f.ty),
        )),
        None => {
            Err(Rejection::new(ErrorCode::BadHello, "connection closed before the Hello frame"))
        }
    }
}

enum Outcome {
    End,
    Eof,
    Shutdown,
    Rejected(Rejection),
}

/// What woke a connection's read loop.
enum Turn {
    /// `n` bytes were read.
    Read(usize),
    /// A pause for pacing ended.
    Paced,
    /// Held refusals are due to the committer.
    HeldDue,
}

struct Connection {
    ctx: Arc<IngestContext>,
    key: (String, String),
    limits: Limits,
    /// Highest sequence number seen on this connection (0 before the first): each
    /// event must go above it.
    last_seq: u64,
    /// Highest sequence number this connection must see durable before its final ack.
    max_seq: u64,
    chunk: Chunk,
    /// Heartbeats and telemetry to hand the committer with the next flush.
    pending: Vec<Request>,
    /// The VM's token bucket, shared with its other connections.
    bucket: SharedBucket,
    /// Since when a chunk of nothing but refusals has been held back.
    held_since: Option<tokio::time::Instant>,
    /// Payload bytes of the items refused since the last read, for the bucket's pacing
    /// clock (see `rate_limit.rs`).
    refused_bytes: u64,
}

impl Connection {
    async fn read_loop(
        &mut self,
        rd: &mut OwnedReadHalf,
        mut decoder: FrameDecoder,
        idle_timeout: Duration,
    ) -> Outcome {
        let mut shutdown = self.ctx.shutdown.clone();
        let mut buf = vec![0u8; 64 * 1024];
        // Only a whole frame moves the deadline: a peer trickling a frame a byte at a
        // time is as idle as a silent one, and must not hold its slot forever.
        let mut idle_deadline = tokio::time::Instant::now() + idle_timeout;
        let mut filled = false;
        loop {
            // Frames first: the handshake's last read may have carried some already.
            loop {
                let (ty, payload) = match decoder.next_frame_ref() {
                    Ok(Some(frame)) => {
                        idle_deadline = tokio::time::Instant::now() + idle_timeout;
                        frame
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return Outcome::Rejected(Rejection::new(
                            ErrorCode::BadFrame,
                            e.to_string(),
                        ))
                    }
                };
                match self.handle(ty, payload) {
                    Ok(false) => {}
                    Ok(true) => return Outcome::End,
                    Err(r) => return Outcome::Rejected(r),
                }
                if (self.chunk.items.len() >= CHUNK_EVENTS || self.chunk.raw.len() >= CHUNK_BYTES)
                    && !self.flush().await
                {
                    return Outcome::Shutdown;
                }
            }
            if !self.flush_unless_only_refused().await {
                return Outcome::Shutdown;
            }
            let held_deadline = self.held_since.map(|t| t + HOLD_REFUSALS);
            let paced = self.pace();
            // While paced, a peer's whole frames stop arriving through no fault of its
            // own: the pause must not count towards its idle timeout.
            if let Some(until) = paced {
                idle_deadline = idle_deadline.max(until + idle_timeout);
            }
            // One full read buffer of work per turn: a peer that always has more input
            // (a flooding VM) would otherwise keep a runtime worker until tokio's budget
            // runs out, a hundred buffers later, while other VMs' frames wait.
            if filled {
                tokio::task::yield_now().await;
            }
            let turn = tokio::select! {
                biased;
                _ = shutdown.wait_for(|down| *down) => return Outcome::Shutdown,
                _ = tokio::time::sleep_until(held_deadline.unwrap_or(idle_deadline)), if held_deadline.is_some() => Turn::HeldDue,
                _ = tokio::time::sleep_until(paced.unwrap_or(idle_deadline)), if paced.is_some() => Turn::Paced,
                _ = tokio::time::sleep_until(idle_deadline) => {
                    let message = format!("no complete frame for {} s; reconnect when there is something to send", idle_timeout.as_secs());
                    return Outcome::Rejected(Rejection::new(ErrorCode::IdleTimeout, message));
                }
                r = rd.read(&mut buf), if paced.is_none() => match r {
                    Ok(0) | Err(_) => {
                        return match decoder.finish() {
                            Ok(()) => Outcome::Eof,
                            Err(e) => Outcome::Rejected(Rejection::new(ErrorCode::BadFrame, e.to_string())),
                        };
                    }
                    Ok(n) => Turn::Read(n),
                },
            };
            let n = match turn {
                Turn::Read(n) => n,
                Turn::Paced => continue,
                // Held refusals are due: hand them over (awaiting here, not inside the
                // select, whose output holds the shutdown watch's guard).
                Turn::HeldDue => {
                    if !self.flush().await {
                        return Outcome::Shutdown;
                    }
                    continue;
                }
            };
            filled = n == buf.len();
            decoder.feed(&buf[..n]);
        }
    }

    /// Within one connection sequence numbers must rise. They may start at or below the
    /// resume point: that is a replay, and the committer drops what it already has.
    fn check_seq(&self, seq: u64) -> Result<(), Rejection> {
        if seq <= self.last_seq {
            return Err(Rejection::new(
                ErrorCode::SequenceNotIncreasing,
                format!("sequence number {seq} does not follow {}", self.last_seq),
            ));
        }
        Ok(())
    }

    /// Returns true at End.
    fn handle(&mut self, ty: FrameType, payload: &[u8]) -> Result<bool, Rejection> {
        let bad_event =
            |e: qlog_rpc::event::EventError| Rejection::new(ErrorCode::BadEvent, e.to_string());
        match ty {
            FrameType::Event => {
                let scan = scan_event_payload(payload, &self.limits).map_err(bad_event)?;
                self.check_seq(scan.seq)?;
                // A refused event is still valid and numbered, and its cursor is where
                // the agent's journal resumes: only its fields are left out.
                if !self.admit(payload.len()) {
                    self.chunk.last_cursor = cursor_of(&scan, payload);
                    self.refuse(scan.seq, payload.len());
                    return Ok(false);
                }
                let start = self.chunk.raw.len();
                if scan.has_trusted {
                    // Rare, and only from a misbehaving VM: rebuild the event renamed.
                    let (_, mut event) =
                        decode_event_payload(payload, &self.limits).map_err(bad_event)?;
                    self.chunk.quarantined += event.quarantine_trusted() as u64;
                    event.encode_fields(&mut self.chunk.raw);
                } else {
                    self.chunk.raw.extend_from_slice(&payload[scan.fields_start..]);
                }
                self.chunk.last_cursor = cursor_of(&scan, payload);
                self.accept_seq(scan.seq);
                self.chunk.items.push(Item::Event {
                    seq: scan.seq,
                    range: start..self.chunk.raw.len(),
                    priority: scan.priority,
                });
            }
            FrameType::Gap => {
                let gap: Gap = decode_json(FrameType::Gap, payload)
                    .map_err(|e| Rejection::new(ErrorCode::BadFrame, e.to_string()))?;
                self.check_seq(gap.seq)?;
                // Gap reports become records too, so they draw on the same bucket.
                if !self.admit(payload.len()) {
                    self.refuse(gap.seq, payload.len());
                    return Ok(false);
                }
                self.accept_seq(gap.seq);
                self.chunk.items.push(Item::Gap { gap });
            }
            FrameType::Heartbeat => {
                let _: Heartbeat = decode_json(FrameType::Heartbeat, payload)
                    .map_err(|e| Rejection::new(ErrorCode::BadFrame, e.to_string()))?;
                // One pending heartbeat says as much as many.
                if !self.pending.iter().any(|r| matches!(r, Request::Heartbeat { .. })) {
                    self.pending.push(Request::Heartbeat { vm: self.key.0.clone() });
                }
            }
            FrameType::Telemetry => {
                let sample: Sample = decode_json(FrameType::Telemetry, payload)
                    .map_err(|e| Rejection::new(ErrorCode::BadFrame, e.to_string()))?;
                let sample = sample.validated();
                if sample.rejected > 0 {
                    log_events::telemetry_rejected(&self.key.0, sample.rejected);
                }
                // A sample is small, but a VM could send them as fast as events: keep a
                // few and count the rest as rejected values rather than queue them all.
                let queued =
                    self.pending.iter().filter(|r| matches!(r, Request::Telemetry { .. })).count();
                if queued < MAX_PENDING_SAMPLES {
                    self.pending.push(Request::Telemetry { vm: self.key.0.clone(), sample });
                } else if let Some(Request::Telemetry { sample: last, .. }) =
                    self.pending.iter_mut().rev().find(|r| matches!(r, Request::Telemetry { .. }))
                {
                    // Counted on the newest queued sample, even if a heartbeat came after.
                    last.rejected += sample.values.len() as u64;
                }
            }
            FrameType::End => {
                let last = message::decode_u64(FrameType::End, payload)
                    .map_err(|e| Rejection::new(ErrorCode::BadFrame, e.to_string()))?;
                if last > self.max_seq {
                    return Err(Rejection::new(
                        ErrorCode::BadFrame,
                        format!(
                            "End names sequence {last}, but the last event received was {}",
                            self.max_seq
                        ),
                    ));
                }
                return Ok(true);
            }
            other => {
                return Err(Rejection::new(
                    ErrorCode::UnexpectedFrame,
                    format!("{other:?} frames are not valid on the ingest stream"),
                ));
            }
        }
        Ok(false)
    }

    fn accept_seq(&mut self, seq: u64) {
        self.last_seq = seq;
        self.max_seq = self.max_seq.max(seq);
    }

    /// Charges what was refused since the last call to the VM's pacing clock; the
    /// instant before which this connection must not read, if any.
    fn pace(&mut self) -> Option<tokio::time::Instant> {
        let mut bucket = self.bucket.lock().expect("bucket lock is never poisoned");
        let until = bucket.pace(std::mem::take(&mut self.refused_bytes), Instant::now());
        until.map(tokio::time::Instant::from_std)
    }

    /// True if the VM's bucket has room for an item of `bytes` payload bytes.
    fn admit(&self, bytes: usize) -> bool {
        let mut bucket = self.bucket.lock().expect("bucket lock is never poisoned");
        bucket.take(bytes, Instant::now())
    }

    /// Counts item `seq` as refused by the rate limit. Refusals the chunk holds back to
    /// back become one [`Item::Refused`]: the committer needs their range and count, not
    /// each one, and a flood of them then costs the queue a few bytes per chunk.
    ///
    /// The design decision: over its limit a VM loses items rather than being held.
    /// Holding its reads until the bucket refills would keep everything, but would also
    /// let a VM that never stops hold its connections and the agent's journal position
    /// forever, and an agent that is behind could never tell the operator. Refusing,
    /// acking and recording a gap is what journald does to a service over its limit; the
    /// connection is only read more slowly meanwhile (the bucket's pacing clock).
    fn refuse(&mut self, seq: u64, bytes: usize) {
        self.accept_seq(seq);
        self.refused_bytes += bytes as u64;
        let now = crate::committer::now_usec();
        if let Some(Item::Refused { last_seq, count, last_usec, .. }) = self.chunk.items.last_mut()
        {
            *last_seq = seq;
            *count += 1;
            *last_usec = now;
            return;
        }
        self.chunk.items.push(Item::Refused {
            first_seq: seq,
            last_seq: seq,
            count: 1,
            first_usec: now,
            last_usec: now,
        });
    }

    /// Hands the pending chunk to the committer, waiting for room: this wait is the
    /// backpressure that reaches the agent. False if the committer is gone.
    /// Like [`Connection::flush`], except that a chunk holding nothing but refusals is
    /// kept for up to [`HOLD_REFUSALS`], growing as more are refused: a flooding VM then
    /// costs the committer a few chunks a second instead of one per read.
    async fn flush_unless_only_refused(&mut self) -> bool {
        let only_refused = self.pending.is_empty()
            && !self.chunk.items.is_empty()
            && self.chunk.items.iter().all(|i| matches!(i, Item::Refused { .. }));
        if only_refused {
            let since = *self.held_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < HOLD_REFUSALS {
                return true;
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> bool {
        self.held_since = None;
        for request in std::mem::take(&mut self.pending) {
            if self.ctx.committer.send(request).await.is_err() {
                return false;
            }
        }
        if self.chunk.items.is_empty() {
            return true;
        }
        let fresh = Chunk {
            key: self.key.clone(),
            raw: Vec::with_capacity(self.chunk.raw.capacity()),
            ..Chunk::default()
        };
        let chunk = std::mem::replace(&mut self.chunk, fresh);
        self.ctx.committer.send(Request::Chunk(chunk)).await.is_ok()
    }
}

/// Sends the welcome, then the ack watermark whenever it rises, then any control frames.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    welcome: Vec<u8>,
    mut acks: watch::Receiver<u64>,
    mut sent: u64,
    mut ctl: mpsc::Receiver<Vec<u8>>,
) {
    if wr.write_all(&welcome).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            changed = acks.changed() => {
                if changed.is_err() {
                    // The committer is gone; only control frames can follow.
                    while let Some(frame) = ctl.recv().await {
                        if wr.write_all(&frame).await.is_err() { return; }
                    }
                    break;
                }
                let seq = *acks.borrow_and_update();
                if seq > sent {
                    sent = seq;
                    if wr.write_all(&encode_u64(FrameType::Ack, seq)).await.is_err() {
                        return;
                    }
                }
            }
            frame = ctl.recv() => match frame {
                Some(frame) => {
                    // A final frame must not overtake the ack it follows.
                    let seq = *acks.borrow_and_update();
                    if seq > sent {
                        sent = seq;
                        if wr.write_all(&encode_u64(FrameType::Ack, seq)).await.is_err() { return; }
                    }
                    if wr.write_all(&frame).await.is_err() { return; }
                }
                None => {
                    // The reader is done; make sure the last durable position is sent.
                    let seq = *acks.borrow_and_update();
                    if seq > sent && wr.write_all(&encode_u64(FrameType::Ack, seq)).await.is_err() {
                        return;
                    }
                    break;
                }
            },
        }
    }
    let _ = wr.shutdown().await;
}

/// An event's `__CURSOR`, if it is one we keep as a resume point.
fn cursor_of(scan: &EventScan, payload: &[u8]) -> Option<String> {
    scan.cursor
        .clone()
        .and_then(|r| std::str::from_utf8(&payload[r]).ok())
        .filter(|c| c.len() <= MAX_CURSOR_LEN)
        .map(str::to_owned)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
