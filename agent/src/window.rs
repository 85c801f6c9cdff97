//! The in-flight window: every item read but not yet acknowledged, in sequence order.
//!
//! Owns sequence numbering (one number per event or gap, strictly increasing), the bound
//! on memory (events and bytes), cumulative acknowledgement and what a sink's resume point
//! means for the items held. It does no IO and knows nothing of threads: [`crate::shared`]
//! puts it behind a lock. Items are kept as encoded frames, so a replay after a reconnect
//! sends the same bytes under the same sequence numbers, which the sink de-duplicates.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use qlog_rpc::event::{decode_event_payload, encode_event_payload};
use qlog_rpc::frame::{self, FrameType, HEADER_LEN};
use qlog_rpc::{Event, Gap, Limits};

/// Memory an item costs beyond its bytes (deque slot, allocation header), so the byte
/// bound stays honest for windows full of tiny events.
const ITEM_OVERHEAD: usize = 64;

/// Limits that accept anything the agent itself encoded, for decoding its own frames.
const OWN_FRAMES: Limits = Limits {
    max_frame_len: u32::MAX,
    max_control_len: u32::MAX,
    max_fields: u32::MAX,
    max_value_len: u32::MAX,
    max_name_len: u8::MAX as u32,
};

/// One unacknowledged item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A whole `Event` frame, header included, and the limits its event was fitted to.
    Event { frame: Vec<u8>, limits: Limits },
    /// A gap record; its `seq` is the item's sequence number.
    Gap(Gap),
}

impl Item {
    /// Builds the event item for sequence number `seq`.
    pub fn event(seq: u64, event: &Event, limits: Limits) -> Item {
        let mut payload = Vec::with_capacity(crate::limits::encoded_len(event));
        encode_event_payload(seq, event, &mut payload);
        Item::Event { frame: frame::encode_to_vec(FrameType::Event, &payload), limits }
    }

    /// Decodes the event back out of an event item's frame.
    pub fn decode_event(frame: &[u8]) -> Event {
        let (_, event) = decode_event_payload(&frame[HEADER_LEN..], &OWN_FRAMES)
            .expect("the agent decodes only frames it encoded itself");
        event
    }

    fn cost(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Item::Event { frame, .. } => frame.len(),
                Item::Gap(gap) => gap.reason.len() + gap.detail.len(),
            }
    }

    fn renumber(&mut self, seq: u64) {
        match self {
            Item::Event { frame, limits } => {
                *self = Item::event(seq, &Item::decode_event(frame), *limits);
            }
            Item::Gap(gap) => gap.seq = seq,
        }
    }
}

/// What a sink's resume point meant for the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// The sink holds up to `last_seq`, which lies within what we numbered; `acked` items
    /// were released because the sink had them though their ack never arrived.
    InStep { acked: usize },
    /// The sink holds less than we saw acknowledged: it lost durable events, which we no
    /// longer have. `acked_before` is the highest ack we had received.
    SinkBehind { acked_before: u64 },
    /// The sink is past every number we gave out, so something else wrote this stream;
    /// the `renumbered` unacknowledged items now follow the sink's `last_seq`.
    SinkAhead { renumbered: usize, old_last: u64 },
}

/// What an ack meant for the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// `released` items left the window (possibly 0 for a repeated ack).
    Released { released: usize },
    /// The ack names a sequence number never given out; it was applied up to the last one.
    Beyond { last_assigned: u64, released: usize },
}

/// Unacknowledged items, bounded by count and bytes.
///
/// By default (see the CLI), at most 4,096 items and 8 MiB. The first item is always
/// admitted, however large, so one big event can never wedge the window.
#[derive(Debug)]
pub struct Window {
    items: VecDeque<(u64, Item)>,
    /// When each item in `items` was pushed, front to back, for the telemetry's lag.
    pushed_at: VecDeque<Instant>,
    /// The sequence number the next item gets; every number below it was given out.
    next_seq: u64,
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
}

