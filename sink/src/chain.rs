//! The per-VM hash chain over stored batches: how a link is computed, how a VM's chain
//! state is encoded, and the verification walk. Owns the chain's rules; reads the store
//! only through [`Store`]'s methods, and leaves writing links to
//! [`crate::store::StoreWriter`], which extends the chain inside each commit.
//!
//! See the store's module docs ("The hash chain") for the layout and for how trimming
//! moves the chain's anchor.
//!
//! Verification runs beside the committer, which keeps committing and trimming while a
//! walk reads. sled applies each commit atomically, but a walk is many reads, so it
//! allows for two races: batches committed after it read the chain state (positions past
//! the head it knows: it re-reads the state, and only a batch still past the head is a
//! break) and batches trimmed while it walks (any break is checked against a fresh state:
//! if the anchor moved, the walk restarts from it and skips what was trimmed). And since
//! a sled iterator does not see what is committed into a node it has already read, a
//! walk that ends short of the newest head reads on from past its last key. Memory is
//! one batch at a time.
//!
//! FIXME(verify priority): a walk hashes as fast as the disk allows on a blocking thread,
//! competing with the committer for one of the log qube's two cores; throttle it (or
//! lower the thread's priority) if verifying a big store during a flood slows acks.

use qlog_rpc::query::{BreakKind, ChainBreak, VmChain};
use sha2::{Digest, Sha256};

use crate::store::{BatchInfo, Store, StoreError};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The genesis: the "previous link" of a VM's first batch, and its anchor until a trim.
pub const GENESIS: Hash = [0; 32];

/// Domain separation for the link hash, so a link can never be mistaken for any other
/// SHA-256 the project computes (bundle file hashes, pseudonyms).
const LINK_DOMAIN: &[u8] = b"qlog-chain-v1\0";

/// Most times a walk reads on past its last key for batches committed meanwhile; each
/// round needs a commit to have happened during the one before.
const MAX_ROUNDS: usize = 64;

/// `C` vm values: version, head, anchor, trimmed, end.
pub const CHAIN_STATE_LEN: usize = 1 + 32 + 32 + 8 + 8;
const CHAIN_STATE_VERSION: u8 = 1;

/// A batch's place in its VM's chain, as its index entry records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLink {
    /// The VM's chained batches before this one, trimmed ones included.
    pub position: u64,
    /// SHA-256 of the batch's stored bytes (header and compressed records).
    pub content: Hash,
    pub link: Hash,
}

/// One VM's chain, kept in step with its batches in the same atomic commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainState {
    /// Link of the newest stored batch; the anchor when none is stored.
    pub head: Hash,
    /// Link of the newest trimmed batch; [`GENESIS`] before the first trim.
    pub anchor: Hash,
    /// Position of the oldest batch still stored (= chained batches trimmed).
    pub trimmed: u64,
    /// Position the next batch gets (= chained batches ever stored).
    pub end: u64,
}

impl ChainState {
    pub fn encode(&self) -> [u8; CHAIN_STATE_LEN] {
        let mut v = [0u8; CHAIN_STATE_LEN];
        v[0] = CHAIN_STATE_VERSION;
        v[1..33].copy_from_slice(&self.head);
        v[33..65].copy_from_slice(&self.anchor);
        v[65..73].copy_from_slice(&self.trimmed.to_be_bytes());
        v[73..81].copy_from_slice(&self.end.to_be_bytes());
        v
    }

    /// `None` if the value is not a chain state this version wrote.
    pub fn decode(v: &[u8]) -> Option<ChainState> {
        if v.len() != CHAIN_STATE_LEN || v[0] != CHAIN_STATE_VERSION {
            return None;
        }
        let u64_at = |at: usize| u64::from_be_bytes(v[at..at + 8].try_into().expect("in value"));
        Some(ChainState {
            head: v[1..33].try_into().expect("in value"),
            anchor: v[33..65].try_into().expect("in value"),
            trimmed: u64_at(65),
            end: u64_at(73),
        })
    }

    /// Extends the chain by one batch; returns the batch's link record.
    pub fn append(&mut self, vm: &str, info: &BatchInfo, content: Hash) -> ChainLink {
        let position = self.end;
        let link = link(&self.head, vm, info, position, &content);
        self.head = link;
        self.end += 1;
        ChainLink { position, content, link }
    }

