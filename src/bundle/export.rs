//! `qlog export`: query qlogd, redact every record, write the bundle. Owns the order of
//! the work and the command's messages; the pieces are the sibling modules'.
//!
//! The work, in order: check the options (so a bad recipient or an existing map fails
//! before anything is read); create the hidden output file; read the VM table and the
//! events from qlogd, redacting each record as it arrives and spooling it to an
//! anonymous per-VM file while hashing it and scanning it for leaks; then write
//! `vms.json`, `report.html` and `manifest.json`, scanning each; assemble the archive
//! from the spools; and only then publish the map and the bundle. Records are not kept:
//! memory grows only with the number of distinct sensitive values (the token map) and
//! the report's tallies, which are bounded.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use qlog_rpc::fields;
use qlog_rpc::query::{Record, RecordKind, Request, VmsReply};
use sha2::{Digest, Sha256};

use super::archive::ArchiveWriter;
use super::cleanup::{remove_unpublished_on_signal, UnpublishedFile};
use super::manifest::{self, FileEntry, Manifest, RuleCount, TimeRange, VmEntry};
use super::pseudonym::{hex, PseudonymKey};
use super::redact::{Redactor, Rule};
use super::report::{ReportContext, ReportData};
use super::rules::{Profile, RESERVED_PREFIXES};
use super::ExportArgs;
use crate::cli::build_query;
use crate::client::{self, Client, Reply};
use crate::output::{Format, Printer};
use crate::{timespec, vms};

/// A file of the bundle being written: spooled to an anonymous temporary file (or
/// nowhere, for a dry run), hashed and counted as it goes.
struct Spool {
    /// Its path in the bundle.
    path: String,
    /// `None` for a dry run: the bytes are hashed and scanned, then dropped.
    writer: Option<BufWriter<File>>,
    hasher: Sha256,
    bytes: u64,
    lines: u64,
}

impl Spool {
    fn new(path: String, dir: Option<&Path>) -> anyhow::Result<Spool> {
        let writer = match dir {
            Some(dir) => {
                let file = tempfile::tempfile_in(dir).with_context(|| {
                    format!("cannot create a scratch file in {}", dir.display())
                })?;
                Some(BufWriter::with_capacity(256 * 1024, file))
            }
            None => None,
        };
        Ok(Spool { path, writer, hasher: Sha256::new(), bytes: 0, lines: 0 })
    }

    /// Appends whole lines, after scanning them for leaks with `scan` (JSON if `json`).
    fn append(&mut self, chunk: &[u8], scan: &mut Scanner<'_>, json: bool) -> anyhow::Result<()> {
        scan.check_masked(chunk, json, &self.path, &[])?;
        self.write(chunk)
    }

    fn write(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        self.lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        if let Some(w) = &mut self.writer {
            w.write_all(chunk).context("cannot write a scratch file (is the disk full?)")?;
        }
        Ok(())
    }

    /// Appends records in the journal export format, scanning their values as verify
    /// does.
    fn append_export(&mut self, chunk: &[u8], scan: &mut Scanner<'_>) -> anyhow::Result<()> {
        let mut leak = Ok(());
        let mut reader = chunk;
        super::verify::scan_export(&mut reader, &mut |value| {
            if leak.is_ok() {
                leak = scan.check_masked(value, false, &self.path, &[]);
            }
        })
        .expect("the export writer frames every field it writes");
        leak?;
        self.write(chunk)
    }

    /// Its manifest entry, and the spooled bytes rewound for reading.
    fn finish(self) -> anyhow::Result<(FileEntry, Option<File>)> {
        let entry = FileEntry { sha256: hex(&self.hasher.finalize()), bytes: self.bytes };
        let file = match self.writer {
            Some(w) => {
                let mut file =
                    w.into_inner().context("cannot write a scratch file (is the disk full?)")?;
                file.rewind().context("cannot reread a scratch file")?;
                Some(file)
            }
            None => None,
        };
        Ok((entry, file))
    }
}

/// The leak re-scan of everything written; a no-op for `--no-redact`.
struct Scanner<'a> {
    redactor: Option<&'a Redactor>,
    scratch: Vec<u8>,
}

