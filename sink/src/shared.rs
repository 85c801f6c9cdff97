//! State the committer publishes and the query plane reads.
//!
//! The committer thread owns the authoritative accounting; after each commit it copies
//! what changed into [`Shared`] so that queries never wait on ingest. Ingest connections
//! only touch the live-connection counts, through [`ConnectionGuard`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qlog_rpc::query::{Health, StreamInfo, VmInfo};
use tokio::sync::broadcast;

use crate::store::{StreamState, VmState};

/// (VM, stream): the unit of sequence numbers and resume points.
pub type StreamKey = (String, String);

/// One commit cycle as followers see it.
#[derive(Debug)]
pub struct Committed {
    /// Highest batch id written in this cycle. A follower that read the store up to batch
    /// id W skips cycles with `last_batch_id <= W`.
    pub last_batch_id: u64,
    /// Events committed before this cycle, over all VMs: lets a lagging follower count
    /// what it missed.
    pub events_before: u64,
    /// How many records the cycle committed.
    pub count: u64,
    /// The cycle's records, encoded back to back (read with
    /// [`qlog_rpc::query::RecordView::parse_all`]).
    pub raw: Vec<u8>,
}

pub struct Shared {
    vms: Mutex<BTreeMap<String, VmState>>,
    streams: Mutex<BTreeMap<StreamKey, StreamState>>,
    connections: Mutex<HashMap<StreamKey, usize>>,
    /// Highest batch id that is durable. Written only by the committer, after the flush
    /// and before the broadcast, which is what makes follow-after-history gap-free.
    committed_batch_id: AtomicU64,
    events_committed: AtomicU64,
    /// Live feed of commit cycles. Sending never blocks; slow followers lag instead.
    live: broadcast::Sender<Arc<Committed>>,
    settings: crate::committer::Settings,
    /// The committer's latest judgement of every VM.
    health: Mutex<BTreeMap<String, Health>>,
    /// Times a follower was told it lagged, since the last own-metrics sample.
    followers_lagged: AtomicU64,
}

impl Shared {
    pub fn new(
        vms: BTreeMap<String, VmState>,
        streams: BTreeMap<StreamKey, StreamState>,
        committed_batch_id: u64,
        settings: crate::committer::Settings,
    ) -> Arc<Shared> {
        let events = vms.values().map(|v| v.events_stored).sum();
        // 256 cycles of slack: a follower can stall for that many commits (typically
        // several seconds of heavy ingest) before it is told it lagged.
        let (live, _) = broadcast::channel(256);
        Arc::new(Shared {
            vms: Mutex::new(vms),
            streams: Mutex::new(streams),
            connections: Mutex::new(HashMap::new()),
            committed_batch_id: AtomicU64::new(committed_batch_id),
            events_committed: AtomicU64::new(events),
            live,
            settings,
            health: Mutex::new(BTreeMap::new()),
            followers_lagged: AtomicU64::new(0),
        })
    }

    /// qlogd's settings; ingest reads each VM's rate limit here.
    pub fn settings(&self) -> &crate::committer::Settings {
        &self.settings
    }

    pub fn committed_batch_id(&self) -> u64 {
        self.committed_batch_id.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.live.subscribe()
    }

    /// Called by the committer once a cycle is durable. `raw` builds the cycle's
    /// encoded records and is called only if a follower is listening.
    pub fn publish(
        &self,
        vms: impl IntoIterator<Item = (String, VmState)>,
        streams: impl IntoIterator<Item = (StreamKey, StreamState)>,
        last_batch_id: u64,
        count: u64,
        raw: impl FnOnce() -> Vec<u8>,
    ) {
        self.vms.lock().expect("vm table lock is never poisoned").extend(vms);
        self.streams.lock().expect("stream table lock is never poisoned").extend(streams);
        if count == 0 {
            return;
        }
        let events_before = self.events_committed.fetch_add(count, Ordering::SeqCst);
        self.committed_batch_id.store(last_batch_id, Ordering::SeqCst);
        // Checked after the watermark moved: a follower that subscribed before it moved
        // is counted here, and one that subscribed after reads the new watermark and
        // finds this cycle in the store. Either way it sees the cycle exactly once.
        if self.live.receiver_count() > 0 {
            let raw = raw();
            let _ =
                self.live.send(Arc::new(Committed { last_batch_id, events_before, count, raw }));
        }
    }

