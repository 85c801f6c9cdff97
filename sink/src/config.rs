//! qlogd's configuration file, `/etc/qlog/qlogd.toml` by default.
//!
//! Owns parsing and validation; `main.rs` merges the result under flags and environment
//! variables (a flag beats its variable, which beats the file, which beats the default).
//! Unknown keys are errors, so a typo cannot silently leave a default in force, and every
//! error names the file, the line and the column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    pub handshake_timeout_secs: Option<u64>,
    /// VMs that should be sending: the health view lists them even if never seen.
    #[serde(default)]
    pub expected_vms: Vec<String>,
    /// Per-VM overrides.
    #[serde(default)]
    pub vm: BTreeMap<String, VmOverride>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmOverride {
    pub quota: Option<ByteSize>,
    pub retention_days: Option<u64>,
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
    for vm in c.expected_vms.iter().chain(c.vm.keys()) {
        qlog_rpc::descriptor::validate_vm_name(vm)
            .map_err(|e| format!("in expected_vms or [vm.{vm}]: {e}"))?;
    }
    if c.max_connections == Some(0) || c.max_connections_per_vm == Some(0) {
        return Err("max_connections and max_connections_per_vm must be at least 1".into());
    }
    if c.handshake_timeout_secs == Some(0) {
        return Err("handshake_timeout_secs must be at least 1".into());
    }
    if c.retention_days == Some(0) || c.vm.values().any(|v| v.retention_days == Some(0)) {
        return Err("retention_days must be at least 1".into());
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
    fn byte_units() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 1_610_612_736);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert!(parse_bytes("5 parsecs").is_err());
    }
}
