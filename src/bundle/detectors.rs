//! The built-in detectors of sensitive values: where in a field value an address, an
//! identifier, a secret or a name sits, and what kind of thing it is. Owns the patterns
//! and the checks that make them precise; what a finding is replaced with (tokens,
//! allowlists, VM names, the user's rules) is [`super::redact`]'s business.
//!
//! Values are bytes, not text: a journald field may hold anything. Every pattern is an
//! ASCII pattern over bytes (`regex::bytes` with Unicode off), so a byte that is not
//! ASCII separates words as punctuation does. No detector matches across whitespace or a
//! newline, which lets a caller scan a file line by line and find exactly what a scan of
//! the whole file would.
//!
//! Each detector leans towards finding too much: a version number that looks like an
//! IPv4 address, or a file name that looks like a host name, is replaced too. The
//! exceptions are values that identify nobody and that support needs to read: loopback
//! and unspecified addresses, and file names directly after a `/`.
//!
//! Detectors run independently and their findings may overlap (an e-mail address holds
//! a host name); [`super::redact`] merges them. A cheap pass over the bytes first
//! ([`Shape`]) decides which detectors can match at all, so the common short value
//! (`PRIORITY=6`) costs no regex search.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use regex::bytes::Regex;

/// A kind of sensitive value the built-in detectors know. The order decides which
/// names the token when two find exactly the same bytes: the more specific first, so a
/// home directory named like an address (`/home/10.0.0.1/`) gets the address's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Detector {
    Url,
    Email,
    Onion,
    ApiToken,
    Uuid,
    PgpFingerprint,
    PgpKeyId,
    Mac,
    Ipv6,
    Ipv4,
    Id128,
    HexSecret,
    Base64Secret,
    HomeUser,
    Hostname,
}

impl Detector {
    /// The rule name in manifests, reports and leak messages.
    pub fn name(self) -> &'static str {
        match self {
            Detector::Url => "url",
            Detector::Email => "email",
            Detector::Onion => "onion",
            Detector::HomeUser => "home-user",
            Detector::ApiToken => "api-token",
            Detector::Uuid => "uuid",
            Detector::PgpFingerprint => "pgp-fingerprint",
            Detector::PgpKeyId => "pgp-key-id",
            Detector::Mac => "mac",
            Detector::Ipv6 => "ipv6",
            Detector::Ipv4 => "ipv4",
            Detector::Id128 => "id-128",
            Detector::HexSecret => "hex-secret",
            Detector::Base64Secret => "base64-secret",
            Detector::Hostname => "hostname",
        }
    }

    /// The prefix of the tokens that replace what this detector finds. Kinds that a
    /// reader wants to tell apart get their own; secrets all look alike on purpose.
    pub fn token_prefix(self) -> &'static str {
        match self {
            Detector::Url => "url",
            Detector::Email => "email",
            Detector::Onion => "onion",
            Detector::HomeUser => "user",
            Detector::ApiToken | Detector::HexSecret | Detector::Base64Secret => "secret",
            Detector::Uuid | Detector::Id128 => "id",
            Detector::PgpFingerprint | Detector::PgpKeyId => "pgp",
            Detector::Mac => "mac",
            Detector::Ipv6 | Detector::Ipv4 => "ip",
            Detector::Hostname => "host",
        }
    }
}

/// One sensitive value found in a field value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The bytes to replace. For [`Detector::HomeUser`] that is the user name alone.
    pub span: Range<usize>,
    pub detector: Detector,
    /// The pieces of a URL, which are replaced piece by piece.
    pub url: Option<UrlParts>,
}

/// Where the pieces of a URL are, as offsets into the same value as the finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    pub scheme: Range<usize>,
    /// `user:password`, without the `@`.
    pub userinfo: Option<Range<usize>>,
    /// The host, with the brackets of an IPv6 literal; may be empty (`file:///`).
    pub host: Range<usize>,
    /// The digits after `:`.
    pub port: Option<Range<usize>>,
    /// Path, query and fragment, from the first `/`, `?` or `#`.
    pub rest: Option<Range<usize>>,
}

/// URL schemes that are kept in clear: common, and saying nothing about anyone. A URL
/// with another scheme is replaced whole.
const KNOWN_SCHEMES: &[&str] = &[
    "file", "ftp", "ftps", "git", "http", "https", "imap", "imaps", "ldap", "ldaps", "rsync",
    "sftp", "smb", "smtp", "smtps", "socks4", "socks5", "socks5h", "ssh", "svn", "tor", "ws",
    "wss",
];

