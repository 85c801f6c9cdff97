//! A deterministic workload generator shared by tests, benchmarks and `qlog demo`.
//!
//! From a seed and a VM name it produces journald-like entries with the fields a real
//! Qubes VM's journal carries (cursor, timestamps, boot and machine IDs, unit, PID, ...),
//! a realistic mix of priorities, multi-line messages, binary and invalid-UTF-8 values,
//! and values that look sensitive (addresses, onion services, home paths, keys) for the
//! redaction tests. The same seed always gives the same entries, byte for byte, so a
//! benchmark's peers are fed exactly the same stream.

use std::io::Write;

use qlog_rpc::Event;

/// A small, fast, deterministic PRNG (SplitMix64); statistical quality is irrelevant here.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn hex(&mut self, len: usize) -> String {
        (0..len).map(|_| char::from(b"0123456789abcdef"[self.below(16) as usize])).collect()
    }
}

struct Unit {
    unit: &'static str,
    ident: &'static str,
    comm: &'static str,
    exe: &'static str,
    uid: u32,
}

const UNITS: &[Unit] = &[
    Unit {
        unit: "qubes-qrexec-agent.service",
        ident: "qrexec-agent",
        comm: "qrexec-agent",
        exe: "/usr/lib/qubes/qrexec-agent",
        uid: 0,
    },
    Unit {
        unit: "securedrop-client.service",
        ident: "securedrop-client",
        comm: "python3",
        exe: "/usr/bin/python3.11",
        uid: 1000,
    },
    Unit { unit: "tor.service", ident: "Tor", comm: "tor", exe: "/usr/bin/tor", uid: 107 },
    Unit {
        unit: "systemd-logind.service",
        ident: "systemd-logind",
        comm: "systemd-logind",
        exe: "/lib/systemd/systemd-logind",
        uid: 0,
    },
    Unit { unit: "cups.service", ident: "cupsd", comm: "cupsd", exe: "/usr/sbin/cupsd", uid: 0 },
    Unit {
        unit: "qubes-gui-agent.service",
        ident: "qubes-gui",
        comm: "qubes-gui",
        exe: "/usr/bin/qubes-gui",
        uid: 0,
    },
    Unit {
        unit: "NetworkManager.service",
        ident: "NetworkManager",
        comm: "NetworkManager",
        exe: "/usr/sbin/NetworkManager",
        uid: 0,
    },
    Unit { unit: "session-1.scope", ident: "sudo", comm: "sudo", exe: "/usr/bin/sudo", uid: 1000 },
];

/// Generates one VM's journal.
#[derive(Debug, Clone)]
pub struct Workload {
    rng: Rng,
    vm: String,
    boot_id: String,
    machine_id: String,
    seqnum_id: String,
    seqnum: u64,
    realtime_usec: u64,
    monotonic_usec: u64,
    /// Multiplies the gap between entries: 1 by default (some 800 entries a second).
    spacing: u64,
}

impl Workload {
    pub fn new(seed: u64, vm: &str) -> Workload {
        let mut rng = Rng::new(seed ^ fnv(vm.as_bytes()));
        let boot_id = rng.hex(32);
        let machine_id = rng.hex(32);
        let seqnum_id = rng.hex(32);
        Workload {
            rng,
            vm: vm.to_owned(),
            boot_id,
            machine_id,
            seqnum_id,
            seqnum: 0,
            // 2026-12-03 00:00:00 UTC: fixed, so the output does not depend on the clock.
            realtime_usec: 1_796_256_000_000_000,
            monotonic_usec: 5_000_000,
            spacing: 1,
        }
    }