impl Scanner<'_> {
    fn check_masked(
        &mut self,
        text: &[u8],
        json: bool,
        path: &str,
        masks: &[&[u8]],
    ) -> anyhow::Result<()> {
        let Some(redactor) = self.redactor else { return Ok(()) };
        if let Some(rule) = redactor.leak(text, json, masks, &mut self.scratch) {
            bail!(
                "leak check failed: rule {} still matches in {path} after redaction, so {}",
                redactor.rule_name(rule),
                "no bundle was written (please report the rule and file, never the value)"
            );
        }
        Ok(())
    }
}

/// Reads the events and sends them on, redacted, in batches; stops early, without an
/// error, when the spooling thread has stopped (it says why).
fn read_records(
    socket: &Path,
    query: &qlog_rpc::query::EventsQuery,
    mut redactor: Option<&mut Redactor>,
    batches: &std::sync::mpsc::SyncSender<Vec<Encoded>>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    const BATCH: usize = 256;
    let mut client = Client::connect(socket)?;
    client.send(&Request::Events(query.clone()))?;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let record = match client.next_reply() {
            Ok(Some(Reply::Record(r))) => r.to_record()?,
            Ok(Some(Reply::Done)) => break,
            Ok(Some(Reply::Lagged(_))) => continue,
            Ok(None) => {
                bail!("qlogd closed the stream before the export finished (was it stopped?)")
            }
            Err(e) if client::is_unknown_vm(&e) => {
                return Err(vms::unknown_vm_error(socket, &query.vms, e))
            }
            Err(e) => return Err(e),
        };
        let real_vm = record.vm.clone();
        let out_record = match &mut redactor {
            Some(r) => r.redact_record(record),
            None => record,
        };
        batch.push(Encoded { real_vm, record: out_record, json: None });
        if batch.len() == BATCH {
            progress.inc(BATCH as u64);
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if !send_balanced(batches, full)? {
                return Ok(());
            }
        }
    }
    progress.inc(batch.len() as u64);
    let _ = send_balanced(batches, batch)?;
    Ok(())
}

/// Sends a batch to the spooling thread; false if it has stopped. Encoding the JSON is
/// the one step either thread can do: when the spooling thread is behind (the channel is
/// full) this one does it for the batch, else the spooling thread does. Both write the
/// same bytes, so who did it never shows in the bundle.
fn send_balanced(
    batches: &std::sync::mpsc::SyncSender<Vec<Encoded>>,
    batch: Vec<Encoded>,
) -> anyhow::Result<bool> {
    use std::sync::mpsc::TrySendError;
    let mut batch = match batches.try_send(batch) {
        Ok(()) => return Ok(true),
        Err(TrySendError::Disconnected(_)) => return Ok(false),
        Err(TrySendError::Full(batch)) => batch,
    };
    for item in &mut batch {
        item.json = Some(encode_json(&item.record)?);
    }
    Ok(batches.send(batch).is_ok())
}

/// Exactly what `qlog query -o json` prints for the record.
fn encode_json(record: &Record) -> anyhow::Result<Vec<u8>> {
    let mut json = Vec::with_capacity(1024);
    JSON.print_record(record, &mut json).context("cannot encode a record")?;
    Ok(json)
}

/// A redacted record on its way to the spooling thread.
struct Encoded {
    /// The VM's real name, which the spools are kept by.
    real_vm: String,
    record: Record,
    /// Its line of JSON, if the reading thread had time to encode it.
    json: Option<Vec<u8>>,
}

/// What the spooling thread hands back.
struct Spooled {
    per_vm: BTreeMap<String, VmOut>,
    report: ReportData,
    scratch: Vec<u8>,
}

