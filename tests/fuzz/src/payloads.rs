//! Decoding every frame payload with its type's own decoder, and the cross-checks that
//! hold for whatever decodes: JSON messages survive re-encoding, the allocation-free
//! scanners agree with the full decoders.

use qlog_rpc::event::{decode_event_payload, encode_event_payload, scan_event_payload};
use qlog_rpc::fields::{CURSOR, TRUSTED_PREFIX};
use qlog_rpc::message::{decode_json, decode_u64};
use qlog_rpc::query::{Done, Lagged, Record, RecordView, Request, VmsReply};
use qlog_rpc::{ErrorFrame, FrameType, Gap, Heartbeat, Hello, Limits, Welcome};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `payload` as a `ty` frame's payload and checks what decodes.
pub fn check_payload(ty: FrameType, payload: &[u8], limits: &Limits) {
    match ty {
        FrameType::Hello => json::<Hello>(ty, payload),
        FrameType::Welcome => json::<Welcome>(ty, payload),
        FrameType::Error => json::<ErrorFrame>(ty, payload),
        FrameType::Gap => json::<Gap>(ty, payload),
        FrameType::Heartbeat => json::<Heartbeat>(ty, payload),
        FrameType::Query => json::<Request>(ty, payload),
        FrameType::Lagged => json::<Lagged>(ty, payload),
        FrameType::Done => json::<Done>(ty, payload),
        FrameType::Reply => json::<VmsReply>(ty, payload),
        FrameType::Ack | FrameType::End => {
            if let Ok(v) = decode_u64(ty, payload) {
                assert_eq!(v.to_be_bytes().as_slice(), payload);
            } else {
                assert_ne!(payload.len(), 8);
            }
        }
        FrameType::Event => check_event(payload, limits),
        FrameType::Record => check_records(payload, limits),
        // A frame type added since this was written: at least its JSON must not panic.
        _ => {
            let _ = serde_json::from_slice::<serde_json::Value>(payload);
        }
    }
}

/// A JSON payload that decodes must decode to the same value after re-encoding.
fn json<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    ty: FrameType,
    payload: &[u8],
) {
    if let Ok(msg) = decode_json::<T>(ty, payload) {
        let again = serde_json::to_vec(&msg).expect("decoded messages serialise");
        let back: T = decode_json(ty, &again).expect("re-encoded messages decode");
        assert_eq!(back, msg);
    }
}

/// `scan_event_payload` promises to validate exactly as `decode_event_payload` does.
pub fn check_event(payload: &[u8], limits: &Limits) {
    let full = decode_event_payload(payload, limits);
    let scan = scan_event_payload(payload, limits);
    match (&full, &scan) {
        (Ok((seq, event)), Ok(scan)) => {
            assert_eq!(scan.seq, *seq);
            assert_eq!(scan.fields_start, 8);
            let trusted = event.fields.iter().any(|f| f.name.starts_with(TRUSTED_PREFIX));
            assert_eq!(scan.has_trusted, trusted);
            assert_eq!(scan.cursor.clone().map(|r| &payload[r]), event.get(CURSOR));
            let mut again = Vec::new();
            encode_event_payload(*seq, event, &mut again);
            assert_eq!(again, payload, "decoded events re-encode to the same bytes");
            // What the sink stores after quarantining must still decode under the
            // sink's own limits.
            let mut event = event.clone();
            event.quarantine_trusted();
            assert!(event.fields.iter().all(|f| !f.name.starts_with(TRUSTED_PREFIX)));
            let mut stored = Vec::new();
            encode_event_payload(*seq, &event, &mut stored);
            let wide = Limits { max_name_len: 64, ..*limits };
            decode_event_payload(&stored, &wide).expect("quarantined events decode");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "scan and decode disagree on the error"),
        _ => panic!("scan and decode disagree: {full:?} vs {scan:?}"),
    }
}

/// `Record::decode` checks everything `RecordView::parse` does and more, and both read
/// the same record.
pub fn check_records(buf: &[u8], limits: &Limits) {
    if let Ok((rec, used)) = Record::decode(buf, limits) {
        let view = RecordView::parse(buf).expect("a record that decodes parses as a view");
        assert_eq!(view.bytes.len(), used);
        assert_eq!((view.vm, view.stream), (rec.vm.as_str(), rec.stream.as_str()));
        assert_eq!(
            (view.received_usec, view.seq, view.kind),
            (rec.received_usec, rec.seq, rec.kind)
        );
        let fields: Vec<(&str, &[u8])> = view.fields().collect();
        let want: Vec<(&str, &[u8])> =
            rec.event.fields.iter().map(|f| (f.name.as_str(), f.value.as_slice())).collect();
        assert_eq!(fields, want);
        let mut again = Vec::new();
        rec.encode(&mut again);
        assert_eq!(again, &buf[..used]);
    }
    // Views are read from the store, whose bytes are trusted for layout only: walking the
    // fields of any view that parses must stay in bounds.
    if let Ok(views) = RecordView::parse_all(buf) {
        for v in views {
            for (name, value) in v.fields() {
                std::hint::black_box((name, value));
            }
        }
    }
    let _ = Record::decode_all(buf, limits);
}
