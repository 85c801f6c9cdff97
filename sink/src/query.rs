//! The query plane: answers the `qlog` CLI on the local query socket.
//!
//! A query reads the store on a blocking thread, merging the requested VMs' batches by
//! (receive time, VM, sequence), and streams `Record` frames back through a small bounded
//! channel, so a client that reads slowly holds a few frames, not the result set. A
//! follower subscribes to the committer's live feed *before* reading history and skips
//! cycles its history already covered, so nothing falls between the two. Ingest never
//! waits for a follower: a follower that cannot keep up is told how much it missed.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use qlog_rpc::frame::{encode, FrameDecoder, FrameType};
use qlog_rpc::message::{decode_json, encode_json};
use qlog_rpc::query::{
    Done, EventsQuery, Lagged, RecordView, Request, StatsQuery, VmsReply, MAX_REQUEST_ITEMS,
};
use qlog_rpc::{ErrorCode, ErrorFrame, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};

use crate::filter::CompiledFilter;
use crate::log_events;
use crate::shared::Shared;
use crate::store::{BatchInfo, Store, StoreError};

/// Frames are sent in chunks of about this many bytes.
const SEND_CHUNK: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `limit`: the last N matches are held in memory before they are sent.
const MAX_LIMIT: u64 = 1_000_000;

pub struct QueryContext {
    pub store: Store,
    pub shared: Arc<Shared>,
}

pub async fn serve(stream: UnixStream, ctx: Arc<QueryContext>) {
    let (mut rd, mut wr) = stream.into_split();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut rd)).await {
        Ok(Ok(req)) => req,
        Ok(Err(message)) => return send_error(&mut wr, ErrorCode::BadQuery, message).await,
        Err(_) => {
            return send_error(&mut wr, ErrorCode::BadQuery, "no query within 10 s".into()).await
        }
    };
    match request {
        Request::Vms => {
            let reply = VmsReply { vms: ctx.shared.vm_infos() };
            let _ = wr.write_all(&encode_json(FrameType::Reply, &reply)).await;
        }
        Request::Events(q) => {
            if let Err((code, message)) = run_events(q, &ctx, &mut rd, &mut wr).await {
                log_events::query_failed(&message);
                send_error(&mut wr, code, message).await;
            }
        }
        Request::Stats(q) => {
            if let Err((code, message)) = run_stats(q, &ctx, &mut wr).await {
                log_events::query_failed(&message);
                send_error(&mut wr, code, message).await;
            }
        }
        Request::Verify(q) => match run_verify(q, &ctx).await {
            Ok(reply) => {
                let _ = wr.write_all(&encode_json(FrameType::Reply, &reply)).await;
            }
            Err((code, message)) => {
                log_events::query_failed(&message);
                send_error(&mut wr, code, message).await;
            }
        },
    }
    let _ = wr.shutdown().await;
}

/// Answers a verify request: walks each VM's hash chain on a blocking thread, reading
/// the store as history queries do (one batch in memory at a time), so the committer
/// goes on committing and trimming meanwhile; [`crate::chain`] allows for both.
async fn run_verify(
    q: qlog_rpc::query::VerifyQuery,
    ctx: &QueryContext,
) -> Result<qlog_rpc::query::VerifyReply, QueryError> {
    if q.vms.len() > MAX_REQUEST_ITEMS || q.expect.len() > MAX_REQUEST_ITEMS {
        return Err((
            ErrorCode::BadQuery,
            format!("verify names more than {MAX_REQUEST_ITEMS} VMs or expected links"),
        ));
    }
    let mut expect: std::collections::HashMap<String, Vec<(u64, crate::chain::Hash)>> =
        std::collections::HashMap::new();
    for e in &q.expect {
        let Some(link) = crate::chain::parse_hex(&e.link) else {
            let message = format!("expected link {:?} is not 64 hex digits", e.link);
            return Err((ErrorCode::BadQuery, message));
        };
        expect.entry(e.vm.clone()).or_default().push((e.position, link));
    }
    let store = ctx.store.clone();
    let mut known = store.chain_vms().map_err(|e| (ErrorCode::Internal, e.to_string()))?;
    known.extend(ctx.shared.known_vms());
    known.sort();
    known.dedup();
    let unknown: Vec<&str> = q
        .vms
        .iter()
        .chain(q.expect.iter().map(|e| &e.vm))
        .filter(|v| !known.contains(v))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err((
            ErrorCode::UnknownVm,
            format!("unknown VM {}; known VMs: {}", unknown.join(", "), known.join(", ")),
        ));
    }
    let mut vms = if q.vms.is_empty() { known } else { q.vms.clone() };
    vms.sort();
    vms.dedup();
    let walked = tokio::task::spawn_blocking(move || {
        vms.iter()
            .map(|vm| match q.heads_only {
                true => store.chain_head(vm),
                false => {
                    let expect = expect.get(vm).map_or(&[][..], Vec::as_slice);
                    crate::chain::verify(&store, vm, expect)
                }
            })
            .collect::<Result<Vec<_>, StoreError>>()
    });
    match walked.await {
        Ok(Ok(vms)) => Ok(qlog_rpc::query::VerifyReply { vms }),
        Ok(Err(e)) => Err((ErrorCode::Internal, e.to_string())),
        Err(e) => Err((ErrorCode::Internal, format!("verify task failed: {e}"))),
    }
}

