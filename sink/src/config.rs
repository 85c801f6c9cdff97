//! qlogd's configuration file, `/etc/qlog/qlogd.toml` by default.
//!
//! Owns parsing and validation; `main.rs` merges the result under flags and environment
//! variables (a flag beats its variable, which beats the file, which beats the default).
//! Unknown keys are errors, so a typo cannot silently leave a default in force, and every
//! error names the file, the line and the column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::rate_limit::RateOverride;

/// Where qlogd looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/qlog/qlogd.toml";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub ingest_socket: Option<PathBuf>,
    pub query_socket: Option<PathBuf>,
    pub ingest_group: Option<String>,
    pub query_group: Option<String>,
    pub vm_quota: Option<ByteSize>,
    pub retention_days: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_vm: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    /// Each VM's token bucket (see `rate_limit.rs`); a rate of 0 turns that limit off.
    pub rate_limit_events_per_sec: Option<u64>,
    pub rate_limit_burst_events: Option<u64>,
    pub rate_limit_bytes_per_sec: Option<ByteSize>,
    pub rate_limit_burst_bytes: Option<ByteSize>,
    /// VMs that should be sending: the health view lists them even if never seen.
    #[serde(default)]
    pub expected_vms: Vec<String>,
    /// The log qube's own name, under which qlogd stores its health events and metrics.
    pub name: Option<String>,
    /// How long per-minute telemetry rollups are kept.
    pub rollup_retention_days: Option<u64>,
    /// Thresholds of the health states.
    #[serde(default)]
    pub health: HealthFile,
    /// Per-VM overrides.
    #[serde(default)]
    pub vm: BTreeMap<String, VmOverride>,
}

/// The `[health]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// An agent reporting events unacknowledged for longer than this is lagging.
    pub lag_secs: Option<u64>,
    /// A VM is flooding above this many times its own last-hour average rate ...
    pub flood_factor: Option<u64>,
    /// ... and above this many events per minute.
    pub flood_floor_per_minute: Option<u64>,
    /// Seconds after qlogd starts before an expected VM that has not connected is
    /// reported never seen.
    pub startup_grace_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmOverride {
    pub quota: Option<ByteSize>,
    pub retention_days: Option<u64>,
    pub rate_limit_events_per_sec: Option<u64>,
    pub rate_limit_burst_events: Option<u64>,
    pub rate_limit_bytes_per_sec: Option<ByteSize>,
    pub rate_limit_burst_bytes: Option<ByteSize>,
}

impl VmOverride {
    /// The rate-limit keys of this table, as the bucket reads them.
    pub fn rate(&self) -> RateOverride {
        RateOverride {
            events_per_sec: self.rate_limit_events_per_sec,
            burst_events: self.rate_limit_burst_events,
            bytes_per_sec: self.rate_limit_bytes_per_sec.map(|b| b.0),
            burst_bytes: self.rate_limit_burst_bytes.map(|b| b.0),
        }
    }
}

impl FileConfig {
    /// The top-level rate-limit keys, as an override of the built-in defaults.
    pub fn rate(&self) -> RateOverride {
        RateOverride {
            events_per_sec: self.rate_limit_events_per_sec,
            burst_events: self.rate_limit_burst_events,
            bytes_per_sec: self.rate_limit_bytes_per_sec.map(|b| b.0),
            burst_bytes: self.rate_limit_burst_bytes.map(|b| b.0),
        }
    }
}

/// A byte count written as a number or as a string with a unit: `"512MiB"`, `"2 GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct ByteSize(pub u64);

impl TryFrom<toml::Value> for ByteSize {
    type Error = String;

    fn try_from(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(n) if n >= 0 => Ok(ByteSize(n as u64)),
            toml::Value::String(s) => parse_bytes(&s).map(ByteSize),
            other => {
                Err(format!("expected a byte count such as 1073741824 or \"1GiB\", got {other}"))
            }
        }
    }
}

/// Parses `1024`, `64KiB`, `1.5 GiB`, `2GB`, `512M` (binary and decimal units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a byte count such as \"1GiB\""))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        other => {
            return Err(format!("unknown unit {other:?} in {s:?}: use B, KiB, MiB, GiB or TiB"))
        }
    };
    Ok((n * mult) as u64)
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<FileConfig, String> {
    let config: FileConfig = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((0, 0), |span| line_col(text, span.start));
        format!("{}:{line}:{col}: {}", path.display(), e.message())
    })?;
    validate(&config).map_err(|m| format!("{}: {m}", path.display()))?;
    Ok(config)
}