/// Top-level domains beyond the two-letter country codes, which are all accepted. A
/// dotted name whose last label is neither is not a host name (`tor.service`,
/// `sqlalchemy.exc.OperationalError`). Sorted for binary search.
///
/// FIXME: this is the common part of IANA's list, not all of it, so a host under an
/// unlisted generic domain (`.berlin`) passes unless a keyword or pattern catches it;
/// take the whole list in, with a test that keeps `tor.service` out, once a bundle shows
/// one slipping through.
const TLDS: &[&str] = &[
    "academy",
    "agency",
    "app",
    "arpa",
    "art",
    "asia",
    "bank",
    "biz",
    "blog",
    "box",
    "cafe",
    "cat",
    "center",
    "chat",
    "cloud",
    "club",
    "codes",
    "com",
    "company",
    "consulting",
    "coop",
    "corp",
    "design",
    "dev",
    "digital",
    "edu",
    "email",
    "energy",
    "engineering",
    "expert",
    "foundation",
    "fun",
    "global",
    "gov",
    "group",
    "guru",
    "home",
    "host",
    "hosting",
    "i2p",
    "icu",
    "info",
    "int",
    "internal",
    "intranet",
    "invalid",
    "jobs",
    "lan",
    "law",
    "life",
    "link",
    "live",
    "local",
    "localdomain",
    "lol",
    "media",
    "mil",
    "mobi",
    "moe",
    "museum",
    "name",
    "net",
    "network",
    "news",
    "ninja",
    "one",
    "onion",
    "online",
    "org",
    "page",
    "press",
    "private",
    "pro",
    "run",
    "security",
    "services",
    "shop",
    "site",
    "social",
    "software",
    "solutions",
    "space",
    "store",
    "studio",
    "support",
    "systems",
    "team",
    "tech",
    "technology",
    "tel",
    "test",
    "today",
    "tools",
    "top",
    "travel",
    "video",
    "vip",
    "website",
    "wiki",
    "work",
    "works",
    "world",
    "wtf",
    "xyz",
    "zone",
];

/// Country-code domains that are far more often file extensions: a name ending in one
/// right after a `/` is taken for a file (`/opt/app/logic.py`), any other dotted name in
/// a path for a host (`/etc/letsencrypt/live/newsroom.net/`).
const FILE_EXTENSIONS: &[&[u8]] = &[
    b"ai", b"am", b"cc", b"hs", b"in", b"md", b"mk", b"ml", b"pl", b"ps", b"py", b"rs", b"sh",
    b"so",
];

/// True if and only if `label` (lower-case) can end a host name.
fn is_tld(label: &[u8]) -> bool {
    if label.len() == 2 && label.iter().all(u8::is_ascii_lowercase) {
        return true;
    }
    std::str::from_utf8(label).is_ok_and(|l| TLDS.binary_search(&l).is_ok())
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'_' | b'-')
}

/// What bytes a value holds, from one pass: enough to skip every detector that cannot
/// match it.
#[derive(Debug, Default)]
struct Shape {
    dots: usize,
    colons: usize,
    slashes: usize,
    dashes: usize,
    spaces: usize,
    at: bool,
    slash: bool,
    /// `0x` or `0X`.
    hex_prefix: bool,
    letters: usize,
    digits: usize,
    longest_hex_run: usize,
    longest_b64_run: usize,
}

impl Shape {
    fn of(value: &[u8]) -> Shape {
        let mut s = Shape::default();
        let (mut hex_run, mut b64_run, mut previous) = (0, 0, 0u8);
        for &b in value {
            match b {
                b'.' => s.dots += 1,
                b':' => s.colons += 1,
                b'@' => s.at = true,
                b'/' => {
                    s.slash = true;
                    s.slashes += 1;
                }
                b'-' => s.dashes += 1,
                b' ' => s.spaces += 1,
                b'x' | b'X' if previous == b'0' => s.hex_prefix = true,
                b'0'..=b'9' => s.digits += 1,
                b'a'..=b'z' | b'A'..=b'Z' => s.letters += 1,
                _ => {}
            }
            hex_run = if b.is_ascii_hexdigit() { hex_run + 1 } else { 0 };
            b64_run = if is_b64(b) { b64_run + 1 } else { 0 };
            s.longest_hex_run = s.longest_hex_run.max(hex_run);
            s.longest_b64_run = s.longest_b64_run.max(b64_run);
            previous = b;
        }
        s
    }
}

/// The compiled detectors. Build once and share: compiling the patterns is the costly
/// part, searching is cheap.
#[derive(Debug)]
pub struct Detectors {
    url: Regex,
    email: Regex,
    onion: Regex,
    home: Regex,
    hexish: Regex,
    mac: Regex,
    ipv6: Regex,
    ipv4: Regex,
    api_token: Regex,
    hostname: Regex,
}

impl Default for Detectors {
    fn default() -> Self {
        Detectors::new()
    }
}

