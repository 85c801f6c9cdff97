//! Readers for `--source stdin`: plain lines and journalctl-style JSON, with bounded memory.
//!
//! Owns splitting a byte stream into lines without ever buffering more than a limit (the
//! rest of a long line is read and counted, not kept), turning a line into a
//! [`RawEntry`], and the JSON value rules. The export format lives in [`crate::export`];
//! the IO loop lives in [`crate::source`]. A line that cannot be parsed is never fatal: it
//! is forwarded as `MESSAGE` with `QLOG_PARSE_ERROR` saying why.

use serde_json::Value;

use crate::limits::{sanitize_field_name, RawEntry, RawField, ReadLimits, PARSE_ERROR_FIELD};
use qlog_rpc::fields::MESSAGE;

/// One input line without its `\n`, possibly cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub bytes: &'a [u8],
    /// The line's length in the input, more than `bytes.len()` if it was cut.
    pub original_len: u64,
}

/// Splits a byte stream into lines, keeping at most `max_len` bytes of each.
#[derive(Debug)]
pub struct LineSplitter {
    max_len: usize,
    buf: Vec<u8>,
    seen: u64,
    /// True if and only if bytes of an unfinished line were fed.
    open: bool,
}

impl LineSplitter {
    pub fn new(max_len: usize) -> LineSplitter {
        LineSplitter { max_len, buf: Vec::new(), seen: 0, open: false }
    }

    /// Splits `bytes`, handing every completed line to `emit`; an error from `emit` stops
    /// at once and is returned.
    pub fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut emit: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let part = &bytes[..end.unwrap_or(bytes.len())];
            bytes = &bytes[end.map_or(bytes.len(), |i| i + 1)..];
            let Some(_) = end else {
                self.append(part);
                break;
            };
            // The common case, a whole short line in one chunk, is handed out unbuffered.
            if !self.open && part.len() <= self.max_len {
                emit(Line { bytes: part, original_len: part.len() as u64 })?;
                continue;
            }
            self.append(part);
            let result = emit(Line { bytes: &self.buf, original_len: self.seen });
            self.reset();
            result?;
        }
        Ok(())
    }

    /// Call at the end of the input: a last line without `\n` is still a line.
    pub fn finish<E>(&mut self, emit: impl FnOnce(Line<'_>) -> Result<(), E>) -> Result<(), E> {
        if !self.open {
            return Ok(());
        }
        let result = emit(Line { bytes: &self.buf, original_len: self.seen });
        self.reset();
        result
    }

    fn append(&mut self, part: &[u8]) {
        let room = self.max_len.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
        self.seen += part.len() as u64;
        self.open = true;
    }

    fn reset(&mut self) {
        self.buf.clear();
        // Do not keep a huge allocation alive after one huge line.
        self.buf.shrink_to(64 * 1024);
        self.seen = 0;
        self.open = false;
    }
}

/// `--input-format lines`: the line, bytes as they are, is the `MESSAGE`.
pub fn line_entry(line: Line<'_>) -> RawEntry {
    let mut entry = RawEntry::default();
    entry.fields.push(RawField {
        name: MESSAGE.to_string(),
        value: line.bytes.to_vec(),
        original_len: line.original_len,
    });
    entry
}

/// A line forwarded as it is because it could not be parsed.
pub fn parse_error_entry(line: Line<'_>, error: &str, limits: &ReadLimits) -> RawEntry {
    let mut entry = line_entry(Line {
        bytes: &line.bytes[..line.bytes.len().min(limits.max_value_len)],
        original_len: line.original_len,
    });
    entry.push_bounded(PARSE_ERROR_FIELD.to_string(), error.as_bytes().to_vec(), limits);
    entry
}

