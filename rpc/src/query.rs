//! The local query plane between the `qlog` CLI and qlogd.
//!
//! The CLI sends one `Query` frame holding a JSON [`Request`]. For an events request the
//! sink answers with `Record` frames, a `Done` frame when the stored part is complete and,
//! when following, more `Record` frames (and `Lagged` frames if the follower fell behind)
//! until the CLI hangs up. Other requests get one `Reply` frame. Any failure is an
//! `Error` frame. Filters are evaluated in the sink; this module only carries them.

use serde::{Deserialize, Serialize};

use crate::event::{EventError, Reader};
use crate::limits::Limits;
use crate::Event;

/// Most VMs, field matches or values one request may name.
pub const MAX_REQUEST_ITEMS: usize = 1024;
/// Longest regular expression a request may carry.
pub const MAX_PATTERN_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Request {
    /// Stored events, optionally followed live.
    Events(EventsQuery),
    /// One row per known VM.
    Vms,
    /// Per-VM rollups over a time range, merged into buckets: one `Reply` frame holding a
    /// [`StatsReply`] per VM, then `Done`.
    Stats(StatsQuery),
    /// Each VM's hash chain over its stored batches, walked and recomputed (or, with
    /// `heads_only`, just its recorded head): one `Reply` frame holding a [`VerifyReply`].
    Verify(VerifyQuery),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsQuery {
    /// Source VMs to include; empty means every VM.
    #[serde(default)]
    pub vms: Vec<String>,
    #[serde(default)]
    pub filter: Filter,
    /// Only the last `limit` matches (journalctl's `-n`); `None` means all of them.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Newest first.
    #[serde(default)]
    pub reverse: bool,
    /// Keep the connection open and send new matches as they are committed.
    #[serde(default)]
    pub follow: bool,
}

/// Which rollups a [`Request::Stats`] wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsQuery {
    /// Source VMs to include; empty means every VM, the log qube's own name included.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Receive time range in microseconds since the epoch, `until` exclusive.
    pub since_usec: u64,
    pub until_usec: u64,
    /// Width of one bucket; minutes are merged into buckets of this many. At least 1.
    pub bucket_minutes: u32,
    /// Gauges to include; empty means all of them. Counters are always included.
    #[serde(default)]
    pub gauges: Vec<String>,
}

/// journalctl's filter semantics: every set criterion must hold (AND); within one
/// criterion any listed value may match (OR).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Inclusive range of syslog priorities (0 = emerg ... 7 = debug). An event without a
    /// valid PRIORITY does not match when a range is set.
    #[serde(default)]
    pub priority: Option<(u8, u8)>,
    /// Unit names, matched against `_SYSTEMD_UNIT`, `UNIT`, `OBJECT_SYSTEMD_UNIT` and
    /// `COREDUMP_UNIT`. A name without a `.` gets `.service`; `*` and `?` are globs.
    #[serde(default)]
    pub units: Vec<String>,
    /// `SYSLOG_IDENTIFIER` values.
    #[serde(default)]
    pub identifiers: Vec<String>,
    /// A regular expression on MESSAGE.
    #[serde(default)]
    pub grep: Option<Grep>,
    /// Receive time at or after this, microseconds since the epoch.
    #[serde(default)]
    pub since_usec: Option<u64>,
    /// Receive time at or before this, microseconds since the epoch.
    #[serde(default)]
    pub until_usec: Option<u64>,
    /// `FIELD=VALUE` matches: the same field twice is OR, different fields are AND.
    /// `_QLOG_VM` and `_QLOG_STREAM` match the trusted values.
    #[serde(default)]
    pub matches: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grep {
    pub pattern: String,
    pub case_insensitive: bool,
}

/// What kind of stored record this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    Event = 0,
    /// Missing events: the fields say why (`_QLOG_GAP`) and how many.
    Gap = 1,
    /// A message of qlogd's own about the sink or a VM.
    Notice = 2,
}

impl RecordKind {
    pub fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            0 => Some(RecordKind::Event),
            1 => Some(RecordKind::Gap),
            2 => Some(RecordKind::Notice),
            _ => None,
        }
    }
}

