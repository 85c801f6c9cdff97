//! Every output format of `qlog query`, run as the real binary against a real qlogd, on
//! events full of hostile content, compared with golden files in `tests/data/golden/`.
//!
//! The events (see [`hostile_events`]) carry what a compromised VM would send to attack
//! an operator's terminal or mislead them: ESC, CSI and OSC sequences, C1 controls, bidi
//! overrides and isolates, NULs, invalid UTF-8, a binary field, a 40 KiB field, multi-line
//! messages, a claimed `_HOSTNAME` and a claimed `__REALTIME_TIMESTAMP` far from the
//! receive time. Besides the golden comparison, every text format is checked byte by byte
//! for anything a terminal would act on, and the JSON formats for validity.
//!
//! Receive times differ on every run. Each is checked against the time the sink reports
//! for its record and then replaced by a placeholder of the same width, so multi-line
//! layouts stay aligned in the golden files. qlog runs with `TZ=UTC`.
//!
//! To regenerate the golden files after an intended change, run
//! `QLOG_BLESS=1 cargo test -p qlog-tests --test cli_output` and review the diff.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use qlog_rpc::query::{EventsQuery, Record, RecordKind};
use qlog_rpc::{Event, FrameType};
use qlog_tests::process::{kill_and_reap, wait_timeout};
use qlog_tests::{
    bin_path, ingest_events, parse_export, query_events, RawIngest, RunningSink, SinkOptions,
    IO_TIMEOUT,
};
use serde_json::Value;

/// The VM whose journal is hostile.
const VM: &str = "sd-app";
/// A second VM that claims, in its own fields, to be [`VM`].
const OTHER_VM: &str = "sys-usb";

/// 40 KiB: well over journalctl's 4096-byte JSON cut-off, under the ingest value limit.
const HUGE_LEN: usize = 40 * 1024;

/// qlog's own colour codes (`src/output.rs`): the only escape sequences it may print.
const SGR_CODES: [&str; 5] = ["\x1b[1;31m", "\x1b[1;33m", "\x1b[1;39m", "\x1b[2;39m", "\x1b[0m"];

fn event(fields: &[(&str, &[u8])]) -> Event {
    let mut e = Event::new();
    for (name, value) in fields {
        e.push(*name, value.to_vec());
    }
    e
}

fn huge_message() -> Vec<u8> {
    // An escape at the far end, where a scanner that gives up early would miss it.
    let tail = b" \x1b[8m:)";
    let mut m = b"huge: ".to_vec();
    while m.len() < HUGE_LEN - tail.len() {
        m.extend_from_slice(b"0123456789abcdef");
    }
    m.truncate(HUGE_LEN - tail.len());
    m.extend_from_slice(tail);
    assert_eq!(m.len(), HUGE_LEN);
    m
}

