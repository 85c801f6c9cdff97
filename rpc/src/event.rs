//! Journald-style events and their binary encoding.
//!
//! An event is an ordered list of fields; a name may repeat, as in journald. Names follow
//! journald's rules (upper-case ASCII letters, digits and `_`, not starting with a digit,
//! at most 64 bytes); values are arbitrary bytes, so binary data, NULs and invalid UTF-8
//! survive unchanged. The field block encoding here is shared by the ingest `Event` frame,
//! the sink's stored batches and the query plane's `Record` frame.

use thiserror::Error;

use crate::fields::{CLAIMED_PREFIX, TRUSTED_PREFIX};
use crate::limits::Limits;

/// journald's longest field name, which every name we store stays within.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FieldNameError {
    #[error("field name is empty")]
    Empty,
    #[error("field name of {len} bytes is longer than {max}")]
    TooLong { len: usize, max: u32 },
    #[error("field name {name:?} has a character other than A-Z, 0-9 and _")]
    BadCharacter { name: String },
    #[error("field name {name:?} starts with a digit")]
    LeadingDigit { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    #[error("event ends early: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("event has {count} fields, more than the limit of {max}")]
    TooManyFields { count: u32, max: u32 },
    #[error("field {name:?} has a value of {len} bytes, more than the limit of {max}")]
    ValueTooLong { name: String, len: u32, max: u32 },
    #[error("invalid field name: {0}")]
    BadName(#[from] FieldNameError),
    #[error("{extra} bytes follow the last field")]
    TrailingBytes { extra: usize },
}

impl EventError {
    /// The same error with its offset moved by `by`: for a decoder that read part of a
    /// larger buffer.
    fn shifted(self, by: usize) -> EventError {
        match self {
            EventError::Truncated { offset, needed } => {
                EventError::Truncated { offset: offset + by, needed }
            }
            other => other,
        }
    }
}

/// Checks a field name against journald's rules and our length limit.
pub fn validate_field_name(name: &[u8], max_len: u32) -> Result<(), FieldNameError> {
    let lossy = || String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned();
    if name.is_empty() {
        return Err(FieldNameError::Empty);
    }
    if name.len() > max_len as usize {
        return Err(FieldNameError::TooLong { len: name.len(), max: max_len });
    }
    if !name.iter().all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
        return Err(FieldNameError::BadCharacter { name: lossy() });
    }
    if name[0].is_ascii_digit() {
        return Err(FieldNameError::LeadingDigit { name: lossy() });
    }
    Ok(())
}

impl Event {
    pub fn new() -> Event {
        Event::default()
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.fields.push(Field { name: name.into(), value: value.into() });
    }

    /// The first value of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|f| f.name == name).map(|f| f.value.as_slice())
    }

    /// The first value of `name` if it is valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Sum of name and value lengths, the figure quotas and rate limits count.
    pub fn payload_len(&self) -> usize {
        self.fields.iter().map(|f| f.name.len() + f.value.len()).sum()
    }

    /// Renames every field a source sent under the sink-only prefix, keeping its value, so
    /// that nothing a VM sends can pass for a field the sink vouches for. Returns how many
    /// fields were renamed.
    pub fn quarantine_trusted(&mut self) -> usize {
        let mut renamed = 0;
        for field in &mut self.fields {
            if let Some(rest) = field.name.strip_prefix(TRUSTED_PREFIX) {
                // The longer prefix could push a 64-byte name over journald's limit;
                // the renamed name is cut to stay valid everywhere it is decoded.
                let mut name = format!("{CLAIMED_PREFIX}{rest}");
                name.truncate(MAX_NAME_LEN);
                field.name = name;
                renamed += 1;
            }
        }
        renamed
    }

    /// Appends the field block (count, then each name and value) to `out`.
    pub fn encode_fields(&self, out: &mut Vec<u8>) {
        let count = u32::try_from(self.fields.len()).expect("field counts are bounded by limits");
        out.extend_from_slice(&count.to_be_bytes());
        for f in &self.fields {
            let name_len = u8::try_from(f.name.len()).expect("field names are at most 64 bytes");
            out.push(name_len);
            out.extend_from_slice(f.name.as_bytes());
            let value_len = u32::try_from(f.value.len()).expect("values are bounded by limits");
            out.extend_from_slice(&value_len.to_be_bytes());
            out.extend_from_slice(&f.value);
        }
    }

    /// Decodes a field block from the front of `buf`, returning the event and the bytes
    /// used. Every count and length is checked against `limits` before it is allocated.
    pub fn decode_fields(buf: &[u8], limits: &Limits) -> Result<(Event, usize), EventError> {
        let mut r = Reader { buf, pos: 0 };
        let count = r.u32()?;
        if count > limits.max_fields {
            return Err(EventError::TooManyFields { count, max: limits.max_fields });
        }
        // Each field takes at least 6 bytes, so the remaining input bounds the capacity
        // even before the count has been proven honest.
        let mut fields = Vec::with_capacity((count as usize).min(r.remaining() / 6));
        for _ in 0..count {
            let name_len = r.u8()? as usize;
            let name = r.bytes(name_len)?;
            validate_field_name(name, limits.max_name_len)?;
            let name = String::from_utf8(name.to_vec()).expect("validated names are ASCII");
            let value_len = r.u32()?;
            if value_len > limits.max_value_len {
                return Err(EventError::ValueTooLong {
                    name,
                    len: value_len,
                    max: limits.max_value_len,
                });
            }
            let value = r.bytes(value_len as usize)?.to_vec();
            fields.push(Field { name, value });
        }
        Ok((Event { fields }, r.pos))
    }
}