/// One stored event with the facts the sink vouches for kept apart from the VM's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The source VM from the qrexec descriptor.
    pub vm: String,
    pub stream: String,
    /// The sink's receive time, microseconds since the epoch.
    pub received_usec: u64,
    /// The agent's sequence number within (vm, stream).
    pub seq: u64,
    pub kind: RecordKind,
    /// The VM's own fields: its claims.
    pub event: Event,
}

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        Record::encode_header(&self.vm, &self.stream, self.received_usec, self.seq, self.kind, out);
        self.event.encode_fields(out);
    }

    /// Appends everything of a record but its field block, for callers that already hold
    /// the field block encoded (see [`crate::event::scan_event_payload`]).
    pub fn encode_header(
        vm: &str,
        stream: &str,
        received_usec: u64,
        seq: u64,
        kind: RecordKind,
        out: &mut Vec<u8>,
    ) {
        put_short_str(out, vm);
        put_short_str(out, stream);
        out.extend_from_slice(&received_usec.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.push(kind as u8);
    }

    /// Decodes every record in `buf`, which holds whole records back to back.
    pub fn decode_all(buf: &[u8], limits: &Limits) -> Result<Vec<Record>, EventError> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let (rec, used) = Record::decode(&buf[pos..], limits)?;
            out.push(rec);
            pos += used;
        }
        Ok(out)
    }

    /// Decodes a record from the front of `buf`, returning it and the bytes used.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Record, usize), EventError> {
        let mut r = Reader { buf, pos: 0 };
        let vm = get_short_str(&mut r)?;
        let stream = get_short_str(&mut r)?;
        let received_usec = r.u64()?;
        let seq = r.u64()?;
        let kind_offset = r.pos;
        let kind = RecordKind::from_u8(r.u8()?)
            .ok_or(EventError::Truncated { offset: kind_offset, needed: 0 })?;
        let (event, used) = Event::decode_fields(&buf[r.pos..], limits)?;
        Ok((Record { vm, stream, received_usec, seq, kind, event }, r.pos + used))
    }
}

/// A stored record read in place: the sink filters and forwards records without
/// allocating for any field it does not keep.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub vm: &'a str,
    pub stream: &'a str,
    pub received_usec: u64,
    pub seq: u64,
    pub kind: RecordKind,
    /// The whole record, as [`Record::encode`] wrote it.
    pub bytes: &'a [u8],
    /// The field block: count, then names and values.
    fields: &'a [u8],
    count: u32,
    /// The first `MESSAGE` value, found while parsing: every `-g` search reads it.
    message: Option<&'a [u8]>,
}

impl<'a> RecordView<'a> {
    /// Reads the record at the front of `buf`; checks the layout (not the name rules,
    /// which held when the record was stored).
    pub fn parse(buf: &'a [u8]) -> Result<RecordView<'a>, EventError> {
        let mut r = Reader { buf, pos: 0 };
        let vm = view_short_str(&mut r)?;
        let stream = view_short_str(&mut r)?;
        let received_usec = r.u64()?;
        let seq = r.u64()?;
        let kind_offset = r.pos;
        let kind = RecordKind::from_u8(r.u8()?)
            .ok_or(EventError::Truncated { offset: kind_offset, needed: 0 })?;
        let fields_start = r.pos;
        let count = r.u32()?;
        // The hot loop of every query: walk the field headers on the slice itself.
        let mut rest = &buf[r.pos..];
        let mut message = None;
        for _ in 0..count {
            let truncated =
                |rest: &[u8]| EventError::Truncated { offset: buf.len() - rest.len(), needed: 1 };
            let (&name_len, tail) = rest.split_first().ok_or_else(|| truncated(rest))?;
            let name_len = name_len as usize;
            let Some(len_bytes) = tail.get(name_len..name_len + 4) else {
                return Err(truncated(rest));
            };
            let value_len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
            let Some(next) = tail.get(name_len + 4 + value_len..) else {
                return Err(truncated(rest));
            };
            if message.is_none() && &tail[..name_len] == crate::fields::MESSAGE.as_bytes() {
                message = Some(&tail[name_len + 4..name_len + 4 + value_len]);
            }
            rest = next;
        }
        let end = buf.len() - rest.len();
        Ok(RecordView {
            vm,
            stream,
            received_usec,
            seq,
            kind,
            bytes: &buf[..end],
            fields: &buf[fields_start + 4..end],
            count,
            message,
        })
    }

    /// Every record in `buf`, which holds whole records back to back.
    pub fn parse_all(buf: &'a [u8]) -> Result<Vec<RecordView<'a>>, EventError> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let view = RecordView::parse(&buf[pos..])?;
            pos += view.bytes.len();
            out.push(view);
        }
        Ok(out)
    }

