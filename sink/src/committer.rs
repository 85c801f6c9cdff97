//! Group commit: the one thread that turns accepted events into durable batches.
//!
//! Ingest connections send [`Chunk`]s of decoded events over a bounded channel; the
//! committer drains whatever is queued, stamps receive times, drops replays by sequence
//! number, builds one compressed batch per VM, enforces quotas, writes it all in one
//! atomic sled batch, flushes, and only then raises each stream's ack watermark and feeds
//! the followers. While one cycle flushes, the next one queues up, so commit cost is paid
//! per cycle, not per event.
//!
//! Owning all sequence and quota state in one thread is what makes dedup exact: two
//! connections for the same stream (a reconnect racing its predecessor) are serialised
//! here. When a commit fails (a full disk), the cycle is retried until it succeeds and no
//! new chunk is taken meanwhile: acks stop, backpressure reaches the agents, nothing is
//! acknowledged that is not on disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qlog_rpc::fields;
use qlog_rpc::query::{Record, RecordKind, RecordView};
use qlog_rpc::telemetry::{ValidSample, NO_PRIORITY};
use qlog_rpc::{Event, Gap, ResumePoint};
use rayon::prelude::*;
use tokio::sync::{mpsc, oneshot, watch};

use crate::health::{HealthBook, HealthSettings, Transition};
use crate::log_events;
use crate::rate_limit::{RateLimit, RateOverride};
use crate::rollup::RollupBook;
use crate::shared::{Shared, StreamKey};
use crate::store::{CommitSet, NewBatch, Store, StoreWriter, StreamState, VmState};

/// Most records one cycle takes before it commits, so one cycle's latency stays small
/// and a follower's broadcast slot stays bounded.
const MAX_CYCLE_RECORDS: usize = 32_768;
/// Most raw bytes one cycle takes before it commits.
const MAX_CYCLE_BYTES: usize = 8 * 1024 * 1024;
/// Once over quota, a VM is trimmed to this share of it, so trimming happens in
/// steps rather than on every commit.
const QUOTA_LOW_WATERMARK: f64 = 0.9;
/// The stream name of records qlogd writes itself.
pub const SINK_STREAM: &str = qlog_rpc::message::SINK_STREAM;

/// What connections send the committer.
pub enum Request {
    /// A connection finished its handshake; `reply` gets the durable resume point and
    /// `acks` is raised whenever more of the stream becomes durable.
    Register { key: StreamKey, acks: watch::Sender<u64>, reply: oneshot::Sender<ResumePoint> },
    /// Events and gaps from one connection, in the order received.
    Chunk(Chunk),
    /// A VM's connection sent something malformed.
    Rejected { vm: String },
    /// Time for age-based retention.
    RetentionTick,
    /// A connection from `vm` finished its handshake, promising heartbeats this often.
    Hello { vm: String, heartbeat_secs: Option<u32> },
    /// `vm` sent a heartbeat.
    Heartbeat { vm: String },
    /// `vm` sent a telemetry sample, already validated by its connection.
    Telemetry { vm: String, sample: ValidSample },
    /// Once a second: judge every VM's health, sample qlogd's own metrics.
    HealthTick,
}

/// Events and gaps from one connection. Event field blocks are kept as the bytes they
/// arrived in (validated, with sink-only names already renamed), back to back in `raw`,
/// so the hot path copies each event once and decodes nothing.
#[derive(Default)]
pub struct Chunk {
    pub key: StreamKey,
    pub raw: Vec<u8>,
    pub items: Vec<Item>,
    /// `__CURSOR` of the chunk's last event, if it had a usable one.
    pub last_cursor: Option<String>,
    /// Fields renamed from the sink-only prefix while decoding this chunk.
    pub quarantined: u64,
}

pub enum Item {
    /// An event whose field block is `raw[range]`.
    Event {
        seq: u64,
        range: std::ops::Range<usize>,
        /// The event's `PRIORITY`, if valid, for the rollups.
        priority: Option<u8>,
    },
    Gap {
        gap: Gap,
    },
    /// Items the VM's rate limit refused at ingest (see `rate_limit.rs`), coalesced: they
    /// are not stored, but their sequence numbers are accepted like stored ones, so the
    /// resume point and the acks move past them and the agent does not resend them.
    Refused {
        first_seq: u64,
        last_seq: u64,
        /// How many items were refused between the two; the sender numbers without
        /// holes, so normally `last_seq - first_seq + 1`.
        count: u64,
        /// When ingest refused the first and the last of them (µs since the epoch).
        first_usec: u64,
        last_usec: u64,
    },
}

/// One VM's records of the cycle, encoded back to back.
#[derive(Default)]
struct VmRecords {
    raw: Vec<u8>,
    count: usize,
    first_usec: u64,
    last_usec: u64,
}