/// The hostile journal of [`VM`], in order: one attack per event, so a golden diff
/// names the attack that got through.
fn hostile_events() -> Vec<Event> {
    let blob: Vec<u8> = (0..=255u8).collect();
    let huge = huge_message();
    vec![
        event(&[
            ("PRIORITY", b"3"),
            ("SYSLOG_IDENTIFIER", b"evil\x1b[31m"),
            ("_PID", b"12\x1b[2J"),
            ("_HOSTNAME", VM.as_bytes()),
            (
                "MESSAGE",
                b"clear \x1b[2J retitle \x1b]0;title\x07 colour \x1b[31mred\x1b[0m hide \x1b[8mx",
            ),
        ]),
        event(&[
            ("PRIORITY", b"4"),
            ("SYSLOG_IDENTIFIER", b"c1"),
            ("_PID", b"2"),
            ("MESSAGE", "C1 CSI \u{9b}31m and NEL \u{85} as valid UTF-8".as_bytes()),
        ]),
        event(&[
            ("PRIORITY", b"4"),
            ("SYSLOG_IDENTIFIER", b"c1-bytes"),
            // U+009B as a lone byte, then an overlong encoding of it.
            ("MESSAGE", b"C1 CSI \x9b31m as a byte, \xc0\x9b overlong"),
        ]),
        event(&[
            ("PRIORITY", b"5"),
            ("SYSLOG_IDENTIFIER", b"bidi"),
            (
                "MESSAGE",
                "invoice\u{202e}fdp.exe, \u{2066}isolate\u{2069}, \u{202a}embed\u{202c}, \
                 \u{200f}mark, line\u{2028}sep"
                    .as_bytes(),
            ),
        ]),
        event(&[("PRIORITY", b"6"), ("SYSLOG_IDENTIFIER", b"nul"), ("MESSAGE", b"nul\0byte")]),
        event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"utf8"),
            ("MESSAGE", b"bad \xff\xfe\xc3 bytes in otherwise fine text"),
        ]),
        event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"blob"),
            ("BINARY_BLOB", &blob),
            ("MESSAGE", b"this event carries a binary field"),
        ]),
        event(&[("PRIORITY", b"6"), ("SYSLOG_IDENTIFIER", b"huge"), ("MESSAGE", &huge)]),
        event(&[
            ("PRIORITY", b"3"),
            ("SYSLOG_IDENTIFIER", b"multi"),
            ("_PID", b"77"),
            ("MESSAGE", b"first line\nsecond line\r\n\tthird, after a tab\n"),
        ]),
        event(&[
            ("PRIORITY", b"2"),
            ("SYSLOG_IDENTIFIER", b"liar"),
            ("_HOSTNAME", b"dom0"),
            ("MESSAGE", b"I am dom0, trust me"),
        ]),
        event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"clock"),
            ("__REALTIME_TIMESTAMP", b"1000000"),
            ("MESSAGE", b"this happened in 1970"),
        ]),
        event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"unicode"),
            ("MESSAGE", "Grüße, 日本 — ok ✓".as_bytes()),
        ]),
        event(&[
            ("PRIORITY", b"7"),
            ("SYSLOG_IDENTIFIER", b"controls"),
            ("MESSAGE", b"bell\x07 bs\x08 del\x7f cr\roverwrite vt\x0b ff\x0c end"),
        ]),
        event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"impostor"),
            ("_HOSTNAME", b"sd-app\x1b[8m"),
            ("_QLOG_VM", b"sys-net"),
            ("MESSAGE", b"claims a trusted field and a hidden hostname"),
        ]),
        event(&[("_COMM", b"python3"), ("SYSLOG_PID", b"4242"), ("MESSAGE", b"no identifier")]),
        event(&[("SYSLOG_IDENTIFIER", b"silent")]),
    ]
}

/// A qlogd holding the hostile journal of [`VM`], then [`OTHER_VM`]'s three records: an
/// event claiming to be [`VM`], a gap the sink recorded, and one more event.
struct Fixture {
    sink: RunningSink,
    /// What the sink stores, in the order `qlog query` prints it.
    records: Vec<Record>,
}

impl Fixture {
    fn new() -> Fixture {
        let sink = RunningSink::start(SinkOptions::default());
        ingest_events(&sink, VM, "journal", &hostile_events()).expect("qlogd stores the events");

        // Sequence numbers 1 and 3: the sink records the missing 2 as a gap.
        let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), OTHER_VM, "journal");
        let claim = event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"usb"),
            ("_HOSTNAME", VM.as_bytes()),
            ("MESSAGE", b"sys-usb pretends to be sd-app"),
        ]);
        let after = event(&[
            ("PRIORITY", b"6"),
            ("SYSLOG_IDENTIFIER", b"usb"),
            ("_HOSTNAME", OTHER_VM.as_bytes()),
            ("MESSAGE", b"after the gap"),
        ]);
        conn.send_event(1, &claim).expect("qlogd reads events");
        conn.send_event(3, &after).expect("qlogd reads events");
        conn.send_end(3).expect("qlogd reads the end");
        conn.half_close().expect("the socket can be half-closed");
        let frames = conn.expect_closed(IO_TIMEOUT);
        let end = frames.last().expect("qlogd answers the end");
        assert_eq!(end.ty, FrameType::End, "{frames:?}");
        assert_eq!(end.payload, 3u64.to_be_bytes(), "{frames:?}");

        let records = query_events(sink.query_socket(), &EventsQuery::default())
            .expect("qlogd answers a query");
        assert_eq!(records.len(), hostile_events().len() + 3, "{records:#?}");
        assert_eq!(records[records.len() - 2].kind, RecordKind::Gap);
        Fixture { sink, records }
    }

    fn qlog(&self, args: &[&str]) -> QlogRun {
        let mut command = Command::new(bin_path("qlog"));
        command.arg("--socket").arg(self.sink.query_socket()).args(args);
        run(command, self.sink.dir(), &[])
    }

    /// `qlog query -o FORMAT`, which must succeed.
    fn query(&self, format: &str) -> Vec<u8> {
        let out = self.qlog(&["query", "-o", format]);
        assert!(out.status.success(), "qlog query -o {format}: {}\n{}", out.status, out.stderr);
        assert_eq!(out.stderr, "", "qlog query -o {format} complained");
        out.stdout
    }
}