impl Window {
    pub fn new(first_seq: u64, max_items: usize, max_bytes: usize) -> Window {
        Window {
            items: VecDeque::new(),
            pushed_at: VecDeque::new(),
            next_seq: first_seq.max(1),
            bytes: 0,
            max_items: max_items.max(1),
            max_bytes,
        }
    }

    /// The sequence number the next pushed item will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The highest sequence number given out (the resume point's if none was).
    pub fn last_assigned(&self) -> u64 {
        self.next_seq - 1
    }

    /// The lowest sequence number not yet acknowledged.
    pub fn first_unacked(&self) -> u64 {
        self.items.front().map_or(self.next_seq, |(seq, _)| *seq)
    }

    /// How long the oldest unacknowledged item has waited, if there is one.
    pub fn oldest_unacked_age(&self, now: Instant) -> Option<Duration> {
        self.pushed_at.front().map(|t| now.saturating_duration_since(*t))
    }

    /// Items not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True if and only if an item of `frame_len` bytes may be pushed now.
    pub fn has_room(&self, frame_len: usize) -> bool {
        self.items.is_empty()
            || (self.items.len() < self.max_items
                && self.bytes + frame_len + ITEM_OVERHEAD <= self.max_bytes)
    }

    /// Appends an item built for the next sequence number, returning that number. The
    /// caller checks [`Window::has_room`] first; this never refuses.
    pub fn push_with(&mut self, build: impl FnOnce(u64) -> Item) -> u64 {
        let seq = self.next_seq;
        let item = build(seq);
        self.bytes += item.cost();
        self.items.push_back((seq, item));
        self.pushed_at.push_back(Instant::now());
        self.next_seq += 1;
        seq
    }

    /// The item with sequence number `seq`, if it is still held.
    pub fn get(&self, seq: u64) -> Option<&Item> {
        let first = self.items.front()?.0;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.items.get(index).map(|(_, item)| item)
    }

    /// Applies a cumulative ack: every item up to and including `seq` is durable.
    pub fn ack(&mut self, seq: u64) -> Acked {
        let last_assigned = self.last_assigned();
        let upto = seq.min(last_assigned);
        let mut released = 0;
        while let Some((first, _)) = self.items.front() {
            if *first > upto {
                break;
            }
            let (_, item) = self.items.pop_front().expect("front was just seen");
            self.pushed_at.pop_front();
            self.bytes -= item.cost();
            released += 1;
        }
        if seq > last_assigned {
            Acked::Beyond { last_assigned, released }
        } else {
            Acked::Released { released }
        }
    }

    /// Starts numbering after a sink's `last_seq`; only for a window that never held an
    /// item, that is, on the first welcome.
    pub fn start_after(&mut self, last_seq: u64) {
        debug_assert!(self.items.is_empty(), "numbering restarts only before any item");
        self.next_seq = last_seq.saturating_add(1);
    }

