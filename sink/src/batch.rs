//! The stored form of a batch (version 3): records in small LZ4 chunks, behind a head
//! that says where each chunk is and, for every record, the keys filters ask about most.
//!
//! ```text
//! common header  version(3) count(u32) first_usec(u64) last_usec(u64) raw_len(u32)
//! head_len(u32) head_crc(u32)        CRC-32 of the head
//! head           chunk_count(u32)
//!                chunk_count × { records(u32) raw_len(u32) stored_len(u32) crc(u32) }
//!                unit dictionary:       n(u8), n × { len(u8) bytes }
//!                identifier dictionary: n(u8), n × { len(u8) bytes }
//!                count × { priority(u8) unit(u8) identifier(u8) }
//! chunks         back to back, each an LZ4 block; its CRC-32 is in the head
//! ```
//!
//! Integers are big-endian. Why chunks: a query for one unit's errors over an hour wants
//! about one record in a hundred, and every record sits in a batch of a megabyte. With
//! the keys in the head, a reader decides which records can match before it inflates
//! anything, then reads and inflates only the chunks that hold them (a chunk is about
//! [`CHUNK_BYTES`] of records), and a `tail -n` inflates only the last few chunks.
//!
//! Chunk 0 holds the batch's first [`DICT_CHUNK_BYTES`] of records and is compressed
//! alone; every later chunk is compressed with chunk 0's records as its LZ4 dictionary.
//! Log records of one VM repeat each other (field names, boot and machine IDs, units),
//! so small chunks compress almost as well as a whole batch would. The chunks are
//! compressed at an LZ4 HC level by liblz4 (lz4hc.rs), a big batch's on two threads and
//! a commit's batches on all cores (committer.rs), and inflated by lz4_flex: LZ4 blocks
//! either way. Measured by `qlog-bench ingest` on its journald-like records (journal-
//! remote stores 612 bytes each): a 32 KiB dictionary chunk and 8 KiB chunks take 139
//! bytes a record with HC; 16 KiB and 4 KiB took 153 with HC and 184 with lz4_flex's
//! fast compressor, and one fast LZ4 block per megabyte took 157. The bigger chunks cost
//! a `-p err -u UNIT` query little (6.7 ms against 7.1 on ten million records), and HC's
//! blocks inflate faster: a `-g` scan of the same store took 4.0 s instead of 5.9.
//!
//! The keys are filters' exact answers, or "cannot tell", never a guess: a reader skips
//! only records the filter would reject.
//! - priority: the first `PRIORITY` value as a digit 0 to 7, or [`PRIORITY_NONE`] if
//!   there is none or it is not one digit (what `-p` sees).
//! - unit: [`KEY_NONE`] if the record has none of the fields `-u` reads; an index into
//!   the unit dictionary, plus one, if its only such field is one `_SYSTEMD_UNIT`;
//!   [`KEY_OTHER`] otherwise (a `UNIT` field, two units, a value too long for the
//!   dictionary, or a full dictionary).
//! - identifier: the same for `SYSLOG_IDENTIFIER`.
//!
//! A hostile VM choosing its values can only fill a batch's dictionaries (254 entries
//! of at most 255 bytes each), after which its records are [`KEY_OTHER`] and read.

use std::ops::Range;

use qlog_rpc::event::priority_digit;
use qlog_rpc::fields;
use qlog_rpc::query::RecordView;

use crate::filter::UNIT_CLAIM_FIELDS;
use crate::lz4hc::Compressor;

