//! The durable store: the only module that touches sled.
//!
//! Everything lives in one sled tree so that one commit is one atomic `apply_batch`:
//!
//! | key | value |
//! |---|---|
//! | `E` vm `\0` first_usec(u64 BE) batch_id(u64 BE) | a compressed batch of records |
//! | `S` vm `\0` stream | [`StreamState`] as JSON |
//! | `V` vm | [`VmState`] as JSON |
//! | `M` name | store metadata |
//!
//! Batch keys sort by (VM, receive time, batch id), so one VM's time range is one range
//! scan, and its oldest events are at the front of its range. A batch holds the records of
//! one VM from one commit cycle, in receive-time order; the committer stamps receive times
//! so that a VM's batches never overlap in time.
//!
//! A batch value is a 25-byte header (version, record count, first and last receive time,
//! uncompressed length) and a zstd frame of [`Record`]s in their wire encoding. The header
//! lets scans skip a batch by time and account for evicted events without decompressing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use qlog_rpc::query::Record;
use qlog_rpc::Limits;
use serde::{Deserialize, Serialize};
use thiserror::Error;

const BATCH_VERSION: u8 = 1;
const BATCH_HEADER_LEN: usize = 25;
/// Largest uncompressed batch we agree to inflate, so a corrupted header cannot make a
/// query allocate without bound.
const MAX_BATCH_RAW_LEN: u32 = 256 * 1024 * 1024;
/// zstd level 3 is the library default: on log text it keeps well ahead of sled's write
/// speed on one core while shrinking typical journald entries several-fold.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store at {path} is in use by another qlogd (pid {pid}); stop it or pick another --state-dir")]
    Locked { path: PathBuf, pid: String },
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("sled error in {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("stored batch {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// What the sink remembers about one (VM, stream) between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// Highest sequence number stored: the resume point.
    pub last_seq: u64,
    /// `__CURSOR` of the event stored at `last_seq`, if it had one.
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
    /// Key and value bytes of this VM's batches: what its quota counts.
    pub bytes_stored: u64,
    pub events_dropped_quota: u64,
    pub events_expired: u64,
    pub frames_rejected: u64,
    pub fields_quarantined: u64,
}

/// One stored batch as a scan sees it.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    pub key: Vec<u8>,
    pub count: u32,
    pub first_usec: u64,
    pub last_usec: u64,
    /// Bytes this batch counts against its VM's quota.
    pub stored_len: u64,
}

/// Everything one commit cycle writes, applied atomically.
#[derive(Debug, Clone, Default)]
pub struct CommitSet {
    /// New batches as encoded by [`Store::encode_batch`].
    pub batches: Vec<(Vec<u8>, Vec<u8>)>,
    pub streams: Vec<((String, String), StreamState)>,
    pub vms: Vec<(String, VmState)>,
    pub deletes: Vec<Vec<u8>>,
    pub next_batch_id: u64,
}

/// The sled database plus the lock file that keeps a second qlogd away.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
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
        let path = state_dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            // We flush ourselves after every commit cycle, before acking; a background
            // flush would only add writes.
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| StoreError::Sled { path: path.clone(), source })?;
        Ok(Store { db, path, _lock: std::sync::Arc::new(lock) })
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled { path: self.path.clone(), source }
    }

    pub fn next_batch_id(&self) -> Result<u64, StoreError> {
        let v = self.db.get(b"Mnext_batch_id").map_err(|e| self.sled_err(e))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(1, u64::from_be_bytes))
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

    /// Encodes a batch and returns its key, value and the bytes it counts against quota.
    pub fn encode_batch(vm: &str, batch_id: u64, records: &[Record]) -> (Vec<u8>, Vec<u8>) {
        let first = records.first().map_or(0, |r| r.received_usec);
        let last = records.last().map_or(0, |r| r.received_usec);
        let mut raw = Vec::with_capacity(records.len() * 256);
        for r in records {
            r.encode(&mut raw);
        }
        let compressed = zstd::bulk::compress(&raw, ZSTD_LEVEL)
            .expect("zstd compression into a growable buffer cannot fail");
        let mut value = Vec::with_capacity(BATCH_HEADER_LEN + compressed.len());
        value.push(BATCH_VERSION);
        let count = u32::try_from(records.len()).expect("a commit cycle is far below 4G records");
        value.extend_from_slice(&count.to_be_bytes());
        value.extend_from_slice(&first.to_be_bytes());
        value.extend_from_slice(&last.to_be_bytes());
        let raw_len = u32::try_from(raw.len()).expect("a commit cycle is far below 4 GiB");
        value.extend_from_slice(&raw_len.to_be_bytes());
        value.extend_from_slice(&compressed);
        (batch_key(vm, first, batch_id), value)
    }

    /// Applies one commit cycle atomically and makes it durable before returning.
    ///
    pub fn commit(&self, set: &CommitSet) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in &set.batches {
            batch.insert(key.as_slice(), value.as_slice());
        }
        for ((vm, stream), state) in &set.streams {
            let json = serde_json::to_vec(state).expect("stream state serialises");
            batch.insert(stream_key(vm, stream), json);
        }
        for (vm, state) in &set.vms {
            let json = serde_json::to_vec(state).expect("vm state serialises");
            batch.insert(vm_key(vm), json);
        }
        for key in &set.deletes {
            batch.remove(key.as_slice());
        }
        batch.insert(b"Mnext_batch_id".as_slice(), &set.next_batch_id.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.db.flush().map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    /// The stored length a batch of this encoded size counts against quota.
    pub fn stored_len(key: &[u8], value: &[u8]) -> u64 {
        (key.len() + value.len()) as u64
    }

    /// Iterates one VM's batches from oldest to newest, headers only.
    pub fn batches(&self, vm: &str) -> impl Iterator<Item = Result<BatchInfo, StoreError>> + '_ {
        self.db.scan_prefix(batch_prefix(vm)).map(move |item| {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            batch_info(&k, &v)
        })
    }

    /// Iterates one VM's batches that may hold records in `[since, until]`, decoded.
    /// Forward is oldest first; `reverse` is newest first.
    pub fn scan(
        &self,
        vm: &str,
        since: Option<u64>,
        until: Option<u64>,
        reverse: bool,
    ) -> Box<dyn Iterator<Item = Result<(BatchInfo, sled::IVec), StoreError>> + Send + '_> {
        let prefix = batch_prefix(vm);
        let start = match since {
            // A batch that starts before `since` may still end after it: begin at the last
            // batch that starts at or before `since`.
            Some(since) => {
                let probe = batch_key(vm, since, u64::MAX);
                match self.db.range(prefix.clone()..=probe.clone()).next_back() {
                    Some(Ok((k, _))) => k.to_vec(),
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
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(self.sled_err(e))),
            };
            let info = match batch_info(&k, &v) {
                Ok(info) => info,
                Err(e) => return Some(Err(e)),
            };
            let before = since.is_some_and(|s| info.last_usec < s);
            let after = until.is_some_and(|u| info.first_usec > u);
            if before || after {
                return None;
            }
            Some(Ok((info, v)))
        }))
    }

    /// Total bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Decompresses a batch value into its records, in receive-time order.