/// Scans each record's JSON line for leaks and spools it to its VM's file (and its
/// journal export, encoded here, to the other); gathers the report's figures on the way.
fn spool_records(
    batches: std::sync::mpsc::Receiver<Vec<Encoded>>,
    scan: Option<&Redactor>,
    dir: Option<&Path>,
    with_export: bool,
) -> anyhow::Result<Spooled> {
    let mut per_vm: BTreeMap<String, VmOut> = BTreeMap::new();
    let mut report = ReportData::default();
    let mut scanner = Scanner { redactor: scan, scratch: Vec::new() };
    let mut line = Vec::with_capacity(4096);
    for Encoded { real_vm, record: out_record, json } in batches.into_iter().flatten() {
        let vm_out = match per_vm.get_mut(&real_vm) {
            Some(v) => v,
            None => {
                let name = out_record.vm.clone();
                let events = Spool::new(format!("{}{name}.jsonl", manifest::EVENTS_DIR), dir)?;
                let export = with_export
                    .then(|| Spool::new(format!("{}{name}.export", manifest::EVENTS_DIR), dir))
                    .transpose()?;
                let vm = VmOut { name, events, export, gaps: 0, first_usec: None, last_usec: None };
                per_vm.entry(real_vm).or_insert(vm)
            }
        };

        let json = match json {
            Some(json) => json,
            None => encode_json(&out_record)?,
        };
        vm_out.events.append(&json, &mut scanner, true)?;
        // Exactly what `qlog query -o export` prints for the record.
        if let Some(export) = &mut vm_out.export {
            line.clear();
            EXPORT.print_record(&out_record, &mut line).context("cannot encode a record")?;
            export.append_export(&line, &mut scanner)?;
        }

        let t = out_record.received_usec;
        vm_out.first_usec = Some(vm_out.first_usec.map_or(t, |f| f.min(t)));
        vm_out.last_usec = Some(vm_out.last_usec.map_or(t, |l| l.max(t)));
        if out_record.kind == RecordKind::Gap {
            vm_out.gaps += 1;
        }
        let error = matches!(out_record.event.get(fields::PRIORITY), Some([b'0'..=b'3']))
            .then(|| out_record.event.get(fields::MESSAGE))
            .flatten()
            .map(String::from_utf8_lossy);
        report.add(&vm_out.name, t, error.as_deref());
    }
    Ok(Spooled { per_vm, report, scratch: scanner.scratch })
}

/// One VM's files and counts.
struct VmOut {
    name: String,
    events: Spool,
    export: Option<Spool>,
    gaps: u64,
    first_usec: Option<u64>,
    last_usec: Option<u64>,
}

