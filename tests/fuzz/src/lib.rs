//! Helpers shared by the fuzz targets: turning the front of a fuzz input into the knobs a
//! target varies (limits, read-chunk sizes), so that one byte string decides everything
//! and every crash reproduces from its artifact alone.

pub mod payloads;

use qlog_rpc::Limits;

/// No lower bound on any limit.
pub const NO_FLOOR: Limits = Limits {
    max_frame_len: 0,
    max_control_len: 0,
    max_fields: 0,
    max_value_len: 0,
    max_name_len: 0,
};

/// Reads knobs off the front of a fuzz input; past the end every knob reads as zero, so
/// short inputs still run.
pub struct Knobs<'a> {
    data: &'a [u8],
}

impl<'a> Knobs<'a> {
    /// Splits off `n` knob bytes; the rest of `data` is the target's input proper.
    pub fn split(data: &'a [u8], n: usize) -> (Knobs<'a>, &'a [u8]) {
        let n = n.min(data.len());
        (Knobs { data: &data[..n] }, &data[n..])
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// Limits: the defaults half the time, otherwise small ones, so that every cut and
    /// every "too large" branch is within reach of short inputs. Each limit is at least
    /// `floor`'s, for code whose contract assumes a sane sink ([`NO_FLOOR`] for decoders,
    /// which must cope with anything).
    pub fn limits(&mut self, floor: &Limits) -> Limits {
        let pick = self.byte();
        if pick & 1 == 0 {
            return Limits::DEFAULT;
        }
        Limits {
            max_frame_len: (u32::from(self.u16()) % 4096).max(floor.max_frame_len),
            max_control_len: (u32::from(self.u16()) % 4096).max(floor.max_control_len),
            max_fields: u32::from(self.byte() % 40).max(floor.max_fields),
            max_value_len: (u32::from(self.u16()) % 2048).max(floor.max_value_len),
            max_name_len: u32::from(self.byte() % 80).max(floor.max_name_len),
        }
    }

    /// Read sizes that cover `len` bytes: the input is cut where the knobs say, as a
    /// socket or pipe would cut it.
    pub fn chunks(&mut self, len: usize) -> Vec<usize> {
        let mut seed = u32::from(self.u16()) | (u32::from(self.byte()) << 16) | 1;
        let max = usize::from(self.byte()).max(1);
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            // xorshift: cheap, deterministic, and good enough to vary the cut points.
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let n = (seed as usize % max + 1).min(left);
            out.push(n);
            left -= n;
        }
        out
    }
}

/// Splits `data` into the pieces `sizes` gives (as from [`Knobs::chunks`]).
pub fn pieces<'a>(data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for &n in sizes {
        out.push(&data[at..at + n]);
        at += n;
    }
    out
}
