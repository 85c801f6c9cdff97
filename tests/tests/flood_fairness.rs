//! Flood fairness: one VM that sends as fast as it can, valid events and garbage mixed,
//! costs the other VMs nothing, and is held to its per-VM token bucket.
//!
//! Seven honest VMs send 200 events/s each while `sd-flood` floods on four streams at
//! once, every other session ending in a garbage frame, with garbage connections on the
//! side. qlogd runs with a small bucket for `sd-flood` only (a `[vm.sd-flood]` table in
//! its configuration file), so the limit engages at once. Afterwards the store is read
//! back: every honest event once, and every flooder sequence number either stored or
//! counted in a `rate` gap record, the counts agreeing with `qlog vms`. The second test
//! bursts a million events from one VM under the default limits and checks qlogd's
//! peak RSS. Latency under the flood is a performance claim: `qlog-bench flood`
//! measures it.

use std::collections::BTreeMap;

use qlog_rpc::fields;
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind, VmInfo};
use qlog_tests::flood::{self, Flooder};
use qlog_tests::{query_events, query_vms, RunningSink, SinkOptions};

const HONEST_VMS: usize = 7;
const HONEST_RATE: u64 = 200;
/// Five seconds of honest traffic at [`HONEST_RATE`].
const HONEST_EVENTS: u64 = 1_000;
const FLOODER: &str = "sd-flood";
const FLOOD_STREAMS: usize = 4;
const FLOOD_EVENTS_PER_SEC: u64 = 200;
const FLOOD_BURST: u64 = 500;
/// Peak resident set qlogd must stay under, debug build included.
const MAX_PEAK_RSS_KIB: u64 = 128 * 1024;
/// The burst of the second test.
const BURST_EVENTS: u64 = 1_000_000;

fn records_of(sink: &RunningSink, vm: &str) -> Vec<Record> {
    let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
    query_events(sink.query_socket(), &query).expect("qlogd answers an events query")
}

fn vm_info(sink: &RunningSink, vm: &str) -> VmInfo {
    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    table.vms.into_iter().find(|info| info.vm == vm).expect("the VM is known")
}

fn gap_kind(record: &Record) -> Option<&str> {
    (record.kind == RecordKind::Gap).then(|| record.event.get_str(fields::QLOG_GAP)).flatten()
}

fn gap_count(record: &Record) -> u64 {
    record
        .event
        .get_str(fields::QLOG_GAP_COUNT)
        .and_then(|n| n.parse().ok())
        .expect("a rate gap says how many were refused")
}

#[test]
fn a_flooding_vm_is_held_to_its_bucket_and_costs_the_others_nothing() {
    let config_dir = tempfile::tempdir().expect("a temp dir");
    let config =
        flood::write_flood_config(config_dir.path(), FLOODER, FLOOD_EVENTS_PER_SEC, FLOOD_BURST);
    let sink = RunningSink::start(SinkOptions {
        args: vec!["--config".into(), config.into_os_string()],
        ..SinkOptions::default()
    });
    let honest: Vec<String> = (0..HONEST_VMS).map(|i| format!("sd-honest{i}")).collect();

    // The honest VMs run their whole schedule under the flood, then the flood stops.
    let flooder = Flooder::start(sink.ingest_socket(), FLOODER, FLOOD_STREAMS);
    std::thread::scope(|scope| {
        let senders: Vec<_> = honest
            .iter()
            .map(|vm| {
                let ingest = sink.ingest_socket();
                scope.spawn(move || flood::paced_vm(ingest, vm, HONEST_RATE, HONEST_EVENTS))
            })
            .collect();
        for sender in senders {
            assert_eq!(sender.join().expect("honest senders do not panic"), HONEST_EVENTS);
        }
    });
    let report = flooder.stop();
    eprintln!("flooder: {report:?}");
    assert!(report.garbage_sessions > 0 && report.garbage_connections > 0, "{report:?}");

    // Every honest event stored once, as sent, and nothing refused or rejected.
    for vm in &honest {
        let records = records_of(&sink, vm);
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=HONEST_EVENTS).collect::<Vec<_>>(), "{vm}: each event once");
        for r in &records {
            assert_eq!(r.kind, RecordKind::Event, "{vm}: {r:?}");
            let expected = flood::message(vm, "journal", r.seq);
            assert_eq!(r.event.get_str(fields::MESSAGE), Some(expected.as_str()));
        }
        let info = vm_info(&sink, vm);
        assert_eq!((info.events_refused_rate, info.frames_rejected), (0, 0), "{info:?}");
    }

    // The flooder: every number it sent is either stored or inside a rate gap, the gaps
    // add up to the refused count, and nothing looks like a lost sequence number.
    let info = vm_info(&sink, FLOODER);
    let records = records_of(&sink, FLOODER);
    let mut stored: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut refused: BTreeMap<&str, u64> = BTreeMap::new();
    let mut rate_gaps = 0u64;
    for r in &records {
        match gap_kind(r) {
            None => {
                let expected = flood::message(FLOODER, &r.stream, r.seq);
                assert_eq!(r.event.get_str(fields::MESSAGE), Some(expected.as_str()));
                stored.entry(&r.stream).or_default().push(r.seq);
            }
            Some("rate") => {
                rate_gaps += 1;
                *refused.entry(&r.stream).or_default() += gap_count(r);
            }
            Some(other) => panic!("unexpected {other} gap for the flooder: {r:?}"),
        }
    }
    let total_refused: u64 = refused.values().sum();
    assert!(total_refused > 0, "the bucket never engaged: {info:?}");
    assert_eq!(info.events_refused_rate, total_refused, "{info:?}");
    assert!(info.frames_rejected > 0, "{info:?}");
    for (stream, last) in &report.streams {
        let seqs = stored.get(stream.as_str()).cloned().unwrap_or_default();
        let mut unique = seqs.clone();
        unique.dedup();
        assert_eq!(unique.len(), seqs.len(), "{stream}: an event stored twice");
        let refused = refused.get(stream.as_str()).copied().unwrap_or(0);
        assert_eq!(seqs.len() as u64 + refused, *last, "{stream}: stored + refused = sent");
        let acked = info.streams.iter().find(|s| &s.name == stream).expect("stream known");
        assert_eq!(acked.last_seq, *last, "{stream}: the resume point passed the refusals");
    }
    // Coalesced: far fewer gap records than refusals.
    assert!(rate_gaps * 10 <= total_refused, "{rate_gaps} gap records for {total_refused}");
    eprintln!("flooder: {total_refused} refused in {rate_gaps} gap records; {info:?}");

    let peak = flood::peak_rss_kib(sink.pid());
    eprintln!("qlogd peak RSS under the flood: {} MiB", peak / 1024);
    assert!(peak < MAX_PEAK_RSS_KIB, "qlogd peaked at {peak} KiB");
}