pub fn run(socket: &Path, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    // Everything that can be refused is refused before anything is read or written.
    let recipients = args
        .encrypt_to
        .iter()
        .map(|r| {
            r.parse::<age::x25519::Recipient>().map_err(|e| {
                anyhow::anyhow!(
                    "--encrypt-to {r:?} is not an age recipient ({e}); it looks like age1..."
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let created_usec = created_at(args)?;
    let profile = Profile::load(args.rules.as_deref())?;
    let key = match &args.key_file {
        Some(path) => PseudonymKey::from_file(path)?,
        None => PseudonymKey::random()?,
    };
    if let Some(map) = &args.map_out {
        if map.exists() {
            bail!("{} already exists (remove it or choose another map path)", map.display());
        }
    }
    if args.dry_run && (args.output.is_some() || args.map_out.is_some()) {
        eprintln!("qlog: --dry-run writes nothing: -o and --map-out are ignored");
    }
    if args.no_redact {
        eprintln!(concat!(
            "qlog: warning: --no-redact: the bundle holds every field as stored, ",
            "VM names and secrets included; share it as you would this log qube"
        ));
    }
    let query = build_query(&args.filters, None, false, false)?;

    remove_unpublished_on_signal()?;
    let output = if args.dry_run { None } else { args.output.clone() };
    let mut bundle_file = output.as_deref().map(UnpublishedFile::create).transpose()?;
    let spool_dir: Option<PathBuf> = output.as_deref().map(|o| match o.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    });

    let vms_reply = Client::vms(socket)?;
    let mut redactor = (!args.no_redact)
        .then(|| Redactor::new(profile.clone(), &key, vms_reply.vms.iter().map(|v| v.vm.as_str())));
    if let Some(r) = &mut redactor {
        r.collect_examples = args.dry_run;
    }

    // The events. This thread reads and redacts; a second one scans, hashes and spools,
    // and whichever is ahead encodes the JSON ([`send_balanced`]), so the two keep both
    // cores busy. The channel is bounded: a slow disk slows the reading, never fills
    // memory. The second thread has its own copy of the rules for the scan.
    let scan_redactor = (!args.no_redact)
        .then(|| Redactor::new(profile.clone(), &key, vms_reply.vms.iter().map(|v| v.vm.as_str())));
    let (batches, received) = std::sync::mpsc::sync_channel::<Vec<Encoded>>(16);
    let with_export = args.with_export;
    let writer_dir = spool_dir.clone();
    let writer = std::thread::Builder::new()
        .name("spool".into())
        .spawn(move || {
            spool_records(received, scan_redactor.as_ref(), writer_dir.as_deref(), with_export)
        })
        .context("cannot start the spooling thread")?;
    let progress = progress_bar(&vms_reply, &query.vms);
    let read = read_records(socket, &query, redactor.as_mut(), &batches, &progress);
    drop(batches);
    progress.finish_and_clear();
    let written = writer.join().map_err(|_| anyhow::anyhow!("the spooling thread failed"))?;
    // A writer error (a leak, a full disk) is why the reading stopped, so it comes first.
    let Spooled { per_vm, report, scratch: scan_scratch } = written?;
    read?;
    // Taken after the events were read, so each head covers every batch they came from.
    let chains = chain_heads(socket, per_vm.keys().cloned().collect())?;

    // The VM table.
    let vms_json = redact_vms(vms_reply, redactor.as_mut());
    let mut vms_bytes = serde_json::to_vec_pretty(&vms_json).expect("VM tables serialise");
    vms_bytes.push(b'\n');
    let selected_vms: Vec<String> = query
        .vms
        .iter()
        .map(|vm| match &mut redactor {
            Some(r) => r.vm_token(vm),
            None => vm.clone(),
        })
        .collect();

    // From here on the counts are final.
    let mut scanner = Scanner { redactor: redactor.as_ref(), scratch: scan_scratch };
    scan_lines(&mut scanner, &vms_bytes, true, manifest::VMS_PATH, &[])?;
    let redaction = redaction_summary(redactor.as_ref(), &profile, &key);
    let created_at = chrono::DateTime::from_timestamp_micros(created_usec as i64)
        .context("the creation time is out of range")?
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let html = report.render(&ReportContext {
        created_at: &created_at,
        qlog_version: env!("CARGO_PKG_VERSION"),
        redacted: redaction.enabled,
        profile: &redaction.profile,
        rules: redaction.rules.iter().map(|r| (r.rule.clone(), r.replaced, r.distinct)).collect(),
    });
    // FIXME: the page is scanned whole, its own words included, so a keyword or pattern
    // that matches them ("support", "errors") aborts every export; scan only the values
    // the page inserts once an operator needs such a keyword.
    scan_lines(&mut scanner, html.as_bytes(), false, manifest::REPORT_PATH, &[])?;

    let mut files: BTreeMap<String, FileEntry> = BTreeMap::new();
    let mut contents: BTreeMap<String, Content> = BTreeMap::new();
    let mut vm_entries = Vec::new();
    let mut records_total = 0;
    for (real_vm, vm) in per_vm {
        let events_path = vm.events.path.clone();
        let records = vm.events.lines;
        records_total += records;
        let (entry, file) = vm.events.finish()?;
        files.insert(events_path.clone(), entry);
        contents.insert(events_path.clone(), Content::Spooled(file));
        let export_path = match vm.export {
            Some(spool) => {
                let path = spool.path.clone();
                let (entry, file) = spool.finish()?;
                files.insert(path.clone(), entry);
                contents.insert(path.clone(), Content::Spooled(file));
                Some(path)
            }
            None => None,
        };
        vm_entries.push(VmEntry {
            name: vm.name,
            records,
            gaps: vm.gaps,
            first_usec: vm.first_usec,
            last_usec: vm.last_usec,
            events_file: events_path,
            export_file: export_path,
            chain: chains.get(&real_vm).cloned(),
        });
    }
    vm_entries.sort_by(|a, b| a.name.cmp(&b.name));
    for (path, bytes) in
        [(manifest::VMS_PATH, vms_bytes), (manifest::REPORT_PATH, html.into_bytes())]
    {
        files.insert(
            path.to_owned(),
            FileEntry { sha256: hex(&Sha256::digest(&bytes)), bytes: bytes.len() as u64 },
        );
        contents.insert(path.to_owned(), Content::Memory(bytes));
    }

    let manifest = Manifest {
        format: manifest::FORMAT.to_owned(),
        format_version: manifest::FORMAT_VERSION,
        qlog_version: env!("CARGO_PKG_VERSION").to_owned(),
        created_at,
        created_at_usec: created_usec,
        time_range: TimeRange {
            since_usec: query.filter.since_usec,
            until_usec: query.filter.until_usec,
            first_usec: vm_entries.iter().filter_map(|v| v.first_usec).min(),
            last_usec: vm_entries.iter().filter_map(|v| v.last_usec).max(),
        },
        selection: manifest::Selection {
            vms: selected_vms,
            priority: query.filter.priority,
            filters: filter_kinds(&query.filter),
        },
        vms: vm_entries,
        records: records_total,
        files,
        redaction,
    };
    let manifest_bytes = manifest.to_bytes();
    let mut hashes: Vec<&[u8]> = manifest.files.values().map(|f| f.sha256.as_bytes()).collect();
    for chain in manifest.vms.iter().filter_map(|v| v.chain.as_ref()) {
        hashes.extend([chain.head.as_bytes(), chain.anchor.as_bytes()]);
    }
    scan_lines(&mut scanner, &manifest_bytes, true, manifest::MANIFEST_PATH, &hashes)?;

    if args.dry_run {
        print_dry_run(&manifest, redactor.as_ref());
        return Ok(ExitCode::SUCCESS);
    }

    // The archive: the manifest first, so inspect reads one entry, then the rest by path.
    let output = output.expect("not a dry run, so -o was required");
    let mut bundle = bundle_file.take().expect("created with the output path");
    let mtime = created_usec / 1_000_000;
    let writer = BufWriter::with_capacity(1 << 20, bundle.file());
    let mut archive = ArchiveWriter::new(writer, mtime, &recipients)?;
    let write_error = |e: std::io::Error| {
        anyhow::Error::new(e).context(format!("cannot write {}", output.display()))
    };
    archive
        .append(manifest::MANIFEST_PATH, manifest_bytes.len() as u64, &manifest_bytes[..])
        .map_err(write_error)?;
    for (path, content) in contents {
        let size = manifest.files[&path].bytes;
        match content {
            Content::Memory(bytes) => archive.append(&path, size, &bytes[..]),
            Content::Spooled(Some(file)) => {
                archive.append(&path, size, std::io::BufReader::new(file))
            }
            Content::Spooled(None) => unreachable!("only a dry run spools nowhere"),
        }
        .map_err(write_error)?;
    }
    archive.finish().map_err(write_error)?.flush().map_err(write_error)?;

    // The map first: if it cannot be placed, the bundle is not published either; and
    // it goes again if the bundle then cannot be.
    let mut published_map = None;
    if let (Some(map_path), Some(r)) = (&args.map_out, &redactor) {
        let mut map = UnpublishedFile::create(map_path)?;
        map.file()
            .write_all(&map_bytes(r, &key, &output))
            .with_context(|| format!("cannot write {}", map_path.display()))?;
        published_map = Some(map.publish(map_path, false)?);
    }
    bundle.publish(&output, true)?.keep();
    if let Some(map) = published_map {
        map.keep();
    }

    let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "qlog: wrote {} ({}): {} records from {} VMs{}{}",
        output.display(),
        vms::human_bytes(size),
        manifest.records,
        manifest.vms.len(),
        if manifest.redaction.enabled {
            format!(
                ", {} values replaced",
                manifest.redaction.rules.iter().map(|r| r.replaced).sum::<u64>()
            )
        } else {
            ", NOT redacted".to_owned()
        },
        if recipients.is_empty() {
            String::new()
        } else {
            format!(", encrypted to {} recipient(s)", recipients.len())
        }
    );
    if let Some(map) = &args.map_out {
        eprintln!("qlog: the token map is in {} (keep it in this qube)", map.display());
    }
    Ok(ExitCode::SUCCESS)
}

const JSON: Printer = Printer { format: Format::Json, color: false };
const EXPORT: Printer = Printer { format: Format::Export, color: false };

/// Where a bundle entry's bytes are.
enum Content {
    Memory(Vec<u8>),
    Spooled(Option<File>),
}

/// Scans `bytes` line by line, which finds what a scan of the whole would.
/// The chain heads of the exported VMs, by real name; none if qlogd predates the chain
/// (it refuses the request as `bad-query`).
fn chain_heads(
    socket: &Path,
    vms: Vec<String>,
) -> anyhow::Result<BTreeMap<String, manifest::ChainHead>> {
    if vms.is_empty() {
        return Ok(BTreeMap::new());
    }
    let query = qlog_rpc::query::VerifyQuery { vms, heads_only: true, ..Default::default() };
    let reply = match Client::verify(socket, &query) {
        Ok(reply) => reply,
        Err(e)
            if e.downcast_ref::<client::SinkError>()
                .is_some_and(|s| s.0.code == qlog_rpc::ErrorCode::BadQuery) =>
        {
            return Ok(BTreeMap::new())
        }
        Err(e) => return Err(e.context("cannot read the chain heads for the manifest")),
    };
    Ok(reply
        .vms
        .into_iter()
        .map(|c| {
            let head = manifest::ChainHead {
                head: c.head,
                anchor: c.anchor,
                length: c.length,
                trimmed: c.trimmed,
            };
            (c.vm, head)
        })
        .collect())
}

fn scan_lines(
    scanner: &mut Scanner<'_>,
    bytes: &[u8],
    json: bool,
    path: &str,
    masks: &[&[u8]],
) -> anyhow::Result<()> {
    for line in bytes.split(|&b| b == b'\n') {
        scanner.check_masked(line, json, path, masks)?;
    }
    Ok(())
}

/// The VM table as `vms.json` holds it. Every string in it is redacted, not only the
/// ones known today (the VM name, the stream names), so a field the sink adds later
/// cannot leave in clear. Rows are sorted by bundle name, so their order says nothing
/// about the real names. Health is left out (see below).
fn redact_vms(reply: VmsReply, redactor: Option<&mut Redactor>) -> serde_json::Value {
    use serde_json::Value;
    fn strings(v: &mut Value, r: &mut Redactor) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(redacted) = r.redact_value(s.as_bytes()) {
                    *s = String::from_utf8_lossy(&redacted).into_owned();
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| strings(i, r)),
            Value::Object(map) => map.values_mut().for_each(|i| strings(i, r)),
            _ => {}
        }
    }
    let mut rows: Vec<Value> =
        reply.vms.iter().map(|vm| serde_json::to_value(vm).expect("VM rows serialise")).collect();
    // Health is qlogd's judgement of the moment (when it last heard each VM), not part of
    // the store, so it stays out: the same store and key must give the same bundle.
    for row in &mut rows {
        if let Value::Object(map) = row {
            map.remove("health");
        }
    }
    if let Some(r) = redactor {
        for (row, vm) in rows.iter_mut().zip(&reply.vms) {
            // The token first: a token is left alone by the redaction that follows.
            row["vm"] = Value::String(r.vm_token(&vm.vm));
            strings(row, r);
        }
        rows.sort_by(|a, b| a["vm"].as_str().cmp(&b["vm"].as_str()));
    }
    serde_json::json!({ "vms": rows })
}

fn redaction_summary(
    redactor: Option<&Redactor>,
    profile: &Profile,
    key: &PseudonymKey,
) -> manifest::Redaction {
    let Some(r) = redactor else {
        return manifest::Redaction {
            enabled: false,
            profile: "none".to_owned(),
            key: "none".to_owned(),
            leak_scan: "skipped (--no-redact)".to_owned(),
            ..manifest::Redaction::default()
        };
    };
    let mut prefixes: Vec<String> = RESERVED_PREFIXES
        .iter()
        .map(|p| (*p).to_owned())
        .chain(profile.regexes.iter().map(|u| u.token_prefix.clone()))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    manifest::Redaction {
        enabled: true,
        profile: profile.name.clone(),
        rules_file: profile.from_file,
        key: if key.from_file { "file" } else { "random" }.to_owned(),
        key_id: key.id(),
        fields_exported: profile.fields.iter().cloned().collect(),
        fields_dropped: r.fields_dropped(),
        domains_kept: profile.domains.clone(),
        vms_kept: profile.vms.iter().cloned().collect(),
        token_prefixes: prefixes,
        token_collisions: r.pseudonyms().collisions(),
        rules: r
            .stats()
            .iter()
            .filter(|(_, s)| s.replaced > 0)
            .map(|(rule, s)| RuleCount {
                rule: r.rule_name(*rule),
                replaced: s.replaced,
                distinct: s.distinct,
            })
            .collect(),
        leak_scan: "passed".to_owned(),
    }
}

fn filter_kinds(filter: &qlog_rpc::query::Filter) -> Vec<String> {
    let mut kinds = Vec::new();
    if !filter.units.is_empty() {
        kinds.push("unit".to_owned());
    }
    if !filter.identifiers.is_empty() {
        kinds.push("identifier".to_owned());
    }
    if filter.grep.is_some() {
        kinds.push("grep".to_owned());
    }
    if !filter.matches.is_empty() {
        kinds.push("match".to_owned());
    }
    kinds
}

/// The operator's map: every token and the value it stands for.
fn map_bytes(r: &Redactor, key: &PseudonymKey, bundle: &Path) -> Vec<u8> {
    let tokens: serde_json::Map<String, serde_json::Value> = r
        .pseudonyms()
        .map()
        .iter()
        .map(|(token, entry)| {
            let value = String::from_utf8_lossy(&entry.value).into_owned();
            (token.clone(), serde_json::json!({ "rule": entry.rule, "value": value }))
        })
        .collect();
    let map = serde_json::json!({
        "format": "qlog-pseudonym-map",
        "bundle": bundle.file_name().map(|n| n.to_string_lossy().into_owned()),
        "key_id": key.id(),
        "tokens": tokens,
    });
    let mut out = serde_json::to_vec_pretty(&map).expect("maps serialise");
    out.push(b'\n');
    out
}

/// The creation time: `--created-at`, else `SOURCE_DATE_EPOCH`, else now; whole seconds.
fn created_at(args: &ExportArgs) -> anyhow::Result<u64> {
    let usec = if let Some(t) = &args.created_at {
        timespec::parse(t, chrono::Local::now())
            .map_err(|e| anyhow::anyhow!("--created-at: {e}"))?
    } else if let Some(epoch) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let epoch = epoch.to_string_lossy();
        let secs: u64 = epoch.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "SOURCE_DATE_EPOCH={epoch:?} is not seconds since 1970 (fix or unset it)"
            )
        })?;
        secs.checked_mul(1_000_000).context("SOURCE_DATE_EPOCH is too far in the future")?
    } else {
        let now = chrono::Utc::now().timestamp_micros();
        u64::try_from(now).context("the clock is before 1970")?
    };
    Ok(usec / 1_000_000 * 1_000_000)
}

