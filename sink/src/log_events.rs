//! Every operator-facing event qlogd logs, one function each.
//!
//! This file is the full list of what qlogd can complain about. Levels follow one rule:
//! INFO is lifecycle, WARN is recovered with nothing lost, ERROR is data lost or an
//! operator must act. Anything a hostile VM can trigger repeatedly goes through
//! [`RateLimit`], so a flood of bad input cannot flood the log.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::{RepairReport, StoreError};

/// At most one message per key per interval; the rest are counted and the count is
/// reported with the next message that gets through.
struct RateLimit {
    interval: Duration,
    seen: Mutex<BTreeMap<String, (Instant, u64)>>,
}

impl RateLimit {
    const fn new() -> RateLimit {
        RateLimit { interval: Duration::from_secs(10), seen: Mutex::new(BTreeMap::new()) }
    }

    /// Returns `Some(suppressed)` if a message for `key` may be logged now.
    fn check(&self, key: &str) -> Option<u64> {
        let mut seen = self.seen.lock().expect("rate limit lock is never poisoned");
        // Keys are trusted VM names plus a few fixed strings, but stay bounded anyway.
        if seen.len() > 4096 {
            seen.clear();
        }
        let now = Instant::now();
        match seen.get_mut(key) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                seen.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

static LIMIT: RateLimit = RateLimit::new();

pub fn listening(ingest: &Path, query: &Path, state_dir: &Path) {
    tracing::info!(ingest = %ingest.display(), query = %query.display(), state_dir = %state_dir.display(), "qlogd ready");
}

pub fn shutting_down(signal: &str) {
    tracing::info!(signal, "shutting down: no new connections, committing what is queued");
}

pub fn shutdown_complete(elapsed: Duration) {
    tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "shutdown complete");
}

pub fn connection_rejected(peer: &str, error: &dyn std::fmt::Display) {
    if let Some(suppressed) = LIMIT.check(&format!("reject:{peer}")) {
        tracing::warn!(vm = peer, suppressed, error = %error, "ingest connection rejected");
    }
}

pub fn stream_opened(vm: &str, stream: &str, resume_seq: u64, agent: &str) {
    if LIMIT.check(&format!("open:{vm}:{stream}")).is_some() {
        tracing::info!(vm, stream, resume_seq, agent, "stream connected");
    }
}

pub fn stream_closed(vm: &str, stream: &str, clean: bool, last_seq: u64) {
    tracing::debug!(vm, stream, clean, last_seq, "stream closed");
}

pub fn too_many_connections(vm: &str, limit: usize) {
    if let Some(suppressed) = LIMIT.check(&format!("conns:{vm}")) {
        tracing::warn!(vm, limit, suppressed, "refusing connection: too many open from this VM");
    }
}

pub fn too_many_handshakes(limit: usize) {
    if let Some(suppressed) = LIMIT.check("handshakes") {
        tracing::warn!(
            limit,
            suppressed,
            "refusing connection: too many ingest connections are still in their handshake"
        );
    }
}

pub fn accept_failed(socket: &str, error: &dyn std::fmt::Display) {
    if let Some(suppressed) = LIMIT.check(&format!("accept:{socket}")) {
        tracing::warn!(socket, error = %error, suppressed, "cannot accept a connection; retrying");
    }
}

pub fn running_as_root() {
    tracing::warn!(
        "running as root: qlogd needs no privileges; run it as its own user (the packaged \
         unit uses User=qlog)"
    );
}

pub fn quota_trimmed(vm: &str, dropped: u64, quota: u64) {
    if let Some(suppressed) = LIMIT.check(&format!("quota:{vm}")) {
        tracing::error!(
            vm,
            dropped,
            quota,
            suppressed,
            "VM over quota: its oldest events were removed"
        );
    }
}

pub fn rate_limited(vm: &str, refused: u64, limit: &str) {
    if let Some(suppressed) = LIMIT.check(&format!("rate:{vm}")) {
        tracing::error!(
            vm,
            refused,
            limit,
            suppressed,
            "VM over its rate limit: events refused and recorded as a gap (qlog vms counts them)"
        );
    }
}

pub fn retention_expired(vm: &str, expired: u64) {
    tracing::info!(vm, expired, "events past the retention period removed");
}

/// Crash repair on open. Cutting what was never indexed is routine after a crash (it was
/// never acknowledged); indexed bytes missing are acknowledged events lost.
pub fn store_opened(repair: &RepairReport, elapsed: Duration) {
    let RepairReport { cut_segments, cut_bytes, removed_segments, missing_segments, missing_bytes } =
        repair.clone();
    let elapsed_ms = elapsed.as_millis() as u64;
    if repair.acked_data_intact() {
        tracing::info!(
            cut_segments,
            cut_bytes,
            removed_segments,
            elapsed_ms,
            "store opened; cut only what was never acknowledged"
        );
    } else {
        tracing::error!(
            missing_segments,
            missing_bytes,
            cut_segments,
            cut_bytes,
            removed_segments,
            elapsed_ms,
            "store opened with indexed data missing: acknowledged events were lost (disk damage?)"
        );
    }
}

/// One ERROR when commits start failing (a full disk, say), however long it lasts and
/// however often the committer retries; the retries are at DEBUG, and
/// [`commit_recovered`] closes the episode. A disk that fills again and again within the
/// rate-limit interval still gets one ERROR per interval.
pub fn commit_failed(error: &StoreError, attempt: u32) {
    if attempt == 1 {
        if let Some(suppressed) = LIMIT.check("commit") {
            tracing::error!(error = %error, suppressed, "commit failed: acks are held until the store accepts writes again");
            return;
        }
    }
    tracing::debug!(error = %error, attempt, "commit failed again; retrying");
}

pub fn reserve_released(reserve: &Path) {
    tracing::error!(reserve = %reserve.display(), "the disk is full: released the reserve file to open the store; queries work, acks wait for free space");
}

pub fn index_failed(error: &StoreError) {
    tracing::error!(error = %error, "the index failed a write and must be reopened: exiting for a restart, nothing unacknowledged was acked");
}

pub fn commit_recovered(failures: u32) {
    tracing::warn!(failures, "commits succeed again; acks resume");
}

pub fn query_failed(error: &dyn std::fmt::Display) {
    if let Some(suppressed) = LIMIT.check("query") {
        tracing::warn!(error = %error, suppressed, "query failed");
    }
}

pub fn vm_silent(vm: &str, quiet_secs: u64, interval_secs: u32) {
    tracing::error!(
        vm,
        quiet_secs,
        interval_secs,
        "VM went silent: no heartbeat for three promised intervals"
    );
}

pub fn vm_back(vm: &str, quiet_secs: u64) {
    tracing::info!(vm, quiet_secs, "VM is talking again");
}

pub fn vm_never_seen(vm: &str) {
    tracing::error!(
        vm,
        "expected VM has never connected: check its qlog-agent service and the qrexec policy"
    );
}

/// A stored rollup could not be read; its minute starts again from zero.
pub fn rollup_unreadable(vm: &str, minute: u64, error: &str) {
    if let Some(suppressed) = LIMIT.check(&format!("rollup:{vm}")) {
        tracing::warn!(
            vm,
            minute,
            error,
            suppressed,
            "telemetry rollup unreadable; counting that minute afresh"
        );
    }
}

/// A VM sent telemetry values outside their bounds; they were dropped.
pub fn telemetry_rejected(vm: &str, rejected: u64) {
    if let Some(suppressed) = LIMIT.check(&format!("telemetry:{vm}")) {
        tracing::warn!(vm, rejected, suppressed, "implausible telemetry values dropped");
    }
}

/// The known and expected VMs' quotas add up to more than the store's filesystem.
pub fn quotas_exceed_disk(sum: u64, disk: u64, vms: usize) {
    tracing::warn!(
        quota_sum = sum,
        disk_bytes = disk,
        vms,
        "the VMs' quotas add up to more than the disk: if they all fill up, commits stop and acks wait for free space; lower vm_quota or give the log qube a larger private volume"
    );
}
