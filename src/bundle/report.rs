//! `report.html`: one self-contained page for a person to read first. Owns gathering
//! what it shows (per-VM event rates, the most frequent errors) and rendering it; it
//! sees only redacted records, so it cannot show more than the rest of the bundle.
//!
//! The page loads nothing: styles are inline, the charts are inline SVG, there are no
//! scripts, links, fonts or images. Text from events is HTML-escaped, and control
//! characters are drawn as their Unicode pictures (`␛`) rather than as `\e`-style
//! escapes, whose letters would glue onto the next word for the leak scan. For the same
//! reason the style sheet has no `element.class` selectors: `rect.bg` reads as a host
//! name in Bulgaria.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;

use chrono::DateTime;

/// Bars per chart.
const BINS: usize = 60;
/// Errors listed.
const TOP_ERRORS: usize = 20;
/// Distinct error messages tallied before the rarest are forgotten, which bounds memory
/// on a store full of unique messages; the counts shown are then lower bounds.
const MAX_TALLIED: usize = 100_000;
/// Characters of an error message shown.
const MAX_MESSAGE_CHARS: usize = 600;

/// What the report needs from one VM's records.
#[derive(Debug, Default)]
pub struct VmSeries {
    pub records: u64,
    pub errors: u64,
    /// Records per second of receive time.
    pub per_second: BTreeMap<u64, u64>,
}

/// Everything the report shows, gathered record by record.
#[derive(Debug, Default)]
pub struct ReportData {
    pub vms: BTreeMap<String, VmSeries>,
    errors: HashMap<String, (u64, BTreeSet<String>)>,
    /// True if and only if rare messages were forgotten to bound memory.
    errors_pruned: bool,
    first_usec: Option<u64>,
    last_usec: Option<u64>,
}

/// The rest of the page, from the manifest.
pub struct ReportContext<'a> {
    pub created_at: &'a str,
    pub qlog_version: &'a str,
    pub redacted: bool,
    pub profile: &'a str,
    /// (rule, replaced, distinct)
    pub rules: Vec<(String, u64, u64)>,
}

impl ReportData {
    /// Counts one (redacted) record; `error_message` is its MESSAGE if PRIORITY ≤ 3.
    pub fn add(&mut self, vm: &str, received_usec: u64, error_message: Option<&str>) {
        self.first_usec = Some(self.first_usec.map_or(received_usec, |f| f.min(received_usec)));
        self.last_usec = Some(self.last_usec.map_or(received_usec, |l| l.max(received_usec)));
        if !self.vms.contains_key(vm) {
            self.vms.insert(vm.to_owned(), VmSeries::default());
        }
        let series = self.vms.get_mut(vm).expect("inserted above");
        series.records += 1;
        *series.per_second.entry(received_usec / 1_000_000).or_default() += 1;
        let Some(message) = error_message else { return };
        series.errors += 1;
        let message: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
        if self.errors.len() >= MAX_TALLIED && !self.errors.contains_key(&message) {
            self.errors.retain(|_, (count, _)| *count > 1);
            self.errors_pruned = true;
            if self.errors.len() >= MAX_TALLIED {
                return;
            }
        }
        let entry = self.errors.entry(message).or_default();
        entry.0 += 1;
        if !entry.1.contains(vm) {
            entry.1.insert(vm.to_owned());
        }
    }

    /// The most frequent errors: (count, message, VMs), most frequent first.
    fn top_errors(&self) -> Vec<(u64, &str, &BTreeSet<String>)> {
        let mut all: Vec<(u64, &str, &BTreeSet<String>)> =
            self.errors.iter().map(|(m, (c, vms))| (*c, m.as_str(), vms)).collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        all.truncate(TOP_ERRORS);
        all
    }