#[derive(Debug)]
struct QlogRun {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs a prepared command with `TZ=UTC` and `env`, and none of the developer's NO_COLOR
/// or QLOG_QUERY_SOCKET; output goes to files in `dir` (no pipe to fill), under a deadline.
fn run(mut command: Command, dir: &Path, env: &[(&str, &str)]) -> QlogRun {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let stdout_path = dir.join(format!("qlog-{n}.out"));
    let stderr_path = dir.join(format!("qlog-{n}.err"));
    let file = |p: &Path| std::fs::File::create(p).expect("the sink's temp dir is writable");
    command
        .env("TZ", "UTC")
        .env_remove("NO_COLOR")
        .env_remove("QLOG_QUERY_SOCKET")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file(&stdout_path))
        .stderr(file(&stderr_path));
    let mut child = command.spawn().expect("the command can be spawned");
    let status = match wait_timeout(&mut child, IO_TIMEOUT) {
        Ok(Some(status)) => status,
        outcome => {
            kill_and_reap(&mut child);
            panic!("{command:?} did not finish within {IO_TIMEOUT:?}: {outcome:?}");
        }
    };
    QlogRun {
        status,
        stdout: std::fs::read(&stdout_path).expect("the output file exists"),
        stderr: String::from_utf8_lossy(&std::fs::read(&stderr_path).expect("it exists"))
            .into_owned(),
    }
}

// ---- Times -----------------------------------------------------------------------------

const MONTHS: [&str; 12] =
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// (year, month 1-12, day, hour, minute, second, microsecond) in UTC.
fn utc(usec: u64) -> (i64, usize, u64, u64, u64, u64, u64) {
    let secs = usec / 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to the civil calendar (proleptic Gregorian), after Howard Hinnant.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60, usec % 1_000_000)
}

/// How `qlog -o FORMAT` prints a receive time in UTC, and a placeholder as wide.
fn time_and_placeholder(format: &str, usec: u64) -> (String, &'static str) {
    let (y, mo, d, h, mi, s, us) = utc(usec);
    let month = MONTHS[mo - 1];
    match format {
        "short" => (format!("{month} {d:02} {h:02}:{mi:02}:{s:02}"), "MMM DD HH:MM:SS"),
        "short-iso" => {
            (format!("{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}+0000"), "YYYY-MM-DDTHH:MM:SS+0000")
        }
        "short-precise" => {
            (format!("{month} {d:02} {h:02}:{mi:02}:{s:02}.{us:06}"), "MMM DD HH:MM:SS.UUUUUU")
        }
        other => panic!("no time layout for {other}"),
    }
}

// ---- Normalising -----------------------------------------------------------------------

/// Replaces the receive time that starts each record's first line. Continuation lines
/// start with a space; every other line must start with the next record's time.
fn normalise_short(format: &str, output: &str, records: &[Record]) -> String {
    let mut records = records.iter();
    let mut out = String::new();
    for line in output.split_inclusive('\n') {
        if line.starts_with(' ') {
            out.push_str(line);
            continue;
        }
        let record = records.next().unwrap_or_else(|| panic!("a line too many: {line:?}"));
        let (time, placeholder) = time_and_placeholder(format, record.received_usec);
        let rest = line.strip_prefix(&time).unwrap_or_else(|| {
            panic!("record {} should start with its receive time {time}: {line:?}", record.seq)
        });
        out.push_str(placeholder);
        out.push_str(rest);
    }
    assert!(records.next().is_none(), "fewer lines than records:\n{output}");
    out
}

/// Replaces, in order, one occurrence per record of each needle made from its receive
/// time, each searched after the previous one.
fn normalise_in_order(output: &[u8], records: &[Record], needles: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(output.len());
    let mut rest = output;
    for record in records {
        for (prefix, placeholder) in needles {
            let needle = format!("{prefix}{}", record.received_usec);
            let at = find(rest, needle.as_bytes())
                .unwrap_or_else(|| panic!("{needle:?} missing for record {}", record.seq));
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(placeholder.as_bytes());
            rest = &rest[at + needle.len()..];
        }
    }
    out.extend_from_slice(rest);
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---- Golden files ----------------------------------------------------------------------

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/golden").join(name)
}