/// Answers a stats request: one `Reply` frame per VM, then `Done`.
async fn run_stats(
    q: StatsQuery,
    ctx: &QueryContext,
    wr: &mut OwnedWriteHalf,
) -> Result<(), QueryError> {
    if q.vms.len() > MAX_REQUEST_ITEMS || q.gauges.len() > MAX_REQUEST_ITEMS {
        return Err((
            ErrorCode::BadQuery,
            format!("stats names more than {MAX_REQUEST_ITEMS} VMs or gauges"),
        ));
    }
    if let Some(bad) = q.gauges.iter().find(|g| qlog_rpc::telemetry::gauge_spec(g).is_none()) {
        return Err((ErrorCode::BadQuery, format!("{bad:?} is not a gauge qlogd records")));
    }
    if q.until_usec <= q.since_usec {
        return Err((
            ErrorCode::BadQuery,
            "the stats range is empty: --since must be before --until".into(),
        ));
    }
    let mut known = ctx.shared.known_vms();
    // qlogd's own metrics are kept under its name before it has stored any event.
    let own = ctx.shared.sink_name().to_owned();
    if !known.contains(&own) {
        known.push(own);
    }
    let unknown: Vec<&String> = q.vms.iter().filter(|v| !known.contains(v)).collect();
    if !unknown.is_empty() {
        let list = unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        return Err((
            ErrorCode::UnknownVm,
            format!("unknown VM {list}; known VMs: {}", known.join(", ")),
        ));
    }
    let vms = if q.vms.is_empty() { known } else { q.vms.clone() };
    let store = ctx.store.clone();
    let replies = tokio::task::spawn_blocking(move || {
        vms.iter()
            .map(|vm| {
                crate::rollup::read_stats(
                    &store,
                    vm,
                    q.since_usec,
                    q.until_usec,
                    q.bucket_minutes,
                    &q.gauges,
                )
            })
            .collect::<Result<Vec<_>, StoreError>>()
    })
    .await
    .map_err(|e| (ErrorCode::Internal, format!("stats task failed: {e}")))?
    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
    let mut sent = 0u64;
    for reply in &replies {
        if wr.write_all(&encode_json(FrameType::Reply, reply)).await.is_err() {
            return Ok(());
        }
        sent += 1;
    }
    let _ = wr.write_all(&encode_json(FrameType::Done, &Done { matched: sent })).await;
    Ok(())
}

async fn send_error(wr: &mut OwnedWriteHalf, code: ErrorCode, message: String) {
    let _ = wr.write_all(&ErrorFrame::new(code, message).encode()).await;
    let _ = wr.shutdown().await;
}

async fn read_request(rd: &mut tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut decoder = FrameDecoder::new(Limits::DEFAULT);
    let mut buf = [0u8; 4096];
    loop {
        match decoder.next_frame() {
            Ok(Some(f)) if f.ty == FrameType::Query => {
                return decode_json(FrameType::Query, &f.payload).map_err(|e| e.to_string())
            }
            Ok(Some(f)) => return Err(format!("expected a Query frame, got {:?}", f.ty)),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a whole Query frame arrived".into());
        }
        decoder.feed(&buf[..n]);
    }
}

type QueryError = (ErrorCode, String);

