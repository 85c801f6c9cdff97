//! Property tests of every codec in qlog-rpc: what is encoded decodes to the same value,
//! however the bytes are cut on the way, and the allocation-free readers agree with the
//! full decoders. The fuzz targets (tests/fuzz) cover hostile bytes; these cover the
//! space of valid values. Case counts are kept small enough for `cargo test` (about a
//! second in all); `PROPTEST_CASES=N` runs more.

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use qlog_rpc::descriptor::{self, Descriptor, MAX_VM_NAME_LEN};
use qlog_rpc::event::{
    decode_event_payload, encode_event_payload, scan_event_payload, validate_field_name,
};
use qlog_rpc::fields::{CURSOR, TRUSTED_PREFIX};
use qlog_rpc::frame::{encode, FrameDecoder};
use qlog_rpc::message::{decode_json, decode_u64, encode_json, encode_u64};
use qlog_rpc::query::{
    Done, EventsQuery, Filter, Grep, Health, HealthState, Lagged, Record, RecordKind, RecordView,
    Request, StatsQuery, StreamInfo, VerifyQuery, VmInfo, VmsReply,
};
use qlog_rpc::{
    ErrorCode, ErrorFrame, Event, Field, Frame, FrameType, Gap, Heartbeat, Hello, Limits,
    ResumePoint, Welcome, INGEST_SERVICE,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, ..ProptestConfig::default() }
}

// --- Strategies -------------------------------------------------------------------------

/// Names qubesd accepts: a letter, then letters, digits, `_` and `-`, at most 31 bytes,
/// not reserved, not ending in `-dm`.
fn vm_name() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9_-]{0,30}".prop_filter("reserved by Qubes", |n| {
        !matches!(n.as_str(), "Domain-0" | "none" | "default") && !n.ends_with("-dm")
    })
}

/// Valid journald field names, trusted-prefix names included.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[A-Z_][A-Z0-9_]{0,15}",
        1 => "[A-Z_][A-Z0-9_]{63}",
        1 => "_QLOG_[A-Z0-9_]{0,58}",
        1 => Just(CURSOR.to_owned()),
        1 => Just("MESSAGE".to_owned()),
    ]
}

/// Values are arbitrary bytes: NULs, newlines, invalid UTF-8.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => vec(any::<u8>(), 0..24), 1 => vec(any::<u8>(), 0..600), 1 => Just(Vec::new())]
}

fn event() -> impl Strategy<Value = Event> {
    vec((field_name(), value()), 0..10).prop_map(|fields| Event {
        fields: fields.into_iter().map(|(name, value)| Field { name, value }).collect(),
    })
}

fn limits() -> impl Strategy<Value = Limits> {
    (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(max_frame_len, max_control_len, max_fields, max_value_len, max_name_len)| Limits {
            max_frame_len,
            max_control_len,
            max_fields,
            max_value_len,
            max_name_len,
        },
    )
}

/// Any text, including quotes, backslashes, control characters and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[ -~]{0,40}", Just(String::new())]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..4)
}

fn frame_type() -> impl Strategy<Value = FrameType> {
    (0u8..=255).prop_filter_map("unknown frame type", FrameType::from_u8)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    prop::sample::select(vec![
        BadDescriptor,
        UnsupportedVersion,
        BadHello,
        BadFrame,
        UnexpectedFrame,
        BadEvent,
        SequenceNotIncreasing,
        TooManyConnections,
        IdleTimeout,
        ShuttingDown,
        BadQuery,
        UnknownVm,
        Internal,
        Other,
    ])
}

fn record_kind() -> impl Strategy<Value = RecordKind> {
    prop::sample::select(vec![RecordKind::Event, RecordKind::Gap, RecordKind::Notice])
}

fn record() -> impl Strategy<Value = Record> {
    (vm_name(), "[a-z._-]{1,64}", any::<u64>(), any::<u64>(), record_kind(), event()).prop_map(
        |(vm, stream, received_usec, seq, kind, event)| Record {
            vm,
            stream,
            received_usec,
            seq,
            kind,
            event,
        },
    )
}