pub const VERSION: u8 = 3;
/// version, count, first and last receive time, uncompressed length.
pub const COMMON_HEADER_LEN: usize = 25;
/// The common header, the head's length and the head's CRC-32.
pub const FIXED_LEN: usize = COMMON_HEADER_LEN + 8;
/// Chunk 0, the dictionary of the others, ends at the first record boundary past this.
pub const DICT_CHUNK_BYTES: usize = 32 * 1024;
/// Later chunks end at the first record boundary past this.
pub const CHUNK_BYTES: usize = 8 * 1024;
/// A batch of at least this many chunks is compressed on two threads.
const PARALLEL_CHUNKS: usize = 8;
/// A record without the field: it fails every filter on it.
pub const KEY_NONE: u8 = 0;
/// The keys cannot tell: the record must be read.
pub const KEY_OTHER: u8 = 255;
/// No `PRIORITY`, or one that is not a single digit 0 to 7.
pub const PRIORITY_NONE: u8 = 255;
const CHUNK_ENTRY_LEN: usize = 16;
const KEYS_PER_RECORD: usize = 3;
/// Entries a dictionary holds: the key values 1 to 254.
const DICT_ENTRIES: usize = 254;
const DICT_VALUE_MAX: usize = 255;
/// Largest uncompressed batch a reader agrees to inflate, so a damaged head cannot make
/// it allocate without bound.
pub const MAX_RAW_LEN: u32 = 256 * 1024 * 1024;

/// Encodes records (whole, back to back in `raw`, as the committer builds them) as one
/// version-3 batch value.
///
/// # Panics
///
/// If `raw` is not whole records: the committer encoded them itself.
pub fn encode(first_usec: u64, last_usec: u64, raw: &[u8]) -> (u32, Vec<u8>) {
    let mut units = Dict::default();
    let mut identifiers = Dict::default();
    let mut keys = Vec::with_capacity(raw.len() / 256 * KEYS_PER_RECORD);
    // (records, raw range) of each chunk.
    let mut chunks: Vec<(u32, Range<usize>)> = Vec::new();
    let (mut pos, mut start, mut in_chunk, mut count) = (0, 0, 0u32, 0u32);
    while pos < raw.len() {
        let view = RecordView::parse(&raw[pos..]).expect("the committer encodes whole records");
        keys.extend_from_slice(&record_keys(&view, &mut units, &mut identifiers));
        pos += view.bytes.len();
        in_chunk += 1;
        count += 1;
        let target = if chunks.is_empty() { DICT_CHUNK_BYTES } else { CHUNK_BYTES };
        if pos - start >= target {
            chunks.push((in_chunk, start..pos));
            (start, in_chunk) = (pos, 0);
        }
    }
    if in_chunk > 0 {
        chunks.push((in_chunk, start..pos));
    }

    let dict = chunks.first().map_or(&raw[..0], |(_, r)| &raw[r.clone()]);
    // Each run of chunks gets its own compressor: the dictionary is loaded once a run.
    let compress_run = |run: &[(u32, Range<usize>)], first: usize| {
        let mut compressor = Compressor::new(dict);
        let stored: usize = run.iter().map(|(_, r)| r.len()).sum();
        let (mut data, mut lens) = (Vec::with_capacity(stored / 4), Vec::with_capacity(run.len()));
        for (j, (_, range)) in run.iter().enumerate() {
            lens.push(compressor.compress(&raw[range.clone()], first + j > 0, &mut data));
        }
        (data, lens)
    };
    // HC compression is most of the committer's work on a big batch: the two halves of
    // one go to two threads. A small batch stays on this one (a handoff costs more).
    let runs = if chunks.len() >= PARALLEL_CHUNKS {
        let mid = chunks.len() / 2;
        let (a, b) =
            rayon::join(|| compress_run(&chunks[..mid], 0), || compress_run(&chunks[mid..], mid));
        vec![a, b]
    } else {
        vec![compress_run(&chunks, 0)]
    };
    let data_len = runs.iter().map(|(data, _)| data.len()).sum();
    let mut data = Vec::with_capacity(data_len);
    let mut head = Vec::with_capacity(4 + chunks.len() * CHUNK_ENTRY_LEN + keys.len() + 1024);
    head.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
    let mut chunk_list = chunks.iter();
    for (run_data, lens) in &runs {
        let mut offset = 0;
        for &written in lens {
            let (records, range) = chunk_list.next().expect("one length per chunk");
            let block = &run_data[offset..offset + written];
            offset += written;
            head.extend_from_slice(&records.to_be_bytes());
            head.extend_from_slice(&(range.len() as u32).to_be_bytes());
            head.extend_from_slice(&(written as u32).to_be_bytes());
            head.extend_from_slice(&crc32fast::hash(block).to_be_bytes());
        }
        data.extend_from_slice(run_data);
    }
    units.encode(&mut head);
    identifiers.encode(&mut head);
    head.extend_from_slice(&keys);

    let raw_len = u32::try_from(raw.len()).expect("a batch is far below 4 GiB");
    let mut value = Vec::with_capacity(FIXED_LEN + head.len() + data.len());
    value.push(VERSION);
    value.extend_from_slice(&count.to_be_bytes());
    value.extend_from_slice(&first_usec.to_be_bytes());
    value.extend_from_slice(&last_usec.to_be_bytes());
    value.extend_from_slice(&raw_len.to_be_bytes());
    value.extend_from_slice(&(head.len() as u32).to_be_bytes());
    value.extend_from_slice(&crc32fast::hash(&head).to_be_bytes());
    value.extend_from_slice(&head);
    value.extend_from_slice(&data);
    (count, value)
}

