//! The query plane: answers the `qlog` CLI on the local query socket.
//!
//! A query reads the store on a blocking thread, merging the requested VMs' batches by
//! (receive time, VM, sequence), and streams `Record` frames back through a small bounded
//! channel, so a client that reads slowly holds a few frames, not the result set.
//! Inflating and filtering batches is most of a query's work, so it is spread over
//! qlogd's [`DecodePool`], one worker per core, shared by all queries: each VM's cursor
//! queues jobs of its next batches, all cursors before the merge waits on any, and one
//! more as it takes each result, so the workers decode ahead of the merge; it takes the
//! results back in scan order, so the merge sees exactly what one thread would have
//! produced. Each batch's record keys let the filter skip the chunks it cannot want
//! ([`crate::batch`]). A follower subscribes to the committer's live feed *before* reading history and skips
//! cycles its history already covered, so nothing falls between the two. Ingest never
//! waits for a follower: a follower that cannot keep up is told how much it missed.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;
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
use crate::store::{BatchInfo, SegmentFiles, Store, StoreError};

/// Frames are sent in chunks of about this many bytes.
const SEND_CHUNK: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `limit`: the last N matches are held in memory before they are sent.
const MAX_LIMIT: u64 = 1_000_000;

pub struct QueryContext {
    pub store: Store,
    pub shared: Arc<Shared>,
    pub pool: DecodePool,
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
    let walk = Walk {
        store: ctx.store.clone(),
        filter: Arc::clone(&filter),
        watermark,
        reverse: q.reverse,
        per_batch: None,
        job_bytes: JOB_STORED_BYTES,
    };
    let (limit, pool) = (q.limit, ctx.pool.clone());
    let producer = tokio::task::spawn_blocking(move || history(walk, &vms, limit, &pool, &tx));
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

/// Streams the stored matches, decoded by the pool's workers; returns how many there
/// were.
fn history(
    walk: Walk,
    vms: &[String],
    limit: Option<u64>,
    pool: &DecodePool,
    tx: &mpsc::Sender<Result<Vec<u8>, String>>,
) -> u64 {
    let mut out = FrameSink { tx, buf: Vec::with_capacity(SEND_CHUNK), open: true };
    let mut matched = 0u64;
    let reverse = walk.reverse;
    let walk = Arc::new(match limit {
        Some(n) => walk.newest(n),
        None => walk,
    });
    let mut merge = Merge::new(&walk, vms, pool);
    match limit {
        // The last N matches: walk backwards until N are found, then send them in the
        // requested order.
        Some(n) => {
            // The matches back to back in one buffer, and where each one is.
            let (mut bytes, mut found) = (Vec::new(), Vec::new());
            while (found.len() as u64) < n {
                let keep = |record: &[u8]| {
                    found.push(bytes.len()..bytes.len() + record.len());
                    bytes.extend_from_slice(record);
                };
                match merge.next_match(keep) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => return out.fail(e),
                }
            }
            drop(merge);
            if !reverse {
                found.reverse();
            }
            for r in found {
                matched += 1;
                out.record(&bytes[r]);
            }
        }
        None => loop {
            match merge.next_match(|bytes| out.record(bytes)) {
                Ok(true) => matched += 1,
                Ok(false) => break,
                Err(e) => return out.fail(e),
            }
            if !out.open {
                break;
            }
        },
    }
    out.flush();
    matched
}

/// A cursor gathers batches into one job until they hold this many stored bytes: a job
/// is a handoff to a worker and back, which costs a wake-up each way, so a job should be
/// worth more than one small batch. A job's matches are held until the merge takes
/// them, and every cursor has one job queued ahead of the one being merged, so this
/// also bounds a query's memory: one megabyte of records stores as some 200 KB.
const JOB_STORED_BYTES: u64 = 256 * 1024;

type Task = Box<dyn FnOnce() + Send>;