fn validate(c: &FileConfig) -> Result<(), String> {
    if let Some(name) = &c.name {
        qlog_rpc::descriptor::validate_vm_name(name).map_err(|e| format!("name: {e}"))?;
    }
    if c.rollup_retention_days == Some(0) {
        return Err("rollup_retention_days must be at least 1".into());
    }
    if c.health.lag_secs == Some(0) || c.health.flood_factor == Some(0) {
        return Err("[health] lag_secs and flood_factor must be at least 1".into());
    }
    for vm in c.expected_vms.iter().chain(c.vm.keys()) {
        qlog_rpc::descriptor::validate_vm_name(vm)
            .map_err(|e| format!("in expected_vms or [vm.{vm}]: {e}"))?;
    }
    if c.max_connections == Some(0) || c.max_connections_per_vm == Some(0) {
        return Err("max_connections and max_connections_per_vm must be at least 1".into());
    }
    if c.max_handshakes == Some(0) {
        return Err("max_handshakes must be at least 1".into());
    }
    if c.handshake_timeout_secs == Some(0) {
        return Err("handshake_timeout_secs must be at least 1".into());
    }
    if c.retention_days == Some(0) || c.vm.values().any(|v| v.retention_days == Some(0)) {
        return Err("retention_days must be at least 1".into());
    }
    let rates =
        std::iter::once(("", c.rate())).chain(c.vm.iter().map(|(vm, o)| (vm.as_str(), o.rate())));
    for (vm, rate) in rates {
        let table = if vm.is_empty() { String::new() } else { format!(" in [vm.{vm}]") };
        if rate.burst_events == Some(0) {
            return Err(format!("rate_limit_burst_events{table} must be at least 1 (to turn the event limit off, set rate_limit_events_per_sec = 0)"));
        }
        if rate.burst_bytes == Some(0) {
            return Err(format!("rate_limit_burst_bytes{table} must be at least 1 (to turn the byte limit off, set rate_limit_bytes_per_sec = 0)"));
        }
    }
    Ok(())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<FileConfig, String> {
        parse(text, Path::new("qlogd.toml"))
    }

    #[test]
    fn parses_every_key_and_units() {
        let c = p(r#"
            state_dir = "/var/lib/qlog"
            vm_quota = "2GiB"
            retention_days = 30
            expected_vms = ["sd-app", "sd-proxy"]
            [vm.sd-app]
            quota = 1048576
            retention_days = 90
        "#)
        .unwrap();
        assert_eq!(c.vm_quota, Some(ByteSize(2 << 30)));
        assert_eq!(c.vm["sd-app"].quota, Some(ByteSize(1 << 20)));
        assert_eq!(c.expected_vms, ["sd-app", "sd-proxy"]);
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let err = p("retention_days = 30\nvm_qouta = 5\n").unwrap_err();
        assert!(err.starts_with("qlogd.toml:2:1:"), "{err}");
        assert!(err.contains("vm_qouta"), "{err}");
        let err = p("vm_quota = \"lots\"\n").unwrap_err();
        assert!(err.contains("qlogd.toml:1:"), "{err}");
        let err = p("expected_vms = [\"1bad\"]\n").unwrap_err();
        assert!(err.contains("must start with a letter"), "{err}");
    }

    #[test]
    fn rate_limits_parse_and_a_zero_burst_is_refused() {
        let c = p(r#"
            rate_limit_events_per_sec = 500
            rate_limit_bytes_per_sec = "2MiB"
            [vm.sd-flood]
            rate_limit_events_per_sec = 50
            rate_limit_burst_events = 100
            rate_limit_burst_bytes = "1MiB"
        "#)
        .unwrap();
        assert_eq!(c.rate().events_per_sec, Some(500));
        assert_eq!(c.rate().bytes_per_sec, Some(2 << 20));
        assert_eq!(c.rate().burst_events, None);
        let flood = c.vm["sd-flood"].rate();
        assert_eq!((flood.events_per_sec, flood.burst_events), (Some(50), Some(100)));
        assert_eq!(flood.burst_bytes, Some(1 << 20));
        let err = p("[vm.sd-app]\nrate_limit_burst_events = 0\n").unwrap_err();
        assert!(err.contains("rate_limit_burst_events in [vm.sd-app] must be at least 1"), "{err}");
        let err = p("rate_limit_burst_bytes = 0\n").unwrap_err();
        assert!(err.contains("rate_limit_burst_bytes must be at least 1"), "{err}");
        assert!(p("rate_limit_event_per_sec = 5\n").is_err(), "typos are errors");
    }

    #[test]
    fn max_handshakes_is_at_least_one() {
        assert_eq!(p("max_handshakes = 64\n").unwrap().max_handshakes, Some(64));
        let err = p("max_handshakes = 0\n").unwrap_err();
        assert!(err.contains("max_handshakes must be at least 1"), "{err}");
    }

    #[test]
    fn byte_units() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 1_610_612_736);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert!(parse_bytes("5 parsecs").is_err());
    }
}
