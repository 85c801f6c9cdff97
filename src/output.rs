//! Output formats: how one stored record is printed.
//!
//! `short`, `short-iso`, `short-precise` and `cat` are for people and escape everything
//! (see [`crate::escape`]); `json` and `json-pretty` are always valid JSON, with values
//! that are not UTF-8 as byte arrays as journalctl does; `export` is the journal export
//! format, which systemd-journal-remote turns back into a journal file.
//!
//! The VM shown is always the trusted one from qrexec. Where the VM's own claims disagree
//! with what the sink knows (its `_HOSTNAME`, or a timestamp far from the receive time),
//! the text formats say so next to the VM name.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write;

use chrono::{DateTime, Datelike, Local, Offset, TimeZone, Timelike};
use clap::ValueEnum;
use qlog_rpc::fields;
use qlog_rpc::query::{Record, RecordKind, RecordView};
use serde_json::{Map, Value};

use crate::escape::{display_value, escape_line};

/// A claimed timestamp further than this from the receive time is marked.
const CLAIMED_TIME_SKEW_USEC: u64 = 5 * 60 * 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Short,
    ShortIso,
    ShortPrecise,
    Json,
    JsonPretty,
    Export,
    Cat,
}

pub struct Printer {
    pub format: Format,
    pub color: bool,
}

impl Printer {
    /// Prints a record as qlogd sent it, read in place.
    pub fn print(&self, r: &RecordView<'_>, out: &mut impl Write) -> std::io::Result<()> {
        match self.format {
            Format::Short | Format::ShortIso | Format::ShortPrecise => self.short(r, out),
            Format::Cat => {
                let msg = r.get(fields::MESSAGE).unwrap_or_default();
                let text = display_value(msg, true);
                self.colored(priority(r), &text, out)?;
                writeln!(out)
            }
            Format::Json => {
                write_json_line(r, out)?;
                writeln!(out)
            }
            Format::JsonPretty => {
                write_json(&json(r), true, out)?;
                writeln!(out)
            }
            Format::Export => export(r, out),
        }
    }

    /// Prints an owned record (one the bundle's redaction rewrote) exactly as
    /// [`Printer::print`] prints the same record read in place.
    pub fn print_record(&self, r: &Record, out: &mut impl Write) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(1024);
        r.encode(&mut bytes);
        let view = RecordView::parse(&bytes).expect("an encoded record parses");
        self.print(&view, out)
    }

    fn colored(&self, prio: Option<u8>, text: &str, out: &mut impl Write) -> std::io::Result<()> {
        let code = match prio {
            _ if !self.color => None,
            Some(0..=3) => Some("\x1b[1;31m"),
            Some(4) => Some("\x1b[1;33m"),
            Some(5) => Some("\x1b[1;39m"),
            Some(7) => Some("\x1b[2;39m"),
            _ => None,
        };
        match code {
            Some(code) => write!(out, "{code}{text}\x1b[0m"),
            None => write!(out, "{text}"),
        }
    }

    fn short(&self, r: &RecordView<'_>, out: &mut impl Write) -> std::io::Result<()> {
        let mut head = format_time(r.received_usec, self.format);
        head.push(' ');
        head.push_str(r.vm);
        let claims = claims(r);
        if !claims.is_empty() {
            head.push_str(&format!(" [{}]", claims.join(", ")));
        }
        if r.kind != RecordKind::Event {
            let msg = r.get(fields::MESSAGE).map(escape_line).unwrap_or_default();
            write!(out, "{head} ")?;
            self.colored(Some(4), &format!("-- qlog: {msg} --"), out)?;
            return writeln!(out);
        }
        let ident = r
            .get(fields::SYSLOG_IDENTIFIER)
            .or_else(|| r.get("_COMM"))
            .map_or(Cow::Borrowed("unknown"), escape_line);
        let pid = r.get("_PID").or_else(|| r.get("SYSLOG_PID")).map(escape_line);
        head.push(' ');
        head.push_str(&ident);
        if let Some(pid) = pid {
            head.push('[');
            head.push_str(&pid);
            head.push(']');
        }
        head.push_str(": ");
        let msg = r.get(fields::MESSAGE).unwrap_or_default();
        let text = display_value(msg, true);
        let text = text.trim_end_matches('\n');
        out.write_all(head.as_bytes())?;
        if text.contains('\n') {
            // Continuation lines line up under the first, as journalctl lays them out.
            let indent = " ".repeat(head.chars().count());
            let text = text.replace('\n', &format!("\n{indent}"));
            self.colored(priority(r), &text, out)?;
        } else {
            self.colored(priority(r), text, out)?;
        }
        out.write_all(b"\n")
    }
}