/// Compares with `tests/data/golden/NAME`, or writes it under `QLOG_BLESS=1`.
fn assert_golden(name: &str, actual: &[u8]) {
    let path = golden_path(name);
    if std::env::var_os("QLOG_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("a golden file has a directory"))
            .expect("tests/data/golden can be created");
        std::fs::write(&path, actual).expect("the golden file can be written");
        eprintln!("blessed {}", path.display());
        return;
    }
    let bless = "QLOG_BLESS=1 cargo test -p qlog-tests --test cli_output";
    let Ok(expected) = std::fs::read(&path) else {
        panic!("{} is missing: create it with {bless}, then review it", path.display());
    };
    if expected == actual {
        return;
    }
    let actual_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&actual_path, actual).expect("the target tmp dir is writable");
    let line = |text: &[u8], i: usize| {
        text.split(|&b| b == b'\n').nth(i).map(|l| String::from_utf8_lossy(l).into_owned())
    };
    let first_diff = (0..)
        .find(|&i| line(&expected, i) != line(actual, i))
        .expect("different texts differ in some line");
    panic!(
        "output differs from {} at line {}:\n  expected {:?}\n  actual   {:?}\nthe whole \
         output is in {}; if the change is intended, run {bless} and review the diff",
        path.display(),
        first_diff + 1,
        line(&expected, first_diff),
        line(actual, first_diff),
        actual_path.display()
    );
}

// ---- Terminal safety -------------------------------------------------------------------

/// Panics on anything in text output that a terminal would act on instead of print: C0
/// controls other than tab and newline, DEL, C1 controls, bidi embeddings, overrides and
/// isolates. Text output must also be valid UTF-8 (invalid bytes are shown as `\xNN`).
fn assert_terminal_safe(what: &str, output: &[u8]) {
    for (i, &b) in output.iter().enumerate() {
        let bad = matches!(b, 0x00..=0x08 | 0x0b..=0x1f | 0x7f);
        assert!(
            !bad,
            "{what}: byte {b:#04x} at {i} reaches the terminal: {:?}",
            context(output, i)
        );
    }
    let text = std::str::from_utf8(output)
        .unwrap_or_else(|e| panic!("{what}: output is not valid UTF-8: {e}"));
    for (i, c) in text.char_indices() {
        let bad =
            matches!(c, '\u{80}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        assert!(!bad, "{what}: {c:?} at {i} reaches the terminal: {:?}", context(output, i));
    }
}

fn context(output: &[u8], at: usize) -> String {
    let start = at.saturating_sub(40);
    String::from_utf8_lossy(&output[start..(at + 40).min(output.len())]).into_owned()
}

fn assert_keeps_valid_utf8(what: &str, output: &[u8]) {
    let text = String::from_utf8_lossy(output);
    assert!(text.contains("Grüße, 日本 — ok ✓"), "{what} mangled valid UTF-8:\n{text}");
}

// ---- Text formats ----------------------------------------------------------------------

fn check_short_format(format: &str) {
    let fixture = Fixture::new();
    let output = fixture.query(format);
    assert_terminal_safe(format, &output);
    assert_keeps_valid_utf8(format, &output);
    let text = String::from_utf8(output).expect("checked above");
    let normalised = normalise_short(format, &text, &fixture.records);
    assert_golden(&format!("query.{format}"), normalised.as_bytes());
}

#[test]
fn short_output_matches_golden_and_lets_no_control_through() {
    check_short_format("short");
}

#[test]
fn short_iso_output_matches_golden_and_lets_no_control_through() {
    check_short_format("short-iso");
}

#[test]
fn short_precise_output_matches_golden_and_lets_no_control_through() {
    check_short_format("short-precise");
}

#[test]
fn short_output_marks_claims_next_to_the_trusted_vm() {
    let fixture = Fixture::new();
    let text = String::from_utf8(fixture.query("short")).expect("text output is UTF-8");
    let line = |needle: &str| {
        text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}:\n{text}"))
    };
    assert!(line("I am dom0").contains(" sd-app [claims host \"dom0\"] liar: "));
    assert!(line("in 1970").contains(" sd-app [claims time 1970-01-01T00:00:01+0000] clock: "));
    assert!(line("hidden hostname").contains(" sd-app [claims host \"sd-app\\e[8m\"] impostor: "));
    assert!(line("pretends").contains(" sys-usb [claims host \"sd-app\"] usb: "));
    assert!(line("after the gap").contains(" sys-usb usb: "), "an honest host is not marked");
    assert!(line("never arrived").contains(" sys-usb -- qlog: 1 events of stream journal"));
    // Multi-line messages continue under the first line, nothing in them unescaped.
    let first = line("first line");
    let indent = first.find("first line").expect("found above");
    let next: Vec<&str> = text.lines().skip_while(|l| !l.contains("first line")).collect();
    assert_eq!(next[1], format!("{}second line\\r", " ".repeat(indent)));
    assert_eq!(next[2], format!("{}\\tthird, after a tab", " ".repeat(indent)));
    assert!(line("nul").ends_with("nul: [8 bytes of binary data]"));
    assert!(line("huge").len() > HUGE_LEN, "the 40 KiB message is shown in full");
}