fn progress_bar(vms: &VmsReply, selected: &[String]) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    // Filters may match fewer: the stored count is an upper bound, good enough for a bar.
    let total: u64 = vms
        .vms
        .iter()
        .filter(|v| selected.is_empty() || selected.contains(&v.vm))
        .map(|v| v.events_stored)
        .sum();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} exporting {wide_bar} {human_pos}/{human_len} records, {eta} left",
    )
    .expect("the template is valid");
    bar.set_style(style);
    bar
}

fn print_dry_run(manifest: &Manifest, redactor: Option<&Redactor>) {
    println!(
        "dry run: {} records from {} VMs would be exported; nothing was written",
        manifest.records,
        manifest.vms.len()
    );
    for vm in &manifest.vms {
        println!("  {:<24} {:>10} records", vm.name, vm.records);
    }
    let Some(r) = redactor else {
        println!("redaction: off (--no-redact)");
        return;
    };
    println!(
        "fields: {} exported, {} field values dropped (not on the allowlist)",
        manifest.redaction.fields_exported.len(),
        manifest.redaction.fields_dropped
    );
    if r.stats().is_empty() {
        println!("no rule fired");
    } else {
        println!("{:<24} {:>10} {:>9}  examples (redacted)", "rule", "replaced", "distinct");
    }
    for (rule, stats) in r.stats() {
        if stats.replaced == 0 {
            continue;
        }
        println!("{:<24} {:>10} {:>9}", r.rule_name(*rule), stats.replaced, stats.distinct);
        for example in &stats.examples {
            println!("    {example}");
        }
        if *rule == Rule::Binary {
            println!("    (binary values are removed whole)");
        }
    }
    println!("leak check: {}", manifest.redaction.leak_scan);
}
