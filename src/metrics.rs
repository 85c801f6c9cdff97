//! `qlog metrics`: the current per-VM values in OpenMetrics text format, for a local
//! textfile collector. Nothing is served or sent anywhere: it prints and exits.
//!
//! Totals come from qlogd's VM table; the latest gauges and the last complete minute's
//! counts come from the rollups. Label values are escaped as the format requires (VM
//! names are validated qube names, but the escaping does not rely on it).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use qlog_rpc::query::{HealthState, StatsQuery, VmInfo};
use qlog_rpc::telemetry::{Rollup, GAUGES, PRIORITY_NAMES};

use crate::client::Client;

/// How far back the latest gauge value may be and still count as current.
const GAUGE_WINDOW_USEC: u64 = 10 * 60_000_000;

const STATES: [HealthState; 6] = [
    HealthState::Ok,
    HealthState::NeverSeen,
    HealthState::Silent,
    HealthState::Flooding,
    HealthState::Lagging,
    HealthState::Gaps,
];

pub fn show(socket: &Path) -> anyhow::Result<ExitCode> {
    let vms = Client::vms(socket)?.vms;
    let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
    let stats = Client::stats(
        socket,
        StatsQuery {
            vms: Vec::new(),
            since_usec: now.saturating_sub(GAUGE_WINDOW_USEC),
            until_usec: now + 1,
            bucket_minutes: 1,
            gauges: Vec::new(),
        },
    )?;
    let latest: Vec<(String, Rollup, Option<Rollup>)> = stats
        .into_iter()
        .map(|s| {
            // The newest bucket is the minute still filling; the one before it is whole.
            let mut gauges = Rollup::default();
            for (_, r) in &s.buckets {
                gauges.merge(r);
            }
            let whole = s.buckets.iter().rev().nth(1).map(|b| b.1.clone());
            (s.vm, gauges, whole)
        })
        .collect();
    print!("{}", render(&vms, &latest));
    Ok(ExitCode::SUCCESS)
}