impl VmRecords {
    fn push_header(&mut self, vm: &str, stream: &str, stamp: u64, seq: u64, kind: RecordKind) {
        if self.count == 0 {
            self.first_usec = stamp;
        }
        self.last_usec = stamp;
        self.count += 1;
        Record::encode_header(vm, stream, stamp, seq, kind, &mut self.raw);
    }

    fn push_record(&mut self, r: &Record) {
        self.push_header(&r.vm, &r.stream, r.received_usec, r.seq, r.kind);
        r.event.encode_fields(&mut self.raw);
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Bytes each VM may keep stored, unless overridden. By default, 1 GiB.
    pub vm_quota_bytes: u64,
    /// How long events are kept, unless overridden. By default, 30 days.
    pub retention: Duration,
    /// Per-VM quota and retention overrides.
    pub overrides: BTreeMap<String, VmLimits>,
    /// VMs that should be sending, listed by `qlog vms` even before they connect.
    pub expected_vms: Vec<String>,
    /// The log qube's own name: qlogd's health events and metrics are stored under it.
    pub sink_name: String,
    /// How long per-minute rollups are kept. By default, 400 days.
    pub rollup_retention: Duration,
    /// Thresholds for the health states (see `health.rs`).
    pub health: HealthSettings,
    /// False only to measure what telemetry costs: no rollups, no health ticks.
    pub telemetry: bool,
    /// How fast each VM may send, unless overridden (see `rate_limit.rs`). By default,
    /// [`RateLimit::default`].
    pub rate_limit: RateLimit,
}

#[derive(Debug, Clone, Default)]
pub struct VmLimits {
    pub quota_bytes: Option<u64>,
    pub retention: Option<Duration>,
    pub rate: RateOverride,
}

impl Settings {
    pub fn quota(&self, vm: &str) -> u64 {
        self.overrides.get(vm).and_then(|o| o.quota_bytes).unwrap_or(self.vm_quota_bytes)
    }

    pub fn retention(&self, vm: &str) -> Duration {
        self.overrides.get(vm).and_then(|o| o.retention).unwrap_or(self.retention)
    }

    pub fn rate_limit(&self, vm: &str) -> RateLimit {
        self.overrides.get(vm).map_or(self.rate_limit, |o| self.rate_limit.with(&o.rate))
    }

    /// Segment files are a sixteenth of the quota (between 64 KiB and 16 MiB): quotas
    /// are enforced by whole files, so this keeps a VM within about 6% of its quota.
    pub fn segment_bytes(&self) -> u64 {
        (self.vm_quota_bytes / 16).clamp(64 * 1024, 16 * 1024 * 1024)
    }
}

/// The committer's view of one stream.
struct StreamMem {
    durable: StreamState,
    /// Highest sequence number accepted into a cycle (durable or about to be).
    accepted_seq: u64,
    accepted_cursor: Option<String>,
    watchers: Vec<watch::Sender<u64>>,
}

pub struct Committer {
    store: StoreWriter,
    shared: Arc<Shared>,
    settings: Settings,
    streams: HashMap<StreamKey, StreamMem>,
    vms: HashMap<String, VmState>,
    next_batch_id: u64,
    /// Receive times never go backwards, so a VM's batches never overlap in time; it
    /// starts at the newest stored batch, so a clock stepped back across a restart does
    /// not break that either.
    last_stamp: u64,
    rollups: RollupBook,
    /// When the store last took a commit, and with it every change that was waiting.
    last_commit: std::time::Instant,
    /// VMs whose counters changed without anything to store (a rejected connection):
    /// queries see the new counts at once, and the store gets them with the next commit,
    /// as it gets telemetry-only rollup changes. A VM opening garbage connections as fast
    /// as it can would otherwise cost an fsync per connection, paid for by every other
    /// VM's acks and followers.
    unsaved_vms: BTreeSet<String>,
    health: HealthBook,
    own: OwnMetrics,
}

/// qlogd's own numbers between two samples, recorded under the sink's name.
struct OwnMetrics {
    last_sample: std::time::Instant,
    events: u64,
    commit_ms_max: f64,
    ticks: u64,
}

/// When [`Committer::commit`] also stores what waits for a later commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// Once it has waited [`ROLLUP_FLUSH_EVERY`], or with anything else to store.
    Due,
    /// Now: the committer's last commit, tried once.
    Last,
}

/// Longest that telemetry-only rollup changes (gauges, heartbeats) and rejection counts
/// wait for a commit of events before they are committed on their own; a crash loses at
/// most this much of them.
const ROLLUP_FLUSH_EVERY: Duration = Duration::from_secs(10);

/// qlogd samples its own metrics every this many health ticks (seconds).
const OWN_METRICS_EVERY: u64 = 10;

/// This cycle's work in progress.
#[derive(Default)]
struct Cycle {
    records: BTreeMap<String, VmRecords>,
    touched_streams: Vec<StreamKey>,
    touched_vms: Vec<String>,
    deletes: Vec<Vec<u8>>,
    aux_deletes: Vec<Vec<u8>>,
    count: usize,
    bytes: usize,
    /// Refusals by the rate limit this cycle, per stream: one gap record each.
    refused: BTreeMap<StreamKey, Refusals>,
}