    /// The fields in order, as (name, value).
    pub fn fields(&self) -> FieldIter<'a> {
        FieldIter { raw: self.raw_fields() }
    }

    /// The fields in order with their names as bytes: what filters compare, without a
    /// UTF-8 check per name.
    pub fn raw_fields(&self) -> RawFieldIter<'a> {
        RawFieldIter { buf: self.fields, left: self.count }
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        if name == crate::fields::MESSAGE {
            return self.message;
        }
        let name = name.as_bytes();
        self.raw_fields().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The first value of `name` if it is valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Checks every field name against journald's rules, as [`Record::decode`] does:
    /// a reader that prints names (the export format writes them raw) checks them once.
    pub fn validate_names(&self, max_len: u32) -> Result<(), crate::event::FieldNameError> {
        self.raw_fields().try_for_each(|(name, _)| crate::event::validate_field_name(name, max_len))
    }

    /// The owned form, for a reader that changes records (redaction).
    pub fn to_record(&self) -> Record {
        let mut event = Event::new();
        for (name, value) in self.fields() {
            event.push(name, value);
        }
        Record {
            vm: self.vm.to_owned(),
            stream: self.stream.to_owned(),
            received_usec: self.received_usec,
            seq: self.seq,
            kind: self.kind,
            event,
        }
    }
}

/// Iterates a field block that [`RecordView::parse`] has already bounds-checked.
pub struct RawFieldIter<'a> {
    buf: &'a [u8],
    left: u32,
}

impl<'a> Iterator for RawFieldIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let name_len = self.buf[0] as usize;
        let name = &self.buf[1..1 + name_len];
        let at = 1 + name_len;
        let value_len =
            u32::from_be_bytes(self.buf[at..at + 4].try_into().expect("checked by parse")) as usize;
        let value = &self.buf[at + 4..at + 4 + value_len];
        self.buf = &self.buf[at + 4 + value_len..];
        Some((name, value))
    }
}

/// [`RawFieldIter`] with names as text; a name that is not UTF-8 (which the ingest rules
/// exclude) reads as empty.
pub struct FieldIter<'a> {
    raw: RawFieldIter<'a>,
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, value) = self.raw.next()?;
        Some((std::str::from_utf8(name).unwrap_or(""), value))
    }
}

fn view_short_str<'a>(r: &mut Reader<'a>) -> Result<&'a str, EventError> {
    let len = r.u8()? as usize;
    let offset = r.pos;
    let bytes = r.bytes(len)?;
    std::str::from_utf8(bytes).map_err(|_| EventError::Truncated { offset, needed: 0 })
}

fn put_short_str(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("VM and stream names are at most 64 bytes");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

fn get_short_str(r: &mut Reader<'_>) -> Result<String, EventError> {
    let len = r.u8()? as usize;
    let offset = r.pos;
    let bytes = r.bytes(len)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| EventError::Truncated { offset, needed: 0 })
}

/// Sent when the stored part of an events query is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub matched: u64,
}

/// Sent to a follower that fell behind: `missed` committed events (before filtering) were
/// skipped so that it would not slow ingest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    pub missed: u64,
}

/// One VM's part of the reply to [`Request::Stats`]: buckets with data, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    pub vm: String,
    /// (bucket start in microseconds since the epoch, what the bucket holds).
    pub buckets: Vec<(u64, crate::telemetry::Rollup)>,
}

