//! Incremental parser for the journal export format, with bounded memory.
//!
//! Owns the byte-level grammar (see systemd's "Journal Export Formats"): an entry is a run
//! of fields ended by an empty line; a text field is `NAME=value\n`; a binary field is
//! `NAME\n`, a 64-bit little-endian length, that many raw bytes and `\n`. Bytes go in as
//! they arrive, in chunks of any size; whole [`RawEntry`]s come out. Limits are applied
//! while reading: a value past the limit is read and thrown away, keeping only its length,
//! so no input makes the parser buffer more than one bounded entry. Nothing here stops on
//! bad input: a malformed binary field is counted and parsing goes on. It does no IO.

use crate::limits::{sanitize_field_name, RawEntry, RawField, ReadLimits, MAX_FIELD_NAME_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: an empty line ends the entry.
    LineStart,
    /// Inside a field name, before `=` or `\n`.
    Name,
    /// Inside a text value, before `\n`.
    Text,
    /// Reading the 8 length bytes of a binary value; the number is how many are in.
    BinaryLen(u8),
    /// Reading the raw bytes of a binary value.
    Binary,
    /// Expecting the `\n` after a binary value.
    BinaryEnd,
}

/// What [`ExportParser::finish`] found at the end of the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// The last entry, if the input ended without its empty line.
    pub entry: Option<RawEntry>,
    /// True if and only if the input ended inside a field.
    pub cut_mid_field: bool,
}

#[derive(Debug)]
pub struct ExportParser {
    limits: ReadLimits,
    state: State,
    entry: RawEntry,
    /// The current field name, cut to 64 bytes (sanitising cuts there anyway).
    name: Vec<u8>,
    /// The kept part of the current value.
    value: Vec<u8>,
    /// The current value's length in the input.
    value_len: u64,
    /// Bytes of the current binary value still to come.
    remaining: u64,
    len_bytes: [u8; 8],
    /// Binary fields that lacked their closing `\n`.
    malformed: u64,
}

impl ExportParser {
    pub fn new(limits: ReadLimits) -> ExportParser {
        ExportParser {
            limits,
            state: State::LineStart,
            entry: RawEntry::default(),
            name: Vec::new(),
            value: Vec::new(),
            value_len: 0,
            remaining: 0,
            len_bytes: [0; 8],
            malformed: 0,
        }
    }