/// The decode workers all queries share: started once with qlogd, one per core, so a
/// query neither starts threads nor meets cold buffers. Each cursor keeps at most a
/// couple of jobs queued, so one query's scan delays another's jobs by a few
/// milliseconds at most.
#[derive(Clone)]
pub struct DecodePool {
    tasks: std::sync::mpsc::Sender<Task>,
    workers: usize,
}

impl DecodePool {
    /// Starts `workers` threads (at least one); they end when the last clone of the pool
    /// is dropped.
    pub fn start(workers: usize) -> std::io::Result<DecodePool> {
        let workers = workers.max(1);
        let (tasks, queue) = std::sync::mpsc::channel::<Task>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for i in 0..workers {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new().name(format!("qlogd-decode-{i}")).spawn(move || loop {
                // Holding the lock while waiting is fine: whoever holds it takes the next
                // task, and every worker sees the queue close in turn.
                let task = match queue.lock() {
                    Ok(queue) => queue.recv(),
                    Err(_) => return,
                };
                let Ok(task) = task else { return };
                task();
            })?;
        }
        Ok(DecodePool { tasks, workers })
    }

    /// One worker per core.
    pub fn per_core() -> std::io::Result<DecodePool> {
        DecodePool::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Hands a job to the workers; if one of them runs it, the result arrives on `reply`.
    fn submit(&self, job: &Arc<Job>, reply: std::sync::mpsc::Sender<BatchResult>) {
        let job = Arc::clone(job);
        // The cursor may have gone (the client hung up); nobody wants the result then.
        let task = move || {
            if let Some(result) = job.run() {
                let _ = reply.send(result);
            }
        };
        self.tasks.send(Box::new(task)).expect(WORKERS_OUTLIVE_POOL);
    }
}

/// Consecutive batches of one VM to decode as one result. Whoever claims it first
/// decodes it: a worker, or the cursor itself when it needs the result before any
/// worker has begun it, which saves two thread handoffs (much of a `tail -n`'s time)
/// and makes the merge's thread a decoder whenever it would only wait. A cursor that
/// goes claims the jobs it still has queued, so that nobody decodes them.
struct Job {
    claimed: std::sync::atomic::AtomicBool,
    walk: Arc<Walk>,
    vm: String,
    source: usize,
    infos: Vec<BatchInfo>,
}

impl Job {
    /// The job's result, if nobody had claimed it yet.
    fn run(&self) -> Option<BatchResult> {
        let taken = self.claimed.swap(true, std::sync::atomic::Ordering::AcqRel);
        (!taken).then(|| self.walk.batches(&self.vm, self.source, &self.infos))
    }
}

struct FrameSink<'a> {
    tx: &'a mpsc::Sender<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    /// False once the client has gone: stop producing.
    open: bool,
}

