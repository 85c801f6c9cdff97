//! Redaction: turning a stored record into one fit to leave the log qube, and checking
//! afterwards that nothing sensitive is left. Owns the field allowlist's application,
//! the merging of findings, what each finding is replaced with, the per-rule counts, and
//! the leak scan; the patterns are [`super::detectors`]', the profile
//! [`super::rules`]', the tokens [`super::pseudonym`]'s.
//!
//! One value is redacted in three steps. Every rule reports what it finds: the built-in
//! detectors, the known VM names, the operator's keywords and regexes. Findings inside a
//! token are dropped, as are allowlisted host names. Overlapping findings are merged, so
//! that the union of what any rule found is replaced: a partial overlap becomes one token
//! over both. Each remaining finding becomes a token, except that a URL keeps its known
//! scheme, its port and an allowlisted host, and a home path keeps everything but the
//! user name.
//!
//! The leak scan ([`Redactor::leak`]) runs the same rules over what was written, with
//! every token blanked out first: any finding that would still change something is a
//! leak. Since no detector matches across a newline, files are scanned line by line.
//!
//! A token is only a token between word boundaries (so that `ip-0123456789abc` in a
//! VM's own text is not taken for one and left alone), so no replacement is left glued
//! to a word character: one that would be grows to the whole word.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::ops::Range;

use qlog_rpc::event::Field;
use qlog_rpc::query::Record;
use qlog_rpc::Event;
use regex::bytes::{Regex, RegexBuilder};

use super::detectors::{is_known_scheme, Detector, Detectors, Finding, UrlParts};
use super::pseudonym::{token_regex, PseudonymKey, Pseudonyms};
use super::rules::{Profile, RESERVED_PREFIXES};
use crate::escape::{escape_line, is_binary};

/// A rule that can fire: a built-in detector or one of the profile's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// The operator's regex number N, in rules file order. First, so that at equal spans
    /// the operator's more specific rule names the token.
    UserRegex(usize),
    Keyword,
    /// Before the detectors, so a VM name is always the VM's token, even where it is
    /// also a home directory (`/home/work/`).
    VmName,
    Builtin(Detector),
    /// A value that is binary and so cannot be scanned: removed whole.
    Binary,
}

/// How often one rule fired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Values replaced.
    pub replaced: u64,
    /// Distinct tokens it produced.
    pub distinct: u64,
    /// With [`Redactor::collect_examples`]: up to [`EXAMPLES`] redacted excerpts, each
    /// around a new token, escaped for a terminal.
    pub examples: Vec<String>,
}

/// Examples kept per rule for `--dry-run`.
pub const EXAMPLES: usize = 3;

/// What replaces a binary value, with its length.
const BINARY_PLACEHOLDER: &str = "[binary value removed by redaction";

/// How many times [`Redactor::redact_value`] plans one value at most. Each pass only adds
/// tokens, so this is a safety net against a loop, not a limit real values reach.
const MAX_PASSES: usize = 8;

/// The prefix of the token that stands for a URL's user and password.
const CREDENTIAL_PREFIX: &str = "cred";

/// One replacement decided for a value.
#[derive(Debug, Clone)]
struct Planned {
    span: Range<usize>,
    rule: Rule,
    replacement: Vec<u8>,
    /// Tokens in the replacement, with the canonical value and the rule to record them
    /// under.
    tokens: Vec<(String, Vec<u8>, Rule)>,
}

/// The known VM names that are not allowlisted, to find them inside values.
#[derive(Debug)]
struct VmNames {
    regex: Regex,
    /// Lower-case name to the name as qrexec spells it.
    canonical: HashMap<String, String>,
}

pub struct Redactor {
    detectors: Detectors,
    profile: Profile,
    vm_names: Option<VmNames>,
    keywords: Option<Regex>,
    tokens: Regex,
    /// Finds [`BINARY_PLACEHOLDER`]s, to leave them alone.
    placeholder: Regex,
    pseudonyms: Pseudonyms,
    stats: BTreeMap<Rule, RuleStats>,
    vm_tokens: HashMap<String, String>,
    fields_dropped: u64,
    /// True if and only if `--dry-run` wants examples.
    pub collect_examples: bool,
}

