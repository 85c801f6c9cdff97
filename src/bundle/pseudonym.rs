//! Keyed pseudonyms: the tokens (`ip-7f3a9c01d2`) that stand for sensitive values.
//!
//! A token is `PREFIX-HEX`, where HEX is the first [`TOKEN_HEX_LEN`] hex digits of
//! HMAC-SHA-256 under the bundle key of the prefix, a zero byte and the value's canonical
//! form (lower-case host names, one spelling per IP address). So the same value gets the
//! same token wherever it appears in a bundle, whatever order the events come in, and
//! nobody without the key can compute a token from a guessed value or go back from a
//! token to a value. `sos clean`'s sequential `host0`, `host1`, by contrast, depend on
//! processing order, and its plaintext map is all it takes to undo them.
//!
//! The key is random per export unless the operator gives `--key-file`: then bundles made
//! with the same key share tokens and can be linked, which is the point of giving one.
//! The only way back from a token is the map the operator may keep locally
//! (`--map-out`); it never goes into a bundle.
//!
//! 40 bits of token make a collision between two of a bundle's values unlikely (about one
//! in 2,000 for a million distinct values) but not impossible; [`Pseudonyms`] counts
//! collisions and the manifest reports them, so a reader knows when one token may stand
//! for two values.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use regex::bytes::Regex;
use sha2::Sha256;

/// Why a readable key file matters.
const GUESSES: &str = "with it, anyone can test a guessed value against a bundle's tokens";

/// Hex digits of HMAC output in a token: 40 bits.
pub const TOKEN_HEX_LEN: usize = 10;

/// Bytes of key material; a key file holds exactly this many bytes, or twice as many hex
/// digits.
pub const KEY_LEN: usize = 32;

/// The secret the tokens are computed under. Its bytes are never printed.
#[derive(Clone)]
pub struct PseudonymKey {
    bytes: [u8; KEY_LEN],
    /// True if and only if the key came from `--key-file`.
    pub from_file: bool,
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PseudonymKey({})", self.id())
    }
}

impl PseudonymKey {
    /// A fresh key from the operating system's random source.
    pub fn random() -> anyhow::Result<PseudonymKey> {
        let mut bytes = [0; KEY_LEN];
        getrandom::fill(&mut bytes)
            .map_err(|e| anyhow::anyhow!("cannot get random bytes for the bundle key: {e}"))?;
        Ok(PseudonymKey { bytes, from_file: false })
    }

    /// Reads a key file: 32 raw bytes, or 64 hex digits with optional surrounding
    /// whitespace. Warns when others may read it, since the key undoes nothing alone but
    /// lets anyone test a guess.
    pub fn from_file(path: &Path) -> anyhow::Result<PseudonymKey> {
        let hint = "(make one with: head -c 32 /dev/urandom > FILE; chmod 600 FILE)";
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the key file {} {hint}", path.display()))?;
        let mode = file.metadata().map(|m| m.mode()).unwrap_or(0);
        if mode & 0o077 != 0 {
            eprintln!(
                "qlog: warning: others can read the key file {} (chmod 600 it): {GUESSES}",
                path.display()
            );
        }
        let mut content = Vec::new();
        file.by_ref()
            .take(4 * KEY_LEN as u64 + 1)
            .read_to_end(&mut content)
            .with_context(|| format!("cannot read the key file {}", path.display()))?;
        let bytes = match key_from_content(&content) {
            Some(bytes) => bytes,
            None => bail!(
                "the key file {} must hold exactly {KEY_LEN} bytes or {} hex digits {hint}",
                path.display(),
                2 * KEY_LEN
            ),
        };
        Ok(PseudonymKey { bytes, from_file: true })
    }

    #[cfg(test)]
    pub fn fixed(byte: u8) -> PseudonymKey {
        PseudonymKey { bytes: [byte; KEY_LEN], from_file: true }
    }

    /// A short public name of the key: bundles that show the same id share tokens.
    pub fn id(&self) -> String {
        let mut mac = self.mac();
        mac.update(b"qlog bundle key id");
        hex(&mac.finalize().into_bytes()[..8])
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.bytes).expect("HMAC takes keys of any length")
    }
}

fn key_from_content(content: &[u8]) -> Option<[u8; KEY_LEN]> {
    if content.len() == KEY_LEN {
        return content.try_into().ok();
    }
    let text = std::str::from_utf8(content).ok()?.trim();
    if text.len() != 2 * KEY_LEN {
        return None;
    }
    let mut bytes = [0; KEY_LEN];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What one token stands for, as the operator's map records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// The rule that produced the token first.
    pub rule: String,
    pub value: Vec<u8>,
}

/// Computes tokens and remembers which value each stands for.
///
/// The map is kept in memory for the whole export (it counts distinct values per rule,
/// finds collisions and feeds `--map-out`), so memory grows with the number of distinct
/// sensitive values, not with the number of events.
pub struct Pseudonyms {
    keyed: Hmac<Sha256>,
    map: HashMap<String, MapEntry>,
    collisions: u64,
}

