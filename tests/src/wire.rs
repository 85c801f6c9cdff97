//! Reading whole frames from a blocking byte stream, for the harness's clients.
//!
//! Owns turning `read()` results into frames with `qlog_rpc`'s decoder, and telling a
//! clean end of stream apart from one cut inside a frame. Deadlines are the socket's read
//! timeout, set by the caller.

use std::io::{self, Read};

use qlog_rpc::{Frame, FrameDecoder, FrameError, Limits};

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Includes timeouts (`WouldBlock` or `TimedOut`) and a reset by the peer.
    #[error("reading from the peer failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
}

impl ReadError {
    /// True if and only if the read gave up at its deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ReadError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    /// True if and only if the peer reset the connection, as a Unix socket closed with
    /// unread data does; for a test this usually means the same as end of stream.
    pub fn is_reset(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// Frames from a byte stream, with `Limits::DEFAULT` (what the sink sends within).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            decoder: FrameDecoder::new(Limits::DEFAULT),
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            let n = match self.inner.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::frame::encode_to_vec;
    use qlog_rpc::FrameType;

    #[test]
    fn reads_frames_then_reports_clean_and_cut_ends() {
        let mut wire = encode_to_vec(FrameType::Ack, &1u64.to_be_bytes());
        wire.extend(encode_to_vec(FrameType::Done, b"{\"matched\":0}"));
        let mut reader = FrameReader::new(&wire[..]);
        assert_eq!(reader.next_frame().unwrap().unwrap().ty, FrameType::Ack);
        assert_eq!(reader.next_frame().unwrap().unwrap().ty, FrameType::Done);
        assert!(reader.next_frame().unwrap().is_none());

        let mut reader = FrameReader::new(&wire[..7]);
        assert!(matches!(reader.next_frame(), Err(ReadError::Frame(FrameError::Truncated { .. }))));
    }
}