impl Redactor {
    /// `vms` are every VM name the sink knows: each may turn up inside any value.
    pub fn new<'a>(
        profile: Profile,
        key: &PseudonymKey,
        vms: impl IntoIterator<Item = &'a str>,
    ) -> Redactor {
        let mut canonical = HashMap::new();
        for vm in vms {
            if !profile.vms.contains(vm) {
                canonical.entry(vm.to_ascii_lowercase()).or_insert_with(|| vm.to_owned());
            }
        }
        let vm_names = (!canonical.is_empty()).then(|| {
            let mut names: Vec<&String> = canonical.keys().collect();
            names.sort_by_key(|n| std::cmp::Reverse(n.len()));
            let alternatives: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
            let regex = Regex::new(&format!("(?i-u)(?:{})", alternatives.join("|")))
                .expect("escaped VM names compile");
            VmNames { regex, canonical }
        });
        let keywords = (!profile.keywords.is_empty()).then(|| {
            let mut words: Vec<&String> = profile.keywords.iter().collect();
            words.sort_by_key(|w| std::cmp::Reverse(w.len()));
            let alternatives: Vec<String> = words.iter().map(|w| regex::escape(w)).collect();
            RegexBuilder::new(&format!("(?i)(?:{})", alternatives.join("|")))
                .size_limit(16 << 20)
                .build()
                .expect("escaped keywords of bounded length compile")
        });
        let prefixes: Vec<&str> = RESERVED_PREFIXES
            .iter()
            .copied()
            .chain(profile.regexes.iter().map(|r| r.token_prefix.as_str()))
            .collect();
        Redactor {
            detectors: Detectors::new(),
            tokens: token_regex(prefixes),
            placeholder: Regex::new(&format!(
                r"(?-u){} [0-9]+ bytes\]",
                regex::escape(&format!("{BINARY_PLACEHOLDER},"))
            ))
            .expect("the placeholder pattern compiles"),
            vm_names,
            keywords,
            pseudonyms: Pseudonyms::new(key),
            stats: BTreeMap::new(),
            vm_tokens: HashMap::new(),
            fields_dropped: 0,
            collect_examples: false,
            profile,
        }
    }

    /// Also leaves tokens with these prefixes alone (a bundle's own, for its re-scan).
    /// Prefixes that are not lower-case words are ignored.
    pub fn add_token_prefixes(&mut self, extra: &[String]) {
        let valid = |p: &&String| {
            (1..=16).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let prefixes: Vec<&str> = RESERVED_PREFIXES
            .iter()
            .copied()
            .chain(self.profile.regexes.iter().map(|r| r.token_prefix.as_str()))
            .chain(extra.iter().filter(valid).map(String::as_str))
            .collect();
        self.tokens = token_regex(prefixes);
    }

    pub fn pseudonyms(&self) -> &Pseudonyms {
        &self.pseudonyms
    }

    /// Fields left out because they are not on the allowlist.
    pub fn fields_dropped(&self) -> u64 {
        self.fields_dropped
    }

    /// Every rule that fired, in report order.
    pub fn stats(&self) -> &BTreeMap<Rule, RuleStats> {
        &self.stats
    }

    /// The rule's name in manifests and messages.
    pub fn rule_name(&self, rule: Rule) -> String {
        rule_name(&self.profile, rule)
    }

    /// The prefix of the rule's tokens, empty for rules that leave none.
    pub fn rule_token_prefix(&self, rule: Rule) -> String {
        match rule {
            Rule::UserRegex(i) => self.profile.regexes[i].token_prefix.clone(),
            Rule::Keyword => "kw".to_owned(),
            Rule::Builtin(d) => d.token_prefix().to_owned(),
            Rule::VmName => "vm".to_owned(),
            Rule::Binary => String::new(),
        }
    }

    /// The name a VM has in the bundle: its token, or itself if allowlisted.
    pub fn vm_token(&mut self, vm: &str) -> String {
        let token = match self.vm_tokens.get(vm) {
            Some(token) => token.clone(),
            None => {
                let token = if self.profile.vms.contains(vm) {
                    vm.to_owned()
                } else {
                    let token = self.pseudonyms.token("vm", vm.as_bytes());
                    let new =
                        self.pseudonyms.record(&token, || "vm-name".to_owned(), vm.as_bytes());
                    self.stats.entry(Rule::VmName).or_default().distinct += u64::from(new);
                    token
                };
                self.vm_tokens.insert(vm.to_owned(), token.clone());
                token
            }
        };
        if token != vm {
            self.stats.entry(Rule::VmName).or_default().replaced += 1;
        }
        token
    }

    /// The record as it may leave: allowlisted fields only, every value valid UTF-8 and
    /// redacted, the VM by its token. Valid UTF-8 because a JSON byte array, journalctl's
    /// way with such values, would hide the text from readers and from the leak scan.
    /// Invalid UTF-8 becomes U+FFFD *before* redaction, so that the rules see the very
    /// bytes a bundle holds: a rule that stops at an invalid byte may run on over the
    /// replacement character, and the leak scan reads the written file. Takes the record
    /// so that what needs no change moves instead of being copied.
    pub fn redact_record(&mut self, r: Record) -> Record {
        let vm = self.vm_token(&r.vm);
        let stream = match self.redact_value(r.stream.as_bytes()) {
            Cow::Borrowed(_) => r.stream,
            Cow::Owned(v) => String::from_utf8_lossy(&v).into_owned(),
        };
        let mut event = Event::new();
        for f in r.event.fields {
            if !self.profile.field_allowed(&f.name) {
                self.fields_dropped += 1;
                continue;
            }
            // Binary values cannot be scanned reliably (a secret in UTF-16 is not ASCII),
            // so they do not leave at all.
            if is_binary(&f.value) {
                self.stats.entry(Rule::Binary).or_default().replaced += 1;
                let placeholder = format!("{BINARY_PLACEHOLDER}, {} bytes]", f.value.len());
                event.push(f.name, placeholder);
                continue;
            }
            let value = match String::from_utf8(f.value) {
                Ok(text) => text.into_bytes(),
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned().into_bytes(),
            };
            let redacted = match self.redact_value(&value) {
                Cow::Borrowed(_) => None,
                Cow::Owned(v) => Some(v),
            };
            event.fields.push(Field { name: f.name, value: redacted.unwrap_or(value) });
        }
        Record { vm, stream, received_usec: r.received_usec, seq: r.seq, kind: r.kind, event }
    }

    /// Replaces everything any rule finds in `value`, counting what fired.
    ///
    /// A replacement can complete a pattern that the value only held in part: in
    /// `fe80::1es.in` no address ends before the `s`, but once the host name `1es.in` is a
    /// token, `fe80::` stands alone and is one. So the value is planned again as the leak
    /// scan sees it, tokens blanked, until nothing more is found; otherwise any VM could
    /// make every export of its logs fail the leak check. Each pass only adds tokens. If
    /// [`MAX_PASSES`] are not enough (a run of pieces that each replacement leaves
    /// another one of), what is still found takes its whole run of non-blank bytes as
    /// one token, which nothing next to it can complete; the leak scan still fails
    /// closed after that.
    pub fn redact_value<'v>(&mut self, value: &'v [u8]) -> Cow<'v, [u8]> {
        let mut out = Cow::Borrowed(value);
        let mut planned = self.plan(value);
        let mut scratch = Vec::new();
        for _ in 0..MAX_PASSES {
            if !planned.is_empty() {
                out = Cow::Owned(self.apply(&out, &planned));
            }
            scratch.clear();
            scratch.extend_from_slice(&out);
            if !self.blank_own_text(&mut scratch, &[]) && planned.is_empty() {
                break;
            }
            planned = self.plan_in(&scratch, &out);
            if planned.is_empty() {
                break;
            }
        }
        if !planned.is_empty() {
            let planned = self.plan_blank_to_blank(&scratch, &planned);
            out = Cow::Owned(self.apply(&out, &planned));
        }
        out
    }

    /// The last resort of [`Redactor::redact_value`]: each of `planned` grown to the
    /// run of non-blank bytes around it in `value`, overlapping ones merged, each one
    /// token of its rule.
    fn plan_blank_to_blank(&self, value: &[u8], planned: &[Planned]) -> Vec<Planned> {
        let mut spans: Vec<(Range<usize>, Rule)> = Vec::with_capacity(planned.len());
        for p in planned {
            let span = grow(p.span.clone(), value, |b| !b.is_ascii_whitespace());
            match spans.last_mut() {
                Some((last, _)) if span.start <= last.end => last.end = last.end.max(span.end),
                _ => spans.push((span, p.rule)),
            }
        }
        spans
            .into_iter()
            .map(|(span, rule)| self.plan_group(value, span, rule, None, true, &[]))
            .collect()
    }

    /// Makes the planned replacements in `value`, counting what fired.
    fn apply(&mut self, value: &[u8], planned: &[Planned]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + 16 * planned.len());
        let mut pos = 0;
        let mut new_tokens = Vec::new();
        for p in planned {
            out.extend_from_slice(&value[pos..p.span.start]);
            let out_start = out.len();
            out.extend_from_slice(&p.replacement);
            pos = p.span.end;
            let stats = self.stats.entry(p.rule).or_default();
            stats.replaced += 1;
            for (token, canonical, rule) in &p.tokens {
                // A URL's host counts for its own kind too: an onion in a URL is an onion.
                if *rule != p.rule {
                    self.stats.entry(*rule).or_default().replaced += 1;
                }
                let profile = &self.profile;
                if self.pseudonyms.record(token, || rule_name(profile, *rule), canonical) {
                    self.stats.entry(*rule).or_default().distinct += 1;
                    new_tokens.push((p.rule, out_start..out_start + p.replacement.len()));
                }
            }
        }
        out.extend_from_slice(&value[pos..]);
        if self.collect_examples {
            for (rule, range) in new_tokens {
                let stats = self.stats.entry(rule).or_default();
                if stats.examples.len() < EXAMPLES {
                    stats.examples.push(excerpt(&out, range));
                }
            }
        }
        out
    }

    /// Blanks out, in place, what redaction itself wrote (tokens, binary placeholders)
    /// and `masks`. Returns true if and only if it blanked anything.
    fn blank_own_text(&self, scratch: &mut [u8], masks: &[&[u8]]) -> bool {
        let mut blank: Vec<Range<usize>> = Vec::new();
        if scratch.contains(&b'-') {
            blank.extend(self.tokens.find_iter(scratch).map(|m| m.range()));
        }
        // The placeholder of a removed binary value is the redaction's own text.
        if scratch.len() >= BINARY_PLACEHOLDER.len() {
            blank.extend(self.placeholder.find_iter(scratch).map(|m| m.range()));
        }
        for mask in masks.iter().filter(|m| !m.is_empty()) {
            let mut at = 0;
            while let Some(p) = scratch[at..].windows(mask.len()).position(|w| w == *mask) {
                blank.push(at + p..at + p + mask.len());
                at += p + mask.len();
            }
        }
        let any = !blank.is_empty();
        for r in blank {
            scratch[r].fill(b' ');
        }
        any
    }

    /// The first rule that would still change something in `text`, which is a file's
    /// line as written (JSON if `json`). `masks` are strings known to be safe there (the
    /// manifest's own hashes). `scratch` is reused between calls.
    pub fn leak(
        &self,
        text: &[u8],
        json: bool,
        masks: &[&[u8]],
        scratch: &mut Vec<u8>,
    ) -> Option<Rule> {
        scratch.clear();
        scratch.extend_from_slice(text);
        if json {
            blank_json_syntax(scratch);
        }
        self.blank_own_text(scratch, masks);
        self.plan(scratch).first().map(|p| p.rule)
    }

    /// Decides every replacement in `value`, in order, without recording anything.
    fn plan(&self, value: &[u8]) -> Vec<Planned> {
        self.plan_in(value, value)
    }

    /// [`Redactor::plan`] over `value`, a copy of `written` with the redaction's own
    /// text blanked out so that no rule finds it again. Where a word ends is read in
    /// `written`: there a blanked token is still a word, which a new token next to it
    /// would be glued to.
    fn plan_in(&self, value: &[u8], written: &[u8]) -> Vec<Planned> {
        debug_assert_eq!(value.len(), written.len());
        let mut findings: Vec<(Range<usize>, Rule, Option<UrlParts>)> = Vec::new();
        for (i, user) in self.profile.regexes.iter().enumerate() {
            findings
                .extend(user.regex.find_iter(value).map(|m| (m.range(), Rule::UserRegex(i), None)));
        }
        if let Some(keywords) = &self.keywords {
            findings.extend(keywords.find_iter(value).map(|m| (m.range(), Rule::Keyword, None)));
        }
        let mut builtin: Vec<Finding> = Vec::new();
        self.detectors.find(value, &mut builtin);
        for f in builtin {
            // An allowlisted host stays, unless another rule also found something in it.
            if f.detector == Detector::Hostname
                && self.profile.domain_allowed(&canonical_host(&value[f.span.clone()]))
            {
                continue;
            }
            findings.push((f.span, Rule::Builtin(f.detector), f.url));
        }
        if let Some(vms) = &self.vm_names {
            find_vm_names(&vms.regex, value, &mut findings);
        }
        if findings.is_empty() {
            return Vec::new();
        }

        // A token already in the value is left as it is: it is no secret.
        if value.contains(&b'-') {
            let tokens: Vec<Range<usize>> =
                self.tokens.find_iter(value).map(|m| m.range()).collect();
            if !tokens.is_empty() {
                findings.retain(|(span, _, _)| {
                    !tokens.iter().any(|t| t.start <= span.start && span.end <= t.end)
                });
            }
        }

        // An IPv6 finding inside a longer run of hex digits and colons (`b::b:E::b::`,
        // no address as a whole) takes the run: otherwise each replacement leaves the
        // piece before it standing alone as an address, and the re-scan peels the run
        // one piece per pass until the passes run out. A single colon ending the run is
        // punctuation (`fe80::1: up`) and stays out of it.
        let hex_or_colon = |b: u8| b.is_ascii_hexdigit() || b == b':';
        for (span, rule, _) in &mut findings {
            if *rule != Rule::Builtin(Detector::Ipv6) {
                continue;
            }
            let mut run = grow(span.clone(), value, hex_or_colon);
            if run.end > span.end && value[run.end - 1] == b':' && value[run.end - 2] != b':' {
                run.end -= 1;
            }
            *span = run;
        }

        // Merge: outer spans win, partial overlaps become one span over both.
        findings.sort_by(|a, b| {
            a.0.start.cmp(&b.0.start).then(b.0.end.cmp(&a.0.end)).then(a.1.cmp(&b.1))
        });
        let mut groups: Vec<(Range<usize>, Rule, Option<UrlParts>, bool)> = Vec::new();
        for (span, rule, url) in &findings {
            if let Some(last) = groups.last_mut() {
                if span.start < last.0.end {
                    if span.end > last.0.end {
                        last.0.end = span.end;
                        last.3 = true;
                    }
                    continue;
                }
            }
            groups.push((span.clone(), *rule, url.clone(), false));
        }

        // No replacement may be glued to a word character next to it: a token so glued
        // would not be one to the re-scan, which would then find it again together with
        // its neighbours, pass after pass. Such a replacement grows to the whole word
        // (read in `written`, where a blanked token is still a word) and becomes one
        // token, as a merged span does, which may then meet the one before.
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let glued = |p: &Planned| {
            let (first, last) = (p.replacement.first(), p.replacement.last());
            (p.span.start > 0 && word(written[p.span.start - 1]) && first.is_some_and(|&b| word(b)))
                || (p.span.end < written.len()
                    && word(written[p.span.end])
                    && last.is_some_and(|&b| word(b)))
        };
        let mut planned: Vec<Planned> = Vec::with_capacity(groups.len());
        for (span, rule, url, merged) in groups {
            let mut p = self.plan_group(value, span, rule, url.as_ref(), merged, &findings);
            // A URL whose every piece may stay readable is no replacement.
            if p.replacement.as_slice() == &value[p.span.clone()] {
                continue;
            }
            loop {
                let overlaps = planned.last().is_some_and(|last| p.span.start < last.span.end);
                if overlaps {
                    let last = planned.pop().expect("checked above");
                    let span = last.span.start..last.span.end.max(p.span.end);
                    p = self.plan_group(value, span, last.rule, None, true, &findings);
                } else if glued(&p) {
                    let span = grow(p.span.clone(), written, word);
                    p = self.plan_group(value, span, p.rule, None, true, &findings);
                } else {
                    break;
                }
            }
            planned.push(p);
        }
        planned
    }

    /// The replacement of one merged group of findings: a URL piece by piece, anything
    /// else one token.
    fn plan_group(
        &self,
        value: &[u8],
        span: Range<usize>,
        rule: Rule,
        url: Option<&UrlParts>,
        merged: bool,
        findings: &[(Range<usize>, Rule, Option<UrlParts>)],
    ) -> Planned {
        if let (Some(parts), false) = (url, merged) {
            return self.plan_url(value, span, parts, findings);
        }
        let (prefix, canonical) = self.canonical(rule, &value[span.clone()], merged);
        let token = self.pseudonyms.token(&prefix, &canonical);
        Planned {
            span,
            rule,
            replacement: token.clone().into_bytes(),
            tokens: vec![(token, canonical, rule)],
        }
    }

    /// The token prefix and canonical form of a finding: one spelling per value, so
    /// that `10.0.0.1` and `AA-BB-...` written two ways get one token each.
    fn canonical(&self, rule: Rule, text: &[u8], merged: bool) -> (String, Vec<u8>) {
        let prefix = self.rule_token_prefix(rule);
        if merged {
            return (if prefix.is_empty() { "secret".to_owned() } else { prefix }, text.to_vec());
        }
        let canonical = match rule {
            Rule::Builtin(Detector::Ipv4 | Detector::Ipv6) => canonical_ip(text),
            Rule::Builtin(Detector::Email | Detector::Hostname | Detector::Onion) => {
                canonical_host(text)
            }
            Rule::Builtin(Detector::Mac) => text
                .iter()
                .map(|b| if *b == b'-' { b':' } else { b.to_ascii_lowercase() })
                .collect(),
            Rule::Builtin(
                Detector::Uuid
                | Detector::Id128
                | Detector::HexSecret
                | Detector::PgpFingerprint
                | Detector::PgpKeyId,
            ) => {
                let lower: Vec<u8> =
                    text.iter().filter(|b| **b != b' ').map(u8::to_ascii_lowercase).collect();
                lower.strip_prefix(b"0x").map(<[u8]>::to_vec).unwrap_or(lower)
            }
            Rule::VmName => {
                let lower = String::from_utf8_lossy(text).to_ascii_lowercase();
                let vms = self.vm_names.as_ref().expect("VM findings come from the VM names");
                vms.canonical.get(&lower).map_or_else(|| text.to_vec(), |c| c.as_bytes().to_vec())
            }
            Rule::Keyword => String::from_utf8_lossy(text).to_lowercase().into_bytes(),
            _ => text.to_vec(),
        };
        (prefix, canonical)
    }

    /// A URL piece by piece: a known scheme, the port and an allowlisted host stay
    /// readable; credentials, the host and path-query-fragment become tokens.
    fn plan_url(
        &self,
        value: &[u8],
        span: Range<usize>,
        parts: &UrlParts,
        findings: &[(Range<usize>, Rule, Option<UrlParts>)],
    ) -> Planned {
        let rule = Rule::Builtin(Detector::Url);
        // What other rules found inside the URL. Host-shaped findings in the host are the
        // host itself; anything else (a keyword, a user's pattern) means the piece it
        // touches cannot stay readable.
        let foreign = |r: &Range<usize>| {
            findings.iter().any(|(s, fr, _)| {
                let host_like = matches!(
                    fr,
                    Rule::Builtin(
                        Detector::Hostname | Detector::Ipv4 | Detector::Ipv6 | Detector::Onion
                    )
                );
                *fr != rule && !host_like && s.start < r.end && r.start < s.end
            })
        };
        let whole = |this: &Redactor| {
            let token = this.pseudonyms.token("url", &value[span.clone()]);
            Planned {
                span: span.clone(),
                rule,
                replacement: token.clone().into_bytes(),
                tokens: vec![(token, value[span.clone()].to_vec(), rule)],
            }
        };
        let scheme = &value[parts.scheme.clone()];
        if !is_known_scheme(scheme)
            || foreign(&parts.scheme)
            || parts.port.as_ref().is_some_and(&foreign)
        {
            return whole(self);
        }

        let mut out = Vec::new();
        let mut tokens = Vec::new();
        out.extend_from_slice(scheme);
        out.extend_from_slice(b"://");
        if let Some(userinfo) = &parts.userinfo {
            let text = &value[userinfo.clone()];
            if !text.is_empty() {
                let token = self.pseudonyms.token(CREDENTIAL_PREFIX, text);
                out.extend_from_slice(token.as_bytes());
                tokens.push((token, text.to_vec(), rule));
            }
            out.push(b'@');
        }
        let host = &value[parts.host.clone()];
        if !host.is_empty() {
            match self.plan_host(host, foreign(&parts.host)) {
                Some((token, canonical, host_rule)) => {
                    out.extend_from_slice(token.as_bytes());
                    tokens.push((token, canonical, host_rule));
                }
                None => out.extend_from_slice(host),
            }
        }
        if let Some(port) = &parts.port {
            out.push(b':');
            out.extend_from_slice(&value[port.clone()]);
        }
        if let Some(rest) = &parts.rest {
            let text = &value[rest.clone()];
            out.push(text[0]);
            let tail = &text[1..];
            let is_token = self.tokens.find(tail).is_some_and(|m| m.range() == (0..tail.len()));
            if !tail.is_empty() && !is_token {
                let token = self.pseudonyms.token("url", tail);
                out.extend_from_slice(token.as_bytes());
                tokens.push((token, tail.to_vec(), rule));
            } else {
                out.extend_from_slice(tail);
            }
        }
        Planned { span, rule, replacement: out, tokens }
    }

    /// The token for a URL's host, by what the host is; `None` to keep it readable.
    fn plan_host(&self, host: &[u8], foreign: bool) -> Option<(String, Vec<u8>, Rule)> {
        if self.tokens.find(host).is_some_and(|m| m.range() == (0..host.len())) {
            return None;
        }
        let bare = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")).unwrap_or(host);
        let ip = std::str::from_utf8(bare).ok().and_then(|s| s.parse::<IpAddr>().ok());
        if let Some(ip) = ip {
            let keep = match ip {
                IpAddr::V4(a) => a.is_loopback() || a.is_unspecified() || a.is_broadcast(),
                IpAddr::V6(a) => a.is_loopback() || a.is_unspecified(),
            };
            if keep && !foreign {
                return None;
            }
            let detector = if ip.is_ipv4() { Detector::Ipv4 } else { Detector::Ipv6 };
            let canonical = ip.to_string().into_bytes();
            return Some((
                self.pseudonyms.token("ip", &canonical),
                canonical,
                Rule::Builtin(detector),
            ));
        }
        let canonical = canonical_host(host);
        if canonical.ends_with(b".onion") {
            let token = self.pseudonyms.token("onion", &canonical);
            return Some((token, canonical, Rule::Builtin(Detector::Onion)));
        }
        if let Some(vms) = &self.vm_names {
            if let Some(vm) = vms.canonical.get(String::from_utf8_lossy(&canonical).as_ref()) {
                return Some((
                    self.pseudonyms.token("vm", vm.as_bytes()),
                    vm.as_bytes().to_vec(),
                    Rule::VmName,
                ));
            }
        }
        if !foreign && self.profile.domain_allowed(&canonical) {
            return None;
        }
        let token = self.pseudonyms.token("host", &canonical);
        Some((token, canonical, Rule::Builtin(Detector::Hostname)))
    }
}

