//! Per-VM, per-minute telemetry rollups: what the committer counts as it stores events,
//! and how queries read them back.
//!
//! The committer thread owns a [`RollupBook`]. Every event, gap, rejection, quota trim,
//! heartbeat and telemetry value it handles is counted in the rollup of its VM and
//! receive-time minute, and the minutes touched in a cycle are written in that cycle's
//! atomic store apply (as `R` keys, see `store.rs`). So a rollup always agrees with the
//! events stored beside it, across crashes too: both land in one apply or neither does.
//! Rollups have their own retention, much longer than the events'.

use std::collections::{BTreeSet, HashMap};

use qlog_rpc::query::StatsReply;
use qlog_rpc::telemetry::{Rollup, MAX_STATS_BUCKETS};

use crate::store::{Store, StoreError};

pub const MINUTE_USEC: u64 = 60_000_000;

/// Minutes kept in memory after they stop changing, so late arrivals for the previous
/// minute do not reload it.
const KEEP_MINUTES: u64 = 2;

pub fn minute_of(usec: u64) -> u64 {
    usec / MINUTE_USEC
}

pub fn rollup_key(vm: &str, minute: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(vm.len() + 10);
    k.push(b'R');
    k.extend_from_slice(vm.as_bytes());
    k.push(0);
    k.extend_from_slice(&minute.to_be_bytes());
    k
}

fn minute_from_key(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The rollups the committer is still changing.
#[derive(Default)]
pub struct RollupBook {
    open: HashMap<(String, u64), Rollup>,
    dirty: BTreeSet<(String, u64)>,
    /// Off only for the overhead benchmark: counts go to `scratch` and are never kept.
    disabled: bool,
    scratch: Rollup,
}

impl RollupBook {
    /// A book that counts nothing, so a benchmark can measure what counting costs.
    pub fn disabled() -> RollupBook {
        RollupBook { disabled: true, ..RollupBook::default() }
    }

    /// The rollup of `vm` for the minute holding `usec`, loaded from the store if this
    /// run has not touched it yet (a restart within a minute continues its counts).
    pub fn at(&mut self, store: &Store, vm: &str, usec: u64) -> &mut Rollup {
        if self.disabled {
            self.scratch = Rollup::default();
            return &mut self.scratch;
        }
        let key = (vm.to_owned(), minute_of(usec));
        self.dirty.insert(key.clone());
        self.open.entry(key).or_insert_with_key(|(vm, minute)| {
            match store.get_aux(&rollup_key(vm, *minute)) {
                Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_else(|e| {
                    crate::log_events::rollup_unreadable(vm, *minute, &e.to_string());
                    Rollup::default()
                }),
                Ok(None) => Rollup::default(),
                Err(e) => {
                    crate::log_events::rollup_unreadable(vm, *minute, &e.to_string());
                    Rollup::default()
                }
            }
        })
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Encodes every minute changed since the last call, for the next commit.
    pub fn take_dirty(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|k| {
                let r = self.open.get(&k)?;
                let json = serde_json::to_vec(r).expect("rollups serialise");
                Some((rollup_key(&k.0, k.1), json))
            })
            .collect()
    }

    /// Forgets clean minutes older than the last few, after they were committed.
    pub fn evict(&mut self, now_usec: u64) {
        let oldest = minute_of(now_usec).saturating_sub(KEEP_MINUTES);
        let dirty = &self.dirty;
        self.open.retain(|k, _| k.1 >= oldest || dirty.contains(k));
    }

    /// Rollup keys of `vm` older than `cutoff_usec`, for retention.
    pub fn expired(store: &Store, vm: &str, cutoff_usec: u64) -> Vec<Vec<u8>> {
        let from = rollup_key(vm, 0);
        let to = rollup_key(vm, minute_of(cutoff_usec));
        store.range_aux(&from, &to).filter_map(|kv| kv.ok().map(|(k, _)| k)).collect()
    }
}

/// Reads `vm`'s rollups in `[since, until)` and merges them into buckets of
/// `bucket_minutes`, keeping only the gauges named in `gauges` (all if empty).
///
/// At most [`MAX_STATS_BUCKETS`] buckets come back; a wider request is cut at its newest
/// end, which the caller avoids by choosing a bucket width to fit.
pub fn read_stats(
    store: &Store,
    vm: &str,
    since_usec: u64,
    until_usec: u64,
    bucket_minutes: u32,
    gauges: &[String],
) -> Result<StatsReply, StoreError> {
    let width = u64::from(bucket_minutes.max(1));
    let from = rollup_key(vm, minute_of(since_usec));
    let to = rollup_key(vm, minute_of(until_usec.saturating_add(MINUTE_USEC - 1)));
    let mut buckets: Vec<(u64, Rollup)> = Vec::new();
    for kv in store.range_aux(&from, &to) {
        let (k, v) = kv?;
        let Some(minute) = minute_from_key(&k) else { continue };
        let Ok(mut rollup) = serde_json::from_slice::<Rollup>(&v) else {
            crate::log_events::rollup_unreadable(vm, minute, "not valid JSON");
            continue;
        };
        rollup.retain_gauges(gauges);
        let start = (minute / width) * width * MINUTE_USEC;
        match buckets.last_mut() {
            Some((s, b)) if *s == start => b.merge(&rollup),
            _ => {
                if buckets.len() == MAX_STATS_BUCKETS {
                    break;
                }
                buckets.push((start, rollup));
            }
        }
    }
    Ok(StatsReply { vm: vm.to_owned(), buckets })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CommitSet, StoreWriter};

    #[test]
    fn rollups_persist_and_merge_into_buckets() {
        let dir = std::env::temp_dir().join(format!("qlog-rollup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, 8 << 20).unwrap();
        let mut book = RollupBook::default();
        let t0 = 1_800_000_000 * 1_000_000 / MINUTE_USEC * MINUTE_USEC;
        for m in 0..5u64 {
            let r = book.at(&store, "sd-app", t0 + m * MINUTE_USEC + 5);
            r.events[3] += m + 1;
            r.observe("load1", m as f64);
        }
        book.at(&store, "sd-web", t0).events[6] += 7;
        let aux = book.take_dirty();
        assert_eq!(aux.len(), 6);
        let mut w = StoreWriter::open(store.clone(), 1 << 20).unwrap();
        w.commit(&CommitSet { aux, next_batch_id: 1, ..Default::default() }).unwrap();

        // A fresh book (a restart) continues from what is stored.
        let mut again = RollupBook::default();
        assert_eq!(again.at(&store, "sd-app", t0 + 4 * MINUTE_USEC).events[3], 5);

        let stats = read_stats(&store, "sd-app", t0, t0 + 5 * MINUTE_USEC, 2, &[]).unwrap();
        let starts: Vec<u64> = stats.buckets.iter().map(|b| b.0).collect();
        let per: Vec<u64> = stats.buckets.iter().map(|b| b.1.events[3]).collect();
        assert_eq!(per.iter().sum::<u64>(), 15);
        assert!(starts.windows(2).all(|w| w[1] - w[0] == 2 * MINUTE_USEC));
        let last = &stats.buckets.last().unwrap().1.gauges["load1"];
        assert_eq!(last.last, 4.0);
        let other = read_stats(&store, "sd-web", t0, t0 + MINUTE_USEC, 1, &[]).unwrap();
        assert_eq!(other.buckets.len(), 1);
        assert_eq!(other.buckets[0].1.events[6], 7);
        assert_eq!(RollupBook::expired(&store, "sd-app", t0 + 2 * MINUTE_USEC).len(), 2);
        drop((w, store));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