    /// Records that the batch holding `trimmed` was removed. Trims may be applied in any
    /// order: the anchor is the link of the newest batch removed.
    pub fn trim(&mut self, trimmed: &ChainLink) {
        if trimmed.position >= self.trimmed {
            self.trimmed = trimmed.position + 1;
            self.anchor = trimmed.link;
        }
    }
}

/// SHA-256 of a batch's stored bytes.
pub fn content_hash(stored: &[u8]) -> Hash {
    Sha256::digest(stored).into()
}

/// The link of the batch `info` at `position` of `vm`'s chain, after `prev`.
pub fn link(prev: &Hash, vm: &str, info: &BatchInfo, position: u64, content: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(LINK_DOMAIN);
    h.update(prev);
    h.update((vm.len() as u32).to_be_bytes());
    h.update(vm.as_bytes());
    h.update(info.batch_id().to_be_bytes());
    h.update(position.to_be_bytes());
    h.update(info.first_usec.to_be_bytes());
    h.update(info.last_usec.to_be_bytes());
    h.update(info.count.to_be_bytes());
    h.update(info.len.to_be_bytes());
    h.update(content);
    h.finalize().into()
}

pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash 64 hex digits spell; `None` if they do not.
pub fn parse_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What a VM's chain says without reading a batch: its recorded head and anchor.
pub fn head(store: &Store, vm: &str) -> Result<VmChain, StoreError> {
    let state = store.chain_state(vm)?.unwrap_or_default();
    Ok(VmChain {
        vm: vm.to_owned(),
        walked: false,
        trimmed: state.trimmed,
        length: state.end,
        head: hex(&state.head),
        anchor: hex(&state.anchor),
        ..VmChain::default()
    })
}

/// `qlogd verify`: opens the store in `state_dir` (failing if a qlogd holds it) without
/// repairing anything, and walks the chains of `vms`, or of every VM with one.
pub fn verify_offline(
    state_dir: &std::path::Path,
    vms: &[String],
    cache_bytes: u64,
) -> anyhow::Result<qlog_rpc::query::VerifyReply> {
    use anyhow::Context;
    if !state_dir.join("index").is_dir() {
        anyhow::bail!("{} holds no qlog store (no index directory)", state_dir.display());
    }
    let store = Store::open(state_dir, cache_bytes)
        .context("cannot open the store (while qlogd runs, use qlog verify instead)")?;
    let known = store.chain_vms()?;
    if let Some(unknown) = vms.iter().find(|vm| !known.contains(vm)) {
        anyhow::bail!("no VM {unknown:?} in the store; it has {}", known.join(", "));
    }
    let mut vms = if vms.is_empty() { known } else { vms.to_vec() };
    vms.sort();
    vms.dedup();
    let vms = vms.iter().map(|vm| verify(&store, vm, &[])).collect::<Result<Vec<_>, _>>()?;
    Ok(qlog_rpc::query::VerifyReply { vms })
}

/// Walks `vm`'s stored batches oldest first, recomputing every content hash and link
/// from the anchor, and reports the first break (and how many there were).
///
/// `expect` holds (position, link) pairs recorded earlier that the chain must still
/// have; each is matched, reported as a break, or counted as unchecked (trimmed since).
///
/// Only an error reading sled is an `Err`; whatever the store holds is a report.
pub fn verify(store: &Store, vm: &str, expect: &[(u64, Hash)]) -> Result<VmChain, StoreError> {
    let since = store.chain_since()?;
    let recorded = store.chain_state(vm)?;
    let mut walk = Walk {
        vm,
        store,
        since,
        has_state: recorded.is_some(),
        state: recorded.unwrap_or_default(),
        link: GENESIS,
        next: 0,
        raced: false,
        seen_chained: false,
        expect: expect.iter().map(|&(position, link)| (position, link, false)).collect(),
        report: VmChain { vm: vm.to_owned(), walked: true, ..VmChain::default() },
    };
    walk.link = walk.state.anchor;
    walk.next = walk.state.trimmed;
    // An expected link at the anchor's position is the anchor.
    if let Some(anchor_position) = walk.state.trimmed.checked_sub(1) {
        let anchor = walk.state.anchor;
        walk.expected(None, anchor_position, &anchor);
    }

    // sled's iterators read a leaf node once, so a batch committed into a node the scan
    // has already read is not seen: while the newest state says more batches exist, the
    // walk reads on from past the last key it saw.
    let mut last_key: Option<Vec<u8>> = None;
    let first_trimmed = walk.state.trimmed;
    for _round in 0..MAX_ROUNDS {
        let mut progressed = false;
        for item in store.index_after(vm, last_key.as_deref()) {
            let (key, info) = item?;
            last_key = Some(key);
            progressed = true;
            match info {
                Ok(info) => walk.entry(&info)?,
                Err(StoreError::Corrupt { key, reason }) => {
                    let detail = format!("index entry {key} does not decode: {reason}");
                    walk.record(BreakKind::CorruptEntry, None, detail);
                }
                Err(e) => return Err(e),
            }
        }
        let before = walk.state;
        walk.refresh()?;
        // Trimmed past where the walk got: what it did not reach is gone, legitimately.
        if walk.state.trimmed > walk.next && walk.state.trimmed > first_trimmed {
            walk.raced = true;
            walk.link = walk.state.anchor;
            walk.next = walk.state.trimmed;
        }
        if walk.next >= walk.state.end || (!progressed && walk.state == before) {
            break;
        }
    }
    walk.finish()?;
    // Nothing at all is left of the VM's batches and chain: only its accounting can say
    // something was there.
    if !walk.has_state && last_key.is_none() {
        let stored = store.load_vms()?.get(vm).map_or(0, |v| v.events_stored);
        if stored > 0 {
            let detail = format!(
                "the VM's accounting says {stored} records are stored, but it has no batches and no chain state"
            );
            walk.record(BreakKind::MissingChainState, None, detail);
        }
    }
    Ok(walk.report)
}

