//! Fitting what the sources read into the sink's limits: cut, mark, never stop.
//!
//! Owns [`RawEntry`], the form every parser produces (fields already bounded in memory,
//! each remembering its original length), the field-name sanitiser, and [`finish`], which
//! turns a raw entry into a [`qlog_rpc::Event`] that satisfies a [`Limits`]. The rules:
//!
//! - an invalid field name is sanitised: upper-cased, other bad bytes become `_`, a
//!   leading digit gets a `_` prefix, and the result is cut to the name limit;
//! - an oversized value is cut to `max_value_len` and the event gets one
//!   `QLOG_TRUNCATED=<NAME>:<original length>` per cut field;
//! - with too many fields the first ones are kept and `QLOG_TRUNCATED=fields:<count>` says
//!   how many there were; markers count as fields, so fewer than `max_fields - 1` input
//!   fields may survive when values were cut too;
//! - an event whose frame would exceed `max_frame_len` has its largest values cut further.
//!
//! The sink's limits are a promise the agent keeps: an event it would reject would block
//! the stream forever, since the agent never skips an unacknowledged event.

use qlog_rpc::event::validate_field_name;
use qlog_rpc::{Event, Field, Limits};

/// Added once per cut field, and once when fields were dropped.
pub const TRUNCATED_FIELD: &str = qlog_rpc::fields::QLOG_TRUNCATED;
/// Added to an input line that could not be parsed; the line itself is the `MESSAGE`.
pub const PARSE_ERROR_FIELD: &str = qlog_rpc::fields::QLOG_PARSE_ERROR;
/// journald's own limit on field names.
pub const MAX_FIELD_NAME_LEN: usize = 64;

/// Frame bytes around the field values: event seq (8), field count (4).
const EVENT_HEADER_LEN: usize = 12;
/// Per-field bytes besides name and value: name length (1), value length (4).
const FIELD_OVERHEAD: usize = 5;

/// One field as read, with its value possibly already cut while reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawField {
    pub name: String,
    pub value: Vec<u8>,
    /// The value's length in the input, which is more than `value.len()` if it was cut.
    pub original_len: u64,
}

/// One entry as read: at most [`ReadLimits::max_fields`] fields, plus a count of the
/// fields that were read and discarded beyond that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub fields: Vec<RawField>,
    pub dropped_fields: u64,
}

/// What a parser keeps in memory for one entry, derived from the sink's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    pub max_fields: usize,
    pub max_value_len: usize,
    /// Value bytes kept for the whole entry; past it, values are kept empty (and marked),
    /// so a hostile entry of many large fields costs one frame of memory, not more.
    pub max_entry_bytes: usize,
}

impl ReadLimits {
    pub fn from_limits(limits: &Limits) -> ReadLimits {
        ReadLimits {
            max_fields: limits.max_fields.max(1) as usize,
            max_value_len: limits.max_value_len as usize,
            max_entry_bytes: limits.max_frame_len as usize,
        }
    }
}

impl RawEntry {
    /// The first value of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|f| f.name == name).map(|f| f.value.as_slice())
    }

    fn kept_bytes(&self) -> usize {
        self.fields.iter().map(|f| f.value.len()).sum()
    }

    /// Adds a field whose name is already valid, bounding it by `limits`.
    pub fn push_bounded(&mut self, name: String, mut value: Vec<u8>, limits: &ReadLimits) {
        if self.fields.len() >= limits.max_fields {
            self.dropped_fields += 1;
            return;
        }
        let original_len = value.len() as u64;
        let room = limits.max_entry_bytes.saturating_sub(self.kept_bytes());
        value.truncate(limits.max_value_len.min(room));
        self.fields.push(RawField { name, value, original_len });
    }

    /// Adds a field read elsewhere, already bounded, with its original length.
    pub fn push_raw(&mut self, field: RawField, limits: &ReadLimits) {
        if self.fields.len() >= limits.max_fields {
            self.dropped_fields += 1;
            return;
        }
        self.fields.push(field);
    }

    /// Value bytes the entry may still keep under `limits`.
    pub fn room(&self, limits: &ReadLimits) -> usize {
        limits.max_entry_bytes.saturating_sub(self.kept_bytes()).min(limits.max_value_len)
    }

    /// The raw form of an event that was already limited once, to limit it again.
    pub fn from_event(event: Event) -> RawEntry {
        let fields = event
            .fields
            .into_iter()
            .map(|f| RawField { original_len: f.value.len() as u64, name: f.name, value: f.value })
            .collect();
        RawEntry { fields, dropped_fields: 0 }
    }
}

