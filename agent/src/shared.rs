//! The state the source, the writer and the ack reader share, behind one lock.
//!
//! Owns the lock and the condition variable around the [`Window`] and the few flags that
//! steer shutdown; the threads that use it own their IO. One condition variable serves
//! every waiter (a source waiting for room, a writer waiting for items), each re-checking
//! its own predicate, which is simple and costs nothing with three threads.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qlog_rpc::frame::HEADER_LEN;
use qlog_rpc::{Event, Gap, Limits};

use crate::limits::encoded_len;
use crate::telemetry::Counters;
use crate::window::{Acked, Item, Window};

/// Everything behind the lock.
#[derive(Debug)]
pub struct State {
    pub window: Window,
    /// True once the first welcome told us where numbering starts; no item is pushed
    /// before that.
    pub started: bool,
    /// True if and only if no more items will be pushed: the input ended or shutdown
    /// began. The writer sends `End` once it has sent every item.
    pub finishing: bool,
    /// True if and only if the source reached the end of its input (stdin's EOF).
    pub input_ended: bool,
    /// True once shutdown began: pushes are refused, so the source stops reading.
    pub stopping: bool,
    /// The connection whose writer may write. A writer whose connection is not this one
    /// exits at its next wake-up; 0 means no writer may write.
    pub active_conn: u64,
    /// The limits of the connection being written to.
    pub limits: Limits,
    /// What the agent reports about itself in its telemetry.
    pub counters: Counters,
}

/// Returned to a source when shutdown has begun and it should stop reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    /// Notified after every change to `state`.
    changed: Condvar,
}

impl Shared {
    pub fn new(window: Window) -> Shared {
        Shared {
            state: Mutex::new(State {
                window,
                started: false,
                finishing: false,
                input_ended: false,
                stopping: false,
                active_conn: 0,
                limits: Limits::DEFAULT,
                counters: Counters::default(),
            }),
            changed: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("no thread panics while holding the agent state")
    }

    pub fn notify_all(&self) {
        self.changed.notify_all();
    }

    pub fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).expect("no thread panics while holding the agent state")
    }

    pub fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(guard, timeout)
            .expect("no thread panics while holding the agent state")
            .0
    }

    /// Changes the state and wakes every waiter.
    pub fn update<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let result = change(&mut self.lock());
        self.notify_all();
        result
    }

    /// Waits for room, then numbers and stores `event`, fitted to `limits` by the caller.
    pub fn push_event(&self, event: &Event, limits: Limits) -> Result<u64, Stopped> {
        let frame_len = HEADER_LEN + encoded_len(event);
        self.push(frame_len, |seq| Item::event(seq, event, limits), |c| c.read += 1)
    }

    /// Waits for room, then numbers and stores a gap record.
    pub fn push_gap(&self, reason: &str, detail: String) -> Result<u64, Stopped> {
        let frame_len = HEADER_LEN + reason.len() + detail.len() + 64;
        self.push(
            frame_len,
            |seq| Item::Gap(Gap { seq, reason: reason.to_string(), missed: None, detail }),
            |c| c.gaps += 1,
        )
    }

    fn push(
        &self,
        frame_len: usize,
        build: impl FnOnce(u64) -> Item,
        count: impl FnOnce(&mut Counters),
    ) -> Result<u64, Stopped> {
        let mut state = self.lock();
        while !state.stopping && !state.window.has_room(frame_len) {
            state = self.wait(state);
        }
        if state.stopping {
            return Err(Stopped);
        }
        let seq = state.window.push_with(build);
        count(&mut state.counters);
        drop(state);
        self.notify_all();
        Ok(seq)
    }

    pub fn ack(&self, seq: u64) -> Acked {
        self.update(|state| {
            let acked = state.window.ack(seq);
            state.counters.acked += match acked {
                Acked::Released { released } | Acked::Beyond { released, .. } => released as u64,
            };
            acked
        })
    }

    pub fn unacked(&self) -> usize {
        self.lock().window.unacked()
    }

    /// The input ended: once every item is sent, the writer sends `End`.
    pub fn finish_input(&self) {
        self.update(|state| {
            state.finishing = true;
            state.input_ended = true;
        });
    }

    /// Shutdown began: refuse further items and end the stream after those held.
    pub fn begin_shutdown(&self) {
        self.update(|state| {
            state.stopping = true;
            state.finishing = true;
        });
    }

    /// Sleeps for `delay`, returning early with [`Stopped`] if shutdown begins.
    pub fn sleep_unless_stopping(&self, delay: Duration) -> Result<(), Stopped> {
        let until = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            if state.stopping {
                return Err(Stopped);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            state = self.wait_timeout(state, until - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    fn event(text: &str) -> Event {
        let mut e = Event::new();
        e.push("MESSAGE", text);
        e
    }

    #[test]
    fn a_full_window_blocks_the_source_until_an_ack() {
        let shared = Arc::new(Shared::new(Window::new(1, 2, 1 << 20)));
        shared.push_event(&event("a"), Limits::DEFAULT).unwrap();
        shared.push_event(&event("b"), Limits::DEFAULT).unwrap();
        let pusher = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.push_event(&event("c"), Limits::DEFAULT))
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished(), "the third push waits for room");
        shared.ack(1);
        assert_eq!(pusher.join().unwrap(), Ok(3));
    }

    #[test]
    fn shutdown_releases_a_blocked_source() {
        let shared = Arc::new(Shared::new(Window::new(1, 1, 1 << 20)));
        shared.push_event(&event("a"), Limits::DEFAULT).unwrap();
        let pusher = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.push_gap("cursor-lost", String::new()))
        };
        thread::sleep(Duration::from_millis(20));
        shared.begin_shutdown();
        assert_eq!(pusher.join().unwrap(), Err(Stopped));
        assert_eq!(shared.sleep_unless_stopping(Duration::from_secs(60)), Err(Stopped));
        let state = shared.lock();
        assert!(state.finishing && state.stopping);
        assert_eq!(state.window.unacked(), 1);
    }
}