fn priority(r: &RecordView<'_>) -> Option<u8> {
    match r.get(fields::PRIORITY)? {
        [d @ b'0'..=b'7'] => Some(d - b'0'),
        _ => None,
    }
}

/// Where the VM's claims disagree with what the sink knows.
fn claims(r: &RecordView<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(host) = r.get(fields::HOSTNAME) {
        if host != r.vm.as_bytes() {
            out.push(format!("claims host \"{}\"", escape_line(host)));
        }
    }
    let claimed = r
        .get_str(fields::SOURCE_REALTIME_TIMESTAMP)
        .or_else(|| r.get_str(fields::REALTIME_TIMESTAMP))
        .and_then(|s| s.parse::<u64>().ok());
    if let Some(t) = claimed {
        if t.abs_diff(r.received_usec) > CLAIMED_TIME_SKEW_USEC {
            out.push(format!("claims time {}", format_time(t, Format::ShortIso)));
        }
    }
    out
}

pub fn format_time(usec: u64, format: Format) -> String {
    thread_local! {
        /// The last second formatted in each layout: consecutive records nearly always
        /// share it, and formatting a time (zone lookup, strftime) costs more than the
        /// rest of a line. One slot per layout, because a line of the short layout also
        /// formats a claimed time in the ISO one when the VM's clock is off.
        static LAST: RefCell<[Option<(u64, String)>; 2]> = const { RefCell::new([None, None]) };
    }
    let secs = usec / 1_000_000;
    let iso = format == Format::ShortIso;
    let mut text = LAST.with_borrow_mut(|last| match &last[usize::from(iso)] {
        Some((s, text)) if *s == secs => Some(text.clone()),
        _ => {
            let t = DateTime::from_timestamp(i64::try_from(secs).ok()?, 0)?;
            let t: DateTime<Local> = Local.from_utc_datetime(&t.naive_utc());
            let text = second_text(&t, iso);
            last[usize::from(iso)] = Some((secs, text.clone()));
            Some(text)
        }
    });
    match (&mut text, format) {
        (None, _) => usec.to_string(),
        (Some(text), Format::ShortPrecise) => {
            let _ = write!(text, ".{:06}", usec % 1_000_000);
            std::mem::take(text)
        }
        (Some(text), _) => std::mem::take(text),
    }
}

/// A second in the short layout (`Dec 04 10:00:00`) or the ISO one
/// (`2026-12-04T10:00:00+0100`), as strftime would write it in `t`'s zone. Written out
/// by hand: interpreting a strftime string on every new second was most of the cost of
/// a line whose VM claims a skewed clock.
fn second_text<Tz: TimeZone>(t: &DateTime<Tz>, iso: bool) -> String {
    let mut text = String::with_capacity(24);
    let (h, m, sec) = (t.hour(), t.minute(), t.second());
    if iso {
        let offset = t.offset().fix().local_minus_utc();
        let (sign, offset) = if offset < 0 { ('-', -offset) } else { ('+', offset) };
        let (oh, om) = (offset / 3600, offset / 60 % 60);
        let (y, mo, d) = (t.year(), t.month(), t.day());
        // strftime's %Y: four digits, and a sign past 9999.
        let plus = if y > 9999 { "+" } else { "" };
        let _ =
            write!(text, "{plus}{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{sec:02}{sign}{oh:02}{om:02}");
    } else {
        const MONTHS: [&str; 12] =
            ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let month = MONTHS[t.month0() as usize];
        let _ = write!(text, "{month} {:02} {h:02}:{m:02}:{sec:02}", t.day());
    }
    text
}