    /// Binary fields seen so far that lacked their closing newline.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Parses `bytes`, handing every completed entry to `emit`. An error from `emit` stops
    /// parsing at once and is returned; the parser is then in an unspecified state.
    pub fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut emit: impl FnMut(RawEntry) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            match self.state {
                State::LineStart => {
                    if bytes[0] == b'\n' {
                        bytes = &bytes[1..];
                        if !self.entry.fields.is_empty() {
                            emit(std::mem::take(&mut self.entry))?;
                        }
                    } else {
                        self.state = State::Name;
                    }
                }
                State::Name => {
                    let end = bytes.iter().position(|&b| b == b'=' || b == b'\n');
                    let take = end.unwrap_or(bytes.len());
                    let room = MAX_FIELD_NAME_LEN.saturating_sub(self.name.len());
                    self.name.extend_from_slice(&bytes[..take.min(room)]);
                    match end {
                        Some(i) if bytes[i] == b'=' => self.state = State::Text,
                        Some(_) => self.state = State::BinaryLen(0),
                        None => {}
                    }
                    bytes = &bytes[end.map_or(take, |i| i + 1)..];
                }
                State::Text => {
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let take = end.unwrap_or(bytes.len());
                    self.keep_value_bytes(&bytes[..take]);
                    bytes = &bytes[end.map_or(take, |i| i + 1)..];
                    if end.is_some() {
                        self.end_field();
                    }
                }
                State::BinaryLen(have) => {
                    let want = 8 - usize::from(have);
                    let take = want.min(bytes.len());
                    let have = usize::from(have);
                    self.len_bytes[have..have + take].copy_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if take == want {
                        self.remaining = u64::from_le_bytes(self.len_bytes);
                        self.state =
                            if self.remaining == 0 { State::BinaryEnd } else { State::Binary };
                    } else {
                        self.state = State::BinaryLen((have + take) as u8);
                    }
                }
                State::Binary => {
                    let take =
                        usize::try_from(self.remaining).unwrap_or(usize::MAX).min(bytes.len());
                    self.keep_value_bytes(&bytes[..take]);
                    self.remaining -= take as u64;
                    bytes = &bytes[take..];
                    if self.remaining == 0 {
                        self.state = State::BinaryEnd;
                    }
                }
                State::BinaryEnd => {
                    if bytes[0] == b'\n' {
                        bytes = &bytes[1..];
                    } else {
                        // Keep the field and read on from this byte as a new line: losing
                        // one field's framing must not lose the rest of the stream.
                        self.malformed += 1;
                    }
                    self.end_field();
                }
            }
        }
        Ok(())
    }

    /// Call at the end of the input: returns the entry still being read, if any.
    pub fn finish(&mut self) -> Finished {
        let cut_mid_field = self.state != State::LineStart;
        match self.state {
            State::Text | State::Binary | State::BinaryEnd => {
                // A cut binary value keeps its announced length, so it is marked as cut.
                self.value_len += self.remaining;
                self.remaining = 0;
                self.end_field();
            }
            // A name with no value yet is not a field.
            State::Name | State::BinaryLen(_) => self.name.clear(),
            State::LineStart => {}
        }
        self.state = State::LineStart;
        let entry = std::mem::take(&mut self.entry);
        Finished { entry: (!entry.fields.is_empty()).then_some(entry), cut_mid_field }
    }

    fn keep_value_bytes(&mut self, bytes: &[u8]) {
        let room = self.entry.room(&self.limits).saturating_sub(self.value.len());
        self.value.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.value_len += bytes.len() as u64;
    }

    fn end_field(&mut self) {
        let field = RawField {
            name: sanitize_field_name(&self.name),
            value: std::mem::take(&mut self.value),
            original_len: self.value_len,
        };
        self.entry.push_raw(field, &self.limits);
        self.name.clear();
        self.value_len = 0;
        self.state = State::LineStart;
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use qlog_rpc::Limits;

    fn binary_field(name: &str, value: &[u8]) -> Vec<u8> {
        let mut out = format!("{name}\n").into_bytes();
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }

    fn sample() -> Vec<u8> {
        let mut s =
            b"__CURSOR=s=abc;i=1\n__REALTIME_TIMESTAMP=1700000000000000\nMESSAGE=hello\n".to_vec();
        s.extend(binary_field("BIN", b"line1\nline2\0\xff"));
        s.extend_from_slice(b"_BOOT_ID=b00t\n\n");
        s.extend_from_slice(b"__CURSOR=s=abc;i=2\nMESSAGE=second\n\n");
        s
    }

    fn parse_with(limits: ReadLimits, chunks: &[&[u8]]) -> (Vec<RawEntry>, Finished) {
        let mut parser = ExportParser::new(limits);
        let mut out = Vec::new();
        for chunk in chunks {
            parser
                .feed(chunk, |e| {
                    out.push(e);
                    Ok::<(), Infallible>(())
                })
                .unwrap();
        }
        let finished = parser.finish();
        (out, finished)
    }

    fn default_limits() -> ReadLimits {
        ReadLimits::from_limits(&Limits::DEFAULT)
    }

    #[test]
    fn parses_text_and_binary_fields() {
        let (entries, finished) = parse_with(default_limits(), &[&sample()]);
        assert_eq!(entries.len(), 2);
        assert_eq!(finished, Finished::default());
        let first = &entries[0];
        assert_eq!(first.get("__CURSOR"), Some(&b"s=abc;i=1"[..]));
        assert_eq!(first.get("MESSAGE"), Some(&b"hello"[..]));
        assert_eq!(first.get("BIN"), Some(&b"line1\nline2\0\xff"[..]));
        assert_eq!(first.get("_BOOT_ID"), Some(&b"b00t"[..]));
        assert_eq!(first.fields.len(), 5);
        assert_eq!(entries[1].get("MESSAGE"), Some(&b"second"[..]));
    }

    #[test]
    fn gives_the_same_entries_when_fed_one_byte_at_a_time() {
        let input = sample();
        let whole = parse_with(default_limits(), &[&input]);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(parse_with(default_limits(), &bytes), whole);
        let sevens: Vec<&[u8]> = input.chunks(7).collect();
        assert_eq!(parse_with(default_limits(), &sevens), whole);
    }

    #[test]
    fn cuts_oversized_values_keeping_their_length_and_the_stream() {
        let limits = ReadLimits { max_value_len: 4, ..default_limits() };
        let mut input = b"MESSAGE=0123456789\n".to_vec();
        input.extend(binary_field("BIN", &[7u8; 100]));
        input.extend_from_slice(b"AFTER=ok\n\nNEXT=entry\n\n");
        let (entries, _) = parse_with(limits, &[&input]);
        assert_eq!(entries.len(), 2);
        let f = &entries[0].fields;
        assert_eq!((f[0].value.as_slice(), f[0].original_len), (&b"0123"[..], 10));
        assert_eq!((f[1].value.as_slice(), f[1].original_len), (&[7u8; 4][..], 100));
        assert_eq!(f[2].value, b"ok");
        assert_eq!(entries[1].get("NEXT"), Some(&b"entr"[..]));
    }

    #[test]
    fn bounds_long_names_and_sanitises_them() {
        let input = format!("{}=v\nlower-case=w\n\n", "N".repeat(10_000));
        let (entries, _) = parse_with(default_limits(), &[input.as_bytes()]);
        assert_eq!(entries[0].fields[0].name, "N".repeat(64));
        assert_eq!(entries[0].fields[1].name, "LOWER_CASE");
    }

    #[test]
    fn counts_fields_beyond_the_limit() {
        let limits = ReadLimits { max_fields: 2, ..default_limits() };
        let (entries, _) = parse_with(limits, &[b"A=1\nB=2\nC=3\nD=4\n\n"]);
        assert_eq!((entries[0].fields.len(), entries[0].dropped_fields), (2, 2));
    }

    #[test]
    fn returns_a_truncated_last_entry_at_the_end_of_input() {
        let (entries, finished) = parse_with(default_limits(), &[b"A=1\n\nB=2\nC=par"]);
        assert_eq!(entries.len(), 1);
        assert!(finished.cut_mid_field);
        let last = finished.entry.unwrap();
        assert_eq!(last.get("B"), Some(&b"2"[..]));
        assert_eq!(last.get("C"), Some(&b"par"[..]));

        // A binary value cut short keeps its announced length, so it gets marked.
        let input = binary_field("BIN", &[1u8; 50]);
        let (entries, finished) = parse_with(default_limits(), &[&input[..20]]);
        assert!(entries.is_empty());
        let field = &finished.entry.unwrap().fields[0];
        assert_eq!((field.value.len(), field.original_len), (20 - 12, 50));

        // A bare name at the very end is dropped.
        let (_, finished) = parse_with(default_limits(), &[b"NAME_ONLY"]);
        assert_eq!(finished.entry, None);
        assert!(finished.cut_mid_field);
    }

    #[test]
    fn recovers_from_a_binary_field_without_its_newline() {
        let mut input = b"A\n".to_vec();
        input.extend_from_slice(&3u64.to_le_bytes());
        input.extend_from_slice(b"xyzB=after\n\n");
        let mut parser = ExportParser::new(default_limits());
        let mut out = Vec::new();
        parser
            .feed(&input, |e| {
                out.push(e);
                Ok::<_, Infallible>(())
            })
            .unwrap();
        assert_eq!(parser.malformed(), 1);
        assert_eq!(out[0].get("A"), Some(&b"xyz"[..]));
        assert_eq!(out[0].get("B"), Some(&b"after"[..]));
    }

    #[test]
    fn skips_blank_lines_between_entries_and_stops_when_emit_fails() {
        let (entries, _) = parse_with(default_limits(), &[b"\n\n\nA=1\n\n\n\nB=2\n\n"]);
        assert_eq!(entries.len(), 2);
        let mut parser = ExportParser::new(default_limits());
        let mut seen = 0;
        let result = parser.feed(b"A=1\n\nB=2\n\n", |_| {
            seen += 1;
            Err("stop")
        });
        assert_eq!((result, seen), (Err("stop"), 1));
    }

    #[test]
    fn a_huge_binary_length_is_read_and_discarded_not_allocated() {
        let mut input = b"BIG\n".to_vec();
        input.extend_from_slice(&(1u64 << 40).to_le_bytes());
        input.extend_from_slice(&[0u8; 4096]);
        let limits = ReadLimits { max_value_len: 16, ..default_limits() };
        let mut parser = ExportParser::new(limits);
        parser.feed(&input, |_| Ok::<_, Infallible>(())).unwrap();
        let finished = parser.finish();
        let field = &finished.entry.unwrap().fields[0];
        assert_eq!((field.value.len(), field.original_len), (16, 1 << 40));
    }
}