/// One record's keys: see the module docs.
fn record_keys(view: &RecordView<'_>, units: &mut Dict, identifiers: &mut Dict) -> [u8; 3] {
    let priority = view.get(fields::PRIORITY).and_then(priority_digit).unwrap_or(PRIORITY_NONE);
    let (mut unit, mut unit_fields, mut unit_claimed) = (None, 0u32, false);
    let (mut identifier, mut identifier_fields) = (None, 0u32);
    for (name, value) in view.raw_fields() {
        match name {
            b"_SYSTEMD_UNIT" => {
                unit_fields += 1;
                unit = Some(value);
            }
            // Whether `-u` may read it depends on other fields: the record is read.
            n if UNIT_CLAIM_FIELDS.contains(&n) => unit_claimed = true,
            b"SYSLOG_IDENTIFIER" => {
                identifier_fields += 1;
                identifier = Some(value);
            }
            _ => {}
        }
    }
    let key = |dict: &mut Dict, fields: u32, value: Option<&[u8]>| match (fields, value) {
        (0, _) => KEY_NONE,
        (1, Some(v)) => dict.key(v),
        _ => KEY_OTHER,
    };
    let unit_key = if unit_claimed { KEY_OTHER } else { key(units, unit_fields, unit) };
    [priority, unit_key, key(identifiers, identifier_fields, identifier)]
}

/// A batch's values of one key, in first-seen order.
#[derive(Default)]
struct Dict {
    values: Vec<Vec<u8>>,
}

impl Dict {
    fn key(&mut self, value: &[u8]) -> u8 {
        if let Some(i) = self.values.iter().position(|v| v == value) {
            return i as u8 + 1;
        }
        if value.len() > DICT_VALUE_MAX || self.values.len() == DICT_ENTRIES {
            return KEY_OTHER;
        }
        self.values.push(value.to_vec());
        self.values.len() as u8
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.values.len() as u8);
        for v in &self.values {
            out.push(v.len() as u8);
            out.extend_from_slice(v);
        }
    }
}

/// Where one chunk is, what it holds, and its checksum.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Its first record's number in the batch.
    pub first_record: u32,
    pub records: u32,
    pub raw_len: u32,
    /// Its bytes, as offsets into the batch value.
    pub stored: Range<u64>,
    pub crc: u32,
}

/// A version-3 batch's head, read: the chunks and every record's keys.
#[derive(Debug)]
pub struct Head<'a> {
    pub chunks: Vec<Chunk>,
    pub columns: Columns<'a>,
}

