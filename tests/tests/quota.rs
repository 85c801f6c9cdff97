//! Per-VM storage quotas: a VM that sends far more than its quota loses only its own
//! oldest events, says so in a gap record, and never costs another VM anything.
//!
//! qlogd runs with a 2 MiB quota. One VM floods it with generated journal entries (see
//! `qlog_tests::workload`) worth many times that while another VM sends a few thousand;
//! then both VMs' stored records are read back and compared with what was sent.

use qlog_rpc::fields;
use qlog_rpc::query::{EventsQuery, Record, RecordKind, VmInfo};
use qlog_rpc::Event;
use qlog_tests::workload::Workload;
use qlog_tests::{ingest_events, query_events, query_vms, RunningSink, SinkOptions};

const QUOTA: u64 = 2 << 20;
const SEED: u64 = 7;
const FLOODER: &str = "sd-flood";
const FLOOD_EVENTS: u64 = 200_000;
/// The flood is sent in sessions of this many events, so only one session's worth is
/// ever held in memory here.
const FLOOD_SESSION: u64 = 20_000;
const NEIGHBOUR: &str = "sd-app";
const NEIGHBOUR_EVENTS: u64 = 3_000;
/// How far over its quota a VM may be right after a commit: trimming happens before a
/// cycle's batch is written, against an estimate of its compressed size (a quarter of
/// its raw size), so one cycle's batch can land on top of a full quota. This is that
/// estimate for the largest cycle, 8 MiB of raw records; journal text compresses better.
const ONE_CYCLE_SLACK: u64 = 2 << 20;

fn journal(vm: &str, count: u64) -> impl Iterator<Item = Event> {
    let mut workload = Workload::new(SEED, vm);
    (0..count).map(move |_| workload.next_event())
}

fn records_of(sink: &RunningSink, vm: &str) -> Vec<Record> {
    let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
    query_events(sink.query_socket(), &query).expect("qlogd answers an events query")
}

fn vm_info(sink: &RunningSink, vm: &str) -> VmInfo {
    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    table.vms.into_iter().find(|info| info.vm == vm).expect("the VM is known")
}

#[test]
fn vm_over_quota_loses_only_its_own_oldest_events_and_records_a_gap() {
    let mut sink =
        RunningSink::start(SinkOptions { vm_quota: Some(QUOTA), ..SinkOptions::default() });
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let sent: Vec<Event> = journal(NEIGHBOUR, NEIGHBOUR_EVENTS).collect();
            let stored = ingest_events(&sink, NEIGHBOUR, "journal", &sent).expect("stored");
            assert_eq!(stored, NEIGHBOUR_EVENTS);
        });
        let mut flood = journal(FLOODER, FLOOD_EVENTS).peekable();
        while flood.peek().is_some() {
            let session: Vec<Event> = flood.by_ref().take(FLOOD_SESSION as usize).collect();
            ingest_events(&sink, FLOODER, "journal", &session).expect("qlogd takes the flood");
        }
    });

    let flooder = vm_info(&sink, FLOODER);
    assert!(flooder.events_dropped_quota > 0, "{flooder:?}");
    assert!(flooder.bytes_stored <= QUOTA + ONE_CYCLE_SLACK, "{flooder:?}");
    assert_eq!(flooder.quota_bytes, QUOTA, "{flooder:?}");
    assert_eq!(flooder.streams[0].last_seq, FLOOD_EVENTS, "{flooder:?}");

    // What is left is the newest events, without a hole, exactly as they were sent.
    let records = records_of(&sink, FLOODER);
    assert_eq!(records.len() as u64, flooder.events_stored, "{flooder:?}");
    let (gaps, events): (Vec<&Record>, Vec<&Record>) =
        records.iter().partition(|r| r.kind == RecordKind::Gap);
    let oldest_kept = events.first().expect("the newest events are kept").seq;
    assert!(oldest_kept > 1, "nothing was removed from the flooder's records");
    let seqs: Vec<u64> = events.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (oldest_kept..=FLOOD_EVENTS).collect::<Vec<_>>(), "a contiguous tail");
    assert!(flooder.events_dropped_quota >= oldest_kept - 1, "{flooder:?}");
    let kept = journal(FLOODER, FLOOD_EVENTS).skip(oldest_kept as usize - 1);
    for (record, sent) in events.iter().zip(kept) {
        assert_eq!(record.event, sent, "{FLOODER} seq {} was not kept as sent", record.seq);
    }

    // The removal is visible in the flooder's own records.
    assert!(!gaps.is_empty(), "no quota gap record among {} records", records.len());
    let mut reported = 0;
    for gap in &gaps {
        assert_eq!((gap.vm.as_str(), gap.stream.as_str(), gap.seq), (FLOODER, "qlogd", 0));
        assert_eq!(gap.event.get_str(fields::QLOG_GAP), Some("quota"), "{gap:?}");
        assert_eq!(gap.event.get_str(fields::PRIORITY), Some("4"), "{gap:?}");
        let count = gap.event.get_str(fields::QLOG_GAP_COUNT).expect("a gap says how many");
        let count: u64 = count.parse().expect("_QLOG_GAP_COUNT is a decimal number");
        assert!(count > 0, "{gap:?}");
        reported += count;
    }
    assert!(reported <= flooder.events_dropped_quota, "{reported} > {flooder:?}");

    // The neighbour lost nothing, and was never trimmed.
    let neighbour = vm_info(&sink, NEIGHBOUR);
    assert_eq!((neighbour.events_stored, neighbour.events_dropped_quota), (NEIGHBOUR_EVENTS, 0));
    let records = records_of(&sink, NEIGHBOUR);
    assert_eq!(records.len() as u64, NEIGHBOUR_EVENTS);
    for ((seq, record), sent) in (1..).zip(&records).zip(journal(NEIGHBOUR, NEIGHBOUR_EVENTS)) {
        assert_eq!((record.seq, record.kind), (seq, RecordKind::Event), "{record:?}");
        assert_eq!(record.event, sent, "{NEIGHBOUR} seq {seq} was not kept as sent");
    }

    // The accounting is part of the store, not of the process. Health is the process's
    // judgement of the moment (when it last heard the VM), so it is left out.
    sink.kill9();
    sink.restart();
    let stored = |mut info: VmInfo| {
        info.health = Default::default();
        info
    };
    assert_eq!(stored(vm_info(&sink, FLOODER)), stored(flooder));
    assert_eq!(stored(vm_info(&sink, NEIGHBOUR)), stored(neighbour));
}
