//! `qlog query`'s filters, checked against journalctl itself on the same events.
//!
//! Each test stores one generated journal (`qlog_tests::workload`, three VMs) in a real
//! qlogd, and writes the same events into a journal file with systemd-journal-remote.
//! Every event carries a unique `TEST_ID`; a filter is right when `qlog query -o json`
//! and `journalctl --file FILE -o json` select the same set of them. qlog's VM names
//! correspond to `_HOSTNAME=VM` matches, which is what the workload's VMs claim.
//!
//! Time filters are the exception. journalctl's `-S`/`-U` compare the VM's own
//! `__REALTIME_TIMESTAMP`, qlog's the sink's receive time, so those tests check qlog on its
//! own terms: a time taken between two ingest batches splits them exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use qlog_rpc::Event;
use qlog_tests::process::{kill_and_reap, wait_timeout};
use qlog_tests::utc_timestamp;
use qlog_tests::workload::{write_export, Workload};
use qlog_tests::{bin_path, ingest_events, RunningSink, SinkOptions, IO_TIMEOUT};
use serde_json::Value;

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";
const VMS: [&str; 3] = ["sd-app", "sd-proxy", "sys-usb"];
/// Enough that every workload message kind appears in every VM.
const EVENTS_PER_VM: usize = 400;
const SEED: u64 = 1203;

/// The same events in a qlogd and in a journal file.
struct Fixture {
    sink: RunningSink,
    journal: PathBuf,
    /// Every event by `TEST_ID`, in the order stored (and written to the journal).
    events: BTreeMap<String, Event>,
    order: Vec<String>,
}

impl Fixture {
    /// The workload of [`VMS`], then `extra` events of the VM `untrusted`.
    fn new(extra: Vec<Event>) -> Fixture {
        let sink = RunningSink::start(SinkOptions::default());
        let mut per_vm: Vec<(&str, Vec<Event>)> = VMS
            .iter()
            .map(|vm| {
                let mut workload = Workload::new(SEED, vm);
                (*vm, (0..EVENTS_PER_VM).map(|_| workload.next_event()).collect())
            })
            .collect();
        if !extra.is_empty() {
            per_vm.push(("untrusted", extra));
        }

        let mut events = BTreeMap::new();
        let mut order = Vec::new();
        let mut export = Vec::new();
        for (vm, vm_events) in &mut per_vm {
            for (i, e) in vm_events.iter_mut().enumerate() {
                let id = format!("{vm}-{i:04}");
                e.push("TEST_ID", id.clone());
                write_export(e, &mut export).expect("writing to a Vec cannot fail");
                events.insert(id.clone(), e.clone());
                order.push(id);
            }
            // One session per VM, one after the other, so qlog's order (receive time,
            // VM, seq) is the order of the journal file.
            ingest_events(&sink, vm, "journal", vm_events).expect("qlogd stores the events");
        }

        let journal = sink.dir().join("same.journal");
        let remote = run_with_input(
            Command::new(JOURNAL_REMOTE).arg("-o").arg(&journal).arg("-"),
            sink.dir(),
            &export,
        );
        assert!(remote.status.success(), "systemd-journal-remote: {remote:?}");
        let fixture = Fixture { sink, journal, events, order };
        let all = fixture.journalctl(&[]);
        assert_eq!(all.len(), fixture.events.len(), "journal-remote kept every entry");
        fixture
    }

    /// `qlog query -o json ARGS` as TEST_IDs in output order.
    fn qlog(&self, args: &[&str]) -> Vec<String> {
        let out = self.qlog_run(&[&["query", "-o", "json"], args].concat());
        assert!(out.status.success(), "qlog query {args:?}: {}\n{}", out.status, out.stderr);
        test_ids(&out.stdout)
    }

    fn qlog_run(&self, args: &[&str]) -> Run {
        let mut command = Command::new(bin_path("qlog"));
        command.arg("--socket").arg(self.sink.query_socket()).args(args);
        run_with_input(&mut command, self.sink.dir(), b"")
    }