/// Every record's keys and the dictionaries they index.
#[derive(Debug)]
pub struct Columns<'a> {
    pub units: Vec<&'a [u8]>,
    pub identifiers: Vec<&'a [u8]>,
    keys: &'a [u8],
}

/// One record's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub priority: u8,
    pub unit: u8,
    pub identifier: u8,
}

impl<'a> Columns<'a> {
    pub fn len(&self) -> usize {
        self.keys.len() / KEYS_PER_RECORD
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Keys> + 'a {
        self.keys.chunks_exact(KEYS_PER_RECORD).map(|k| Keys {
            priority: k[0],
            unit: k[1],
            identifier: k[2],
        })
    }
}

/// How long the head of the batch that starts with `fixed` is, after the fixed part.
pub fn head_len(fixed: &[u8]) -> Result<usize, String> {
    let bytes = fixed.get(COMMON_HEADER_LEN..COMMON_HEADER_LEN + 4).ok_or("bad batch header")?;
    Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize)
}

impl<'a> Head<'a> {
    /// Reads the head from `prefix`, the first [`FIXED_LEN`] + [`head_len`] bytes of a
    /// batch value of `value_len` bytes, and checks that it describes that value.
    pub fn parse(prefix: &'a [u8], value_len: u64) -> Result<Head<'a>, String> {
        let head_len = head_len(prefix)?;
        let head = prefix.get(FIXED_LEN..FIXED_LEN + head_len).ok_or("the head is cut short")?;
        let sum = u32::from_be_bytes(prefix[29..33].try_into().expect("checked above"));
        if crc32fast::hash(head) != sum {
            return Err("head checksum mismatch: the stored bytes changed".into());
        }
        let count = u32::from_be_bytes(prefix[1..5].try_into().expect("checked above"));
        let raw_len = u32::from_be_bytes(prefix[21..25].try_into().expect("checked above"));
        if raw_len > MAX_RAW_LEN {
            return Err(format!("claims {raw_len} uncompressed bytes"));
        }
        let mut r = Cursor { buf: head, pos: 0 };
        let chunk_count = r.u32()? as usize;
        if chunk_count > head.len() / CHUNK_ENTRY_LEN {
            return Err(format!("the head claims {chunk_count} chunks"));
        }
        let mut chunks = Vec::with_capacity(chunk_count);
        let (mut first_record, mut stored_at, mut raw_total) =
            (0u32, (FIXED_LEN + head_len) as u64, 0u64);
        for _ in 0..chunk_count {
            let (records, chunk_raw, stored_len, crc) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            if records == 0 {
                return Err("a chunk holds no records".into());
            }
            let end = stored_at + u64::from(stored_len);
            chunks.push(Chunk {
                first_record,
                records,
                raw_len: chunk_raw,
                stored: stored_at..end,
                crc,
            });
            first_record =
                first_record.checked_add(records).ok_or("the chunks hold more than 4G records")?;
            raw_total += u64::from(chunk_raw);
            stored_at = end;
        }
        if first_record != count {
            return Err(format!("the chunks hold {first_record} records, the header says {count}"));
        }
        if raw_total != u64::from(raw_len) {
            return Err(format!("the chunks hold {raw_total} bytes, the header says {raw_len}"));
        }
        if stored_at != value_len {
            return Err(format!("the chunks end at byte {stored_at} of {value_len}"));
        }
        let units = r.dict()?;
        let identifiers = r.dict()?;
        let keys = &head[r.pos..];
        if keys.len() != count as usize * KEYS_PER_RECORD {
            return Err(format!("{} key bytes for {count} records", keys.len()));
        }
        Ok(Head { chunks, columns: Columns { units, identifiers, keys } })
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let bytes = self.buf.get(self.pos..self.pos + n).ok_or("the head is cut short")?;
        self.pos += n;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn dict(&mut self) -> Result<Vec<&'a [u8]>, String> {
        let n = self.take(1)?[0] as usize;
        if n > DICT_ENTRIES {
            return Err(format!("a dictionary of {n} values"));
        }
        (0..n)
            .map(|_| {
                let len = self.take(1)?[0] as usize;
                self.take(len)
            })
            .collect()
    }
}

/// Checks one chunk's stored bytes and inflates them into `raw`, which it replaces;
/// `dict` is chunk 0's records (ignored for chunk 0 itself).
pub fn inflate_chunk(
    chunk: &Chunk,
    stored: &[u8],
    dict: &[u8],
    raw: &mut Vec<u8>,
) -> Result<(), String> {
    if crc32fast::hash(stored) != chunk.crc {
        return Err(format!(
            "checksum mismatch in the chunk from record {}: the stored bytes changed",
            chunk.first_record
        ));
    }
    let dict = (chunk.first_record > 0).then_some(dict);
    inflate_lz4(stored, dict, chunk.raw_len, raw)
}

/// Inflates one LZ4 block, against `dict` if given, into `raw`, which it replaces; it
/// must come out `raw_len` bytes long.
pub fn inflate_lz4(
    stored: &[u8],
    dict: Option<&[u8]>,
    raw_len: u32,
    raw: &mut Vec<u8>,
) -> Result<(), String> {
    // Every byte is overwritten (the length is checked), so a reused buffer needs only
    // the right length.
    raw.resize(raw_len as usize, 0);
    let inflated = match dict {
        None => lz4_flex::block::decompress_into(stored, raw),
        Some(dict) => lz4_flex::block::decompress_into_with_dict(stored, raw, dict),
    };
    match inflated {
        Ok(n) if n == raw.len() => Ok(()),
        Ok(n) => Err(format!("lz4 gave {n} bytes, {raw_len} expected")),
        Err(e) => Err(format!("lz4: {e}")),
    }
}

/// Inflates every chunk of a version-3 batch `value`: its records back to back.
pub fn inflate_all(value: &[u8]) -> Result<Vec<u8>, String> {
    let head = Head::parse(value, value.len() as u64)?;
    let raw_len = u32::from_be_bytes(value[21..25].try_into().expect("Head::parse checked"));
    let mut out = Vec::with_capacity(raw_len as usize);
    let (mut dict, mut raw) = (Vec::new(), Vec::new());
    for chunk in &head.chunks {
        let stored = &value[chunk.stored.start as usize..chunk.stored.end as usize];
        if chunk.first_record == 0 {
            inflate_chunk(chunk, stored, &[], &mut dict)?;
            out.extend_from_slice(&dict);
        } else {
            inflate_chunk(chunk, stored, &dict, &mut raw)?;
            out.extend_from_slice(&raw);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::{Record, RecordKind};
    use qlog_rpc::Event;

    fn raw(records: &[Vec<(&str, String)>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, fields) in records.iter().enumerate() {
            let mut event = Event::new();
            for (k, v) in fields {
                event.push(*k, v.clone());
            }
            let r = Record {
                vm: "a".into(),
                stream: "s".into(),
                received_usec: 10 + i as u64,
                seq: i as u64 + 1,
                kind: RecordKind::Event,
                event,
            };
            r.encode(&mut out);
        }
        out
    }

    fn head(value: &[u8]) -> Head<'_> {
        Head::parse(&value[..FIXED_LEN + head_len(value).unwrap()], value.len() as u64).unwrap()
    }

    fn f(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn keys_answer_exactly_or_say_they_cannot() {
        let long = "u".repeat(300);
        let records = vec![
            f(&[("PRIORITY", "3"), ("_SYSTEMD_UNIT", "a.service"), ("SYSLOG_IDENTIFIER", "a")]),
            f(&[("MESSAGE", "no keyed field")]),
            f(&[("PRIORITY", "33"), ("_SYSTEMD_UNIT", "b.service"), ("SYSLOG_IDENTIFIER", "a")]),
            f(&[("PRIORITY", "6"), ("PRIORITY", "3"), ("UNIT", "a.service")]),
            f(&[("_SYSTEMD_UNIT", "a.service"), ("_SYSTEMD_UNIT", "b.service")]),
            f(&[("SYSLOG_IDENTIFIER", "a"), ("SYSLOG_IDENTIFIER", "b")]),
            f(&[("_SYSTEMD_UNIT", &long), ("SYSLOG_IDENTIFIER", "b")]),
        ];
        let (count, value) = encode(10, 16, &raw(&records));
        assert_eq!(count, 7);
        let head = head(&value);
        assert_eq!(head.columns.units, vec![&b"a.service"[..], b"b.service"]);
        assert_eq!(head.columns.identifiers, vec![&b"a"[..], b"b"]);
        let k = |priority, unit, identifier| Keys { priority, unit, identifier };
        let keys: Vec<Keys> = head.columns.iter().collect();
        assert_eq!(
            keys,
            vec![
                k(3, 1, 1),
                k(PRIORITY_NONE, KEY_NONE, KEY_NONE),
                k(PRIORITY_NONE, 2, 1),
                k(6, KEY_OTHER, KEY_NONE),
                k(PRIORITY_NONE, KEY_OTHER, KEY_NONE),
                k(PRIORITY_NONE, KEY_NONE, KEY_OTHER),
                k(PRIORITY_NONE, KEY_OTHER, 2),
            ]
        );
    }

    #[test]
    fn a_full_dictionary_turns_new_values_into_other() {
        let records: Vec<_> =
            (0..300).map(|i| vec![("_SYSTEMD_UNIT", format!("u{i}.service"))]).collect();
        let (_, value) = encode(10, 400, &raw(&records));
        let head = head(&value);
        assert_eq!(head.columns.units.len(), DICT_ENTRIES);
        let units: Vec<u8> = head.columns.iter().map(|k| k.unit).collect();
        assert_eq!(units[..254], (1..=254).collect::<Vec<u8>>()[..]);
        assert!(units[254..].iter().all(|&u| u == KEY_OTHER));
    }

    #[test]
    fn chunks_inflate_back_to_the_records_and_a_bad_head_is_refused() {
        let records: Vec<_> = (0..3000)
            .map(|i| vec![("MESSAGE", format!("message {i} {}", "x".repeat(i % 97)))])
            .collect();
        let raw = raw(&records);
        let (count, value) = encode(10, 500, &raw);
        assert_eq!(count, 3000);
        assert_eq!(inflate_all(&value).unwrap(), raw);
        let head = head(&value);
        // Enough chunks for two threads to compress them: the head and the bytes must
        // still come out in chunk order. The smaller batches of other tests stay on one.
        assert!(head.chunks.len() >= PARALLEL_CHUNKS, "{} chunks", head.chunks.len());
        assert!(head.chunks[0].raw_len as usize >= DICT_CHUNK_BYTES);
        assert!(head.chunks[1..head.chunks.len() - 1]
            .iter()
            .all(|c| c.raw_len as usize >= CHUNK_BYTES));
        let records_of = |c: &Chunk| c.records;
        assert_eq!(head.chunks.iter().map(records_of).sum::<u32>(), 3000);

        // The record count in the header is outside the head's checksum: it must agree.
        let mut wrong_count = value.clone();
        wrong_count[4] ^= 1;
        let err = inflate_all(&wrong_count).unwrap_err();
        assert!(err.contains("the header says"), "{err}");
        let err = inflate_all(&value[..value.len() - 1]).unwrap_err();
        assert!(err.contains("the chunks end at byte"), "{err}");
        let err = inflate_all(&value[..FIXED_LEN + 3]).unwrap_err();
        assert!(err.contains("cut short"), "{err}");
    }
}