/// Encodes the payload of an ingest `Event` frame: sequence number, then the field block.
pub fn encode_event_payload(seq: u64, event: &Event, out: &mut Vec<u8>) {
    out.extend_from_slice(&seq.to_be_bytes());
    event.encode_fields(out);
}

/// Decodes the payload of an ingest `Event` frame.
pub fn decode_event_payload(payload: &[u8], limits: &Limits) -> Result<(u64, Event), EventError> {
    let mut r = Reader { buf: payload, pos: 0 };
    let seq = r.u64()?;
    // Offsets in errors are the payload's, as scan_event_payload reports them.
    let (event, used) =
        Event::decode_fields(&payload[r.pos..], limits).map_err(|e| e.shifted(r.pos))?;
    let extra = payload.len() - r.pos - used;
    if extra != 0 {
        return Err(EventError::TrailingBytes { extra });
    }
    Ok((seq, event))
}

/// What [`scan_event_payload`] learned about an event without copying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventScan {
    pub seq: u64,
    /// True if and only if a field name starts with the sink-only prefix.
    pub has_trusted: bool,
    /// Byte range of the first `__CURSOR` value within the payload.
    pub cursor: Option<std::ops::Range<usize>>,
    /// Where the field block starts within the payload.
    pub fields_start: usize,
    /// The first `PRIORITY` value, if it is a single digit 0 to 7.
    pub priority: Option<u8>,
}

/// Validates an ingest `Event` payload exactly as [`decode_event_payload`] would, but
/// without allocating, so that well-formed events can be stored as the bytes they came in.
pub fn scan_event_payload(payload: &[u8], limits: &Limits) -> Result<EventScan, EventError> {
    let mut r = Reader { buf: payload, pos: 0 };
    let seq = r.u64()?;
    let fields_start = r.pos;
    let count = r.u32()?;
    if count > limits.max_fields {
        return Err(EventError::TooManyFields { count, max: limits.max_fields });
    }
    let mut has_trusted = false;
    let mut cursor = None;
    let mut priority = None;
    let mut priority_seen = false;
    for _ in 0..count {
        let name_len = r.u8()? as usize;
        let name = r.bytes(name_len)?;
        validate_field_name(name, limits.max_name_len)?;
        has_trusted |= name.starts_with(TRUSTED_PREFIX.as_bytes());
        let value_len = r.u32()?;
        if value_len > limits.max_value_len {
            let name = String::from_utf8_lossy(name).into_owned();
            return Err(EventError::ValueTooLong {
                name,
                len: value_len,
                max: limits.max_value_len,
            });
        }
        let start = r.pos;
        r.bytes(value_len as usize)?;
        if cursor.is_none() && name == crate::fields::CURSOR.as_bytes() {
            cursor = Some(start..r.pos);
        }
        if !priority_seen && name == crate::fields::PRIORITY.as_bytes() {
            priority_seen = true;
            priority = priority_digit(&r.buf[start..r.pos]);
        }
    }
    if r.remaining() != 0 {
        return Err(EventError::TrailingBytes { extra: r.remaining() });
    }
    Ok(EventScan { seq, has_trusted, cursor, fields_start, priority })
}

/// A `PRIORITY` value as journald writes it: one digit, 0 (emerg) to 7 (debug).
pub fn priority_digit(value: &[u8]) -> Option<u8> {
    match value {
        [d @ b'0'..=b'7'] => Some(d - b'0'),
        _ => None,
    }
}