    pub fn render(&self, ctx: &ReportContext<'_>) -> String {
        let mut html = String::with_capacity(64 * 1024);
        html.push_str(concat!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
            "<title>qlog support bundle</title>\n<style>\n",
            "body { font-family: sans-serif; margin: 2em; color: #222; max-width: 60em; }\n",
            "h1, h2 { font-weight: 600; }\n",
            "table { border-collapse: collapse; margin: 1em 0; }\n",
            "td, th { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: left; ",
            "vertical-align: top; }\n",
            ".n { text-align: right; font-variant-numeric: tabular-nums; }\n",
            ".msg { font-family: monospace; white-space: pre-wrap; word-break: break-all; }\n",
            ".chart { margin: 0.5em 0 1.5em 0; }\n",
            ".bar { fill: #3b6ea5; }\n",
            ".plot { fill: #f4f4f4; }\n",
            "svg text { font-size: 11px; fill: #555; font-family: sans-serif; }\n",
            ".note { color: #666; }\n",
            "</style>\n</head>\n<body>\n<h1>qlog support bundle</h1>\n",
        ));
        let _ = writeln!(
            html,
            "<p>Created {} by qlog {}. {}</p>",
            esc(ctx.created_at),
            esc(ctx.qlog_version),
            if ctx.redacted {
                format!(
                    "Redacted with the profile <b>{}</b>: {}",
                    esc(ctx.profile),
                    concat!(
                        "VM names, addresses, user names and secrets are replaced by tokens, ",
                        "the same value by the same token throughout the bundle."
                    )
                )
            } else {
                "<b>Not redacted</b>: this bundle holds every field as stored.".to_owned()
            }
        );
        let range = match (self.first_usec, self.last_usec) {
            (Some(f), Some(l)) => format!("{} to {}", utc(f), utc(l)),
            _ => "no records".to_owned(),
        };
        let total: u64 = self.vms.values().map(|s| s.records).sum();
        let _ =
            writeln!(html, "<p>{total} records from {} VMs, {}.</p>", self.vms.len(), esc(&range));

        html.push_str(
            "<h2>VMs</h2>\n<table>\n<tr><th>VM</th><th>records</th><th>errors</th></tr>\n",
        );
        for (vm, s) in &self.vms {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(vm),
                s.records,
                s.errors
            );
        }
        html.push_str("</table>\n<h2>Event rate</h2>\n");
        for (vm, s) in &self.vms {
            let _ = writeln!(html, "<h3>{}</h3>", esc(vm));
            html.push_str(&self.chart(s));
        }

        html.push_str("<h2>Most frequent errors</h2>\n");
        let top = self.top_errors();
        if top.is_empty() {
            html.push_str(
                "<p class=\"note\">No record with PRIORITY 3 (err) or more urgent.</p>\n",
            );
        } else {
            html.push_str(
                "<table>\n<tr><th>count</th><th>VMs</th><th>message (redacted)</th></tr>\n",
            );
            for (count, message, vms) in top {
                let vms: Vec<String> = vms.iter().map(|v| esc(v)).collect();
                let _ = writeln!(
                    html,
                    "<tr><td class=\"n\">{count}</td><td>{}</td><td class=\"msg\">{}</td></tr>",
                    vms.join(" "),
                    esc(&pictures(message))
                );
            }
            html.push_str("</table>\n");
            if self.errors_pruned {
                html.push_str(concat!(
                    "<p class=\"note\">There were too many distinct errors to count them ",
                    "all: the counts are lower bounds.</p>\n"
                ));
            }
        }

        if ctx.redacted {
            html.push_str("<h2>Redaction</h2>\n");
            if ctx.rules.is_empty() {
                html.push_str("<p class=\"note\">No rule fired.</p>\n");
            } else {
                html.push_str(
                    "<table>\n<tr><th>rule</th><th>values replaced</th><th>distinct</th></tr>\n",
                );
                for (rule, replaced, distinct) in &ctx.rules {
                    let _ = writeln!(
                        html,
                        "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                        esc(rule),
                        replaced,
                        distinct
                    );
                }
                html.push_str("</table>\n");
            }
        }
        html.push_str("</body>\n</html>\n");
        html
    }

    /// One bar chart of `s`'s records over the bundle's whole time range.
    fn chart(&self, s: &VmSeries) -> String {
        let (Some(first), Some(last)) = (self.first_usec, self.last_usec) else {
            return String::new();
        };
        let (first, last) = (first / 1_000_000, last / 1_000_000);
        let span = (last - first + 1).max(1);
        let bin_secs = span.div_ceil(BINS as u64).max(1);
        let mut bins = [0u64; BINS];
        for (sec, n) in &s.per_second {
            let i = (((sec - first) / bin_secs) as usize).min(BINS - 1);
            bins[i] += n;
        }
        let max = bins.iter().copied().max().unwrap_or(0).max(1);
        let (w, h, top, bottom) = (600u64, 120u64, 16u64, 18u64);
        let plot = h - top - bottom;
        let bar_w = w / BINS as u64;
        let mut svg = format!(
            "<div class=\"chart\"><svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" {}",
            "role=\"img\">\n"
        );
        let _ = writeln!(
            svg,
            "<rect class=\"plot\" x=\"0\" y=\"{top}\" width=\"{w}\" height=\"{plot}\"/>"
        );
        for (i, n) in bins.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let bh = (n * plot).div_ceil(max);
            let _ = writeln!(
                svg,
                "<rect class=\"bar\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{bh}\">{}</rect>",
                i as u64 * bar_w,
                top + plot - bh,
                bar_w.saturating_sub(1).max(1),
                format_args!("<title>{n} records</title>")
            );
        }
        let per = human_span(bin_secs);
        let _ = writeln!(svg, "<text x=\"0\" y=\"11\">max {max} records per {per}</text>");
        let _ =
            writeln!(svg, "<text x=\"0\" y=\"{}\">{}</text>", h - 4, esc(&utc(first * 1_000_000)));
        let _ = writeln!(
            svg,
            "<text x=\"{w}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            h - 4,
            esc(&utc(last * 1_000_000))
        );
        svg.push_str("</svg></div>\n");
        svg
    }
}

