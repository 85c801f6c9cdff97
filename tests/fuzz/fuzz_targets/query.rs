//! Fuzzes the query plane's request parsing, as qlogd reads it: a `Query` frame's JSON
//! into a `Request`, then the sink's filter compilation (`CompiledFilter::new`, which
//! bounds what a request may ask for) and evaluation against records built to hit each
//! criterion. Requests that decode must survive re-encoding.
//!
//! Input: the JSON payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qlog_rpc::message::decode_json;
use qlog_rpc::query::{EventsQuery, Record, RecordKind, RecordView, Request};
use qlog_rpc::{Event, FrameType};
use qlog_sink::filter::CompiledFilter;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_json::<Request>(FrameType::Query, data) else { return };
    let again = serde_json::to_vec(&request).expect("requests serialise");
    let back: Request = decode_json(FrameType::Query, &again).expect("re-encoded requests decode");
    assert_eq!(back, request);
    let Request::Events(query) = request else { return };
    let Ok(filter) = CompiledFilter::new(&query.filter) else { return };
    for record in records(&query) {
        let mut buf = Vec::new();
        record.encode(&mut buf);
        let view = RecordView::parse(&buf).expect("encoded records parse");
        let hit = filter.matches(&view);
        if hit {
            assert!(filter.in_time_range(record.received_usec));
        }
    }
});

/// Records that carry the values the query names, so that evaluation gets past the first
/// criterion; names that are not valid field names are left out, as a VM cannot send them.
fn records(q: &EventsQuery) -> Vec<Record> {
    let f = &q.filter;
    let mut hit = Event::new();
    if let Some((lo, _)) = f.priority {
        hit.push("PRIORITY", lo.min(9).to_string());
    }
    for u in f.units.iter().take(4) {
        hit.push("_SYSTEMD_UNIT", u.as_bytes());
        hit.push("UNIT", format!("{u}.service"));
    }
    hit.push("_PID", "1");
    hit.push("_UID", "0");
    for i in f.identifiers.iter().take(4) {
        hit.push("SYSLOG_IDENTIFIER", i.as_bytes());
    }
    if let Some(g) = &f.grep {
        hit.push("MESSAGE", g.pattern.as_bytes());
    }
    for (name, value) in f.matches.iter().take(8) {
        if qlog_rpc::event::validate_field_name(name.as_bytes(), 64).is_ok() {
            hit.push(name.as_str(), value.as_bytes());
        }
    }
    let mut plain = Event::new();
    plain.push("MESSAGE", "hello from sd-app");
    plain.push("PRIORITY", "x");
    let at = f.since_usec.unwrap_or(0).max(f.until_usec.unwrap_or(0));
    let vm = q.vms.first().filter(|v| v.len() <= 31).cloned().unwrap_or_else(|| "sd-app".into());
    [(hit.clone(), at), (hit, 0), (plain, u64::MAX)]
        .into_iter()
        .map(|(event, received_usec)| Record {
            vm: vm.clone(),
            stream: "journal".into(),
            received_usec,
            seq: 1,
            kind: RecordKind::Event,
            event,
        })
        .collect()
}
