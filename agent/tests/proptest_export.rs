//! Property tests of the journal export parser: entries written in the export format
//! (text and binary fields, any values) parse back to the same fields however the input
//! is cut into reads; under small limits every entry stays bounded and, once fitted by
//! `limits::finish`, is an event the sink accepts. tests/fuzz/fuzz_targets/export.rs
//! throws hostile bytes at the same parser.

use std::convert::Infallible;

use proptest::collection::vec;
use proptest::prelude::*;
use qlog_agent::export::ExportParser;
use qlog_agent::limits::{finish, fits, sanitize_field_name, RawEntry, RawField, ReadLimits};
use qlog_rpc::event::{decode_event_payload, encode_event_payload};
use qlog_rpc::Limits;

/// One field as journalctl would write it: binary form when the value holds a newline
/// (or when `binary` asks for it), text form otherwise.
#[derive(Debug, Clone)]
struct Written {
    name: Vec<u8>,
    value: Vec<u8>,
    binary: bool,
}

fn written() -> impl Strategy<Value = Written> {
    let name = prop_oneof![
        4 => "[A-Z_][A-Z0-9_]{0,20}".prop_map(String::into_bytes),
        // What journald would never write, but a pipe into --stdin-export might: the
        // parser sanitises it.
        1 => vec(any::<u8>().prop_filter("framing", |b| *b != b'=' && *b != b'\n'), 1..80),
    ];
    let value = prop_oneof![
        3 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..300),
    ];
    (name, value, any::<bool>()).prop_map(|(name, value, binary)| {
        let binary = binary || value.contains(&b'\n');
        Written { name, value, binary }
    })
}

fn write(entries: &[Vec<Written>], last_blank: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        for f in entry {
            out.extend_from_slice(&f.name);
            if f.binary {
                out.push(b'\n');
                out.extend_from_slice(&(f.value.len() as u64).to_le_bytes());
                out.extend_from_slice(&f.value);
            } else {
                out.push(b'=');
                out.extend_from_slice(&f.value);
            }
            out.push(b'\n');
        }
        if i + 1 < entries.len() || last_blank {
            out.push(b'\n');
        }
    }
    out
}

/// Parses `input` cut at `cuts` (positions as fractions of its length).
fn parse(input: &[u8], cuts: &[prop::sample::Index], limits: ReadLimits) -> (Vec<RawEntry>, u64) {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
    at.extend([0, input.len()]);
    at.sort_unstable();
    let mut parser = ExportParser::new(limits);
    let mut entries = Vec::new();
    for pair in at.windows(2) {
        parser
            .feed(&input[pair[0]..pair[1]], |e| {
                entries.push(e);
                Ok::<(), Infallible>(())
            })
            .unwrap();
    }
    entries.extend(parser.finish().entry);
    (entries, parser.malformed())
}

fn generous() -> ReadLimits {
    ReadLimits { max_fields: 1 << 20, max_value_len: 1 << 20, max_entry_bytes: 1 << 24 }
}

fn small_limits() -> impl Strategy<Value = Limits> {
    (64u32..2048, 1u32..12, 0u32..200, 1u32..=64).prop_map(
        |(max_frame_len, max_fields, max_value_len, max_name_len)| Limits {
            max_frame_len,
            max_control_len: 1024,
            max_fields,
            max_value_len,
            max_name_len,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn entries_round_trip_through_any_reads(
        entries in vec(vec(written(), 1..8), 0..5),
        last_blank in any::<bool>(),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let input = write(&entries, last_blank);
        let (got, malformed) = parse(&input, &cuts, generous());
        prop_assert_eq!(malformed, 0);
        let want: Vec<RawEntry> = entries
            .iter()
            .map(|e| RawEntry {
                fields: e
                    .iter()
                    .map(|f| RawField {
                        name: sanitize_field_name(&f.name),
                        value: f.value.clone(),
                        original_len: f.value.len() as u64,
                    })
                    .collect(),
                dropped_fields: 0,
            })
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn reads_do_not_change_what_any_bytes_parse_to(
        input in vec(any::<u8>(), 0..400),
        cuts in vec(any::<prop::sample::Index>(), 1..12),
    ) {
        prop_assert_eq!(parse(&input, &cuts, generous()), parse(&input, &[], generous()));
    }

    #[test]
    fn small_limits_bound_every_entry_and_finish_fits_it(
        entries in vec(vec(written(), 1..20), 1..4),
        limits in small_limits(),
        cuts in vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let read = ReadLimits::from_limits(&limits);
        let input = write(&entries, true);
        let (got, _) = parse(&input, &cuts, read);
        prop_assert_eq!(got.len(), entries.len());
        for (entry, written) in got.into_iter().zip(&entries) {
            prop_assert!(entry.fields.len() <= read.max_fields);
            prop_assert_eq!(entry.fields.len() as u64 + entry.dropped_fields, written.len() as u64);
            let kept: usize = entry.fields.iter().map(|f| f.value.len()).sum();
            prop_assert!(kept <= read.max_entry_bytes);
            for (f, w) in entry.fields.iter().zip(written) {
                prop_assert_eq!(f.original_len, w.value.len() as u64);
                prop_assert!(w.value.starts_with(&f.value), "a kept value is a prefix");
            }
            let event = finish(entry, &limits);
            prop_assert!(fits(&event, &limits));
            let mut payload = Vec::new();
            encode_event_payload(1, &event, &mut payload);
            let (_, back) = decode_event_payload(&payload, &limits).unwrap();
            prop_assert_eq!(back, event);
        }
    }
}