/// One stream's rate-limit refusals within one cycle.
struct Refusals {
    first_seq: u64,
    last_seq: u64,
    count: u64,
    first_usec: u64,
    last_usec: u64,
}

impl Committer {
    pub fn new(store: Store, shared: Arc<Shared>, settings: Settings) -> anyhow::Result<Self> {
        let streams = store
            .load_streams()?
            .into_iter()
            .map(|(k, st)| {
                let mem = StreamMem {
                    accepted_seq: st.last_seq,
                    accepted_cursor: st.cursor.clone(),
                    durable: st,
                    watchers: Vec::new(),
                };
                (k, mem)
            })
            .collect();
        let vms = store.load_vms()?;
        let next_batch_id = store.next_batch_id()?;
        let last_stamp = vms
            .keys()
            .filter_map(|vm| store.scan(vm, None, None, true).next()?.ok().map(|b| b.last_usec))
            .max()
            .unwrap_or(0);
        let opened = std::time::Instant::now();
        let store = StoreWriter::open(store, settings.segment_bytes())?;
        log_events::store_opened(store.repair(), opened.elapsed());
        let mut health_settings = settings.health.clone();
        health_settings.expected = settings.expected_vms.clone();
        health_settings.sink_name = settings.sink_name.clone();
        let health = HealthBook::new(health_settings, now_usec());
        let rollups =
            if settings.telemetry { RollupBook::default() } else { RollupBook::disabled() };
        let own = OwnMetrics {
            last_sample: std::time::Instant::now(),
            events: 0,
            commit_ms_max: 0.0,
            ticks: 0,
        };
        Ok(Committer {
            store,
            shared,
            settings,
            streams,
            vms,
            next_batch_id,
            last_stamp,
            rollups,
            last_commit: std::time::Instant::now(),
            unsaved_vms: BTreeSet::new(),
            health,
            own,
        })
    }