    /// Reconciles the window with the resume point of a new connection.
    pub fn resume(&mut self, sink_last_seq: u64) -> Resumed {
        let acked_before = self.first_unacked() - 1;
        if sink_last_seq < acked_before {
            return Resumed::SinkBehind { acked_before };
        }
        if sink_last_seq <= self.last_assigned() {
            let acked = match self.ack(sink_last_seq) {
                Acked::Released { released } | Acked::Beyond { released, .. } => released,
            };
            return Resumed::InStep { acked };
        }
        // Renumbering risks a duplicate if the sink did store some of these items under
        // their old numbers, but keeping the numbers would lose them all silently.
        let old_last = self.last_assigned();
        let mut seq = sink_last_seq;
        for (item_seq, item) in &mut self.items {
            seq += 1;
            *item_seq = seq;
            item.renumber(seq);
        }
        self.next_seq = seq + 1;
        self.bytes = self.items.iter().map(|(_, item)| item.cost()).sum();
        Resumed::SinkAhead { renumbered: self.items.len(), old_last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_item(seq: u64, text: &str) -> Item {
        let mut e = Event::new();
        e.push("MESSAGE", text);
        Item::event(seq, &e, Limits::DEFAULT)
    }

    fn seq_of(item: &Item) -> u64 {
        match item {
            Item::Event { frame, .. } => {
                u64::from_be_bytes(frame[HEADER_LEN..HEADER_LEN + 8].try_into().unwrap())
            }
            Item::Gap(gap) => gap.seq,
        }
    }

    fn filled(first: u64, n: usize) -> Window {
        let mut w = Window::new(first, 100, 1 << 20);
        for i in 0..n {
            w.push_with(|seq| event_item(seq, &format!("event {i}")));
        }
        w
    }

    #[test]
    fn numbers_items_from_the_resume_point() {
        let mut w = Window::new(1, 10, 1 << 20);
        w.start_after(41);
        assert_eq!(w.push_with(|seq| event_item(seq, "a")), 42);
        assert_eq!(w.push_with(|seq| Item::Gap(gap(seq))), 43);
        assert_eq!(seq_of(w.get(42).unwrap()), 42);
        assert_eq!(seq_of(w.get(43).unwrap()), 43);
        assert_eq!((w.first_unacked(), w.last_assigned()), (42, 43));
    }

    fn gap(seq: u64) -> Gap {
        Gap { seq, reason: "cursor-lost".into(), missed: None, detail: String::new() }
    }

    #[test]
    fn cumulative_acks_release_items_in_order() {
        let mut w = filled(1, 5);
        assert_eq!(w.ack(3), Acked::Released { released: 3 });
        assert_eq!(w.first_unacked(), 4);
        assert!(w.get(3).is_none());
        assert!(w.get(4).is_some());
        assert_eq!(w.ack(2), Acked::Released { released: 0 });
        assert_eq!(w.ack(9), Acked::Beyond { last_assigned: 5, released: 2 });
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
        assert_eq!(w.first_unacked(), 6);
    }

    #[test]
    fn bounds_items_and_bytes_but_always_admits_one() {
        let mut w = Window::new(1, 2, 1 << 20);
        assert!(w.has_room(10));
        w.push_with(|seq| event_item(seq, "a"));
        w.push_with(|seq| event_item(seq, "b"));
        assert!(!w.has_room(10), "item bound");
        w.ack(2);

        let mut w = Window::new(1, 100, 300);
        assert!(w.has_room(10_000), "an empty window takes even a huge item");
        w.push_with(|seq| event_item(seq, &"x".repeat(200)));
        assert!(!w.has_room(100), "byte bound");
        w.ack(1);
        assert!(w.has_room(100));
    }

    #[test]
    fn resume_releases_what_the_sink_already_stored() {
        let mut w = filled(11, 5); // 11..=15
        w.ack(11);
        assert_eq!(w.resume(13), Resumed::InStep { acked: 2 });
        assert_eq!(w.first_unacked(), 14);
        assert_eq!(w.resume(13), Resumed::InStep { acked: 0 });
        assert_eq!(w.resume(5), Resumed::SinkBehind { acked_before: 13 });
        assert_eq!(w.next_seq(), 16, "numbering goes on where it was");
    }

    #[test]
    fn resume_past_our_numbers_renumbers_instead_of_losing_items() {
        let mut w = filled(1, 3);
        w.ack(1);
        assert_eq!(w.resume(100), Resumed::SinkAhead { renumbered: 2, old_last: 3 });
        assert_eq!(w.first_unacked(), 101);
        assert_eq!(seq_of(w.get(101).unwrap()), 101);
        assert_eq!(seq_of(w.get(102).unwrap()), 102);
        let Item::Event { frame, .. } = w.get(102).unwrap() else { panic!("an event") };
        assert_eq!(Item::decode_event(frame).get_str("MESSAGE"), Some("event 2"));
        assert_eq!(w.push_with(|seq| event_item(seq, "next")), 103);
    }
}