    /// The log qube's own name, under which qlogd records itself.
    pub fn sink_name(&self) -> &str {
        &self.settings.sink_name
    }

    pub fn set_health(&self, health: BTreeMap<String, Health>) {
        *self.health.lock().expect("health table lock is never poisoned") = health;
    }

    /// A follower was skipped ahead because it fell behind.
    pub fn follower_lagged(&self) {
        self.followers_lagged.fetch_add(1, Ordering::Relaxed);
    }

    /// (open ingest connections, live followers, lag notices since the last call), for
    /// qlogd's own metrics.
    pub fn own_counts(&self) -> (usize, usize, u64) {
        let conns: usize = self
            .connections
            .lock()
            .expect("connection table lock is never poisoned")
            .values()
            .sum();
        (conns, self.live.receiver_count(), self.followers_lagged.swap(0, Ordering::Relaxed))
    }

    pub fn events_committed(&self) -> u64 {
        self.events_committed.load(Ordering::Acquire)
    }

    /// Every VM seen, and every expected VM, sorted.
    pub fn known_vms(&self) -> Vec<String> {
        let mut vms: Vec<String> =
            self.vms.lock().expect("vm table lock is never poisoned").keys().cloned().collect();
        vms.extend(self.settings.expected_vms.iter().cloned());
        // A VM that connected but has not stored an event yet is known too.
        vms.extend(
            self.health.lock().expect("health table lock is never poisoned").keys().cloned(),
        );
        vms.sort();
        vms.dedup();
        vms
    }

    /// One row per VM for `qlog vms`: every VM seen, and every expected VM.
    pub fn vm_infos(&self) -> Vec<VmInfo> {
        let mut vms = self.vms.lock().expect("vm table lock is never poisoned").clone();
        let health = self.health.lock().expect("health table lock is never poisoned").clone();
        for vm in self.settings.expected_vms.iter().chain(health.keys()) {
            vms.entry(vm.clone()).or_default();
        }
        let streams = self.streams.lock().expect("stream table lock is never poisoned").clone();
        let conns = self.connections.lock().expect("connection table lock is never poisoned");
        vms.into_iter()
            .map(|(vm, s)| {
                let quota_bytes = self.settings.quota(&vm);
                let expected = self.settings.expected_vms.contains(&vm);
                let streams: Vec<StreamInfo> = streams
                    .iter()
                    .filter(|((v, _), _)| *v == vm)
                    .map(|((v, name), st)| StreamInfo {
                        name: name.clone(),
                        last_seq: st.last_seq,
                        connected: conns.get(&(v.clone(), name.clone())).is_some_and(|n| *n > 0),
                    })
                    .collect();
                VmInfo {
                    health: health.get(&vm).cloned().unwrap_or_default(),
                    connected: streams.iter().any(|s| s.connected),
                    vm,
                    first_seen_usec: s.first_seen_usec,
                    last_seen_usec: s.last_seen_usec,
                    events_stored: s.events_stored,
                    bytes_stored: s.bytes_stored,
                    quota_bytes,
                    expected,
                    events_dropped_quota: s.events_dropped_quota,
                    events_expired: s.events_expired,
                    frames_rejected: s.frames_rejected,
                    fields_quarantined: s.fields_quarantined,
                    events_refused_rate: s.events_refused_rate,
                    streams,
                }
            })
            .collect()
    }

    /// Counts a live ingest connection for `key` until the guard drops.
    pub fn connection(self: &Arc<Self>, key: StreamKey) -> ConnectionGuard {
        *self
            .connections
            .lock()
            .expect("connection table lock is never poisoned")
            .entry(key.clone())
            .or_default() += 1;
        ConnectionGuard { shared: Arc::clone(self), key }
    }
}

/// Marks a stream as connected; dropping it marks the connection gone.
pub struct ConnectionGuard {
    shared: Arc<Shared>,
    key: StreamKey,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut conns =
            self.shared.connections.lock().expect("connection table lock is never poisoned");
        if let Some(n) = conns.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}
