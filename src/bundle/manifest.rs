//! `manifest.json`, the first entry of every bundle: what the bundle holds and how it
//! was made. Owns the schema; the export fills it in, verify and inspect read it.
//!
//! The manifest names VMs only by their bundle names (tokens, or allowlisted names), and
//! rules only by name and count: never a value, a keyword or a pattern, since those are
//! exactly what the redaction hides. Field order is fixed by the structs and maps are
//! sorted, so the same inputs give the same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `format` of every qlog bundle.
pub const FORMAT: &str = "qlog-support-bundle";
/// The version of the layout described in `docs/bundle-format.md`.
pub const FORMAT_VERSION: u32 = 1;

pub const MANIFEST_PATH: &str = "manifest.json";
pub const VMS_PATH: &str = "vms.json";
pub const REPORT_PATH: &str = "report.html";
pub const EVENTS_DIR: &str = "events/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub qlog_version: String,
    /// RFC 3339, UTC, whole seconds: `--created-at`, else `SOURCE_DATE_EPOCH`, else now.
    pub created_at: String,
    pub created_at_usec: u64,
    pub time_range: TimeRange,
    pub selection: Selection,
    /// Sorted by name in the bundle, so the order says nothing about the real names.
    pub vms: Vec<VmEntry>,
    /// Records over all VMs: the sum of `vms[].records`.
    pub records: u64,
    /// Every other file in the bundle, by path.
    pub files: BTreeMap<String, FileEntry>,
    pub redaction: Redaction,
}

/// Receive times, microseconds since the Unix epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeRange {
    /// `--since` as the export resolved it.
    pub since_usec: Option<u64>,
    /// `--until` as the export resolved it.
    pub until_usec: Option<u64>,
    /// The first and last record in the bundle.
    pub first_usec: Option<u64>,
    pub last_usec: Option<u64>,
}

/// What was asked for, without values that could be sensitive (a grep pattern, a unit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// VMs named on the command line, by bundle name; empty means all.
    pub vms: Vec<String>,
    pub priority: Option<(u8, u8)>,
    /// Which other filters were set: `unit`, `identifier`, `grep`, `match`.
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// The VM's name in the bundle: a `vm-` token, or the name itself if allowlisted.
    pub name: String,
    /// Lines of `events_file`, gap records included.
    pub records: u64,
    /// Of those, gap records.
    pub gaps: u64,
    pub first_usec: Option<u64>,
    pub last_usec: Option<u64>,
    pub events_file: String,
    pub export_file: Option<String>,
    /// The VM's hash chain in the store when the bundle was made; absent if qlogd had
    /// none to report (a qlogd from before the chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainHead>,
}

/// A VM's hash chain as `qlog verify --heads-only` reports it: a later `qlog verify`
/// whose chain has this head at this position, or trimmed past it, shows the store was
/// not rewritten in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// 64 hex digits: the link of the VM's newest stored batch.
    pub head: String,
    /// 64 hex digits: the link of its newest trimmed batch (zeros if none was trimmed).
    pub anchor: String,
    /// Chained batches ever stored: the head is at position `length - 1`.
    pub length: u64,
    /// Chained batches trimmed: the anchor is at position `trimmed - 1`.
    pub trimmed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Lower-case hex.
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    /// False for `--no-redact`: then nothing below applies and the bundle holds
    /// everything as stored.
    pub enabled: bool,
    /// `default`, or the rules file's `name`.
    pub profile: String,
    pub rules_file: bool,
    /// `random` (a new key for this bundle: its tokens match no other bundle's) or
    /// `file` (`--key-file`: bundles with the same `key_id` share tokens).
    pub key: String,
    pub key_id: String,
    pub fields_exported: Vec<String>,
    /// Field occurrences left out because they are not on the allowlist.
    pub fields_dropped: u64,
    pub domains_kept: Vec<String>,
    pub vms_kept: Vec<String>,
    /// Prefixes of every token the bundle can hold, for the leak re-scan.
    pub token_prefixes: Vec<String>,
    /// Times two different values got the same token (see `docs/bundle-format.md`).
    pub token_collisions: u64,
    /// Every rule that fired, in report order.
    pub rules: Vec<RuleCount>,
    /// `passed`: every byte of every other file was scanned after redaction.
    pub leak_scan: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub rule: String,
    /// Values replaced.
    pub replaced: u64,
    /// Distinct tokens produced.
    pub distinct: u64,
}

impl Manifest {
    /// The manifest as stored: pretty JSON and a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("manifests serialise");
        out.push(b'\n');
        out
    }
}
