//! Length-prefixed frames over a byte stream that has no message boundaries.
//!
//! A frame is a 5-byte header, a big-endian `u32` payload length and a one-byte
//! [`FrameType`], followed by the payload. [`FrameDecoder`] is incremental: bytes go in as
//! they arrive, whole frames come out. It rejects a frame from its header alone, before any
//! payload is buffered, when the type is unknown or the length is over the limit.

use thiserror::Error;

use crate::limits::Limits;

/// Bytes before every payload: length (4) and type (1).
pub const HEADER_LEN: usize = 5;

/// What a frame carries. The numbers are the wire values and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Agent to sink, first frame: JSON [`crate::Hello`].
    Hello = 0x01,
    /// Sink to agent, answer to hello: JSON [`crate::Welcome`].
    Welcome = 0x02,
    /// Agent to sink: one binary event with its sequence number.
    Event = 0x03,
    /// Sink to agent: cumulative ack, binary `u64` sequence number.
    Ack = 0x04,
    /// Either way: end of stream, binary `u64` last sequence number.
    End = 0x05,
    /// Either way: JSON [`crate::ErrorFrame`]; the sender closes after it.
    Error = 0x06,
    /// Agent to sink: JSON [`crate::Gap`], events the agent knows are missing.
    Gap = 0x07,
    /// Agent to sink: JSON [`crate::Heartbeat`].
    Heartbeat = 0x08,
    /// Agent to sink: JSON [`crate::telemetry::Sample`].
    Telemetry = 0x09,
    /// CLI to sink: JSON [`crate::query::Request`].
    Query = 0x20,
    /// Sink to CLI: one binary [`crate::query::Record`].
    Record = 0x21,
    /// Sink to CLI: JSON [`crate::query::Lagged`].
    Lagged = 0x22,
    /// Sink to CLI: JSON [`crate::query::Done`], the historical part is complete.
    Done = 0x23,
    /// Sink to CLI: a JSON reply that is not a stream of records.
    Reply = 0x24,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Welcome,
            0x03 => Event,
            0x04 => Ack,
            0x05 => End,
            0x06 => Error,
            0x07 => Gap,
            0x08 => Heartbeat,
            0x09 => Telemetry,
            0x20 => Query,
            0x21 => Record,
            0x22 => Lagged,
            0x23 => Done,
            0x24 => Reply,
            _ => return None,
        })
    }

    /// True if and only if the payload is bounded by `max_control_len` rather than
    /// `max_frame_len`: the small JSON frames. `Reply` carries a table that grows with
    /// the number of VMs, so it gets the larger bound.
    pub fn is_control(self) -> bool {
        !matches!(
            self,
            FrameType::Event
                | FrameType::Ack
                | FrameType::End
                | FrameType::Record
                | FrameType::Reply
        )
    }
}

/// One whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ty: FrameType,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("unknown frame type 0x{ty:02x}")]
    UnknownType { ty: u8 },
    #[error("{ty:?} frame of {len} bytes is over the limit of {max}")]
    TooLarge { ty: FrameType, len: u32, max: u32 },
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
}

/// Appends one frame to `out`.
///
/// # Panics
///
/// If `payload` is longer than `u32::MAX`; the encoders in this crate never build such a
/// payload because every limit is far below it.
pub fn encode(ty: FrameType, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("payloads are bounded far below 4 GiB");
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(ty as u8);
    out.extend_from_slice(payload);
}

/// Encodes one frame into a new buffer.
pub fn encode_to_vec(ty: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    encode(ty, payload, &mut out);
    out
}

/// Incremental frame decoder with bounded buffering.
///
/// Call [`FrameDecoder::next_frame`] until it returns `Ok(None)` before feeding more
/// bytes; then the buffer never holds more than one partial frame plus one read.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames; compacted lazily.
    start: usize,
}

