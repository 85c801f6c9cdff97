//! `qlog stats`: per-VM rates and gauges over time, as one-line terminal charts.
//!
//! qlogd keeps a rollup per VM and minute; this asks for a range merged into as many
//! buckets as the terminal has columns for the chart, and draws each metric as a row of
//! Unicode block characters (or an ASCII ramp when asked, or when the locale or the
//! terminal cannot show them). Every VM-derived string is escaped before printing.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use qlog_rpc::query::{StatsQuery, StatsReply};
use qlog_rpc::telemetry::{gauge_spec, is_metric, Rollup, GAUGES, MAX_STATS_BUCKETS};

use crate::client::{self, Client};
use crate::escape::escape_line;
use crate::output::{format_time, Format};
use crate::{timespec, vms};

const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
const RAMP: [char; 8] = ['_', '.', ':', '-', '=', '+', '*', '#'];
/// Characters before the chart: the metric name, padded.
const LABEL_WIDTH: usize = 24;
/// Characters after it: min, max, last.
const SUMMARY_WIDTH: usize = 40;

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// VMs to show (all of them, qlogd's own name included, if none).
    pub vms: Vec<String>,
    /// Start of the range, in journalctl's time syntax.
    #[arg(short = 'S', long, allow_hyphen_values = true, default_value = "-1h")]
    pub since: String,
    /// End of the range, in the same syntax.
    #[arg(short = 'U', long, allow_hyphen_values = true, default_value = "now")]
    pub until: String,
    /// Metrics to chart (repeatable): events, bytes, events_err (any priority name),
    /// gaps, rejected_frames, quota_dropped, rate_refused, heartbeats, or a gauge such as
    /// load1 or agent_lag_secs. By default: events, bytes, and every gauge with data.
    #[arg(short = 'm', long = "metric")]
    pub metrics: Vec<String>,
    /// Draw with plain ASCII instead of Unicode blocks.
    #[arg(long)]
    pub ascii: bool,
    /// Chart width in columns (by default, what fits the terminal).
    #[arg(long)]
    pub width: Option<usize>,
    /// Print the buckets as JSON instead of charts.
    #[arg(long)]
    pub json: bool,
}