/// A bounds-checked cursor over a byte slice, used by every binary decoder here.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], EventError> {
        if self.remaining() < n {
            return Err(EventError::Truncated { offset: self.pos, needed: n - self.remaining() });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, EventError> {
        Ok(self.bytes(1)?[0])
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, EventError> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }

    #[inline]
    pub(crate) fn u64(&mut self) -> Result<u64, EventError> {
        Ok(u64::from_be_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the proptests: decode reported truncation at an offset within the field
    /// block, scan at an offset within the payload, for the same cut-off event.
    #[test]
    fn decode_and_scan_report_truncation_at_the_same_offset() {
        let mut payload = Vec::new();
        encode_event_payload(7, &sample(), &mut payload);
        for cut in 0..payload.len() {
            let short = &payload[..cut];
            let full = decode_event_payload(short, &Limits::DEFAULT).map(|_| ());
            assert_eq!(full, scan_event_payload(short, &Limits::DEFAULT).map(|_| ()), "{cut}");
        }
    }

    fn sample() -> Event {
        let mut e = Event::new();
        e.push("MESSAGE", "line one\nline two");
        e.push("BINARY", vec![0u8, 0xff, 0x1b, b'[', 0]);
        e.push("MESSAGE", "repeated names are kept");
        e
    }

    #[test]
    fn event_payload_round_trips_binary_values() {
        let mut buf = Vec::new();
        encode_event_payload(42, &sample(), &mut buf);
        let (seq, back) = decode_event_payload(&buf, &Limits::DEFAULT).unwrap();
        assert_eq!((seq, back), (42, sample()));
    }

    #[test]
    fn scan_agrees_with_decode() {
        let mut e = sample();
        e.push("__CURSOR", "s=1;i=2");
        let mut buf = Vec::new();
        encode_event_payload(9, &e, &mut buf);
        let scan = scan_event_payload(&buf, &Limits::DEFAULT).unwrap();
        assert_eq!(scan.seq, 9);
        assert!(!scan.has_trusted);
        assert_eq!(&buf[scan.cursor.unwrap()], b"s=1;i=2");
        let (back, _) = Event::decode_fields(&buf[scan.fields_start..], &Limits::DEFAULT).unwrap();
        assert_eq!(back, e);
        for cut in 0..buf.len() {
            assert_eq!(
                scan_event_payload(&buf[..cut], &Limits::DEFAULT).is_ok(),
                decode_event_payload(&buf[..cut], &Limits::DEFAULT).is_ok()
            );
        }
        let mut t = Event::new();
        t.push("_QLOG_VM", "x");
        let mut buf = Vec::new();
        encode_event_payload(1, &t, &mut buf);
        assert!(scan_event_payload(&buf, &Limits::DEFAULT).unwrap().has_trusted);
    }

    #[test]
    fn rejects_field_count_over_limit_before_allocating() {
        let mut buf = 1u64.to_be_bytes().to_vec();
        buf.extend_from_slice(&100_000u32.to_be_bytes());
        assert!(matches!(
            decode_event_payload(&buf, &Limits::DEFAULT),
            Err(EventError::TooManyFields { count: 100_000, .. })
        ));
    }

    #[test]
    fn rejects_bad_names_long_values_truncation_and_trailing_bytes() {
        let mut e = Event::new();
        e.push("lower", "x");
        let mut buf = Vec::new();
        encode_event_payload(1, &e, &mut buf);
        assert!(matches!(
            decode_event_payload(&buf, &Limits::DEFAULT),
            Err(EventError::BadName(_))
        ));

        let limits = Limits { max_value_len: 4, ..Limits::DEFAULT };
        let mut buf = Vec::new();
        encode_event_payload(1, &sample(), &mut buf);
        assert!(matches!(
            decode_event_payload(&buf, &limits),
            Err(EventError::ValueTooLong { .. })
        ));
        assert!(matches!(
            decode_event_payload(&buf[..buf.len() - 1], &Limits::DEFAULT),
            Err(EventError::Truncated { .. })
        ));
        buf.push(0);
        assert!(matches!(
            decode_event_payload(&buf, &Limits::DEFAULT),
            Err(EventError::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn validates_journald_field_names() {
        for ok in ["MESSAGE", "_HOSTNAME", "__CURSOR", "A1_"] {
            assert!(validate_field_name(ok.as_bytes(), 64).is_ok(), "{ok}");
        }
        for bad in ["", "1ABC", "message", "A-B", "A B", "\u{c9}"] {
            assert!(validate_field_name(bad.as_bytes(), 64).is_err(), "{bad:?}");
        }
        assert!(validate_field_name(&[b'A'; 65], 64).is_err());
    }

    #[test]
    fn quarantines_fields_under_the_trusted_prefix() {
        let mut e = Event::new();
        e.push("_QLOG_VM", "dom0");
        e.push("MESSAGE", "hi");
        assert_eq!(e.quarantine_trusted(), 1);
        assert_eq!(e.get_str("CLAIMED_QLOG_VM"), Some("dom0"));
        assert!(e.get("_QLOG_VM").is_none());

        let mut long = Event::new();
        long.push(format!("_QLOG_{}", "X".repeat(58)), "v");
        long.quarantine_trusted();
        assert_eq!(long.fields[0].name.len(), 64);
        assert!(validate_field_name(long.fields[0].name.as_bytes(), 64).is_ok());
    }
}
