//! Fuzzes the redaction engine on what a hostile VM controls: the values of its records.
//! Redaction must not panic, and what it leaves must pass the leak re-scan that every
//! export runs before it writes a bundle, both value by value and as the JSON line
//! `qlog export` writes; otherwise a VM could make every export of its logs fail.
//!
//! Input: 1 knob byte (profile, VM), then the value.

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use qlog::bundle::pseudonym::PseudonymKey;
use qlog::bundle::redact::Redactor;
use qlog::bundle::rules::Profile;
use qlog::output::{Format, Printer};
use qlog_rpc::query::{Record, RecordKind};
use qlog_rpc::{Event, Field};

/// The documented example rules file: keywords, user regexes, allowlists.
const RULES: &str = include_str!("../../../docs/redaction-rules.example.toml");
const VMS: [&str; 5] = ["sd-app", "work", "dom0", "vault", "sys-net"];
/// Redactors remember every token they made; start afresh now and then so that a long
/// run's memory stays flat. Redaction itself does not depend on that history.
const REBUILD_EVERY: u32 = 4096;

thread_local! {
    static REDACTORS: RefCell<Option<(u32, [Redactor; 2])>> = const { RefCell::new(None) };
}

/// A fixed key, so that a crash reproduces with the same tokens. It goes through a key
/// file because that is the only way to give the engine a chosen key.
fn key() -> PseudonymKey {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join(format!("qlog-fuzz-key.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("cannot write the fuzz key file in the temporary directory");
    file.write_all(&[7; 32]).unwrap();
    let key = PseudonymKey::from_file(&path).expect("the fuzz key file reads back");
    let _ = std::fs::remove_file(&path);
    key
}

fn redactors() -> [Redactor; 2] {
    let key = key();
    let file = Profile::parse(RULES).expect("the example rules file parses");
    [Redactor::new(Profile::default(), &key, VMS), Redactor::new(file, &key, VMS)]
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, value)) = data.split_first() else { return };
    REDACTORS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (uses, all) = cell.get_or_insert_with(|| (0, redactors()));
        *uses += 1;
        if *uses > REBUILD_EVERY {
            *all = redactors();
            *uses = 1;
        }
        check(&mut all[usize::from(knob & 1)], knob, value);
    });
});

fn check(r: &mut Redactor, knob: u8, value: &[u8]) {
    let vm = VMS[usize::from(knob >> 1) % VMS.len()];
    let mut event = Event::new();
    event.push("MESSAGE", value);
    event.push("SYSLOG_IDENTIFIER", &value[..value.len().min(16)]);
    event.push("_HOSTNAME", value);
    let record = Record {
        vm: vm.into(),
        stream: "journal".into(),
        received_usec: 1_700_000_000_000_000,
        seq: 1,
        kind: RecordKind::Event,
        event,
    };
    let mut redacted = r.redact_record(record);
    assert!(redacted.event.get("_HOSTNAME").is_none(), "a field off the allowlist left");

    // Value by value, as `qlog bundle verify` scans the export format. Binary values
    // were replaced whole by a placeholder the scan knows.
    let mut scratch = Vec::new();
    let message = redacted.event.get("MESSAGE").expect("MESSAGE is allowlisted");
    for line in message.split(|&b| b == b'\n') {
        if let Some(rule) = r.leak(line, false, &[], &mut scratch) {
            let line = String::from_utf8_lossy(line);
            panic!("{} still finds something in {line:?}", r.rule_name(rule));
        }
    }

    // As `qlog export` writes it: one JSON line per record, every value a string.
    for Field { name, value } in &redacted.event.fields {
        assert!(std::str::from_utf8(value).is_ok(), "{name} left as invalid UTF-8");
    }
    let mut line = Vec::new();
    Printer { format: Format::Json, color: false }.print_record(&redacted, &mut line).unwrap();
    if let Some(rule) = r.leak(&line, true, &[], &mut scratch) {
        let line = String::from_utf8_lossy(&line);
        panic!("{} still finds something in {line:?}", r.rule_name(rule));
    }
}
