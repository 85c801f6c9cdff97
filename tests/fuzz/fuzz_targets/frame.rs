//! Fuzzes the frame layer: the same stream decoded in one piece with `next_frame` and cut
//! into arbitrary reads with `next_frame_ref` must give the same frames and the same
//! error; the frames must re-encode to the bytes consumed; the decoder must never buffer
//! more than one partial frame. Every payload then goes to its type's decoder.
//!
//! Input: 13 knob bytes (limits, read sizes), then the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qlog_fuzz::payloads::check_payload;
use qlog_fuzz::{pieces, Knobs, NO_FLOOR};
use qlog_rpc::frame::{encode, FrameDecoder, HEADER_LEN};
use qlog_rpc::{Frame, FrameError};

fuzz_target!(|data: &[u8]| {
    let (mut knobs, stream) = Knobs::split(data, 13);
    let limits = knobs.limits(&NO_FLOOR);
    let sizes = knobs.chunks(stream.len());

    // Reference: everything at once.
    let mut whole = FrameDecoder::new(limits);
    whole.feed(stream);
    let mut want: Vec<Frame> = Vec::new();
    let want_err = loop {
        match whole.next_frame() {
            Ok(Some(f)) => want.push(f),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };

    // As reads arrive.
    let mut inc = FrameDecoder::new(limits);
    let mut got: Vec<Frame> = Vec::new();
    let mut got_err: Option<FrameError> = None;
    'reads: for piece in pieces(stream, &sizes) {
        inc.feed(piece);
        loop {
            match inc.next_frame_ref() {
                Ok(Some((ty, payload))) => got.push(Frame { ty, payload: payload.to_vec() }),
                Ok(None) => break,
                Err(e) => {
                    got_err = Some(e);
                    break 'reads;
                }
            }
        }
        // Bounded buffering: what is left after draining is less than one whole frame.
        let max = limits.max_frame_len.max(limits.max_control_len) as usize;
        assert!(inc.buffered() < HEADER_LEN + max.max(1));
    }
    assert_eq!(got, want, "incremental and one-piece decoding differ");
    assert_eq!(got_err, want_err);

    let mut again = Vec::new();
    for f in &want {
        encode(f.ty, &f.payload, &mut again);
    }
    assert_eq!(again, &stream[..again.len()], "frames re-encode to the bytes they came from");
    if want_err.is_none() {
        assert_eq!(whole.buffered(), stream.len() - again.len());
        assert_eq!(whole.finish().is_ok(), again.len() == stream.len());
    }

    for f in &want {
        assert!(f.payload.len() <= limits.max_frame_len.max(limits.max_control_len) as usize);
        check_payload(f.ty, &f.payload, &limits);
    }
});