pub fn show(socket: &Path, args: &StatsArgs) -> anyhow::Result<ExitCode> {
    for m in &args.metrics {
        if !is_metric(m) {
            let names: Vec<&str> = GAUGES.iter().map(|g| g.name).collect();
            bail!(
                "unknown metric {m:?}: use events, bytes, events_<priority>, bytes_<priority>, gaps, rejected_frames, quota_dropped, rate_refused, telemetry_rejected, heartbeats, or one of {}",
                names.join(", ")
            );
        }
    }
    let now = chrono::Local::now();
    let since = timespec::parse(&args.since, now).map_err(anyhow::Error::msg)?;
    let until = timespec::parse(&args.until, now).map_err(anyhow::Error::msg)?;
    if until <= since {
        bail!("--since ({}) must be before --until ({})", args.since, args.until);
    }
    let width = args
        .width
        .unwrap_or_else(|| terminal_columns().saturating_sub(LABEL_WIDTH + SUMMARY_WIDTH + 2))
        .clamp(8, MAX_STATS_BUCKETS);
    let minutes = (until - since).div_ceil(60_000_000);
    let bucket_minutes = u32::try_from(minutes.div_ceil(width as u64).max(1)).unwrap_or(u32::MAX);
    let gauges: Vec<String> =
        args.metrics.iter().filter(|m| gauge_spec(m).is_some()).cloned().collect();
    let query = StatsQuery {
        vms: args.vms.clone(),
        since_usec: since,
        until_usec: until,
        bucket_minutes,
        gauges: if args.metrics.is_empty() { Vec::new() } else { gauges },
    };
    let replies = match Client::stats(socket, query) {
        Ok(r) => r,
        Err(e) if client::is_unknown_vm(&e) => {
            return Err(vms::unknown_vm_error(socket, &args.vms, e))
        }
        Err(e) => return Err(e),
    };
    if args.json {
        let text = serde_json::to_string_pretty(&replies).expect("stats serialise");
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let style = if args.ascii || !unicode_ok() { Style::Ascii } else { Style::Blocks };
    let slot = u64::from(bucket_minutes) * 60_000_000;
    let first = since / slot * slot;
    let columns =
        ((until.saturating_sub(first)).div_ceil(slot) as usize).clamp(1, MAX_STATS_BUCKETS);
    let mut out = String::new();
    out.push_str(&format!(
        "{} .. {}, {} per column\n",
        format_time(since, Format::Short),
        format_time(until, Format::Short),
        if bucket_minutes == 1 {
            "1 minute".to_owned()
        } else {
            format!("{bucket_minutes} minutes")
        }
    ));
    for reply in &replies {
        render_vm(reply, &args.metrics, first, slot, columns, style, &mut out);
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Blocks,
    Ascii,
}

/// One VM: a header line and a chart row per metric.
fn render_vm(
    reply: &StatsReply,
    wanted: &[String],
    first: u64,
    slot: u64,
    columns: usize,
    style: Style,
    out: &mut String,
) {
    out.push_str(&format!("\n{}\n", escape_line(reply.vm.as_bytes())));
    if reply.buckets.is_empty() {
        out.push_str("  no data in this range\n");
        return;
    }
    let mut metrics: Vec<String> = wanted.to_vec();
    if metrics.is_empty() {
        metrics = vec!["events".into(), "bytes".into()];
        for g in GAUGES {
            if reply.buckets.iter().any(|(_, r)| r.gauges.contains_key(g.name)) {
                metrics.push(g.name.to_owned());
            }
        }
        for extra in
            ["gaps", "rejected_frames", "quota_dropped", "rate_refused", "telemetry_rejected"]
        {
            if reply.buckets.iter().any(|(_, r)| r.counter(extra).unwrap_or(0) > 0) {
                metrics.push(extra.to_owned());
            }
        }
    }
    for m in &metrics {
        let mut series: Vec<Option<f64>> = vec![None; columns];
        for (start, rollup) in &reply.buckets {
            let Some(i) = start.checked_sub(first).map(|d| (d / slot) as usize) else { continue };
            if let Some(cell) = series.get_mut(i) {
                *cell = value(rollup, m);
            }
        }
        out.push_str(&chart_row(m, &series, style));
        out.push('\n');
    }
}

/// A metric's value in one bucket: a counter's count, a gauge's maximum.
fn value(r: &Rollup, metric: &str) -> Option<f64> {
    match r.counter(metric) {
        Some(n) => Some(n as f64),
        None => r.gauges.get(metric).map(|g| g.max),
    }
}

/// `  name     ▁▂█▃  min 0  max 12  last 3`
pub fn chart_row(name: &str, series: &[Option<f64>], style: Style) -> String {
    let values: Vec<f64> = series.iter().flatten().copied().collect();
    let max = values.iter().copied().fold(0.0f64, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let last = series.iter().rev().flatten().next().copied();
    let ramp = match style {
        Style::Blocks => &BLOCKS,
        Style::Ascii => &RAMP,
    };
    let chart: String = series
        .iter()
        .map(|v| match v {
            None => ' ',
            Some(_) if max <= 0.0 => ramp[0],
            Some(v) => ramp[((v / max) * 7.0).round().clamp(0.0, 7.0) as usize],
        })
        .collect();
    let unit = gauge_spec(name).map_or("", |g| g.unit);
    let fmt = |v: f64| number(v, unit);
    let summary = match last {
        Some(last) => format!("min {}  max {}  last {}", fmt(min), fmt(max), fmt(last)),
        None => "no data".to_owned(),
    };
    format!("  {name:<w$}{chart}  {summary}", w = LABEL_WIDTH - 2)
}

/// `1.2k`, `3.4 MiB`, `0.25`.
fn number(v: f64, unit: &str) -> String {
    if unit == "bytes" {
        return vms::human_bytes(v as u64);
    }
    let (scaled, suffix) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e4 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = if scaled.fract() == 0.0 && suffix.is_empty() {
        format!("{scaled:.0}")
    } else if suffix.is_empty() {
        format!("{scaled:.2}")
    } else {
        format!("{scaled:.1}{suffix}")
    };
    match unit {
        "" => text,
        "seconds" => format!("{text} s"),
        u => format!("{text} {u}"),
    }
}

/// True if the locale says UTF-8 and the terminal is not a dumb one.
pub fn unicode_ok() -> bool {
    if std::env::var("TERM").is_ok_and(|t| t == "dumb") {
        return false;
    }
    let locale = ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    locale.contains("utf-8") || locale.contains("utf8")
}

/// The terminal's width, from the tty, then `COLUMNS`, then 80.
pub fn terminal_columns() -> usize {
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer we pass, nothing else.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        return usize::from(size.ws_col);
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).filter(|c| *c > 0).unwrap_or(80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_scales_to_the_maximum_and_leaves_gaps_blank() {
        let row = chart_row("events", &[Some(0.0), Some(5.0), None, Some(10.0)], Style::Blocks);
        assert!(row.contains("▁▅ █"), "{row}");
        assert!(row.ends_with("min 0  max 10  last 10"), "{row}");
        let ascii = chart_row("events", &[Some(0.0), Some(10.0)], Style::Ascii);
        assert!(ascii.contains("_#") && ascii.is_ascii(), "{ascii}");
        assert!(chart_row("load1", &[None, None], Style::Ascii).ends_with("no data"));
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(1234567.0, ""), "1.2M");
        assert_eq!(number(0.25, ""), "0.25");
        assert_eq!(number(3.0, "seconds"), "3 s");
        assert_eq!(number(2048.0, "bytes"), "2.0 KiB");
    }
}