/// The whole exposition, ending in `# EOF`.
pub fn render(vms: &[VmInfo], latest: &[(String, Rollup, Option<Rollup>)]) -> String {
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, unit: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            if !unit.is_empty() {
                let _ = writeln!(out, "# UNIT {name} {unit}");
            }
            let _ = writeln!(out, "# HELP {name} {help}");
            let sample = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            for (labels, value) in rows {
                let _ = writeln!(out, "{sample}{{{labels}}} {value}");
            }
        };
    let per_vm = |f: &dyn Fn(&VmInfo) -> u64| -> Vec<(String, String)> {
        vms.iter().map(|v| (vm_label(&v.vm), f(v).to_string())).collect()
    };
    family(
        "qlog_vm_events_stored",
        "gauge",
        "Events stored now.",
        "",
        per_vm(&|v| v.events_stored),
    );
    family(
        "qlog_vm_stored_bytes",
        "gauge",
        "Bytes stored now, as the quota counts them.",
        "bytes",
        per_vm(&|v| v.bytes_stored),
    );
    family("qlog_vm_quota_bytes", "gauge", "The VM's quota.", "bytes", per_vm(&|v| v.quota_bytes));
    family(
        "qlog_vm_events_dropped_quota",
        "counter",
        "Events removed because the VM was over its quota.",
        "",
        per_vm(&|v| v.events_dropped_quota),
    );
    family(
        "qlog_vm_events_expired",
        "counter",
        "Events removed by age-based retention.",
        "",
        per_vm(&|v| v.events_expired),
    );
    family(
        "qlog_vm_frames_rejected",
        "counter",
        "Frames or connections rejected as malformed.",
        "",
        per_vm(&|v| v.frames_rejected),
    );
    family(
        "qlog_vm_fields_quarantined",
        "counter",
        "Fields renamed because they used the sink-only prefix.",
        "",
        per_vm(&|v| v.fields_quarantined),
    );
    family(
        "qlog_vm_connected",
        "gauge",
        "1 if an ingest connection from the VM is open.",
        "",
        per_vm(&|v| u64::from(v.connected)),
    );
    family(
        "qlog_vm_expected",
        "gauge",
        "1 if qlogd's configuration lists the VM as expected.",
        "",
        per_vm(&|v| u64::from(v.expected)),
    );
    family(
        "qlog_vm_last_heard_seconds",
        "gauge",
        "When qlogd last heard anything from the VM (Unix time; 0 if never in this run).",
        "seconds",
        vms.iter().map(|v| (vm_label(&v.vm), seconds(v.health.last_heard_usec))).collect(),
    );
    let mut health_rows = Vec::new();
    for v in vms {
        for s in STATES {
            let labels = format!("{},qlog_vm_health=\"{}\"", vm_label(&v.vm), s.as_str());
            health_rows.push((labels, u64::from(v.health.state == s).to_string()));
        }
    }
    family("qlog_vm_health", "stateset", "The VM's health as qlogd judges it.", "", health_rows);

    let mut minute_rows = Vec::new();
    for (vm, _, whole) in latest {
        let Some(r) = whole else { continue };
        for (i, p) in PRIORITY_NAMES.iter().enumerate() {
            minute_rows
                .push((format!("{},priority=\"{p}\"", vm_label(vm)), r.events[i].to_string()));
        }
    }
    family(
        "qlog_vm_events_last_minute",
        "gauge",
        "Events stored in the last complete minute, by priority.",
        "",
        minute_rows,
    );
    for spec in GAUGES {
        let rows: Vec<(String, String)> = latest
            .iter()
            .filter_map(|(vm, gauges, _)| {
                let g = gauges.gauges.get(spec.name)?;
                Some((vm_label(vm), float(g.last)))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let name = format!("qlog_{}", spec.name);
        // OpenMetrics allows a UNIT only on a name that ends in it.
        let unit = if !spec.unit.is_empty() && name.ends_with(&format!("_{}", spec.unit)) {
            spec.unit
        } else {
            ""
        };
        family(
            &name,
            "gauge",
            &format!("Latest {} (reported by the VM, or by qlogd for sink_*).", spec.help),
            unit,
            rows,
        );
    }
    out.push_str("# EOF\n");
    out
}

fn vm_label(vm: &str) -> String {
    format!("vm=\"{}\"", escape_label(vm))
}

/// OpenMetrics label values: backslash, double quote and line feed are escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn seconds(usec: u64) -> String {
    float(usec as f64 / 1e6)
}

fn float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::Health;

    #[test]
    fn exposition_is_well_formed() {
        let vms = vec![VmInfo {
            vm: "sd-app".into(),
            events_stored: 5,
            connected: true,
            health: Health { state: HealthState::Silent, ..Health::default() },
            ..VmInfo::default()
        }];
        let mut r = Rollup::default();
        r.events[3] = 2;
        r.observe("load1", 0.5);
        let text = render(&vms, &[("sd-app".into(), r.clone(), Some(r))]);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("qlog_vm_events_stored{vm=\"sd-app\"} 5\n"));
        assert!(text.contains("qlog_vm_frames_rejected_total{vm=\"sd-app\"} 0\n"));
        assert!(text.contains("qlog_vm_health{vm=\"sd-app\",qlog_vm_health=\"silent\"} 1\n"));
        assert!(text.contains("qlog_vm_health{vm=\"sd-app\",qlog_vm_health=\"ok\"} 0\n"));
        assert!(text.contains("qlog_vm_events_last_minute{vm=\"sd-app\",priority=\"err\"} 2\n"));
        assert!(text.contains("qlog_load1{vm=\"sd-app\"} 0.5\n"));
        // Every sample line belongs to the family declared above it.
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_owned();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&family), "{line} outside {family}");
            }
        }
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