/// True if and only if the line holds nothing but whitespace, which JSON input skips.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// `--input-format json`: one journalctl-style JSON object.
///
/// Values may be strings, numbers (forwarded as their text), `null` (the field is left
/// out, as journalctl writes `null` for values it did not show), an array of numbers
/// 0-255 (a binary value) or an array of any of those (the field repeated).
pub fn json_entry(line: Line<'_>, limits: &ReadLimits) -> Result<RawEntry, String> {
    if line.original_len > line.bytes.len() as u64 {
        return Err(format!(
            "line of {} bytes is longer than the limit of {}",
            line.original_len,
            line.bytes.len()
        ));
    }
    let object = match serde_json::from_slice::<Value>(line.bytes) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err("line is JSON but not an object".to_string()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let mut entry = RawEntry::default();
    for (key, value) in object {
        let name = sanitize_field_name(key.as_bytes());
        match value {
            Value::Array(items) if !is_byte_array(&items) => {
                for item in items {
                    push_json_value(&mut entry, &name, item, limits)?;
                }
            }
            other => push_json_value(&mut entry, &name, other, limits)?,
        }
    }
    Ok(entry)
}

fn is_byte_array(items: &[Value]) -> bool {
    items.iter().all(|v| v.as_u64().is_some_and(|n| n <= 255))
}

fn push_json_value(
    entry: &mut RawEntry,
    name: &str,
    value: Value,
    limits: &ReadLimits,
) -> Result<(), String> {
    let bytes = match value {
        Value::Null => return Ok(()),
        Value::String(s) => s.into_bytes(),
        Value::Number(n) => n.to_string().into_bytes(),
        Value::Array(items) if is_byte_array(&items) => {
            items.iter().map(|v| v.as_u64().expect("checked to be a byte") as u8).collect()
        }
        Value::Array(_) => return Err(format!("field {name} has an array nested too deep")),
        Value::Bool(_) | Value::Object(_) => {
            return Err(format!("field {name} is neither a string, a number nor bytes"))
        }
    };
    entry.push_bounded(name.to_string(), bytes, limits);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use qlog_rpc::Limits;

    fn split(max_len: usize, chunks: &[&[u8]]) -> Vec<(Vec<u8>, u64)> {
        let mut splitter = LineSplitter::new(max_len);
        let mut out = Vec::new();
        let mut keep = |l: Line<'_>| {
            out.push((l.bytes.to_vec(), l.original_len));
            Ok::<_, Infallible>(())
        };
        for chunk in chunks {
            splitter.feed(chunk, &mut keep).unwrap();
        }
        splitter.finish(&mut keep).unwrap();
        out
    }

    fn limits() -> ReadLimits {
        ReadLimits::from_limits(&Limits::DEFAULT)
    }

    fn line(text: &str) -> Line<'_> {
        Line { bytes: text.as_bytes(), original_len: text.len() as u64 }
    }

    #[test]
    fn splits_lines_across_chunks_and_keeps_a_last_unterminated_line() {
        let out = split(100, &[b"one\ntw", b"o\n\nthr", b"ee"]);
        let lines: Vec<_> = out.iter().map(|(b, _)| b.as_slice()).collect();
        assert_eq!(lines, [&b"one"[..], b"two", b"", b"three"]);
        assert_eq!(split(100, &[b"a\n"]).len(), 1, "no phantom line after a final newline");
    }

    #[test]
    fn cuts_long_lines_and_remembers_their_length() {
        let long = vec![b'x'; 1000];
        let mut input = long.clone();
        input.extend_from_slice(b"\nshort\n");
        let out = split(10, &[&input[..500], &input[500..]]);
        assert_eq!(out[0], (vec![b'x'; 10], 1000));
        assert_eq!(out[1], (b"short".to_vec(), 5));
    }

    #[test]
    fn keeps_invalid_utf8_bytes_as_they_are() {
        let out = split(100, &[b"caf\xe9 \x1b[2J\r\n"]);
        let entry = line_entry(Line { bytes: &out[0].0, original_len: out[0].1 });
        assert_eq!(entry.get("MESSAGE"), Some(&b"caf\xe9 \x1b[2J\r"[..]));
    }

    #[test]
    fn parses_journalctl_json_values() {
        let text = concat!(
            r#"{"MESSAGE":"hi","PRIORITY":6,"BIN":[0,255,10],"#,
            r#""REP":["a",[98],7],"GONE":null,"lower":"x"}"#
        );
        let e = json_entry(line(text), &limits()).unwrap();
        assert_eq!(e.get("MESSAGE"), Some(&b"hi"[..]));
        assert_eq!(e.get("PRIORITY"), Some(&b"6"[..]));
        assert_eq!(e.get("BIN"), Some(&[0u8, 255, 10][..]));
        let reps: Vec<_> = e.fields.iter().filter(|f| f.name == "REP").map(|f| &f.value).collect();
        assert_eq!(reps, [&b"a".to_vec(), &b"b".to_vec(), &b"7".to_vec()]);
        assert_eq!(e.get("GONE"), None);
        assert_eq!(e.get("LOWER"), Some(&b"x"[..]));
    }

    #[test]
    fn rejects_bad_json_lines_with_a_reason() {
        for bad in ["not json", "[1,2]", r#"{"A":true}"#, r#"{"A":{"b":1}}"#, r#"{"A":[[1,[2]]]}"#]
        {
            assert!(json_entry(line(bad), &limits()).is_err(), "{bad}");
        }
        let cut = Line { bytes: b"{\"A\":", original_len: 5000 };
        assert!(json_entry(cut, &limits()).unwrap_err().contains("5000"));
    }

    #[test]
    fn a_parse_error_forwards_the_line_and_the_reason() {
        let e = parse_error_entry(line("garbage"), "invalid JSON: x", &limits());
        assert_eq!(e.get("MESSAGE"), Some(&b"garbage"[..]));
        assert_eq!(e.get(PARSE_ERROR_FIELD), Some(&b"invalid JSON: x"[..]));
        assert!(is_blank(b"  \t\r"));
        assert!(!is_blank(b" {}"));
    }
}
