//! Source filters: which entries are forwarded and which of their fields are dropped.
//!
//! Owns the priority threshold, the unit and identifier include/exclude patterns and the
//! list of dropped fields, and their parsing from the command line. Filtering happens in
//! the agent, not in journalctl, so the same rules hold for every source and input format.
//! Dropped entries are not gaps: the operator asked for them to stay behind. Filters see
//! the fields kept while reading, so in an entry with more fields than the sink's
//! `max_fields`, the fields past that limit cannot select or drop it.

use qlog_rpc::fields::{CURSOR, PRIORITY, SYSLOG_IDENTIFIER, SYSTEMD_UNIT};

use crate::limits::{sanitize_field_name, RawEntry};
pub use qlog_rpc::glob::glob_match;

/// syslog priority names as journalctl spells them, in numeric order.
const PRIORITY_NAMES: [&str; 8] =
    ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"];

/// By default, everything is forwarded whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Keep entries with `PRIORITY` at most this; entries without a readable `PRIORITY`
    /// are always kept, since dropping what we cannot classify would hide it.
    pub max_priority: Option<u8>,
    /// If not empty, keep only entries whose `_SYSTEMD_UNIT` matches one of these globs.
    pub include_units: Vec<String>,
    /// Drop entries whose `_SYSTEMD_UNIT` matches one of these globs.
    pub exclude_units: Vec<String>,
    /// If not empty, keep only entries whose `SYSLOG_IDENTIFIER` matches one of these.
    pub include_identifiers: Vec<String>,
    /// Drop entries whose `SYSLOG_IDENTIFIER` matches one of these globs.
    pub exclude_identifiers: Vec<String>,
    /// Field names removed from every entry, already sanitised.
    pub drop_fields: Vec<String>,
}

/// Parses `--priority`: a number 0-7 or a journalctl priority name.
pub fn parse_priority(text: &str) -> Result<u8, String> {
    let text = text.trim();
    let lower = text.to_ascii_lowercase();
    let alias = match lower.as_str() {
        "error" => "err",
        "warn" => "warning",
        "emergency" | "panic" => "emerg",
        "critical" => "crit",
        other => other,
    };
    if let Some(n) = PRIORITY_NAMES.iter().position(|name| *name == alias) {
        return Ok(n as u8);
    }
    match text.parse::<u8>() {
        Ok(n) if n <= 7 => Ok(n),
        _ => Err(format!(
            "invalid priority {text:?}: use 0-7 or one of {}",
            PRIORITY_NAMES.join(", ")
        )),
    }
}

/// Parses a `--drop-field` name, refusing the field the journal source resumes from.
pub fn parse_drop_field(text: &str) -> Result<String, String> {
    let name = sanitize_field_name(text.as_bytes());
    if name == CURSOR {
        return Err(format!("refusing to drop {CURSOR}: the sink resumes the journal from it"));
    }
    Ok(name)
}

fn matches_any(patterns: &[String], value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| glob_match(p.as_bytes(), v)))
}

impl Filters {
    /// True if and only if the entry should be forwarded.
    pub fn keep(&self, entry: &RawEntry) -> bool {
        if let Some(max) = self.max_priority {
            let priority = entry.get(PRIORITY).and_then(|v| std::str::from_utf8(v).ok());
            if priority.and_then(|p| p.trim().parse::<u8>().ok()).is_some_and(|p| p > max) {
                return false;
            }
        }
        let unit = entry.get(SYSTEMD_UNIT);
        if !self.include_units.is_empty() && !matches_any(&self.include_units, unit) {
            return false;
        }
        if matches_any(&self.exclude_units, unit) {
            return false;
        }
        let ident = entry.get(SYSLOG_IDENTIFIER);
        if !self.include_identifiers.is_empty() && !matches_any(&self.include_identifiers, ident) {
            return false;
        }
        !matches_any(&self.exclude_identifiers, ident)
    }

    /// Removes the dropped fields from an entry that is kept.
    pub fn strip(&self, entry: &mut RawEntry) {
        if !self.drop_fields.is_empty() {
            entry.fields.retain(|f| !self.drop_fields.contains(&f.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{RawEntry, ReadLimits};
    use qlog_rpc::Limits;

    fn entry(fields: &[(&str, &str)]) -> RawEntry {
        let mut e = RawEntry::default();
        for (name, value) in fields {
            e.push_bounded(
                name.to_string(),
                value.as_bytes().to_vec(),
                &ReadLimits::from_limits(&Limits::DEFAULT),
            );
        }
        e
    }

    #[test]
    fn parses_priorities_by_number_and_name() {
        assert_eq!(parse_priority("3"), Ok(3));
        assert_eq!(parse_priority("warning"), Ok(4));
        assert_eq!(parse_priority("ERR"), Ok(3));
        assert_eq!(parse_priority("debug"), Ok(7));
        assert!(parse_priority("8").is_err());
        assert!(parse_priority("loud").unwrap_err().contains("emerg"));
    }

    #[test]
    fn priority_threshold_keeps_entries_without_priority() {
        let f = Filters { max_priority: Some(4), ..Filters::default() };
        assert!(f.keep(&entry(&[("PRIORITY", "3")])));
        assert!(f.keep(&entry(&[("PRIORITY", "4")])));
        assert!(!f.keep(&entry(&[("PRIORITY", "6")])));
        assert!(f.keep(&entry(&[("MESSAGE", "no priority")])));
        assert!(f.keep(&entry(&[("PRIORITY", "garbage")])));
    }

    #[test]
    fn unit_and_identifier_patterns_include_and_exclude() {
        let f = Filters {
            include_units: vec!["ssh*.service".into(), "cron.service".into()],
            exclude_identifiers: vec!["noisy".into()],
            ..Filters::default()
        };
        assert!(f.keep(&entry(&[("_SYSTEMD_UNIT", "sshd.service")])));
        assert!(f.keep(&entry(&[("_SYSTEMD_UNIT", "cron.service")])));
        assert!(!f.keep(&entry(&[("_SYSTEMD_UNIT", "other.service")])));
        assert!(!f.keep(&entry(&[("MESSAGE", "no unit")])), "include needs a match");
        assert!(
            !f.keep(&entry(&[("_SYSTEMD_UNIT", "cron.service"), ("SYSLOG_IDENTIFIER", "noisy")]))
        );

        let f = Filters { exclude_units: vec!["user@*".into()], ..Filters::default() };
        assert!(!f.keep(&entry(&[("_SYSTEMD_UNIT", "user@1000.service")])));
        assert!(f.keep(&entry(&[("MESSAGE", "kernel line")])));

        let f = Filters { include_identifiers: vec!["kernel".into()], ..Filters::default() };
        assert!(f.keep(&entry(&[("SYSLOG_IDENTIFIER", "kernel")])));
        assert!(!f.keep(&entry(&[("SYSLOG_IDENTIFIER", "sudo")])));
    }

    #[test]
    fn drops_fields_but_never_the_cursor() {
        let f = Filters {
            drop_fields: vec![parse_drop_field("_cmdline").unwrap()],
            ..Filters::default()
        };
        let mut e = entry(&[("MESSAGE", "m"), ("_CMDLINE", "secret"), ("_CMDLINE", "again")]);
        f.strip(&mut e);
        assert_eq!(e.fields.len(), 1);
        assert!(parse_drop_field("__CURSOR").is_err());
    }
}