/// The reply to [`Request::Vms`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmsReply {
    pub vms: Vec<VmInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub vm: String,
    pub first_seen_usec: u64,
    pub last_seen_usec: u64,
    pub events_stored: u64,
    pub bytes_stored: u64,
    pub quota_bytes: u64,
    /// Events removed because the VM was over its quota.
    pub events_dropped_quota: u64,
    /// Events removed by age-based retention.
    pub events_expired: u64,
    /// Frames or connections rejected as malformed.
    pub frames_rejected: u64,
    /// Fields renamed because they used the sink-only prefix.
    pub fields_quarantined: u64,
    /// Events (and agent gap reports) refused because the VM sent faster than its rate
    /// limit: never stored, acknowledged, and recorded as `rate` gap records.
    #[serde(default)]
    pub events_refused_rate: u64,
    pub streams: Vec<StreamInfo>,
    /// True if and only if at least one ingest connection from this VM is open now.
    pub connected: bool,
    /// True if and only if the sink's configuration lists this VM as one that should send.
    #[serde(default)]
    pub expected: bool,
    /// How the sink judges this VM right now.
    #[serde(default)]
    pub health: Health,
}

/// A VM's health, most severe condition first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    /// Expected, but no connection or event from it ever arrived.
    NeverSeen,
    /// Heard from before, but nothing (not even a heartbeat) for three promised intervals.
    Silent,
    /// Over its rate limit, or far above its own recent rate.
    Flooding,
    /// Its agent reports events waiting long for acknowledgement.
    Lagging,
    /// Gap records in the last hour: events were lost before they reached the store.
    Gaps,
    Ok,
    /// Not judged yet (the first second after a start), or a state from a newer sink.
    #[default]
    #[serde(other)]
    Unknown,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::NeverSeen => "never-seen",
            HealthState::Silent => "silent",
            HealthState::Flooding => "flooding",
            HealthState::Lagging => "lagging",
            HealthState::Gaps => "gaps",
            HealthState::Ok => "ok",
            HealthState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// One sentence per condition found, most severe first; empty when ok.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// When anything (event, heartbeat, telemetry, handshake) last arrived from the VM.
    #[serde(default)]
    pub last_heard_usec: u64,
    /// The heartbeat interval the VM's agent promised (the sink's default if none).
    #[serde(default)]
    pub heartbeat_interval_secs: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub name: String,
    pub last_seq: u64,
    pub connected: bool,
}

/// Which chains a [`Request::Verify`] checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyQuery {
    /// Source VMs to check; empty means every VM with a chain or stored batches.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Only report each chain's recorded head and anchor, without reading any batch.
    #[serde(default)]
    pub heads_only: bool,
    /// Links recorded earlier (a saved `qlog verify`) the chains must still pass through:
    /// an unkeyed chain rewritten from some batch on verifies clean, but not against a
    /// link it had before.
    #[serde(default)]
    pub expect: Vec<ExpectedLink>,
}

/// A link a VM's chain had at a position, recorded earlier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedLink {
    pub vm: String,
    pub position: u64,
    /// 64 hex digits.
    pub link: String,
}

/// The reply to [`Request::Verify`]: one entry per VM, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReply {
    pub vms: Vec<VmChain>,
}

/// One VM's hash chain as the sink found it. Hashes are 64 lower-case hex digits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmChain {
    pub vm: String,
    /// True if and only if the stored batches were walked (not `heads_only`).
    pub walked: bool,
    /// Stored batches whose content hash and link were recomputed and matched.
    pub batches_checked: u64,
    /// Stored batches written before the store had a chain; they are not checked.
    pub unchained: u64,
    /// Chain position of the oldest batch still stored: how many chained batches quota
    /// and retention removed.
    pub trimmed: u64,
    /// Chain position the next batch will get: how many chained batches were ever stored.
    pub length: u64,
    /// Link of the newest batch (the anchor if none is stored).
    pub head: String,
    /// Link of the newest removed batch, where verification starts; zeros if none.
    pub anchor: String,
    /// How many breaks the walk found (it resumes after each one).
    pub broken_links: u64,
    /// Expected links (see [`VerifyQuery::expect`]) found in the chain as recorded.
    #[serde(default)]
    pub expected_matched: u64,
    /// Expected links that could not be checked: trimmed since, or in a broken stretch.
    #[serde(default)]
    pub expected_unchecked: u64,
    /// The first break, oldest first; `None` if the chain is intact (or not walked).
    pub first_break: Option<ChainBreak>,
}