impl FrameSink<'_> {
    /// Sends one record as it is stored: records are already in their wire encoding.
    fn record(&mut self, bytes: &[u8]) {
        encode(FrameType::Record, bytes, &mut self.buf);
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

/// How a query reads the store: which batches it may see, in which direction, and
/// which records it keeps.
struct Walk {
    store: Store,
    filter: Arc<CompiledFilter>,
    /// Batches committed after it reach a follower live instead.
    watermark: u64,
    reverse: bool,
    /// A walk for the newest N matches needs at most N from any one batch.
    per_batch: Option<u64>,
    /// How many stored bytes of batches a job gathers: [`JOB_STORED_BYTES`], except in
    /// tests, whose small stores need small jobs to queue several.
    job_bytes: u64,
}

impl Walk {
    /// The walk that finds the newest `n` matches: backwards, at most `n` from a batch.
    fn newest(self, n: u64) -> Self {
        Walk { reverse: true, per_batch: Some(n), ..self }
    }

    /// The matching records of consecutive batches of one VM, in visiting order, each
    /// parsed once. A batch past the watermark, or trimmed since it was listed, has
    /// none. The filter first judges each batch's record keys, so only chunks holding
    /// records it may want are inflated.
    fn batches(&self, vm: &str, source: usize, infos: &[BatchInfo]) -> Result<Batch, StoreError> {
        let mut batch = Batch::default();
        let filter = &*self.filter;
        // The batches are consecutive in walking order, so the newest N of them all are
        // all a walk for the newest N can use.
        let mut left = self.per_batch.unwrap_or(u64::MAX);
        let mut files = SegmentFiles::default();
        for info in infos {
            if info.batch_id() > self.watermark {
                continue;
            }
            self.store.for_each_record(&mut files, vm, info, self.reverse, filter, |view| {
                if !filter.matches(&view) {
                    return ControlFlow::Continue(());
                }
                let start = batch.bytes.len();
                batch.bytes.extend_from_slice(view.bytes);
                let key = (view.received_usec, source, view.seq);
                batch.items.push(Item { key, start, end: batch.bytes.len() });
                left -= 1;
                if left == 0 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            if left == 0 {
                break;
            }
        }
        Ok(batch)
    }
}

/// The matches of one batch, copied out back to back: one allocation per batch.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

/// A match in a [`Batch`]. `key` orders the merge: receive time, then the VM's place in
/// the sorted VM list (which is name order), then sequence.
#[derive(Clone, Copy)]
struct Item {
    key: (u64, usize, u64),
    start: usize,
    end: usize,
}

type BatchResult = Result<Batch, StoreError>;

/// The pool's workers only return once every clone of the pool has gone (a panic aborts
/// the process), and a query holds one.
const WORKERS_OUTLIVE_POOL: &str = "decode workers outlive their pool";
/// A job that a worker claimed is answered (its sender is dropped unanswered only with
/// a worker that is gone: see [`WORKERS_OUTLIVE_POOL`]).
const CLAIMED_JOBS_REPLY: &str = "a worker answers the job it claimed";

/// One VM's matching records in time order (or reverse), a batch at a time.
struct VmCursor<'a> {
    vm: &'a str,
    source: usize,
    batches: Box<dyn Iterator<Item = Result<BatchInfo, StoreError>> + Send + 'a>,
    walk: &'a Arc<Walk>,
    /// The pool, and the jobs queued to it with their results, in scan order: up to
    /// `depth` of them once the cursor queues ahead.
    pool: &'a DecodePool,
    pending: std::collections::VecDeque<(Arc<Job>, std::sync::mpsc::Receiver<BatchResult>)>,
    depth: usize,
    /// Results taken so far.
    taken: usize,
    /// A scan error met while queueing ahead, reported once the jobs before it are.
    failed: Option<StoreError>,
    current: Batch,
    next: usize,
}

impl<'a> VmCursor<'a> {
    /// `vms` is how many cursors share the pool: together they keep every worker busy.
    fn new(
        walk: &'a Arc<Walk>,
        vm: &'a str,
        source: usize,
        pool: &'a DecodePool,
        vms: usize,
    ) -> Self {
        let filter = &walk.filter;
        VmCursor {
            vm,
            source,
            batches: walk.store.scan(vm, filter.since_usec, filter.until_usec, walk.reverse),
            walk,
            pool,
            pending: Default::default(),
            depth: pool.workers.div_ceil(vms.max(1)),
            taken: 0,
            failed: None,
            current: Batch::default(),
            next: 0,
        }
    }

    /// The batches of the cursor's next job: up to the walk's `job_bytes` of them, none at
    /// the end of its range. A scan error after some batches is kept in `failed`, to be
    /// reported after them.
    fn job_infos(&mut self) -> Result<Vec<BatchInfo>, StoreError> {
        let mut infos = Vec::new();
        let mut stored = 0;
        while stored < self.walk.job_bytes {
            match self.batches.next() {
                Some(Ok(info)) => {
                    stored += info.stored_len();
                    infos.push(info);
                }
                Some(Err(e)) if infos.is_empty() => return Err(e),
                Some(Err(e)) => {
                    self.failed = Some(e);
                    break;
                }
                None => break,
            }
        }
        Ok(infos)
    }

    /// Whether the cursor keeps `depth` jobs queued. A walk for the newest N will likely
    /// stop within its first job: it queues one at a time until it has needed a second.
    fn queues_ahead(&self) -> bool {
        self.walk.per_batch.is_none() || self.taken > 1
    }

    /// Queues jobs until `depth` of them are in the pool (one, if the cursor does not
    /// queue ahead): at the start, and after each result taken, so the next batches
    /// decode while the merge consumes this one.
    fn fill(&mut self) -> Result<(), StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let depth = if self.queues_ahead() { self.depth } else { 1 };
        while self.pending.len() < depth {
            let infos = self.job_infos()?;
            if infos.is_empty() {
                break;
            }
            let job = Arc::new(Job {
                claimed: Default::default(),
                walk: Arc::clone(self.walk),
                vm: self.vm.to_owned(),
                source: self.source,
                infos,
            });
            let (reply, result) = std::sync::mpsc::channel();
            self.pool.submit(&job, reply);
            self.pending.push_back((job, result));
            if self.failed.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// The next decoded batches in walking order; `None` at the end of the VM's range.
    fn next_batch(&mut self) -> Option<BatchResult> {
        if self.pending.is_empty() {
            if let Err(e) = self.fill() {
                return Some(Err(e));
            }
        }
        let (job, result) = self.pending.pop_front()?;
        let batch = match job.run() {
            Some(batch) => batch,
            None => result.recv().expect(CLAIMED_JOBS_REPLY),
        };
        self.taken += 1;
        if self.queues_ahead() {
            if let Err(e) = self.fill() {
                // Reported after this batch's matches, where it belongs in the walk.
                self.failed = Some(e);
            }
        }
        Some(batch)
    }

    /// Moves to the next match; false at the end of the VM's range.
    fn advance(&mut self) -> Result<bool, StoreError> {
        loop {
            if self.next < self.current.items.len() {
                return Ok(true);
            }
            match self.next_batch() {
                Some(batch) => {
                    self.current = batch?;
                    self.next = 0;
                    if !self.current.items.is_empty() {
                        return Ok(true);
                    }
                }
                None => return Ok(false),
            }
        }
    }

    fn head(&self) -> Item {
        self.current.items[self.next]
    }
}

impl Drop for VmCursor<'_> {
    /// The merge stops early (its N found, or the client gone): the jobs still queued
    /// are claimed here, so no worker decodes what nobody will read.
    fn drop(&mut self) {
        for (job, _) in &self.pending {
            job.claimed.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Heap entry: a cursor's current match key. BinaryHeap pops the greatest, so forward
/// merges invert the order to pop the oldest.
#[derive(PartialEq, Eq)]
struct Head {
    key: (u64, usize, u64),
    source: usize,
    reverse: bool,
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        let ord = self.key.cmp(&other.key);
        if self.reverse {
            ord
        } else {
            ord.reverse()
        }
    }
}

struct Merge<'a> {
    reverse: bool,
    cursors: Vec<VmCursor<'a>>,
    heap: BinaryHeap<Head>,
    primed: bool,
    /// The cursor whose match was handed out last: it moves on before the next pick.
    taken: Option<usize>,
}

impl<'a> Merge<'a> {
    /// `vms` must be sorted, so a VM's index orders as its name does.
    fn new(walk: &'a Arc<Walk>, vms: &'a [String], pool: &'a DecodePool) -> Merge<'a> {
        let cursors = vms
            .iter()
            .enumerate()
            .map(|(source, vm)| VmCursor::new(walk, vm, source, pool, vms.len()))
            .collect();
        let reverse = walk.reverse;
        Merge { reverse, cursors, heap: BinaryHeap::new(), primed: false, taken: None }
    }

    fn push(&mut self, source: usize) -> Result<(), StoreError> {
        if self.cursors[source].advance()? {
            let key = self.cursors[source].head().key;
            self.heap.push(Head { key, source, reverse: self.reverse });
        }
        Ok(())
    }

    /// Hands the next match's stored bytes to `take`; false when every VM is done.
    fn next_match(&mut self, take: impl FnOnce(&[u8])) -> Result<bool, StoreError> {
        if !self.primed {
            self.primed = true;
            // Every cursor's first jobs go to the pool before the merge waits on any.
            for cursor in &mut self.cursors {
                if let Err(e) = cursor.fill() {
                    cursor.failed = Some(e);
                }
            }
            for source in 0..self.cursors.len() {
                self.push(source)?;
            }
        }
        if let Some(source) = self.taken.take() {
            self.cursors[source].next += 1;
            self.push(source)?;
        }
        let Some(head) = self.heap.pop() else { return Ok(false) };
        let cursor = &self.cursors[head.source];
        let item = cursor.head();
        take(&cursor.current.bytes[item.start..item.end]);
        self.taken = Some(head.source);
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CommitSet, StoreWriter};
    use qlog_rpc::query::{Filter, Record, RecordKind};
    use qlog_rpc::Event;

    /// A store of three VMs whose batches interleave in time, a few records each.
    fn interleaved_store(dir: &std::path::Path) -> Store {
        let store = Store::open(dir, 8 << 20).unwrap();
        let mut w = StoreWriter::open(store.clone(), 1 << 20).unwrap();
        let mut batches = Vec::new();
        for id in 1..=30u64 {
            let vm = ["a", "b", "c"][(id % 3) as usize];
            let records: Vec<Record> = (0..4)
                .map(|i| {
                    let mut event = Event::new();
                    event.push("MESSAGE", format!("batch {id} record {i}"));
                    event.push("PRIORITY", if i % 2 == 0 { "3" } else { "6" });
                    Record {
                        vm: vm.into(),
                        stream: "s".into(),
                        // Two VMs share some receive times: the merge breaks ties by VM.
                        received_usec: 1_000 + (id / 2) * 10 + i,
                        seq: id * 10 + i,
                        kind: RecordKind::Event,
                        event,
                    }
                })
                .collect();
            batches.push(Store::encode_batch(vm, id, &records));
        }
        w.commit(&CommitSet { batches, next_batch_id: 31, ..Default::default() }).unwrap();
        store
    }

    /// What `history` sends, as (VM, seq) in order.
    fn run(
        store: &Store,
        filter: &Filter,
        limit: Option<u64>,
        reverse: bool,
        workers: usize,
    ) -> Vec<(String, u64)> {
        run_vms(store, &["a", "b", "c"], filter, limit, reverse, workers)
    }

    /// Like [`run`], with jobs of one batch each: a cursor then queues several ahead.
    fn run_small_jobs(
        store: &Store,
        filter: &Filter,
        limit: Option<u64>,
        reverse: bool,
        workers: usize,
    ) -> Vec<(String, u64)> {
        run_walk(store, &["a", "b", "c"], filter, limit, reverse, workers, 1)
    }

    /// What `history` sends for the VMs named, as (VM, seq) in order.
    fn run_vms(
        store: &Store,
        vms: &[&str],
        filter: &Filter,
        limit: Option<u64>,
        reverse: bool,
        workers: usize,
    ) -> Vec<(String, u64)> {
        run_walk(store, vms, filter, limit, reverse, workers, JOB_STORED_BYTES)
    }

    fn run_walk(
        store: &Store,
        vms: &[&str],
        filter: &Filter,
        limit: Option<u64>,
        reverse: bool,
        workers: usize,
        job_bytes: u64,
    ) -> Vec<(String, u64)> {
        let filter = CompiledFilter::new(filter).unwrap();
        let vms: Vec<String> = vms.iter().map(|v| (*v).to_owned()).collect();
        let (tx, mut rx) = mpsc::channel(8);
        let filter = Arc::new(filter);
        let watermark = u64::MAX;
        let walk =
            Walk { store: store.clone(), filter, watermark, reverse, per_batch: None, job_bytes };
        let vms = &vms;
        let pool = DecodePool::start(workers).unwrap();
        let pool = &pool;
        std::thread::scope(|s| {
            // The producer owns the sender: the channel ends when history returns.
            let producer = s.spawn(move || history(walk, vms, limit, pool, &tx));
            let mut got = Vec::new();
            let mut decoder = FrameDecoder::new(Limits::DEFAULT);
            while let Some(chunk) = rx.blocking_recv() {
                decoder.feed(&chunk.unwrap());
                while let Some(frame) = decoder.next_frame().unwrap() {
                    let view = RecordView::parse(&frame.payload).unwrap();
                    got.push((view.vm.to_owned(), view.seq));
                }
            }
            let matched = producer.join().unwrap();
            assert_eq!(matched as usize, got.len());
            got
        })
    }

    #[test]
    fn decode_workers_change_nothing_but_speed() {
        let dir = std::env::temp_dir().join(format!("qlog-query-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = interleaved_store(&dir);
        let err = Filter { priority: Some((0, 3)), ..Default::default() };
        for filter in [Filter::default(), err] {
            for (limit, reverse) in [(None, false), (None, true), (Some(5), false), (Some(7), true)]
            {
                // One worker decodes the batches strictly in scan order: the baseline.
                let one = run(&store, &filter, limit, reverse, 1);
                let expected = match limit {
                    None => 120 / if filter.priority.is_some() { 2 } else { 1 },
                    Some(n) => n as usize,
                };
                assert_eq!(one.len(), expected, "{filter:?} {limit:?} {reverse}");
                // Merge order: receive time, then VM name, then sequence.
                let key = |(vm, seq): &(String, u64)| {
                    let received = 1_000 + (seq / 10 / 2) * 10 + seq % 10;
                    (received, vm.clone(), *seq)
                };
                let mut sorted = one.clone();
                sorted.sort_by_key(key);
                if reverse {
                    sorted.reverse();
                }
                match limit {
                    None => assert_eq!(one, sorted, "{filter:?} {reverse}"),
                    // `-n N` is the newest N matches, in the order asked for.
                    Some(n) => {
                        let all = run(&store, &filter, None, false, 1);
                        let mut newest = all[all.len() - n as usize..].to_vec();
                        if reverse {
                            newest.reverse();
                        }
                        assert_eq!(one, newest, "{filter:?} {limit:?} {reverse}");
                    }
                }
                for workers in [2, 3, 4] {
                    let threaded = run(&store, &filter, limit, reverse, workers);
                    assert_eq!(threaded, one, "pool of {workers}, {filter:?} {limit:?} {reverse}");
                }
                // Many jobs a VM, queued ahead of the merge: the same answer.
                for workers in [1, 2, 3] {
                    let small = run_small_jobs(&store, &filter, limit, reverse, workers);
                    assert_eq!(
                        small, one,
                        "one-batch jobs, pool of {workers}, {filter:?} {limit:?}"
                    );
                }
            }
        }
        // One VM's newest N, whichever thread claims its first job.
        for filter in [Filter::default(), Filter { priority: Some((0, 3)), ..Default::default() }] {
            let all = run_vms(&store, &["b"], &filter, None, false, 2);
            for (n, reverse) in [(1, false), (3, true), (15, false), (500, true)] {
                let mut newest = all[all.len().saturating_sub(n)..].to_vec();
                if reverse {
                    newest.reverse();
                }
                for workers in [1, 2] {
                    let got = run_vms(&store, &["b"], &filter, Some(n as u64), reverse, workers);
                    assert_eq!(
                        got, newest,
                        "{filter:?} -n {n} reverse {reverse}, {workers} workers"
                    );
                    // One-batch jobs: with two workers, two of them queued at a time.
                    let limit = Some(n as u64);
                    let got = run_walk(&store, &["b"], &filter, limit, reverse, workers, 1);
                    assert_eq!(got, newest, "one-batch jobs, -n {n}, {workers} workers");
                }
            }
        }
        let forward = run(&store, &Filter::default(), None, false, 2);
        let mut backward = run(&store, &Filter::default(), None, true, 2);
        backward.reverse();
        assert_eq!(forward, backward);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
