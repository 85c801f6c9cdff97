//! Per-VM token buckets: how fast one source VM may hand events to the committer.
//!
//! Owns the bucket arithmetic and the table of buckets, one per VM across all of that
//! VM's connections and streams; `ingest.rs` asks a bucket before it queues an item, and
//! `committer.rs` records what was refused. A VM that sends faster than its rate, beyond
//! its burst, has the excess *refused*, as journald's own rate limiter drops a chatty
//! service's messages (10,000 per 30 s per service by default there): the items are not
//! stored, their sequence numbers are acknowledged like stored ones so the agent does not
//! resend them forever, and the committer writes one gap record per stream and commit
//! cycle saying how many were refused and when. Checking before the bounded queue to the
//! committer is what keeps a flooding VM from filling that queue: what it may queue is
//! its rate, not its link speed.
//!
//! Two buckets are kept per VM, events and payload bytes, and an item passes only if both
//! have room: the event rate alone would let a VM send its quota of events at the largest
//! frame size. A full bytes bucket always admits one item, however large, and goes into
//! debt, so no burst setting can make a valid frame impossible to send.
//!
//! Buckets start full, and live as long as qlogd: the table has one entry per VM qrexec
//! has named, and forgetting a VM's bucket when its last connection closes would let it
//! refill its burst by reconnecting.
//!
//! Fairness of the queue to the committer follows from this and from how ingest hands
//! over chunks: each connection has at most one chunk waiting, tokio's bounded channel
//! gives slots in the order senders asked for them, and a refused run costs a few bytes
//! in a chunk, so a flooding VM holds at most `max_connections_per_vm` of the queue and
//! fills the committer's cycles only with what its bucket admits.
//!
//! Refusing still costs qlogd the read and parse of every refused item, and a VM that
//! writes as fast as its link allows would make that a whole core taken from the others.
//! So a VM that is being refused is also read more slowly: each bucket keeps a pacing
//! clock, advanced by the payload bytes refused at [`REFUSED_READ_BYTES_PER_SEC`], and
//! none of the VM's connections reads again before it. The cost moves to the flooder,
//! whose writes block as qrexec relays the backpressure, and the agent's journal
//! position still moves, at tens of thousands of refused entries a second.
//!
//! Rejected connections are a cost of their own: a VM can open connection after
//! connection that fails its handshake or sends a bad frame, each an accept, a parse
//! and a reply for qlogd. [`Rejections`] gives each VM a small budget of rejections;
//! beyond it, the reply to a rejected connection waits [`REJECTION_PENALTY`], which a
//! sender that waits for its answer, as qrexec's client does, feels as a rate limit.
//!
//! FIXME(catch-up): an honest agent that replays a backlog larger than the burst after
//! a long outage of the log qube loses the excess, because refusing cannot tell a
//! backlog from a flood. Announcing the bucket in the Welcome, so that the agent paces
//! its catch-up to it, would keep the backlog; worth a protocol change once outages of
//! hours are common in practice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sustained events per second a VM may send, unless configured. Journald's default
/// allows 333 per second per service; a VM runs many services, but rarely sustains more
/// than a few hundred events per second over all of them.
pub const DEFAULT_EVENTS_PER_SEC: u64 = 1_000;
/// Events a VM may send at once above its rate: five minutes at the default rate. This
/// is what lets an agent catch up after the log qube was away without losing its
/// backlog, and what a boot or a crash loop produces in one go.
pub const DEFAULT_BURST_EVENTS: u64 = 300_000;
/// Sustained payload bytes per second a VM may send: 4 KiB per event at the default
/// event rate, several times what a journald entry weighs.
pub const DEFAULT_BYTES_PER_SEC: u64 = 4 << 20;
/// Payload bytes a VM may send at once above its rate.
pub const DEFAULT_BURST_BYTES: u64 = 256 << 20;

/// How fast a VM's connections are read, together, while its items are refused: payload
/// bytes of refused items per second.
pub const REFUSED_READ_BYTES_PER_SEC: u64 = 8 << 20;

/// Rejected connections a VM may have at once before their replies are delayed.
pub const REJECTION_BURST: f64 = 10.0;
/// How fast that budget refills, in rejections per second.
pub const REJECTIONS_PER_SEC: f64 = 1.0;
/// How long the reply to a rejected connection waits once the VM's budget is spent.
/// Well below the handshake timeout, so a delayed connection holds its handshake place
/// no longer than a silent peer may.
pub const REJECTION_PENALTY: Duration = Duration::from_millis(250);
/// Most VMs [`Rejections`] remembers; past it, VMs whose budget is full are forgotten,
/// which costs them nothing. Names come from qrexec's descriptor, but a local user with
/// access to the socket can forge any number of them.
const MAX_REJECTING_VMS: usize = 4096;

/// One VM's limits. A rate of 0 turns that dimension's limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub events_per_sec: u64,
    pub burst_events: u64,
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            events_per_sec: DEFAULT_EVENTS_PER_SEC,
            burst_events: DEFAULT_BURST_EVENTS,
            bytes_per_sec: DEFAULT_BYTES_PER_SEC,
            burst_bytes: DEFAULT_BURST_BYTES,
        }
    }
}