#[test]
fn cat_output_matches_golden_and_lets_no_control_through() {
    let fixture = Fixture::new();
    let output = fixture.query("cat");
    assert_terminal_safe("cat", &output);
    assert_keeps_valid_utf8("cat", &output);
    assert_golden("query.cat", &output);
}

// ---- JSON ------------------------------------------------------------------------------

/// Bytes of a journalctl-style JSON value: a string, or an array of byte values.
fn json_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Array(items) => items
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()).expect("a byte value"))
            .collect(),
        other => panic!("not a journalctl JSON value: {other}"),
    }
}

/// Checks one JSON object per record against the stored record.
fn check_json_values(values: &[Value], records: &[Record]) {
    assert_eq!(values.len(), records.len());
    for (v, r) in values.iter().zip(records) {
        assert_eq!(v["_QLOG_VM"], r.vm.as_str(), "{v}");
        assert_eq!(v["_QLOG_SEQ"], r.seq.to_string().as_str(), "{v}");
        assert_eq!(v["_QLOG_RECEIVED_USEC"], r.received_usec.to_string().as_str(), "{v}");
        for f in &r.event.fields {
            assert_eq!(json_bytes(&v[&f.name]), f.value, "{} of record {}", f.name, r.seq);
        }
    }
    let by_message = |m: &[u8]| {
        values.iter().find(|v| v["MESSAGE"] != Value::Null && json_bytes(&v["MESSAGE"]) == m)
    };
    let blob = by_message(b"this event carries a binary field").expect("the blob event");
    assert_eq!(blob["BINARY_BLOB"], Value::from((0..=255u8).collect::<Vec<_>>()));
    let bad = by_message(b"bad \xff\xfe\xc3 bytes in otherwise fine text").expect("bad UTF-8");
    assert!(bad["MESSAGE"].is_array(), "invalid UTF-8 is a byte array: {bad}");
    let huge = by_message(&huge_message()).expect("the 40 KiB message is not cut or nulled");
    assert!(huge["MESSAGE"].is_string());
    let impostor = by_message(b"claims a trusted field and a hidden hostname").expect("found");
    assert_eq!(impostor["_QLOG_VM"], VM);
    assert_eq!(impostor["CLAIMED_QLOG_VM"], "sys-net");
    let claim = by_message(b"sys-usb pretends to be sd-app").expect("found");
    assert_eq!(
        (&claim["_QLOG_VM"], &claim["_HOSTNAME"]),
        (&Value::from(OTHER_VM), &Value::from(VM))
    );
    let gap = values.iter().find(|v| v["_QLOG_KIND"] == "gap").expect("the gap record");
    assert_eq!(
        (&gap["_QLOG_GAP"], &gap["_QLOG_GAP_COUNT"]),
        (&Value::from("seq"), &Value::from("1"))
    );
}

#[test]
fn json_output_matches_golden_with_binary_values_as_byte_arrays() {
    let fixture = Fixture::new();
    let output = fixture.query("json");
    let values: Vec<Value> = output
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("every line is one JSON object"))
        .collect();
    check_json_values(&values, &fixture.records);
    let needles = [("\"_QLOG_RECEIVED_USEC\":\"", "RECEIVED_USEC")];
    assert_golden("query.json", &normalise_in_order(&output, &fixture.records, &needles));
}