pub fn rule_name(profile: &Profile, rule: Rule) -> String {
    match rule {
        Rule::UserRegex(i) => format!("regex:{}", profile.regexes[i].name),
        Rule::Keyword => "keyword".to_owned(),
        Rule::Builtin(d) => d.name().to_owned(),
        Rule::VmName => "vm-name".to_owned(),
        Rule::Binary => "binary-value".to_owned(),
    }
}

/// VM names standing alone: not inside a longer name (`work` in `network` or in
/// `work-queue` is not the VM `work`).
fn find_vm_names(
    regex: &Regex,
    value: &[u8],
    out: &mut Vec<(Range<usize>, Rule, Option<UrlParts>)>,
) {
    let name_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    let mut at = 0;
    while let Some(m) = regex.find_at(value, at) {
        let alone = (m.start() == 0 || !name_byte(value[m.start() - 1]))
            && !value.get(m.end()).is_some_and(|&b| name_byte(b));
        if alone {
            out.push((m.range(), Rule::VmName, None));
            at = m.end();
        } else {
            at = m.start() + 1;
        }
        if at >= value.len() {
            break;
        }
    }
}

fn canonical_host(text: &[u8]) -> Vec<u8> {
    let mut lower = text.to_ascii_lowercase();
    while lower.last() == Some(&b'.') {
        lower.pop();
    }
    lower
}

