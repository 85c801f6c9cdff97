//! The redaction profile: which fields leave the log qube, which names and domains stay
//! readable, and the operator's own keywords and patterns, from the built-in defaults and
//! an optional rules file (`--rules FILE`, TOML; `docs/redaction-rules.example.toml`
//! shows every key). Owns parsing and validating; applying the profile is
//! [`super::redact`]'s.
//!
//! The profile fails closed: a field is exported only if it is on the allowlist, and
//! every exported value still goes through every detector. The rules file can widen the
//! field list (`[fields] allow`), narrow it (`deny`), replace the domain and VM
//! allowlists, and add keywords and regular expressions; it cannot turn a detector off.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context};
use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

use qlog_rpc::fields;

/// The fields exported by default. Every one says something about what happened, not
/// about who or where, and its value is still redacted.
///
/// Beyond the sink's own fields and the journald basics, these are on the list:
/// `CODE_FILE`, `CODE_LINE` and `CODE_FUNC` name a place in a program's source, chosen by
/// its author; `ERRNO` is a number; `_PID` and `SYSLOG_PID` are small recycled counters
/// that mean nothing outside the VM but tie the lines of one process together; `UNIT` and
/// `USER_UNIT` name the unit systemd's own messages are about; `QLOG_TRUNCATED` and
/// `QLOG_PARSE_ERROR` are the agent's markers (field names and lengths).
///
/// Left off on purpose: `_HOSTNAME` (the VM's own claim, and its name), `_BOOT_ID`,
/// `_MACHINE_ID` and `__CURSOR` (they identify the machine across bundles), `_CMDLINE` and
/// `_EXE` (arguments and paths carry user data), `_UID`/`_GID` (accounts), and every
/// field the agent or a program invents.
pub const DEFAULT_FIELDS: &[&str] = &[
    fields::MESSAGE,
    fields::PRIORITY,
    fields::SYSLOG_IDENTIFIER,
    fields::SYSTEMD_UNIT,
    fields::REALTIME_TIMESTAMP,
    fields::SOURCE_REALTIME_TIMESTAMP,
    fields::QLOG_VM,
    fields::QLOG_RECEIVED_USEC,
    fields::QLOG_STREAM,
    fields::QLOG_SEQ,
    fields::QLOG_GAP,
    fields::QLOG_GAP_COUNT,
    "SYSLOG_FACILITY",
    "_TRANSPORT",
    "_COMM",
    "CODE_FUNC",
    "CODE_FILE",
    "CODE_LINE",
    "ERRNO",
    "_PID",
    "SYSLOG_PID",
    "UNIT",
    "USER_UNIT",
    fields::QLOG_TRUNCATED,
    fields::QLOG_PARSE_ERROR,
];

/// Domains whose host names stay readable by default: the Qubes project's (support
/// links to its documentation) and the names reserved for examples, which belong to
/// nobody. A host name matches a domain when it is the domain or ends in `.DOMAIN`.
pub const DEFAULT_DOMAINS: &[&str] =
    &["example.com", "example.net", "example.org", "localdomain", "qubes-os.org"];

/// VM names that stay readable by default: the ones every Qubes system has, which say
/// nothing about its owner and which support needs to read ("sys-usb refused...").
pub const DEFAULT_VMS: &[&str] = &[
    "default-mgmt-dvm",
    "dom0",
    "sys-audio",
    "sys-firewall",
    "sys-gui",
    "sys-net",
    "sys-usb",
    "sys-whonix",
];

/// Prefixes the built-in rules use for their tokens; a user rule may not take one, so
/// that a token's prefix always says what kind of value it stands for.
pub const RESERVED_PREFIXES: &[&str] = &[
    "cred", "email", "host", "id", "ip", "kw", "mac", "onion", "pgp", "secret", "url", "user", "vm",
];

/// Longest pattern accepted from a rules file, and the compiled size it may reach.
const MAX_PATTERN_LEN: usize = 4096;
const MAX_REGEX_SIZE: usize = 4 << 20;

/// A user's regular expression rule.
#[derive(Debug, Clone)]
pub struct UserRegex {
    pub name: String,
    pub token_prefix: String,
    pub regex: Regex,
}