fn json_value(v: &[u8]) -> Value {
    match std::str::from_utf8(v) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => Value::Array(v.iter().map(|b| Value::from(*b)).collect()),
    }
}

/// journalctl's JSON shape: one key per field, repeated fields as arrays of values.
pub fn json(r: &RecordView<'_>) -> Value {
    let mut map = Map::new();
    map.insert(fields::QLOG_VM.into(), Value::String(r.vm.to_owned()));
    map.insert(fields::QLOG_STREAM.into(), Value::String(r.stream.to_owned()));
    map.insert(fields::QLOG_SEQ.into(), Value::String(r.seq.to_string()));
    map.insert(fields::QLOG_RECEIVED_USEC.into(), Value::String(r.received_usec.to_string()));
    if r.kind != RecordKind::Event {
        let kind = serde_json::to_value(r.kind).expect("record kinds serialise");
        map.insert("_QLOG_KIND".into(), kind);
    }
    // Group repeated names, keeping first-seen order: one value stays a value, several
    // become an array, as journalctl prints them.
    let mut grouped: Vec<(&str, Vec<Value>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (name, value) in r.fields() {
        let slot = *index.entry(name).or_insert_with(|| {
            grouped.push((name, Vec::new()));
            grouped.len() - 1
        });
        grouped[slot].1.push(json_value(value));
    }
    for (name, mut values) in grouped {
        let v = if values.len() == 1 { values.remove(0) } else { Value::Array(values) };
        map.insert(name.to_owned(), v);
    }
    Value::Object(map)
}

/// Writes JSON in which, beyond what JSON requires, DEL, the C1 controls, bidi controls
/// and line separators are `\u` escapes too: `-o json` read on a terminal must not let a
/// VM's bytes move the cursor or reorder text, and the JSON stays the same value.
fn write_json(value: &Value, pretty: bool, out: &mut impl Write) -> std::io::Result<()> {
    use serde::Serialize;
    let result = if pretty {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut *out,
            SafeFormatter { inner: serde_json::ser::PrettyFormatter::new() },
        );
        value.serialize(&mut ser)
    } else {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut *out,
            SafeFormatter { inner: serde_json::ser::CompactFormatter },
        );
        value.serialize(&mut ser)
    };
    result.map_err(std::io::Error::other)
}

/// Writes the same JSON as `write_json(&json(r), false, ..)` without building a value
/// first: `-o json` is how whole stores are dumped, so this is a hot path.
fn write_json_line(r: &RecordView<'_>, out: &mut impl Write) -> std::io::Result<()> {
    let mut seq = itoa::Buffer::new();
    let mut received = itoa::Buffer::new();
    let kind = match r.kind {
        RecordKind::Event => None,
        RecordKind::Gap => Some("gap"),
        RecordKind::Notice => Some("notice"),
    };
    // Keys in byte order, as serde_json's map writes them. The sort is stable, so a
    // repeated name's values stay in their order and end up side by side; a VM's fields
    // cannot collide with the sink's, which the sink renamed on ingest.
    let mut entries: Vec<(&[u8], &[u8])> = Vec::with_capacity(40);
    entries.extend(r.raw_fields());
    let trusted: [(&str, &[u8]); 4] = [
        (fields::QLOG_VM, r.vm.as_bytes()),
        (fields::QLOG_STREAM, r.stream.as_bytes()),
        (fields::QLOG_SEQ, seq.format(r.seq).as_bytes()),
        (fields::QLOG_RECEIVED_USEC, received.format(r.received_usec).as_bytes()),
    ];
    for (name, value) in trusted.into_iter().chain(kind.map(|k| ("_QLOG_KIND", k.as_bytes()))) {
        entries.push((name.as_bytes(), value));
    }
    thread_local! {
        /// The last record's field names, and the order that sorts them: consecutive
        /// records of one source nearly always have the same names, so the sort runs
        /// once per layout rather than once per record.
        static ORDER: RefCell<(Vec<u8>, Vec<u8>, Vec<usize>)> =
            const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    }
    ORDER.with_borrow_mut(|(names, last, order)| {
        names.clear();
        for (name, _) in &entries {
            names.push(name.len() as u8);
            names.extend_from_slice(name);
        }
        if names != last {
            // Stable: a repeated name's values stay in their order, side by side.
            order.clear();
            order.extend(0..entries.len());
            order.sort_by(|&a, &b| entries[a].0.cmp(entries[b].0));
            std::mem::swap(names, last);
        }
        out.write_all(b"{")?;
        let mut i = 0;
        while i < order.len() {
            let name = entries[order[i]].0;
            let same = order[i..].iter().take_while(|&&j| entries[j].0 == name).count();
            if i > 0 {
                out.write_all(b",")?;
            }
            // Names were checked against journald's rules ([A-Z0-9_]): nothing to escape.
            out.write_all(b"\"")?;
            out.write_all(name)?;
            out.write_all(b"\":")?;
            if same == 1 {
                json_value_bytes(entries[order[i]].1, out)?;
            } else {
                out.write_all(b"[")?;
                for (k, &j) in order[i..i + same].iter().enumerate() {
                    if k > 0 {
                        out.write_all(b",")?;
                    }
                    json_value_bytes(entries[j].1, out)?;
                }
                out.write_all(b"]")?;
            }
            i += same;
        }
        out.write_all(b"}")
    })
}

