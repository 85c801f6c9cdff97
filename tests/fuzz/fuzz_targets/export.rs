//! Fuzzes the agent's journal export parser: any input cut into any reads must give the
//! same entries as the input in one piece; every entry must stay within the read
//! limits; and every entry, fitted to the sink's limits by `limits::finish`, must be an
//! event the sink accepts (an event it rejected would block the agent's stream forever).
//!
//! Input: 13 knob bytes (limits, read sizes), then the export stream.

#![no_main]

use std::convert::Infallible;

use libfuzzer_sys::fuzz_target;
use qlog_agent::export::{ExportParser, Finished};
use qlog_agent::limits::{finish, fits, RawEntry, ReadLimits};
use qlog_fuzz::payloads::check_event;
use qlog_fuzz::{pieces, Knobs};
use qlog_rpc::event::{decode_event_payload, encode_event_payload};
use qlog_rpc::Limits;

/// The smallest limits a sink may announce for which `finish` promises a fit: room for
/// the event header and one `QLOG_TRUNCATED=fields:N` marker, one field, one-byte names.
const FLOOR: Limits = Limits {
    max_frame_len: 64,
    max_control_len: 0,
    max_fields: 1,
    max_value_len: 0,
    max_name_len: 1,
};

fn parse(limits: ReadLimits, reads: &[&[u8]]) -> (Vec<RawEntry>, Finished, u64) {
    let mut parser = ExportParser::new(limits);
    let mut entries = Vec::new();
    for read in reads {
        parser
            .feed(read, |e| {
                entries.push(e);
                Ok::<(), Infallible>(())
            })
            .unwrap();
    }
    let finished = parser.finish();
    (entries, finished, parser.malformed())
}

fuzz_target!(|data: &[u8]| {
    let (mut knobs, stream) = Knobs::split(data, 13);
    let limits = knobs.limits(&FLOOR);
    let read = ReadLimits::from_limits(&limits);
    let sizes = knobs.chunks(stream.len());

    let whole = parse(read, &[stream]);
    let cut = parse(read, &pieces(stream, &sizes));
    assert_eq!(whole, cut, "the same input read in other pieces parsed differently");

    let (entries, finished, _) = whole;
    for entry in entries.into_iter().chain(finished.entry) {
        assert!(!entry.fields.is_empty());
        assert!(entry.fields.len() <= read.max_fields);
        let kept: usize = entry.fields.iter().map(|f| f.value.len()).sum();
        assert!(kept <= read.max_entry_bytes, "an entry kept more than its memory bound");
        for f in &entry.fields {
            assert!(f.value.len() <= read.max_value_len);
            assert!(f.value.len() as u64 <= f.original_len);
        }
        let event = finish(entry, &limits);
        assert!(fits(&event, &limits), "finish left an event over the limits");
        let mut payload = Vec::new();
        encode_event_payload(1, &event, &mut payload);
        assert!(payload.len() <= limits.max_frame_len as usize);
        let (_, back) = decode_event_payload(&payload, &limits).expect("the sink rejects it");
        assert_eq!(back, event);
        check_event(&payload, &limits);
    }
});