/// Everything that decides what a bundle holds.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Recorded in the manifest: `default`, or the rules file's `name`.
    pub name: String,
    /// True if and only if a rules file was read.
    pub from_file: bool,
    pub fields: BTreeSet<String>,
    /// Lower case, without a leading dot.
    pub domains: Vec<String>,
    pub vms: BTreeSet<String>,
    /// Matched anywhere, ignoring case.
    pub keywords: Vec<String>,
    pub regexes: Vec<UserRegex>,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            name: "default".to_owned(),
            from_file: false,
            fields: DEFAULT_FIELDS.iter().map(|f| (*f).to_owned()).collect(),
            domains: DEFAULT_DOMAINS.iter().map(|d| (*d).to_owned()).collect(),
            vms: DEFAULT_VMS.iter().map(|v| (*v).to_owned()).collect(),
            keywords: Vec::new(),
            regexes: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    name: Option<String>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default, rename = "regex")]
    regexes: Vec<RegexRule>,
    fields: Option<FieldRules>,
    domains: Option<AllowList>,
    vms: Option<AllowList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldRules {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowList {
    allow: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegexRule {
    name: String,
    pattern: String,
    token: Option<String>,
}

impl Profile {
    /// The built-in profile, with the rules file on top if one is given.
    pub fn load(rules: Option<&Path>) -> anyhow::Result<Profile> {
        let Some(path) = rules else { return Ok(Profile::default()) };
        let hint = "see docs/redaction-rules.example.toml";
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the rules file {}", path.display()))?;
        Profile::parse(&text)
            .with_context(|| format!("in the rules file {} ({hint})", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Profile> {
        let file: RulesFile = toml::from_str(text).context("not valid rules TOML")?;
        let mut profile = Profile { from_file: true, ..Profile::default() };
        if let Some(name) = file.name {
            if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
                bail!("name must be 1 to 64 printable characters");
            }
            profile.name = name;
        }

        if let Some(f) = file.fields {
            for name in f.allow.iter().chain(&f.deny) {
                qlog_rpc::event::validate_field_name(name.as_bytes(), 64)
                    .with_context(|| format!("[fields] names {name:?}"))?;
            }
            profile.fields.extend(f.allow);
            for name in &f.deny {
                profile.fields.remove(name);
            }
        }
        if let Some(d) = file.domains {
            let mut domains = Vec::new();
            for domain in d.allow {
                let domain = domain.trim_start_matches("*.").trim_start_matches('.').to_lowercase();
                let valid = !domain.is_empty()
                    && domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !valid {
                    bail!("[domains] allow: {domain:?} is not a domain name");
                }
                domains.push(domain);
            }
            domains.sort();
            domains.dedup();
            profile.domains = domains;
        }
        if let Some(v) = file.vms {
            profile.vms = v.allow.into_iter().collect();
        }

        for keyword in file.keywords {
            if keyword.chars().count() < 2 || keyword.len() > 256 {
                bail!("keywords must be 2 to 256 bytes long, not {:?}", keyword.len());
            }
            profile.keywords.push(keyword);
        }
        let mut names = BTreeSet::new();
        for rule in file.regexes {
            profile.regexes.push(user_regex(rule, &mut names)?);
        }
        Ok(profile)
    }

    pub fn field_allowed(&self, name: &str) -> bool {
        self.fields.contains(name)
    }

    /// True if and only if `host` (lower case) is an allowlisted domain or under one.
    pub fn domain_allowed(&self, host: &[u8]) -> bool {
        // Only a real host name: a URL's authority that is no host (`a=b%c:1:+10.0.0.1.
        // example.org`) becomes its host whole, and must not stay readable for its end.
        let name_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !host.iter().all(name_byte) {
            return false;
        }
        self.domains.iter().any(|d| {
            let d = d.as_bytes();
            host == d
                || (host.len() > d.len()
                    && host.ends_with(d)
                    && host[host.len() - d.len() - 1] == b'.')
        })
    }
}

fn user_regex(rule: RegexRule, names: &mut BTreeSet<String>) -> anyhow::Result<UserRegex> {
    let valid_name = |s: &str| {
        (1..=32).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !valid_name(&rule.name) {
        bail!(
            "[[regex]] name {:?} must be 1 to 32 of a-z, 0-9 and -, starting with a letter",
            rule.name
        );
    }
    if !names.insert(rule.name.clone()) {
        bail!("[[regex]] name {:?} is used twice", rule.name);
    }
    let token_prefix = rule.token.unwrap_or_else(|| rule.name.clone());
    if !valid_name(&token_prefix) || token_prefix.len() > 16 {
        bail!(
            "[[regex]] {}: token {token_prefix:?} must be 1 to 16 of a-z, 0-9 and -, from a letter",
            rule.name
        );
    }
    if RESERVED_PREFIXES.contains(&token_prefix.as_str()) {
        bail!(
            "[[regex]] {}: token {token_prefix:?} is a built-in prefix (set another with token)",
            rule.name
        );
    }
    if rule.pattern.len() > MAX_PATTERN_LEN {
        bail!("[[regex]] {}: the pattern is longer than {MAX_PATTERN_LEN} bytes", rule.name);
    }
    let regex = RegexBuilder::new(&rule.pattern)
        .size_limit(MAX_REGEX_SIZE)
        .build()
        .with_context(|| format!("[[regex]] {}: invalid pattern", rule.name))?;
    if regex.is_match(b"") {
        bail!(
            "[[regex]] {}: the pattern matches the empty string, so it would match everywhere",
            rule.name
        );
    }
    Ok(UserRegex { name: rule.name, token_prefix, regex })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fail_closed() {
        let p = Profile::default();
        assert!(p.field_allowed("MESSAGE") && p.field_allowed("_QLOG_GAP"));
        for dropped in ["_HOSTNAME", "_BOOT_ID", "_MACHINE_ID", "__CURSOR", "_CMDLINE", "X_SECRET"]
        {
            assert!(!p.field_allowed(dropped), "{dropped}");
        }
    }

    #[test]
    fn domains_match_themselves_and_subdomains_only() {
        let p = Profile::default();
        assert!(p.domain_allowed(b"qubes-os.org"));
        assert!(p.domain_allowed(b"www.qubes-os.org"));
        assert!(!p.domain_allowed(b"evilqubes-os.org"));
        assert!(!p.domain_allowed(b"qubes-os.org.evil.com"));
        // An authority that is no host name is not allowlisted for how it ends.
        assert!(!p.domain_allowed(b"bob=g%eth01:34:+2.167.1.mx.qubes-os.org"));
        assert!(!p.domain_allowed(b"a b.qubes-os.org"));
    }

    #[test]
    fn a_rules_file_extends_and_replaces() {
        let p = Profile::parse(
            r#"
            name = "newsroom"
            keywords = ["Project Bluebird", "acme"]
            [fields]
            allow = ["_UID"]
            deny = ["CODE_FILE"]
            [domains]
            allow = ["*.securedrop.org", "Example.org"]
            [vms]
            allow = ["sd-log"]
            [[regex]]
            name = "case-number"
            pattern = "CASE-[0-9]{6}"
            token = "case"
            "#,
        )
        .unwrap();
        assert_eq!(p.name, "newsroom");
        assert!(p.field_allowed("_UID") && !p.field_allowed("CODE_FILE"));
        assert_eq!(p.domains, ["example.org", "securedrop.org"]);
        assert!(p.vms.contains("sd-log") && !p.vms.contains("dom0"));
        assert_eq!(p.keywords, ["Project Bluebird", "acme"]);
        assert_eq!(p.regexes[0].token_prefix, "case");
    }

    #[test]
    fn the_documented_example_is_valid_and_shows_the_defaults() {
        let text = include_str!("../../docs/redaction-rules.example.toml");
        let p = Profile::parse(text).unwrap();
        assert_eq!(p.name, "newsroom");
        assert_eq!(p.regexes.len(), 2);
        let mut defaults: Vec<String> = DEFAULT_DOMAINS.iter().map(|d| d.to_string()).collect();
        defaults.push("securedrop.org".to_owned());
        defaults.sort();
        assert_eq!(p.domains, defaults);
        assert_eq!(p.vms, Profile::default().vms);
        for field in DEFAULT_FIELDS {
            assert!(text.contains(field), "the example does not list {field}");
        }
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let err = |text: &str| format!("{:#}", Profile::parse(text).unwrap_err());
        assert!(err("colour = 1").contains("unknown field"));
        assert!(err("[[regex]]\nname = \"x\"\npattern = \"a*\"").contains("empty string"));
        assert!(err("[[regex]]\nname = \"x\"\npattern = \"(\"").contains("invalid pattern"));
        assert!(
            err("[[regex]]\nname = \"x\"\npattern = \"a\"\ntoken = \"ip\"").contains("built-in")
        );
        assert!(err("[[regex]]\nname = \"Bad Name\"\npattern = \"a\"").contains("name"));
        assert!(err("keywords = [\"a\"]").contains("2 to 256"));
        assert!(err("[fields]\nallow = [\"lower\"]").contains("[fields]"));
    }
}
