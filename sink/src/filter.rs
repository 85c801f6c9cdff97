//! Query filters, compiled once per request and evaluated in the sink.
//!
//! Semantics follow journalctl: every criterion that is set must hold; within one
//! criterion any value may match; `FIELD=VALUE` matches on the same field are OR'ed and
//! across fields AND'ed. Time bounds apply to the sink's receive time, the only clock a
//! source VM cannot set.

use std::collections::BTreeMap;

use qlog_rpc::fields;
use qlog_rpc::glob::glob_match;
use qlog_rpc::query::{Filter, RecordView, MAX_PATTERN_LEN, MAX_REQUEST_ITEMS};
use regex::bytes::{Regex, RegexBuilder};

use crate::batch::{self, Columns};
use crate::store::Wanted;

/// The fields besides `_SYSTEMD_UNIT` that `-u` may read, each only from a trusted
/// sender (see `unit_matches`, which must read no other). Batch keys (batch.rs) never
/// answer for a record that has one: such a record is read and judged here.
pub const UNIT_CLAIM_FIELDS: [&[u8]; 3] = [b"UNIT", b"OBJECT_SYSTEMD_UNIT", b"COREDUMP_UNIT"];

/// journald's message ID of coredump entries, whose `COREDUMP_UNIT` `-u` honours.
const COREDUMP_MESSAGE_ID: &[u8] = b"fc2e22bc6ee647b6b90729ab34a250b1";

/// Upper bound on the compiled program of a `--grep` pattern; a hostile or careless
/// pattern fails to compile instead of eating memory.
const REGEX_SIZE_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct CompiledFilter {
    priority: Option<(u8, u8)>,
    units: Vec<UnitPattern>,
    identifiers: Vec<Vec<u8>>,
    grep: Option<Regex>,
    /// The grep pattern asserts nothing about what surrounds a match (no `^`, `$`,
    /// `\b`): a match inside a MESSAGE is then also a match in any bytes holding it.
    grep_in_any_bytes: bool,
    pub since_usec: Option<u64>,
    pub until_usec: Option<u64>,
    matches: BTreeMap<String, Vec<Vec<u8>>>,
}

#[derive(Debug)]
enum UnitPattern {
    Exact(Vec<u8>),
    Glob(String),
}

