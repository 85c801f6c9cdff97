//! What the agent reports about its VM and itself, every telemetry interval.
//!
//! A sample is read from /proc and statvfs(2) into memory and sent as one `Telemetry`
//! frame on the ingest stream; nothing is written to disk. The agent's own counters live
//! in [`Counters`] inside the shared state, where every place that changes them already
//! holds the lock.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use qlog_rpc::frame::FrameType;
use qlog_rpc::message::encode_json;
use qlog_rpc::telemetry::Sample;
use serde_json::Value;

use crate::shared::State;

/// The agent's own counts since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Events read from the source and put in the window.
    pub read: u64,
    /// Event frames written to a connection (a replay counts again).
    pub sent: u64,
    /// Items the sink acknowledged.
    pub acked: u64,
    /// Connections opened after the first.
    pub reconnects: u64,
    /// Times journalctl was started again after it exited.
    pub journal_restarts: u64,
    /// Gap records the agent reported.
    pub gaps: u64,
}

/// Builds a `Telemetry` frame from the shared state and the system's numbers.
pub fn telemetry_frame(state: &State, now: Instant) -> Vec<u8> {
    let mut values = BTreeMap::new();
    system_values(&mut values);
    let c = state.counters;
    let mut put = |k: &str, v: f64| {
        values.insert(k.to_owned(), Value::from(v));
    };
    put("agent_events_read", c.read as f64);
    put("agent_events_sent", c.sent as f64);
    put("agent_events_acked", c.acked as f64);
    put("agent_reconnects", c.reconnects as f64);
    put("agent_journal_restarts", c.journal_restarts as f64);
    put("agent_gaps", c.gaps as f64);
    put("agent_in_flight", state.window.unacked() as f64);
    let lag = state.window.oldest_unacked_age(now).map_or(0.0, |d| d.as_secs_f64());
    put("agent_lag_secs", lag);
    let sent_usec = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    encode_json(FrameType::Telemetry, &Sample { sent_usec, values })
}

/// Load, memory, disks and uptime; a source that cannot be read is left out.
fn system_values(out: &mut BTreeMap<String, Value>) {
    let mut put = |k: &str, v: f64| {
        out.insert(k.to_owned(), Value::from(v));
    };
    if let Ok(text) = std::fs::read_to_string("/proc/loadavg") {
        let mut it = text.split_whitespace().filter_map(|t| t.parse::<f64>().ok());
        for name in ["load1", "load5", "load15"] {
            if let Some(v) = it.next() {
                put(name, v);
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        let (total, available) = (meminfo(&text, "MemTotal:"), meminfo(&text, "MemAvailable:"));
        if let (Some(t), Some(a)) = (total, available) {
            put("mem_used_bytes", t.saturating_sub(a) as f64);
            put("mem_available_bytes", a as f64);
        }
    }
    for (path, prefix) in [("/", "disk_root"), ("/rw", "disk_rw")] {
        if let Some((used, total)) = disk_usage(path) {
            put(&format!("{prefix}_used_bytes"), used as f64);
            put(&format!("{prefix}_total_bytes"), total as f64);
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/uptime") {
        if let Some(v) = text.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()) {
            put("uptime_secs", v);
        }
    }
}

/// A `/proc/meminfo` line's value in bytes (the file says kB).
fn meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// (bytes used, bytes total) of the filesystem holding `path`, if it is a mount of its
/// own or not; `None` where `path` does not exist (no /rw outside Qubes).
fn disk_usage(path: &str) -> Option<(u64, u64)> {
    let c = CString::new(path).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own and reads a NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total = (st.f_blocks as u64).saturating_mul(frsize);
    let free = (st.f_bfree as u64).saturating_mul(frsize);
    Some((total.saturating_sub(free), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_has_the_system_and_agent_numbers_and_passes_the_sinks_checks() {
        let mut values = BTreeMap::new();
        system_values(&mut values);
        let sample = Sample { sent_usec: 1, values };
        let checked = sample.validated();
        assert_eq!(checked.rejected, 0, "{sample:?}");
        let names: Vec<&str> = checked.values.iter().map(|(n, _)| *n).collect();
        for want in [
            "load1",
            "mem_used_bytes",
            "mem_available_bytes",
            "disk_root_total_bytes",
            "uptime_secs",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert_eq!(meminfo("MemTotal:  2048 kB\n", "MemTotal:"), Some(2048 * 1024));
        assert!(disk_usage("/no/such/dir").is_none());
    }
}