pub fn decode_batch(key: &[u8], value: &[u8]) -> Result<Vec<Record>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: hex(key), reason };
    let info = batch_info(key, value)?;
    let raw_len = u32::from_be_bytes(value[21..25].try_into().expect("header checked"));
    if raw_len > MAX_BATCH_RAW_LEN {
        return Err(corrupt(format!("claims {raw_len} uncompressed bytes")));
    }
    let raw = zstd::bulk::decompress(&value[BATCH_HEADER_LEN..], raw_len as usize)
        .map_err(|e| corrupt(format!("zstd: {e}")))?;
    // Stored records were validated on ingest; the limits here only guard against a
    // damaged store, so they are generous.
    let limits = Limits { max_fields: u32::MAX, max_value_len: u32::MAX, ..Limits::DEFAULT };
    let mut records = Vec::with_capacity(info.count as usize);
    let mut pos = 0;
    while pos < raw.len() {
        let (rec, used) =
            Record::decode(&raw[pos..], &limits).map_err(|e| corrupt(format!("record: {e}")))?;
        records.push(rec);
        pos += used;
    }
    if records.len() != info.count as usize {
        return Err(corrupt(format!(
            "header says {} records, found {}",
            info.count,
            records.len()
        )));
    }
    Ok(records)
}

fn batch_info(key: &[u8], value: &[u8]) -> Result<BatchInfo, StoreError> {
    if value.len() < BATCH_HEADER_LEN || value[0] != BATCH_VERSION {
        return Err(StoreError::Corrupt { key: hex(key), reason: "bad batch header".into() });
    }
    let u64_at = |at: usize| u64::from_be_bytes(value[at..at + 8].try_into().expect("in header"));
    Ok(BatchInfo {
        key: key.to_vec(),
        count: u32::from_be_bytes(value[1..5].try_into().expect("in header")),
        first_usec: u64_at(5),
        last_usec: u64_at(13),
        stored_len: Store::stored_len(key, value),
    })
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

    fn commit_batches(store: &Store, batches: Vec<(String, u64, Vec<Record>)>) {
        let next = batches.iter().map(|b| b.1).max().unwrap_or(0) + 1;
        let batches = batches.iter().map(|(vm, id, r)| Store::encode_batch(vm, *id, r)).collect();
        store.commit(&CommitSet { batches, next_batch_id: next, ..Default::default() }).unwrap();
    }

    #[test]
    fn batches_round_trip_and_scan_by_vm_and_time() {
        let dir = tempdir();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        commit_batches(
            &store,
            vec![
                ("a".into(), 1, (0..10).map(|i| record("a", 100 + i, i + 1)).collect()),
                ("a".into(), 2, (10..20).map(|i| record("a", 100 + i, i + 1)).collect()),
                ("ab".into(), 3, vec![record("ab", 105, 1)]),
            ],
        );
        let seqs = |since, until, reverse| -> Vec<u64> {
            store
                .scan("a", since, until, reverse)
                .flat_map(|b| {
                    let (info, v) = b.unwrap();
                    decode_batch(&info.key, &v).unwrap()
                })
                .filter(|r| since.is_none_or(|s| r.received_usec >= s))
                .map(|r| r.seq)
                .collect()
        };
        assert_eq!(seqs(None, None, false), (1..=20).collect::<Vec<_>>());
        assert_eq!(seqs(Some(115), None, false), (16..=20).collect::<Vec<_>>());
        assert_eq!(
            seqs(Some(105), Some(108), false),
            (1..=10).filter(|s| *s >= 6).collect::<Vec<_>>()
        );
        // Reverse scans reverse the batch order; records inside a batch stay oldest first.
        assert_eq!(seqs(None, None, true)[..10], (11..=20).collect::<Vec<_>>()[..]);
        assert_eq!(store.batches("ab").count(), 1, "vm names that share a prefix stay apart");
        assert_eq!(store.next_batch_id().unwrap(), 4);
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
        let (key, mut value) = Store::encode_batch("a", 1, &[record("a", 1, 1)]);
        assert!(decode_batch(&key, &value).is_ok());
        let last = value.len() - 1;
        value[last] ^= 0xff;
        assert!(decode_batch(&key, &value).is_err());
        assert!(decode_batch(&key, &value[..10]).is_err());
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
    fn tempdir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("qlog-store-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}