impl Pseudonyms {
    pub fn new(key: &PseudonymKey) -> Pseudonyms {
        Pseudonyms { keyed: key.mac(), map: HashMap::new(), collisions: 0 }
    }

    /// The token for `canonical` under `prefix`; pure, records nothing.
    pub fn token(&self, prefix: &str, canonical: &[u8]) -> String {
        let mut mac = self.keyed.clone();
        mac.update(prefix.as_bytes());
        mac.update(&[0]);
        mac.update(canonical);
        let digest = mac.finalize().into_bytes();
        let mut token = String::with_capacity(prefix.len() + 1 + TOKEN_HEX_LEN);
        token.push_str(prefix);
        token.push('-');
        token.push_str(&hex(&digest[..TOKEN_HEX_LEN / 2]));
        token
    }

    /// Records that `token` stands for `canonical`, under the rule `rule` names (asked
    /// only for a new token); true if and only if the token is new.
    pub fn record(&mut self, token: &str, rule: impl FnOnce() -> String, canonical: &[u8]) -> bool {
        match self.map.get(token) {
            Some(entry) => {
                if entry.value != canonical {
                    self.collisions += 1;
                }
                false
            }
            None => {
                let entry = MapEntry { rule: rule(), value: canonical.to_vec() };
                self.map.insert(token.to_owned(), entry);
                true
            }
        }
    }

    /// How many times two different values got the same token.
    pub fn collisions(&self) -> u64 {
        self.collisions
    }

    pub fn map(&self) -> &HashMap<String, MapEntry> {
        &self.map
    }
}

/// A regex that finds tokens with any of `prefixes`, to leave them alone: a token in the
/// input is no secret, and one in the output is the redaction's own work.
pub fn token_regex<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Regex {
    let mut prefixes: Vec<&str> = prefixes.into_iter().collect();
    prefixes.sort_unstable_by_key(|p| std::cmp::Reverse(p.len()));
    prefixes.dedup();
    let alternatives: Vec<String> = prefixes.iter().map(|p| regex::escape(p)).collect();
    Regex::new(&format!(r"(?-u)\b(?:{})-[0-9a-f]{{{TOKEN_HEX_LEN}}}\b", alternatives.join("|")))
        .expect("prefixes are validated to be lower-case words")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_per_key_and_differ_between_keys() {
        let a = Pseudonyms::new(&PseudonymKey::fixed(1));
        let b = Pseudonyms::new(&PseudonymKey::fixed(2));
        let t = a.token("ip", b"10.0.0.1");
        assert_eq!(t, a.token("ip", b"10.0.0.1"));
        assert_ne!(t, b.token("ip", b"10.0.0.1"));
        assert_ne!(t, a.token("ip", b"10.0.0.2"));
        assert!(t.starts_with("ip-") && t.len() == 3 + TOKEN_HEX_LEN, "{t}");
    }

    #[test]
    fn the_prefix_is_part_of_the_mac() {
        let p = Pseudonyms::new(&PseudonymKey::fixed(1));
        assert_ne!(p.token("user", b"alice")[5..], p.token("kw", b"alice")[3..]);
    }

    #[test]
    fn random_keys_differ() {
        let a = PseudonymKey::random().unwrap();
        let b = PseudonymKey::random().unwrap();
        assert_ne!(a.id(), b.id());
        assert!(!format!("{a:?}").contains(&hex(&a.bytes)));
    }

    #[test]
    fn key_files_hold_raw_bytes_or_hex() {
        assert_eq!(key_from_content(&[7; 32]), Some([7; 32]));
        let hex_key = format!("{}\n", "ab".repeat(32));
        assert_eq!(key_from_content(hex_key.as_bytes()), Some([0xab; 32]));
        assert_eq!(key_from_content(b"short"), None);
        assert_eq!(key_from_content("zz".repeat(32).as_bytes()), None);
    }

    #[test]
    fn collisions_are_counted_not_hidden() {
        let mut p = Pseudonyms::new(&PseudonymKey::fixed(1));
        let ipv4 = || "ipv4".to_owned();
        assert!(p.record("ip-0000000000", ipv4, b"10.0.0.1"));
        assert!(!p.record("ip-0000000000", ipv4, b"10.0.0.1"));
        assert_eq!(p.collisions(), 0);
        p.record("ip-0000000000", ipv4, b"10.0.0.2");
        assert_eq!(p.collisions(), 1);
    }

    #[test]
    fn token_regex_finds_whole_tokens_only() {
        let re = token_regex(["ip", "host"]);
        assert!(re.is_match(b"to ip-0123456789."));
        assert!(re.is_match(b"(host-0123456789)"));
        assert!(!re.is_match(b"ip-0123456789a"));
        assert!(!re.is_match(b"zip-0123456789"));
    }
}