    /// The next entry, with every field journald would give it.
    pub fn next_event(&mut self) -> Event {
        self.seqnum += 1;
        let step = (200 + self.rng.below(2000)) * self.spacing;
        self.realtime_usec += step;
        self.monotonic_usec += step;
        let rng = &mut self.rng;
        let unit = rng.pick(UNITS);
        let pid = 300 + rng.below(4000);
        let roll = rng.below(100);
        let (priority, message): (u8, Vec<u8>) = match roll {
            0..=59 => (6, info_message(rng).into_bytes()),
            60..=69 => (
                7,
                format!(
                    "debug: poll loop woke after {} ms, {} fds ready",
                    rng.below(500),
                    rng.below(8)
                )
                .into_bytes(),
            ),
            70..=79 => (5, format!("Started session {} of user user.", rng.below(90)).into_bytes()),
            80..=87 => (4, warning_message(rng).into_bytes()),
            88..=93 => (3, error_message(rng).into_bytes()),
            94..=96 => (3, multiline_trace(rng).into_bytes()),
            97 => (6, invalid_utf8_message(rng)),
            _ => (6, sensitive_message(rng).into_bytes()),
        };
        let mut e = Event::new();
        e.push(
            "__CURSOR",
            format!(
                "s={};i={:x};b={};m={:x};t={:x};x={}",
                self.seqnum_id,
                self.seqnum,
                self.boot_id,
                self.monotonic_usec,
                self.realtime_usec,
                rng.hex(16)
            ),
        );
        e.push("__REALTIME_TIMESTAMP", self.realtime_usec.to_string());
        e.push("__MONOTONIC_TIMESTAMP", self.monotonic_usec.to_string());
        e.push("_BOOT_ID", self.boot_id.clone());
        e.push("_MACHINE_ID", self.machine_id.clone());
        e.push("_HOSTNAME", self.vm.clone());
        e.push("PRIORITY", priority.to_string());
        e.push("SYSLOG_FACILITY", if unit.uid == 0 { "3" } else { "1" });
        e.push("SYSLOG_IDENTIFIER", unit.ident);
        e.push("_TRANSPORT", *rng.pick(&["journal", "stdout", "syslog"]));
        e.push("_PID", pid.to_string());
        e.push("_UID", unit.uid.to_string());
        e.push("_GID", unit.uid.to_string());
        e.push("_COMM", unit.comm);
        e.push("_EXE", unit.exe);
        e.push("_CMDLINE", format!("{} --verbose", unit.exe));
        e.push("_CAP_EFFECTIVE", if unit.uid == 0 { "1ffffffffff" } else { "0" });
        e.push("_SYSTEMD_CGROUP", format!("/system.slice/{}", unit.unit));
        e.push("_SYSTEMD_UNIT", unit.unit);
        e.push("_SYSTEMD_SLICE", "system.slice");
        e.push("_SYSTEMD_INVOCATION_ID", rng.hex(32));
        e.push("_SOURCE_REALTIME_TIMESTAMP", (self.realtime_usec - rng.below(150)).to_string());
        if roll == 99 {
            // A binary field, as a coredump or a native-protocol client can send.
            let blob: Vec<u8> = (0..16 + rng.below(48)).map(|_| rng.below(256) as u8).collect();
            e.push("BINARY_BLOB", blob);
        }
        e.push("MESSAGE", message);
        e
    }

    /// Moves the generated clock, e.g. to now for a live demo; entries stay deterministic
    /// given the same start.
    pub fn starting_at(mut self, realtime_usec: u64) -> Workload {
        self.realtime_usec = realtime_usec;
        self
    }

    /// Spreads the entries `factor` times further apart in time, e.g. so that a
    /// benchmark's store spans days; the entries are otherwise the same.
    pub fn spaced(mut self, factor: u64) -> Workload {
        self.spacing = factor.max(1);
        self
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }
}

fn info_message(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => format!(
            "Accepted connection from qube {} on service qubes.Filecopy",
            rng.pick(&["sd-viewer", "sd-devices", "sd-proxy"])
        ),
        1 => format!(
            "Synced {} sources and {} replies in {} ms",
            rng.below(40),
            rng.below(200),
            rng.below(3000)
        ),
        2 => format!("GET /api/v1/sources/{} 200 {} bytes", rng.hex(8), rng.below(100_000)),
        3 => format!(
            "pam_unix(sudo:session): session opened for user root(uid=0) by user(uid={})",
            1000 + rng.below(3)
        ),
        4 => format!("Bootstrapped {}% (conn_done): Connected to a relay", rng.below(101)),
        _ => format!("Reloading configuration, {} entries", rng.below(500)),
    }
}

fn warning_message(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => format!("Retrying request after timeout ({} of 5)", 1 + rng.below(5)),
        1 => format!("Clock skew detected: {} seconds", rng.below(120)),
        _ => format!("low disk space on /rw: {} MiB free", rng.below(512)),
    }
}

fn error_message(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => format!("Failed to export file {}: Permission denied", rng.hex(12)),
        1 => format!("qrexec: service qubes.OpenInVM refused (exit {})", 126 + rng.below(2)),
        _ => "sd-log: connection to log qube lost".to_owned(),
    }
}

fn multiline_trace(rng: &mut Rng) -> String {
    let depth = 2 + rng.below(6);
    let mut s = "Traceback (most recent call last):\n".to_owned();
    for i in 0..depth {
        s.push_str(&format!("  File \"/opt/venvs/securedrop-client/lib/python3.11/site-packages/securedrop_client/logic.py\", line {}, in call_{i}\n", 100 + rng.below(900)));
    }
    s.push_str("sqlalchemy.exc.OperationalError: database is locked");
    s
}