#[test]
fn json_pretty_output_matches_golden_and_holds_the_same_values_as_json() {
    let fixture = Fixture::new();
    let output = fixture.query("json-pretty");
    let values: Vec<Value> = serde_json::Deserializer::from_slice(&output)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .expect("the output is a sequence of JSON values");
    check_json_values(&values, &fixture.records);
    let compact: Vec<Value> = fixture
        .query("json")
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("valid JSON"))
        .collect();
    assert_eq!(values, compact, "json-pretty says what json says");
    let needles = [("\"_QLOG_RECEIVED_USEC\": \"", "RECEIVED_USEC")];
    assert_golden("query.json-pretty", &normalise_in_order(&output, &fixture.records, &needles));
}

/// The ARCHITECTURE.md invariant "Bytes from a VM reach a terminal only through
/// src/escape.rs" covers `qlog query -o json` typed at a terminal too. JSON may spell any
/// character as `\uXXXX`, so the format can stay valid and still keep C1 controls (U+009B
/// is CSI on terminals that honour 8-bit controls) and bidi overrides off the screen.
///
/// serde_json escapes only U+0000-U+001F; our formatter also escapes DEL, C1, bidi controls
/// and line separators, so `-o json` on a terminal is safe too.
#[test]
fn json_output_reaches_a_terminal_without_c1_or_bidi_controls() {
    let fixture = Fixture::new();
    for format in ["json", "json-pretty"] {
        let output = fixture.query(format);
        assert_terminal_safe(&format!("-o {format}"), &output);
    }
}

// ---- Export ----------------------------------------------------------------------------

#[test]
fn export_output_matches_golden_and_parses_back_to_the_stored_fields() {
    let fixture = Fixture::new();
    let output = fixture.query("export");
    let entries = parse_export(&output).expect("the output is in the journal export format");
    assert_eq!(entries.len(), fixture.records.len());
    for (entry, record) in entries.iter().zip(&fixture.records) {
        let received = record.received_usec.to_string();
        let seq = record.seq.to_string();
        // Every entry carries a valid boot ID, the VM's or one derived from VM and stream,
        // so journal-remote never files it under the previous entry's boot.
        let boot = &entry.fields[2];
        assert_eq!(boot.name, "_BOOT_ID", "record {}", record.seq);
        assert!(
            boot.value.len() == 32
                && boot.value.iter().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "record {}: {:?}",
            record.seq,
            String::from_utf8_lossy(&boot.value)
        );
        let head: Vec<(&str, &[u8])> = entry
            .fields
            .iter()
            .take(8)
            .filter(|f| f.name != "_BOOT_ID")
            .map(|f| (f.name.as_str(), f.value.as_slice()))
            .collect();
        let monotonic = record.event.get("__MONOTONIC_TIMESTAMP").unwrap_or(b"0");
        let expected_head: Vec<(&str, &[u8])> = vec![
            ("__REALTIME_TIMESTAMP", received.as_bytes()),
            ("__MONOTONIC_TIMESTAMP", monotonic),
            ("_HOSTNAME", record.vm.as_bytes()),
            ("_QLOG_VM", record.vm.as_bytes()),
            ("_QLOG_STREAM", record.stream.as_bytes()),
            ("_QLOG_SEQ", seq.as_bytes()),
            ("_QLOG_RECEIVED_USEC", received.as_bytes()),
        ];
        assert_eq!(head, expected_head, "the sink's facts lead record {}", record.seq);
        // The VM's fields follow in order; its timestamp and hostname claims are kept
        // under names journal-remote will not take for the entry's own.
        let renamed: Vec<(String, Vec<u8>)> = record
            .event
            .fields
            .iter()
            .filter(|f| {
                !matches!(f.name.as_str(), "__MONOTONIC_TIMESTAMP" | "__CURSOR" | "_BOOT_ID")
            })
            .map(|f| {
                let name = match f.name.as_str() {
                    "__REALTIME_TIMESTAMP" => "QLOG_CLAIMED_REALTIME_TIMESTAMP".to_owned(),
                    "_HOSTNAME" => "QLOG_CLAIMED_HOSTNAME".to_owned(),
                    name => name.to_owned(),
                };
                (name, f.value.clone())
            })
            .collect();
        let tail: Vec<(String, Vec<u8>)> =
            entry.fields.iter().skip(8).map(|f| (f.name.clone(), f.value.clone())).collect();
        assert_eq!(tail, renamed, "the VM's fields of record {}", record.seq);
    }
    let needles =
        [("__REALTIME_TIMESTAMP=", "RECEIVED_USEC"), ("_QLOG_RECEIVED_USEC=", "RECEIVED_USEC")];
    assert_golden("query.export", &normalise_in_order(&output, &fixture.records, &needles));
}