impl CompiledFilter {
    pub fn new(filter: &Filter) -> Result<CompiledFilter, String> {
        let items = filter.units.len() + filter.identifiers.len() + filter.matches.len();
        if items > MAX_REQUEST_ITEMS {
            return Err(format!("query names {items} values; the limit is {MAX_REQUEST_ITEMS}"));
        }
        if let Some((lo, hi)) = filter.priority {
            if lo > 7 || hi > 7 {
                return Err(format!("priority range {lo}..{hi} is outside 0 (emerg) to 7 (debug)"));
            }
        }
        let grep = match &filter.grep {
            None => None,
            Some(g) if g.pattern.len() > MAX_PATTERN_LEN => {
                return Err(format!("grep pattern is longer than {MAX_PATTERN_LEN} bytes"))
            }
            Some(g) => Some(
                RegexBuilder::new(&g.pattern)
                    .case_insensitive(g.case_insensitive)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| format!("invalid grep pattern: {e}"))?,
            ),
        };
        let grep_in_any_bytes = filter.grep.as_ref().is_some_and(|g| {
            regex_syntax::ParserBuilder::new()
                .case_insensitive(g.case_insensitive)
                .utf8(false)
                .build()
                .parse(&g.pattern)
                .is_ok_and(|hir| hir.properties().look_set().is_empty())
        });
        let mut matches: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for (field, value) in &filter.matches {
            qlog_rpc::event::validate_field_name(field.as_bytes(), 64)
                .map_err(|e| format!("invalid match {field}={value}: {e}"))?;
            matches.entry(field.clone()).or_default().push(value.as_bytes().to_vec());
        }
        Ok(CompiledFilter {
            priority: filter.priority.map(|(a, b)| (a.min(b), a.max(b))),
            units: filter.units.iter().map(|u| UnitPattern::new(u)).collect(),
            identifiers: filter.identifiers.iter().map(|i| i.as_bytes().to_vec()).collect(),
            grep,
            grep_in_any_bytes,
            since_usec: filter.since_usec,
            until_usec: filter.until_usec,
            matches,
        })
    }

    pub fn in_time_range(&self, usec: u64) -> bool {
        self.since_usec.is_none_or(|s| usec >= s) && self.until_usec.is_none_or(|u| usec <= u)
    }

    /// Evaluates the filter on a record in place, without decoding it.
    pub fn matches(&self, r: &RecordView<'_>) -> bool {
        if !self.in_time_range(r.received_usec) {
            return false;
        }
        if let Some((lo, hi)) = self.priority {
            let p = r.get(fields::PRIORITY).and_then(parse_priority);
            if !p.is_some_and(|p| p >= lo && p <= hi) {
                return false;
            }
        }
        if !self.units.is_empty() && !self.unit_matches(r) {
            return false;
        }
        if !self.identifiers.is_empty() {
            let hit = r.raw_fields().any(|(name, value)| {
                name == fields::SYSLOG_IDENTIFIER.as_bytes()
                    && self.identifiers.iter().any(|i| i == value)
            });
            if !hit {
                return false;
            }
        }
        if let Some(re) = &self.grep {
            if !r.get(fields::MESSAGE).is_some_and(|m| re.is_match(m)) {
                return false;
            }
        }
        for (name, wanted) in &self.matches {
            let hit = match name.as_str() {
                fields::QLOG_VM => wanted.iter().any(|w| w == r.vm.as_bytes()),
                fields::QLOG_STREAM => wanted.iter().any(|w| w == r.stream.as_bytes()),
                _ => r
                    .raw_fields()
                    .any(|(n, v)| n == name.as_bytes() && wanted.iter().any(|w| w == v)),
            };
            if !hit {
                return false;
            }
        }
        true
    }

    /// Which of a batch's records may match, judged from their keys alone; `None` if
    /// the filter asks nothing the keys answer. Never leaves out a record that
    /// [`CompiledFilter::matches`] would keep: a key either answers exactly what
    /// `matches` asks, or is [`batch::KEY_OTHER`] and the record is read.
    pub fn candidates(&self, columns: &Columns<'_>) -> Option<Vec<bool>> {
        let unit_values = self.matches.get(fields::SYSTEMD_UNIT);
        let identifier_values = self.matches.get(fields::SYSLOG_IDENTIFIER);
        if self.priority.is_none()
            && self.units.is_empty()
            && self.identifiers.is_empty()
            && unit_values.is_none()
            && identifier_values.is_none()
        {
            return None;
        }
        let mut priority = [true; 256];
        if let Some((lo, hi)) = self.priority {
            for (p, ok) in priority.iter_mut().enumerate() {
                *ok = (lo as usize..=hi as usize).contains(&p);
            }
        }
        let unit =
            key_table(&columns.units, !self.units.is_empty() || unit_values.is_some(), |v| {
                (self.units.is_empty() || self.units.iter().any(|u| u.matches(v)))
                    && unit_values.is_none_or(|w| w.iter().any(|w| w == v))
            });
        let ident = key_table(
            &columns.identifiers,
            !self.identifiers.is_empty() || identifier_values.is_some(),
            |v| {
                (self.identifiers.is_empty() || self.identifiers.iter().any(|i| i == v))
                    && identifier_values.is_none_or(|w| w.iter().any(|w| w == v))
            },
        );
        Some(
            columns
                .iter()
                .map(|k| {
                    priority[k.priority as usize]
                        && unit[k.unit as usize]
                        && ident[k.identifier as usize]
                })
                .collect(),
        )
    }

    /// Whether any record in `raw` (whole records back to back) may match: false only
    /// if the grep pattern matches nowhere in those bytes, which for a pattern without
    /// assertions means it matches no MESSAGE among them. Searching a chunk once costs
    /// far less than finding and searching each of its messages.
    pub fn may_match_in(&self, raw: &[u8]) -> bool {
        match &self.grep {
            Some(re) if self.grep_in_any_bytes => re.is_match(raw),
            _ => true,
        }
    }

    /// journalctl's `-u`: the entry's own unit, or a unit that a trusted sender says the
    /// entry is about. Only systemd (`_PID=1`) may say so with `UNIT`, and only root with
    /// `OBJECT_SYSTEMD_UNIT` or, on a coredump entry, `COREDUMP_UNIT`; from anyone else
    /// these fields are ignored, as journalctl ignores them.
    fn unit_matches(&self, r: &RecordView<'_>) -> bool {
        let is = |name: &[u8], value: &[u8]| r.raw_fields().any(|(n, v)| n == name && v == value);
        r.raw_fields().any(|(name, value)| {
            let trusted = match name {
                b"_SYSTEMD_UNIT" => true,
                b"UNIT" => is(b"_PID", b"1"),
                b"OBJECT_SYSTEMD_UNIT" => is(b"_UID", b"0"),
                b"COREDUMP_UNIT" => is(b"_UID", b"0") && is(b"MESSAGE_ID", COREDUMP_MESSAGE_ID),
                _ => false,
            };
            trusted && self.units.iter().any(|u| u.matches(value))
        })
    }
}