/// One spelling per address; a zone (`%eth0`) stays part of it.
/// `span` grown both ways over the bytes of `text` that `take` accepts.
fn grow(mut span: Range<usize>, text: &[u8], take: impl Fn(u8) -> bool) -> Range<usize> {
    while span.start > 0 && take(text[span.start - 1]) {
        span.start -= 1;
    }
    while span.end < text.len() && take(text[span.end]) {
        span.end += 1;
    }
    span
}

fn canonical_ip(text: &[u8]) -> Vec<u8> {
    let (addr, zone) = match text.iter().position(|&b| b == b'%') {
        Some(p) => (&text[..p], &text[p..]),
        None => (text, &b""[..]),
    };
    let parsed = std::str::from_utf8(addr).ok().and_then(|s| {
        s.parse::<IpAddr>().ok().or_else(|| s.parse::<Ipv6Addr>().ok().map(IpAddr::V6))
    });
    match parsed {
        Some(ip) => {
            let mut out = ip.to_string().into_bytes();
            out.extend_from_slice(&zone.to_ascii_lowercase());
            out
        }
        None => text.to_ascii_lowercase(),
    }
}

/// Turns a line of JSON into what its values say: string escapes (`\n`, `\"`,
/// `\u001b`) become blanks, so the scan sees the separator the escaped character was and
/// not the letter after the backslash; punctuation and object keys become blanks too.
/// Keys are field and struct names chosen by qlog and the profile, never data, and
/// blanking them keeps `"KEY":"` from looking like something (an IPv6 candidate's
/// colons) to every detector on every line. Values stay in place, at least two blanks
/// apart, so nothing can match across two of them.
fn blank_json_syntax(text: &mut [u8]) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        match text[i] {
            b'"' => {
                let start = i;
                text[i] = b' ';
                i += 1;
                while i < n && text[i] != b'"' {
                    if text[i] == b'\\' {
                        let len = if text.get(i + 1) == Some(&b'u') { 6 } else { 2 };
                        let end = (i + len).min(n);
                        text[i..end].fill(b' ');
                        i = end;
                    } else {
                        i += 1;
                    }
                }
                let end = i.min(n);
                if i < n {
                    text[i] = b' ';
                    i += 1;
                }
                let next = text[i..].iter().find(|b| !b.is_ascii_whitespace());
                if next == Some(&b':') {
                    text[start..end].fill(b' ');
                }
            }
            b'{' | b'}' | b'[' | b']' | b',' | b':' => {
                text[i] = b' ';
                i += 1;
            }
            _ => i += 1,
        }
    }
}