/// A value as journalctl writes it: a string if it is UTF-8, else an array of bytes.
fn json_value_bytes(v: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    match std::str::from_utf8(v) {
        Ok(s) => json_string(s, out),
        Err(_) => {
            out.write_all(b"[")?;
            for (i, b) in v.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                write!(out, "{b}")?;
            }
            out.write_all(b"]")
        }
    }
}

/// A JSON string with serde_json's escapes plus those of [`json_unsafe`]. Printable
/// ASCII, nearly all of a log, is copied in runs without decoding characters.
fn json_string(s: &str, out: &mut impl Write) -> std::io::Result<()> {
    out.write_all(b"\"")?;
    let bytes = s.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        i += plain_json_run(&bytes[i..]);
        let Some(&b) = bytes.get(i) else { break };
        let (escape, len): (Option<&[u8]>, usize) = match b {
            b'"' => (Some(b"\\\""), 1),
            b'\\' => (Some(b"\\\\"), 1),
            b'\n' => (Some(b"\\n"), 1),
            b'\r' => (Some(b"\\r"), 1),
            b'\t' => (Some(b"\\t"), 1),
            0x08 => (Some(b"\\b"), 1),
            0x0c => (Some(b"\\f"), 1),
            0x80.. => {
                let c = s[i..].chars().next().expect("i is on a char boundary");
                if !json_unsafe(c) {
                    i += c.len_utf8();
                    continue;
                }
                (None, c.len_utf8())
            }
            _ => (None, 1),
        };
        out.write_all(&bytes[start..i])?;
        match escape {
            Some(e) => out.write_all(e)?,
            None => {
                let c = s[i..].chars().next().expect("i is on a char boundary");
                write!(out, "\\u{:04x}", c as u32)?
            }
        }
        i += len;
        start = i;
    }
    out.write_all(&bytes[start..])?;
    out.write_all(b"\"")
}

/// How many leading bytes need no escape in a JSON string: printable ASCII other than
/// `"` and `\\`. Eight bytes are tested at a time; a word with any other byte (or a
/// false alarm from a borrow, which only follows a real one) is finished bytewise.
fn plain_json_run(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A high bit in each byte that equals `b` (exact up to the first such byte).
    let equal = |x: u64, b: u8| {
        let y = x ^ (ONES * u64::from(b));
        y.wrapping_sub(ONES) & !y & HIGH
    };
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let special = equal(x, b'"') | equal(x, b'\\') | equal(x, 0x7f) | (x & HIGH);
        if control | special != 0 {
            break;
        }
        i += 8;
    }
    let plain = |b: &u8| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\';
    i + bytes[i..].iter().take_while(|b| plain(b)).count()
}

/// A serde_json formatter that escapes terminal-unsafe characters inside strings and
/// otherwise formats as `inner` does.
struct SafeFormatter<F> {
    inner: F,
}

