//! LZ4 compression at a high-compression (HC) level, through liblz4 (the C library,
//! built and linked by the lz4-sys crate), for the chunks batch.rs writes.
//!
//! Only compression runs here. Reading is the part that parses bytes a damaged or
//! tampered file can make anything, and it stays in safe Rust: batch.rs inflates with
//! lz4_flex. The HC levels write ordinary LZ4 blocks, so nothing about the format
//! changes; they search harder for matches, which takes more time to compress and
//! leaves fewer, longer matches, which inflate faster. liblz4 reads the input and writes
//! the output only within the lengths it is given, and the inputs here are records the
//! sink has already parsed and bounded.
//!
//! Measured with the benchmark's journald-like records in 1 MiB batches, cut into a
//! 16 KiB dictionary chunk and 4 KiB chunks, against lz4_flex's fast compressor: a
//! quarter fewer bytes, about the same compression speed on one core (some 200 MB/s;
//! lz4_flex re-reads the dictionary for every chunk, which an attached HC dictionary does
//! not), and 1.5 to 1.9 times the inflate speed. liblz4's own fast mode compresses about
//! three times as fast as HC but saved only 5% of the bytes; the committer spreads HC
//! over the cores instead.
//!
//! A batch's later chunks are compressed against chunk 0 as a dictionary. Loading a
//! dictionary into a stream costs as much as compressing it, so it is loaded once per
//! batch, into its own stream, and each chunk's stream refers to it
//! (`LZ4_attach_HC_dictionary`) instead of loading or copying it.

use std::cell::RefCell;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;

// lz4-sys builds liblz4 1.10 but declares only some of its functions. These are part of
// liblz4's stable API (lz4hc.h); naming the crate makes cargo link the library.
use lz4_sys as _;

extern "C" {
    fn LZ4_createStreamHC() -> *mut c_void;
    fn LZ4_freeStreamHC(stream: *mut c_void) -> c_int;
    fn LZ4_resetStreamHC_fast(stream: *mut c_void, level: c_int);
    fn LZ4_loadDictHC(stream: *mut c_void, dictionary: *const c_char, size: c_int) -> c_int;
    fn LZ4_attach_HC_dictionary(working: *mut c_void, dictionary: *const c_void);
    fn LZ4_compress_HC_continue(
        stream: *mut c_void,
        src: *const c_char,
        dst: *mut c_char,
        src_size: c_int,
        dst_capacity: c_int,
    ) -> c_int;
}

/// liblz4's compression level. 3 is its fastest hash-chain level; higher levels took
/// longer here and saved under 1% more.
const LEVEL: c_int = 3;

/// The largest input liblz4 compresses in one call (`LZ4_MAX_INPUT_SIZE`).
const MAX_INPUT: usize = 0x7E00_0000;

/// The most bytes LZ4 can make of `n` bytes (`LZ4_COMPRESSBOUND`).
fn bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// One liblz4 HC stream (about 256 KiB of tables), freed on drop.
struct Stream(NonNull<c_void>);

impl Stream {
    fn new() -> Stream {
        // SAFETY: takes no arguments; returns a new stream or NULL.
        let stream = unsafe { LZ4_createStreamHC() };
        Stream(NonNull::new(stream).expect("out of memory for an LZ4 stream"))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream came from LZ4_createStreamHC and is freed once.
        unsafe { LZ4_freeStreamHC(self.0.as_ptr()) };
    }
}

/// The two streams a [`Compressor`] uses: the dictionary's and the one chunks are
/// compressed in.
struct Streams {
    dictionary: Stream,
    work: Stream,
}

thread_local! {
    /// The streams of the thread's last compressor, for its next one. A batch of a few
    /// records is compressed in well under a millisecond, and allocating two streams
    /// (fresh, zeroed pages) for each would cost about as much again.
    static SPARE: RefCell<Option<Streams>> = const { RefCell::new(None) };
}

/// Compresses the chunks of one batch, each alone or against one dictionary.
pub struct Compressor<'d> {
    /// liblz4 keeps pointers into the dictionary's bytes: the borrow keeps them valid
    /// and unchanged for as long as the streams may read them. A stream given back to
    /// [`SPARE`] is reset before it is used again, and a reset reads none of them.
    _dictionary: &'d [u8],
    /// Always `Some` until drop gives the streams back.
    streams: Option<Streams>,
}

