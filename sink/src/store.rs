//! The durable store: the only module that touches sled or the segment files.
//!
//! Batches of records live in append-only segment files, one series per VM
//! (`segments/<vm>/<first batch id>.seg`), so that removing a VM's oldest events is
//! deleting its oldest files and never touches another VM's bytes. sled holds the index
//! and the accounting, all in one tree so that one commit is one atomic `apply_batch`:
//!
//! | key | value |
//! |---|---|
//! | `E` vm `\0` first_usec(u64 BE) batch_id(u64 BE) | where the batch is and its chain link: [`BatchInfo`], 113 bytes (40 if written before the chain) |
//! | `S` vm `\0` stream | [`StreamState`] as JSON |
//! | `V` vm | [`VmState`] as JSON |
//! | `C` vm | the VM's hash chain: [`ChainState`], 81 bytes |
//! | `M` name | store metadata |
//! | `R` vm `\0` minute(u64 BE) | that VM's telemetry rollup for the minute, as JSON (written by `rollup.rs`) |
//!
//! Index keys sort by (VM, receive time, batch id), so one VM's time range is one range
//! scan and its oldest events are at the front of its range. The committer stamps
//! receive times so a VM's batches never overlap in time.
//!
//! A batch is a 25-byte header (version, record count, first and last receive time,
//! uncompressed length), then, in version 3, a head of chunk locations and per-record
//! keys and the LZ4 chunks of [`Record`]s in their wire encoding ([`crate::batch`] has
//! the layout). Keeping large values out of sled matters: sled rewrites whole pages, and
//! with batch-sized values inline it wrote several times the data it stored.
//!
//! LZ4 rather than zstd because every scan of the store (a `-g` search, a full dump)
//! inflates every batch it reads: LZ4 inflates log text about three times as fast, and
//! that is most of a scan's time. It stores some twice the bytes zstd would, still a
//! fraction of what a journal file takes. Batches written by earlier versions are read
//! as before: version 1 is one checksummed zstd frame after the header, version 2 one
//! LZ4 block behind its CRC-32; they have no keys, so every record of theirs is read.
//!
//! Durability order: segment bytes are written and `fdatasync`ed before the index that
//! points at them is applied and flushed. A crash in between leaves unindexed bytes at
//! the end of a segment, which [`StoreWriter::open`] cuts off; a crash after an index
//! deletion leaves unreferenced segment files, which it removes. Neither was ever
//! acknowledged; what open repaired is reported ([`RepairReport`]), and indexed bytes
//! found missing are reported apart, as acknowledged data lost. A commit that would
//! leave less than [`DISK_RESERVE_BYTES`] free is refused before anything is written,
//! so a full disk stops segment appends and never reaches sled.
//!
//! # The hash chain
//!
//! Every batch a VM stores extends that VM's chain ([`crate::chain`] computes and walks
//! it): its link is `SHA-256("qlog-chain-v1\0" || previous link || vm_len(u32) || vm ||
//! batch_id || position || first_usec || last_usec || count(u32) || len(u32) ||
//! SHA-256(stored bytes))`, integers big-endian (u64 unless marked), where `position`
//! numbers the VM's chained batches from 0 and the first previous link is 32 zero bytes.
//! A chained index entry is the 40 bytes of location and counts, then version 1 (one
//! byte), the position (u64), the content hash and the link. The VM's [`ChainState`]
//! (`C` vm: version 1, head, anchor, trimmed, end) is written in the same `apply_batch`
//! as the batches and deletions that change it, so a crash never leaves the two apart,
//! and crash repair only cuts bytes no entry covers.
//!
//! Trimming (quota, retention) removes a VM's oldest batches; the link of the newest
//! removed one becomes the VM's *anchor*, and `trimmed`, the position of the oldest batch
//! still stored, moves past it. Verification starts at the anchor and position
//! `trimmed`, recomputes every stored batch's content hash and link in key order, and
//! must end at the head at position `end - 1`: a batch changed, removed, reordered or
//! added anywhere after the anchor, or the newest ones removed, breaks a hash, a
//! position or the head. Deletions must be a VM's oldest batches, as trims are.
//!
//! The chain is unkeyed: it shows changes by anyone who did not also recompute the links
//! after the change and rewrite `C` vm. Against root in the log qube who does, it is as
//! good as a head recorded elsewhere (a saved `qlog verify`, a bundle's manifest) and
//! compared later. FIXME(unkeyed chain): a key kept outside the log qube, or heads sent
//! out periodically, would close that; it needs somewhere to keep them.
//!
//! Stores made before the chain keep working. The first writer to open one records
//! `Mchain_since`, the first batch id it will write; older 40-byte entries are reported
//! as unchained and not checked, and a 40-byte entry at or past `chain_since` (or after
//! a chained one) is a break. The upgrade is one-way: a qlogd from before the chain
//! rejects 113-byte entries as corrupt.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use qlog_rpc::query::Record;
use qlog_rpc::query::VmChain;
use qlog_rpc::Limits;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::batch::{self, Columns};
use crate::chain::{self, ChainLink, ChainState, CHAIN_STATE_LEN};

/// Batches written before version 2 hold one checksummed zstd frame; they stay readable.
const BATCH_VERSION_ZSTD: u8 = 1;
/// One LZ4 block behind a CRC-32 of it; still readable.
const BATCH_VERSION_LZ4: u8 = 2;
/// Chunks and record keys ([`crate::batch`]): what every batch is written as now.
const BATCH_VERSION: u8 = batch::VERSION;
const BATCH_HEADER_LEN: usize = batch::COMMON_HEADER_LEN;
/// Version 2 adds the block's CRC-32 after the common header.
const BATCH_V2_HEADER_LEN: usize = BATCH_HEADER_LEN + 4;
/// The first read of a batch: enough for the head and chunk 0 of a typical one.
const BATCH_PROBE_BYTES: usize = 16 * 1024;
/// A run of wanted chunks is read in preads of at most this much, so a `tail -n` that
/// stops after a few chunks has not read the whole batch.
const BATCH_READ_BYTES: u64 = 64 * 1024;
const INDEX_VALUE_LEN: usize = 40;
/// Index entries with a chain link: the 40 bytes, version, position, content hash, link.
const INDEX_VALUE_CHAINED_LEN: usize = INDEX_VALUE_LEN + 1 + 8 + 32 + 32;
const INDEX_CHAIN_VERSION: u8 = 1;
/// The first batch id written with a chain link (see the module docs).
const CHAIN_SINCE_KEY: &[u8] = b"Mchain_since";
/// Largest uncompressed batch we agree to inflate, so a corrupted header cannot make a
/// query allocate without bound.
const MAX_BATCH_RAW_LEN: u32 = batch::MAX_RAW_LEN;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store at {path} is in use by another qlogd (pid {pid}); stop it or pick another --state-dir")]
    Locked { path: PathBuf, pid: String },
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("sled error in {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("cannot write segment {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read segment {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("stored batch {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("no room for a commit in {path}: {free} bytes free, {needed} needed (room kept for the index included); free space or lower the quotas")]
    DiskFull { path: PathBuf, free: u64, needed: u64 },
}

impl StoreError {
    /// True if and only if the store cannot be written again without reopening: sled
    /// keeps failing every operation after one failed write (a full disk, say).
    pub fn needs_reopen(&self) -> bool {
        matches!(self, StoreError::Sled { .. })
    }
}

/// Free space a commit that adds batches leaves untouched, for sled's log and its
/// own rewrites. sled records an IO error during a flush as a global error and fails
/// every later operation with it, so a full disk must stop us before sled meets it:
/// commits that add data are refused while less than this would remain.
pub const DISK_RESERVE_BYTES: u64 = 4 * 1024 * 1024;

/// The file in the state dir that holds [`RESERVE_FILE_BYTES`] for opening the store on
/// a disk that something else filled: sled writes as it opens.
pub const RESERVE_FILE: &str = "reserve";
pub const RESERVE_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Free space a commit that only changes the index (accounting, deletions by quota or
/// retention) needs: sled's own writes are small, but must never meet a full disk.
pub const INDEX_ONLY_FREE_BYTES: u64 = 1024 * 1024;

/// What [`StoreWriter::open`] had to repair. A `kill -9` or power loss between a
/// segment write and its index flush leaves unindexed bytes and unreferenced files:
/// those were never acknowledged, and cutting them is routine. Indexed bytes that are
/// missing are acknowledged data lost, which only damage to the disk explains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Segments cut back to their last indexed byte, and the bytes cut.
    pub cut_segments: u64,
    pub cut_bytes: u64,
    /// Segment files no index entry refers to (a crash before the first index entry of a
    /// new segment, or before trimmed segments were deleted), removed.
    pub removed_segments: u64,
    /// Segments shorter than their index says (or gone), and the indexed bytes missing.
    pub missing_segments: u64,
    pub missing_bytes: u64,
}

impl RepairReport {
    /// True if and only if no indexed (possibly acknowledged) byte was found missing.
    pub fn acked_data_intact(&self) -> bool {
        self.missing_segments == 0 && self.missing_bytes == 0
    }
}

/// What the sink remembers about one (VM, stream) between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// Highest sequence number stored: the resume point.
    pub last_seq: u64,
    /// `__CURSOR` of the latest event stored, if it had one.
    pub cursor: Option<String>,
    pub first_seen_usec: u64,
    pub last_seen_usec: u64,
}

/// Per-VM accounting, kept in step with the batches in the same atomic commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub first_seen_usec: u64,
    pub last_seen_usec: u64,
    pub events_stored: u64,
    /// Bytes of this VM's stored batches: what its quota counts.
    pub bytes_stored: u64,
    pub events_dropped_quota: u64,
    pub events_expired: u64,
    pub frames_rejected: u64,
    pub fields_quarantined: u64,
    /// Events and gap reports refused because the VM was over its rate limit (never
    /// stored; each refusal is also a `rate` gap record). Absent in stores written
    /// before rate limits existed.
    #[serde(default)]
    pub events_refused_rate: u64,
}

/// One stored batch as the index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub key: Vec<u8>,
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub count: u32,
    pub first_usec: u64,
    pub last_usec: u64,
    /// The batch's place in its VM's hash chain; `None` for a batch stored before the
    /// store had a chain.
    pub chain: Option<ChainLink>,
}