/// Where and how a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainBreak {
    pub kind: BreakKind,
    /// The batch at which the break shows, if there is one (not for a wrong head).
    pub batch_id: Option<u64>,
    /// The chain position verification expected there.
    pub position: u64,
    /// What differs, with the hashes or positions involved.
    pub detail: String,
}

/// What a chain break is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakKind {
    /// The batch's stored bytes do not hash to the content hash in its index entry.
    ContentMismatch,
    /// The link recomputed from the previous link and the entry differs from the
    /// recorded one: the entry's metadata, or its predecessor, was changed.
    LinkMismatch,
    /// The entry's chain position is past the expected one: batches before it are gone.
    MissingBatch,
    /// The entry's chain position is before the expected one: batches were reordered or
    /// one was copied.
    OutOfOrder,
    /// The segment file holding the batch is gone or shorter than the index says.
    MissingBytes,
    /// An index entry without a link where the chain had already started.
    UnlinkedEntry,
    /// An index entry that does not decode.
    CorruptEntry,
    /// A batch past the recorded head: added behind the sink's back.
    BeyondHead,
    /// The walk ended elsewhere than the recorded head: the newest batches are gone, or
    /// the head was changed.
    HeadMismatch,
    /// Chained batches, but no chain state for the VM.
    MissingChainState,
    /// The chain no longer has a link recorded earlier at its position: it was
    /// rewritten from there on (or its newest batches removed and the head rolled back).
    ExpectedLinkMismatch,
    /// A kind from a newer sink.
    #[serde(other)]
    Unknown,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakKind::ContentMismatch => "content-mismatch",
            BreakKind::LinkMismatch => "link-mismatch",
            BreakKind::MissingBatch => "missing-batch",
            BreakKind::OutOfOrder => "out-of-order",
            BreakKind::MissingBytes => "missing-bytes",
            BreakKind::UnlinkedEntry => "unlinked-entry",
            BreakKind::CorruptEntry => "corrupt-entry",
            BreakKind::BeyondHead => "beyond-head",
            BreakKind::HeadMismatch => "head-mismatch",
            BreakKind::MissingChainState => "missing-chain-state",
            BreakKind::ExpectedLinkMismatch => "expected-link-mismatch",
            BreakKind::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let mut event = Event::new();
        event.push("MESSAGE", vec![0xff, 0, 1]);
        let rec = Record {
            vm: "sd-app".into(),
            stream: "journal".into(),
            received_usec: 1_700_000_000_000_000,
            seq: 9,
            kind: RecordKind::Gap,
            event,
        };
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        let (back, used) = Record::decode(&buf, &Limits::DEFAULT).unwrap();
        assert_eq!((back, used), (rec, buf.len()));
    }

    #[test]
    fn views_read_what_records_wrote() {
        let mut event = Event::new();
        event.push("MESSAGE", "hi");
        event.push("BIN", vec![0u8, 255]);
        let rec = Record {
            vm: "a".into(),
            stream: "s".into(),
            received_usec: 5,
            seq: 2,
            kind: RecordKind::Event,
            event,
        };
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        rec.encode(&mut buf);
        let views = RecordView::parse_all(&buf).unwrap();
        assert_eq!(views.len(), 2);
        let v = views[1];
        assert_eq!((v.vm, v.stream, v.received_usec, v.seq), ("a", "s", 5, 2));
        assert_eq!(v.get("BIN"), Some(&[0u8, 255][..]));
        assert_eq!(v.fields().count(), 2);
        assert_eq!(Record::decode(v.bytes, &Limits::DEFAULT).unwrap().0, rec);
        assert!(RecordView::parse(&buf[..buf.len() / 2 - 1]).is_err());
    }

    #[test]
    fn request_json_is_tagged_and_defaults_missing_fields() {
        let req: Request = serde_json::from_str(r#"{"kind":"events","vms":["a"]}"#).unwrap();
        let Request::Events(q) = req else { panic!("expected an events request") };
        assert_eq!(q.vms, ["a"]);
        assert!(!q.follow && q.limit.is_none());
        let req: Request = serde_json::from_str(r#"{"kind":"vms"}"#).unwrap();
        assert_eq!(req, Request::Vms);
    }
}