fn filter() -> impl Strategy<Value = Filter> {
    (
        proptest::option::of((0u8..=7, 0u8..=7)),
        texts(),
        texts(),
        proptest::option::of((text(), any::<bool>())),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        vec((text(), text()), 0..4),
    )
        .prop_map(|(priority, units, identifiers, grep, since_usec, until_usec, matches)| {
            Filter {
                priority,
                units,
                identifiers,
                grep: grep.map(|(pattern, case_insensitive)| Grep { pattern, case_insensitive }),
                since_usec,
                until_usec,
                matches,
            }
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Vms),
        (texts(), filter(), proptest::option::of(any::<u64>()), any::<bool>(), any::<bool>())
            .prop_map(|(vms, filter, limit, reverse, follow)| {
                Request::Events(EventsQuery { vms, filter, limit, reverse, follow })
            }),
        (texts(), any::<u64>(), any::<u64>(), any::<u32>(), texts()).prop_map(
            |(vms, since_usec, until_usec, bucket_minutes, gauges)| {
                Request::Stats(StatsQuery { vms, since_usec, until_usec, bucket_minutes, gauges })
            }
        ),
        (texts(), any::<bool>()).prop_map(|(vms, heads_only)| Request::Verify(VerifyQuery {
            vms,
            heads_only,
            expect: Vec::new()
        })),
    ]
}

fn health() -> impl Strategy<Value = Health> {
    use HealthState::*;
    (
        prop::sample::select(vec![NeverSeen, Silent, Flooding, Lagging, Gaps, Ok, Unknown]),
        texts(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(state, reasons, last_heard_usec, heartbeat_interval_secs)| Health {
            state,
            reasons,
            last_heard_usec,
            heartbeat_interval_secs,
        })
}

fn vm_info() -> impl Strategy<Value = VmInfo> {
    (
        vm_name(),
        vec(any::<u64>(), 10),
        vec((text(), any::<u64>(), any::<bool>()), 0..3),
        any::<bool>(),
        any::<bool>(),
        health(),
    )
        .prop_map(|(vm, n, streams, connected, expected, health)| VmInfo {
            vm,
            first_seen_usec: n[0],
            last_seen_usec: n[1],
            events_stored: n[2],
            bytes_stored: n[3],
            quota_bytes: n[4],
            events_dropped_quota: n[5],
            events_expired: n[6],
            frames_rejected: n[7],
            fields_quarantined: n[8],
            events_refused_rate: n[9],
            streams: streams
                .into_iter()
                .map(|(name, last_seq, connected)| StreamInfo { name, last_seq, connected })
                .collect(),
            connected,
            expected,
            health,
        })
}

// --- Helpers ----------------------------------------------------------------------------

/// Cuts `wire` at `cuts` (fractions of its length) and decodes it read by read, with
/// `next_frame_ref`.
fn decode_cut(wire: &[u8], cuts: &[prop::sample::Index], limits: Limits) -> Vec<Frame> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    at.push(0);
    at.push(wire.len());
    at.sort_unstable();
    let mut decoder = FrameDecoder::new(limits);
    let mut frames = Vec::new();
    for pair in at.windows(2) {
        decoder.feed(&wire[pair[0]..pair[1]]);
        while let Some((ty, payload)) = decoder.next_frame_ref().expect("valid frames decode") {
            frames.push(Frame { ty, payload: payload.to_vec() });
        }
    }
    decoder.finish().expect("nothing left over");
    frames
}

/// A JSON control message goes through a whole frame and comes back equal.
fn json_round_trip<T>(ty: FrameType, msg: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let wire = encode_json(ty, msg);
    let mut decoder = FrameDecoder::new(Limits {
        max_frame_len: u32::MAX,
        max_control_len: u32::MAX,
        ..Limits::DEFAULT
    });
    decoder.feed(&wire);
    let frame = decoder.next_frame().unwrap().expect("one whole frame");
    prop_assert_eq!(frame.ty, ty);
    let back: T = decode_json(ty, &frame.payload).unwrap();
    prop_assert_eq!(&back, msg);
    decoder.finish().unwrap();
    Ok(())
}