impl FrameDecoder {
    pub fn new(limits: Limits) -> FrameDecoder {
        FrameDecoder { limits, buf: Vec::new(), start: 0 }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && (self.start == self.buf.len() || self.start > 64 * 1024) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Reads once from `reader` (up to `chunk` bytes) straight into the buffer, after
    /// dropping the frames already returned. A blocking reader needs no buffer of its
    /// own, and the memory held stays about one read plus one frame however long the
    /// stream runs: a short-lived client touches few fresh pages. Returns what `read`
    /// returned; 0 is the end of the stream.
    pub fn read_from(
        &mut self,
        reader: &mut impl std::io::Read,
        chunk: usize,
    ) -> std::io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let have = self.buf.len();
        self.buf.resize(have + chunk, 0);
        let result = reader.read(&mut self.buf[have..]);
        self.buf.truncate(have + result.as_ref().map_or(0, |&n| n));
        result
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Returns the next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(self.next_frame_ref()?.map(|(ty, payload)| Frame { ty, payload: payload.to_vec() }))
    }

    /// Like [`FrameDecoder::next_frame`], but borrows the payload from the decoder's
    /// buffer instead of copying it: the hot path of ingest.
    pub fn next_frame_ref(&mut self) -> Result<Option<(FrameType, &[u8])>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let ty = FrameType::from_u8(avail[4]).ok_or(FrameError::UnknownType { ty: avail[4] })?;
        let max =
            if ty.is_control() { self.limits.max_control_len } else { self.limits.max_frame_len };
        if len > max {
            return Err(FrameError::TooLarge { ty, len, max });
        }
        let total = HEADER_LEN + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let begin = self.start + HEADER_LEN;
        self.start += total;
        Ok(Some((ty, &self.buf[begin..self.start])))
    }

    /// Call at end of stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frames_straight_from_a_reader_in_small_chunks() {
        let mut wire = Vec::new();
        let big = vec![7u8; 5000];
        for i in 0..50u8 {
            encode(FrameType::Record, &big[..100 + i as usize * 97], &mut wire);
            encode(FrameType::Ack, &u64::from(i).to_be_bytes(), &mut wire);
        }
        let mut reader = &wire[..];
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        let mut got = Vec::new();
        loop {
            while let Some((ty, payload)) = dec.next_frame_ref().unwrap() {
                got.push((ty, payload.len()));
            }
            // Chunks smaller than most frames: a frame is completed over several reads.
            if dec.read_from(&mut reader, 333).unwrap() == 0 {
                break;
            }
            assert!(dec.buf.capacity() < 2 * (5000 + 333), "held {}", dec.buf.capacity());
        }
        dec.finish().unwrap();
        assert_eq!(got.len(), 100);
        for (i, pair) in got.chunks(2).enumerate() {
            assert_eq!(pair[0], (FrameType::Record, 100 + i * 97));
            assert_eq!(pair[1], (FrameType::Ack, 8));
        }
    }

    #[test]
    fn decodes_frames_fed_one_byte_at_a_time() {
        let mut wire = Vec::new();
        encode(FrameType::Ack, &7u64.to_be_bytes(), &mut wire);
        encode(FrameType::Hello, b"{}", &mut wire);
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        let mut frames = Vec::new();
        for b in &wire {
            dec.feed(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].ty, FrameType::Ack);
        assert_eq!(frames[1].payload, b"{}");
        dec.finish().unwrap();
    }

    #[test]
    fn rejects_oversized_frame_from_its_header_alone() {
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        dec.feed(&[0xff, 0xff, 0xff, 0xff, FrameType::Event as u8]);
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        dec.feed(&[0, 1, 0, 1, FrameType::Hello as u8]);
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn rejects_unknown_type_and_reports_truncation() {
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        dec.feed(&[0, 0, 0, 0, 0x7f]);
        assert_eq!(dec.next_frame(), Err(FrameError::UnknownType { ty: 0x7f }));
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        dec.feed(&[0, 0, 0, 9, FrameType::Event as u8, 1, 2]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.finish(), Err(FrameError::Truncated { buffered: 7 }));
    }
}