impl Detectors {
    pub fn new() -> Detectors {
        let re = |pattern: &str| Regex::new(pattern).expect("the built-in patterns compile");
        let octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
        Detectors {
            // Everything up to whitespace or a quote; trailing punctuation is trimmed in
            // code, where a balanced `)` can be told from a closing one.
            url: re(r#"(?i-u)\b([a-z][a-z0-9+.\-]{0,15})://[^\s"'<>`\\\x00-\x1f\x7f]*"#),
            email: re(r"(?i-u)[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,24}\b"),
            onion: re(r"(?i-u)\b(?:[a-z0-9\-]+\.)*(?:[a-z2-7]{56}|[a-z2-7]{16})\.onion\b"),
            home: re(r#"(?-u)/(?:home|Users|var/home)/([^/\s"'<>:;,()\[\]{}|\\\x00-\x1f\x7f]+)"#),
            hexish: re(concat!(
                r"(?i-u)\b(?:",
                r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
                r"|(?P<pgp>[0-9a-f]{4}(?:[ ]{1,2}[0-9a-f]{4}){9})",
                r"|(?P<keyid>0x[0-9a-f]{16})",
                r")\b",
            )),
            mac: re(r"(?i-u)\b[0-9a-f]{2}(?:[:\-][0-9a-f]{2}){5}\b"),
            // A candidate only: std's parser decides what is an address.
            ipv6: re(concat!(
                r"(?i-u)(?:[0-9a-f]{0,4}:){2,7}",
                r"(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9a-f]{1,4})?",
                r"(?:%[0-9a-z._\-]+)?",
            )),
            ipv4: re(&format!(r"(?-u){octet}(?:\.{octet}){{3}}")),
            api_token: re(concat!(
                r"(?-u)\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}",
                r"|glpat-[A-Za-z0-9_\-]{20,}|xox[abposr]-[A-Za-z0-9\-]{10,}",
                r"|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_\-]{20,})\b",
            )),
            hostname: re(concat!(
                r"(?i-u)\b[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?",
                r"(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\.[a-z]{2,24}\b",
            )),
        }
    }

    /// Appends every finding in `value` to `out`, detector by detector; findings of
    /// different detectors may overlap.
    pub fn find(&self, value: &[u8], out: &mut Vec<Finding>) {
        let shape = Shape::of(value);
        let plain = |out: &mut Vec<Finding>, span: Range<usize>, detector| {
            out.push(Finding { span, detector, url: None })
        };

        if shape.colons > 0 && shape.slash {
            for m in self.url.find_iter(value) {
                if let Some(f) = url_finding(value, m.range()) {
                    out.push(f);
                }
            }
        }
        if shape.at && shape.dots > 0 {
            for m in self.email.find_iter(value) {
                let domain_tld = value[..m.end()].rsplit(|&b| b == b'.').next().unwrap_or(b"");
                if is_tld(&domain_tld.to_ascii_lowercase()) {
                    plain(out, m.range(), Detector::Email);
                }
            }
        }
        if shape.dots > 0 && value.len() >= 22 {
            for m in self.onion.find_iter(value) {
                plain(out, m.range(), Detector::Onion);
            }
        }
        if shape.slashes >= 2 {
            for c in self.home.captures_iter(value) {
                let name = c.get(1).expect("the pattern has one group");
                // A sentence may end right after the name.
                let end = name.start()
                    + value[name.range()].iter().rposition(|&b| b != b'.').map_or(0, |p| p + 1);
                if end > name.start() {
                    plain(out, name.start()..end, Detector::HomeUser);
                }
            }
        }
        if shape.longest_b64_run >= 15 {
            for m in self.api_token.find_iter(value) {
                plain(out, m.range(), Detector::ApiToken);
            }
        }
        let uuid = shape.longest_hex_run >= 8 && shape.dashes >= 4;
        let spaced = shape.longest_hex_run >= 4 && shape.spaces >= 9;
        if uuid || spaced || shape.hex_prefix {
            for c in self.hexish.captures_iter(value) {
                let (m, detector) = if let Some(m) = c.name("uuid") {
                    (m, Detector::Uuid)
                } else if let Some(m) = c.name("pgp") {
                    (m, Detector::PgpFingerprint)
                } else {
                    (c.name("keyid").expect("one of the three groups matched"), Detector::PgpKeyId)
                };
                plain(out, m.range(), detector);
            }
        }
        if shape.colons + shape.dashes >= 5 && shape.longest_hex_run >= 2 {
            for m in self.mac.find_iter(value) {
                plain(out, m.range(), Detector::Mac);
            }
        }
        if shape.colons >= 2 {
            find_ipv6(&self.ipv6, value, out);
        }
        if shape.dots >= 3 && shape.digits >= 4 {
            find_ipv4(&self.ipv4, value, out);
        }
        if shape.longest_hex_run >= 32 {
            find_hex_runs(value, out);
        }
        if shape.longest_b64_run >= 24 {
            find_base64(value, out);
        }
        // Two letters are enough: a country-code domain (`12.de`) has only those. With a
        // higher bar a value failed the leak scan once it was part of a longer line.
        if shape.dots > 0 && shape.letters >= 2 {
            find_hostnames(&self.hostname, value, out);
        }
    }
}

/// Splits a URL match into its pieces, after trimming the punctuation that ends the
/// sentence around it.
fn url_finding(value: &[u8], m: Range<usize>) -> Option<Finding> {
    let mut end = m.end;
    let opens = value[m.clone()].iter().filter(|&&b| b == b'(').count();
    let closes = value[m.clone()].iter().filter(|&&b| b == b')').count();
    let mut unbalanced = closes.saturating_sub(opens);
    while end > m.start {
        match value[end - 1] {
            b'.' | b',' | b';' | b':' | b'!' | b'?' | b']' | b'}' => end -= 1,
            b')' if unbalanced > 0 => {
                unbalanced -= 1;
                end -= 1;
            }
            _ => break,
        }
    }
    let text = &value[m.start..end];
    let sep = text.windows(3).position(|w| w == b"://")?;
    let scheme = m.start..m.start + sep;
    let authority_start = scheme.end + 3;
    let authority_end = value[authority_start..end]
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .map_or(end, |p| authority_start + p);
    let rest = (authority_end < end).then_some(authority_end..end);

    let authority = &value[authority_start..authority_end];
    let (userinfo, host_start) = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => (Some(authority_start..authority_start + at), authority_start + at + 1),
        None => (None, authority_start),
    };
    let host_part = &value[host_start..authority_end];
    let host_len = if host_part.first() == Some(&b'[') {
        host_part.iter().position(|&b| b == b']').map_or(host_part.len(), |p| p + 1)
    } else {
        host_part.iter().position(|&b| b == b':').unwrap_or(host_part.len())
    };
    let host = host_start..host_start + host_len;
    let after_host = &value[host.end..authority_end];
    let port = match after_host {
        [] => None,
        [b':', digits @ ..] if digits.iter().all(u8::is_ascii_digit) => {
            Some(host.end + 1..authority_end)
        }
        // Something after the host that is not a port: the whole authority is one
        // unknown thing, so it all becomes the host and gets one token.
        _ => {
            let host = host_start..authority_end;
            return Some(Finding {
                span: m.start..end,
                detector: Detector::Url,
                url: Some(UrlParts { scheme, userinfo, host, port: None, rest }),
            });
        }
    };
    Some(Finding {
        span: m.start..end,
        detector: Detector::Url,
        url: Some(UrlParts { scheme, userinfo, host, port, rest }),
    })
}

/// True if and only if `scheme` is one of [`KNOWN_SCHEMES`], ignoring case.
pub fn is_known_scheme(scheme: &[u8]) -> bool {
    let lower = scheme.to_ascii_lowercase();
    KNOWN_SCHEMES.iter().any(|s| s.as_bytes() == lower.as_slice())
}

fn find_ipv6(re: &Regex, value: &[u8], out: &mut Vec<Finding>) {
    let mut at = 0;
    while let Some(m) = re.find_at(value, at) {
        let (start, mut end) = (m.start(), m.end());
        // Glued to a word (`Type::method`, `std::io`) it is a path, not an address.
        let inside_word =
            (start > 0 && is_word(value[start - 1])) || value.get(end).is_some_and(|&b| is_word(b));
        let candidate = &value[start..end];
        let zone = candidate.iter().position(|&b| b == b'%');
        let mut addr_end = zone.map_or(end, |z| start + z);
        // A colon that ends a sentence ("on fe80::1: up") is not part of the address.
        if zone.is_none() && value[start..addr_end].ends_with(b":") && !candidate.ends_with(b"::") {
            addr_end -= 1;
            end = addr_end;
        }
        let parsed = std::str::from_utf8(&value[start..addr_end])
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok());
        match parsed {
            Some(addr) if !inside_word => {
                if !(addr.is_loopback() || addr.is_unspecified()) {
                    out.push(Finding { span: start..end, detector: Detector::Ipv6, url: None });
                }
                at = end.max(start + 1);
            }
            _ => at = start + 1,
        }
        if at >= value.len() {
            break;
        }
    }
}

