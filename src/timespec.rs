//! journalctl's time syntax for `--since` and `--until`, after systemd.time(7).
//!
//! Accepted: `now`, `today`, `yesterday`, `tomorrow`; `YYYY-MM-DD [HH:MM[:SS[.frac]]]`
//! (also with `T`, and a trailing ` UTC` or `Z`); a bare `HH:MM[:SS]` for today; `@EPOCH`;
//! and relative spans such as `-1h`, `-30min`, `+2d`, `-1h 30min`, `5min ago`. Dates and
//! times without a zone are local time, as in journalctl.

use chrono::{DateTime, Local, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

const USEC_PER_SEC: f64 = 1_000_000.0;

fn bad(input: &str, why: &str) -> String {
    format!(
        "invalid time {input:?}: {why}; try \"2026-12-03 10:00\", \"today\", \"yesterday\", \"-1h\" or \"-30min\""
    )
}

/// Parses `input` relative to `now`, returning microseconds since the Unix epoch.
pub fn parse(input: &str, now: DateTime<Local>) -> Result<u64, String> {
    let s = input.trim();
    let now_usec = now.timestamp_micros();
    let midnight = |days: i64| -> Result<u64, String> {
        let date = now.date_naive() + chrono::Duration::days(days);
        local_usec(date.and_time(NaiveTime::MIN)).ok_or_else(|| bad(input, "no such local time"))
    };
    match s {
        "" => return Err(bad(input, "it is empty")),
        "now" => return to_u64(now_usec, input),
        "today" => return midnight(0),
        "yesterday" => return midnight(-1),
        "tomorrow" => return midnight(1),
        _ => {}
    }
    if let Some(epoch) = s.strip_prefix('@') {
        let secs: f64 = epoch.parse().map_err(|_| bad(input, "expected seconds after @"))?;
        return to_u64((secs * USEC_PER_SEC) as i64, input);
    }
    if let Some(span) = s.strip_prefix('-') {
        return to_u64(now_usec - parse_span(span).map_err(|w| bad(input, &w))?, input);
    }
    if let Some(span) = s.strip_prefix('+') {
        return to_u64(now_usec + parse_span(span).map_err(|w| bad(input, &w))?, input);
    }
    if let Some(span) = s.strip_suffix(" ago") {
        return to_u64(now_usec - parse_span(span).map_err(|w| bad(input, &w))?, input);
    }
    parse_absolute(s, now).ok_or_else(|| bad(input, "not a date, time or span journalctl accepts"))
}

fn to_u64(usec: i64, input: &str) -> Result<u64, String> {
    u64::try_from(usec).map_err(|_| bad(input, "it is before 1970"))
}

fn local_usec(t: NaiveDateTime) -> Option<u64> {
    let local = Local.from_local_datetime(&t).earliest()?;
    u64::try_from(local.timestamp_micros()).ok()
}

fn parse_absolute(s: &str, now: DateTime<Local>) -> Option<u64> {
    let (s, utc) = match s.strip_suffix(" UTC").or_else(|| s.strip_suffix('Z')) {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let s = s.replacen('T', " ", 1);
    let datetime = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(&s, f).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok().map(|d| d.and_time(NaiveTime::MIN))
        })
        .or_else(|| {
            ["%H:%M:%S", "%H:%M"]
                .iter()
                .find_map(|f| NaiveTime::parse_from_str(&s, f).ok())
                .map(|t| now.date_naive().and_time(t))
        })?;
    if utc {
        u64::try_from(Utc.from_utc_datetime(&datetime).timestamp_micros()).ok()
    } else {
        local_usec(datetime)
    }
}

/// Parses a span such as `1h 30min` into microseconds.
fn parse_span(span: &str) -> Result<i64, String> {
    let mut total = 0f64;
    let mut rest = span.trim();
    if rest.is_empty() {
        return Err("the span is empty".into());
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: f64 =
            rest[..num_end].parse().map_err(|_| format!("bad number {:?}", &rest[..num_end]))?;
        rest = rest[num_end..].trim_start();
        let unit_end = rest.find(|c: char| !c.is_alphabetic()).unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        let secs = match unit {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "us" | "usec" | "µs" => 1e-6,
            "ms" | "msec" => 1e-3,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            "w" | "week" | "weeks" => 604_800.0,
            "M" | "month" | "months" => 2_629_800.0,
            "y" | "year" | "years" => 31_557_600.0,
            other => return Err(format!("unknown time unit {other:?}")),
        };
        total += n * secs;
        rest = rest[unit_end..].trim_start();
    }
    Ok((total * USEC_PER_SEC) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Local> {
        Local.with_ymd_and_hms(2026, 12, 3, 12, 0, 0).unwrap()
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        Local.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap().timestamp_micros() as u64
    }

    #[test]
    fn keywords() {
        assert_eq!(parse("now", now()).unwrap(), at(2026, 12, 3, 12, 0, 0));
        assert_eq!(parse("today", now()).unwrap(), at(2026, 12, 3, 0, 0, 0));
        assert_eq!(parse("yesterday", now()).unwrap(), at(2026, 12, 2, 0, 0, 0));
        assert_eq!(parse("tomorrow", now()).unwrap(), at(2026, 12, 4, 0, 0, 0));
    }

    #[test]
    fn absolute_dates_and_times() {
        assert_eq!(parse("2026-12-03 10:00", now()).unwrap(), at(2026, 12, 3, 10, 0, 0));
        assert_eq!(parse("2026-12-03 10:00:05", now()).unwrap(), at(2026, 12, 3, 10, 0, 5));
        assert_eq!(parse("2026-12-03", now()).unwrap(), at(2026, 12, 3, 0, 0, 0));
        assert_eq!(parse("2026-12-03T10:00:05", now()).unwrap(), at(2026, 12, 3, 10, 0, 5));
        assert_eq!(parse("09:30", now()).unwrap(), at(2026, 12, 3, 9, 30, 0));
        assert_eq!(parse("2026-12-03 10:00:00 UTC", now()).unwrap(), 1_796_292_000_000_000);
        assert_eq!(parse("@1796292000", now()).unwrap(), 1_796_292_000_000_000);
    }

    #[test]
    fn relative_spans() {
        let base = at(2026, 12, 3, 12, 0, 0);
        assert_eq!(parse("-1h", now()).unwrap(), base - 3_600_000_000);
        assert_eq!(parse("-30min", now()).unwrap(), base - 1_800_000_000);
        assert_eq!(parse("-1h 30min", now()).unwrap(), base - 5_400_000_000);
        assert_eq!(parse("+2d", now()).unwrap(), base + 2 * 86_400_000_000);
        assert_eq!(parse("5min ago", now()).unwrap(), base - 300_000_000);
    }

    #[test]
    fn errors_show_a_working_example() {
        for bad in ["", "soon", "-1fortnight", "2026-13-40", "-"] {
            let err = parse(bad, now()).unwrap_err();
            assert!(err.contains("2026-12-03 10:00"), "{err}");
        }
    }
}