impl RateLimit {
    /// No limit at all.
    pub const UNLIMITED: RateLimit =
        RateLimit { events_per_sec: 0, burst_events: 0, bytes_per_sec: 0, burst_bytes: 0 };

    /// This limit with every field an override sets replaced.
    pub fn with(self, o: &RateOverride) -> RateLimit {
        RateLimit {
            events_per_sec: o.events_per_sec.unwrap_or(self.events_per_sec),
            burst_events: o.burst_events.unwrap_or(self.burst_events),
            bytes_per_sec: o.bytes_per_sec.unwrap_or(self.bytes_per_sec),
            burst_bytes: o.burst_bytes.unwrap_or(self.burst_bytes),
        }
    }

    /// How an operator reads it, for gap records and logs: `1000 events/s (burst
    /// 300000), 4194304 bytes/s (burst 268435456)`.
    pub fn describe(&self) -> String {
        let part = |rate: u64, burst: u64, unit: &str| {
            if rate == 0 {
                format!("no {unit} limit")
            } else {
                format!("{rate} {unit}/s (burst {burst})")
            }
        };
        format!(
            "{}, {}",
            part(self.events_per_sec, self.burst_events, "events"),
            part(self.bytes_per_sec, self.burst_bytes, "bytes")
        )
    }
}

/// Per-VM changes to the global [`RateLimit`]; `None` keeps the global value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateOverride {
    pub events_per_sec: Option<u64>,
    pub burst_events: Option<u64>,
    pub bytes_per_sec: Option<u64>,
    pub burst_bytes: Option<u64>,
}

/// One VM's buckets.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    events: f64,
    bytes: f64,
    refilled: Instant,
    /// No connection of this VM reads before this instant; see the module doc.
    paced_until: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            limit,
            events: limit.burst_events as f64,
            bytes: limit.burst_bytes as f64,
            refilled: now,
            paced_until: now,
        }
    }

    /// Charges `refused_bytes` of refused payload to the pacing clock and returns the
    /// instant before which the VM's connections must not read, if it is after `now`.
    pub fn pace(&mut self, refused_bytes: u64, now: Instant) -> Option<Instant> {
        if refused_bytes > 0 {
            let nanos =
                u128::from(refused_bytes) * 1_000_000_000 / u128::from(REFUSED_READ_BYTES_PER_SEC);
            let pause = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            self.paced_until = self.paced_until.max(now) + pause;
        }
        (self.paced_until > now).then_some(self.paced_until)
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one item of `bytes` payload bytes if both buckets have room; false means
    /// the item is refused and nothing was taken.
    pub fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let l = self.limit;
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = self.refilled.max(now);
        self.events = (self.events + elapsed * l.events_per_sec as f64).min(l.burst_events as f64);
        self.bytes = (self.bytes + elapsed * l.bytes_per_sec as f64).min(l.burst_bytes as f64);

        let bytes = bytes as f64;
        let events_ok = l.events_per_sec == 0 || self.events >= 1.0;
        let bytes_ok =
            l.bytes_per_sec == 0 || self.bytes >= bytes || self.bytes >= l.burst_bytes as f64;
        if !(events_ok && bytes_ok) {
            return false;
        }
        if l.events_per_sec != 0 {
            self.events -= 1.0;
        }
        if l.bytes_per_sec != 0 {
            self.bytes -= bytes;
        }
        true
    }
}

/// A VM's bucket, shared by all of its connections.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

/// Every VM's bucket.
#[derive(Debug, Default)]
pub struct Buckets {
    table: Mutex<HashMap<String, SharedBucket>>,
}

impl Buckets {
    /// `vm`'s bucket, made full with `limit` if it has none yet. The limit is fixed for
    /// qlogd's lifetime, as the rest of its configuration is.
    pub fn for_vm(&self, vm: &str, limit: RateLimit) -> SharedBucket {
        let mut table = self.table.lock().expect("bucket table lock is never poisoned");
        let bucket = table
            .entry(vm.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(TokenBucket::new(limit, Instant::now()))));
        Arc::clone(bucket)
    }
}