    /// `journalctl --file JOURNAL -o json ARGS` as TEST_IDs in output order.
    fn journalctl(&self, args: &[&str]) -> Vec<String> {
        let mut command = Command::new("journalctl");
        command.arg("--file").arg(&self.journal).args(["-q", "--no-pager", "-o", "json"]);
        let out = run_with_input(command.args(args), self.sink.dir(), b"");
        // With --grep, journalctl exits 1 when nothing matched.
        let nothing =
            out.status.code() == Some(1) && out.stdout.is_empty() && out.stderr.is_empty();
        assert!(
            out.status.success() || nothing,
            "journalctl {args:?}: {}\n{}",
            out.status,
            out.stderr
        );
        test_ids(&out.stdout)
    }

    /// Asserts that qlog with `qlog_args` selects what journalctl selects with
    /// `journalctl_args`, and that the filter selects something but not everything.
    fn assert_same_selection(&self, qlog_args: &[&str], journalctl_args: &[&str]) {
        let ours: BTreeSet<String> = self.qlog(qlog_args).into_iter().collect();
        let theirs: BTreeSet<String> = self.journalctl(journalctl_args).into_iter().collect();
        let describe = |ids: Vec<&String>| -> String {
            ids.iter()
                .take(8)
                .map(|id| {
                    let e = &self.events[*id];
                    let field = |n| String::from_utf8_lossy(e.get(n).unwrap_or(b"-")).into_owned();
                    format!(
                        "\n    {id} PRIORITY={} _SYSTEMD_UNIT={} SYSLOG_IDENTIFIER={} MESSAGE={:?}",
                        field("PRIORITY"),
                        field("_SYSTEMD_UNIT"),
                        field("SYSLOG_IDENTIFIER"),
                        field("MESSAGE")
                    )
                })
                .collect()
        };
        assert!(
            ours == theirs,
            "qlog query {qlog_args:?} and journalctl {journalctl_args:?} disagree \
             ({} against {} matches)\n  only qlog:{}\n  only journalctl:{}",
            ours.len(),
            theirs.len(),
            describe(ours.difference(&theirs).collect()),
            describe(theirs.difference(&ours).collect()),
        );
        assert!(
            !theirs.is_empty() && theirs.len() < self.events.len(),
            "journalctl {journalctl_args:?} selects {} of {}: the filter proves nothing",
            theirs.len(),
            self.events.len()
        );
    }
}

fn test_ids(json_lines: &[u8]) -> Vec<String> {
    json_lines
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).expect("one JSON object per line");
            v["TEST_ID"].as_str().expect("every event has a TEST_ID").to_owned()
        })
        .collect()
}

#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `command` with `TZ=UTC`, `input` on stdin and output to files in `dir`, under
/// a deadline.
fn run_with_input(command: &mut Command, dir: &Path, input: &[u8]) -> Run {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let path = |ext: &str| dir.join(format!("run-{n}.{ext}"));
    let file = |p: PathBuf| std::fs::File::create(p).expect("the sink's temp dir is writable");
    std::fs::write(path("in"), input).expect("the sink's temp dir is writable");
    command
        .env("TZ", "UTC")
        .env_remove("QLOG_QUERY_SOCKET")
        .stdin(std::fs::File::open(path("in")).expect("just written"))
        .stdout(file(path("out")))
        .stderr(file(path("err")));
    let mut child = command.spawn().expect("the command can be spawned");
    let status = match wait_timeout(&mut child, IO_TIMEOUT) {
        Ok(Some(status)) => status,
        outcome => {
            kill_and_reap(&mut child);
            panic!("{command:?} did not finish within {IO_TIMEOUT:?}: {outcome:?}");
        }
    };
    Run {
        status,
        stdout: std::fs::read(path("out")).expect("the output file exists"),
        stderr: String::from_utf8_lossy(&std::fs::read(path("err")).expect("it exists"))
            .into_owned(),
    }
}

// ---- Filters compared with journalctl --------------------------------------------------

#[test]
fn priority_names_and_numbers_select_that_level_and_worse_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["-p", "err"], &["-p", "err"]);
    fixture.assert_same_selection(&["-p", "6"], &["-p", "6"]);
    fixture.assert_same_selection(&["-p", "warning"], &["-p", "warning"]);
}