/// True if and only if `addr` says nothing about anyone: loopback, unspecified,
/// broadcast.
fn is_uninformative_ipv4(addr: Ipv4Addr) -> bool {
    addr.is_loopback() || addr.is_unspecified() || addr.is_broadcast()
}

fn find_ipv4(re: &Regex, value: &[u8], out: &mut Vec<Finding>) {
    let mut at = 0;
    while let Some(m) = re.find_at(value, at) {
        let (start, end) = (m.start(), m.end());
        // Part of a longer run of digits and dots (a version, an OID) is not an address.
        let before_ok =
            start == 0 || !(value[start - 1].is_ascii_digit() || value[start - 1] == b'.');
        let after_ok = match value.get(end) {
            None => true,
            Some(b) if b.is_ascii_digit() => false,
            Some(b'.') => !value.get(end + 1).is_some_and(u8::is_ascii_digit),
            Some(_) => true,
        };
        if before_ok && after_ok {
            let addr: Option<Ipv4Addr> =
                std::str::from_utf8(&value[start..end]).ok().and_then(|s| s.parse().ok());
            if addr.is_some_and(|a| !is_uninformative_ipv4(a)) {
                out.push(Finding { span: start..end, detector: Detector::Ipv4, url: None });
            }
            at = end;
        } else {
            at = start + 1;
        }
        if at >= value.len() {
            break;
        }
    }
}