impl<'d> Compressor<'d> {
    /// A compressor whose [`Compressor::compress`] can refer back to `dictionary` (LZ4
    /// reaches at most its last 64 KiB).
    pub fn new(dictionary: &'d [u8]) -> Compressor<'d> {
        let streams = SPARE
            .with(|spare| spare.borrow_mut().take())
            .unwrap_or_else(|| Streams { dictionary: Stream::new(), work: Stream::new() });
        let keep = &dictionary[dictionary.len().saturating_sub(64 * 1024)..];
        let dict_stream = streams.dictionary.0.as_ptr();
        // SAFETY: the stream is valid. Loading starts it afresh; liblz4 reads
        // `keep.len()` bytes at `keep` and keeps pointers into them, which the lifetime
        // 'd keeps valid while this compressor can use them.
        unsafe {
            LZ4_resetStreamHC_fast(dict_stream, LEVEL);
            LZ4_loadDictHC(dict_stream, keep.as_ptr().cast(), keep.len() as c_int);
        }
        Compressor { _dictionary: dictionary, streams: Some(streams) }
    }

    /// Appends `input` as one LZ4 block to `out`, compressed against the dictionary if
    /// `with_dictionary`; returns the block's length.
    ///
    /// # Panics
    ///
    /// If `input` is over liblz4's 2 GiB limit: a chunk is kilobytes.
    pub fn compress(&mut self, input: &[u8], with_dictionary: bool, out: &mut Vec<u8>) -> usize {
        assert!(input.len() <= MAX_INPUT, "an LZ4 input of {} bytes", input.len());
        let at = out.len();
        let capacity = bound(input.len());
        out.resize(at + capacity, 0);
        let streams = self.streams.as_ref().expect("streams are kept until drop");
        let (work, dictionary) = (streams.work.0.as_ptr(), streams.dictionary.0.as_ptr());
        // SAFETY: both streams are valid. The reset forgets the previous chunk (liblz4
        // then dereferences nothing of it), and attaches at most the dictionary stream,
        // whose bytes 'd keeps valid. liblz4 reads `input.len()` bytes of `input` and
        // writes at most `capacity` bytes at `out[at..]`, which is that long.
        let written = unsafe {
            LZ4_resetStreamHC_fast(work, LEVEL);
            if with_dictionary {
                LZ4_attach_HC_dictionary(work, dictionary);
            }
            LZ4_compress_HC_continue(
                work,
                input.as_ptr().cast(),
                out[at..].as_mut_ptr().cast(),
                input.len() as c_int,
                capacity as c_int,
            )
        };
        // Into LZ4's worst-case size, compression cannot fail: 0 would be a broken
        // library, and storing nothing would lose the records.
        assert!(written > 0 || input.is_empty(), "liblz4 failed on {} bytes", input.len());
        let written = written.max(0) as usize;
        out.truncate(at + written);
        written
    }
}

impl Drop for Compressor<'_> {
    fn drop(&mut self) {
        let streams = self.streams.take();
        // The work stream may still point at this batch's chunks and dictionary: every
        // use begins with a reset (and the dictionary stream with a load), which forgets
        // them without reading them.
        SPARE.with(|spare| *spare.borrow_mut() = streams);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate(block: &[u8], len: usize, dictionary: Option<&[u8]>) -> Vec<u8> {
        let mut raw = vec![0; len];
        let n = match dictionary {
            None => lz4_flex::block::decompress_into(block, &mut raw),
            Some(d) => lz4_flex::block::decompress_into_with_dict(block, &mut raw, d),
        }
        .expect("lz4_flex inflates what liblz4 wrote");
        assert_eq!(n, len);
        raw
    }

    /// Bytes like a VM's log lines, plus a deterministic noise generator.
    fn lines(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut out = Vec::new();
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(
                format!("MESSAGE=export file {:012x}: permission denied\n_PID={}\n", x, x % 9999)
                    .as_bytes(),
            );
        }
        out.truncate(n);
        out
    }

    #[test]
    fn lz4_flex_inflates_every_block_with_and_without_the_dictionary() {
        let dictionary = lines(16 * 1024, 1);
        let mut c = Compressor::new(&dictionary);
        let mut x = 7u64;
        let noise: Vec<u8> = (0..5000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"x".to_vec(),
            lines(4096, 2),
            dictionary[100..4196].to_vec(), // all of it in the dictionary
            noise,                          // incompressible
            vec![0u8; 100_000],
            lines(70 * 1024, 3), // longer than LZ4's 64 KiB window
        ];
        let mut out = Vec::new();
        for input in &inputs {
            for with_dictionary in [false, true] {
                out.clear();
                let n = c.compress(input, with_dictionary, &mut out);
                assert_eq!(n, out.len());
                assert!(n <= bound(input.len()));
                let d = with_dictionary.then_some(&dictionary[..]);
                assert_eq!(inflate(&out, input.len(), d), *input, "{} bytes", input.len());
            }
        }
        // The dictionary is what makes a chunk small.
        let (mut alone, mut against) = (Vec::new(), Vec::new());
        c.compress(&dictionary[100..4196], false, &mut alone);
        c.compress(&dictionary[100..4196], true, &mut against);
        assert!(against.len() * 10 < alone.len(), "{} vs {}", against.len(), alone.len());
    }

    #[test]
    fn a_compressor_reusing_the_last_ones_streams_knows_only_its_own_dictionary() {
        let (first, second) = (lines(16 * 1024, 5), lines(16 * 1024, 6));
        let mut out = Vec::new();
        {
            let mut c = Compressor::new(&first);
            c.compress(&first[..4096], true, &mut out);
        }
        // The same thread: the streams come back, and must hold nothing of `first`.
        let mut c = Compressor::new(&second);
        for input in [&first[..4096], &second[..4096]] {
            out.clear();
            c.compress(input, true, &mut out);
            assert_eq!(inflate(&out, 4096, Some(&second)), input);
        }
        assert!(out.len() < 100, "the second dictionary was used: {}", out.len());
    }

    #[test]
    fn a_dictionary_longer_than_the_window_is_referred_to_by_its_end() {
        let dictionary = lines(200 * 1024, 4);
        let mut c = Compressor::new(&dictionary);
        let input = dictionary[dictionary.len() - 4096..].to_vec();
        let mut out = Vec::new();
        c.compress(&input, true, &mut out);
        assert!(out.len() < 100, "{}", out.len());
        assert_eq!(inflate(&out, input.len(), Some(&dictionary)), input);
    }
}