async fn run_events(
    q: EventsQuery,
    ctx: &QueryContext,
    rd: &mut tokio::net::unix::OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
) -> Result<(), QueryError> {
    let filter = CompiledFilter::new(&q.filter).map_err(|m| (ErrorCode::BadQuery, m))?;
    let known = ctx.shared.known_vms();
    if q.vms.len() > MAX_REQUEST_ITEMS {
        return Err((
            ErrorCode::BadQuery,
            format!("query names more than {MAX_REQUEST_ITEMS} VMs"),
        ));
    }
    let unknown: Vec<&String> = q.vms.iter().filter(|v| !known.contains(v)).collect();
    if !unknown.is_empty() {
        let list = unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        return Err((
            ErrorCode::UnknownVm,
            format!("unknown VM {list}; known VMs: {}", known.join(", ")),
        ));
    }
    if q.limit.is_some_and(|n| n > MAX_LIMIT) {
        return Err((
            ErrorCode::BadQuery,
            format!("-n is limited to {MAX_LIMIT}; leave it out to stream every match"),
        ));
    }
    let mut vms = if q.vms.is_empty() { known } else { q.vms.clone() };
    vms.sort();
    vms.dedup();

    // Subscribe before reading the store: see the module docs.
    let live = q.follow.then(|| ctx.shared.subscribe());
    let watermark = ctx.shared.committed_batch_id();
    let filter = Arc::new(filter);

    let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(8);
    let store = ctx.store.clone();
    let history_filter = Arc::clone(&filter);
    let (limit, reverse) = (q.limit, q.reverse);
    let producer = tokio::task::spawn_blocking(move || {
        history(&store, &vms, &history_filter, limit, reverse, watermark, &tx)
    });
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|m| (ErrorCode::Internal, m))?;
        if wr.write_all(&chunk).await.is_err() {
            return Ok(());
        }
    }
    let matched =
        producer.await.map_err(|e| (ErrorCode::Internal, format!("query task failed: {e}")))?;
    if wr.write_all(&encode_json(FrameType::Done, &Done { matched })).await.is_err() {
        return Ok(());
    }
    let Some(live) = live else { return Ok(()) };
    follow(live, watermark, &filter, &q.vms, &ctx.shared, rd, wr).await;
    Ok(())
}

/// Streams the stored matches; returns how many there were.
fn history(
    store: &Store,
    vms: &[String],
    filter: &CompiledFilter,
    limit: Option<u64>,
    reverse: bool,
    watermark: u64,
    tx: &mpsc::Sender<Result<Vec<u8>, String>>,
) -> u64 {
    let mut out = FrameSink { tx, buf: Vec::with_capacity(SEND_CHUNK), open: true };
    let mut matched = 0u64;
    match limit {
        // The last N matches: walk backwards until N are found, then send them in the
        // requested order.
        Some(n) => {
            let mut merge = Merge::new(store, vms, filter, true, watermark);
            let mut found = Vec::new();
            while (found.len() as u64) < n {
                match merge.next() {
                    Some(Ok(r)) => found.push(r),
                    Some(Err(e)) => return out.fail(e),
                    None => break,
                }
            }
            if !reverse {
                found.reverse();
            }
            for r in &found {
                matched += 1;
                out.record(r);
            }
        }
        None => {
            for r in Merge::new(store, vms, filter, reverse, watermark) {
                match r {
                    Ok(r) => {
                        matched += 1;
                        out.record(&r);
                        if !out.open {
                            break;
                        }
                    }
                    Err(e) => return out.fail(e),
                }
            }
        }
    }
    out.flush();
    matched
}

struct FrameSink<'a> {
    tx: &'a mpsc::Sender<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    /// False once the client has gone: stop producing.
    open: bool,
}

impl FrameSink<'_> {
    /// Sends one record as it is stored: records are already in their wire encoding.
    fn record(&mut self, m: &Match) {
        encode(FrameType::Record, &m.bytes, &mut self.buf);
        if self.buf.len() >= SEND_CHUNK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() && self.open {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(SEND_CHUNK));
            self.open = self.tx.blocking_send(Ok(chunk)).is_ok();
        }
    }

    fn fail(&mut self, e: StoreError) -> u64 {
        self.flush();
        let _ = self.tx.blocking_send(Err(e.to_string()));
        0
    }
}

/// A record that matched, copied out of its batch. `key` orders the merge: receive
/// time, then the VM's place in the sorted VM list (which is name order), then sequence.
struct Match {
    key: (u64, usize, u64),
    bytes: Vec<u8>,
}

/// One VM's matching records in time order (or reverse), a batch at a time, filtered
/// in place so only matches are copied.
struct VmCursor<'a> {
    store: &'a Store,
    vm: &'a str,
    source: usize,
    batches: Box<dyn Iterator<Item = Result<BatchInfo, StoreError>> + Send + 'a>,
    /// The current batch, decompressed, and where its records start and end, in the
    /// order they are to be visited.
    raw: Vec<u8>,
    spans: Vec<(usize, usize)>,
    next: usize,
    filter: &'a CompiledFilter,
    reverse: bool,
    watermark: u64,
}

