//! Telemetry: what an agent reports about its VM's health, and the per-minute rollups
//! the sink keeps of every VM.
//!
//! A [`Sample`] is a VM's claim about itself, so the sink accepts only the metric names in
//! [`GAUGES`] and only values inside each one's bounds ([`Sample::validated`]); anything
//! else is counted and dropped rather than allowed to poison an aggregate. A [`Rollup`] is
//! one VM's minute (or, merged, any longer bucket): event and byte counts per priority,
//! what the sink refused, and min/max/last of every gauge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most values one sample may carry; more is a hostile or broken agent.
pub const MAX_SAMPLE_VALUES: usize = 64;

/// Index of events without a valid `PRIORITY` in [`Rollup::events`] and [`Rollup::bytes`].
pub const NO_PRIORITY: usize = 8;

/// One gauge a VM may report, with the range a real value can take.
#[derive(Debug, Clone, Copy)]
pub struct GaugeSpec {
    pub name: &'static str,
    pub help: &'static str,
    pub unit: &'static str,
    /// Largest plausible value; the smallest is always 0.
    pub max: f64,
}

const BYTES_MAX: f64 = (1u64 << 60) as f64;
const COUNT_MAX: f64 = (1u64 << 53) as f64;

/// Every gauge an agent may report. Names are stable: they appear in the store, in
/// `qlog stats --metric` and in `qlog metrics`.
pub const GAUGES: &[GaugeSpec] = &[
    g("load1", "1-minute load average", "", 1e6),
    g("load5", "5-minute load average", "", 1e6),
    g("load15", "15-minute load average", "", 1e6),
    g("mem_used_bytes", "memory in use (total minus available)", "bytes", BYTES_MAX),
    g("mem_available_bytes", "memory available", "bytes", BYTES_MAX),
    g("disk_root_used_bytes", "bytes used on /", "bytes", BYTES_MAX),
    g("disk_root_total_bytes", "size of /", "bytes", BYTES_MAX),
    g("disk_rw_used_bytes", "bytes used on /rw, the private volume", "bytes", BYTES_MAX),
    g("disk_rw_total_bytes", "size of /rw", "bytes", BYTES_MAX),
    g("uptime_secs", "seconds since the VM booted", "seconds", 1e10),
    g("agent_events_read", "events the agent read from its source", "", COUNT_MAX),
    g("agent_events_sent", "events the agent sent", "", COUNT_MAX),
    g("agent_events_acked", "events the sink acknowledged", "", COUNT_MAX),
    g("agent_reconnects", "times the agent reconnected", "", COUNT_MAX),
    g("agent_in_flight", "events sent and not yet acknowledged", "", 1e9),
    g("agent_lag_secs", "age of the oldest unacknowledged event", "seconds", 1e9),
    g("agent_journal_restarts", "times journalctl was restarted", "", COUNT_MAX),
    g("agent_gaps", "gaps the agent reported", "", COUNT_MAX),
    // qlogd's own metrics, recorded under the log qube's name.
    g("sink_ingest_events_per_sec", "events committed per second", "", 1e9),
    g("sink_commit_latency_ms", "time from a chunk's arrival to its commit", "ms", 1e7),
    g("sink_store_bytes", "bytes the store takes on disk", "bytes", BYTES_MAX),
    g("sink_connections", "open ingest connections", "", 1e9),
    g("sink_followers", "live followers", "", 1e9),
    g("sink_lagging_followers", "followers that missed events", "", 1e9),
];

const fn g(name: &'static str, help: &'static str, unit: &'static str, max: f64) -> GaugeSpec {
    GaugeSpec { name, help, unit, max }
}

/// The spec of gauge `name`, if it is one.
pub fn gauge_spec(name: &str) -> Option<&'static GaugeSpec> {
    GAUGES.iter().find(|s| s.name == name)
}