fn human_span(secs: u64) -> String {
    match secs {
        1 => "second".to_owned(),
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s if s < 172_800 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn utc(usec: u64) -> String {
    DateTime::from_timestamp_micros(usec as i64)
        .map_or_else(|| usec.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// HTML-escapes text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Replaces control characters with their Unicode pictures (`␛` for ESC) and
/// reordering and line-breaking characters with U+FFFD, keeping newlines.
fn pictures(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' => '\n',
            '\t' => ' ',
            c @ '\u{0}'..='\u{1f}' => char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
            '\u{7f}' => '\u{2421}',
            '\u{80}'..='\u{9f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{61c}'
            | '\u{2028}'
            | '\u{2029}' => '\u{fffd}',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ReportContext<'static> {
        ReportContext {
            created_at: "2026-12-03T00:00:00Z",
            qlog_version: "0.1.0",
            redacted: true,
            profile: "default",
            rules: vec![("ipv4".into(), 3, 1)],
        }
    }

    #[test]
    fn the_page_loads_nothing_from_outside() {
        let mut data = ReportData::default();
        data.add("vm-0123456789", 1_796_256_000_000_000, Some("failed <script>alert(1)</script>"));
        data.add("vm-0123456789", 1_796_256_100_000_000, None);
        let html = data.render(&ctx());
        for forbidden in ["<script", "src=", "href=", "@import", "url(", "http:", "https:"] {
            assert!(!html.contains(forbidden), "{forbidden} in the report");
        }
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("<svg"));
    }

    #[test]
    fn errors_are_ranked_by_count() {
        let mut data = ReportData::default();
        for (vm, msg) in [("a", "disk full"), ("b", "disk full"), ("a", "oops"), ("a", "disk full")]
        {
            data.add(vm, 1_000_000, Some(msg));
        }
        let top = data.top_errors();
        assert_eq!(top[0].0, 3);
        assert_eq!(top[0].1, "disk full");
        assert_eq!(top[0].2.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(top[1].1, "oops");
    }

    #[test]
    fn control_characters_become_pictures() {
        assert_eq!(pictures("a\u{1b}[31mb\u{202e}c\nd"), "a\u{241b}[31mb\u{fffd}c\nd");
    }
}