// --- Properties -------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn descriptor_accepts_every_valid_call(vm in vm_name(), arg in "[^ \0]{0,40}", data in vec(any::<u8>(), 0..32)) {
        let d = Descriptor { service: INGEST_SERVICE.into(), argument: arg, source_vm: vm };
        let mut wire = d.to_string().into_bytes();
        wire.push(0);
        let n = wire.len();
        wire.extend_from_slice(&data);
        prop_assert_eq!(descriptor::find_end(&wire), Ok(Some(n)));
        prop_assert_eq!(descriptor::parse(&wire[..n], INGEST_SERVICE), Ok(d.clone()));
        prop_assert_eq!(descriptor::parse(&wire[..n - 1], INGEST_SERVICE), Ok(d));
    }

    #[test]
    fn descriptor_never_panics_and_accepts_only_valid_names(raw in vec(any::<u8>(), 0..80)) {
        let _ = descriptor::find_end(&raw);
        if let Ok(d) = descriptor::parse(&raw, INGEST_SERVICE) {
            prop_assert!(descriptor::validate_vm_name(&d.source_vm).is_ok());
            prop_assert!(d.source_vm.len() <= MAX_VM_NAME_LEN);
            prop_assert_eq!(descriptor::parse(d.to_string().as_bytes(), INGEST_SERVICE), Ok(d));
        }
    }

    #[test]
    fn vm_names_qubes_accepts_are_valid(vm in vm_name()) {
        prop_assert!(descriptor::validate_vm_name(&vm).is_ok());
        let call = format!("{INGEST_SERVICE}+ {vm}");
        prop_assert!(descriptor::parse(call.as_bytes(), INGEST_SERVICE).is_ok());
    }

    #[test]
    fn frames_survive_any_cutting(
        frames in vec((frame_type(), vec(any::<u8>(), 0..300)), 0..12),
        cuts in vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let limits = Limits { max_frame_len: 300, max_control_len: 300, ..Limits::DEFAULT };
        let mut wire = Vec::new();
        for (ty, payload) in &frames {
            encode(*ty, payload, &mut wire);
        }
        let want: Vec<Frame> =
            frames.into_iter().map(|(ty, payload)| Frame { ty, payload }).collect();
        prop_assert_eq!(decode_cut(&wire, &cuts, limits), want.clone());
        // And in one piece, copying.
        let mut whole = FrameDecoder::new(limits);
        whole.feed(&wire);
        let mut got = Vec::new();
        while let Some(f) = whole.next_frame().unwrap() {
            got.push(f);
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn frames_over_the_limit_are_refused_from_the_header(ty in frame_type(), extra in 1u32..1000) {
        let limits = Limits { max_frame_len: 100, max_control_len: 50, ..Limits::DEFAULT };
        let max = if ty.is_control() { 50 } else { 100 };
        let mut header = (max + extra).to_be_bytes().to_vec();
        header.push(ty as u8);
        let mut decoder = FrameDecoder::new(limits);
        decoder.feed(&header);
        prop_assert!(decoder.next_frame_ref().is_err());
    }

    #[test]
    fn field_blocks_round_trip(event in event(), tail in vec(any::<u8>(), 0..8)) {
        let mut buf = Vec::new();
        event.encode_fields(&mut buf);
        let len = buf.len();
        buf.extend_from_slice(&tail);
        let (back, used) = Event::decode_fields(&buf, &Limits::DEFAULT).unwrap();
        prop_assert_eq!(used, len);
        prop_assert_eq!(back, event);
    }

    #[test]
    fn event_payloads_round_trip_and_scan_agrees(seq in any::<u64>(), event in event()) {
        let mut payload = Vec::new();
        encode_event_payload(seq, &event, &mut payload);
        let (back_seq, back) = decode_event_payload(&payload, &Limits::DEFAULT).unwrap();
        prop_assert_eq!(back_seq, seq);
        prop_assert_eq!(&back, &event);
        let scan = scan_event_payload(&payload, &Limits::DEFAULT).unwrap();
        prop_assert_eq!(scan.seq, seq);
        prop_assert_eq!(scan.fields_start, 8);
        prop_assert_eq!(
            scan.has_trusted,
            event.fields.iter().any(|f| f.name.starts_with(TRUSTED_PREFIX))
        );
        prop_assert_eq!(scan.cursor.map(|r| &payload[r]), event.get(CURSOR));
        // Quarantined names stay valid, so the stored event decodes.
        let mut stored = event.clone();
        stored.quarantine_trusted();
        for f in &stored.fields {
            prop_assert!(validate_field_name(f.name.as_bytes(), 64).is_ok(), "{}", f.name);
        }
    }

    #[test]
    fn scan_and_decode_agree_under_any_limits(
        seq in any::<u64>(),
        event in event(),
        limits in limits(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut payload = Vec::new();
        encode_event_payload(seq, &event, &mut payload);
        // Whole, and cut short anywhere.
        for payload in [&payload[..], &payload[..cut.index(payload.len() + 1)]] {
            let full = decode_event_payload(payload, &limits).map(|_| ());
            let scan = scan_event_payload(payload, &limits).map(|_| ());
            prop_assert_eq!(full, scan);
        }
    }

    #[test]
    fn records_round_trip_and_views_agree(records in vec(record(), 0..3)) {
        let mut buf = Vec::new();
        for r in &records {
            r.encode(&mut buf);
        }
        prop_assert_eq!(&Record::decode_all(&buf, &Limits::DEFAULT).unwrap(), &records);
        let views = RecordView::parse_all(&buf).unwrap();
        prop_assert_eq!(views.len(), records.len());
        for (v, r) in views.iter().zip(&records) {
            prop_assert_eq!((v.vm, v.stream), (r.vm.as_str(), r.stream.as_str()));
            prop_assert_eq!((v.received_usec, v.seq, v.kind), (r.received_usec, r.seq, r.kind));
            let fields: Vec<(&str, &[u8])> = v.fields().collect();
            let want: Vec<(&str, &[u8])> =
                r.event.fields.iter().map(|f| (f.name.as_str(), f.value.as_slice())).collect();
            prop_assert_eq!(fields, want);
            let mut one = Vec::new();
            r.encode(&mut one);
            prop_assert_eq!(v.bytes, &one[..]);
        }
    }

    #[test]
    fn ack_and_end_round_trip(seq in any::<u64>(), end in any::<bool>()) {
        let ty = if end { FrameType::End } else { FrameType::Ack };
        let wire = encode_u64(ty, seq);
        let mut decoder = FrameDecoder::new(Limits::DEFAULT);
        decoder.feed(&wire);
        let frame = decoder.next_frame().unwrap().unwrap();
        prop_assert_eq!(frame.ty, ty);
        prop_assert_eq!(decode_u64(ty, &frame.payload).unwrap(), seq);
    }

    #[test]
    fn hello_round_trips(
        versions in vec(any::<u16>(), 0..4),
        agent in text(),
        stream in text(),
        limits in proptest::option::of(limits()),
        heartbeat in proptest::option::of(any::<u32>()),
        telemetry in proptest::option::of(any::<u32>()),
    ) {
        let hello = Hello {
            versions,
            agent,
            stream,
            limits,
            heartbeat_interval_secs: heartbeat,
            telemetry_interval_secs: telemetry,
        };
        json_round_trip(FrameType::Hello, &hello)?;
    }

    #[test]
    fn welcome_round_trips(
        version in any::<u16>(),
        sink in text(),
        vm in vm_name(),
        stream in text(),
        limits in limits(),
        last_seq in any::<u64>(),
        cursor in proptest::option::of(text()),
    ) {
        let welcome =
            Welcome { version, sink, vm, stream, limits, resume: ResumePoint { last_seq, cursor } };
        json_round_trip(FrameType::Welcome, &welcome)?;
    }

    #[test]
    fn gap_heartbeat_and_error_round_trip(
        seq in any::<u64>(),
        reason in text(),
        missed in proptest::option::of(any::<u64>()),
        detail in text(),
        sent_usec in any::<u64>(),
        interval in proptest::option::of(any::<u32>()),
        code in error_code(),
        message in text(),
    ) {
        json_round_trip(FrameType::Gap, &Gap { seq, reason, missed, detail })?;
        json_round_trip(FrameType::Heartbeat, &Heartbeat { sent_usec, interval_secs: interval })?;
        let error = ErrorFrame::new(code, message);
        json_round_trip(FrameType::Error, &error)?;
        let mut decoder = FrameDecoder::new(Limits::DEFAULT);
        decoder.feed(&error.encode());
        let frame = decoder.next_frame().unwrap().unwrap();
        prop_assert_eq!(decode_json::<ErrorFrame>(FrameType::Error, &frame.payload).unwrap(), error);
    }

    #[test]
    fn requests_round_trip(request in request()) {
        json_round_trip(FrameType::Query, &request)?;
    }

    #[test]
    fn query_replies_round_trip(
        matched in any::<u64>(),
        missed in any::<u64>(),
        vms in vec(vm_info(), 0..3),
    ) {
        json_round_trip(FrameType::Done, &Done { matched })?;
        json_round_trip(FrameType::Lagged, &Lagged { missed })?;
        json_round_trip(FrameType::Reply, &VmsReply { vms })?;
    }

    #[test]
    fn unknown_json_fields_are_ignored(extra in "[a-z_]{1,12}", value in any::<u64>()) {
        // A newer peer may add fields; an older one must still read the message.
        let known: std::collections::BTreeSet<&str> =
            ["versions", "agent", "stream", "limits", "heartbeat_interval_secs", "telemetry_interval_secs"]
                .into();
        prop_assume!(!known.contains(extra.as_str()));
        let json = format!(r#"{{"versions":[1],"agent":"a","stream":"journal","{extra}":{value}}}"#);
        let hello: Hello = decode_json(FrameType::Hello, json.as_bytes()).unwrap();
        prop_assert_eq!(hello.versions, vec![1]);
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Distinct names in any order: the field block keeps order and repeats.
    #[test]
    fn field_order_and_repeats_survive(names in btree_set("[A-Z]{1,8}", 1..8), repeat in 1usize..4) {
        let mut event = Event::new();
        for _ in 0..repeat {
            for (i, name) in names.iter().enumerate().rev() {
                event.push(name.clone(), vec![i as u8]);
            }
        }
        let mut buf = Vec::new();
        event.encode_fields(&mut buf);
        prop_assert_eq!(Event::decode_fields(&buf, &Limits::DEFAULT).unwrap().0, event);
    }
}
