//! `qlog bundle verify` and `qlog bundle inspect`: reading a bundle back. Owns the
//! checks a receiver can make without the key: every entry's hash and size against the
//! manifest, nothing missing and nothing extra, the record counts against the JSON-lines
//! files, and the leak re-scan with the rules the manifest names.
//!
//! What verify cannot know, it does not claim: the VM names and the operator's keywords
//! never leave the log qube, so the re-scan on the receiving side uses the built-in
//! detectors and the manifest's allowlists only (plus a rules file, if the operator runs
//! verify with `--rules`). And the manifest is not signed: verify proves a bundle is
//! intact and consistent, not who made it. Every string read from a bundle is escaped
//! before it is printed, since a bundle is a file from elsewhere.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use super::archive;
use super::manifest::{self, Manifest};
use super::pseudonym::{hex, PseudonymKey};
use super::redact::Redactor;
use super::rules::Profile;
use crate::escape::escape_line;
use crate::vms::human_bytes;

/// Largest manifest read; a real one is a few KiB.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Longest line scanned as one; longer lines are scanned in pieces of this size, which
/// only a file no export writes has.
const MAX_LINE: usize = 64 << 20;

fn esc(s: &str) -> String {
    escape_line(s.as_bytes()).into_owned()
}

/// How an entry is scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Export,
    Text,
}

/// A reader that hashes and counts what passes through it.
struct Counted<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    lines: u64,
}

impl<R> Counted<R> {
    fn new(inner: R) -> Counted<R> {
        Counted { inner, hasher: Sha256::new(), bytes: 0, lines: 0 }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(n)
    }
}

/// Calls `check` on every line (at most [`MAX_LINE`] bytes at a time).
fn scan_lines(reader: &mut impl BufRead, mut check: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.take(MAX_LINE as u64).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        check(&line);
    }
}