/// A telemetry sample from an agent (frame type `Telemetry`). Values are a JSON object so
/// that a newer agent may report more; the sink keeps the ones it knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The agent's clock, microseconds since the epoch: a claim.
    #[serde(default)]
    pub sent_usec: u64,
    #[serde(default)]
    pub values: BTreeMap<String, serde_json::Value>,
}

/// The part of a sample the sink trusts enough to aggregate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValidSample {
    pub values: Vec<(&'static str, f64)>,
    /// Values dropped: unknown names, non-numbers, negative, non-finite or out of range.
    pub rejected: u64,
}

impl Sample {
    /// Keeps the known gauges whose values are plausible; counts the rest.
    pub fn validated(&self) -> ValidSample {
        let mut out = ValidSample::default();
        for (i, (name, value)) in self.values.iter().enumerate() {
            if i >= MAX_SAMPLE_VALUES {
                out.rejected += (self.values.len() - i) as u64;
                break;
            }
            let spec = gauge_spec(name).filter(|s| !s.name.starts_with("sink_"));
            match (spec, value.as_f64()) {
                (Some(spec), Some(v)) if v.is_finite() && (0.0..=spec.max).contains(&v) => {
                    out.values.push((spec.name, v))
                }
                _ => out.rejected += 1,
            }
        }
        out
    }
}

/// min, max and last of one gauge over a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gauge {
    pub min: f64,
    pub max: f64,
    pub last: f64,
    /// Samples seen.
    pub n: u64,
}

impl Gauge {
    pub fn new(v: f64) -> Gauge {
        Gauge { min: v, max: v, last: v, n: 1 }
    }

    pub fn observe(&mut self, v: f64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.last = v;
        self.n = self.n.saturating_add(1);
    }

