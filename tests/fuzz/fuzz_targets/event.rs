//! Fuzzes the binary field-block codecs directly: an ingest `Event` payload (full decode
//! against the allocation-free scan) and stored `Record`s (decode against the in-place
//! view the sink filters with).
//!
//! Input: 10 knob bytes (which decoder, limits), then the payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qlog_fuzz::payloads::{check_event, check_records};
use qlog_fuzz::{Knobs, NO_FLOOR};

fuzz_target!(|data: &[u8]| {
    let (mut knobs, payload) = Knobs::split(data, 10);
    let which = knobs.byte();
    let limits = knobs.limits(&NO_FLOOR);
    if which & 1 == 0 {
        check_event(payload, &limits);
    } else {
        check_records(payload, &limits);
    }
});