/// Calls `check` on every value of a journal export file (the export's own reading of
/// [`super::export`]'s output, too), except the `_BOOT_ID` that the export generates as
/// each entry's third field from the VM's bundle name (no VM's own boot ID is exported).
/// Field names are qlog's and the profile's, not data, and are left out. Binary-framed
/// values are read by their length, so a value holding newlines cannot pass for the next
/// field; a line that is no field at all is checked whole.
pub(super) fn scan_export(
    reader: &mut impl BufRead,
    check: &mut impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let is_name = |n: &[u8]| {
        !n.is_empty()
            && n.iter().all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    };
    let mut line = Vec::new();
    let mut field = 0usize;
    loop {
        line.clear();
        if reader.take(MAX_LINE as u64).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if line == b"\n" {
            field = 0;
            continue;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        match text.iter().position(|&b| b == b'=') {
            Some(eq) if is_name(&text[..eq]) => {
                if !(field == 2 && &text[..eq] == b"_BOOT_ID") {
                    check(&text[eq + 1..]);
                }
            }
            None if is_name(text) && line.ends_with(b"\n") => {
                let mut len = [0u8; 8];
                reader.read_exact(&mut len)?;
                let len = u64::from_le_bytes(len).min(MAX_LINE as u64);
                let mut value = Vec::new();
                reader.take(len + 1).read_to_end(&mut value)?;
                check(&value);
            }
            _ => check(&line),
        }
        field += 1;
    }
}

/// What verify learned about one entry.
struct Seen {
    sha256: String,
    bytes: u64,
    lines: u64,
}

pub fn verify(
    file: &Path,
    identity: Option<&Path>,
    rules: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let mut archive = archive::open(file, identity)?;
    let mut entries = archive
        .entries()
        .with_context(|| format!("{} is not a readable tar archive", file.display()))?;
    let manifest = read_manifest(&mut entries, file)?;
    let scanner = if manifest.redaction.enabled {
        let mut profile = Profile::load(rules)?;
        profile.domains = manifest.redaction.domains_kept.clone();
        profile.vms = manifest.redaction.vms_kept.iter().cloned().collect();
        // No VM names: they never leave the log qube. Any key will do, since the scan
        // only asks whether something would change.
        let mut r = Redactor::new(profile, &PseudonymKey::random()?, std::iter::empty());
        r.add_token_prefixes(&manifest.redaction.token_prefixes);
        Some(r)
    } else {
        None
    };

    let mut problems: Vec<String> = Vec::new();
    let mut scratch = Vec::new();
    let mut hashes: Vec<&[u8]> = manifest.files.values().map(|f| f.sha256.as_bytes()).collect();
    // Chain heads are hex too, and no more a secret than the file hashes.
    for chain in manifest.vms.iter().filter_map(|v| v.chain.as_ref()) {
        hashes.extend([chain.head.as_bytes(), chain.anchor.as_bytes()]);
    }
    if let Some(r) = &scanner {
        let bytes = manifest.to_bytes();
        for line in bytes.split(|&b| b == b'\n') {
            if let Some(rule) = r.leak(line, true, &hashes, &mut scratch) {
                problems.push(format!(
                    "{}: rule {} matches after redaction",
                    manifest::MANIFEST_PATH,
                    r.rule_name(rule)
                ));
                break;
            }
        }
    }

    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    for entry in entries {
        let entry = entry.with_context(|| {
            format!("{} is damaged: cannot read the next entry", file.display())
        })?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            problems.push(format!("{}: not a regular file", esc(&path)));
            continue;
        }
        if path == manifest::MANIFEST_PATH || seen.contains_key(&path) {
            problems.push(format!("{}: appears twice", esc(&path)));
            continue;
        }
        let kind = if path.ends_with(".export") {
            Kind::Export
        } else if path.ends_with(".json") || path.ends_with(".jsonl") {
            Kind::Json
        } else {
            Kind::Text
        };
        let mut reader = BufReader::with_capacity(256 * 1024, Counted::new(entry));
        let mut leak: Option<String> = None;
        let mut check = |text: &[u8], json: bool| {
            if let (Some(r), None) = (&scanner, &leak) {
                leak = r.leak(text, json, &hashes, &mut scratch).map(|rule| r.rule_name(rule));
            }
        };
        let read = match kind {
            Kind::Export => scan_export(&mut reader, &mut |v| check(v, false)),
            Kind::Json | Kind::Text => scan_lines(&mut reader, |l| check(l, kind == Kind::Json)),
        };
        // Whatever the scan did not read still counts for the hash.
        let read = read.and_then(|()| std::io::copy(&mut reader, &mut std::io::sink()).map(drop));
        if let Err(e) = read {
            return Err(e).with_context(|| {
                format!("{} is damaged: cannot read {}", file.display(), esc(&path))
            });
        }
        if let Some(rule) = leak {
            problems.push(format!(
                "{}: rule {rule} matches after redaction (a value was not redacted)",
                esc(&path)
            ));
        }
        let counted = reader.into_inner();
        let (hasher, bytes, lines) = (counted.hasher, counted.bytes, counted.lines);
        seen.insert(path, Seen { sha256: hex(&hasher.finalize()), bytes, lines });
    }

    for (path, listed) in &manifest.files {
        match seen.get(path) {
            None => problems.push(format!("{}: listed in the manifest but missing", esc(path))),
            Some(s) if s.sha256 != listed.sha256 || s.bytes != listed.bytes => {
                problems.push(format!(
                    "{}: does not match the manifest (SHA-256 or size: changed after export)",
                    esc(path)
                ))
            }
            Some(_) => {}
        }
    }
    for path in seen.keys().filter(|p| !manifest.files.contains_key(*p)) {
        problems.push(format!("{}: not listed in the manifest", esc(path)));
    }
    for required in [manifest::VMS_PATH, manifest::REPORT_PATH] {
        if !manifest.files.contains_key(required) {
            problems.push(format!("{required}: missing from the manifest"));
        }
    }
    let mut total = 0;
    for vm in &manifest.vms {
        total += vm.records;
        match seen.get(&vm.events_file) {
            Some(s) if s.lines != vm.records => problems.push(format!(
                "{}: has {} lines, the manifest says {} records",
                esc(&vm.events_file),
                s.lines,
                vm.records
            )),
            Some(_) => {}
            None if manifest.files.contains_key(&vm.events_file) => {}
            None => problems.push(format!(
                "{}: the events file of {} is missing",
                esc(&vm.events_file),
                esc(&vm.name)
            )),
        }
        if let Some(export) = &vm.export_file {
            if !seen.contains_key(export) && !manifest.files.contains_key(export) {
                problems.push(format!(
                    "{}: the export file of {} is missing",
                    esc(export),
                    esc(&vm.name)
                ));
            }
        }
    }
    if total != manifest.records {
        problems.push(format!(
            "{}: the VMs' records add up to {total}, not {}",
            manifest::MANIFEST_PATH,
            manifest.records
        ));
    }

    if problems.is_empty() {
        println!(
            "{}: OK: {} files match the manifest, {} records from {} VMs{}",
            file.display(),
            seen.len() + 1,
            manifest.records,
            manifest.vms.len(),
            if scanner.is_some() {
                ", no leak found by the re-scan"
            } else {
                "; NOT redacted (--no-redact), so no leak scan"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        eprintln!("qlog: {p}");
    }
    bail!(
        "{} failed verification: {} problem{}",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    )
}

pub fn inspect(file: &Path, identity: Option<&Path>) -> anyhow::Result<ExitCode> {
    let encrypted = archive::is_encrypted(file)?;
    let mut archive = archive::open(file, identity)?;
    let mut entries = archive
        .entries()
        .with_context(|| format!("{} is not a readable tar archive", file.display()))?;
    let m = read_manifest(&mut entries, file)?;

    println!("bundle:   {}{}", file.display(), if encrypted { " (age-encrypted)" } else { "" });
    println!(
        "format:   {} version {}, made by qlog {} at {}",
        esc(&m.format),
        m.format_version,
        esc(&m.qlog_version),
        esc(&m.created_at)
    );
    println!(
        "records:  {} from {} VMs, {} to {}",
        m.records,
        m.vms.len(),
        time(m.time_range.first_usec),
        time(m.time_range.last_usec)
    );
    if m.time_range.since_usec.is_some() || m.time_range.until_usec.is_some() {
        println!(
            "asked:    since {} until {}",
            time(m.time_range.since_usec),
            time(m.time_range.until_usec)
        );
    }
    if let Some((lo, hi)) = m.selection.priority {
        println!("priority: {lo}..{hi}");
    }
    if !m.selection.filters.is_empty() {
        println!("filters:  {}", esc(&m.selection.filters.join(", ")));
    }
    println!("VMs:");
    for vm in &m.vms {
        println!(
            "  {:<24} {:>10} records ({} gaps), {} to {}",
            esc(&vm.name),
            vm.records,
            vm.gaps,
            time(vm.first_usec),
            time(vm.last_usec)
        );
        if let Some(c) = &vm.chain {
            println!(
                "  {:<24} chain head {} (position {}), anchor {} (position {})",
                "",
                esc(&c.head),
                c.length as i128 - 1,
                esc(&c.anchor),
                c.trimmed as i128 - 1
            );
        }
    }
    let r = &m.redaction;
    if r.enabled {
        println!(
            "redaction: profile {}{}, key {} (id {}), {} fields exported, {} values dropped, {}",
            esc(&r.profile),
            if r.rules_file { " (rules file)" } else { "" },
            esc(&r.key),
            esc(&r.key_id),
            r.fields_exported.len(),
            r.fields_dropped,
            format_args!(
                "{} token collisions, leak scan {}",
                r.token_collisions,
                esc(&r.leak_scan)
            )
        );
        println!("rules fired:");
        if r.rules.is_empty() {
            println!("  none");
        }
        for rule in &r.rules {
            println!(
                "  {:<24} {:>10} replaced {:>8} distinct",
                esc(&rule.rule),
                rule.replaced,
                rule.distinct
            );
        }
    } else {
        println!("redaction: OFF (--no-redact): the bundle holds every field as stored");
    }
    println!("files:");
    for (path, f) in &m.files {
        println!("  {:<40} {:>10}  sha256 {}", esc(path), human_bytes(f.bytes), esc(&f.sha256));
    }
    Ok(ExitCode::SUCCESS)
}

fn time(usec: Option<u64>) -> String {
    usec.and_then(|u| chrono::DateTime::from_timestamp_micros(u as i64))
        .map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// The first entry, which must be the manifest.
fn read_manifest<R: Read>(
    entries: &mut tar::Entries<'_, R>,
    file: &Path,
) -> anyhow::Result<Manifest> {
    let first = entries
        .next()
        .with_context(|| format!("{} holds no entries: it is not a qlog bundle", file.display()))?
        .with_context(|| format!("{} is damaged: cannot read its first entry", file.display()))?;
    let path = String::from_utf8_lossy(&first.path_bytes()).into_owned();
    if path != manifest::MANIFEST_PATH {
        bail!(
            "{} starts with {}, not {}: not a qlog bundle, or of a version this qlog cannot read",
            file.display(),
            esc(&path),
            manifest::MANIFEST_PATH
        );
    }
    let mut bytes = Vec::new();
    first
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{} is damaged: cannot read its manifest", file.display()))?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("the manifest of {} is not valid", file.display()))?;
    if m.format != manifest::FORMAT || m.format_version != manifest::FORMAT_VERSION {
        bail!(
            "{} is a {} version {} bundle; this qlog reads {} version {} (use a matching qlog)",
            file.display(),
            esc(&m.format),
            m.format_version,
            manifest::FORMAT,
            manifest::FORMAT_VERSION
        );
    }
    if m.to_bytes() != bytes {
        // Not fatal: a manifest rewritten by hand still says what it says. But the
        // hashes it lists are only as good as the manifest, so say so.
        eprintln!("qlog: note: the manifest of {} was edited after export", file.display());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(export: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut reader = export;
        scan_export(&mut reader, &mut |v| out.push(String::from_utf8_lossy(v).into_owned()))
            .unwrap();
        out
    }

    #[test]
    fn export_scan_reads_values_by_their_framing() {
        let mut entry = b"__REALTIME_TIMESTAMP=1\n__MONOTONIC_TIMESTAMP=0\n".to_vec();
        entry.extend_from_slice(b"_BOOT_ID=0123456789abcdef0123456789abcdef\nMESSAGE\n");
        let value = b"two\n\n_BOOT_ID=4f8b2c9e1d3a4b5c8e7f6a5b4c3d2e1f\nlines";
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
        entry.extend_from_slice(value);
        entry.extend_from_slice(b"\nPRIORITY=3\n\n");
        let seen = values(&entry);
        // The generated boot ID is skipped; the one inside a value is not.
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(!seen.iter().any(|v| v.contains("0123456789abcdef")));
        assert!(seen[2].contains("4f8b2c9e1d3a4b5c8e7f6a5b4c3d2e1f"));
        assert_eq!(seen[3], "3");
    }

    #[test]
    fn a_line_that_is_no_field_is_scanned_whole() {
        assert_eq!(values(b"not a field: 10.0.0.1\n"), ["not a field: 10.0.0.1\n"]);
    }
}