struct Walk<'a> {
    vm: &'a str,
    store: &'a Store,
    /// The first batch id the store wrote with a link.
    since: u64,
    /// True if and only if the store holds a chain state for the VM.
    has_state: bool,
    /// The newest chain state read.
    state: ChainState,
    /// The link and position the next entry must continue.
    link: Hash,
    next: u64,
    /// True once a trim was seen to happen during the walk: entries older than the
    /// fresh anchor are then trimmed ones the scan had already reached, not breaks.
    raced: bool,
    /// True once a chained entry was seen: unchained entries are only accepted before.
    seen_chained: bool,
    /// Links recorded earlier: (position, link, true once checked).
    expect: Vec<(u64, Hash, bool)>,
    report: VmChain,
}

impl Walk<'_> {
    fn entry(&mut self, info: &BatchInfo) -> Result<(), StoreError> {
        let Some(chain) = info.chain else {
            if info.batch_id() < self.since && !self.seen_chained {
                self.report.unchained += 1;
            } else {
                let detail = "index entry has no chain link, but the chain had started".into();
                self.record(BreakKind::UnlinkedEntry, Some(info.batch_id()), detail);
            }
            return Ok(());
        };
        self.seen_chained = true;
        if self.raced && chain.position < self.state.trimmed {
            return Ok(());
        }
        if chain.position >= self.state.end {
            // Committed after the state was read, or added behind the sink's back.
            self.refresh()?;
            if !self.has_state {
                let detail = "the VM has chained batches but no chain state".into();
                self.record(BreakKind::MissingChainState, Some(info.batch_id()), detail);
                self.resync(&chain);
                return Ok(());
            }
            if chain.position >= self.state.end {
                let detail = format!(
                    "batch at chain position {} is past the recorded head at position {}",
                    chain.position,
                    self.state.end.saturating_sub(1)
                );
                self.record(BreakKind::BeyondHead, Some(info.batch_id()), detail);
                self.resync(&chain);
                return Ok(());
            }
        }
        let outcome = match self.check(info, &chain)? {
            Ok(()) => Ok(()),
            // A trim may have raced the walk: start again from the newest anchor.
            Err(first) => {
                let trimmed_before = self.state.trimmed;
                self.refresh()?;
                if self.state.trimmed > trimmed_before {
                    self.raced = true;
                    self.link = self.state.anchor;
                    self.next = self.state.trimmed;
                    if chain.position < self.state.trimmed {
                        return Ok(());
                    }
                    self.check(info, &chain)?
                } else {
                    Err(first)
                }
            }
        };
        match outcome {
            Ok(()) => {
                self.report.batches_checked += 1;
                self.link = chain.link;
                self.next = chain.position + 1;
                self.expected(Some(info.batch_id()), chain.position, &chain.link);
            }
            Err((kind, detail)) => {
                self.record(kind, Some(info.batch_id()), detail);
                self.resync(&chain);
            }
        }
        Ok(())
    }

    /// Checks one chained entry against the walk so far.
    fn check(
        &self,
        info: &BatchInfo,
        chain: &ChainLink,
    ) -> Result<Result<(), (BreakKind, String)>, StoreError> {
        if chain.position > self.next {
            let missing = chain.position - self.next;
            let detail = format!(
                "index entry says chain position {}, expected {}: {missing} batch(es) before it are missing",
                chain.position, self.next
            );
            return Ok(Err((BreakKind::MissingBatch, detail)));
        }
        if chain.position < self.next {
            let detail = format!(
                "index entry says chain position {}, expected {}: batches are out of order or repeated",
                chain.position, self.next
            );
            return Ok(Err((BreakKind::OutOfOrder, detail)));
        }
        let stored = match self.store.read_stored(self.vm, info) {
            Ok(stored) => stored,
            Err(StoreError::Read { path, source }) => {
                let detail = format!(
                    "cannot read {} bytes at offset {} of {}: {source}",
                    info.len,
                    info.offset,
                    path.display()
                );
                return Ok(Err((BreakKind::MissingBytes, detail)));
            }
            Err(e) => return Err(e),
        };
        let content = content_hash(&stored);
        if content != chain.content {
            let detail = format!(
                "stored bytes hash to {}, the index entry recorded {}",
                hex(&content),
                hex(&chain.content)
            );
            return Ok(Err((BreakKind::ContentMismatch, detail)));
        }
        let recomputed = link(&self.link, self.vm, info, chain.position, &chain.content);
        if recomputed != chain.link {
            let detail = format!(
                "link recomputed from the previous link and the entry is {}, the entry recorded {}",
                hex(&recomputed),
                hex(&chain.link)
            );
            return Ok(Err((BreakKind::LinkMismatch, detail)));
        }
        Ok(Ok(()))
    }

    /// Checks the expected links at `position` against the link the chain has there.
    fn expected(&mut self, batch_id: Option<u64>, position: u64, link: &Hash) {
        let mut mismatched = Vec::new();
        for (at, expected, checked) in &mut self.expect {
            if *at == position && !*checked {
                *checked = true;
                if expected == link {
                    self.report.expected_matched += 1;
                } else {
                    mismatched.push(*expected);
                }
            }
        }
        for expected in mismatched {
            let detail = format!(
                "chain position {position} was recorded with link {}, it now has {}: the chain was rewritten from there on",
                hex(&expected),
                hex(link)
            );
            let next = std::mem::replace(&mut self.next, position);
            self.record(BreakKind::ExpectedLinkMismatch, batch_id, detail);
            self.next = next;
        }
    }

    /// Re-reads the chain state; a state that vanished keeps the last one seen.
    fn refresh(&mut self) -> Result<(), StoreError> {
        if let Some(state) = self.store.chain_state(self.vm)? {
            self.state = state;
            self.has_state = true;
        }
        Ok(())
    }

    /// Continues after a break from the entry's own link, so later breaks count apart.
    fn resync(&mut self, chain: &ChainLink) {
        self.link = chain.link;
        self.next = chain.position + 1;
    }

    fn record(&mut self, kind: BreakKind, batch_id: Option<u64>, detail: String) {
        self.report.broken_links += 1;
        if self.report.first_break.is_none() {
            self.report.first_break =
                Some(ChainBreak { kind, batch_id, position: self.next, detail });
        }
    }

    /// The walk must end at the newest recorded head.
    fn finish(&mut self) -> Result<(), StoreError> {
        if self.next != self.state.end || self.link != self.state.head {
            if self.next < self.state.end {
                let detail = format!(
                    "the recorded head is at chain position {}, but the walk ended before position {}: the newest {} batch(es) are missing",
                    self.state.end - 1,
                    self.next,
                    self.state.end - self.next
                );
                self.record(BreakKind::HeadMismatch, None, detail);
            } else if self.next == self.state.end {
                let detail = format!(
                    "the newest stored batch's link is {}, the recorded head is {}",
                    hex(&self.link),
                    hex(&self.state.head)
                );
                self.record(BreakKind::HeadMismatch, None, detail);
            }
        }
        // Expected links past the head: the newest batches went, and the head with them.
        let end = self.state.end;
        let mut past_head = Vec::new();
        for (position, link, checked) in &mut self.expect {
            if !*checked && *position >= end {
                *checked = true;
                past_head.push((*position, *link));
            } else if !*checked {
                self.report.expected_unchecked += 1;
            }
        }
        for (position, link) in past_head {
            let detail = format!(
                "chain position {position} was recorded with link {}, but the chain now ends at position {}: its newest batches were removed and the head rolled back",
                hex(&link),
                end as i128 - 1
            );
            let next = std::mem::replace(&mut self.next, position);
            self.record(BreakKind::ExpectedLinkMismatch, None, detail);
            self.next = next;
        }
        self.report.trimmed = self.state.trimmed;
        self.report.length = self.state.end;
        self.report.head = hex(&self.state.head);
        self.report.anchor = hex(&self.state.anchor);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(batch_id: u64, first: u64, last: u64) -> BatchInfo {
        let mut key = b"Evm\0".to_vec();
        key.extend_from_slice(&first.to_be_bytes());
        key.extend_from_slice(&batch_id.to_be_bytes());
        BatchInfo {
            key,
            segment: 1,
            offset: 0,
            len: 100,
            count: 3,
            first_usec: first,
            last_usec: last,
            chain: None,
        }
    }

    #[test]
    fn a_link_covers_every_input() {
        let base = info(7, 10, 20);
        let content = content_hash(b"batch");
        let l = link(&GENESIS, "vm", &base, 0, &content);
        assert_eq!(l, link(&GENESIS, "vm", &base, 0, &content), "deterministic");
        let mut other_prev = GENESIS;
        other_prev[31] = 1;
        assert_ne!(l, link(&other_prev, "vm", &base, 0, &content));
        assert_ne!(l, link(&GENESIS, "vn", &base, 0, &content));
        assert_ne!(l, link(&GENESIS, "vm", &info(8, 10, 20), 0, &content));
        assert_ne!(l, link(&GENESIS, "vm", &base, 1, &content));
        assert_ne!(l, link(&GENESIS, "vm", &info(7, 11, 20), 0, &content));
        assert_ne!(l, link(&GENESIS, "vm", &info(7, 10, 21), 0, &content));
        assert_ne!(l, link(&GENESIS, "vm", &BatchInfo { count: 4, ..base.clone() }, 0, &content));
        assert_ne!(l, link(&GENESIS, "vm", &BatchInfo { len: 101, ..base.clone() }, 0, &content));
        assert_ne!(l, link(&GENESIS, "vm", &base, 0, &content_hash(b"batcH")));
        // Where the batch lies is not part of it, so segments could be compacted.
        let moved = BatchInfo { segment: 9, offset: 4096, ..base.clone() };
        assert_eq!(l, link(&GENESIS, "vm", &moved, 0, &content));
    }

    #[test]
    fn a_link_has_a_fixed_value() {
        // Pins the link layout: a change here breaks every existing store's chain.
        let l = link(&GENESIS, "sd-app", &info(1, 2, 3), 0, &content_hash(b""));
        let mut h = Sha256::new();
        h.update(b"qlog-chain-v1\0");
        h.update([0u8; 32]);
        h.update([0, 0, 0, 6]);
        h.update(b"sd-app");
        for n in [1u64, 0, 2, 3] {
            h.update(n.to_be_bytes());
        }
        h.update(3u32.to_be_bytes());
        h.update(100u32.to_be_bytes());
        h.update(Sha256::digest(b""));
        assert_eq!(l, <Hash>::from(h.finalize()));
        assert_eq!(
            hex(&content_hash(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn appending_and_trimming_move_head_and_anchor() {
        let mut st = ChainState::default();
        let a = st.append("vm", &info(1, 1, 1), content_hash(b"a"));
        let b = st.append("vm", &info(2, 2, 2), content_hash(b"b"));
        let c = st.append("vm", &info(3, 3, 3), content_hash(b"c"));
        assert_eq!((a.position, b.position, c.position, st.end), (0, 1, 2, 3));
        assert_eq!(b.link, link(&a.link, "vm", &info(2, 2, 2), 1, &content_hash(b"b")));
        assert_eq!(st.head, c.link);
        // Trims in any order leave the newest removed batch as the anchor.
        st.trim(&b);
        st.trim(&a);
        assert_eq!((st.anchor, st.trimmed), (b.link, 2));
        assert_eq!(ChainState::decode(&st.encode()), Some(st));
        assert_eq!(ChainState::decode(&st.encode()[1..]), None);
    }
}