/// Every VM's rejection budget; see the module doc.
#[derive(Debug, Default)]
pub struct Rejections {
    table: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Rejections {
    /// Counts a rejected connection of `vm`; how long its reply must wait, if at all.
    pub fn penalty(&self, vm: &str, now: Instant) -> Option<Duration> {
        // What is left of a budget at `now`, refilled since `at`, above the burst if full.
        let refilled = |left: f64, at: Instant| {
            left + now.saturating_duration_since(at).as_secs_f64() * REJECTIONS_PER_SEC
        };
        let mut table = self.table.lock().expect("rejection table lock is never poisoned");
        if table.len() >= MAX_REJECTING_VMS && !table.contains_key(vm) {
            table.retain(|_, (left, at)| refilled(*left, *at) < REJECTION_BURST);
        }
        let (left, at) = table.entry(vm.to_owned()).or_insert((REJECTION_BURST, now));
        *left = refilled(*left, *at).min(REJECTION_BURST);
        *at = (*at).max(now);
        if *left >= 1.0 {
            *left -= 1.0;
            None
        } else {
            Some(REJECTION_PENALTY)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(events_per_sec: u64, burst_events: u64) -> RateLimit {
        RateLimit { events_per_sec, burst_events, bytes_per_sec: 0, burst_bytes: 0 }
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(10, 5), t0);
        assert_eq!((0..8).filter(|_| b.take(100, t0)).count(), 5);
        // A tenth of a second refills one event, and never more than the burst.
        assert!(b.take(100, t0 + Duration::from_millis(100)));
        assert!(!b.take(100, t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..8).filter(|_| b.take(100, later)).count(), 5);
    }

    #[test]
    fn refused_items_take_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1, 1), t0);
        assert!(b.take(1, t0));
        for _ in 0..1000 {
            assert!(!b.take(1, t0));
        }
        assert!(b.take(1, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn bytes_are_limited_too_and_a_full_bucket_admits_any_size() {
        let t0 = Instant::now();
        let l =
            RateLimit { events_per_sec: 0, burst_events: 0, bytes_per_sec: 100, burst_bytes: 1000 };
        let mut b = TokenBucket::new(l, t0);
        assert!(b.take(5000, t0), "a full bucket admits one oversized item");
        assert!(!b.take(1, t0), "and is then in debt");
        assert!(!b.take(1, t0 + Duration::from_secs(40)));
        assert!(b.take(1, t0 + Duration::from_secs(41)));
    }

    #[test]
    fn refused_bytes_pace_reads_at_the_refused_read_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1, 1), t0);
        assert_eq!(b.pace(0, t0), None, "nothing refused, no pause");
        let rate = REFUSED_READ_BYTES_PER_SEC;
        let until = b.pace(rate / 8, t0).expect("a pause");
        assert_eq!(until - t0, Duration::from_millis(125));
        // Another connection refusing meanwhile extends the same clock.
        let until = b.pace(rate / 8, t0 + Duration::from_millis(50)).expect("a pause");
        assert_eq!(until - t0, Duration::from_millis(250));
        assert_eq!(b.pace(0, t0 + Duration::from_millis(50)), Some(until));
        assert_eq!(b.pace(0, until), None, "due once the clock is reached");
        // Idle time is not saved up: the clock starts from now.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.pace(rate, later), Some(later + Duration::from_secs(1)));
    }

    #[test]
    fn rejections_beyond_the_budget_are_delayed_per_vm() {
        let t0 = Instant::now();
        let r = Rejections::default();
        let burst = REJECTION_BURST as usize;
        assert!((0..burst).all(|_| r.penalty("sd-app", t0).is_none()));
        assert_eq!(r.penalty("sd-app", t0), Some(REJECTION_PENALTY));
        assert_eq!(r.penalty("sd-proxy", t0), None, "another VM has its own budget");
        // One rejection back per 1/REJECTIONS_PER_SEC seconds.
        let later = t0 + Duration::from_secs_f64(1.0 / REJECTIONS_PER_SEC);
        assert_eq!(r.penalty("sd-app", later), None);
        assert_eq!(r.penalty("sd-app", later), Some(REJECTION_PENALTY));
    }

    #[test]
    fn the_rejection_table_forgets_vms_with_a_full_budget() {
        let t0 = Instant::now();
        let r = Rejections::default();
        for i in 0..MAX_REJECTING_VMS {
            r.penalty(&format!("vm{i}"), t0);
        }
        for _ in 0..REJECTION_BURST as usize {
            r.penalty("vm0", t0);
        }
        let later = t0 + Duration::from_secs(2);
        r.penalty("new", later);
        let table = r.table.lock().unwrap();
        // vm0 spent its budget and keeps its entry; the others are full again by now.
        assert!(table.contains_key("vm0") && table.contains_key("new"), "{:?}", table.len());
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn zero_rates_are_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::UNLIMITED, t0);
        assert!((0..100_000).all(|_| b.take(1 << 20, t0)));
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let o = RateOverride { events_per_sec: Some(5), ..RateOverride::default() };
        let l = RateLimit::default().with(&o);
        assert_eq!(l.events_per_sec, 5);
        assert_eq!(l.burst_events, DEFAULT_BURST_EVENTS);
        assert_eq!(l.describe(), "5 events/s (burst 300000), 4194304 bytes/s (burst 268435456)");
    }

    #[test]
    fn every_connection_of_a_vm_shares_one_bucket() {
        let buckets = Buckets::default();
        let a = buckets.for_vm("sd-app", limit(1, 1));
        let b = buckets.for_vm("sd-app", limit(1000, 1000));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &buckets.for_vm("sd-proxy", limit(1, 1))));
        assert_eq!(b.lock().unwrap().limit().events_per_sec, 1);
    }
}