/// Makes a valid journald field name out of arbitrary input bytes.
///
/// Valid names come back unchanged. Otherwise lower-case ASCII is upper-cased, every other
/// byte outside `A-Z 0-9 _` becomes `_`, a leading digit gets a `_` in front, an empty name
/// becomes `_`, and the result is cut to 64 bytes.
pub fn sanitize_field_name(raw: &[u8]) -> String {
    if validate_field_name(raw, MAX_FIELD_NAME_LEN as u32).is_ok() {
        return String::from_utf8(raw.to_vec()).expect("valid field names are ASCII");
    }
    let mut out = String::with_capacity(raw.len().min(MAX_FIELD_NAME_LEN));
    if raw.is_empty() || raw[0].is_ascii_digit() {
        out.push('_');
    }
    for &b in raw {
        if out.len() == MAX_FIELD_NAME_LEN {
            break;
        }
        out.push(match b {
            b'A'..=b'Z' | b'0'..=b'9' | b'_' => b as char,
            b'a'..=b'z' => b.to_ascii_uppercase() as char,
            _ => '_',
        });
    }
    out
}

/// Bytes the `Event` frame payload of `event` takes on the wire.
pub fn encoded_len(event: &Event) -> usize {
    EVENT_HEADER_LEN
        + event.fields.iter().map(|f| FIELD_OVERHEAD + f.name.len() + f.value.len()).sum::<usize>()
}

/// True if and only if `event` already satisfies `limits`.
pub fn fits(event: &Event, limits: &Limits) -> bool {
    event.fields.len() <= limits.max_fields as usize
        && encoded_len(event) <= limits.max_frame_len as usize
        && event.fields.iter().all(|f| {
            f.value.len() <= limits.max_value_len as usize
                && f.name.len() <= limits.max_name_len as usize
        })
}

