//! Jittered exponential backoff and the cheap PRNG behind its jitter.
//!
//! Owns the delay sequence between reconnects and journalctl restarts; the callers own the
//! sleeping. Jitter keeps many source VMs from reconnecting in lockstep when the log VM
//! comes back; it needs no cryptographic quality, so a xorshift seeded from the clock and
//! the pid is enough and keeps the `rand` crate out of the binary.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// xorshift64*: tiny, fast, and good enough to spread retries apart.
#[derive(Debug, Clone)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    pub fn new(seed: u64) -> XorShift64 {
        // The all-zero state is the one fixed point of xorshift.
        XorShift64 { state: if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed } }
    }

    /// A seed that differs between agents started at the same moment in different VMs.
    pub fn seed_from_time_and_pid() -> u64 {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (nanos as u64) ^ ((nanos >> 64) as u64) ^ (u64::from(std::process::id()) << 32)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Delays that start at `initial`, double after every failure up to `max`, and are each
/// drawn uniformly from the upper half of the current step. By default, 1 s up to 60 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: XorShift64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff { initial, max, current: initial, rng: XorShift64::new(seed) }
    }

    /// The delay before the next attempt; each call doubles the step after it.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(self.rng.next_u64() % (spread + 1))
    }

    /// Called after an attempt that made progress: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_within_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 42);
        let mut step = Duration::from_secs(1);
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} outside ({:?}, {step:?})", step / 2);
            step = (step * 2).min(Duration::from_secs(60));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_varies_between_seeds_and_survives_a_zero_seed() {
        let mut a = XorShift64::new(1);
        let mut b = XorShift64::new(2);
        assert_ne!(a.next_u64(), b.next_u64());
        let mut z = XorShift64::new(0);
        assert_ne!(z.next_u64(), 0);
    }

    #[test]
    fn tiny_and_inverted_settings_do_not_panic() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, 7);
        assert!(b.next_delay() <= Duration::from_millis(1));
    }
}