impl BatchInfo {
    /// Bytes this batch counts against its VM's quota.
    pub fn stored_len(&self) -> u64 {
        u64::from(self.len)
    }

    pub fn batch_id(&self) -> u64 {
        let at = self.key.len() - 8;
        u64::from_be_bytes(self.key[at..].try_into().expect("index keys end in the batch id"))
    }
}

/// A batch ready to be written.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub vm: String,
    pub batch_id: u64,
    pub count: u32,
    pub first_usec: u64,
    pub last_usec: u64,
    pub value: Vec<u8>,
}

/// Everything one commit cycle writes, applied atomically.
#[derive(Debug, Clone, Default)]
pub struct CommitSet {
    pub batches: Vec<NewBatch>,
    pub streams: Vec<((String, String), StreamState)>,
    pub vms: Vec<(String, VmState)>,
    /// Index keys of batches to remove.
    pub deletes: Vec<Vec<u8>>,
    pub next_batch_id: u64,
    /// Other keys written in the same atomic apply (telemetry rollups), and keys of that
    /// kind to remove; see [`Store::get_aux`].
    pub aux: Vec<(Vec<u8>, Vec<u8>)>,
    pub aux_deletes: Vec<Vec<u8>>,
}

/// Read access to the store, shared by the committer and every query.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    segments: PathBuf,
    _lock: std::sync::Arc<LockFile>,
}

/// Holds `qlogd.lock` under an exclusive `flock` for as long as the store is open.
struct LockFile {
    _file: File,
}

impl Store {
    /// Opens (or creates) the store under `state_dir`, failing at once if another process
    /// holds it.
    pub fn open(state_dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: state_dir.to_owned(), source };
        std::fs::create_dir_all(state_dir).map_err(open_err)?;
        let lock = LockFile::acquire(&state_dir.join("qlogd.lock"))?;
        let segments = state_dir.join("segments");
        std::fs::create_dir_all(&segments).map_err(open_err)?;
        let path = state_dir.join("index");
        let open_index = || {
            sled::Config::new()
                .path(&path)
                .cache_capacity(cache_bytes)
                // We flush ourselves after every commit cycle, before acking; a background
                // flush would only add writes.
                .flush_every_ms(None)
                .open()
        };
        // sled writes as it opens, so on a full disk it cannot: the reserve file kept for
        // this moment makes the room, and qlogd starts and answers queries.
        let reserve = state_dir.join(RESERVE_FILE);
        let db = match open_index() {
            Ok(db) => db,
            Err(_) if std::fs::remove_file(&reserve).is_ok() => {
                crate::log_events::reserve_released(&reserve);
                open_index().map_err(|source| StoreError::Sled { path: path.clone(), source })?
            }
            Err(source) => return Err(StoreError::Sled { path, source }),
        };
        keep_reserve(&reserve);
        Ok(Store { db, path, segments, _lock: std::sync::Arc::new(lock) })
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled { path: self.path.clone(), source }
    }

    /// The value under a key that is not part of the batch index (a rollup), if any.
    pub fn get_aux(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(|e| self.sled_err(e))?.map(|v| v.to_vec()))
    }

    /// Keys and values in `[from, to)` of such a keyspace, in key order.
    pub fn range_aux(
        &self,
        from: &[u8],
        to: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        self.db
            .range(from.to_vec()..to.to_vec())
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.sled_err(e)))
    }

    pub fn next_batch_id(&self) -> Result<u64, StoreError> {
        let v = self.db.get(b"Mnext_batch_id").map_err(|e| self.sled_err(e))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(1, u64::from_be_bytes))
    }

    /// The first batch id written with a chain link: batches before it are unchained.
    /// For a store no chained writer has opened yet, every stored batch is before it.
    pub fn chain_since(&self) -> Result<u64, StoreError> {
        match self.db.get(CHAIN_SINCE_KEY).map_err(|e| self.sled_err(e))? {
            Some(v) => Ok(<[u8; 8]>::try_from(v.as_ref()).map_or(1, u64::from_be_bytes)),
            None => self.next_batch_id(),
        }
    }

    /// `vm`'s chain state; `None` if it has none, or it does not decode.
    pub fn chain_state(&self, vm: &str) -> Result<Option<ChainState>, StoreError> {
        let v = self.db.get(chain_key(vm)).map_err(|e| self.sled_err(e))?;
        Ok(v.and_then(|v| ChainState::decode(&v)))
    }

    /// Every VM with a chain state or a stored batch, sorted.
    pub fn chain_vms(&self) -> Result<Vec<String>, StoreError> {
        let mut vms = Vec::new();
        for item in self.db.scan_prefix(b"C") {
            let (k, _) = item.map_err(|e| self.sled_err(e))?;
            if let Ok(vm) = String::from_utf8(k[1..].to_vec()) {
                vms.push(vm);
            }
        }
        // One seek per VM: after a VM's first key, jump past all of its keys.
        let mut from = b"E".to_vec();
        while let Some(item) = self.db.range(from.clone()..).next() {
            let (k, _) = item.map_err(|e| self.sled_err(e))?;
            if !k.starts_with(b"E") {
                break;
            }
            match split_batch_key_vm(&k) {
                Some(vm) => {
                    from = batch_prefix(&vm);
                    *from.last_mut().expect("prefixes end in NUL") = 1;
                    vms.push(vm);
                }
                None => {
                    from = k.to_vec();
                    from.push(0xff);
                }
            }
        }
        vms.sort();
        vms.dedup();
        Ok(vms)
    }

    /// `vm`'s index entries after `after` (from the first if `None`), oldest first, each
    /// with its key and decoded or not: a chain walk reports entries that do not decode
    /// and goes on.
    #[allow(clippy::type_complexity)]
    pub fn index_after(
        &self,
        vm: &str,
        after: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Result<BatchInfo, StoreError>), StoreError>> + '_
    {
        use std::ops::Bound;
        let prefix = batch_prefix(vm);
        let start = match after {
            Some(key) => Bound::Excluded(key.to_vec()),
            None => Bound::Included(prefix.clone()),
        };
        let mut end = prefix;
        *end.last_mut().expect("prefixes end in NUL") = 1;
        self.db.range::<Vec<u8>, _>((start, Bound::Excluded(end))).map(move |item| {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            Ok((k.to_vec(), decode_index(&k, &v)))
        })
    }

    /// Walks `vm`'s chain and recomputes every link (see [`chain::verify`]).
    pub fn verify_chain(&self, vm: &str) -> Result<VmChain, StoreError> {
        chain::verify(self, vm, &[])
    }

    /// `vm`'s recorded chain head and anchor, reading no batch.
    pub fn chain_head(&self, vm: &str) -> Result<VmChain, StoreError> {
        chain::head(self, vm)
    }

    /// One batch's stored bytes, as they were hashed. Unlike a query's read, the length
    /// is checked against the file first, so a damaged entry cannot make it allocate.
    pub fn read_stored(&self, vm: &str, info: &BatchInfo) -> Result<Vec<u8>, StoreError> {
        let path = self.segment_path(vm, info.segment);
        let read_err = |source| StoreError::Read { path: path.clone(), source };
        let file = File::open(&path).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        if info.offset.saturating_add(u64::from(info.len)) > len {
            let short = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file holds only {len} bytes"),
            );
            return Err(read_err(short));
        }
        let mut value = vec![0u8; info.len as usize];
        file.read_exact_at(&mut value, info.offset).map_err(read_err)?;
        Ok(value)
    }

    pub fn load_streams(&self) -> Result<HashMap<(String, String), StreamState>, StoreError> {
        let mut out = HashMap::new();
        for item in self.db.scan_prefix(b"S") {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let Some((vm, stream)) = split_name_key(&k[1..]) else { continue };
            if let Ok(state) = serde_json::from_slice(&v) {
                out.insert((vm, stream), state);
            }
        }
        Ok(out)
    }

    pub fn load_vms(&self) -> Result<HashMap<String, VmState>, StoreError> {
        let mut out = HashMap::new();
        for item in self.db.scan_prefix(b"V") {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let Ok(vm) = String::from_utf8(k[1..].to_vec()) else { continue };
            if let Ok(state) = serde_json::from_slice(&v) {
                out.insert(vm, state);
            }
        }
        Ok(out)
    }

    /// Encodes records (in receive-time order) as one batch.
    pub fn encode_batch(vm: &str, batch_id: u64, records: &[Record]) -> NewBatch {
        let mut raw = Vec::with_capacity(records.len() * 512);
        for r in records {
            r.encode(&mut raw);
        }
        Store::encode_raw_batch(
            vm,
            batch_id,
            records.len(),
            records.first().map_or(0, |r| r.received_usec),
            records.last().map_or(0, |r| r.received_usec),
            &raw,
        )
    }

    /// Encodes already-encoded records as one batch.
    pub fn encode_raw_batch(
        vm: &str,
        batch_id: u64,
        count: usize,
        first_usec: u64,
        last_usec: u64,
        raw: &[u8],
    ) -> NewBatch {
        let (found, value) = batch::encode(first_usec, last_usec, raw);
        debug_assert_eq!(found as usize, count, "the caller counted the records it encoded");
        NewBatch { vm: vm.to_owned(), batch_id, count: found, first_usec, last_usec, value }
    }

    /// Iterates one VM's batches from oldest to newest.
    pub fn batches(&self, vm: &str) -> impl Iterator<Item = Result<BatchInfo, StoreError>> + '_ {
        self.db.scan_prefix(batch_prefix(vm)).map(move |item| {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            decode_index(&k, &v)
        })
    }

    /// Iterates one VM's batches that may hold records in `[since, until]`. Forward is
    /// oldest first; `reverse` is newest first.
    pub fn scan(
        &self,
        vm: &str,
        since: Option<u64>,
        until: Option<u64>,
        reverse: bool,
    ) -> Box<dyn Iterator<Item = Result<BatchInfo, StoreError>> + Send + '_> {
        let prefix = batch_prefix(vm);
        let start = match since {
            // A batch that starts before `since` may still end after it: begin at the last
            // batch that starts at or before `since`, and at the first of the batches that
            // start at that same time (one commit's batches of a VM can share it).
            Some(since) => {
                let probe = batch_key(vm, since, u64::MAX);
                match self.db.range(prefix.clone()..=probe).next_back() {
                    Some(Ok((k, _))) if k.len() >= prefix.len() + 8 => {
                        let mut start = k[..prefix.len() + 8].to_vec();
                        start.extend_from_slice(&0u64.to_be_bytes());
                        start
                    }
                    _ => prefix.clone(),
                }
            }
            None => prefix.clone(),
        };
        let mut end = prefix.clone();
        match until {
            Some(until) => end.extend_from_slice(&until.saturating_add(1).to_be_bytes()),
            None => end.push(0xff),
        }
        let range = self.db.range(start..end);
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send> =
            if reverse { Box::new(range.rev()) } else { Box::new(range) };
        Box::new(iter.filter_map(move |item| {
            let info = match item {
                Ok((k, v)) => decode_index(&k, &v),
                Err(e) => return Some(Err(self.sled_err(e))),
            };
            match info {
                Ok(info) if since.is_some_and(|s| info.last_usec < s) => None,
                Ok(info) if until.is_some_and(|u| info.first_usec > u) => None,
                other => Some(other),
            }
        }))
    }

    fn segment_path(&self, vm: &str, segment: u64) -> PathBuf {
        self.segments.join(vm).join(format!("{segment:016x}.seg"))
    }

    /// Reads and decodes one batch.
    pub fn read_batch(&self, vm: &str, info: &BatchInfo) -> Result<Vec<Record>, StoreError> {
        decode_batch(&info.key, &self.read_value(vm, info)?)
    }

    /// Reads a batch and hands `visit` each record that may be [`Wanted`], in stored
    /// order or, with `reverse`, newest first, until it says to stop. Only the chunks
    /// that hold records wanted by their keys are read and inflated, and only the
    /// chunks whose records may be wanted by their bytes are parsed; batches from before
    /// the keys are one chunk.
    ///
    /// `Ok(false)` if the batch has been trimmed since it was listed. A record that does
    /// not parse, a checksum mismatch, or a count other than the index's is corruption.
    ///
    /// `files` keeps the last segment file open for the next call: a reader of
    /// consecutive batches opens each segment once.
    pub fn for_each_record(
        &self,
        files: &mut SegmentFiles,
        vm: &str,
        info: &BatchInfo,
        reverse: bool,
        wanted: &impl Wanted,
        mut visit: impl FnMut(qlog_rpc::query::RecordView<'_>) -> ControlFlow<()>,
    ) -> Result<bool, StoreError> {
        let path = self.segment_path(vm, info.segment);
        let read_err = |source| StoreError::Read { path: path.clone(), source };
        let file = match &files.last {
            Some((open_vm, segment, file)) if open_vm == vm && *segment == info.segment => file,
            _ => {
                files.last = None;
                match File::open(&path) {
                    Ok(file) => &files.last.insert((vm.to_owned(), info.segment, file)).2,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(read_err(e)),
                }
            }
        };
        let corrupt = |reason: String| StoreError::Corrupt { key: hex(&info.key), reason };
        let len = u64::from(info.len);
        SCRATCH.with_borrow_mut(|scratch| {
            let result = (|| {
                let Scratch { probe, run, dict, raw } = scratch;
                read_into(file, info.offset, len.min(BATCH_PROBE_BYTES as u64), probe)
                    .map_err(read_err)?;
                if probe.first() != Some(&BATCH_VERSION) {
                    // An older batch: one block, no keys.
                    read_rest(file, info.offset, len, probe).map_err(read_err)?;
                    inflate_into(&info.key, probe, raw)?;
                    if wanted.chunk(raw) {
                        // Whether `visit` stopped early or not, the batch is done.
                        let whole = (0, info.count);
                        let _ =
                            visit_chunk(whole, raw, None, reverse, &mut visit).map_err(corrupt)?;
                    }
                    return Ok(());
                }
                let need = batch::FIXED_LEN + batch::head_len(probe).map_err(corrupt)?;
                if need as u64 > len {
                    return Err(corrupt(format!("a head of {need} bytes in a batch of {len}")));
                }
                read_rest(file, info.offset, need as u64, probe).map_err(read_err)?;
                let head = batch::Head::parse(&probe[..need], len).map_err(corrupt)?;
                if head.columns.len() != info.count as usize {
                    return Err(corrupt(format!(
                        "index says {} records, the head {}",
                        info.count,
                        head.columns.len()
                    )));
                }
                let records = wanted.records(&head.columns);
                let records = records.as_deref();
                let chunk_wanted: Vec<bool> = head
                    .chunks
                    .iter()
                    .map(|c| {
                        let range = c.first_record as usize..(c.first_record + c.records) as usize;
                        records.is_none_or(|w| w.get(range).is_some_and(|w| w.contains(&true)))
                    })
                    .collect();
                if !chunk_wanted.contains(&true) {
                    return Ok(());
                }
                let chunks = &head.chunks;
                // `run` may hold another batch's bytes from this thread's last read.
                run.clear();
                let mut held = Held { file, offset: info.offset, probe, run, run_at: 0 };
                // Chunk 0 holds the dictionary of the others.
                let first = &chunks[0];
                let bytes = held.get(&first.stored, || first.stored.clone()).map_err(read_err)?;
                batch::inflate_chunk(first, bytes, &[], dict).map_err(corrupt)?;
                let order: Box<dyn Iterator<Item = usize>> = if reverse {
                    Box::new((0..chunks.len()).rev())
                } else {
                    Box::new(0..chunks.len())
                };
                for i in order.filter(|&i| chunk_wanted[i]) {
                    let c = &chunks[i];
                    let records_of_c: &[u8] = if i == 0 {
                        dict
                    } else {
                        let ahead = || read_ahead(chunks, &chunk_wanted, i, reverse);
                        let bytes = held.get(&c.stored, ahead).map_err(read_err)?;
                        batch::inflate_chunk(c, bytes, dict, raw).map_err(corrupt)?;
                        raw
                    };
                    if !wanted.chunk(records_of_c) {
                        continue;
                    }
                    let span = (c.first_record, c.records);
                    let flow = visit_chunk(span, records_of_c, records, reverse, &mut visit);
                    if flow.map_err(corrupt)?.is_break() {
                        break;
                    }
                }
                Ok(())
            })();
            scratch.shrink();
            result.map(|()| true)
        })
    }

    fn read_value(&self, vm: &str, info: &BatchInfo) -> Result<Vec<u8>, StoreError> {
        let path = self.segment_path(vm, info.segment);
        let read_err = |source| StoreError::Read { path: path.clone(), source };
        let file = File::open(&path).map_err(read_err)?;
        let mut value = vec![0u8; info.len as usize];
        file.read_exact_at(&mut value, info.offset).map_err(read_err)?;
        Ok(value)
    }

    /// Size of the filesystem the store is on, if it can be told.
    pub fn filesystem_bytes(&self) -> Option<u64> {
        let path = CString::new(self.segments.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs is plain data, and zeroed is a valid value for it.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: the path is a valid C string and `stat` is valid for writes.
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return None;
        }
        #[allow(clippy::useless_conversion)]
        Some(u64::from(stat.f_blocks).saturating_mul(u64::from(stat.f_frsize)))
    }

    /// Bytes the store takes on disk: index and segments.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + dir_size(&self.segments)
    }
}