#[test]
fn a_million_event_burst_from_one_vm_stays_under_128_mib() {
    let sink = RunningSink::start(SinkOptions::default());
    let started = std::time::Instant::now();
    let last = flood::burst(sink.ingest_socket(), "sd-burst", BURST_EVENTS);
    let took = started.elapsed();
    eprintln!("burst of {BURST_EVENTS} acknowledged in {took:?}");
    assert_eq!(last, BURST_EVENTS);

    let peak = flood::peak_rss_kib(sink.pid());
    let info = vm_info(&sink, "sd-burst");
    eprintln!("qlogd peak RSS after the burst: {} MiB; {info:?}", peak / 1024);
    assert!(peak < MAX_PEAK_RSS_KIB, "qlogd peaked at {peak} KiB");
    // Under the default limits most of the burst is refused: what was stored and what
    // was refused add up to what was sent.
    let filter = Filter {
        matches: vec![(fields::QLOG_GAP.to_owned(), "rate".to_owned())],
        ..Filter::default()
    };
    let query = EventsQuery { vms: vec!["sd-burst".into()], filter, ..EventsQuery::default() };
    let gaps = query_events(sink.query_socket(), &query).expect("qlogd answers");
    assert_eq!(gaps.iter().map(gap_count).sum::<u64>(), info.events_refused_rate);
    let gaps = gaps.len() as u64;
    assert!(info.events_refused_rate > 0, "{info:?}");
    assert_eq!(info.events_stored - gaps + info.events_refused_rate, BURST_EVENTS, "{info:?}");
    assert_eq!(info.streams[0].last_seq, BURST_EVENTS, "{info:?}");

    // While refusing, qlogd reads the VM no faster than its refused-read rate
    // (REFUSED_READ_BYTES_PER_SEC in sink/src/rate_limit.rs, 8 MiB/s), so that refusing
    // a flood costs it little CPU. Each refused event weighs at least the first one.
    let mut first = qlog_rpc::Event::new();
    first.push(fields::MESSAGE, flood::message("sd-burst", "burst", 1));
    first.push(fields::PRIORITY, "6");
    let mut payload = Vec::new();
    qlog_rpc::event::encode_event_payload(1, &first, &mut payload);
    let refused_bytes = info.events_refused_rate * payload.len() as u64;
    let floor = std::time::Duration::from_secs_f64(refused_bytes as f64 / (8 << 20) as f64);
    assert!(took >= floor, "{refused_bytes} refused bytes read in {took:?}, under {floor:?}");
}

#[test]
fn a_million_event_burst_with_rate_limits_off_is_stored_whole_under_128_mib() {
    let sink = RunningSink::start(SinkOptions {
        args: ["--rate-limit-events-per-sec", "0", "--rate-limit-bytes-per-sec", "0"]
            .map(Into::into)
            .to_vec(),
        ..SinkOptions::default()
    });
    let started = std::time::Instant::now();
    assert_eq!(flood::burst(sink.ingest_socket(), "sd-burst", BURST_EVENTS), BURST_EVENTS);
    eprintln!("unlimited burst of {BURST_EVENTS} acknowledged in {:?}", started.elapsed());

    // What bounds memory is the queue to the committer, not the bucket.
    let peak = flood::peak_rss_kib(sink.pid());
    let info = vm_info(&sink, "sd-burst");
    eprintln!("qlogd peak RSS after the unlimited burst: {} MiB", peak / 1024);
    assert!(peak < MAX_PEAK_RSS_KIB, "qlogd peaked at {peak} KiB");
    assert_eq!((info.events_stored, info.events_refused_rate), (BURST_EVENTS, 0), "{info:?}");
}
