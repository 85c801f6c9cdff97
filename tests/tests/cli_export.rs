//! `qlog query -o export` is a journal export stream systemd-journal-remote turns back into
//! a journal file that journalctl reads as qlog stored it.
//!
//! Each test pipes the real `qlog` into the real `/lib/systemd/systemd-journal-remote`
//! and reads the file back with `journalctl --file FILE -o export`. The events are a
//! generated journal (`qlog_tests::workload`, with multi-line tracebacks, invalid UTF-8
//! and binary fields) from two VMs plus hand-made hostile ones from a third: a
//! multi-line message, a NUL, a claimed `_HOSTNAME`, a claimed `__REALTIME_TIMESTAMP`, a
//! claimed `_QLOG_VM`, and a gap the sink recorded.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use qlog_rpc::query::{EventsQuery, Record};
use qlog_rpc::Event;
use qlog_tests::process::{kill_and_reap, wait_timeout};
use qlog_tests::workload::Workload;
use qlog_tests::{
    bin_path, ingest_events, parse_export, query_events, RawIngest, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";
const WORKLOAD_VMS: [&str; 2] = ["sd-app", "sd-proxy"];
const EVENTS_PER_VM: usize = 300;
/// The VM whose events are written by hand to be hostile.
const HOSTILE_VM: &str = "sys-usb";

fn event(fields: &[(&str, &[u8])]) -> Event {
    let mut e = Event::new();
    for (name, value) in fields {
        e.push(*name, value.to_vec());
    }
    e
}

fn hostile_events() -> Vec<Event> {
    vec![
        event(&[
            ("PRIORITY", b"3"),
            ("SYSLOG_IDENTIFIER", b"multi"),
            ("MESSAGE", b"first line\nsecond line\n\n  fourth after an empty one\n"),
        ]),
        event(&[("PRIORITY", b"6"), ("MESSAGE", b"nul\0byte and \x1b[2J an escape")]),
        event(&[("PRIORITY", b"6"), ("MESSAGE", b"bad \xff\xfe UTF-8"), ("BLOB", &[0, 1, 0xff])]),
        event(&[("_HOSTNAME", b"sd-app"), ("MESSAGE", b"sys-usb claims to be sd-app")]),
        event(&[("__REALTIME_TIMESTAMP", b"1000000"), ("MESSAGE", b"claims to be from 1970")]),
        event(&[("_QLOG_VM", b"dom0"), ("MESSAGE", b"claims a trusted qlog field")]),
    ]
}

/// A qlogd with the workload of [`WORKLOAD_VMS`], [`HOSTILE_VM`]'s events, a gap, and
/// `more` events of the VM `untrusted` last.
struct Fixture {
    sink: RunningSink,
    /// What the sink stores, in the order `qlog query` prints it.
    records: Vec<Record>,
}

impl Fixture {
    fn new(more: &[Event]) -> Fixture {
        let sink = RunningSink::start(SinkOptions::default());
        for vm in WORKLOAD_VMS {
            let mut workload = Workload::new(77, vm);
            let events: Vec<Event> = (0..EVENTS_PER_VM).map(|_| workload.next_event()).collect();
            ingest_events(&sink, vm, "journal", &events).expect("qlogd stores the events");
        }
        let hostile = hostile_events();
        ingest_events(&sink, HOSTILE_VM, "journal", &hostile).expect("qlogd stores them");
        // A sequence jump: the sink records the missing events as a gap record.
        let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), HOSTILE_VM, "journal");
        let next = welcome.resume.last_seq + 2;
        conn.send_event(next, &event(&[("MESSAGE", b"after a gap")])).expect("qlogd reads");
        conn.send_end(next).expect("qlogd reads the end");
        conn.half_close().expect("the socket can be half-closed");
        conn.expect_closed(IO_TIMEOUT);
        if !more.is_empty() {
            ingest_events(&sink, "untrusted", "journal", more).expect("qlogd stores them");
        }

        let records = query_events(sink.query_socket(), &EventsQuery::default())
            .expect("qlogd answers a query");
        let expected = WORKLOAD_VMS.len() * EVENTS_PER_VM + hostile.len() + 2 + more.len();
        assert_eq!(records.len(), expected, "every event and the gap are stored");
        Fixture { sink, records }
    }

    /// `qlog query -o export ARGS | systemd-journal-remote -o FILE -`, as two processes
    /// joined by a pipe; returns the journal file.
    fn export_to_journal(&self, args: &[&str]) -> PathBuf {
        static EXPORTS: AtomicUsize = AtomicUsize::new(0);
        let n = EXPORTS.fetch_add(1, Ordering::Relaxed);
        let dir = self.sink.dir();
        // A fresh file each time: journal-remote appends to one that exists.
        let journal = dir.join(format!("exported-{n}.journal"));
        let log = |name: &str| std::fs::File::create(dir.join(name)).expect("writable");
        let mut qlog = Command::new(bin_path("qlog"))
            .arg("--socket")
            .arg(self.sink.query_socket())
            .args(["query", "-o", "export"])
            .args(args)
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log("qlog.err"))
            .spawn()
            .expect("qlog can be spawned");
        let pipe = qlog.stdout.take().expect("stdout is piped");
        let remote = Command::new(JOURNAL_REMOTE)
            .arg("-o")
            .arg(&journal)
            .arg("-")
            .stdin(pipe)
            .stdout(log("remote.out"))
            .stderr(log("remote.err"))
            .spawn()
            .expect("systemd-journal-remote can be spawned");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let qlog_status = finish(qlog, "qlog");
        let remote_status = finish(remote, "systemd-journal-remote");
        assert!(qlog_status.success(), "qlog: {qlog_status}: {}", read("qlog.err"));
        assert!(remote_status.success(), "journal-remote: {remote_status}: {}", read("remote.err"));
        journal
    }
}