/// Free bytes for us on the filesystem holding `path`, if it can be told.
fn free_bytes(path: &Path) -> Option<u64> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, and zeroed is a valid value for it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and `stat` is valid for writes.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // The field types differ between targets; on some they are already u64.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// Creates the reserve file if it is missing and the disk has room for it to spare;
/// best effort, since a store without one only loses the full-disk start.
/// FIXME(a second full disk before the next restart): a released reserve comes back
/// only at the next open; re-create it when commits recover if disks fill repeatedly.
fn keep_reserve(reserve: &Path) {
    if reserve.exists() {
        return;
    }
    let dir = reserve.parent().expect("the reserve lives in the state dir");
    let room = RESERVE_FILE_BYTES + DISK_RESERVE_BYTES;
    if free_bytes(dir).is_none_or(|free| free < room) {
        return;
    }
    // Real bytes, not a sparse file: the point is to hold the blocks.
    let partial = reserve.with_extension("partial");
    let written = File::create(&partial).and_then(|mut file| {
        let block = vec![0u8; 64 * 1024];
        for _ in 0..RESERVE_FILE_BYTES / block.len() as u64 {
            file.write_all(&block)?;
        }
        file.sync_all()
    });
    if written.and_then(|()| std::fs::rename(&partial, reserve)).is_err() {
        let _ = std::fs::remove_file(&partial);
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The segment a VM is appending to.
struct ActiveSegment {
    id: u64,
    file: File,
    len: u64,
}

/// Write access to the store: owned by the committer alone.
pub struct StoreWriter {
    store: Store,
    active: HashMap<String, ActiveSegment>,
    /// A VM starts a new segment file once its current one reaches this size.
    segment_bytes: u64,
    /// What opening repaired.
    repair: RepairReport,
    /// True if and only if the last commit applied its index but its flush failed: the
    /// retry of the same set then only flushes, rather than append its batches twice.
    unflushed: bool,
    /// Every VM's chain as committed; a commit extends copies and keeps them only once
    /// its index is applied.
    chains: HashMap<String, ChainState>,
}

impl StoreWriter {
    /// Opens the write side and repairs what a crash can leave: unindexed bytes at the end
    /// of segments, and segment files no index entry refers to.
    pub fn open(store: Store, segment_bytes: u64) -> Result<StoreWriter, StoreError> {
        let mut writer = StoreWriter {
            store,
            active: HashMap::new(),
            segment_bytes: segment_bytes.max(1),
            repair: RepairReport::default(),
            unflushed: false,
            chains: HashMap::new(),
        };
        writer.repair = writer.recover()?;
        writer.open_chains()?;
        Ok(writer)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What opening had to repair.
    pub fn repair(&self) -> &RepairReport {
        &self.repair
    }

    /// Loads every VM's chain state and, on the first open of a store made before the
    /// chain, records which batch ids predate it.
    fn open_chains(&mut self) -> Result<(), StoreError> {
        for item in self.store.db.scan_prefix(b"C") {
            let (k, v) = item.map_err(|e| self.store.sled_err(e))?;
            let Ok(vm) = String::from_utf8(k[1..].to_vec()) else { continue };
            let Some(state) = ChainState::decode(&v) else {
                return Err(StoreError::Corrupt {
                    key: hex(&k),
                    reason: format!(
                        "the chain state of {vm} has {} bytes, not {CHAIN_STATE_LEN} of version 1 (a newer qlogd's, or damage)",
                        v.len()
                    ),
                });
            };
            self.chains.insert(vm, state);
        }
        if self.store.db.get(CHAIN_SINCE_KEY).map_err(|e| self.store.sled_err(e))?.is_none() {
            let since = self.store.next_batch_id()?;
            self.store
                .db
                .insert(CHAIN_SINCE_KEY, &since.to_be_bytes())
                .map_err(|e| self.store.sled_err(e))?;
            self.store.db.flush().map_err(|e| self.store.sled_err(e))?;
        }
        Ok(())
    }

    fn recover(&mut self) -> Result<RepairReport, StoreError> {
        let mut report = RepairReport::default();
        // Where each referenced segment's indexed data ends, by VM, from one index scan.
        let mut ends: HashMap<String, HashMap<u64, u64>> = HashMap::new();
        for item in self.store.db.scan_prefix(b"E") {
            let (k, v) = item.map_err(|e| self.store.sled_err(e))?;
            let info = decode_index(&k, &v)?;
            let Some(vm) = split_batch_key_vm(&k) else { continue };
            let end = ends.entry(vm).or_default().entry(info.segment).or_default();
            *end = (*end).max(info.offset + u64::from(info.len));
        }

        let dirs = std::fs::read_dir(&self.store.segments).into_iter().flatten().flatten();
        for dir in dirs {
            let Ok(vm) = dir.file_name().into_string() else { continue };
            let Ok(files) = std::fs::read_dir(dir.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".seg"))
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                else {
                    continue;
                };
                let path = f.path();
                let write_err = |source| StoreError::Write { path: path.clone(), source };
                match ends.get(&vm).and_then(|e| e.get(&id)) {
                    None => {
                        if std::fs::remove_file(&path).is_ok() {
                            report.removed_segments += 1;
                        }
                    }
                    Some(&end) => {
                        let file = OpenOptions::new().write(true).open(&path).map_err(write_err)?;
                        let len = file.metadata().map_err(write_err)?.len();
                        if len > end {
                            file.set_len(end).map_err(write_err)?;
                            file.sync_all().map_err(write_err)?;
                            report.cut_segments += 1;
                            report.cut_bytes += len - end;
                        }
                    }
                }
            }
        }

        // Indexed bytes that are not there: nothing above can cause it, so only report.
        for (vm, segments) in &ends {
            for (&id, &end) in segments {
                let len = std::fs::metadata(self.store.segment_path(vm, id)).map_or(0, |m| m.len());
                if len < end {
                    report.missing_segments += 1;
                    report.missing_bytes += end - len;
                }
            }
        }
        Ok(report)
    }

    /// Makes one commit cycle durable: segment bytes first, then the index.
    ///
    /// On error nothing is indexed and the segments are cut back, so the same set can be
    /// committed again.
    ///
    /// If the index was applied and only its flush failed, the segments are kept (the
    /// applied index points at them, and sled may yet write it) and the retry, which must
    /// pass the same set, only flushes.
    pub fn commit(&mut self, set: &CommitSet) -> Result<(), StoreError> {
        if !self.unflushed {
            let mut before: Vec<(String, u64, u64)> = Vec::new();
            if let Err(error) = self.write(set, &mut before) {
                self.roll_back(&before);
                return Err(error);
            }
            self.unflushed = true;
        }
        self.store.db.flush().map_err(|e| self.store.sled_err(e))?;
        self.unflushed = false;
        self.remove_dead_segments(set);
        Ok(())
    }

    /// Cuts the segments a failed write touched back to where they were. The next
    /// offset is then taken from the file itself: appends land at the file's real end,
    /// so if the cut failed too (bytes of the failed write stay, unindexed), the index
    /// must still point where the bytes go.
    fn roll_back(&mut self, before: &[(String, u64, u64)]) {
        for (vm, id, len) in before {
            let Some(seg) = self.active.get_mut(vm) else { continue };
            if seg.id != *id {
                continue;
            }
            let _ = seg.file.set_len(*len);
            match seg.file.metadata() {
                Ok(meta) => seg.len = meta.len(),
                // Reopened, and measured again, on the next write.
                Err(_) => {
                    self.active.remove(vm);
                }
            }
        }
    }

    /// Refuses a commit unless `needed` bytes are free.
    ///
    /// FIXME(a store whose quotas add up to more than its disk, likely with 1 GiB quotas
    /// on a small log qube): nothing trims for disk pressure, only per-VM quotas, so such
    /// a store fills to the reserve and then holds every ack until space is freed
    /// outside; and a quota trim is in the same set as the batch that needs its room, so
    /// even lowered quotas do not heal it. Commit a set's deletions first, and decide
    /// whose events a full disk may remove, before quota sums above the disk are
    /// supported; until then `qlogd check-config` should compare them.
    fn check_free_space(&self, needed: u64) -> Result<(), StoreError> {
        // Unknown free space is no reason to stop; a real shortage still fails the write.
        let Some(free) = free_bytes(&self.store.segments) else { return Ok(()) };
        if free < needed {
            return Err(StoreError::DiskFull { path: self.store.segments.clone(), free, needed });
        }
        Ok(())
    }

    fn write(
        &mut self,
        set: &CommitSet,
        before: &mut Vec<(String, u64, u64)>,
    ) -> Result<(), StoreError> {
        let incoming: u64 = set.batches.iter().map(|b| b.value.len() as u64).sum();
        let needed = match incoming {
            0 => INDEX_ONLY_FREE_BYTES,
            _ => incoming.saturating_add(DISK_RESERVE_BYTES),
        };
        self.check_free_space(needed)?;
        // A handle of our own, so paths can be named while a segment is borrowed.
        let store = self.store.clone();
        let mut index = sled::Batch::default();
        let mut touched: Vec<String> = Vec::new();
        // The chains this commit changes, extended from the committed ones.
        let mut chains: HashMap<String, ChainState> = HashMap::new();
        for b in &set.batches {
            let seg = self.segment_for(&b.vm, b.batch_id)?;
            if !before.iter().any(|(vm, id, _)| *vm == b.vm && *id == seg.id) {
                before.push((b.vm.clone(), seg.id, seg.len));
            }
            seg.file.write_all(&b.value).map_err(|source| StoreError::Write {
                path: store.segment_path(&b.vm, seg.id),
                source,
            })?;
            let offset = seg.len;
            seg.len += b.value.len() as u64;
            let mut info = BatchInfo {
                key: batch_key(&b.vm, b.first_usec, b.batch_id),
                segment: seg.id,
                offset,
                len: u32::try_from(b.value.len()).expect("batches are far below 4 GiB"),
                count: b.count,
                first_usec: b.first_usec,
                last_usec: b.last_usec,
                chain: None,
            };
            let committed = self.chains.get(&b.vm).copied().unwrap_or_default();
            let state = chains.entry(b.vm.clone()).or_insert(committed);
            info.chain = Some(state.append(&b.vm, &info, chain::content_hash(&b.value)));
            index.insert(info.key.clone(), encode_index(&info));
            if !touched.contains(&b.vm) {
                touched.push(b.vm.clone());
            }
        }
        for vm in &touched {
            let seg = self.active.get(vm).expect("touched segments are open");
            seg.file.sync_data().map_err(|source| StoreError::Write {
                path: self.store.segment_path(vm, seg.id),
                source,
            })?;
        }
        for ((vm, stream), state) in &set.streams {
            let json = serde_json::to_vec(state).expect("stream state serialises");
            index.insert(stream_key(vm, stream), json);
        }
        for (vm, state) in &set.vms {
            let json = serde_json::to_vec(state).expect("vm state serialises");
            index.insert(vm_key(vm), json);
        }
        // Trims move the anchor past the batches they remove (see the module docs).
        for key in &set.deletes {
            let Some(vm) = split_batch_key_vm(key) else { continue };
            let Some(value) = self.store.db.get(key).map_err(|e| self.store.sled_err(e))? else {
                continue;
            };
            let Ok(BatchInfo { chain: Some(link), .. }) = decode_index(key, &value) else {
                continue;
            };
            let committed = self.chains.get(&vm).copied().unwrap_or_default();
            chains.entry(vm).or_insert(committed).trim(&link);
        }
        for (vm, state) in &chains {
            index.insert(chain_key(vm), state.encode().to_vec());
        }
        for key in &set.deletes {
            index.remove(key.as_slice());
        }
        for (key, value) in &set.aux {
            index.insert(key.as_slice(), value.as_slice());
        }
        for key in &set.aux_deletes {
            index.remove(key.as_slice());
        }
        index.insert(b"Mnext_batch_id".as_slice(), &set.next_batch_id.to_be_bytes());
        self.store.db.apply_batch(index).map_err(|e| self.store.sled_err(e))?;
        // Applied: a retry after a failed flush only flushes, so this is the chain now.
        self.chains.extend(chains);
        Ok(())
    }

    /// The segment `vm` appends to, starting a new one (named for `batch_id`) when there
    /// is none or the current one is full.
    fn segment_for(&mut self, vm: &str, batch_id: u64) -> Result<&mut ActiveSegment, StoreError> {
        let full = self.active.get(vm).is_none_or(|s| s.len >= self.segment_bytes);
        if full {
            let path = self.store.segment_path(vm, batch_id);
            let write_err = |source| StoreError::Write { path: path.clone(), source };
            std::fs::create_dir_all(path.parent().expect("segment paths have a VM directory"))
                .map_err(write_err)?;
            let file =
                OpenOptions::new().create(true).append(true).open(&path).map_err(write_err)?;
            let len = file.metadata().map_err(write_err)?.len();
            // Make the new file's directory entry durable before the index refers to it.
            if let Ok(dir) = File::open(path.parent().expect("segment paths have a VM directory")) {
                let _ = dir.sync_all();
            }
            self.active.insert(vm.to_owned(), ActiveSegment { id: batch_id, file, len });
        }
        Ok(self.active.get_mut(vm).expect("inserted above"))
    }

    /// After deletions are durable, removes segment files older than a VM's oldest
    /// remaining batch. The active segment is never removed.
    fn remove_dead_segments(&mut self, set: &CommitSet) {
        let mut vms: Vec<String> =
            set.deletes.iter().filter_map(|k| split_batch_key_vm(k)).collect();
        vms.sort();
        vms.dedup();
        for vm in vms {
            let oldest = self.store.batches(&vm).next().and_then(Result::ok).map(|b| b.segment);
            let active = self.active.get(&vm).map(|s| s.id);
            let Ok(files) = std::fs::read_dir(self.store.segments.join(&vm)) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".seg"))
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                else {
                    continue;
                };
                if Some(id) != active && oldest.is_none_or(|o| id < o) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

/// What a reader of batches wants, asked as [`Store::for_each_record`] goes, so that it
/// reads, inflates and parses as little as it can. Both answers may be too generous,
/// never too strict: every record visited is still judged by the reader.
pub trait Wanted {
    /// From a batch's record keys: which of its records may be wanted; `None` for all.
    fn records(&self, columns: &Columns<'_>) -> Option<Vec<bool>>;
    /// From an inflated chunk, its records back to back: may any of them be wanted?
    fn chunk(&self, raw: &[u8]) -> bool;
}

/// Every record (for tests: queries always pass their filter).
#[cfg(test)]
pub struct Everything;

#[cfg(test)]
impl Wanted for Everything {
    fn records(&self, _: &Columns<'_>) -> Option<Vec<bool>> {
        None
    }
    fn chunk(&self, _: &[u8]) -> bool {
        true
    }
}

/// The segment file a reader of batches read last, kept open for its next batch. Keep
/// one for a short run of reads only: an open file that a trim has since removed
/// still takes its space on disk until it is closed.
#[derive(Default)]
pub struct SegmentFiles {
    last: Option<(String, u64, File)>,
}

/// The buffers each query thread reads batches into: a batch is up to a few MiB, and
/// fresh pages for every one cost more than decompressing it.
#[derive(Default)]
struct Scratch {
    /// The first bytes of a batch value: its head, and for older batches all of it.
    probe: Vec<u8>,
    /// A run of chunks read together.
    run: Vec<u8>,
    /// Chunk 0's records, the dictionary of the others.
    dict: Vec<u8>,
    raw: Vec<u8>,
}

impl Scratch {
    /// Gives back buffers grown past this after use rather than keeping them.
    const KEEP_BYTES: usize = 16 << 20;

    fn shrink(&mut self) {
        for buf in [&mut self.probe, &mut self.run, &mut self.dict, &mut self.raw] {
            if buf.capacity() > Self::KEEP_BYTES {
                *buf = Vec::new();
            }
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// The stored bytes of one batch value that a reader holds: its first bytes (the probe
/// read, which holds the head and often chunk 0) and the last run of chunks it read.
struct Held<'a> {
    file: &'a File,
    /// Where the value starts in the segment.
    offset: u64,
    probe: &'a [u8],
    run: &'a mut Vec<u8>,
    /// Where `run` starts in the value.
    run_at: u64,
}

impl Held<'_> {
    /// The bytes at `range` of the value; if they are not held, reads `ahead()` (which
    /// covers `range`) in their place first.
    fn get(
        &mut self,
        range: &std::ops::Range<u64>,
        ahead: impl FnOnce() -> std::ops::Range<u64>,
    ) -> std::io::Result<&[u8]> {
        let (start, end) = (range.start as usize, range.end as usize);
        if end <= self.probe.len() {
            return Ok(&self.probe[start..end]);
        }
        let held = self.run_at..self.run_at + self.run.len() as u64;
        if range.start < held.start || range.end > held.end {
            let ahead = ahead();
            read_range(self.file, self.offset, &ahead, self.run)?;
            self.run_at = ahead.start;
        }
        let at = (range.start - self.run_at) as usize;
        Ok(&self.run[at..at + (end - start)])
    }
}

/// What to read for chunk `i`: it and the wanted chunks after it in walking order, up
/// to [`BATCH_READ_BYTES`] together (chunk 0 is read apart, first).
fn read_ahead(
    chunks: &[batch::Chunk],
    wanted: &[bool],
    i: usize,
    reverse: bool,
) -> std::ops::Range<u64> {
    let (mut lo, mut hi) = (i, i);
    loop {
        let (l, h) = match reverse {
            true if lo > 1 && wanted[lo - 1] => (lo - 1, hi),
            false if hi + 1 < chunks.len() && wanted[hi + 1] => (lo, hi + 1),
            _ => break,
        };
        if chunks[h].stored.end - chunks[l].stored.start > BATCH_READ_BYTES {
            break;
        }
        (lo, hi) = (l, h);
    }
    chunks[lo].stored.start..chunks[hi].stored.end
}

/// Reads `len` bytes of a segment at `offset` into `buf`, which it replaces.
fn read_into(file: &File, offset: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.resize(len as usize, 0);
    file.read_exact_at(buf, offset)
}

/// Grows `buf`, which holds the first bytes of the value at `offset`, to its first `len`
/// bytes, reading only what it lacks.
fn read_rest(file: &File, offset: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let have = buf.len();
    if len as usize > have {
        buf.resize(len as usize, 0);
        file.read_exact_at(&mut buf[have..], offset + have as u64)?;
    }
    Ok(())
}

/// Reads `range` of the batch value that starts at `offset` into `buf`.
fn read_range(
    file: &File,
    offset: u64,
    range: &std::ops::Range<u64>,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    read_into(file, offset + range.start, range.end - range.start, buf)
}

/// Hands `visit` the wanted records of one inflated chunk, in walking order. The span
/// is the chunk's first record (its index in the batch) and how many records it holds.
fn visit_chunk(
    (first, records): (u32, u32),
    raw: &[u8],
    wanted: Option<&[bool]>,
    reverse: bool,
    visit: &mut impl FnMut(qlog_rpc::query::RecordView<'_>) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, String> {
    use qlog_rpc::query::RecordView;
    let (first, records) = (first as usize, records as usize);
    let is_wanted = |k: usize| wanted.is_none_or(|w| w.get(first + k).copied().unwrap_or(true));
    let miscount = |found: usize| {
        format!("expected {records} records in the chunk from record {first}, found {found}")
    };
    if reverse {
        // The last record is found only by parsing all before it: parse each once.
        let views = RecordView::parse_all(raw).map_err(|e| format!("record: {e}"))?;
        if views.len() != records {
            return Err(miscount(views.len()));
        }
        for (k, view) in views.into_iter().enumerate().rev() {
            if is_wanted(k) && visit(view).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        return Ok(ControlFlow::Continue(()));
    }
    // Forwards, each record is parsed once, as it is visited.
    let (mut pos, mut k) = (0, 0usize);
    while pos < raw.len() {
        let view = RecordView::parse(&raw[pos..]).map_err(|e| format!("record: {e}"))?;
        pos += view.bytes.len();
        let keep = is_wanted(k);
        k += 1;
        if k > records {
            break;
        }
        if keep && visit(view).is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    if k != records {
        return Err(miscount(k));
    }
    Ok(ControlFlow::Continue(()))
}

/// Decompresses a batch value into its records, in receive-time order.
pub fn decode_batch(key: &[u8], value: &[u8]) -> Result<Vec<Record>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: hex(key), reason };
    let mut raw = Vec::new();
    inflate_into(key, value, &mut raw)?;
    let count = u32::from_be_bytes(value[1..5].try_into().expect("inflate checked the header"));
    // Stored records were validated on ingest; the limits here only guard against a
    // damaged store, so they are generous.
    let limits = Limits { max_fields: u32::MAX, max_value_len: u32::MAX, ..Limits::DEFAULT };
    let mut records = Vec::with_capacity(count as usize);
    let mut pos = 0;
    while pos < raw.len() {
        let (rec, used) =
            Record::decode(&raw[pos..], &limits).map_err(|e| corrupt(format!("record: {e}")))?;
        records.push(rec);
        pos += used;
    }
    if records.len() != count as usize {
        return Err(corrupt(format!("header says {count} records, found {}", records.len())));
    }
    Ok(records)
}

/// Checks a batch header and decompresses all the records behind it into `raw`,
/// which it replaces.
fn inflate_into(key: &[u8], value: &[u8], raw: &mut Vec<u8>) -> Result<(), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: hex(key), reason };
    if value.len() < BATCH_HEADER_LEN {
        return Err(corrupt("bad batch header".into()));
    }
    let raw_len = u32::from_be_bytes(value[21..25].try_into().expect("header checked"));
    if raw_len > MAX_BATCH_RAW_LEN {
        return Err(corrupt(format!("claims {raw_len} uncompressed bytes")));
    }
    match value[0] {
        BATCH_VERSION => {
            *raw = batch::inflate_all(value).map_err(corrupt)?;
            Ok(())
        }
        BATCH_VERSION_LZ4 if value.len() >= BATCH_V2_HEADER_LEN => {
            let sum = u32::from_be_bytes(value[25..29].try_into().expect("header checked"));
            let block = &value[BATCH_V2_HEADER_LEN..];
            if crc32fast::hash(block) != sum {
                return Err(corrupt("checksum mismatch: the stored bytes changed".into()));
            }
            batch::inflate_lz4(block, None, raw_len, raw).map_err(corrupt)
        }
        BATCH_VERSION_ZSTD => {
            *raw = zstd::bulk::decompress(&value[BATCH_HEADER_LEN..], raw_len as usize)
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            Ok(())
        }
        v if v > BATCH_VERSION => Err(corrupt(format!(
            "batch format version {v} is newer than this qlogd's {BATCH_VERSION} (upgrade qlogd)"
        ))),
        _ => Err(corrupt("bad batch header".into())),
    }
}

fn encode_index(info: &BatchInfo) -> Vec<u8> {
    let mut v = Vec::with_capacity(INDEX_VALUE_CHAINED_LEN);
    v.extend_from_slice(&info.segment.to_be_bytes());
    v.extend_from_slice(&info.offset.to_be_bytes());
    v.extend_from_slice(&info.len.to_be_bytes());
    v.extend_from_slice(&info.count.to_be_bytes());
    v.extend_from_slice(&info.first_usec.to_be_bytes());
    v.extend_from_slice(&info.last_usec.to_be_bytes());
    if let Some(chain) = &info.chain {
        v.push(INDEX_CHAIN_VERSION);
        v.extend_from_slice(&chain.position.to_be_bytes());
        v.extend_from_slice(&chain.content);
        v.extend_from_slice(&chain.link);
    }
    v
}

fn decode_index(key: &[u8], v: &[u8]) -> Result<BatchInfo, StoreError> {
    if v.len() > INDEX_VALUE_LEN && v[INDEX_VALUE_LEN] > INDEX_CHAIN_VERSION {
        let reason = format!(
            "index entry version {} is newer than this qlogd's {INDEX_CHAIN_VERSION} (upgrade qlogd)",
            v[INDEX_VALUE_LEN]
        );
        return Err(StoreError::Corrupt { key: hex(key), reason });
    }
    let chained = v.len() == INDEX_VALUE_CHAINED_LEN && v[INDEX_VALUE_LEN] == INDEX_CHAIN_VERSION;
    if !(chained || v.len() == INDEX_VALUE_LEN) || key.len() < 18 {
        return Err(StoreError::Corrupt { key: hex(key), reason: "bad index entry".into() });
    }
    let u64_at = |at: usize| u64::from_be_bytes(v[at..at + 8].try_into().expect("in entry"));
    let u32_at = |at: usize| u32::from_be_bytes(v[at..at + 4].try_into().expect("in entry"));
    let hash_at = |at: usize| -> chain::Hash { v[at..at + 32].try_into().expect("in entry") };
    let chain = chained.then(|| ChainLink {
        position: u64_at(INDEX_VALUE_LEN + 1),
        content: hash_at(INDEX_VALUE_LEN + 9),
        link: hash_at(INDEX_VALUE_LEN + 41),
    });
    Ok(BatchInfo {
        chain,
        key: key.to_vec(),
        segment: u64_at(0),
        offset: u64_at(8),
        len: u32_at(16),
        count: u32_at(20),
        first_usec: u64_at(24),
        last_usec: u64_at(32),
    })
}

fn split_batch_key_vm(key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(b"E")?;
    let nul = rest.iter().position(|&b| b == 0)?;
    String::from_utf8(rest[..nul].to_vec()).ok()
}

fn batch_prefix(vm: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(vm.len() + 18);
    k.push(b'E');
    k.extend_from_slice(vm.as_bytes());
    k.push(0);
    k
}

fn batch_key(vm: &str, first_usec: u64, batch_id: u64) -> Vec<u8> {
    let mut k = batch_prefix(vm);
    k.extend_from_slice(&first_usec.to_be_bytes());
    k.extend_from_slice(&batch_id.to_be_bytes());
    k
}

fn stream_key(vm: &str, stream: &str) -> Vec<u8> {
    let mut k = vec![b'S'];
    k.extend_from_slice(vm.as_bytes());
    k.push(0);
    k.extend_from_slice(stream.as_bytes());
    k
}

fn vm_key(vm: &str) -> Vec<u8> {
    let mut k = vec![b'V'];
    k.extend_from_slice(vm.as_bytes());
    k
}

fn chain_key(vm: &str) -> Vec<u8> {
    let mut k = vec![b'C'];
    k.extend_from_slice(vm.as_bytes());
    k
}

fn split_name_key(k: &[u8]) -> Option<(String, String)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let vm = String::from_utf8(k[..nul].to_vec()).ok()?;
    let stream = String::from_utf8(k[nul + 1..].to_vec()).ok()?;
    Some((vm, stream))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl LockFile {
    fn acquire(path: &Path) -> Result<LockFile, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_owned(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        // SAFETY: flock on a file descriptor we own has no memory-safety requirements.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let pid = std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
            let pid = if pid.is_empty() { "unknown".to_owned() } else { pid };
            return Err(StoreError::Locked { path: path.parent().unwrap_or(path).into(), pid });
        }
        file.set_len(0).map_err(open_err)?;
        write!(file, "{}", std::process::id()).map_err(open_err)?;
        Ok(LockFile { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::RecordKind;
    use qlog_rpc::Event;

    fn record(vm: &str, usec: u64, seq: u64) -> Record {
        let mut event = Event::new();
        event.push("MESSAGE", format!("event {seq}"));
        Record {
            vm: vm.into(),
            stream: "s".into(),
            received_usec: usec,
            seq,
            kind: RecordKind::Event,
            event,
        }
    }

    fn commit_batches(
        w: &mut StoreWriter,
        batches: Vec<(String, u64, Vec<Record>)>,
        deletes: Vec<Vec<u8>>,
    ) {
        let next = batches.iter().map(|b| b.1).max().unwrap_or(0) + 1;
        let batches = batches.iter().map(|(vm, id, r)| Store::encode_batch(vm, *id, r)).collect();
        w.commit(&CommitSet { batches, deletes, next_batch_id: next, ..Default::default() })
            .unwrap();
    }

    fn seqs(
        store: &Store,
        vm: &str,
        since: Option<u64>,
        until: Option<u64>,
        reverse: bool,
    ) -> Vec<u64> {
        store
            .scan(vm, since, until, reverse)
            .flat_map(|b| store.read_batch(vm, &b.unwrap()).unwrap())
            .filter(|r| since.is_none_or(|s| r.received_usec >= s))
            .map(|r| r.seq)
            .collect()
    }

    /// A batch as qlogd wrote it before LZ4: one checksummed zstd frame.
    fn zstd_batch(vm: &str, batch_id: u64, records: &[Record]) -> NewBatch {
        let mut batch = Store::encode_batch(vm, batch_id, records);
        let mut raw = Vec::new();
        for r in records {
            r.encode(&mut raw);
        }
        let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
        compressor.include_checksum(true).unwrap();
        let mut value = batch.value[..BATCH_HEADER_LEN].to_vec();
        value[0] = BATCH_VERSION_ZSTD;
        value.extend_from_slice(&compressor.compress(&raw).unwrap());
        batch.value = value;
        batch
    }

    /// A batch as qlogd wrote it before chunks: one LZ4 block behind its CRC-32.
    fn lz4_batch(vm: &str, batch_id: u64, records: &[Record]) -> NewBatch {
        let mut batch = Store::encode_batch(vm, batch_id, records);
        let mut raw = Vec::new();
        for r in records {
            r.encode(&mut raw);
        }
        let block = lz4_flex::block::compress(&raw);
        let mut value = batch.value[..BATCH_HEADER_LEN].to_vec();
        value[0] = BATCH_VERSION_LZ4;
        value.extend_from_slice(&crc32fast::hash(&block).to_be_bytes());
        value.extend_from_slice(&block);
        batch.value = value;
        batch
    }

    /// Every record `for_each_record` visits, wanting all of them.
    fn visited(store: &Store, vm: &str, reverse: bool) -> Vec<u64> {
        let mut seen = Vec::new();
        for info in store.scan(vm, None, None, reverse) {
            let visit = |r: qlog_rpc::query::RecordView<'_>| {
                seen.push(r.seq);
                ControlFlow::Continue(())
            };
            assert!(store
                .for_each_record(
                    &mut SegmentFiles::default(),
                    vm,
                    &info.unwrap(),
                    reverse,
                    &Everything,
                    visit
                )
                .unwrap());
        }
        seen
    }

    #[test]
    fn batches_from_before_chunks_stay_readable_beside_new_ones() {
        let (_dir, store, mut w) = fresh_store();
        let zstd = zstd_batch("a", 1, &[record("a", 10, 1), record("a", 11, 2)]);
        let lz4 = lz4_batch("a", 2, &[record("a", 15, 3), record("a", 16, 4)]);
        let new = Store::encode_batch("a", 3, &[record("a", 20, 5)]);
        assert_eq!(new.value[0], BATCH_VERSION);
        let batches = vec![zstd, lz4, new];
        w.commit(&CommitSet { batches, next_batch_id: 4, ..Default::default() }).unwrap();
        assert_eq!(seqs(&store, "a", None, None, false), vec![1, 2, 3, 4, 5]);
        assert_eq!(visited(&store, "a", false), vec![1, 2, 3, 4, 5]);
        assert_eq!(visited(&store, "a", true), vec![5, 4, 3, 2, 1]);
    }

    /// Records big enough that a batch of them spans many chunks, and random enough that
    /// it is far larger than the first read of a batch; `PRIORITY` is 3 for every
    /// seventh, 6 for the others.
    fn chunky(vm: &str, n: u64) -> Vec<Record> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|i| {
                let mut r = record(vm, 1_000 + i, i + 1);
                r.event.push("PRIORITY", if i % 7 == 0 { "3" } else { "6" });
                let filler: String = (0..150)
                    .map(|_| {
                        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        format!("{:04x}", state >> 48)
                    })
                    .collect();
                r.event.push("FILLER", filler);
                r
            })
            .collect()
    }

    #[test]
    fn one_thread_reading_batch_after_batch_sees_each_ones_own_bytes() {
        let (_dir, store, mut w) = fresh_store();
        let mut records = chunky("a", 400);
        let second: Vec<Record> = records.split_off(200);
        let batches =
            vec![Store::encode_batch("a", 1, &records), Store::encode_batch("a", 2, &second)];
        w.commit(&CommitSet { batches, next_batch_id: 3, ..Default::default() }).unwrap();
        // Both directions, twice: each read reuses this thread's buffers of the last.
        for _ in 0..2 {
            assert_eq!(visited(&store, "a", false), (1..=400).collect::<Vec<_>>());
            assert_eq!(visited(&store, "a", true), (1..=400).rev().collect::<Vec<_>>());
        }
    }

    #[test]
    fn only_wanted_records_are_visited_and_a_reader_can_stop_early() {
        let (_dir, store, mut w) = fresh_store();
        let records = chunky("a", 200);
        let batch = Store::encode_batch("a", 1, &records);
        let head_len = batch::head_len(&batch.value).unwrap();
        let head = batch::Head::parse(
            &batch.value[..batch::FIXED_LEN + head_len],
            batch.value.len() as u64,
        )
        .unwrap();
        assert!(head.chunks.len() > 10, "{} chunks", head.chunks.len());
        w.commit(&CommitSet { batches: vec![batch], next_batch_id: 2, ..Default::default() })
            .unwrap();
        let info = store.batches("a").next().unwrap().unwrap();
        let errors: Vec<u64> = (0..200).filter(|i| i % 7 == 0).map(|i| i + 1).collect();
        struct Errors;
        impl Wanted for Errors {
            fn records(&self, c: &Columns<'_>) -> Option<Vec<bool>> {
                Some(c.iter().map(|k| k.priority == 3).collect())
            }
            fn chunk(&self, _: &[u8]) -> bool {
                true
            }
        }
        for reverse in [false, true] {
            let mut seen = Vec::new();
            let visit = |r: qlog_rpc::query::RecordView<'_>| {
                seen.push(r.seq);
                ControlFlow::Continue(())
            };
            store
                .for_each_record(&mut SegmentFiles::default(), "a", &info, reverse, &Errors, visit)
                .unwrap();
            let mut expected = errors.clone();
            if reverse {
                expected.reverse();
            }
            assert_eq!(seen, expected, "reverse {reverse}");
        }
        // The newest five, stopping there; then nothing wanted at all.
        let mut seen = Vec::new();
        let visit = |r: qlog_rpc::query::RecordView<'_>| {
            seen.push(r.seq);
            if seen.len() == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        store
            .for_each_record(&mut SegmentFiles::default(), "a", &info, true, &Everything, visit)
            .unwrap();
        assert_eq!(seen, vec![200, 199, 198, 197, 196]);
        struct Nothing;
        impl Wanted for Nothing {
            fn records(&self, c: &Columns<'_>) -> Option<Vec<bool>> {
                Some(vec![false; c.len()])
            }
            fn chunk(&self, _: &[u8]) -> bool {
                panic!("no chunk is inflated when no record is wanted")
            }
        }
        let visit = |_: qlog_rpc::query::RecordView<'_>| -> ControlFlow<()> {
            panic!("no record is wanted")
        };
        assert!(store
            .for_each_record(&mut SegmentFiles::default(), "a", &info, false, &Nothing, visit)
            .unwrap());
    }

    #[test]
    fn a_changed_byte_in_a_head_or_a_chunk_is_reported_as_corruption() {
        let (dir, store, mut w) = fresh_store();
        commit_batches(&mut w, vec![("a".into(), 1, vec![record("a", 10, 1)])], vec![]);
        let info = store.batches("a").next().unwrap().unwrap();
        let seg = dir.path().join(format!("segments/a/{:016x}.seg", info.segment));
        let bytes = std::fs::read(&seg).unwrap();
        let at = info.offset as usize;
        let chunks_at = at + batch::FIXED_LEN + batch::head_len(&bytes[at..]).unwrap();
        let visit = |_: qlog_rpc::query::RecordView<'_>| ControlFlow::Continue(());
        // A changed byte in the head, then in a chunk.
        for (place, expect) in [
            (at + batch::FIXED_LEN + 2, "head checksum"),
            (chunks_at + 3, "checksum mismatch in the chunk"),
        ] {
            let mut changed = bytes.clone();
            changed[place] ^= 0x20;
            std::fs::write(&seg, changed).unwrap();
            let err = store
                .for_each_record(
                    &mut SegmentFiles::default(),
                    "a",
                    &info,
                    false,
                    &Everything,
                    visit,
                )
                .unwrap_err();
            assert!(err.to_string().contains(expect), "{err}");
        }
        // And in an LZ4 batch from before chunks.
        let old = lz4_batch("a", 1, &[record("a", 10, 1)]);
        let mut value = old.value.clone();
        value[BATCH_V2_HEADER_LEN + 3] ^= 0x20;
        let err = inflate_into(b"k", &value, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        let future = {
            let mut b = Store::encode_batch("a", 2, &[record("a", 20, 2)]);
            b.value[0] = BATCH_VERSION + 1;
            b
        };
        let e = inflate_into(b"k", &future.value, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("upgrade qlogd"), "{e}");
    }

    #[test]
    fn a_scan_from_a_time_that_batches_share_finds_every_one_of_them() {
        let (_dir, store, mut w) = fresh_store();
        // One commit cut a VM's records of one receive time into three batches.
        commit_batches(
            &mut w,
            vec![
                ("a".into(), 1, vec![record("a", 50, 1), record("a", 50, 2)]),
                ("a".into(), 2, vec![record("a", 50, 3)]),
                ("a".into(), 3, vec![record("a", 50, 4), record("a", 60, 5)]),
            ],
            vec![],
        );
        assert_eq!(seqs(&store, "a", Some(50), None, false), vec![1, 2, 3, 4, 5]);
        assert_eq!(seqs(&store, "a", Some(55), None, false), vec![5]);
        let ids: Vec<u64> =
            store.scan("a", Some(50), Some(50), true).map(|b| b.unwrap().batch_id()).collect();
        assert_eq!(ids, vec![3, 2, 1]);
    }

    #[test]
    fn batches_round_trip_and_scan_by_vm_and_time() {
        let (_dir, store, mut w) = fresh_store();
        commit_batches(
            &mut w,
            vec![
                ("a".into(), 1, (0..10).map(|i| record("a", 100 + i, i + 1)).collect()),
                ("a".into(), 2, (10..20).map(|i| record("a", 100 + i, i + 1)).collect()),
                ("ab".into(), 3, vec![record("ab", 105, 1)]),
            ],
            vec![],
        );
        assert_eq!(seqs(&store, "a", None, None, false), (1..=20).collect::<Vec<_>>());
        assert_eq!(seqs(&store, "a", Some(115), None, false), (16..=20).collect::<Vec<_>>());
        assert_eq!(seqs(&store, "a", Some(105), Some(108), false), (6..=10).collect::<Vec<_>>());
        // Reverse scans reverse the batch order; records inside a batch stay oldest first.
        assert_eq!(seqs(&store, "a", None, None, true)[..10], (11..=20).collect::<Vec<_>>()[..]);
        assert_eq!(store.batches("ab").count(), 1, "vm names that share a prefix stay apart");
        assert_eq!(store.next_batch_id().unwrap(), 4);
    }

    #[test]
    fn deleting_a_vms_oldest_batches_removes_only_its_segment_files() {
        let dir = tempdir();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        // Tiny segments: every batch starts a new file.
        let mut w = StoreWriter::open(store.clone(), 1).unwrap();
        for id in 1..=4 {
            commit_batches(&mut w, vec![("a".into(), id, vec![record("a", id * 10, id)])], vec![]);
        }
        commit_batches(&mut w, vec![("b".into(), 5, vec![record("b", 1, 1)])], vec![]);
        let listed: Vec<BatchInfo> = store.batches("a").take(2).map(|b| b.unwrap()).collect();
        let old: Vec<Vec<u8>> = listed.iter().map(|b| b.key.clone()).collect();
        commit_batches(&mut w, vec![], old);
        // A query that listed the batch before it was trimmed finds it gone, not damaged.
        let visit = |_: qlog_rpc::query::RecordView<'_>| ControlFlow::Continue(());
        assert!(!store
            .for_each_record(
                &mut SegmentFiles::default(),
                "a",
                &listed[0],
                false,
                &Everything,
                visit
            )
            .unwrap());
        assert_eq!(seqs(&store, "a", None, None, false), vec![3, 4]);
        let files = std::fs::read_dir(dir.path().join("segments/a")).unwrap().count();
        assert_eq!(files, 2, "the two oldest segment files of a are gone");
        assert_eq!(seqs(&store, "b", None, None, false), vec![1]);
    }

    #[test]
    fn reopening_cuts_unindexed_bytes_and_drops_orphan_segments() {
        let dir = tempdir();
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let mut w = StoreWriter::open(store, 1 << 20).unwrap();
            commit_batches(&mut w, vec![("a".into(), 1, vec![record("a", 1, 1)])], vec![]);
        }
        // What a crash between the segment write and the index flush leaves behind.
        let seg = dir.path().join("segments/a/0000000000000001.seg");
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new().append(true).open(&seg).unwrap().write_all(b"torn batch").unwrap();
        std::fs::write(dir.path().join("segments/a/00000000000000ff.seg"), b"orphan").unwrap();

        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mut w = StoreWriter::open(store.clone(), 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
        assert!(!dir.path().join("segments/a/00000000000000ff.seg").exists());
        let repaired = RepairReport {
            cut_segments: 1,
            cut_bytes: 10,
            removed_segments: 1,
            ..RepairReport::default()
        };
        assert_eq!(w.repair(), &repaired);
        assert!(w.repair().acked_data_intact(), "nothing indexed was cut");
        commit_batches(&mut w, vec![("a".into(), 2, vec![record("a", 2, 2)])], vec![]);
        assert_eq!(seqs(&store, "a", None, None, false), vec![1, 2]);
    }

    #[test]
    fn reopening_reports_indexed_bytes_that_are_missing() {
        let dir = tempdir();
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let mut w = StoreWriter::open(store, 1 << 20).unwrap();
            commit_batches(&mut w, vec![("a".into(), 1, vec![record("a", 1, 1)])], vec![]);
            assert_eq!(w.repair(), &RepairReport::default(), "a fresh store needs nothing");
        }
        // What only damage can do: indexed bytes gone.
        let seg = dir.path().join("segments/a/0000000000000001.seg");
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 3).unwrap();

        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let w = StoreWriter::open(store, 1 << 20).unwrap();
        assert_eq!(w.repair().missing_segments, 1);
        assert_eq!(w.repair().missing_bytes, 3);
        assert!(!w.repair().acked_data_intact());
    }

    #[test]
    fn second_open_of_the_same_state_dir_fails_with_the_holder_pid() {
        let dir = tempdir();
        let _store = Store::open(dir.path(), 8 << 20).unwrap();
        let err = Store::open(dir.path(), 8 << 20).err().expect("second open must fail");
        let msg = err.to_string();
        assert!(msg.contains("in use by another qlogd"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn detects_corrupt_batches() {
        let b = Store::encode_batch("a", 1, &[record("a", 1, 1)]);
        let key = batch_key("a", 1, 1);
        assert!(decode_batch(&key, &b.value).is_ok());
        let mut value = b.value.clone();
        let mid = value.len() - 6;
        value[mid] ^= 0xff;
        assert!(decode_batch(&key, &value).is_err());
        assert!(decode_batch(&key, &b.value[..10]).is_err());
    }

    /// Commits one batch per id for `vm`, each with one record at time `id * 10`.
    fn chain_of(w: &mut StoreWriter, vm: &str, ids: std::ops::RangeInclusive<u64>) {
        for id in ids {
            commit_batches(w, vec![(vm.into(), id, vec![record(vm, id * 10, id)])], vec![]);
        }
    }

    fn intact(store: &Store, vm: &str) -> VmChain {
        let report = store.verify_chain(vm).unwrap();
        assert_eq!(report.first_break, None, "{report:?}");
        assert_eq!(report.broken_links, 0, "{report:?}");
        report
    }

    fn first_break(store: &Store, vm: &str) -> qlog_rpc::query::ChainBreak {
        let report = store.verify_chain(vm).unwrap();
        match report.first_break {
            Some(b) => b,
            None => panic!("{vm} verifies clean: {report:?}"),
        }
    }

    #[test]
    fn every_commit_extends_its_vms_chain_and_trims_move_the_anchor() {
        let dir = tempdir();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mut w = StoreWriter::open(store.clone(), 1).unwrap();
        chain_of(&mut w, "a", 1..=4);
        chain_of(&mut w, "b", 5..=6);
        let a: Vec<BatchInfo> = store.batches("a").map(Result::unwrap).collect();
        let links: Vec<ChainLink> = a.iter().map(|b| b.chain.unwrap()).collect();
        assert_eq!(links.iter().map(|l| l.position).collect::<Vec<_>>(), [0, 1, 2, 3]);
        let first = chain::link(&chain::GENESIS, "a", &a[0], 0, &links[0].content);
        assert_eq!(links[0].link, first);
        assert_eq!(links[1].link, chain::link(&first, "a", &a[1], 1, &links[1].content));
        let report = intact(&store, "a");
        assert_eq!((report.batches_checked, report.trimmed, report.length), (4, 0, 4));
        assert_eq!(report.head, chain::hex(&links[3].link));
        assert_eq!(report.anchor, chain::hex(&chain::GENESIS));

        // Everything of b but its accounting gone: the accounting still tells.
        let mut vm_b = VmState { events_stored: 2, ..VmState::default() };
        store.db.insert(vm_key("b"), serde_json::to_vec(&vm_b).unwrap()).unwrap();
        let b_keys: Vec<Vec<u8>> = store.batches("b").map(|b| b.unwrap().key).collect();
        let saved: Vec<_> = b_keys.iter().map(|k| store.db.remove(k).unwrap().unwrap()).collect();
        let saved_chain = store.db.remove(chain_key("b")).unwrap().unwrap();
        let b = first_break(&store, "b");
        assert_eq!(b.kind, qlog_rpc::query::BreakKind::MissingChainState);
        for (k, v) in b_keys.iter().zip(saved) {
            store.db.insert(k, v).unwrap();
        }
        store.db.insert(chain_key("b"), saved_chain).unwrap();
        vm_b.events_stored = 0;
        store.db.insert(vm_key("b"), serde_json::to_vec(&vm_b).unwrap()).unwrap();
        intact(&store, "b");

        // Trim a's two oldest, as quota does, in the same commit as a new batch.
        let old = a[..2].iter().map(|b| b.key.clone()).collect();
        commit_batches(&mut w, vec![("a".into(), 7, vec![record("a", 70, 7)])], old);
        let report = intact(&store, "a");
        assert_eq!((report.batches_checked, report.trimmed, report.length), (3, 2, 5));
        assert_eq!(report.anchor, chain::hex(&links[1].link));
        assert_eq!(intact(&store, "b").batches_checked, 2);

        // Links recorded earlier: the anchor's, a stored one's, a trimmed one's.
        let saved = [(1, links[1].link), (3, links[3].link), (0, links[0].link)];
        let report = chain::verify(&store, "a", &saved).unwrap();
        assert_eq!((report.expected_matched, report.expected_unchecked), (2, 1), "{report:?}");
        assert_eq!(report.first_break, None);
        let report = chain::verify(&store, "a", &[(3, links[2].link), (9, links[3].link)]).unwrap();
        let b = report.first_break.unwrap();
        assert_eq!((b.kind, b.position), (qlog_rpc::query::BreakKind::ExpectedLinkMismatch, 3));
        assert_eq!(report.broken_links, 2, "position 9 is past the head");

        // The chain is in the store, not in the writer: a reopened one continues it.
        drop(w);
        drop(store);
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mut w = StoreWriter::open(store.clone(), 1).unwrap();
        chain_of(&mut w, "a", 8..=8);
        let all = store.batches("a").map(Result::unwrap).map(|b| b.key).collect();
        commit_batches(&mut w, vec![], all);
        let report = intact(&store, "a");
        assert_eq!((report.batches_checked, report.trimmed, report.length), (0, 6, 6));
        assert_eq!(report.head, report.anchor, "a fully trimmed chain ends at its anchor");
        assert_eq!(store.chain_vms().unwrap(), ["a", "b"]);
    }

    #[test]
    fn verify_names_the_first_broken_link() {
        use qlog_rpc::query::BreakKind;
        let setup = || {
            let dir = tempdir();
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            // Tiny segments: every batch in a file of its own.
            let mut w = StoreWriter::open(store.clone(), 1).unwrap();
            chain_of(&mut w, "a", 1..=4);
            chain_of(&mut w, "b", 5..=6);
            let a: Vec<BatchInfo> = store.batches("a").map(Result::unwrap).collect();
            (dir, store, a)
        };

        // A byte of the second batch's stored bytes.
        let (dir, store, a) = setup();
        let seg = dir.path().join(format!("segments/a/{:016x}.seg", a[1].segment));
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[BATCH_HEADER_LEN + 2] ^= 1;
        std::fs::write(&seg, bytes).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::ContentMismatch, Some(2), 1));
        assert_eq!(store.verify_chain("a").unwrap().broken_links, 1, "the walk resumes");
        intact(&store, "b");

        // The second batch's index entry.
        let (_dir, store, a) = setup();
        store.db.remove(&a[1].key).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::MissingBatch, Some(3), 1));

        // The newest batch's entry: only the head can tell.
        let (_dir, store, a) = setup();
        store.db.remove(&a[3].key).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::HeadMismatch, None, 3));

        // Two batches swapped in the index.
        let (_dir, store, a) = setup();
        let v1 = store.db.get(&a[1].key).unwrap().unwrap();
        let v2 = store.db.get(&a[2].key).unwrap().unwrap();
        store.db.insert(&a[1].key, v2).unwrap();
        store.db.insert(&a[2].key, v1).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::MissingBatch, Some(2), 1));

        // A count changed in an entry: its link no longer follows.
        let (_dir, store, a) = setup();
        let mut v = store.db.get(&a[2].key).unwrap().unwrap().to_vec();
        v[23] ^= 1;
        store.db.insert(&a[2].key, v).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::LinkMismatch, Some(3), 2));

        // A segment cut short.
        let (dir, store, a) = setup();
        let seg = dir.path().join(format!("segments/a/{:016x}.seg", a[0].segment));
        let file = OpenOptions::new().write(true).open(seg).unwrap();
        file.set_len(u64::from(a[0].len) - 1).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::MissingBytes, Some(1), 0));

        // A batch added behind the sink's back, chained correctly but past the head.
        let (_dir, store, a) = setup();
        let mut forged = a[3].clone();
        forged.key = batch_key("a", 1000, 99);
        let mut link = forged.chain.unwrap();
        link.position = 4;
        link.link = chain::link(&a[3].chain.unwrap().link, "a", &forged, 4, &link.content);
        forged.chain = Some(link);
        store.db.insert(&forged.key, encode_index(&forged)).unwrap();
        let b = first_break(&store, "a");
        assert_eq!((b.kind, b.batch_id, b.position), (BreakKind::BeyondHead, Some(99), 4));
    }

    #[test]
    fn batches_from_before_the_chain_are_unchained_and_the_chain_starts_after_them() {
        let dir = tempdir();
        {
            // What a qlogd from before the chain left: a 40-byte entry and its segment.
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let b = Store::encode_batch("a", 1, &[record("a", 10, 1)]);
            std::fs::create_dir_all(dir.path().join("segments/a")).unwrap();
            std::fs::write(dir.path().join("segments/a/0000000000000001.seg"), &b.value).unwrap();
            let info = BatchInfo {
                key: batch_key("a", 10, 1),
                segment: 1,
                offset: 0,
                len: b.value.len() as u32,
                count: 1,
                first_usec: 10,
                last_usec: 10,
                chain: None,
            };
            assert_eq!(encode_index(&info).len(), INDEX_VALUE_LEN);
            store.db.insert(&info.key, encode_index(&info)).unwrap();
            store.db.insert(b"Mnext_batch_id", &2u64.to_be_bytes()).unwrap();
            assert_eq!(store.chain_since().unwrap(), 2, "every stored batch predates the chain");
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mut w = StoreWriter::open(store.clone(), 1 << 20).unwrap();
        assert_eq!(store.chain_since().unwrap(), 2);
        chain_of(&mut w, "a", 2..=3);
        let report = intact(&store, "a");
        assert_eq!((report.unchained, report.batches_checked, report.length), (1, 2, 2));
        assert_eq!(seqs(&store, "a", None, None, false), vec![1, 2, 3]);

        // An entry stripped of its link once the chain has started is a break.
        let newest = store.batches("a").last().unwrap().unwrap();
        let stripped = BatchInfo { chain: None, ..newest.clone() };
        store.db.insert(&newest.key, encode_index(&stripped)).unwrap();
        let b = first_break(&store, "a");
        assert_eq!(b.kind, qlog_rpc::query::BreakKind::UnlinkedEntry);
    }

    /// A temporary directory removed on drop, without pulling in a crate for it.
    struct TempDir(PathBuf);
    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    /// An empty store in a temporary directory, and its writer.
    fn fresh_store() -> (TempDir, Store, StoreWriter) {
        let dir = tempdir();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let writer = StoreWriter::open(store.clone(), 1 << 20).unwrap();
        (dir, store, writer)
    }

    fn tempdir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("qlog-store-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}