#[test]
fn priority_ranges_include_both_ends_in_either_order_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["-p", "warning..err"], &["-p", "warning..err"]);
    fixture.assert_same_selection(&["-p", "err..warning"], &["-p", "err..warning"]);
    fixture.assert_same_selection(&["-p", "notice..debug"], &["-p", "notice..debug"]);
}

#[test]
fn unit_names_get_service_appended_and_globs_expand_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["-u", "qubes-qrexec-agent"], &["-u", "qubes-qrexec-agent"]);
    fixture.assert_same_selection(&["-u", "tor"], &["-u", "tor"]);
    fixture.assert_same_selection(&["-u", "session-1.scope"], &["-u", "session-1.scope"]);
    fixture.assert_same_selection(&["-u", "qubes-*"], &["-u", "qubes-*"]);
    fixture.assert_same_selection(&["-u", "tor", "-u", "cups"], &["-u", "tor", "-u", "cups"]);
}

/// Events that name a unit in a field journalctl's `-u` trusts only from the right
/// sender: `UNIT=` only from PID 1, `OBJECT_SYSTEMD_UNIT=` only from root, and
/// `COREDUMP_UNIT=` only on a root-sent coredump message (see `add_matches_for_unit` in
/// systemd's logs-show.c). Each attempt comes with the genuine counterpart.
fn unit_claims() -> Vec<Event> {
    let unit = b"qubes-qrexec-agent.service".as_slice();
    let e = |fields: &[(&str, &[u8])]| {
        let mut e = Event::new();
        e.push("_HOSTNAME", "untrusted");
        e.push("PRIORITY", "6");
        for (name, value) in fields {
            e.push(*name, value.to_vec());
        }
        e
    };
    vec![
        e(&[("_PID", b"4242"), ("_UID", b"1000"), ("UNIT", unit), ("MESSAGE", b"fake UNIT")]),
        e(&[("_PID", b"1"), ("_UID", b"0"), ("UNIT", unit), ("MESSAGE", b"Started the agent.")]),
        e(&[
            ("_PID", b"4243"),
            ("_UID", b"1000"),
            ("OBJECT_SYSTEMD_UNIT", unit),
            ("MESSAGE", b"fake OBJECT_SYSTEMD_UNIT"),
        ]),
        e(&[
            ("_PID", b"555"),
            ("_UID", b"0"),
            ("OBJECT_SYSTEMD_UNIT", unit),
            ("MESSAGE", b"a root daemon about the agent"),
        ]),
        e(&[
            ("_PID", b"4244"),
            ("_UID", b"1000"),
            ("MESSAGE_ID", b"fc2e22bc6ee647b6b90729ab34a250b1"),
            ("COREDUMP_UNIT", unit),
            ("MESSAGE", b"fake coredump"),
        ]),
        e(&[
            ("_PID", b"556"),
            ("_UID", b"0"),
            ("MESSAGE_ID", b"fc2e22bc6ee647b6b90729ab34a250b1"),
            ("COREDUMP_UNIT", unit),
            ("MESSAGE", b"Process 1234 (qrexec-agent) dumped core."),
        ]),
    ]
}

/// `-u` trusts what journalctl trusts: `_SYSTEMD_UNIT`, or `UNIT` from `_PID=1`,
/// `OBJECT_SYSTEMD_UNIT` from `_UID=0`, `COREDUMP_UNIT` from `_UID=0` on coredump entries.
#[test]
fn unit_filter_trusts_unit_claims_only_from_the_senders_journalctl_trusts() {
    let fixture = Fixture::new(unit_claims());
    fixture.assert_same_selection(&["-u", "qubes-qrexec-agent"], &["-u", "qubes-qrexec-agent"]);
}

#[test]
fn identifier_filter_matches_syslog_identifier_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["-t", "sudo"], &["-t", "sudo"]);
    fixture.assert_same_selection(&["-t", "sudo", "-t", "Tor"], &["-t", "sudo", "-t", "Tor"]);
}