// ---- Colours ---------------------------------------------------------------------------

/// Runs qlog on a pseudo-terminal through util-linux `script`, so its stdout is a tty.
/// The terminal turns each `\n` into `\r\n`; that is undone (qlog escapes a VM's `\r`,
/// so every `\r` here is the terminal's).
fn qlog_on_a_terminal(fixture: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Vec<u8> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let socket = fixture.sink.query_socket().to_str().expect("temp paths are UTF-8");
    let mut line = vec![quote(bin_path("qlog").to_str().expect("UTF-8 path")), "--socket".into()];
    line.push(quote(socket));
    line.extend(args.iter().map(|a| quote(a)));
    let mut command = Command::new("script");
    command.args(["-q", "-e", "-c", &line.join(" "), "/dev/null"]);
    let out = run(command, fixture.sink.dir(), env);
    assert!(out.status.success(), "qlog on a terminal: {}\n{}", out.status, out.stderr);
    let mut bytes = Vec::with_capacity(out.stdout.len());
    for (i, &b) in out.stdout.iter().enumerate() {
        if !(b == b'\r' && out.stdout.get(i + 1) == Some(&b'\n')) {
            bytes.push(b);
        }
    }
    bytes
}

fn strip_sgr(output: &[u8]) -> Vec<u8> {
    let mut text = String::from_utf8(output.to_vec()).expect("text output is UTF-8");
    for code in SGR_CODES {
        text = text.replace(code, "");
    }
    text.into_bytes()
}

#[test]
fn colours_appear_on_a_terminal_only_as_qlogs_own_codes() {
    let fixture = Fixture::new();
    let plain = fixture.query("short");
    assert!(!plain.contains(&0x1b), "no colour when stdout is not a terminal");

    let coloured = qlog_on_a_terminal(&fixture, &["query"], &[]);
    let text = String::from_utf8_lossy(&coloured);
    let line = |needle: &str| text.lines().find(|l| l.contains(needle)).expect(needle).to_owned();
    assert!(line("I am dom0").contains("\x1b[1;31mI am dom0, trust me\x1b[0m"), "crit is red");
    assert!(line("C1 CSI").contains(": \x1b[1;33mC1 "), "warning is yellow");
    assert!(line("invoice").contains(": \x1b[1;39minvoice"), "notice is highlighted");
    assert!(line("bell").contains(": \x1b[2;39mbell"), "debug is grey");
    assert!(!line("Grüße").contains('\x1b'), "info is plain");
    assert!(line("never arrived").contains("\x1b[1;33m-- qlog: "), "gaps stand out");
    // Take qlog's own codes away and what remains is the plain output, byte for byte: no
    // escape sequence of a VM's got through with them.
    let stripped = strip_sgr(&coloured);
    assert_terminal_safe("short on a terminal, colour codes removed", &stripped);
    assert_eq!(String::from_utf8_lossy(&stripped), String::from_utf8_lossy(&plain));

    let cat = qlog_on_a_terminal(&fixture, &["query", "-o", "cat"], &[]);
    assert!(String::from_utf8_lossy(&cat).contains("\x1b[1;31mI am dom0, trust me\x1b[0m"));
    assert_eq!(strip_sgr(&cat), fixture.query("cat"));
}

#[test]
fn no_color_flag_and_environment_disable_colours_on_a_terminal() {
    let fixture = Fixture::new();
    let plain = fixture.query("short");
    let flag = qlog_on_a_terminal(&fixture, &["query", "--no-color"], &[]);
    assert_eq!(String::from_utf8_lossy(&flag), String::from_utf8_lossy(&plain), "--no-color");
    let env = qlog_on_a_terminal(&fixture, &["query"], &[("NO_COLOR", "1")]);
    assert_eq!(String::from_utf8_lossy(&env), String::from_utf8_lossy(&plain), "NO_COLOR=1");
}