/// Runs of 32 or more hex digits standing alone as a word, with an optional `0x`: 32
/// digits are a 128-bit ID (boot, machine, invocation IDs), 40 a PGP fingerprint (or a
/// SHA-1, which is as identifying), anything else a secret or a hash of one.
fn find_hex_runs(value: &[u8], out: &mut Vec<Finding>) {
    let mut i = 0;
    while i < value.len() {
        if !value[i].is_ascii_hexdigit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < value.len() && value[i].is_ascii_hexdigit() {
            i += 1;
        }
        let len = i - start;
        if len < 32 || value.get(i).is_some_and(|&b| is_word(b)) {
            continue;
        }
        let prefixed = start >= 2
            && value[start - 2] == b'0'
            && matches!(value[start - 1], b'x' | b'X')
            && (start == 2 || !is_word(value[start - 3]));
        let span_start = if prefixed {
            start - 2
        } else if start > 0 && is_word(value[start - 1]) {
            continue;
        } else {
            start
        };
        let detector = match len {
            32 => Detector::Id128,
            40 => Detector::PgpFingerprint,
            _ => Detector::HexSecret,
        };
        out.push(Finding { span: span_start..i, detector, url: None });
    }
}

/// True if and only if `s` looks random enough to be a base64 (or base32, or
/// URL-safe base64) secret rather than a word, a name or a path.
fn looks_like_secret(s: &[u8]) -> bool {
    if s.len() < 24 {
        return false;
    }
    let upper = s.iter().filter(|b| b.is_ascii_uppercase()).count();
    let lower = s.iter().filter(|b| b.is_ascii_lowercase()).count();
    let digits = s.iter().filter(|b| b.is_ascii_digit()).count();
    // Hyphenated or underscored words (`Accepted-Connection-42`) are names: every part
    // is all letters or all digits. A secret mixes inside its parts.
    let wordy = s
        .split(|&b| matches!(b, b'-' | b'_' | b'+'))
        .all(|p| p.iter().all(u8::is_ascii_alphabetic) || p.iter().all(u8::is_ascii_digit));
    if wordy {
        return false;
    }
    if upper > 0 && lower > 0 && digits > 0 {
        return true;
    }
    // Base32 and single-case tokens: long, no separators, letters and digits well mixed.
    let separators = s.iter().any(|&b| matches!(b, b'-' | b'_' | b'+'));
    let letters = upper + lower;
    s.len() >= 32 && !separators && digits * 10 >= s.len() && letters * 10 >= s.len()
}