/// True if and only if everything that fits `inner` also fits `outer`.
pub fn within(inner: &Limits, outer: &Limits) -> bool {
    inner.max_frame_len <= outer.max_frame_len
        && inner.max_fields <= outer.max_fields
        && inner.max_value_len <= outer.max_value_len
        && inner.max_name_len <= outer.max_name_len
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Turns a raw entry into an event that satisfies `limits`, marking everything it cut.
pub fn finish(entry: RawEntry, limits: &Limits) -> Event {
    let max_fields = limits.max_fields.max(1) as usize;
    let max_value = limits.max_value_len as usize;
    let max_frame = limits.max_frame_len as usize;
    let max_name = (limits.max_name_len as usize).clamp(1, MAX_FIELD_NAME_LEN);

    let mut fields = entry.fields;
    for f in &mut fields {
        if f.name.len() > max_name {
            f.name.truncate(max_name);
        }
    }
    let total = fields.len() as u64 + entry.dropped_fields;
    let marker_len = |value_len: usize| {
        FIELD_OVERHEAD + TRUNCATED_FIELD.len().min(max_name) + value_len.min(max_value)
    };
    let cut_marker_len = |f: &RawField| marker_len(f.name.len() + 1 + digits(f.original_len));
    let fields_marker_len = marker_len("fields:".len() + digits(total));

    // Find how many fields to keep and how much of each value, shrinking one or the other
    // until both the field count and the frame size fit. Every pass either keeps one
    // field fewer or takes bytes off the largest value, so the loop ends.
    let mut caps: Vec<usize> = fields.iter().map(|f| f.value.len().min(max_value)).collect();
    let mut keep = fields.len().min(max_fields);
    loop {
        let is_cut = |i: usize| (caps[i] as u64) < fields[i].original_len;
        let cut_count = (0..keep).filter(|&i| is_cut(i)).count();
        let dropped = (keep as u64) < total;
        if keep + cut_count + usize::from(dropped) > max_fields && keep > 0 {
            keep -= 1;
            continue;
        }
        let size = EVENT_HEADER_LEN
            + (0..keep)
                .map(|i| {
                    let marker = if is_cut(i) { cut_marker_len(&fields[i]) } else { 0 };
                    FIELD_OVERHEAD + fields[i].name.len() + caps[i] + marker
                })
                .sum::<usize>()
            + if dropped { fields_marker_len } else { 0 };
        if size <= max_frame || keep == 0 {
            break;
        }
        let (largest, &largest_cap) = caps[..keep]
            .iter()
            .enumerate()
            .max_by_key(|&(_, cap)| *cap)
            .expect("keep is at least 1 here");
        if largest_cap == 0 {
            keep -= 1;
            continue;
        }
        // Cutting a field for the first time also adds its marker.
        let new_marker = if is_cut(largest) { 0 } else { cut_marker_len(&fields[largest]) };
        caps[largest] = largest_cap.saturating_sub(size - max_frame + new_marker);
    }

    let mut event = Event { fields: Vec::with_capacity(max_fields.min(total as usize)) };
    let mut markers = Vec::new();
    for (f, cap) in fields.into_iter().zip(caps).take(keep) {
        let mut value = f.value;
        value.truncate(cap);
        if (cap as u64) < f.original_len {
            markers.push(format!("{}:{}", f.name, f.original_len));
        }
        event.fields.push(Field { name: f.name, value });
    }
    if (keep as u64) < total {
        markers.push(format!("fields:{total}"));
    }
    let mut marker_name = TRUNCATED_FIELD.to_string();
    marker_name.truncate(max_name);
    for mut marker in markers {
        // Markers are ASCII, so any cut falls on a character boundary.
        marker.truncate(max_value);
        event.fields.push(Field { name: marker_name.clone(), value: marker.into_bytes() });
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_limits() -> ReadLimits {
        ReadLimits::from_limits(&Limits::DEFAULT)
    }

    fn entry(fields: &[(&str, &[u8])]) -> RawEntry {
        let mut e = RawEntry::default();
        for (name, value) in fields {
            e.push_bounded(name.to_string(), value.to_vec(), &read_limits());
        }
        e
    }

    fn markers(event: &Event) -> Vec<&str> {
        event
            .fields
            .iter()
            .filter(|f| f.name == TRUNCATED_FIELD)
            .map(|f| std::str::from_utf8(&f.value).unwrap())
            .collect()
    }

    #[test]
    fn sanitizes_invalid_field_names() {
        assert_eq!(sanitize_field_name(b"MESSAGE"), "MESSAGE");
        assert_eq!(sanitize_field_name(b"message"), "MESSAGE");
        assert_eq!(sanitize_field_name(b"my-field.x"), "MY_FIELD_X");
        assert_eq!(sanitize_field_name(b"1ABC"), "_1ABC");
        assert_eq!(sanitize_field_name(b""), "_");
        assert_eq!(sanitize_field_name("\u{e9}t\u{e9}".as_bytes()), "__T__");
        assert_eq!(sanitize_field_name(&[b'a'; 100]), "A".repeat(64));
        assert_eq!(sanitize_field_name(&[b'9'; 100]).len(), 64);
        for raw in [&b"x y"[..], b"9", b"\xff\xfe", b"__cursor"] {
            let name = sanitize_field_name(raw);
            assert!(validate_field_name(name.as_bytes(), 64).is_ok(), "{name}");
        }
    }

    #[test]
    fn events_within_limits_pass_unchanged() {
        let e = entry(&[("MESSAGE", b"hello"), ("PRIORITY", b"6")]);
        let event = finish(e, &Limits::DEFAULT);
        assert_eq!(event.fields.len(), 2);
        assert!(markers(&event).is_empty());
        assert!(fits(&event, &Limits::DEFAULT));
    }

    #[test]
    fn cuts_oversized_values_and_marks_each_cut_field() {
        let limits = Limits { max_value_len: 12, ..Limits::DEFAULT };
        let e = entry(&[("MESSAGE", b"0123456789abcdef"), ("A", b"ok"), ("MESSAGE", &[b'x'; 13])]);
        let event = finish(e, &limits);
        assert_eq!(event.get("MESSAGE"), Some(&b"0123456789ab"[..]));
        assert_eq!(markers(&event), ["MESSAGE:16", "MESSAGE:13"]);
        assert!(fits(&event, &limits));
    }

    #[test]
    fn keeps_original_length_of_values_cut_while_reading() {
        let mut e = RawEntry::default();
        e.push_raw(
            RawField { name: "BIG".into(), value: vec![b'x'; 8], original_len: 1 << 40 },
            &read_limits(),
        );
        let event = finish(e, &Limits { max_value_len: 32, ..Limits::DEFAULT });
        assert_eq!(markers(&event), ["BIG:1099511627776"]);
    }

    #[test]
    fn too_many_fields_keeps_the_first_and_counts_them_all() {
        let limits = Limits { max_fields: 4, ..Limits::DEFAULT };
        let read = ReadLimits::from_limits(&limits);
        let mut e = RawEntry::default();
        for i in 0..10 {
            e.push_bounded(format!("F{i}"), b"v".to_vec(), &read);
        }
        assert_eq!((e.fields.len(), e.dropped_fields), (4, 6));
        let event = finish(e, &limits);
        let names: Vec<_> = event.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["F0", "F1", "F2", TRUNCATED_FIELD]);
        assert_eq!(markers(&event), ["fields:10"]);
    }

    #[test]
    fn markers_count_against_the_field_limit() {
        let limits = Limits { max_fields: 4, max_value_len: 10, ..Limits::DEFAULT };
        let e = entry(&[("A", b"long values"), ("B", b"long values"), ("C", b"ok")]);
        let event = finish(e, &limits);
        assert!(event.fields.len() <= 4, "{event:?}");
        assert_eq!(markers(&event), ["A:11", "fields:3"]);
        assert!(fits(&event, &limits));
    }

    #[test]
    fn cuts_the_largest_values_to_fit_the_frame() {
        let limits = Limits { max_frame_len: 1000, ..Limits::DEFAULT };
        let big = vec![b'x'; 900];
        let e = entry(&[("SMALL", b"keep me"), ("HUGE", &big), ("ALSO_HUGE", &big)]);
        let event = finish(e, &limits);
        assert!(encoded_len(&event) <= 1000, "{}", encoded_len(&event));
        assert_eq!(event.get("SMALL"), Some(&b"keep me"[..]));
        // Cutting one value was enough; the last of the largest is the one cut.
        assert_eq!(event.get("HUGE").map(<[u8]>::len), Some(900));
        assert_eq!(markers(&event), ["ALSO_HUGE:900"]);
        assert!(fits(&event, &limits));
    }

    #[test]
    fn entry_memory_is_bounded_while_reading() {
        let read = ReadLimits { max_fields: 100, max_value_len: 50, max_entry_bytes: 120 };
        let mut e = RawEntry::default();
        for _ in 0..5 {
            e.push_bounded("V".into(), vec![b'x'; 50], &read);
        }
        let kept: Vec<_> = e.fields.iter().map(|f| f.value.len()).collect();
        assert_eq!(kept, [50, 50, 20, 0, 0]);
        assert!(e.fields.iter().all(|f| f.original_len == 50));
    }

    #[test]
    fn markers_are_cut_too_when_values_are_tiny() {
        let limits = Limits { max_value_len: 4, ..Limits::DEFAULT };
        let event = finish(entry(&[("MESSAGE", b"0123456789")]), &limits);
        assert_eq!(markers(&event), ["MESS"]);
        assert!(fits(&event, &limits));
    }

    #[test]
    fn absurdly_small_limits_still_terminate_and_fit_where_possible() {
        let limits = Limits {
            max_frame_len: 64,
            max_control_len: 64,
            max_fields: 1,
            max_value_len: 8,
            max_name_len: 64,
        };
        let e = entry(&[("MESSAGE", &[b'x'; 500]), ("OTHER", b"y")]);
        let event = finish(e, &limits);
        assert!(event.fields.len() <= 1);
        assert!(fits(&event, &limits), "{event:?}");
    }

    #[test]
    fn limiting_twice_changes_nothing() {
        let limits = Limits { max_value_len: 4, max_fields: 3, ..Limits::DEFAULT };
        let e = entry(&[("A", b"0123456789"), ("B", b"x"), ("C", b"y"), ("D", b"z")]);
        let once = finish(e, &limits);
        let twice = finish(RawEntry::from_event(once.clone()), &limits);
        assert_eq!(once, twice);
    }
}