#[test]
fn grep_with_a_lower_case_pattern_ignores_case_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["-g", "fail"], &["-g", "fail"]);
    // Multi-line messages, invalid UTF-8 and anchors at the ends of the whole message.
    fixture.assert_same_selection(&["-g", "database is locked"], &["-g", "database is locked"]);
    fixture.assert_same_selection(&["-g", "device name"], &["-g", "device name"]);
    fixture.assert_same_selection(&["-g", "^traceback"], &["-g", "^traceback"]);
    fixture.assert_same_selection(&["-g", "locked$"], &["-g", "locked$"]);
}

#[test]
fn grep_with_an_upper_case_letter_is_case_sensitive_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["-g", "Fail"], &["-g", "Fail"]);
    fixture.assert_same_selection(&["-g", "GET /api"], &["-g", "GET /api"]);
    let insensitive: BTreeSet<String> = fixture.qlog(&["-g", "fail"]).into_iter().collect();
    let sensitive: BTreeSet<String> = fixture.qlog(&["-g", "Fail"]).into_iter().collect();
    assert!(sensitive.is_subset(&insensitive));
}

#[test]
fn case_sensitive_flag_makes_a_lower_case_grep_exact_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    // The workload writes only "Failed", never "fail": an exact search finds nothing.
    assert_eq!(fixture.qlog(&["--case-sensitive", "-g", "fail"]), Vec::<String>::new());
    assert_eq!(fixture.journalctl(&["--case-sensitive", "-g", "fail"]), Vec::<String>::new());
    // "connection" is written both ways ("Connected to a relay" aside).
    let exact = ["--case-sensitive", "-g", "connect"];
    fixture.assert_same_selection(&exact, &exact);
    let loose = fixture.qlog(&["-g", "connect"]).len();
    assert!(fixture.qlog(&exact).len() < loose, "the flag changes the result");
}

#[test]
fn the_same_field_twice_is_or_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    let or = ["SYSLOG_IDENTIFIER=sudo", "SYSLOG_IDENTIFIER=Tor"];
    fixture.assert_same_selection(&or, &or);
    let one = fixture.qlog(&["SYSLOG_IDENTIFIER=sudo"]).len();
    assert!(fixture.qlog(&or).len() > one, "the second value adds matches");
}

#[test]
fn different_fields_are_and_as_journalctl_does() {
    let fixture = Fixture::new(Vec::new());
    let and = ["SYSLOG_IDENTIFIER=sudo", "PRIORITY=6"];
    fixture.assert_same_selection(&and, &and);
    let one = fixture.qlog(&["SYSLOG_IDENTIFIER=sudo"]).len();
    assert!(fixture.qlog(&and).len() < one, "the second field removes matches");
    let both = ["PRIORITY=3", "PRIORITY=4", "SYSLOG_IDENTIFIER=securedrop-client"];
    fixture.assert_same_selection(&both, &both);
}

#[test]
fn vm_names_and_filters_combine_as_hostname_matches_do_in_journalctl() {
    let fixture = Fixture::new(Vec::new());
    fixture.assert_same_selection(&["sd-app"], &["_HOSTNAME=sd-app"]);
    fixture
        .assert_same_selection(&["sd-app", "sys-usb"], &["_HOSTNAME=sd-app", "_HOSTNAME=sys-usb"]);
    fixture.assert_same_selection(
        &["sd-proxy", "-p", "warning", "-u", "securedrop-client", "-g", "retry"],
        &["_HOSTNAME=sd-proxy", "-p", "warning", "-u", "securedrop-client", "-g", "retry"],
    );
}

// ---- Order and limits ------------------------------------------------------------------

#[test]
fn lines_option_shows_the_last_n_matches_oldest_first() {
    let fixture = Fixture::new(Vec::new());
    let last5: Vec<String> = fixture.order[fixture.order.len() - 5..].to_vec();
    assert_eq!(fixture.qlog(&["-n", "5"]), last5);
    assert_eq!(fixture.journalctl(&["-n", "5"]), last5, "journalctl agrees");
    let errors = fixture.qlog(&["-p", "err"]);
    assert_eq!(fixture.qlog(&["-n", "5", "-p", "err"]), errors[errors.len() - 5..]);
    assert_eq!(fixture.qlog(&["-n", "0"]), Vec::<String>::new());
}