fn json_unsafe(c: char) -> bool {
    matches!(c, '\u{7f}'..='\u{9f}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}' | '\u{61c}')
}

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for SafeFormatter<F> {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(pos) = rest.find(json_unsafe) {
            w.write_all(&rest.as_bytes()[..pos])?;
            let c = rest[pos..].chars().next().expect("find returned a char boundary");
            write!(w, "\\u{:04x}", c as u32)?;
            rest = &rest[pos + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.inner.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.inner.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object_key(w)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.inner.end_object_value(w)
    }
}

/// A `_BOOT_ID` journald would accept: 32 lower-case hex digits, not all zero.
fn valid_boot_id(v: &[u8]) -> bool {
    v.len() == 32
        && v.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && v.iter().any(|b| *b != b'0')
}

/// A stable stand-in boot ID for records without a valid one, derived from the VM and
/// stream, so journal-remote never files them under the previous entry's boot.
fn derived_boot_id(vm: &str, stream: &str) -> String {
    let hash = |seed: u64| {
        let bytes = vm.bytes().chain([0]).chain(stream.bytes());
        bytes.fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    };
    format!("{:016x}{:016x}", hash(0xcbf2_9ce4_8422_2325), hash(0x8422_2325_cbf2_9ce4))
}

/// Journal export format. `_HOSTNAME` is the trusted VM so journalctl shows it, and
/// `__REALTIME_TIMESTAMP` is the receive time, which is what qlog orders by. The VM's own
/// values of these, and any `__MONOTONIC_TIMESTAMP` or `_BOOT_ID` that journal-remote
/// could not parse (it stops reading its whole input at one), are kept under
/// `QLOG_CLAIMED_*` names.
pub fn export(r: &RecordView<'_>, out: &mut impl Write) -> std::io::Result<()> {
    let field = |out: &mut dyn Write, name: &str, value: &[u8]| -> std::io::Result<()> {
        if value.contains(&b'\n') {
            out.write_all(name.as_bytes())?;
            out.write_all(b"\n")?;
            out.write_all(&(value.len() as u64).to_le_bytes())?;
            out.write_all(value)?;
            out.write_all(b"\n")
        } else {
            out.write_all(name.as_bytes())?;
            out.write_all(b"=")?;
            out.write_all(value)?;
            out.write_all(b"\n")
        }
    };
    let received = r.received_usec.to_string();
    field(out, fields::REALTIME_TIMESTAMP, received.as_bytes())?;
    let monotonic = r.get(fields::MONOTONIC_TIMESTAMP).filter(|v| {
        std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()).is_some_and(|n| n < 1 << 63)
    });
    field(out, fields::MONOTONIC_TIMESTAMP, monotonic.unwrap_or(b"0"))?;
    let boot_id = r.get(fields::BOOT_ID).filter(|v| valid_boot_id(v));
    match boot_id {
        Some(id) => field(out, fields::BOOT_ID, id)?,
        None => field(out, fields::BOOT_ID, derived_boot_id(r.vm, r.stream).as_bytes())?,
    }
    field(out, fields::HOSTNAME, r.vm.as_bytes())?;
    field(out, fields::QLOG_VM, r.vm.as_bytes())?;
    field(out, fields::QLOG_STREAM, r.stream.as_bytes())?;
    field(out, fields::QLOG_SEQ, r.seq.to_string().as_bytes())?;
    field(out, fields::QLOG_RECEIVED_USEC, received.as_bytes())?;
    for (name, value) in r.fields() {
        match name {
            fields::REALTIME_TIMESTAMP => field(out, "QLOG_CLAIMED_REALTIME_TIMESTAMP", value)?,
            fields::MONOTONIC_TIMESTAMP if monotonic.is_some() => {}
            fields::MONOTONIC_TIMESTAMP => field(out, "QLOG_CLAIMED_MONOTONIC_TIMESTAMP", value)?,
            fields::BOOT_ID if boot_id.is_some() => {}
            fields::BOOT_ID => field(out, "QLOG_CLAIMED_BOOT_ID", value)?,
            fields::CURSOR => {}
            fields::HOSTNAME => field(out, "QLOG_CLAIMED_HOSTNAME", value)?,
            name => field(out, name, value)?,
        }
    }
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_strftime_would() {
        let usecs = [
            0,
            1_796_256_000_123_456,
            951_782_400_000_000,
            4_102_444_799_999_999,
            253_402_300_800_000_000,
        ];
        for usec in usecs {
            let t = DateTime::from_timestamp((usec / 1_000_000) as i64, 0).unwrap();
            let t: DateTime<Local> = Local.from_utc_datetime(&t.naive_utc());
            assert_eq!(
                format_time(usec, Format::ShortIso),
                t.format("%Y-%m-%dT%H:%M:%S%z").to_string()
            );
            assert_eq!(format_time(usec, Format::Short), t.format("%b %d %H:%M:%S").to_string());
            let precise = format!("{}.{:06}", t.format("%b %d %H:%M:%S"), usec % 1_000_000);
            assert_eq!(format_time(usec, Format::ShortPrecise), precise);
        }
    }
    /// Zones west and east of UTC, with offsets in minutes: the sign and the minutes of
    /// the ISO layout, which a test machine on UTC never shows.
    #[test]
    fn seconds_are_written_as_strftime_would_in_any_zone() {
        for offset_secs in [0, -(3 * 3600 + 30 * 60), 5 * 3600 + 45 * 60, -12 * 3600, 14 * 3600] {
            let zone = chrono::FixedOffset::east_opt(offset_secs).unwrap();
            for secs in [0i64, 1_796_256_000, 951_782_400, 4_102_444_799, 253_402_300_800] {
                let t =
                    zone.from_utc_datetime(&DateTime::from_timestamp(secs, 0).unwrap().naive_utc());
                assert_eq!(second_text(&t, true), t.format("%Y-%m-%dT%H:%M:%S%z").to_string());
                assert_eq!(second_text(&t, false), t.format("%b %d %H:%M:%S").to_string());
            }
        }
    }

    use qlog_rpc::Event;

    fn rec(fields: &[(&str, &[u8])]) -> Record {
        let mut event = Event::new();
        for (k, v) in fields {
            event.push(*k, v.to_vec());
        }
        Record {
            vm: "sd-app".into(),
            stream: "journal".into(),
            received_usec: 1_796_292_000_000_000,
            seq: 3,
            kind: RecordKind::Event,
            event,
        }
    }

    /// The record as qlogd sends it; read it with `RecordView::parse`.
    fn wire(r: &Record) -> Vec<u8> {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        bytes
    }

    fn render(format: Format, r: &Record) -> String {
        let mut out = Vec::new();
        Printer { format, color: false }.print_record(r, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_is_valid_with_binary_and_repeated_fields() {
        let r = rec(&[("MESSAGE", b"a\xffb"), ("TAG", b"1"), ("TAG", b"2"), ("TAG", b"3")]);
        let v: Value = serde_json::from_str(&render(Format::Json, &r)).unwrap();
        assert_eq!(v["MESSAGE"], serde_json::json!([97, 255, 98]));
        assert_eq!(v["TAG"], serde_json::json!(["1", "2", "3"]));
        assert_eq!(v["_QLOG_VM"], "sd-app");
    }

    #[test]
    fn short_marks_claims_that_disagree_with_the_sink() {
        let r = rec(&[
            ("_HOSTNAME", b"dom0"),
            ("__REALTIME_TIMESTAMP", b"1000000"),
            ("MESSAGE", b"hi"),
        ]);
        let line = render(Format::Short, &r);
        assert!(line.contains("sd-app [claims host \"dom0\", claims time 1970-"), "{line}");
        let honest = rec(&[("_HOSTNAME", b"sd-app"), ("MESSAGE", b"hi")]);
        assert!(!render(Format::Short, &honest).contains("claims"));
    }

    #[test]
    fn json_escapes_terminal_controls_and_stays_valid() {
        let r = rec(&[("MESSAGE", "a\u{9b}b\u{202e}c\u{7f}".as_bytes())]);
        let text = render(Format::Json, &r);
        assert!(!text.chars().any(json_unsafe), "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["MESSAGE"], "a\u{9b}b\u{202e}c\u{7f}");
        let pretty: Value = serde_json::from_str(&render(Format::JsonPretty, &r)).unwrap();
        assert_eq!(pretty, v);
    }

    #[test]
    fn direct_json_equals_the_serde_rendering() {
        let samples: Vec<Record> = vec![
            rec(&[("MESSAGE", "plain".as_bytes()), ("TAG", b"1"), ("TAG", b"2")]),
            rec(&[(
                "MESSAGE",
                "q\"b\\s\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}\u{9b}\u{202e}\u{2066}Grüße".as_bytes(),
            )]),
            rec(&[("BIN", &[0, 255, 10][..]), ("BIN", b"text"), ("A", b""), ("Z", b"z")]),
        ];
        // Twice over: the cached key order must follow each change of field layout.
        for r in samples.iter().chain(&samples) {
            let (bytes, mut direct, mut via) = (wire(r), Vec::new(), Vec::new());
            let r = RecordView::parse(&bytes).unwrap();
            write_json_line(&r, &mut direct).unwrap();
            write_json(&json(&r), false, &mut via).unwrap();
            assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(via).unwrap());
        }
        let mut gap = rec(&[("MESSAGE", b"gap")]);
        gap.kind = RecordKind::Gap;
        let (bytes, mut direct, mut via) = (wire(&gap), Vec::new(), Vec::new());
        let gap = RecordView::parse(&bytes).unwrap();
        write_json_line(&gap, &mut direct).unwrap();
        write_json(&json(&gap), false, &mut via).unwrap();
        assert_eq!(direct, via);
    }

    #[test]
    fn json_strings_match_serde_at_every_alignment() {
        // Every special byte class, at every offset within and across 8-byte words.
        let specials =
            ["\"", "\\", "\n", "\u{1}", "\u{1f}", "\u{7f}", "é", "\u{9b}", "\u{202e}", " "];
        for special in specials {
            for offset in 0..20 {
                let text = format!("{}{special}{}", "a".repeat(offset), "b".repeat(offset % 11));
                let r = rec(&[("MESSAGE", text.as_bytes())]);
                let (bytes, mut direct, mut via) = (wire(&r), Vec::new(), Vec::new());
                let view = RecordView::parse(&bytes).unwrap();
                write_json_line(&view, &mut direct).unwrap();
                write_json(&json(&view), false, &mut via).unwrap();
                assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(via).unwrap());
            }
        }
        assert_eq!(plain_json_run(b"0123456789abcdef\"x"), 16);
        assert_eq!(plain_json_run(b"abc\x1bdefghijk"), 3);
        assert_eq!(plain_json_run("abcdefg\u{e9}".as_bytes()), 7);
    }

    #[test]
    fn export_replaces_metadata_journal_remote_cannot_parse() {
        let r = rec(&[
            ("__MONOTONIC_TIMESTAMP", b"garbage"),
            ("_BOOT_ID", b"not-a-boot-id"),
            ("MESSAGE", b"m"),
        ]);
        let (bytes, mut out) = (wire(&r), Vec::new());
        export(&RecordView::parse(&bytes).unwrap(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("__MONOTONIC_TIMESTAMP=0\n"), "{text}");
        assert!(
            text.contains(&format!("_BOOT_ID={}\n", derived_boot_id("sd-app", "journal"))),
            "{text}"
        );
        assert!(text.contains("QLOG_CLAIMED_MONOTONIC_TIMESTAMP=garbage\n"), "{text}");
        assert!(text.contains("QLOG_CLAIMED_BOOT_ID=not-a-boot-id\n"), "{text}");
    }

    #[test]
    fn export_uses_binary_framing_for_multiline_values() {
        let r = rec(&[("MESSAGE", b"one\ntwo"), ("PRIORITY", b"3")]);
        let (bytes, mut out) = (wire(&r), Vec::new());
        export(&RecordView::parse(&bytes).unwrap(), &mut out).unwrap();
        let needle = [b"MESSAGE\n".as_slice(), &7u64.to_le_bytes(), b"one\ntwo\n"].concat();
        assert!(out.windows(needle.len()).any(|w| w == needle.as_slice()));
        assert!(out.ends_with(b"PRIORITY=3\n\n"));
    }
}