/// Up to 30 bytes either side of `range` in `out`, at character boundaries, escaped.
fn excerpt(out: &[u8], range: Range<usize>) -> String {
    let is_continuation = |b: u8| (0x80..0xc0).contains(&b);
    let mut start = range.start.saturating_sub(30);
    while start > 0 && is_continuation(out[start]) {
        start -= 1;
    }
    let mut end = (range.end + 30).min(out.len());
    while end < out.len() && is_continuation(out[end]) {
        end += 1;
    }
    let mut s = String::new();
    if start > 0 {
        s.push('…');
    }
    s.push_str(&escape_line(&out[start..end]));
    if end < out.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::RecordKind;

    fn redactor(profile: Profile) -> Redactor {
        Redactor::new(profile, &PseudonymKey::fixed(9), ["sd-app", "work", "dom0", "vault"])
    }

    fn redact(r: &mut Redactor, value: &str) -> String {
        String::from_utf8(r.redact_value(value.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn the_same_value_gets_the_same_token_everywhere() {
        let mut r = redactor(Profile::default());
        let a = redact(&mut r, "from 10.0.0.1, to (alice@example.com)");
        let b = redact(&mut r, "ALICE@EXAMPLE.COM wrote from 10.0.0.1");
        assert!(!a.contains("10.0.0.1") && !a.contains("alice"), "{a}");
        let ip = r.pseudonyms.token("ip", b"10.0.0.1");
        let email = r.pseudonyms.token("email", b"alice@example.com");
        assert_eq!(a, format!("from {ip}, to ({email})"));
        assert_eq!(b, format!("{email} wrote from {ip}"));
        assert_eq!(r.stats()[&Rule::Builtin(Detector::Ipv4)].replaced, 2);
        assert_eq!(r.stats()[&Rule::Builtin(Detector::Ipv4)].distinct, 1);
    }

    #[test]
    fn urls_keep_scheme_port_and_allowlisted_hosts() {
        let mut r = redactor(Profile::default());
        let out = redact(&mut r, "GET https://bob:pw@files.evil.com:8443/a?b=c done");
        assert!(out.starts_with("GET https://cred-"), "{out}");
        assert!(out.contains("@host-") && out.contains(":8443/url-"), "{out}");
        assert!(!out.contains("bob") && !out.contains("evil") && !out.contains("b=c"), "{out}");
        let kept = redact(&mut r, "see https://www.qubes-os.org/doc/ and http://127.0.0.1:80/");
        assert!(kept.starts_with("see https://www.qubes-os.org/url-"), "{kept}");
        assert!(
            kept.contains("http://127.0.0.1:80/ ") || kept.ends_with("http://127.0.0.1:80/"),
            "{kept}"
        );
        let unknown = redact(&mut r, "x-secret-scheme://host/path");
        assert!(unknown.starts_with("url-"), "{unknown}");
    }

    #[test]
    fn url_hosts_share_tokens_with_bare_values() {
        let mut r = redactor(Profile::default());
        let out = redact(&mut r, "http://10.1.2.3/x 10.1.2.3 http://mail.corp.net/ mail.corp.net");
        let ip = r.pseudonyms.token("ip", b"10.1.2.3");
        let host = r.pseudonyms.token("host", b"mail.corp.net");
        assert_eq!(out.matches(&ip).count(), 2, "{out}");
        assert_eq!(out.matches(&host).count(), 2, "{out}");
        assert_eq!(r.stats()[&Rule::Builtin(Detector::Ipv4)].replaced, 2);
        assert_eq!(r.stats()[&Rule::Builtin(Detector::Url)].replaced, 2);
    }

    #[test]
    fn home_paths_lose_only_the_user_name() {
        let mut r = redactor(Profile::default());
        let out = redact(&mut r, "opened /home/alice/QubesIncoming/sd-app/x.pdf");
        let user = r.pseudonyms.token("user", b"alice");
        let vm = r.pseudonyms.token("vm", b"sd-app");
        assert_eq!(out, format!("opened /home/{user}/QubesIncoming/{vm}/x.pdf"));
    }

    #[test]
    fn vm_names_are_tokens_unless_allowlisted() {
        let mut r = redactor(Profile::default());
        let out = redact(&mut r, "qube work asked dom0; network work-queue vault.");
        let work = r.pseudonyms.token("vm", b"work");
        let vault = r.pseudonyms.token("vm", b"vault");
        assert_eq!(out, format!("qube {work} asked dom0; network work-queue {vault}."));
        assert_eq!(r.vm_token("dom0"), "dom0");
        assert_eq!(r.vm_token("work"), work);
    }

    #[test]
    fn keywords_and_user_regexes_fire_with_their_own_tokens() {
        let profile = Profile::parse(
            "keywords = [\"Bluebird\"]\n[[regex]]\nname = \"case\"\npattern = \"CASE-[0-9]{4}\"",
        )
        .unwrap();
        let mut r = redactor(profile);
        let out = redact(&mut r, "project bluebird, CASE-1234 and BLUEBIRD");
        let kw = r.pseudonyms.token("kw", b"bluebird");
        let case = r.pseudonyms.token("case", b"CASE-1234");
        assert_eq!(out, format!("project {kw}, {case} and {kw}"));
        assert_eq!(r.rule_name(Rule::UserRegex(0)), "regex:case");
    }

    #[test]
    fn a_keyword_inside_an_allowlisted_host_is_still_replaced() {
        let profile = Profile::parse("keywords = [\"qubes\"]").unwrap();
        let mut r = redactor(profile);
        let out = redact(&mut r, "docs at https://qubes-os.org/ and qubes-os.org");
        assert!(!out.to_lowercase().contains("qubes"), "{out}");
    }

    #[test]
    fn partial_overlaps_are_replaced_as_one() {
        let profile = Profile::parse("keywords = [\"corp.ne\"]").unwrap();
        let mut r = redactor(profile);
        let out = redact(&mut r, "x.y.corp.net1");
        assert!(!out.contains("corp") && !out.contains("net1"), "{out}");
    }

    #[test]
    fn tokens_in_the_input_stay_and_redaction_is_idempotent() {
        let mut r = redactor(Profile::default());
        let once = redact(
            &mut r,
            "mail alice@example.com at https://files.evil.com/x from 10.9.8.7 \
             /home/bob/ sd-app 4f8b2c9e1d3a4b5c8e7f6a5b4c3d2e1f",
        );
        let twice = redact(&mut r, &once);
        assert_eq!(once, twice);
    }

    #[test]
    fn binary_values_and_unlisted_fields_do_not_leave() {
        let mut r = redactor(Profile::default());
        let mut event = Event::new();
        event.push("MESSAGE", b"10.0.0.1\0\x01\x02 alice@example.com".to_vec());
        event.push("_HOSTNAME", "work");
        event.push("PRIORITY", "3");
        let rec = Record {
            vm: "work".into(),
            stream: "journal".into(),
            received_usec: 1,
            seq: 1,
            kind: RecordKind::Event,
            event,
        };
        let out = r.redact_record(rec);
        assert_eq!(out.vm, r.pseudonyms.token("vm", b"work"));
        assert_eq!(
            out.event.get("MESSAGE").unwrap(),
            b"[binary value removed by redaction, 29 bytes]"
        );
        assert_eq!(out.event.get("_HOSTNAME"), None);
        assert_eq!(out.event.get("PRIORITY").unwrap(), b"3");
        assert_eq!(r.fields_dropped(), 1);
    }

    #[test]
    fn the_leak_scan_ignores_tokens_and_finds_the_rest() {
        let mut r = redactor(Profile::default());
        let mut scratch = Vec::new();
        let redacted = r.redact_value(b"from 10.0.0.1 to https://evil.com/x sd-app").into_owned();
        let line = serde_json::to_vec(
            &serde_json::json!({"MESSAGE": String::from_utf8(redacted).unwrap()}),
        )
        .unwrap();
        assert_eq!(r.leak(&line, true, &[], &mut scratch), None);
        let leaky = br#"{"MESSAGE":"to 10.0.0.1"}"#;
        assert_eq!(r.leak(leaky, true, &[], &mut scratch), Some(Rule::Builtin(Detector::Ipv4)));
        let vm = br#"{"_QLOG_VM":"sd-app"}"#;
        assert_eq!(r.leak(vm, true, &[], &mut scratch), Some(Rule::VmName));
        // A key is structure, not a value.
        let key = br#"{"10.0.0.1":"x"}"#;
        assert_eq!(r.leak(key, true, &[], &mut scratch), None);
    }

    #[test]
    fn json_values_stay_apart_when_the_syntax_is_blanked() {
        let mut line = br#"{"A":"x\ny","B":["1","2"],"C":"a\"b"}"#.to_vec();
        blank_json_syntax(&mut line);
        let text = String::from_utf8(line).unwrap();
        assert_eq!(text.split_whitespace().collect::<Vec<_>>(), ["x", "y", "1", "2", "a", "b"]);
        assert!(!text.contains("A") && !text.contains(':'), "{text:?}");
    }

    #[test]
    fn json_escapes_do_not_make_false_leaks() {
        let r = redactor(Profile::default());
        let mut scratch = Vec::new();
        // Raw "line\nqubes-os.org": the `n` of the escape must not glue onto the host.
        let line = br#"{"MESSAGE":"line\nqubes-os.org\tqubes-os.org"}"#;
        assert_eq!(r.leak(line, true, &[], &mut scratch), None);
    }

    #[test]
    fn the_binary_placeholder_is_no_leak_even_for_a_keyword_in_it() {
        let mut r = redactor(Profile::parse("keywords = [\"binary\"]").unwrap());
        let mut event = Event::new();
        event.push("MESSAGE", b"a\0b".to_vec());
        let rec = Record {
            vm: "dom0".into(),
            stream: "journal".into(),
            received_usec: 1,
            seq: 1,
            kind: RecordKind::Event,
            event,
        };
        let out = r.redact_record(rec);
        let mut scratch = Vec::new();
        assert_eq!(r.leak(out.event.get("MESSAGE").unwrap(), false, &[], &mut scratch), None);
        assert!(r.leak(b"a binary thing", false, &[], &mut scratch).is_some());
    }

    #[test]
    fn what_the_passes_cannot_settle_is_replaced_blank_to_blank() {
        let mut r = redactor(Profile::default());
        let mut scratch = Vec::new();
        // The last resort, on what a pass found: whole runs of non-blank bytes go.
        let value = b"keep x:10.0.0.1/y,alice@example.com! this\tand fe80::1 too";
        let planned = r.plan(value);
        assert_eq!(planned.len(), 3, "{planned:?}");
        let wide = r.plan_blank_to_blank(value, &planned);
        assert_eq!(wide.len(), 2, "{wide:?}");
        let out = r.apply(value, &wide);
        let shown = String::from_utf8_lossy(&out).into_owned();
        let words: Vec<&str> = shown.split([' ', '\t']).collect();
        assert_eq!(words.len(), 6, "{shown}");
        assert_eq!(
            (words[0], words[2], words[3], words[5]),
            ("keep", "this", "and", "too"),
            "{shown}"
        );
        assert!(words[1].starts_with("ip-") && words[4].starts_with("ip-"), "{shown}");
        assert_eq!(r.leak(&out, false, &[], &mut scratch), None, "{shown}");
    }

    /// Redacts a redact fuzz target input (its knob byte, then the value, made valid
    /// UTF-8 as records are) with the target's rules file, key and VM names, so that the
    /// tokens are the ones it saw, and checks that the leak scan finds nothing. Returns
    /// the redactor and the redacted value.
    fn replay_fuzz_input(input: &[u8]) -> (Redactor, String) {
        assert_eq!(input[0] & 1, 1, "the knob of an input for the rules file's profile");
        let rules = include_str!("../../docs/redaction-rules.example.toml");
        let vms = ["sd-app", "work", "dom0", "vault", "sys-net"];
        let mut r = Redactor::new(Profile::parse(rules).unwrap(), &PseudonymKey::fixed(7), vms);
        let value = String::from_utf8_lossy(&input[1..]).into_owned();
        let out = r.redact_value(value.as_bytes()).into_owned();
        let shown = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(r.leak(&out, false, &[], &mut Vec::new()), None, "{shown}");
        (r, shown)
    }

    /// Found by tests/fuzz (target redact): a run of IPv6 pieces (`FE::b::b:E::b::`)
    /// that is no address as a whole lost one piece per pass, each replacement leaving
    /// the piece before it an address of its own, until the passes ran out.
    #[test]
    fn a_run_of_ipv6_pieces_is_replaced_whole_in_one_pass() {
        let (mut r, _) =
            replay_fuzz_input(include_bytes!("../../tests/fuzz/regressions/redact/ipv6-run"));
        let out = redact(&mut r, "x FE::b::b:E::b::FE::b::b:E::b::.on and fe80::1: up");
        assert!(!out.contains("::"), "{out}");
        assert!(out.ends_with(": up"), "{out}");
        assert!(out.contains(&r.pseudonyms.token("ip", b"fe80::1")), "{out}");
    }

    /// Found by tests/fuzz (target redact): a finding right after a token an earlier
    /// pass had written was widened only to the blank that token is in the re-scan, so
    /// the new token was glued to the old one and neither was one any more. The key and
    /// VM names are the fuzz target's, so the tokens are the ones it saw.
    #[test]
    fn a_new_token_is_never_glued_to_an_earlier_one() {
        let input = include_bytes!("../../tests/fuzz/regressions/redact/token-after-token");
        let (_, shown) = replay_fuzz_input(input);
        let glued = regex::Regex::new(r"[a-z]-[0-9a-f]{10}[0-9A-Za-z_]").unwrap();
        assert!(!glued.is_match(&shown), "{shown}");
    }

    /// Found by tests/fuzz (target redact): a URL whose authority was no host name
    /// (`https://bob=g%eth01:34:...+2.167.1.mx.qubes-os.org`) became its host whole and
    /// stayed readable because it ended in an allowlisted domain, addresses and all. The
    /// value also holds invalid UTF-8, which leaves as U+FFFD and is redacted as such.
    #[test]
    fn an_authority_that_is_no_host_is_not_kept_for_its_allowlisted_end() {
        let rules = include_str!("../../docs/redaction-rules.example.toml");
        let mut r = redactor(Profile::parse(rules).unwrap());
        let input: &[u8] = include_bytes!("../../tests/fuzz/regressions/redact/leak-after-lossy");
        let mut event = Event::new();
        event.push("MESSAGE", &input[1..]);
        let record = Record {
            vm: "sd-app".into(),
            stream: "journal".into(),
            received_usec: 1,
            seq: 1,
            kind: RecordKind::Event,
            event,
        };
        let out = r.redact_record(record);
        let message = out.event.get("MESSAGE").expect("MESSAGE is allowlisted");
        let text = std::str::from_utf8(message).expect("values leave as valid UTF-8");
        assert!(text.contains('\u{fffd}'), "{text}");
        let mut scratch = Vec::new();
        assert_eq!(r.leak(message, false, &[], &mut scratch), None, "{text}");
        assert!(!text.contains("2.167.1.15"), "{text}");
    }

    /// Found by tests/fuzz (target redact): a base64 secret ending in `=` directly
    /// before a word character became a token glued to that word, which the re-scan no
    /// longer saw as a token; pass after pass took in more, and the export failed.
    #[test]
    fn a_token_is_never_glued_to_a_word() {
        let mut r = redactor(Profile::default());
        let mut scratch = Vec::new();
        let input: &[u8] = include_bytes!("../../tests/fuzz/regressions/redact/leak-after-token");
        for value in [&input[1..], b"key GEnarQLOG_R_TECEIVED_USgggg1gggggggggggg=1gggEg done"] {
            let out = r.redact_value(value).into_owned();
            let shown = String::from_utf8_lossy(&out).into_owned();
            assert_eq!(r.leak(&out, false, &[], &mut scratch), None, "{shown}");
            assert!(!shown.contains("GEnar") && !shown.contains("1gggEg"), "{shown}");
        }
        // An address inside a word takes the word with it, under a token of its own.
        let out = redact(&mut r, "from x10.0.0.1y and 10.0.0.1");
        let words: Vec<&str> = out.split(' ').collect();
        assert_eq!(words.len(), 4, "{out}");
        assert!(words[1].starts_with("ip-") && words[3].starts_with("ip-"), "{out}");
        assert_ne!(words[1], words[3], "{out}");
    }

    /// Found by tests/fuzz (target redact): replacing the host name `1es.in` left
    /// `fe80::`, an address, which the leak scan refused, so the whole export failed.
    #[test]
    fn a_pattern_completed_by_a_replacement_is_redacted_too() {
        let mut r = redactor(Profile::default());
        let mut scratch = Vec::new();
        for value in [
            b"from fe80::1es.in".as_slice(),
            b"GET https://bob:hunter2@files.internal.corp:8443/home/bob/x?qR1 from fe80::1es.in",
        ] {
            let out = r.redact_value(value).into_owned();
            let shown = String::from_utf8_lossy(&out).into_owned();
            assert_eq!(r.leak(&out, false, &[], &mut scratch), None, "{shown}");
            assert!(!shown.contains("fe80"), "{shown}");
        }
    }

    #[test]
    fn masks_cover_known_safe_strings() {
        let r = redactor(Profile::default());
        let mut scratch = Vec::new();
        let hash = b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let line = [br#"{"sha256":""#.as_slice(), hash, b"\"}"].concat();
        assert!(r.leak(&line, true, &[], &mut scratch).is_some());
        assert_eq!(r.leak(&line, true, &[hash], &mut scratch), None);
    }

    #[test]
    fn examples_show_only_redacted_text() {
        let mut r = redactor(Profile::default());
        r.collect_examples = true;
        redact(&mut r, "connecting to 10.137.0.5 port 443");
        let ex = &r.stats()[&Rule::Builtin(Detector::Ipv4)].examples;
        assert_eq!(ex.len(), 1);
        assert!(ex[0].contains("connecting to ip-") && !ex[0].contains("10.137"), "{ex:?}");
    }
}