#[test]
fn reverse_shows_newest_first() {
    let fixture = Fixture::new(Vec::new());
    let mut reversed = fixture.order.clone();
    reversed.reverse();
    assert_eq!(fixture.qlog(&[]), fixture.order);
    assert_eq!(fixture.qlog(&["--reverse"]), reversed);
    assert_eq!(fixture.qlog(&["-r", "-n", "5"]), reversed[..5]);
    assert_eq!(fixture.journalctl(&["-r", "-n", "5"]), reversed[..5], "journalctl agrees");
}

#[test]
fn an_unknown_vm_is_an_error_that_suggests_the_nearest_known_name() {
    let fixture = Fixture::new(Vec::new());
    let out = fixture.qlog_run(&["query", "sd-ap"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("unknown VM \"sd-ap\": did you mean sd-app?"), "{}", out.stderr);
    assert!(out.stderr.contains("qlog vms lists the 3 known VMs"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let out = fixture.qlog_run(&["tail", "--no-follow", "sys-usbb"]);
    assert!(out.stderr.contains("did you mean sys-usb?"), "{}", out.stderr);
    let out = fixture.qlog_run(&["query", "sd-app", "personal"]);
    assert!(out.stderr.contains("unknown VM \"personal\" ("), "nothing is near: {}", out.stderr);
}

// ---- Time, on qlog's own terms ---------------------------------------------------------

fn now_usec() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970");
    u64::try_from(since_epoch.as_micros()).expect("fits until the year 586,912")
}

#[test]
fn since_and_until_split_exactly_at_a_time_between_two_ingest_batches() {
    let sink = RunningSink::start(SinkOptions::default());
    let batch = |tag: &str| -> Vec<Event> {
        let mut workload = Workload::new(SEED, "sd-app");
        (0..50)
            .map(|i| {
                let mut e = workload.next_event();
                e.push("TEST_ID", format!("{tag}-{i:02}"));
                e
            })
            .collect()
    };
    let (a, b) = (batch("a"), batch("b"));
    ingest_events(&sink, "sd-app", "journal", &a).expect("qlogd stores batch A");
    // Batch A was stamped before its end reply came back, so before `between`; batch B
    // is stamped after the clock has passed `between`. The clock is read, not slept on.
    let between = now_usec() + 1;
    while now_usec() <= between {
        std::hint::spin_loop();
    }
    ingest_events(&sink, "sd-app", "journal", &b).expect("qlogd stores batch B");

    let fixture_ids = |events: &[Event]| -> Vec<String> {
        events.iter().map(|e| e.get_str("TEST_ID").expect("tagged").to_owned()).collect()
    };
    let query = |args: &[&str]| -> Vec<String> {
        let mut command = Command::new(bin_path("qlog"));
        command.arg("--socket").arg(sink.query_socket()).args(["query", "-o", "json"]);
        let out = run_with_input(command.args(args), sink.dir(), b"");
        assert!(out.status.success(), "qlog query {args:?}: {}", out.stderr);
        test_ids(&out.stdout)
    };
    let at = utc_timestamp(between);
    assert_eq!(query(&["-S", &at]), fixture_ids(&b), "-S {at} shows exactly batch B");
    assert_eq!(query(&["-U", &at]), fixture_ids(&a), "-U {at} shows exactly batch A");
    assert_eq!(query(&["-S", &at, "-U", &at]), Vec::<String>::new());
    let utc = format!("{at} UTC");
    assert_eq!(query(&["--since", &utc]), fixture_ids(&b), "a trailing UTC means the same");
    // Everything was received in the last hour, and nothing before it.
    assert_eq!(query(&["--since=-1h"]).len(), 100);
    assert_eq!(query(&["--until=-1h"]), Vec::<String>::new());
    assert_eq!(query(&["--since=-1h 30min", "--until=+1d"]).len(), 100);
    assert_eq!(query(&["-S", "1h ago"]).len(), 100);
}

/// journalctl takes `-S -1h` and `--since -1h`, and so do the README and qlog's own error
/// message ("try ... \"-1h\" or \"-30min\"").
///
/// `-S -1h` as two arguments, as journalctl takes it.
#[test]
fn relative_times_are_accepted_as_separate_arguments_as_journalctl_accepts_them() {
    let sink = RunningSink::start(SinkOptions::default());
    let mut workload = Workload::new(SEED, "sd-app");
    let events: Vec<Event> = (0..10).map(|_| workload.next_event()).collect();
    ingest_events(&sink, "sd-app", "journal", &events).expect("qlogd stores the events");
    for args in [
        ["--since=-1h", "--until=+1h"],
        ["-S-1h", "-U+1h"],
        ["-S", "-1h"],
        ["--since", "-30min"],
        ["-U", "-1h"],
    ] {
        let mut command = Command::new(bin_path("qlog"));
        command.arg("--socket").arg(sink.query_socket()).args(["query", "-o", "json"]);
        let out = run_with_input(command.args(args), sink.dir(), b"");
        assert!(out.status.success(), "qlog query {args:?} is refused: {}", out.stderr);
        let expected = if args[0] == "-U" { 0 } else { 10 };
        assert_eq!(count_json_lines(&out.stdout), expected, "qlog query {args:?}");
    }
}

fn count_json_lines(json_lines: &[u8]) -> usize {
    json_lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count()
}

#[test]
fn bad_time_syntax_is_an_error_whose_examples_work() {
    let fixture = Fixture::new(Vec::new());
    let mut suggestions = Vec::new();
    for (flag, bad) in [("-S", "soon"), ("-U", "2026-13-40"), ("--since", "2 fortnights ago")] {
        let out = fixture.qlog_run(&["query", flag, bad]);
        assert!(!out.status.success(), "{flag} {bad} is refused");
        assert!(out.stdout.is_empty());
        let message = out.stderr.trim_end();
        assert!(message.starts_with(&format!("qlog: invalid time {bad:?}")), "{message}");
        // Every example the message offers must itself be accepted.
        let examples: Vec<&str> = message
            .split_once("; try ")
            .unwrap_or_else(|| panic!("no example in {message:?}"))
            .1
            .split('"')
            .skip(1)
            .step_by(2)
            .collect();
        assert!(examples.contains(&"2026-12-03 10:00"), "{message}");
        suggestions.extend(examples.into_iter().map(|e| (flag, e.to_owned())));
    }
    let out = fixture.qlog_run(&["query", "-p", "loud"]);
    assert!(out.stderr.contains("unknown priority \"loud\": use emerg, alert,"), "{}", out.stderr);
    let out = fixture.qlog_run(&["query", "-g", "("]);
    assert!(out.stderr.contains("invalid grep pattern"), "{}", out.stderr);

    // Typed as an operator would type them, as the flag and then the example.
    for (flag, example) in suggestions {
        let ok = fixture.qlog_run(&["query", "-n", "1", flag, &example]);
        assert!(ok.status.success(), "the suggested {flag} {example:?} fails: {}", ok.stderr);
    }
}

/// Keeps the export helper honest: the journal file holds the events as they were
/// written, fields and all.
#[test]
fn the_journal_file_holds_the_generated_events() {
    let fixture = Fixture::new(Vec::new());
    let mut command = Command::new("journalctl");
    command.arg("--file").arg(&fixture.journal).args(["-q", "-o", "export", "-n", "1"]);
    let out = run_with_input(&mut command, fixture.sink.dir(), b"");
    assert!(out.status.success(), "{}", out.stderr);
    let last = qlog_tests::parse_export(&out.stdout).expect("journalctl writes export");
    let id = fixture.order.last().expect("events were generated");
    assert_eq!(last[0].get("MESSAGE"), fixture.events[id].get("MESSAGE"));
    assert_eq!(last[0].get_str("TEST_ID"), Some(id.as_str()));
    assert_eq!(last[0].get("_HOSTNAME"), fixture.events[id].get("_HOSTNAME"));
}