fn find_base64(value: &[u8], out: &mut Vec<Finding>) {
    let mut i = 0;
    while i < value.len() {
        if !is_b64(value[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < value.len() && is_b64(value[i]) {
            i += 1;
        }
        let run_end = i;
        while i < value.len() && value[i] == b'=' && i - run_end < 2 {
            i += 1;
        }
        let run = &value[start..run_end];
        if run.len() < 24 {
            continue;
        }
        // A run that starts with `/` is a path: judge its components one by one.
        if run[0] != b'/' && looks_like_secret(run) && !is_path_of_words(run) {
            out.push(Finding { span: start..i, detector: Detector::Base64Secret, url: None });
            continue;
        }
        let mut seg_start = start;
        for seg in run.split(|&b| b == b'/') {
            let seg_end = seg_start + seg.len();
            if looks_like_secret(seg) {
                let end = if seg_end == run_end { i } else { seg_end };
                out.push(Finding {
                    span: seg_start..end,
                    detector: Detector::Base64Secret,
                    url: None,
                });
            }
            seg_start = seg_end + 1;
        }
    }
}

/// True if and only if a run with slashes reads as a relative path: no component of it
/// looks like a secret on its own and every component is short.
fn is_path_of_words(run: &[u8]) -> bool {
    run.contains(&b'/') && run.split(|&b| b == b'/').all(|seg| seg.len() < 24)
}

fn find_hostnames(re: &Regex, value: &[u8], out: &mut Vec<Finding>) {
    let mut at = 0;
    while let Some(m) = re.find_at(value, at) {
        let (start, end) = (m.start(), m.end());
        // A file name in a path (`/opt/app/logic.py`) is not a host; URLs, where a host
        // does follow a slash, are the URL detector's.
        let after_slash = start > 0 && value[start - 1] == b'/';
        // The longest prefix of the labels that ends in a known top-level domain:
        // `example.com.txt` holds the host `example.com`.
        let lower = value[start..end].to_ascii_lowercase();
        let mut host_end = None;
        let mut pos = lower.len();
        while let Some(dot) = lower[..pos].iter().rposition(|&b| b == b'.') {
            let label = &lower[dot + 1..pos];
            if label.iter().all(u8::is_ascii_lowercase) && is_tld(label) {
                host_end = Some(start + pos);
                break;
            }
            pos = dot;
        }
        let file_name = after_slash
            && host_end.is_some_and(|e| {
                let tld =
                    &lower[lower[..e - start].iter().rposition(|&b| b == b'.').map_or(0, |d| d + 1)
                        ..e - start];
                FILE_EXTENSIONS.contains(&tld)
            });
        match host_end {
            Some(host_end) if !file_name => {
                out.push(Finding {
                    span: start..host_end,
                    detector: Detector::Hostname,
                    url: None,
                });
                at = host_end;
            }
            // No label of a rejected candidate ends a host name, so no host starts
            // inside it either.
            Some(_) | None => at = end,
        }
        if at >= value.len() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts of what `detector` finds in `value`.
    fn found(value: &str, detector: Detector) -> Vec<String> {
        let mut out = Vec::new();
        Detectors::new().find(value.as_bytes(), &mut out);
        out.iter()
            .filter(|f| f.detector == detector)
            .map(|f| value[f.span.clone()].to_owned())
            .collect()
    }

    fn nothing_in(value: &str) -> Vec<(Detector, String)> {
        let mut out = Vec::new();
        Detectors::new().find(value.as_bytes(), &mut out);
        out.iter().map(|f| (f.detector, value[f.span.clone()].to_owned())).collect()
    }

    #[test]
    fn tlds_are_sorted_for_binary_search() {
        assert!(TLDS.windows(2).all(|w| w[0] < w[1]));
        assert!(KNOWN_SCHEMES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ipv4_is_found_next_to_punctuation_but_not_in_versions() {
        assert_eq!(
            found("to 10.0.0.1, then (192.168.1.20).", Detector::Ipv4),
            ["10.0.0.1", "192.168.1.20"]
        );
        assert_eq!(found("addr=10.137.0.5:8080/x", Detector::Ipv4), ["10.137.0.5"]);
        assert_eq!(found("ip10.1.2.3", Detector::Ipv4), ["10.1.2.3"]);
        assert!(found("version 1.2.3.4.5 and 10.0.0.256", Detector::Ipv4).is_empty());
        assert!(found("oid 1.3.6.1.4.1", Detector::Ipv4).is_empty());
    }

    #[test]
    fn loopback_and_unspecified_addresses_are_kept() {
        assert!(found("listening on 127.0.0.1 and 0.0.0.0", Detector::Ipv4).is_empty());
        assert!(found("bound [::1]:80 and :: too", Detector::Ipv6).is_empty());
    }

    #[test]
    fn ipv6_in_its_forms() {
        assert_eq!(found("from fe80::1a2b:3c4d:", Detector::Ipv6), ["fe80::1a2b:3c4d"]);
        assert_eq!(found("2001:db8:0:0:0:0:2:1 up", Detector::Ipv6), ["2001:db8:0:0:0:0:2:1"]);
        assert_eq!(found("(2001:db8::7)", Detector::Ipv6), ["2001:db8::7"]);
        assert_eq!(found("via ::ffff:10.1.2.3", Detector::Ipv6), ["::ffff:10.1.2.3"]);
        assert_eq!(found("fe80::1%eth0 link", Detector::Ipv6), ["fe80::1%eth0"]);
    }

    #[test]
    fn ipv6_ignores_times_and_paths() {
        assert!(found("at 12:34:56 the Vec::new and std::io::Error", Detector::Ipv6).is_empty());
        assert!(found("Foo::bad", Detector::Ipv6).is_empty());
    }

    #[test]
    fn mac_with_colons_or_dashes() {
        assert_eq!(found("mac 00:16:3e:5e:6c:0a,", Detector::Mac), ["00:16:3e:5e:6c:0a"]);
        assert_eq!(found("hw=AA-BB-CC-DD-EE-FF.", Detector::Mac), ["AA-BB-CC-DD-EE-FF"]);
        assert!(found("at 12:34:56", Detector::Mac).is_empty());
    }

    #[test]
    fn email_inside_brackets_and_punctuation() {
        assert_eq!(found("(alice@example.com)", Detector::Email), ["alice@example.com"]);
        assert_eq!(
            found("<news.desk@mail.example.org>,", Detector::Email),
            ["news.desk@mail.example.org"]
        );
        assert_eq!(found("mailto:Bob+tag@Example.NET.", Detector::Email), ["Bob+tag@Example.NET"]);
    }

    #[test]
    fn systemd_instance_units_are_not_email() {
        assert!(
            found("Started user@1000.service and getty@tty1.service", Detector::Email).is_empty()
        );
    }

    /// Found by tests/fuzz (target redact): `196.rn>` alone was let through, but the
    /// same text inside an export's JSON line was a host name, so the export failed.
    #[test]
    fn hosts_with_only_two_letters_are_found() {
        assert_eq!(found("196.rn>", Detector::Hostname), ["196.rn"]);
        assert_eq!(found("at 12.de", Detector::Hostname), ["12.de"]);
    }

    #[test]
    fn hostnames_need_a_known_tld() {
        assert_eq!(
            found("resolving mail.corp.example.com.", Detector::Hostname),
            ["mail.corp.example.com"]
        );
        assert_eq!(found("host=sd-proxy.internal;", Detector::Hostname), ["sd-proxy.internal"]);
        assert_eq!(
            found("peer files.securedrop.org.txt", Detector::Hostname),
            ["files.securedrop.org"]
        );
        assert!(found("tor.service system.slice session-1.scope", Detector::Hostname).is_empty());
        assert!(found("sqlalchemy.exc.OperationalError python3.11", Detector::Hostname).is_empty());
    }

    #[test]
    fn file_names_in_paths_are_not_hostnames_but_hosts_in_paths_are() {
        assert!(found("File \"/opt/venvs/app/logic.py\", line 3", Detector::Hostname).is_empty());
        assert_eq!(found("ran deploy.sh", Detector::Hostname), ["deploy.sh"]);
        assert_eq!(
            found("/etc/letsencrypt/live/newsroom.net/cert.pem", Detector::Hostname),
            ["newsroom.net"]
        );
    }

    #[test]
    fn urls_split_into_pieces() {
        let value = "see https://user:pw@files.example.org:8443/a/b?q=1#f).";
        let mut out = Vec::new();
        Detectors::new().find(value.as_bytes(), &mut out);
        let f = out.iter().find(|f| f.detector == Detector::Url).expect("a URL");
        let parts = f.url.as_ref().expect("URL parts");
        let s = |r: &Range<usize>| &value[r.clone()];
        assert_eq!(s(&f.span), "https://user:pw@files.example.org:8443/a/b?q=1#f");
        assert_eq!(s(&parts.scheme), "https");
        assert_eq!(s(parts.userinfo.as_ref().unwrap()), "user:pw");
        assert_eq!(s(&parts.host), "files.example.org");
        assert_eq!(s(parts.port.as_ref().unwrap()), "8443");
        assert_eq!(s(parts.rest.as_ref().unwrap()), "/a/b?q=1#f");
    }

    #[test]
    fn urls_with_ipv6_hosts_and_balanced_parentheses() {
        let value = "(http://[fe80::1]:80/wiki/Foo_(bar))";
        let mut out = Vec::new();
        Detectors::new().find(value.as_bytes(), &mut out);
        let f = out.iter().find(|f| f.detector == Detector::Url).expect("a URL");
        let parts = f.url.as_ref().unwrap();
        assert_eq!(&value[f.span.clone()], "http://[fe80::1]:80/wiki/Foo_(bar)");
        assert_eq!(&value[parts.host.clone()], "[fe80::1]");
    }

    #[test]
    fn onion_v2_and_v3() {
        let v3 = "vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd.onion";
        assert_eq!(found(&format!("http://{v3}/submit"), Detector::Onion), [v3]);
        assert_eq!(
            found("at expyuzz4wqqyqhjn.onion,", Detector::Onion),
            ["expyuzz4wqqyqhjn.onion"]
        );
        assert!(found("not.an.onion", Detector::Onion).is_empty());
    }

    #[test]
    fn user_names_in_home_paths() {
        assert_eq!(found("opened /home/alice/QubesIncoming/x.pdf", Detector::HomeUser), ["alice"]);
        assert_eq!(found("cd /home/j.doe.", Detector::HomeUser), ["j.doe"]);
        assert_eq!(
            found("(/Users/bob) and /var/home/carol/", Detector::HomeUser),
            ["bob", "carol"]
        );
        assert!(found("/home/ alone", Detector::HomeUser).is_empty());
    }

    #[test]
    fn uuids_and_128_bit_ids() {
        assert_eq!(
            found("uuid 3F2504E0-4F89-11D3-9A0C-0305E82C3301.", Detector::Uuid),
            ["3F2504E0-4F89-11D3-9A0C-0305E82C3301"]
        );
        let boot = "4f8b2c9e1d3a4b5c8e7f6a5b4c3d2e1f";
        assert_eq!(found(&format!("_BOOT_ID={boot}"), Detector::Id128), [boot]);
        assert!(found(&format!("x{boot}"), Detector::Id128).is_empty());
    }

    #[test]
    fn long_hex_is_a_secret_and_forty_digits_a_fingerprint() {
        let sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(found(&format!("digest:{sha256};"), Detector::HexSecret), [sha256]);
        assert_eq!(
            found("key=0x00112233445566778899aabbccddeeff00", Detector::HexSecret),
            ["0x00112233445566778899aabbccddeeff00"]
        );
        let fpr = "0123456789ABCDEF0123456789ABCDEF01234567";
        assert_eq!(found(&format!("fingerprint {fpr}"), Detector::PgpFingerprint), [fpr]);
        assert!(found("short 0123456789abcdef0123", Detector::HexSecret).is_empty());
    }

    #[test]
    fn spaced_fingerprints_and_key_ids() {
        let spaced = "0123 4567 89AB CDEF 0123  4567 89AB CDEF 0123 4567";
        assert_eq!(
            found(&format!("Key fingerprint = {spaced}\n"), Detector::PgpFingerprint),
            [spaced]
        );
        assert_eq!(
            found("signed by 0x1234ABCD5678EF90.", Detector::PgpKeyId),
            ["0x1234ABCD5678EF90"]
        );
    }

    #[test]
    fn api_tokens_by_prefix() {
        let ghp = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
        assert_eq!(found(&format!("token={ghp}"), Detector::ApiToken), [ghp]);
        assert_eq!(
            found("AKIAIOSFODNN7EXAMPLE used", Detector::ApiToken),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert!(found("the disk-usage-reporter-service", Detector::ApiToken).is_empty());
    }

    #[test]
    fn base64_secrets_need_mixed_characters() {
        let b64 = "dGhpcyBpcyBhIHNlY3JldCB0b2tlbg==";
        assert_eq!(found(&format!("Authorization: Basic {b64}"), Detector::Base64Secret), [b64]);
        let urlsafe = "Zm9v_YmFy-QmF6cXV4UXV1eDEyMw";
        assert_eq!(found(&format!("t={urlsafe}"), Detector::Base64Secret), [urlsafe]);
        let base32 = "JBSWY3DPEHPK3PXP4FXYZ2QWERTY7ABC";
        assert_eq!(found(base32, Detector::Base64Secret), [base32]);
        assert!(found("Accepted-Connection-From-Qube-42 ok", Detector::Base64Secret).is_empty());
        assert!(
            found("averyveryverylongidentifierwithoutdigits", Detector::Base64Secret).is_empty()
        );
    }

    #[test]
    fn paths_are_not_base64_but_secrets_inside_them_are() {
        assert!(
            found("/home/user/QubesIncoming/sd-app/abc123.pdf", Detector::Base64Secret).is_empty()
        );
        let secret = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9";
        assert_eq!(found(&format!("/api/v1/{secret}/x"), Detector::Base64Secret), [secret]);
    }

    #[test]
    fn ordinary_log_lines_find_nothing() {
        for line in [
            "Started session 12 of user user.",
            "Synced 12 sources and 40 replies in 300 ms",
            "pam_unix(sudo:session): session opened for user root(uid=0) by user(uid=1000)",
            "Bootstrapped 100% (conn_done): Connected to a relay",
            "debug: poll loop woke after 20 ms, 3 fds ready",
            "qrexec: service qubes.OpenInVM refused (exit 126)",
            "low disk space on /rw: 200 MiB free",
        ] {
            assert_eq!(nothing_in(line), [], "{line}");
        }
    }

    #[test]
    fn no_finding_crosses_a_newline() {
        let value = "10.0.0\n.1 alice@exam\nple.com fe80:\n:1";
        for (_, text) in nothing_in(value) {
            assert!(!text.contains('\n'), "{text:?}");
        }
    }
}