impl Wanted for CompiledFilter {
    fn records(&self, columns: &Columns<'_>) -> Option<Vec<bool>> {
        self.candidates(columns)
    }
    fn chunk(&self, raw: &[u8]) -> bool {
        self.may_match_in(raw)
    }
}

/// For each value of a record key: may a record with it pass the tests on that field?
/// `asked` is false when the filter has none, and then every value may.
fn key_table(dict: &[&[u8]], asked: bool, passes: impl Fn(&[u8]) -> bool) -> [bool; 256] {
    let mut ok = [true; 256];
    if asked {
        ok[batch::KEY_NONE as usize] = false;
        for (i, value) in dict.iter().enumerate() {
            ok[i + 1] = passes(value);
        }
    }
    ok
}

fn parse_priority(v: &[u8]) -> Option<u8> {
    qlog_rpc::event::priority_digit(v)
}

impl UnitPattern {
    /// journalctl appends `.service` to a unit name without a suffix; `*` and `?` are
    /// globs (journalctl's `[...]` classes are not supported).
    fn new(unit: &str) -> UnitPattern {
        let unit = if unit.contains(['.', '*', '?']) {
            unit.to_owned()
        } else {
            format!("{unit}.service")
        };
        if unit.contains(['*', '?']) {
            UnitPattern::Glob(unit)
        } else {
            UnitPattern::Exact(unit.into_bytes())
        }
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            UnitPattern::Exact(u) => u == value,
            UnitPattern::Glob(g) => glob_match(g.as_bytes(), value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::{Grep, Record, RecordKind};
    use qlog_rpc::Event;

    /// An encoded record; tests read it with [`view`].
    fn rec(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut event = Event::new();
        for (k, v) in fields {
            event.push(*k, *v);
        }
        let r = Record {
            vm: "sd-app".into(),
            stream: "journal".into(),
            received_usec: 1000,
            seq: 1,
            kind: RecordKind::Event,
            event,
        };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        buf
    }

    fn view(buf: &[u8]) -> RecordView<'_> {
        RecordView::parse(buf).unwrap()
    }

    fn f(filter: Filter) -> CompiledFilter {
        CompiledFilter::new(&filter).unwrap()
    }

    #[test]
    fn priority_range_includes_both_ends_and_excludes_missing_priority() {
        let err_and_worse = f(Filter { priority: Some((0, 3)), ..Default::default() });
        assert!(err_and_worse.matches(&view(&rec(&[("PRIORITY", "3")]))));
        assert!(!err_and_worse.matches(&view(&rec(&[("PRIORITY", "4")]))));
        assert!(!err_and_worse.matches(&view(&rec(&[("MESSAGE", "no priority")]))));
        let range = f(Filter { priority: Some((4, 3)), ..Default::default() });
        assert!(range.matches(&view(&rec(&[("PRIORITY", "4")]))));
        assert!(range.matches(&view(&rec(&[("PRIORITY", "3")]))));
        assert!(!range.matches(&view(&rec(&[("PRIORITY", "2")]))));
    }

    #[test]
    fn unit_names_get_service_suffix_and_globs() {
        let u = f(Filter { units: vec!["sshd".into()], ..Default::default() });
        assert!(u.matches(&view(&rec(&[("_SYSTEMD_UNIT", "sshd.service")]))));
        assert!(!u.matches(&view(&rec(&[("_SYSTEMD_UNIT", "sshd.socket")]))));
        let g = f(Filter { units: vec!["qubes-*".into()], ..Default::default() });
        assert!(g.matches(&view(&rec(&[("UNIT", "qubes-qrexec-agent.service"), ("_PID", "1")]))));
        assert!(!g.matches(&view(&rec(&[("UNIT", "qubes-qrexec-agent.service"), ("_PID", "42")]))));
        assert!(glob_match(b"a*b?c", b"axxbyc") && !glob_match(b"a*b", b"ac"));
    }

    #[test]
    fn same_field_is_or_and_different_fields_are_and() {
        let m = f(Filter {
            matches: vec![
                ("A".into(), "1".into()),
                ("A".into(), "2".into()),
                ("B".into(), "x".into()),
            ],
            ..Default::default()
        });
        assert!(m.matches(&view(&rec(&[("A", "2"), ("B", "x")]))));
        assert!(!m.matches(&view(&rec(&[("A", "2")]))));
        assert!(!m.matches(&view(&rec(&[("A", "3"), ("B", "x")]))));
        let vm =
            f(Filter { matches: vec![("_QLOG_VM".into(), "sd-app".into())], ..Default::default() });
        assert!(vm.matches(&view(&rec(&[]))));
    }

    #[test]
    fn grep_honours_case_flag_and_bad_patterns_are_errors() {
        let g = |p: &str, ci| {
            f(Filter {
                grep: Some(Grep { pattern: p.into(), case_insensitive: ci }),
                ..Default::default()
            })
        };
        assert!(g("fail", true).matches(&view(&rec(&[("MESSAGE", "Disk FAILED")]))));
        assert!(!g("fail", false).matches(&view(&rec(&[("MESSAGE", "Disk FAILED")]))));
        assert!(!g("x", true).matches(&view(&rec(&[]))));
        let bad = Filter {
            grep: Some(Grep { pattern: "(".into(), case_insensitive: false }),
            ..Default::default()
        };
        assert!(CompiledFilter::new(&bad).unwrap_err().contains("invalid grep pattern"));
    }

    #[test]
    fn time_bounds_are_inclusive_on_receive_time() {
        let t = f(Filter { since_usec: Some(1000), until_usec: Some(1000), ..Default::default() });
        assert!(t.matches(&view(&rec(&[]))));
        let t = f(Filter { since_usec: Some(1001), ..Default::default() });
        assert!(!t.matches(&view(&rec(&[]))));
    }
    /// Every combination of the fields the batch keys describe, including the awkward
    /// ones: no value, a bad value, two values, a unit only systemd may name.
    fn key_corpus() -> Vec<Vec<u8>> {
        let priorities: &[&[&str]] =
            &[&[], &["0"], &["3"], &["4"], &["7"], &["x"], &["33"], &["6", "3"]];
        let units: &[&[(&str, &str)]] = &[
            &[],
            &[("_SYSTEMD_UNIT", "sshd.service")],
            &[("_SYSTEMD_UNIT", "qubes-gui-agent.service")],
            &[("_SYSTEMD_UNIT", "cups.service"), ("_SYSTEMD_UNIT", "sshd.service")],
            &[("UNIT", "sshd.service"), ("_PID", "1")],
            &[
                ("_SYSTEMD_UNIT", "cups.service"),
                ("OBJECT_SYSTEMD_UNIT", "sshd.service"),
                ("_UID", "0"),
            ],
            &[
                ("COREDUMP_UNIT", "sshd.service"),
                ("_UID", "0"),
                ("MESSAGE_ID", "fc2e22bc6ee647b6b90729ab34a250b1"),
            ],
        ];
        let identifiers: &[&[&str]] = &[&[], &["sshd"], &["cupsd"], &["cupsd", "sshd"]];
        let mut corpus = Vec::new();
        for p in priorities {
            for u in units {
                for i in identifiers {
                    let mut fields: Vec<(&str, &str)> =
                        p.iter().map(|v| ("PRIORITY", *v)).collect();
                    fields.extend_from_slice(u);
                    fields.extend(i.iter().map(|v| ("SYSLOG_IDENTIFIER", *v)));
                    corpus.push(rec(&fields));
                }
            }
        }
        corpus
    }

    #[test]
    fn batch_keys_never_leave_out_a_record_the_filter_keeps() {
        let corpus = key_corpus();
        let raw = corpus.concat();
        let (_, value) = crate::batch::encode(1000, 1000, &raw);
        let head_len = crate::batch::head_len(&value).unwrap();
        let head = crate::batch::Head::parse(
            &value[..crate::batch::FIXED_LEN + head_len],
            value.len() as u64,
        )
        .unwrap();
        let m = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let filters = [
            Filter { priority: Some((0, 3)), ..Default::default() },
            Filter { priority: Some((6, 7)), ..Default::default() },
            Filter { units: vec!["sshd".into()], ..Default::default() },
            Filter { units: vec!["qubes-*".into(), "cups".into()], ..Default::default() },
            Filter { identifiers: vec!["sshd".into()], ..Default::default() },
            Filter { matches: m(&[("SYSLOG_IDENTIFIER", "cupsd")]), ..Default::default() },
            Filter { matches: m(&[("_SYSTEMD_UNIT", "cups.service")]), ..Default::default() },
            Filter {
                priority: Some((0, 3)),
                units: vec!["sshd".into()],
                identifiers: vec!["sshd".into()],
                matches: m(&[("_SYSTEMD_UNIT", "sshd.service"), ("SYSLOG_IDENTIFIER", "sshd")]),
                ..Default::default()
            },
        ];
        for filter in filters {
            let compiled = f(filter.clone());
            let candidates =
                compiled.candidates(&head.columns).expect("the filter asks about keys");
            assert_eq!(candidates.len(), corpus.len());
            let kept: Vec<bool> = corpus.iter().map(|r| compiled.matches(&view(r))).collect();
            for (i, (&keep, &candidate)) in kept.iter().zip(&candidates).enumerate() {
                assert!(
                    candidate || !keep,
                    "{filter:?} keeps record {i} but the keys leave it out"
                );
            }
            let left_out = candidates.iter().filter(|c| !**c).count();
            assert!(left_out >= corpus.len() / 4, "{filter:?}: the keys left out only {left_out}");
        }
        let other = f(Filter {
            grep: Some(Grep { pattern: "x".into(), case_insensitive: false }),
            ..Default::default()
        });
        assert!(other.candidates(&head.columns).is_none(), "a grep is not answered by keys");
    }
    #[test]
    fn a_chunk_is_skipped_only_when_no_message_in_it_can_match() {
        let grep = |pattern: &str| {
            let case_insensitive = !pattern.chars().any(char::is_uppercase);
            let g = Grep { pattern: pattern.into(), case_insensitive };
            f(Filter { grep: Some(g), ..Default::default() })
        };
        let messages =
            ["export file 3fa: permission denied", "Export FILE 9: Permission", "nothing", "x"];
        let records: Vec<Vec<u8>> =
            messages.iter().map(|m| rec(&[("MESSAGE", m), ("PRIORITY", "3")])).collect();
        let chunk = records.concat();
        for pattern in [
            "permission",
            "export file [0-9a-f]+: permission",
            "Permission",
            "^export",
            r"\bx",
            "x$",
            "nothing",
        ] {
            let filter = grep(pattern);
            for r in &records {
                if filter.matches(&view(r)) {
                    assert!(filter.may_match_in(r), "{pattern}: a matching record's own bytes");
                    assert!(filter.may_match_in(&chunk), "{pattern}: the chunk holding it");
                }
            }
        }
        // Bytes in no message at all: skipped by a plain pattern, never by an anchored one.
        let other = rec(&[("MESSAGE", "all quiet"), ("_COMM", "permission")]);
        assert!(!grep("permission").matches(&view(&other)));
        assert!(grep("permission").may_match_in(&other), "a superset: other fields may match");
        let quiet = rec(&[("MESSAGE", "all quiet")]);
        assert!(!grep("permission").may_match_in(&quiet));
        assert!(grep("^permission").may_match_in(&quiet), "an anchored pattern reads every record");
        assert!(grep(r"\bpermission").may_match_in(&quiet));
        assert!(f(Filter::default()).may_match_in(&quiet));
    }
}