impl Iterator for VmCursor<'_> {
    type Item = Result<Match, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            while self.next < self.spans.len() {
                let (start, end) = self.spans[self.next];
                self.next += 1;
                let bytes = &self.raw[start..end];
                let view = RecordView::parse(bytes).expect("read_raw checked every record");
                if self.filter.matches(&view) {
                    let key = (view.received_usec, self.source, view.seq);
                    return Some(Ok(Match { key, bytes: bytes.to_vec() }));
                }
            }
            let info = match self.batches.next()? {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            // Batches committed after the follow watermark reach a follower live.
            if info.batch_id() > self.watermark {
                continue;
            }
            self.raw = match self.store.read_raw(self.vm, &info) {
                Ok(Some(raw)) => raw,
                // Trimmed by quota or retention since the scan listed it.
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            };
            self.spans.clear();
            let mut pos = 0;
            while pos < self.raw.len() {
                let len = RecordView::parse(&self.raw[pos..])
                    .expect("read_raw checked every record")
                    .bytes
                    .len();
                self.spans.push((pos, pos + len));
                pos += len;
            }
            if self.reverse {
                self.spans.reverse();
            }
            self.next = 0;
        }
    }
}

struct Head {
    m: Match,
    source: usize,
    reverse: bool,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.m.key == other.m.key
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    /// BinaryHeap pops the greatest: forward merges invert the order to pop the oldest.
    fn cmp(&self, other: &Self) -> Ordering {
        let ord = self.m.key.cmp(&other.m.key);
        if self.reverse {
            ord
        } else {
            ord.reverse()
        }
    }
}

struct Merge<'a> {
    cursors: Vec<VmCursor<'a>>,
    heap: BinaryHeap<Head>,
    primed: bool,
    reverse: bool,
    error: Option<StoreError>,
}

impl<'a> Merge<'a> {
    /// `vms` must be sorted, so a VM's index orders as its name does.
    fn new(
        store: &'a Store,
        vms: &'a [String],
        filter: &'a CompiledFilter,
        reverse: bool,
        watermark: u64,
    ) -> Merge<'a> {
        let cursors = vms
            .iter()
            .enumerate()
            .map(|(source, vm)| VmCursor {
                store,
                vm,
                source,
                batches: store.scan(vm, filter.since_usec, filter.until_usec, reverse),
                raw: Vec::new(),
                spans: Vec::new(),
                next: 0,
                filter,
                reverse,
                watermark,
            })
            .collect();
        Merge { cursors, heap: BinaryHeap::new(), primed: false, reverse, error: None }
    }

    fn pull(&mut self, source: usize) {
        match self.cursors[source].next() {
            Some(Ok(m)) => self.heap.push(Head { m, source, reverse: self.reverse }),
            Some(Err(e)) => self.error = Some(e),
            None => {}
        }
    }
}

impl Iterator for Merge<'_> {
    type Item = Result<Match, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.primed {
            self.primed = true;
            for i in 0..self.cursors.len() {
                self.pull(i);
            }
        }
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        let head = self.heap.pop()?;
        self.pull(head.source);
        Some(Ok(head.m))
    }
}

/// Sends matches from the live feed until the client hangs up.
async fn follow(
    mut live: broadcast::Receiver<Arc<crate::shared::Committed>>,
    watermark: u64,
    filter: &CompiledFilter,
    vms: &[String],
    shared: &Shared,
    rd: &mut tokio::net::unix::OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
) {
    let mut seen_events: Option<u64> = None;
    let mut lagging = false;
    let mut probe = [0u8; 64];
    loop {
        let cycle = tokio::select! {
            // The client sends nothing after its query; a read returning means it is gone.
            _ = rd.read(&mut probe) => return,
            c = live.recv() => c,
        };
        let cycle = match cycle {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                shared.follower_lagged();
                lagging = true;
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if lagging {
            lagging = false;
            let missed = seen_events.map_or(0, |seen| cycle.events_before.saturating_sub(seen));
            if wr.write_all(&encode_json(FrameType::Lagged, &Lagged { missed })).await.is_err() {
                return;
            }
        }
        seen_events = Some(cycle.events_before + cycle.count);
        if cycle.last_batch_id <= watermark {
            continue;
        }
        // Filtered in place; the matches go out as they are stored, in merge order.
        let Ok(views) = RecordView::parse_all(&cycle.raw) else { continue };
        let mut matched: Vec<&RecordView<'_>> = views
            .iter()
            .filter(|r| (vms.is_empty() || vms.iter().any(|v| v == r.vm)) && filter.matches(r))
            .collect();
        matched.sort_by(|a, b| (a.received_usec, a.vm, a.seq).cmp(&(b.received_usec, b.vm, b.seq)));
        let mut buf = Vec::new();
        for r in matched {
            encode(FrameType::Record, r.bytes, &mut buf);
        }
        if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
            return;
        }
    }
}