    /// Runs until every sender is gone, committing what is queued before returning.
    pub fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut retention_due = true;
        while let Some(first) = rx.blocking_recv() {
            let mut cycle = Cycle::default();
            self.handle(first, &mut cycle, &mut retention_due);
            while cycle.count < MAX_CYCLE_RECORDS && cycle.bytes < MAX_CYCLE_BYTES {
                match rx.try_recv() {
                    Ok(req) => self.handle(req, &mut cycle, &mut retention_due),
                    Err(_) => break,
                }
            }
            if retention_due {
                retention_due = false;
                self.expire(&mut cycle);
            }
            self.record_refusals(&mut cycle);
            self.commit(cycle, Flush::Due);
        }
        // What waited for a later commit must not wait for one that never comes.
        self.commit(Cycle::default(), Flush::Last);
        tracing::debug!("committer finished: all ingest connections are gone");
    }

    fn handle(&mut self, req: Request, cycle: &mut Cycle, retention_due: &mut bool) {
        match req {
            Request::Register { key, acks, reply } => {
                let mem = self.streams.entry(key).or_insert_with(|| StreamMem {
                    durable: StreamState::default(),
                    accepted_seq: 0,
                    accepted_cursor: None,
                    watchers: Vec::new(),
                });
                mem.watchers.retain(|w| !w.is_closed());
                // Start the watermark at the resume point, so a connection that sends
                // nothing new still sees everything it owes the peer as acknowledged.
                acks.send_replace(mem.durable.last_seq);
                mem.watchers.push(acks);
                let resume = ResumePoint {
                    last_seq: mem.durable.last_seq,
                    cursor: mem.durable.cursor.clone(),
                };
                // The connection may have gone away meanwhile; nothing to do then.
                let _ = reply.send(resume);
            }
            Request::Chunk(chunk) => self.accept(chunk, cycle),
            Request::Rejected { vm } => {
                self.vm_state(&vm).frames_rejected += 1;
                self.unsaved_vms.insert(vm.clone());
                self.rollups.at(self.store.store(), &vm, now_usec()).rejected_frames += 1;
            }
            Request::RetentionTick => *retention_due = true,
            Request::Hello { vm, heartbeat_secs } => {
                self.health.hello(&vm, heartbeat_secs, now_usec());
            }
            Request::Heartbeat { vm } => {
                let now = now_usec();
                self.health.heard(&vm, now);
                self.rollups.at(self.store.store(), &vm, now).heartbeats += 1;
            }
            Request::Telemetry { vm, sample } => {
                let now = now_usec();
                self.health.heard(&vm, now);
                if let Some((_, lag)) = sample.values.iter().find(|(n, _)| *n == "agent_lag_secs") {
                    self.health.lag(&vm, *lag);
                }
                let rollup = self.rollups.at(self.store.store(), &vm, now);
                rollup.telemetry_rejected += sample.rejected;
                for (name, value) in &sample.values {
                    rollup.observe(name, *value);
                }
            }
            Request::HealthTick => self.health_tick(cycle),
        }
    }

    /// Judges every VM, stores the transitions as events in the sink's own stream, and
    /// every [`OWN_METRICS_EVERY`] ticks samples qlogd's own metrics.
    fn health_tick(&mut self, cycle: &mut Cycle) {
        let now = now_usec();
        let (health, transitions) = self.health.evaluate(now, &self.vms);
        self.shared.set_health(health);
        for t in transitions {
            let (priority, state, vm, message) = match t {
                Transition::Silent { vm, quiet_secs, interval_secs } => {
                    log_events::vm_silent(&vm, quiet_secs, interval_secs);
                    let message = format!(
                        "{vm} went silent: nothing heard for {}, and its agent promised a heartbeat every {interval_secs} s",
                        crate::health::human_secs(quiet_secs)
                    );
                    ("3", "silent", vm, message)
                }
                Transition::Back { vm, quiet_secs } => {
                    log_events::vm_back(&vm, quiet_secs);
                    let message = format!(
                        "{vm} is talking again after {} of silence",
                        crate::health::human_secs(quiet_secs)
                    );
                    ("5", "ok", vm, message)
                }
                Transition::NeverSeen { vm } => {
                    log_events::vm_never_seen(&vm);
                    let message = format!(
                        "{vm} is expected to send logs but has never connected: check its qlog-agent service and the qrexec policy"
                    );
                    ("3", "never-seen", vm, message)
                }
            };
            let mut event = Event::new();
            event.push(fields::MESSAGE, message);
            event.push(fields::PRIORITY, priority);
            event.push(fields::SYSLOG_IDENTIFIER, "qlogd");
            event.push(fields::QLOG_HEALTH, state);
            event.push(fields::QLOG_HEALTH_VM, vm);
            self.push_own(cycle, event);
        }
        self.own.ticks += 1;
        if self.own.ticks.is_multiple_of(OWN_METRICS_EVERY) {
            self.sample_own(now);
        }
    }

    /// Adds a record qlogd writes about itself, under the sink's own name.
    fn push_own(&mut self, cycle: &mut Cycle, event: Event) {
        let stamp = self.stamp();
        let name = self.settings.sink_name.clone();
        let priority = event.get(fields::PRIORITY).and_then(qlog_rpc::event::priority_digit);
        let rollup = self.rollups.at(self.store.store(), &name, stamp);
        let p = priority.map_or(NO_PRIORITY, usize::from);
        rollup.events[p] += 1;
        rollup.bytes[p] += event.payload_len() as u64;
        self.health.count(&name, stamp, 1, 0, 0);
        let record = sink_record(&name, SINK_STREAM, stamp, 0, RecordKind::Event, event);
        cycle.bytes += record.event.payload_len() + 64;
        cycle.records.entry(name.clone()).or_default().push_record(&record);
        cycle.count += 1;
        cycle.touch_vm(&name);
        let st = self.vm_state(&name);
        if st.first_seen_usec == 0 {
            st.first_seen_usec = stamp;
        }
        st.last_seen_usec = stamp;
    }

    fn sample_own(&mut self, now: u64) {
        let elapsed = self.own.last_sample.elapsed().as_secs_f64().max(1e-3);
        let rate = self.own.events as f64 / elapsed;
        let (connections, followers, lagging) = self.shared.own_counts();
        let values = [
            ("sink_ingest_events_per_sec", rate),
            ("sink_commit_latency_ms", self.own.commit_ms_max),
            ("sink_store_bytes", self.store.store().size_on_disk() as f64),
            ("sink_connections", connections as f64),
            ("sink_followers", followers as f64),
            ("sink_lagging_followers", lagging as f64),
        ];
        let name = self.settings.sink_name.clone();
        let rollup = self.rollups.at(self.store.store(), &name, now);
        for (metric, v) in values {
            rollup.observe(metric, v);
        }
        self.own = OwnMetrics {
            last_sample: std::time::Instant::now(),
            events: 0,
            commit_ms_max: 0.0,
            ticks: self.own.ticks,
        };
    }

    fn vm_state(&mut self, vm: &str) -> &mut VmState {
        self.vms.entry(vm.to_owned()).or_default()
    }

    fn stamp(&mut self) -> u64 {
        let now = now_usec();
        self.last_stamp = self.last_stamp.max(now);
        self.last_stamp
    }

    fn accept(&mut self, chunk: Chunk, cycle: &mut Cycle) {
        let stamp = self.stamp();
        let (vm, stream) = chunk.key.clone();
        cycle.touch_stream(&chunk.key);
        cycle.touch_vm(&vm);
        let vm_state = self.vm_state(&vm);
        vm_state.fields_quarantined += chunk.quarantined;
        if vm_state.first_seen_usec == 0 {
            vm_state.first_seen_usec = stamp;
        }
        vm_state.last_seen_usec = stamp;
        self.health.heard(&vm, stamp);
        let rollup = self.rollups.at(self.store.store(), &vm, stamp);
        let (mut events, mut gaps) = (0u64, 0u64);

        let mem = self.streams.get_mut(&chunk.key).expect("connections register before sending");
        if mem.durable.first_seen_usec == 0 {
            mem.durable.first_seen_usec = stamp;
        }
        mem.durable.last_seen_usec = stamp;
        let out = cycle.records.entry(vm.clone()).or_default();
        let mut last_event_accepted = None;
        let mut refused = 0u64;
        for item in chunk.items {
            // `first` is where the item starts: a refused run spans several numbers.
            let (first, seq) = match &item {
                Item::Event { seq, .. } => (*seq, *seq),
                Item::Gap { gap } => (gap.seq, gap.seq),
                Item::Refused { first_seq, last_seq, .. } => (*first_seq, *last_seq),
            };
            // A replay after reconnect: already stored (or about to be), so dropping it
            // is what makes delivery exactly-once.
            if seq <= mem.accepted_seq {
                if matches!(item, Item::Event { .. } | Item::Refused { .. }) {
                    last_event_accepted = Some(false);
                }
                continue;
            }
            // The agent numbers without holes, so a jump means events were lost before
            // they reached us; record it rather than let the loss pass silently.
            if first > mem.accepted_seq + 1 {
                let (from, to) = (mem.accepted_seq, first);
                let missing = to - from - 1;
                let message = format!(
                    "{missing} events of stream {stream} never arrived (sequence jumped from {from} to {to})"
                );
                let event = gap_event("seq", Some(missing), message);
                gaps += 1;
                out.push_record(&sink_record(
                    &vm,
                    &stream,
                    stamp,
                    from + 1,
                    RecordKind::Gap,
                    event,
                ));
            }
            let previous = mem.accepted_seq;
            mem.accepted_seq = seq;
            match item {
                Item::Event { seq, range, priority } => {
                    let p = priority.map_or(NO_PRIORITY, usize::from);
                    rollup.events[p] += 1;
                    rollup.bytes[p] += payload_len(&chunk.raw[range.clone()]);
                    events += 1;
                    out.push_header(&vm, &stream, stamp, seq, RecordKind::Event);
                    out.raw.extend_from_slice(&chunk.raw[range.clone()]);
                    cycle.bytes += range.len() + 64;
                    last_event_accepted = Some(true);
                }
                Item::Gap { gap } => {
                    gaps += 1;
                    let event = agent_gap_event(&gap);
                    cycle.bytes += event.payload_len() + 64;
                    out.push_record(&sink_record(&vm, &stream, stamp, seq, RecordKind::Gap, event));
                }
                Item::Refused { first_seq, last_seq, count, first_usec, last_usec } => {
                    // Only what lies above the previous watermark is new; a run that a
                    // racing connection partly covered counts only that part.
                    let count =
                        if first_seq > previous { count } else { count.min(last_seq - previous) };
                    let first_seq = first_seq.max(previous + 1);
                    refused += count;
                    // The resume cursor moves too, or an agent reading the journal would
                    // resume before the refused events and send them again.
                    last_event_accepted = Some(true);
                    cycle
                        .refused
                        .entry(chunk.key.clone())
                        .and_modify(|r| {
                            r.last_seq = last_seq;
                            r.count += count;
                            r.last_usec = r.last_usec.max(last_usec);
                        })
                        .or_insert(Refusals { first_seq, last_seq, count, first_usec, last_usec });
                    // The gap record is written once per stream when the cycle ends.
                    continue;
                }
            }
            cycle.count += 1;
        }
        if last_event_accepted == Some(true) {
            mem.accepted_cursor = chunk.last_cursor;
        }
        rollup.gaps += gaps;
        rollup.rate_refused += refused;
        if refused > 0 {
            self.vms.entry(vm.clone()).or_default().events_refused_rate += refused;
        }
        self.health.count(&vm, stamp, events, gaps, refused);
        self.own.events += events;
    }

    /// Writes one `rate` gap record per stream that had items refused this cycle, in
    /// the same commit that moves its resume point past them: a crash can lose neither
    /// without the other. Coalescing per cycle keeps a flood to a few records per second
    /// however many items it sends; the record takes the first refused sequence number.
    fn record_refusals(&mut self, cycle: &mut Cycle) {
        if cycle.refused.is_empty() {
            return;
        }
        let stamp = self.stamp();
        for ((vm, stream), r) in std::mem::take(&mut cycle.refused) {
            if r.count == 0 {
                continue;
            }
            let limit = self.settings.rate_limit(&vm);
            log_events::rate_limited(&vm, r.count, &limit.describe());
            let message = format!(
                "{} events of stream {stream} were refused between {} and {} (sequence {} to {}): {vm} sent faster than its rate limit of {}",
                r.count,
                format_usec(r.first_usec),
                format_usec(r.last_usec),
                r.first_seq,
                r.last_seq,
                limit.describe()
            );
            let record = sink_record(
                &vm,
                &stream,
                stamp,
                r.first_seq,
                RecordKind::Gap,
                gap_event("rate", Some(r.count), message),
            );
            cycle.bytes += record.event.payload_len() + 64;
            cycle.count += 1;
            cycle.records.entry(vm.clone()).or_default().push_record(&record);
            cycle.touch_vm(&vm);
        }
    }

    /// Removes batches older than the retention period, for every VM.
    fn expire(&mut self, cycle: &mut Cycle) {
        let vms: Vec<String> = self.vms.keys().cloned().collect();
        for vm in vms {
            let retention = self.settings.retention(&vm).as_micros() as u64;
            let Some(cutoff) = now_usec().checked_sub(retention) else { continue };
            let mut expired = 0u64;
            let mut freed = 0u64;
            for info in self.store.store().batches(&vm) {
                let Ok(info) = info else { break };
                if info.last_usec >= cutoff {
                    break;
                }
                expired += u64::from(info.count);
                freed += info.stored_len();
                cycle.deletes.push(info.key);
            }
            if expired > 0 {
                let st = self.vm_state(&vm);
                st.events_stored = st.events_stored.saturating_sub(expired);
                st.bytes_stored = st.bytes_stored.saturating_sub(freed);
                st.events_expired += expired;
                cycle.touch_vm(&vm);
                log_events::retention_expired(&vm, expired);
            }
            if let Some(cutoff) =
                now_usec().checked_sub(self.settings.rollup_retention.as_micros() as u64)
            {
                cycle.aux_deletes.extend(RollupBook::expired(self.store.store(), &vm, cutoff));
            }
        }
    }

    /// Trims `vm` to below its quota by removing its own oldest batches, and records what
    /// was removed as a gap in the VM's own record stream.
    fn enforce_quota(&mut self, vm: &str, incoming: u64, cycle: &mut Cycle) -> Option<Record> {
        let quota = self.settings.quota(vm);
        let state = self.vms.get(vm)?;
        if state.bytes_stored + incoming <= quota {
            return None;
        }
        let target = (quota as f64 * QUOTA_LOW_WATERMARK) as u64;
        let mut bytes = state.bytes_stored + incoming;
        let (mut dropped, mut first, mut last) = (0u64, u64::MAX, 0u64);
        for info in self.store.store().batches(vm) {
            if bytes <= target {
                break;
            }
            let Ok(info) = info else { break };
            if cycle.deletes.contains(&info.key) {
                continue;
            }
            bytes = bytes.saturating_sub(info.stored_len());
            dropped += u64::from(info.count);
            first = first.min(info.first_usec);
            last = last.max(info.last_usec);
            cycle.deletes.push(info.key);
        }
        if dropped == 0 {
            return None;
        }
        let st = self.vm_state(vm);
        st.events_stored = st.events_stored.saturating_sub(dropped);
        st.bytes_stored = bytes.saturating_sub(incoming);
        st.events_dropped_quota += dropped;
        log_events::quota_trimmed(vm, dropped, quota);
        let stamp = self.stamp();
        let rollup = self.rollups.at(self.store.store(), vm, stamp);
        rollup.quota_dropped += dropped;
        rollup.gaps += 1;
        self.health.count(vm, stamp, 0, 1, 0);
        let message = format!(
            "{dropped} oldest events of {vm} (received {} to {}) were removed: the VM is over its quota of {quota} bytes",
            format_usec(first),
            format_usec(last)
        );
        Some(sink_record(
            vm,
            SINK_STREAM,
            stamp,
            0,
            RecordKind::Gap,
            gap_event("quota", Some(dropped), message),
        ))
    }

    /// Stores the cycle, and with it what waited for a later commit (see
    /// [`Committer::unsaved_vms`]) when there is anything else to store, when it has
    /// waited long enough, or at the last commit.
    fn commit(&mut self, mut cycle: Cycle, flush: Flush) {
        // Encode one batch per VM, trimming VMs over quota first so the new batch fits.
        let mut set = CommitSet::default();
        let mut published = Vec::new();
        let vms: Vec<String> = cycle.records.keys().cloned().collect();
        // Each VM's batches, numbered here in VM order, then encoded (compressed) on all
        // cores at once: encoding is most of a commit's work and needs nothing else.
        let mut pending = Vec::new();
        for vm in vms {
            let mut records = cycle.records.remove(&vm).unwrap_or_default();
            if records.count == 0 {
                continue;
            }
            // Compression shrinks log batches several-fold; a quarter is a cautious guess
            // of what this batch will add. FIXME: journal batches compress about 11x, so
            // with a quota near one cycle's size a trim removes more than needed; compress
            // first and trim by the real size if small quotas matter in practice.
            let estimate = records.raw.len() as u64 / 4;
            if let Some(gap) = self.enforce_quota(&vm, estimate, &mut cycle) {
                records.push_record(&gap);
            }
            let parts: Vec<(u64, BatchPart)> = batch_parts(&records.raw, MAX_BATCH_RAW_BYTES)
                .into_iter()
                .map(|part| {
                    self.next_batch_id += 1;
                    (self.next_batch_id - 1, part)
                })
                .collect();
            pending.push((vm, records, parts));
        }
        let jobs: Vec<_> = pending
            .iter()
            .flat_map(|(vm, records, parts)| parts.iter().map(move |part| (vm, records, part)))
            .collect();
        let encode = |&(vm, records, (id, part)): &(&String, &VmRecords, &(u64, BatchPart))| {
            let raw = &records.raw[part.bytes.clone()];
            Store::encode_raw_batch(vm, *id, part.count, part.first_usec, part.last_usec, raw)
        };
        let mut encoded = jobs.par_iter().map(encode).collect::<Vec<NewBatch>>().into_iter();
        drop(jobs);
        for (vm, records, parts) in pending {
            for batch in encoded.by_ref().take(parts.len()) {
                self.vm_state(&vm).bytes_stored += batch.value.len() as u64;
                set.batches.push(batch);
            }
            self.vm_state(&vm).events_stored += records.count as u64;
            published.push(records);
        }
        let only_rollups = set.batches.is_empty()
            && cycle.deletes.is_empty()
            && cycle.touched_vms.is_empty()
            && cycle.aux_deletes.is_empty();
        // Heartbeats and samples alone change only rollups, and rejections only counters;
        // they ride along with the next commit of events, or go on their own at most
        // every ROLLUP_FLUSH_EVERY, so neither adds an fsync per sample or connection.
        // Event counts are never held back: they are in the cycle that stores the events.
        let dirty = self.rollups.has_dirty() || !self.unsaved_vms.is_empty();
        if only_rollups
            && (!dirty || (flush == Flush::Due && self.last_commit.elapsed() < ROLLUP_FLUSH_EVERY))
        {
            let unsaved: Vec<_> = self
                .unsaved_vms
                .iter()
                .map(|vm| (vm.clone(), self.vms.get(vm).cloned().unwrap_or_default()))
                .collect();
            self.shared.publish(
                unsaved,
                Vec::new(),
                self.next_batch_id.saturating_sub(1),
                0,
                Vec::new,
            );
            self.notify(&cycle.touched_streams);
            return;
        }
        for vm in std::mem::take(&mut self.unsaved_vms) {
            cycle.touch_vm(&vm);
        }
        set.aux = self.rollups.take_dirty();
        set.aux_deletes = std::mem::take(&mut cycle.aux_deletes);
        self.last_commit = std::time::Instant::now();

        for key in &cycle.touched_streams {
            let mem = self.streams.get(key).expect("touched streams are registered");
            let mut st = mem.durable.clone();
            st.last_seq = mem.accepted_seq;
            st.cursor = mem.accepted_cursor.clone();
            set.streams.push((key.clone(), st));
        }
        for vm in &cycle.touched_vms {
            set.vms.push((vm.clone(), self.vms.get(vm).cloned().unwrap_or_default()));
        }
        set.deletes = std::mem::take(&mut cycle.deletes);
        set.next_batch_id = self.next_batch_id;

        // Retry until the store takes it: acking anything not on disk would be a lie,
        // and taking new chunks meanwhile would only grow memory.
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u32;
        while let Err(error) = self.store.commit(&set) {
            failures += 1;
            // The last commit holds counters only, nothing a peer waits to see acked:
            // on a full disk it must not keep qlogd from exiting.
            if flush == Flush::Last {
                log_events::commit_failed(&error, failures);
                return;
            }
            if error.needs_reopen() {
                // sled fails every call after a failed write until it is reopened, and
                // queries hold it open; exiting unacked lets systemd restart us on a
                // fresh handle, and the agents resend.
                log_events::index_failed(&error);
                std::process::exit(1);
            }
            log_events::commit_failed(&error, failures);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        if failures > 0 {
            log_events::commit_recovered(failures);
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.own.commit_ms_max = self.own.commit_ms_max.max(ms);
        self.rollups.evict(now_usec());

        for (key, st) in &set.streams {
            if let Some(mem) = self.streams.get_mut(key) {
                mem.durable = st.clone();
            }
        }
        let count = published.iter().map(|r| r.count as u64).sum();
        let shared = Arc::clone(&self.shared);
        shared.publish(set.vms, set.streams, self.next_batch_id - 1, count, || {
            let mut raw = Vec::with_capacity(published.iter().map(|r| r.raw.len()).sum());
            for r in &published {
                raw.extend_from_slice(&r.raw);
            }
            raw
        });
        self.notify(&cycle.touched_streams);
    }

    /// Raises the ack watermark of every connection on these streams.
    fn notify(&mut self, keys: &[StreamKey]) {
        for key in keys {
            if let Some(mem) = self.streams.get_mut(key) {
                let durable = mem.durable.last_seq;
                mem.watchers.retain(|w| w.send(durable).is_ok());
            }
        }
    }
}

impl Cycle {
    fn touch_stream(&mut self, key: &StreamKey) {
        if !self.touched_streams.contains(key) {
            self.touched_streams.push(key.clone());
        }
    }

    fn touch_vm(&mut self, vm: &str) {
        if !self.touched_vms.iter().any(|v| v == vm) {
            self.touched_vms.push(vm.to_owned());
        }
    }
}

/// A gap record's fields. `_QLOG_GAP` holds only values the sink chose.
fn gap_event(reason: &str, missed: Option<u64>, message: String) -> Event {
    let mut e = Event::new();
    e.push(fields::MESSAGE, message);
    e.push(fields::PRIORITY, "4");
    e.push(fields::QLOG_GAP, reason);
    if let Some(n) = missed {
        e.push(fields::QLOG_GAP_COUNT, n.to_string());
    }
    e
}

/// Turns an agent's gap report into a record. The agent's reason and detail are its
/// claims, so they go into ordinary fields; `_QLOG_GAP` only says the agent reported it.
fn agent_gap_event(gap: &Gap) -> Event {
    let detail: String = gap.detail.chars().take(1024).collect();
    let reason: String = gap.reason.chars().take(64).collect();
    let mut e = gap_event(
        "agent",
        gap.missed,
        format!("the agent reported missing events ({reason}): {detail}"),
    );
    e.push("GAP_REASON", reason);
    e
}

fn sink_record(
    vm: &str,
    stream: &str,
    stamp: u64,
    seq: u64,
    kind: RecordKind,
    event: Event,
) -> Record {
    Record { vm: vm.to_owned(), stream: stream.to_owned(), received_usec: stamp, seq, kind, event }
}

/// [`Event::payload_len`] of an encoded field block, without decoding it: the block is a
/// `u32` field count, then per field a 1-byte name length and a 4-byte value length
/// around the name and value.
fn payload_len(block: &[u8]) -> u64 {
    let count = block.get(..4).map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    (block.len() as u64).saturating_sub(4 + 5 * u64::from(count))
}

pub fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn format_usec(usec: u64) -> String {
    chrono::DateTime::from_timestamp_micros(usec as i64)
        .map_or_else(|| usec.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string())
}

/// Uncompressed bytes a stored batch holds at most (one larger record is a batch of its
/// own). A batch's head keeps dictionaries of at most 254 values a key, and its first
/// records are the compression dictionary of the rest ([`crate::batch`]): both describe
/// a megabyte of one VM's records well, a whole commit cycle's worth less so. Smaller
/// batches also give `--since` finer time ranges to start from.
const MAX_BATCH_RAW_BYTES: usize = 1 << 20;

/// One stored batch's share of a VM's records in a commit.
struct BatchPart {
    count: usize,
    first_usec: u64,
    last_usec: u64,
    bytes: std::ops::Range<usize>,
}

/// Cuts a VM's encoded records, in order, into batches of at most `max` bytes each.
fn batch_parts(raw: &[u8], max: usize) -> Vec<BatchPart> {
    let mut parts: Vec<BatchPart> = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        let view = RecordView::parse(&raw[pos..]).expect("the committer encoded these records");
        let (len, usec) = (view.bytes.len(), view.received_usec);
        match parts.last_mut() {
            Some(part) if part.bytes.len() + len <= max => {
                part.count += 1;
                part.first_usec = part.first_usec.min(usec);
                part.last_usec = part.last_usec.max(usec);
                part.bytes.end += len;
            }
            _ => parts.push(BatchPart {
                count: 1,
                first_usec: usec,
                last_usec: usec,
                bytes: pos..pos + len,
            }),
        }
        pos += len;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_parts_cut_at_record_boundaries_within_the_size() {
        let mut raw = Vec::new();
        let mut lens = Vec::new();
        for (i, size) in [10usize, 300, 40, 5000, 20].into_iter().enumerate() {
            let mut event = Event::new();
            event.push("MESSAGE", "x".repeat(size));
            let start = raw.len();
            let kind = RecordKind::Event;
            let (vm, stream) = ("a".to_owned(), "s".to_owned());
            Record { vm, stream, received_usec: 100 + i as u64, seq: i as u64, kind, event }
                .encode(&mut raw);
            lens.push(raw.len() - start);
        }
        let parts = batch_parts(&raw, lens[0] + lens[1] + lens[2]);
        let shape: Vec<(usize, u64, u64)> =
            parts.iter().map(|p| (p.count, p.first_usec, p.last_usec)).collect();
        // The first three fit together; the big one is alone; the last starts anew.
        assert_eq!(shape, vec![(3, 100, 102), (1, 103, 103), (1, 104, 104)]);
        assert_eq!(parts.last().unwrap().bytes.end, raw.len());
        assert!(parts.windows(2).all(|w| w[0].bytes.end == w[1].bytes.start));
        assert!(batch_parts(&[], 10).is_empty());
    }
}
