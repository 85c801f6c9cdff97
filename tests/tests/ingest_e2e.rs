//! End to end through the real agent and the qrexec double: eight VMs send at once to one
//! qlogd, and every event is stored exactly once, intact, under the VM that dom0 named.
//!
//! Each VM runs `qlog-agent --source stdin --input-format export`, fed a generated journal
//! (see `qlog_tests::workload`) on its stdin while the other seven do the same. One VM
//! lies about who it is, in every field it controls (`_HOSTNAME`, `_QLOG_VM`); only the
//! descriptor counts, so its events must land under its own name and its `_QLOG_VM`
//! claim must be quarantined as `CLAIMED_QLOG_VM`.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::time::Duration;

use qlog_rpc::fields;
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind};
use qlog_rpc::Event;
use qlog_tests::workload::{write_export, Workload};
use qlog_tests::{query_events, query_vms, AgentOptions, RunningAgent, RunningSink, SinkOptions};

const EVENTS_PER_VM: u64 = 50_000;
const SEED: u64 = 2026;
/// The VM that writes another VM's name into its events.
const IMPOSTOR: &str = "untrusted";
/// The VM it pretends to be, which also sends its own events.
const IMPERSONATED: &str = "sd-proxy";
const VMS: [&str; 8] =
    ["sd-app", IMPERSONATED, "sd-viewer", "sd-devices", "sd-whonix", "sys-usb", "work", IMPOSTOR];
/// How long the agents may take to deliver everything. Debug builds of eight agents and
/// qlogd share two cores (and maybe another test run), so this is a generous bound on a
/// hang, not a performance claim.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(240);

/// The journal `vm` writes to its agent's stdin, in order; the n-th item gets seq n.
fn journal_of(vm: &str) -> impl Iterator<Item = Event> {
    // The impostor's journal is a different VM's journal under the impersonated name,
    // so `_HOSTNAME` already says sd-proxy; it adds a claim to be sd-proxy for qlog too.
    let (mut workload, impostor) = if vm == IMPOSTOR {
        (Workload::new(SEED + 1, IMPERSONATED), true)
    } else {
        (Workload::new(SEED, vm), false)
    };
    (0..EVENTS_PER_VM).map(move |_| {
        let mut event = workload.next_event();
        if impostor {
            event.push(fields::QLOG_VM, IMPERSONATED);
        }
        event
    })
}

/// What qlogd must have stored for an event `vm` sent: the same fields, with the
/// sink-only prefix renamed.
fn as_stored(mut event: Event) -> Event {
    event.quarantine_trusted();
    event
}

#[test]
fn eight_agents_at_once_store_every_event_once_under_the_descriptor_vm() {
    let sink = RunningSink::start(SinkOptions::default());
    let mut agents: Vec<RunningAgent> = VMS
        .iter()
        .map(|vm| {
            let options = AgentOptions::new(&sink, vm).args([
                "--source",
                "stdin",
                "--input-format",
                "export",
            ]);
            RunningAgent::spawn(options)
        })
        .collect();

    // Feed all eight at once. Writes block while qlogd pushes back, which is the point.
    std::thread::scope(|scope| {
        for (vm, agent) in VMS.iter().zip(agents.iter_mut()) {
            scope.spawn(move || {
                let mut stdin = BufWriter::with_capacity(256 * 1024, agent.stdin());
                for event in journal_of(vm) {
                    write_export(&event, &mut stdin).expect("the agent reads its stdin");
                }
                stdin.flush().expect("the agent reads its stdin");
            });
        }
    });

    // The agent exits 0 only once qlogd has acknowledged every event it read.
    for (vm, agent) in VMS.iter().zip(agents.iter_mut()) {
        agent.close_stdin();
        let status = agent.wait(DELIVERY_TIMEOUT);
        assert!(status.success(), "agent of {vm}: {status}\n{}", agent.log_tail());
    }

    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    let names: Vec<&str> = table.vms.iter().map(|v| v.vm.as_str()).collect();
    let mut expected_names = VMS.to_vec();
    expected_names.sort();
    assert_eq!(names, expected_names, "exactly the eight VMs are known");
    for info in &table.vms {
        assert_eq!(info.events_stored, EVENTS_PER_VM, "{info:?}");
        assert_eq!(info.frames_rejected, 0, "{info:?}");
        let quarantined = if info.vm == IMPOSTOR { EVENTS_PER_VM } else { 0 };
        assert_eq!(info.fields_quarantined, quarantined, "{info:?}");
        let streams: Vec<(&str, u64)> =
            info.streams.iter().map(|s| (s.name.as_str(), s.last_seq)).collect();
        assert_eq!(streams, [("stdin", EVENTS_PER_VM)], "{info:?}");
    }

    // Each VM's records are read back and checked on their own thread: the reads are
    // independent, and qlogd serves queries concurrently.
    std::thread::scope(|scope| {
        for vm in VMS {
            let sink = &sink;
            scope.spawn(move || {
                let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
                let records = query_events(sink.query_socket(), &query).expect("qlogd answers");
                check_stored_journal(vm, records);
            });
        }
    });

    // Asked for by its trusted name, the impersonated VM has no event that carries the
    // impostor's claim.
    let mixed = EventsQuery {
        vms: vec![IMPERSONATED.to_owned()],
        filter: Filter {
            matches: vec![("CLAIMED_QLOG_VM".to_owned(), IMPERSONATED.to_owned())],
            ..Filter::default()
        },
        ..EventsQuery::default()
    };
    let confused = query_events(sink.query_socket(), &mixed).expect("qlogd answers");
    assert!(confused.is_empty(), "{} impostor events filed as {IMPERSONATED}", confused.len());
}

/// Checks that `records`, everything stored for `vm`, is exactly its journal: each
/// sequence number once, in one stream, and every event stored as it was sent.
fn check_stored_journal(vm: &str, records: Vec<Record>) {
    assert_eq!(records.len() as u64, EVENTS_PER_VM, "records stored for {vm}");
    let mut by_seq: BTreeMap<u64, Record> = BTreeMap::new();
    for record in records {
        assert_eq!((record.vm.as_str(), record.stream.as_str()), (vm, "stdin"));
        assert_eq!(record.kind, RecordKind::Event, "{vm} seq {}", record.seq);
        let seq = record.seq;
        if let Some(earlier) = by_seq.insert(seq, record) {
            panic!("{vm} seq {seq} is stored twice: {earlier:?}");
        }
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(seqs, (1..=EVENTS_PER_VM).collect::<Vec<_>>(), "sequence numbers of {vm}");

    for (seq, sent) in (1..).zip(journal_of(vm)) {
        let stored = &by_seq[&seq].event;
        assert_eq!(stored, &as_stored(sent), "{vm} seq {seq} was not stored as sent");
        if vm == IMPOSTOR {
            assert_eq!(stored.get_str(fields::HOSTNAME), Some(IMPERSONATED));
            assert_eq!(stored.get_str("CLAIMED_QLOG_VM"), Some(IMPERSONATED));
            assert!(stored.get(fields::QLOG_VM).is_none());
        }
    }
}