fn invalid_utf8_message(rng: &mut Rng) -> Vec<u8> {
    let mut m = b"device name: ".to_vec();
    m.extend((0..8).map(|_| 0x80 + rng.below(0x40) as u8));
    m.extend_from_slice(b" \x1b[31mred\x1b[0m \xe2\x80\xae reversed");
    m
}

fn sensitive_message(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => format!(
            "connecting to 10.137.0.{} port 443 from fe80::{}:{}",
            rng.below(255),
            rng.hex(4),
            rng.hex(4)
        ),
        1 => format!(
            "submission from http://{}.onion/submit",
            rng.hex(56).replace(['0', '1', '8', '9'], "a")
        ),
        2 => format!(
            "opened /home/{}/QubesIncoming/sd-app/{}.pdf",
            rng.pick(&["alice", "bob", "journalist"]),
            rng.hex(6)
        ),
        3 => format!("mail to {}@example.org bounced", rng.pick(&["jdoe", "editor", "news.desk"])),
        4 => format!(
            "signing key fingerprint {} uuid {}-{}-4{}-a{}-{}",
            rng.hex(40).to_uppercase(),
            rng.hex(8),
            rng.hex(4),
            rng.hex(3),
            rng.hex(3),
            rng.hex(12)
        ),
        _ => format!(
            "token=ghp_{} mac {}:{}:{}:{}:{}:{}",
            rng.hex(36),
            rng.hex(2),
            rng.hex(2),
            rng.hex(2),
            rng.hex(2),
            rng.hex(2),
            rng.hex(2)
        ),
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// True if a value must use the export format's binary framing.
fn needs_binary_framing(value: &[u8]) -> bool {
    value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        || std::str::from_utf8(value).is_err()
}

/// Writes one entry in the journal export format.
pub fn write_export(event: &Event, out: &mut impl Write) -> std::io::Result<()> {
    for f in &event.fields {
        out.write_all(f.name.as_bytes())?;
        if needs_binary_framing(&f.value) {
            out.write_all(b"\n")?;
            out.write_all(&(f.value.len() as u64).to_le_bytes())?;
            out.write_all(&f.value)?;
        } else {
            out.write_all(b"=")?;
            out.write_all(&f.value)?;
        }
        out.write_all(b"\n")?;
    }
    out.write_all(b"\n")
}

/// Writes one entry as journalctl's JSON: strings, or byte arrays for non-UTF-8 values.
pub fn write_json(event: &Event, out: &mut impl Write) -> std::io::Result<()> {
    let mut map = serde_json::Map::new();
    for f in &event.fields {
        let v = match std::str::from_utf8(&f.value) {
            Ok(s) => serde_json::Value::String(s.to_owned()),
            Err(_) => serde_json::Value::Array(f.value.iter().map(|b| (*b).into()).collect()),
        };
        map.insert(f.name.clone(), v);
    }
    serde_json::to_writer(&mut *out, &map)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_vms_differ() {
        let a: Vec<Event> = {
            let mut w = Workload::new(7, "sd-app");
            (0..100).map(|_| w.next_event()).collect()
        };
        let b: Vec<Event> = {
            let mut w = Workload::new(7, "sd-app");
            (0..100).map(|_| w.next_event()).collect()
        };
        let c: Vec<Event> = {
            let mut w = Workload::new(7, "sd-proxy");
            (0..100).map(|_| w.next_event()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn mix_has_multiline_binary_and_every_priority_class() {
        let mut w = Workload::new(1, "sd-app");
        let events: Vec<Event> = (0..5000).map(|_| w.next_event()).collect();
        assert!(events.iter().any(|e| e.get("MESSAGE").is_some_and(|m| m.contains(&b'\n'))));
        assert!(events.iter().any(|e| e.get("BINARY_BLOB").is_some()));
        assert!(events
            .iter()
            .any(|e| e.get("MESSAGE").is_some_and(|m| std::str::from_utf8(m).is_err())));
        for p in ["3", "4", "5", "6", "7"] {
            assert!(events.iter().any(|e| e.get_str("PRIORITY") == Some(p)), "priority {p}");
        }
    }

    #[test]
    fn export_framing_is_binary_only_where_needed() {
        let mut e = Event::new();
        e.push("A", "plain");
        e.push("B", "two\nlines");
        let mut out = Vec::new();
        write_export(&e, &mut out).unwrap();
        let expected =
            [b"A=plain\nB\n".as_slice(), &9u64.to_le_bytes(), b"two\nlines\n\n"].concat();
        assert_eq!(out, expected);
    }
}
