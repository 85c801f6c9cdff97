//! `qlog vms`, and the "did you mean" help for VM names qlogd does not know.

use std::path::Path;
use std::process::ExitCode;

use anyhow::anyhow;
use qlog_rpc::query::VmInfo;

use crate::client::Client;
use crate::escape::escape_line;
use crate::output::{format_time, Format};

pub fn show(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let reply = Client::vms(socket)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply).expect("replies serialise"));
        return Ok(ExitCode::SUCCESS);
    }
    if reply.vms.is_empty() {
        println!("no VM has sent events yet");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<31} {:<10} {:<4} {:<15} {:<15} {:>10} {:>9} {:>6} {:>9} {:>9} {:>8}  STREAMS",
        "VM",
        "HEALTH",
        "CONN",
        "FIRST SEEN",
        "LAST SEEN",
        "EVENTS",
        "STORED",
        "QUOTA",
        "REFUSED",
        "DROPPED",
        "REJECTED"
    );
    for vm in &reply.vms {
        println!("{}", row(vm));
        for reason in &vm.health.reasons {
            println!("    {}: {}", vm.health.state.as_str(), escape_line(reason.as_bytes()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn row(vm: &VmInfo) -> String {
    let quota = if vm.quota_bytes == 0 {
        0.0
    } else {
        vm.bytes_stored as f64 * 100.0 / vm.quota_bytes as f64
    };
    let streams: Vec<String> = vm
        .streams
        .iter()
        .map(|s| format!("{}{}", s.name, if s.connected { "*" } else { "" }))
        .collect();
    format!(
        "{:<31} {:<10} {:<4} {:<15} {:<15} {:>10} {:>9} {:>5.1}% {:>9} {:>9} {:>8}  {}",
        escape_line(vm.vm.as_bytes()),
        vm.health.state.as_str(),
        if vm.connected { "yes" } else { "no" },
        seen(vm.first_seen_usec),
        seen(vm.last_seen_usec),
        vm.events_stored,
        human_bytes(vm.bytes_stored),
        quota,
        // Refused by the rate limit: never stored, unlike DROPPED (removed later).
        vm.events_refused_rate,
        vm.events_dropped_quota + vm.events_expired,
        vm.frames_rejected,
        streams.join(",")
    )
}

fn seen(usec: u64) -> String {
    if usec == 0 {
        "-".to_owned()
    } else {
        format_time(usec, Format::Short)
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Replaces qlogd's "unknown VM" error with the nearest known names.
pub fn unknown_vm_error(socket: &Path, asked: &[String], original: anyhow::Error) -> anyhow::Error {
    let Ok(reply) = Client::vms(socket) else { return original };
    let known: Vec<&str> = reply.vms.iter().map(|v| v.vm.as_str()).collect();
    let unknown: Vec<&String> = asked.iter().filter(|a| !known.contains(&a.as_str())).collect();
    let mut parts = Vec::new();
    for name in unknown {
        let mut near: Vec<(usize, &str)> =
            known.iter().map(|k| (edit_distance(name, k), *k)).filter(|(d, _)| *d <= 3).collect();
        near.sort();
        match near.first() {
            Some((_, best)) => parts.push(format!("unknown VM {name:?}: did you mean {best}?")),
            None => parts.push(format!("unknown VM {name:?}")),
        }
    }
    anyhow!("{} (qlog vms lists the {} known VMs)", parts.join("; "), known.len())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_finds_typos() {
        assert_eq!(edit_distance("sd-ap", "sd-app"), 1);
        assert_eq!(edit_distance("sd-app", "sd-app"), 0);
        assert_eq!(edit_distance("work", "sd-proxy"), 7);
    }

    #[test]
    fn bytes_are_human_readable() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