    /// Folds a later bucket into this one.
    pub fn merge(&mut self, later: &Gauge) {
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.last = later.last;
        self.n = self.n.saturating_add(later.n);
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One VM's counts and gauges over one bucket of time (a minute as stored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    /// Events stored, by priority 0..=7, then [`NO_PRIORITY`].
    #[serde(default)]
    pub events: [u64; 9],
    /// Bytes of those events' fields, by the same index.
    #[serde(default)]
    pub bytes: [u64; 9],
    /// Gap records stored (from the agent, sequence jumps, quota, rate limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gaps: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejected_frames: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub quota_dropped: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_refused: u64,
    /// Telemetry values refused as implausible or unknown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub telemetry_rejected: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub heartbeats: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gauges: BTreeMap<String, Gauge>,
}

impl Rollup {
    pub fn total_events(&self) -> u64 {
        self.events.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    pub fn observe(&mut self, name: &str, v: f64) {
        match self.gauges.get_mut(name) {
            Some(g) => g.observe(v),
            None => {
                self.gauges.insert(name.to_owned(), Gauge::new(v));
            }
        }
    }

    /// Folds a later bucket into this one: counters add, gauges merge.
    pub fn merge(&mut self, later: &Rollup) {
        for i in 0..9 {
            self.events[i] = self.events[i].saturating_add(later.events[i]);
            self.bytes[i] = self.bytes[i].saturating_add(later.bytes[i]);
        }
        self.gaps = self.gaps.saturating_add(later.gaps);
        self.rejected_frames = self.rejected_frames.saturating_add(later.rejected_frames);
        self.quota_dropped = self.quota_dropped.saturating_add(later.quota_dropped);
        self.rate_refused = self.rate_refused.saturating_add(later.rate_refused);
        self.telemetry_rejected = self.telemetry_rejected.saturating_add(later.telemetry_rejected);
        self.heartbeats = self.heartbeats.saturating_add(later.heartbeats);
        for (name, g) in &later.gauges {
            match self.gauges.get_mut(name) {
                Some(mine) => mine.merge(g),
                None => {
                    self.gauges.insert(name.clone(), *g);
                }
            }
        }
    }

    /// The value of a counter metric (see [`COUNTERS`]), if `name` is one.
    pub fn counter(&self, name: &str) -> Option<u64> {
        let by_priority = |prefix: &str, arr: &[u64; 9]| -> Option<u64> {
            let rest = name.strip_prefix(prefix)?;
            let i = PRIORITY_NAMES.iter().position(|p| *p == rest)?;
            Some(arr[i])
        };
        Some(match name {
            "events" => self.total_events(),
            "bytes" => self.total_bytes(),
            "gaps" => self.gaps,
            "rejected_frames" => self.rejected_frames,
            "quota_dropped" => self.quota_dropped,
            "rate_refused" => self.rate_refused,
            "telemetry_rejected" => self.telemetry_rejected,
            "heartbeats" => self.heartbeats,
            _ => {
                return by_priority("events_", &self.events)
                    .or_else(|| by_priority("bytes_", &self.bytes))
            }
        })
    }

    /// Keeps only the gauges named in `keep` (all of them when `keep` is empty).
    pub fn retain_gauges(&mut self, keep: &[String]) {
        if !keep.is_empty() {
            self.gauges.retain(|name, _| keep.iter().any(|k| k == name));
        }
    }
}

/// Priority names as journalctl spells them, then the bucket of events without one.
pub const PRIORITY_NAMES: [&str; 9] =
    ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug", "none"];

/// Counter metrics every rollup has, besides `events_<priority>` and `bytes_<priority>`.
pub const COUNTERS: &[(&str, &str)] = &[
    ("events", "events stored"),
    ("bytes", "bytes of stored event fields"),
    ("gaps", "gap records stored"),
    ("rejected_frames", "frames or connections rejected as malformed"),
    ("quota_dropped", "events removed because the VM was over its quota"),
    ("rate_refused", "events refused by the rate limit"),
    ("telemetry_rejected", "telemetry values refused as implausible"),
    ("heartbeats", "heartbeats received"),
];

/// True if and only if `name` is a metric `qlog stats --metric` can chart.
pub fn is_metric(name: &str) -> bool {
    gauge_spec(name).is_some() || Rollup::default().counter(name).is_some()
}

/// The longest bucket series one stats reply carries per VM.
pub const MAX_STATS_BUCKETS: usize = 360;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(values: &str) -> Sample {
        serde_json::from_str(&format!(r#"{{"sent_usec":1,"values":{values}}}"#)).unwrap()
    }

    #[test]
    fn hostile_values_are_dropped_and_counted() {
        let s = sample(
            r#"{"load1":0.5,"load5":-1,"load15":1e300,"mem_used_bytes":"lots",
                "uptime_secs":null,"no_such":1,"sink_connections":5,"agent_lag_secs":3}"#,
        );
        let v = s.validated();
        assert_eq!(v.values, vec![("agent_lag_secs", 3.0), ("load1", 0.5)]);
        assert_eq!(v.rejected, 6);
    }

    #[test]
    fn non_finite_json_does_not_parse() {
        assert!(serde_json::from_str::<Sample>(r#"{"values":{"load1":NaN}}"#).is_err());
    }

    #[test]
    fn too_many_values_are_cut() {
        let many: BTreeMap<String, serde_json::Value> =
            (0..200).map(|i| (format!("x{i:03}"), serde_json::json!(1))).collect();
        let s = Sample { sent_usec: 0, values: many };
        assert_eq!(s.validated().rejected, 200);
    }

    #[test]
    fn merge_adds_counters_and_keeps_extremes() {
        let mut a = Rollup::default();
        a.events[3] = 2;
        a.observe("load1", 1.0);
        let mut b = Rollup::default();
        b.events[3] = u64::MAX;
        b.observe("load1", 5.0);
        b.observe("load1", 0.5);
        a.merge(&b);
        assert_eq!(a.events[3], u64::MAX);
        assert_eq!(a.gauges["load1"], Gauge { min: 0.5, max: 5.0, last: 0.5, n: 3 });
        assert_eq!(a.counter("events_err"), Some(u64::MAX));
        assert_eq!(a.counter("events"), Some(u64::MAX));
        assert!(is_metric("bytes_none") && is_metric("load5") && !is_metric("nope"));
    }
}