fn finish(mut child: Child, what: &str) -> ExitStatus {
    match wait_timeout(&mut child, IO_TIMEOUT) {
        Ok(Some(status)) => status,
        outcome => {
            kill_and_reap(&mut child);
            panic!("{what} did not finish within {IO_TIMEOUT:?}: {outcome:?}");
        }
    }
}

/// The entries of a journal file, as `journalctl --file FILE -o export ARGS` writes them.
fn journal_entries(journal: &Path, args: &[&str]) -> Vec<Event> {
    let out = Command::new("journalctl")
        .arg("--file")
        .arg(journal)
        .args(["-q", "--no-pager", "-o", "export"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("journalctl runs");
    assert!(out.status.success(), "journalctl: {}", String::from_utf8_lossy(&out.stderr));
    parse_export(&out.stdout).expect("journalctl writes the export format")
}

fn messages_of_records(records: &[Record]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.event.get("MESSAGE").unwrap_or_default().to_vec()).collect()
}

fn messages_of_entries(entries: &[Event]) -> Vec<Vec<u8>> {
    entries.iter().map(|e| e.get("MESSAGE").unwrap_or_default().to_vec()).collect()
}

type FieldSet = BTreeSet<(String, String)>;

/// A field as it reads in a failure message.
fn field(name: &str, value: &[u8]) -> (String, String) {
    (name.to_owned(), format!("{:?}", String::from_utf8_lossy(value)))
}

/// The data fields journalctl should show for a record: the sink's facts, then the VM's
/// claims under the names `src/output.rs` gives the ones journal-remote would take for
/// the entry's own. journald keeps each (name, value) once per entry, in its own order,
/// so this is a set. `_BOOT_ID` is the entry header's; see [`entry_fields`].
fn expected_fields(r: &Record) -> FieldSet {
    let mut set = BTreeSet::new();
    let mut add = |name: &str, value: &[u8]| {
        set.insert(field(name, value));
    };
    add("_HOSTNAME", r.vm.as_bytes());
    add("_QLOG_VM", r.vm.as_bytes());
    add("_QLOG_STREAM", r.stream.as_bytes());
    add("_QLOG_SEQ", r.seq.to_string().as_bytes());
    add("_QLOG_RECEIVED_USEC", r.received_usec.to_string().as_bytes());
    for f in &r.event.fields {
        match f.name.as_str() {
            "__CURSOR" | "__MONOTONIC_TIMESTAMP" | "_BOOT_ID" => {}
            "__REALTIME_TIMESTAMP" => add("QLOG_CLAIMED_REALTIME_TIMESTAMP", &f.value),
            "_HOSTNAME" => add("QLOG_CLAIMED_HOSTNAME", &f.value),
            name => add(name, &f.value),
        }
    }
    set
}

/// An entry's data fields, without the four journalctl prints from the entry header.
/// journal-remote takes a `_BOOT_ID` field for the header's boot ID and keeps it nowhere
/// else (see [`exported_entries_never_borrow_another_vms_boot_id`] for entries without).
fn entry_fields(e: &Event, r: &Record) -> FieldSet {
    let header = ["__CURSOR", "__REALTIME_TIMESTAMP", "__MONOTONIC_TIMESTAMP", "_BOOT_ID"];
    let names: Vec<&str> = e.fields.iter().take(4).map(|f| f.name.as_str()).collect();
    assert_eq!(names, header, "{}/{}", r.vm, r.seq);
    if let Some(boot_id) = r.event.get("_BOOT_ID") {
        assert_eq!(e.fields[3].value, boot_id, "_BOOT_ID of {}/{}", r.vm, r.seq);
    }
    e.fields.iter().skip(4).map(|f| field(&f.name, &f.value)).collect()
}

fn lossy(messages: &[Vec<u8>]) -> Vec<String> {
    messages.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect()
}

#[test]
fn export_through_journal_remote_keeps_every_message_in_order() {
    let fixture = Fixture::new(&[]);
    let journal = fixture.export_to_journal(&[]);
    let entries = journal_entries(&journal, &[]);

    assert_eq!(entries.len(), fixture.records.len(), "one journal entry per record");
    let (theirs, ours) = (messages_of_entries(&entries), messages_of_records(&fixture.records));
    for (i, (t, o)) in theirs.iter().zip(&ours).enumerate() {
        assert!(
            t == o,
            "MESSAGE of entry {i}: {:?} in the journal, {:?} in qlog",
            String::from_utf8_lossy(t),
            String::from_utf8_lossy(o)
        );
    }
    assert!(ours.iter().filter(|m| m.contains(&b'\n')).count() > 3, "multi-line messages");
    let vms = |e: &Event| e.get_str("_QLOG_VM").map(str::to_owned);
    let theirs: Vec<Option<String>> = entries.iter().map(vms).collect();
    let ours: Vec<Option<String>> = fixture.records.iter().map(|r| Some(r.vm.clone())).collect();
    assert_eq!(theirs, ours, "_QLOG_VM is the trusted VM of each record");
}

#[test]
fn exported_entries_carry_every_field_and_the_receive_time() {
    let fixture = Fixture::new(&[]);
    let entries = journal_entries(&fixture.export_to_journal(&[]), &[]);
    assert_eq!(entries.len(), fixture.records.len());
    for (entry, record) in entries.iter().zip(&fixture.records) {
        let received = record.received_usec.to_string();
        assert_eq!(entry.get_str("__REALTIME_TIMESTAMP"), Some(received.as_str()));
        let (theirs, ours) = (entry_fields(entry, record), expected_fields(record));
        assert!(
            theirs == ours,
            "fields of {}/{}:\n  only in the journal: {:?}\n  only in qlog: {:?}",
            record.vm,
            record.seq,
            theirs.difference(&ours).collect::<Vec<_>>(),
            ours.difference(&theirs).collect::<Vec<_>>()
        );
    }
    let by_message = |m: &[u8]| {
        entries.iter().find(|e| e.get("MESSAGE") == Some(m)).expect("the message is exported")
    };
    let liar = by_message(b"sys-usb claims to be sd-app");
    assert_eq!(liar.get_str("_HOSTNAME"), Some(HOSTILE_VM));
    assert_eq!(liar.get_str("QLOG_CLAIMED_HOSTNAME"), Some("sd-app"));
    let old = by_message(b"claims to be from 1970");
    assert_ne!(old.get_str("__REALTIME_TIMESTAMP"), Some("1000000"));
    assert_eq!(old.get_str("QLOG_CLAIMED_REALTIME_TIMESTAMP"), Some("1000000"));
    let claimant = by_message(b"claims a trusted qlog field");
    assert_eq!(claimant.get_str("_QLOG_VM"), Some(HOSTILE_VM));
    assert_eq!(claimant.get_str("CLAIMED_QLOG_VM"), Some("dom0"));
    let gap = entries.iter().find(|e| e.get_str("_QLOG_GAP") == Some("seq")).expect("the gap");
    assert_eq!(gap.get_str("_QLOG_GAP_COUNT"), Some("1"));
}

#[test]
fn journalctl_on_the_export_finds_each_vm_only_by_its_trusted_name() {
    let fixture = Fixture::new(&[]);
    let journal = fixture.export_to_journal(&[]);
    for vm in [WORKLOAD_VMS[0], WORKLOAD_VMS[1], HOSTILE_VM] {
        let ours: Vec<&Record> = fixture.records.iter().filter(|r| r.vm == vm).collect();
        let ours = messages_of_records(&ours.into_iter().cloned().collect::<Vec<_>>());
        let by_host = journal_entries(&journal, &[&format!("_HOSTNAME={vm}")]);
        assert_eq!(lossy(&messages_of_entries(&by_host)), lossy(&ours), "_HOSTNAME={vm}");
        let by_qlog_vm = journal_entries(&journal, &[&format!("_QLOG_VM={vm}")]);
        assert_eq!(lossy(&messages_of_entries(&by_qlog_vm)), lossy(&ours), "_QLOG_VM={vm}");
    }
    // A filtered export holds just what the same query shows.
    let filtered = fixture.export_to_journal(&["sd-proxy", "-p", "err"]);
    let ours: Vec<Record> = fixture
        .records
        .iter()
        .filter(|r| r.vm == "sd-proxy" && matches!(r.event.get("PRIORITY"), Some([b'0'..=b'3'])))
        .cloned()
        .collect();
    assert!(!ours.is_empty());
    let exported = messages_of_entries(&journal_entries(&filtered, &[]));
    assert_eq!(lossy(&exported), lossy(&messages_of_records(&ours)));
}

/// An event that names no boot (the stdin source, a hand-made event) must not end up in
/// the journal file under another VM's boot, where `journalctl _BOOT_ID=...` or `-b`
/// would show it as that VM's.
///
/// journal-remote keeps the previous entry's boot ID for an entry without one, so the
/// export always writes one: the VM's valid one, else one derived from VM and stream.
#[test]
fn exported_entries_never_borrow_another_vms_boot_id() {
    let fixture = Fixture::new(&[]);
    let entries = journal_entries(&fixture.export_to_journal(&[]), &[]);
    assert_eq!(entries.len(), fixture.records.len());
    let mut boots_of: Vec<(Vec<u8>, &str)> = fixture
        .records
        .iter()
        .filter_map(|r| Some((r.event.get("_BOOT_ID")?.to_vec(), r.vm.as_str())))
        .collect();
    boots_of.sort();
    boots_of.dedup();
    for (entry, record) in entries.iter().zip(&fixture.records) {
        let boot = entry.get("_BOOT_ID").expect("journalctl prints the boot ID");
        for (other_boot, other_vm) in &boots_of {
            assert!(
                boot != other_boot.as_slice() || *other_vm == record.vm,
                "{}/{} ({:?}) is filed under {other_vm}'s boot {}",
                record.vm,
                record.seq,
                String::from_utf8_lossy(record.event.get("MESSAGE").unwrap_or_default()),
                String::from_utf8_lossy(boot)
            );
        }
    }
}

/// systemd-journal-remote parses `__MONOTONIC_TIMESTAMP` and `_BOOT_ID` itself, and on a
/// value it cannot parse it stops reading its input altogether and still exits 0
/// ("Finishing after writing N entries"). Those values are the VM's claims, so one VM
/// must not be able to end everyone's export there.
///
/// journal-remote stops reading its whole input at a `__MONOTONIC_TIMESTAMP` or `_BOOT_ID`
/// it cannot parse, so the export replaces such claims and keeps them as `QLOG_CLAIMED_*`.
#[test]
fn a_vm_with_malformed_journal_metadata_cannot_cut_the_export_short() {
    let malformed = [
        event(&[("__MONOTONIC_TIMESTAMP", b"garbage"), ("MESSAGE", b"bad monotonic time")]),
        event(&[("__MONOTONIC_TIMESTAMP", b"99999999999999999999"), ("MESSAGE", b"too big")]),
        event(&[("_BOOT_ID", b"not-a-boot-id"), ("MESSAGE", b"bad boot id")]),
        event(&[("MESSAGE", b"the last event of the hostile VM")]),
    ];
    let fixture = Fixture::new(&malformed);
    // The hostile VM's events were received last; newest first puts them at the head of
    // the stream, before every other VM's.
    let journal = fixture.export_to_journal(&["-r"]);
    let entries = journal_entries(&journal, &[]);
    let exported: BTreeSet<Vec<u8>> = messages_of_entries(&entries).into_iter().collect();
    let missing: Vec<String> = messages_of_records(&fixture.records)
        .into_iter()
        .filter(|m| !exported.contains(m))
        .map(|m| String::from_utf8_lossy(&m).into_owned())
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} records are missing from the journal file, e.g. {missing:?}",
        fixture.records.len() - entries.len(),
        fixture.records.len()
    );
    assert_eq!(entries.len(), fixture.records.len());
}
