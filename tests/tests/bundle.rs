//! Support bundles end to end: events go into a real qlogd through its ingest socket,
//! `qlog export` writes a bundle from it, and the test unpacks the bundle and searches
//! every decompressed byte.
//!
//! The corpus is one sensitive value of every class the redaction knows (addresses,
//! names, IDs, secrets, VM names), each written into every kind of field and context an
//! event can carry them in: alone, glued to punctuation, in the middle of a multi-line
//! message, inside invalid UTF-8 and binary values, inside URLs and paths, and in fields
//! that must not be exported at all. A `--no-redact` export of the same store proves the
//! values really reach a bundle, so their absence from the redacted one means something.
//!
//! Needs the binaries built: `cargo build -p qlog -p qlog-sink` (or `cargo test
//! --workspace`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use qlog_rpc::Event;
use qlog_tests::process::{kill_and_reap, signal, wait_timeout};
use qlog_tests::workload::Workload;
use qlog_tests::{bin_path, ingest_events, RunningSink, SinkOptions};
use tempfile::TempDir;

/// How long one qlog run may take: debug builds on two shared cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// VMs whose names are secret, and one whose name the default profile keeps.
const NEWSROOM: &str = "sd-newsroom";
const VAULT: &str = "vault-journo";
const ALLOWED_VM: &str = "sys-usb";
const VMS: [&str; 3] = [NEWSROOM, VAULT, ALLOWED_VM];

/// Sensitive values, each with the parts of it that must not survive either.
const CORPUS: &[(&str, &[&str])] = &[
    ("10.0.0.1", &[]),
    ("192.168.13.37", &[]),
    ("fe80::1a2b:3c4d:5e6f:7a8b", &[]),
    ("2001:db8:85a3::8a2e:370:7334", &[]),
    ("00:16:3e:5e:6c:0a", &[]),
    ("AA-BB-CC-DD-EE-F1", &[]),
    ("alice@example.com", &["alice@"]),
    ("news.desk@securedrop-news.org", &["news.desk", "securedrop-news"]),
    ("mail.internal.newsroom.net", &["newsroom.net"]),
    ("relay.sd-proxy.lan", &[]),
    (
        "https://uploads.dropbox-mirror.com/files/report-q3.pdf?token=abc123XYZ",
        &["dropbox-mirror", "report-q3", "abc123XYZ"],
    ),
    (
        "ftp://kimeditor:hunter2pass@10.20.30.40:2121/drop",
        &["kimeditor", "hunter2pass", "10.20.30.40"],
    ),
    ("vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd.onion", &["vww6ybal4bd7"]),
    ("expyuzz4wqqyqhjn.onion", &["expyuzz4wqqyqhjn"]),
    ("/home/jdoe-reporter/Documents", &["jdoe-reporter"]),
    ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", &["3f2504e0"]),
    ("4f8b2c9e1d3a4b5c8e7f6a5b4c3d2e1f", &[]),
    ("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", &["9f86d081884c"]),
    ("dGhpcyBpcyBhIHNlY3JldCB0b2tlbg==", &["dGhpcyBpcyBh"]),
    ("Zm9v_YmFy-QmF6cXV4UXV1eDEyMw", &["QmF6cXV4UXV1"]),
    ("ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", &["A1b2C3d4E5f6"]),
    ("C0FFEE1234567890ABCDEF0123456789DEADBEEF", &[]),
    ("9A3F 1B2C 7D4E 5F60 8A9B  C0D1 E2F3 0415 2637 4859", &["9A3F1B2C"]),
    ("0x1234ABCD5678EF90", &["1234ABCD5678EF90"]),
    (NEWSROOM, &[]),
    (VAULT, &[]),
];

/// Every context a value is written in, as MESSAGE.
fn contexts(v: &str) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        format!("plain {v} here"),
        v.to_owned(),
        format!("{v},"),
        format!("({v})"),
        format!("[{v}]"),
        format!("<{v}>"),
        format!("'{v}'"),
        format!("\"{v}\""),
        format!("ends with {v}."),
        format!("key={v};next"),
        format!("line one\n{v}\nline three"),
        format!("tab\t{v}\tend"),
        format!("https://files.example.org/download?ref={v}&x=1"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    // URLs and paths do not hold spaces.
    if !v.contains(' ') {
        out.push(format!("https://{v}/path").into_bytes());
        out.push(format!("/var/lib/{v}/state").into_bytes());
        out.push(format!("/home/{v}/notes.txt").into_bytes());
        out.push(format!("QubesIncoming/{v}/x.pdf").into_bytes());
    }
    // Invalid UTF-8 around it, and a binary value holding it.
    out.push([b"\xff\xfe ".as_slice(), v.as_bytes(), b" \xc3"].concat());
    out.push([b"bin\0\x01\x02".as_slice(), v.as_bytes(), b"\0\xff\xfe\xfd"].concat());
    out
}

/// The fields a value is also written in: exported ones and ones that are dropped.
const OTHER_FIELDS: &[&str] = &[
    "SYSLOG_IDENTIFIER",
    "_SYSTEMD_UNIT",
    "_COMM",
    "CODE_FUNC",
    "CODE_FILE",
    "UNIT",
    "_HOSTNAME",
    "_CMDLINE",
    "_BOOT_ID",
    "X_CUSTOM_NOTE",
];

fn event(fields: &[(&str, &[u8])]) -> Event {
    let mut e = Event::new();
    for (name, value) in fields {
        e.push(*name, value.to_vec());
    }
    e
}

/// The corpus as events, spread over [`VMS`].
fn corpus_events() -> BTreeMap<&'static str, Vec<Event>> {
    let mut by_vm: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
    let mut n = 0usize;
    for (value, _) in CORPUS {
        for message in contexts(value) {
            // Every other one is an error, so the report's error table gets them too.
            let priority: &[u8] = [b"3".as_slice(), b"6"][n % 2];
            by_vm.entry(VMS[n % VMS.len()]).or_default().push(event(&[
                ("MESSAGE", &message),
                ("PRIORITY", priority),
                ("SYSLOG_IDENTIFIER", b"corpus"),
            ]));
            n += 1;
        }
        let mut e = event(&[("MESSAGE", b"value in every field"), ("PRIORITY", b"6")]);
        for field in OTHER_FIELDS {
            e.push(*field, value.as_bytes().to_vec());
        }
        by_vm.entry(VMS[n % VMS.len()]).or_default().push(e);
        n += 1;
    }
    // The same address and VM name from two VMs, for the consistency checks.
    for vm in [VAULT, ALLOWED_VM] {
        by_vm.entry(vm).or_default().push(event(&[
            ("MESSAGE", format!("failed to reach 10.0.0.1 for qube {NEWSROOM}").as_bytes()),
            ("PRIORITY", b"3"),
        ]));
    }
    by_vm.entry(NEWSROOM).or_default().push(event(&[
        ("MESSAGE", b"docs at https://www.qubes-os.org/doc/ and the usb qube sys-usb"),
        ("PRIORITY", b"6"),
    ]));
    by_vm
}

/// Every string that must not appear in a redacted bundle, in lower case.
fn needles() -> Vec<String> {
    let mut all = Vec::new();
    for (value, parts) in CORPUS {
        all.push(value.to_lowercase());
        all.extend(parts.iter().map(|p| p.to_lowercase()));
    }
    all
}

fn sink_with(events: &BTreeMap<&str, Vec<Event>>) -> RunningSink {
    let sink = RunningSink::start(SinkOptions::default());
    for (vm, events) in events {
        ingest_events(&sink, vm, "journal", events).expect("the sink stores the events");
    }
    sink
}

/// What one qlog run printed and how it ended.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_ok(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// A qlog command against `sink`, with the environment the test controls.
fn qlog_command(sink: &RunningSink) -> Command {
    let mut cmd = Command::new(bin_path("qlog"));
    cmd.arg("--socket").arg(sink.query_socket()).env_remove("SOURCE_DATE_EPOCH");
    cmd
}

fn run(mut cmd: Command, dir: &Path) -> Run {
    let out = dir.join(".run-stdout");
    let err = dir.join(".run-stderr");
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().expect("qlog starts");
    let status = match wait_timeout(&mut child, RUN_TIMEOUT).unwrap() {
        Some(status) => status,
        None => {
            kill_and_reap(&mut child);
            panic!(
                "qlog did not finish within {RUN_TIMEOUT:?}: {}",
                std::fs::read_to_string(&err).unwrap()
            );
        }
    };
    let run = Run {
        status,
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    };
    std::fs::remove_file(out).unwrap();
    std::fs::remove_file(err).unwrap();
    run
}

fn export(sink: &RunningSink, dir: &Path, args: &[&OsStr]) -> Run {
    let mut cmd = qlog_command(sink);
    cmd.arg("export").args(args);
    run(cmd, dir)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// The decompressed tar stream and its entries, in order.
fn unpack(compressed: &[u8]) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let tar_bytes = zstd::decode_all(compressed).expect("the bundle is zstd");
    let mut entries = Vec::new();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        entries.push((path, content));
    }
    (tar_bytes, entries)
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn entry<'a>(entries: &'a [(String, Vec<u8>)], path: &str) -> &'a [u8] {
    &entries.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("no {path} in the bundle")).1
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("qlog-bundle.").tempdir_in("/tmp").unwrap()
}

fn write_key(dir: &Path, byte: u8) -> PathBuf {
    let path = dir.join(format!("key-{byte}"));
    std::fs::write(&path, [byte; 32]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

#[test]
fn no_sensitive_value_survives_anywhere_and_tokens_stay_consistent() {
    let sink = sink_with(&corpus_events());
    let dir = tempdir();
    let bundle = dir.path().join("support.tar.zst");
    let map = dir.path().join("map.json");
    export(
        &sink,
        dir.path(),
        &[os("-o"), bundle.as_os_str(), os("--with-export"), os("--map-out"), map.as_os_str()],
    )
    .assert_ok("export");

    // A map is never overwritten, and an export that refuses leaves no bundle either.
    let again = dir.path().join("again.tar.zst");
    let refused =
        export(&sink, dir.path(), &[os("-o"), again.as_os_str(), os("--map-out"), map.as_os_str()]);
    assert!(
        !refused.status.success() && refused.stderr.contains("already exists"),
        "{}",
        refused.stderr
    );
    assert!(!again.exists());

    // Not one value, in any spelling case, anywhere in the decompressed archive.
    let (tar_bytes, entries) = unpack(&std::fs::read(&bundle).unwrap());
    let lower = tar_bytes.to_ascii_lowercase();
    for needle in needles() {
        assert!(!find(&lower, needle.as_bytes()), "{needle:?} survived in the bundle");
    }
    // What support needs stays readable.
    for kept in ["sys-usb", "https://www.qubes-os.org/", "failed to reach ip-"] {
        assert!(find(&tar_bytes, kept.as_bytes()), "{kept:?} should be in the bundle");
    }

    // The map is the operator's: private, complete, and the only way back.
    let mode = std::fs::metadata(&map).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let map = json(&std::fs::read(&map).unwrap());
    let tokens = map["tokens"].as_object().unwrap();
    let token_of = |value: &str| -> String {
        let found: Vec<&String> =
            tokens.iter().filter(|(_, e)| e["value"] == value).map(|(t, _)| t).collect();
        assert_eq!(found.len(), 1, "one token for {value}: {found:?}");
        found[0].clone()
    };
    let mut seen_values = BTreeSet::new();
    for (token, entry) in tokens {
        let prefix = token.rsplit_once('-').unwrap().0;
        assert!(
            seen_values.insert((prefix.to_owned(), entry["value"].as_str().unwrap().to_owned())),
            "two tokens for one value: {token}"
        );
    }

    // One VM, one token: in its file names, in vms.json, in the report, and in another
    // VM's message about it.
    let vm_token = token_of(NEWSROOM);
    assert!(vm_token.starts_with("vm-"), "{vm_token}");
    let jsonl_path = format!("events/{vm_token}.jsonl");
    entry(&entries, &jsonl_path);
    entry(&entries, &format!("events/{vm_token}.export"));
    assert!(find(entry(&entries, "vms.json"), vm_token.as_bytes()));
    assert!(find(entry(&entries, "report.html"), vm_token.as_bytes()));
    let vault_token = token_of(VAULT);
    let vault_lines = entry(&entries, &format!("events/{vault_token}.jsonl"));
    let mention = format!("for qube {vm_token}");
    assert!(find(vault_lines, mention.as_bytes()), "{mention} in {vault_token}'s events");

    // One address, one token, in two VMs' events and in the report's error table.
    let ip = token_of("10.0.0.1");
    let reach = format!("failed to reach {ip} for qube {vm_token}");
    for file in [
        format!("events/{vault_token}.jsonl"),
        "events/sys-usb.jsonl".to_owned(),
        "report.html".to_owned(),
    ] {
        assert!(find(entry(&entries, &file), reach.as_bytes()), "{reach:?} in {file}");
    }
    // IPv6 written as a URL host gets the same token as written alone.
    let ipv6 = token_of("fe80::1a2b:3c4d:5e6f:7a8b");
    assert!(find(&tar_bytes, format!("https://{ipv6}/url-").as_bytes()));

    // Only allowlisted fields left.
    for line in entry(&entries, &jsonl_path).split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let record = json(line);
        for field in ["_HOSTNAME", "_CMDLINE", "_BOOT_ID", "X_CUSTOM_NOTE"] {
            assert!(record.get(field).is_none(), "{field} was exported");
        }
        assert_eq!(record["_QLOG_VM"], vm_token.as_str());
    }

    // The manifest counts what is there and names no value.
    let manifest = json(entry(&entries, "manifest.json"));
    assert_eq!(entries[0].0, "manifest.json", "the manifest comes first");
    let total: usize = corpus_events().values().map(Vec::len).sum();
    assert_eq!(manifest["records"], total);
    let rules: BTreeSet<&str> = manifest["redaction"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    for rule in [
        "ipv4",
        "ipv6",
        "mac",
        "email",
        "hostname",
        "url",
        "onion",
        "home-user",
        "uuid",
        "id-128",
        "hex-secret",
        "base64-secret",
        "api-token",
        "pgp-fingerprint",
        "pgp-key-id",
        "vm-name",
        "binary-value",
    ] {
        assert!(rules.contains(rule), "rule {rule} did not fire: {rules:?}");
    }

    let mut cmd = qlog_command(&sink);
    cmd.args(["bundle", "verify"]).arg(&bundle);
    let verified = run(cmd, dir.path());
    verified.assert_ok("verify");
    assert!(verified.stdout.contains("OK"), "{}", verified.stdout);

    let mut cmd = qlog_command(&sink);
    cmd.args(["bundle", "inspect"]).arg(&bundle);
    let inspected = run(cmd, dir.path());
    inspected.assert_ok("inspect");
    assert!(
        inspected.stdout.contains(&vm_token) && inspected.stdout.contains("ipv4"),
        "{}",
        inspected.stdout
    );

    // The same store without redaction: every value is there, so the checks above
    // looked at bundles that would have held them.
    let raw = dir.path().join("raw.tar.zst");
    let unredacted = export(&sink, dir.path(), &[os("-o"), raw.as_os_str(), os("--no-redact")]);
    unredacted.assert_ok("export --no-redact");
    assert!(unredacted.stderr.contains("warning: --no-redact"), "{}", unredacted.stderr);
    let (raw_tar, raw_entries) = unpack(&std::fs::read(&raw).unwrap());
    let raw_lower = raw_tar.to_ascii_lowercase();
    for (value, _) in CORPUS {
        assert!(
            find(&raw_lower, value.to_lowercase().as_bytes()),
            "{value} never reached a bundle"
        );
    }
    assert_eq!(json(entry(&raw_entries, "manifest.json"))["redaction"]["enabled"], false);
}

#[test]
fn same_key_and_source_date_epoch_give_identical_bundles() {
    let mut events = corpus_events();
    let mut workload = Workload::new(5, NEWSROOM);
    events.get_mut(NEWSROOM).unwrap().extend((0..3000).map(|_| workload.next_event()));
    let sink = sink_with(&events);
    let dir = tempdir();
    let key = write_key(dir.path(), 7);
    let other_key = write_key(dir.path(), 8);
    let bundle = |name: &str, key: &Path| -> Vec<u8> {
        let path = dir.path().join(name);
        let mut cmd = qlog_command(&sink);
        cmd.arg("export").arg("-o").arg(&path).arg("--with-export").arg("--key-file").arg(key);
        cmd.env("SOURCE_DATE_EPOCH", "1796256000");
        run(cmd, dir.path()).assert_ok("export");
        std::fs::read(path).unwrap()
    };
    let first = bundle("a.tar.zst", &key);
    let second = bundle("b.tar.zst", &key);
    assert!(first == second, "two exports with the same key and time differ");
    let third = bundle("c.tar.zst", &other_key);
    assert!(first != third, "a different key gave the same tokens");

    let (_, entries) = unpack(&first);
    let manifest = json(entry(&entries, "manifest.json"));
    assert_eq!(manifest["created_at"], "2026-12-03T00:00:00Z");
    assert_eq!(manifest["redaction"]["key"], "file");
    let paths: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    let mut sorted = paths[1..].to_vec();
    sorted.sort_unstable();
    assert_eq!(paths[1..], sorted[..], "entries after the manifest are sorted");
}

/// Starts an export of a store big enough to take a while, and sends `sig` once its
/// temporary file exists.
fn interrupted_export_leaves_nothing(sink: &RunningSink, sig: libc::c_int) {
    let dir = tempdir();
    let bundle = dir.path().join("big.tar.zst");
    let map = dir.path().join("map.json");
    let mut cmd = qlog_command(sink);
    cmd.arg("export").arg("-o").arg(&bundle).arg("--map-out").arg(&map).arg("--with-export");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();

    // The export is in the middle of the events once it holds a scratch file: those are
    // anonymous files in the output directory, visible only among its descriptors.
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !has_scratch_file(child.id(), dir.path()) {
        assert!(Instant::now() < deadline, "the export never started spooling events");
        assert!(child.try_wait().unwrap().is_none(), "the export ended before it was interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(files_in(dir.path()).len(), 1, "only the hidden temporary bundle is visible");
    signal(&mut child, sig);
    let status =
        wait_timeout(&mut child, RUN_TIMEOUT).unwrap().expect("the export stops on the signal");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(128 + sig), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(files_in(dir.path()), BTreeSet::new(), "an interrupted export left files");
}

/// True if and only if process `pid` has a deleted or anonymous file open in `dir`.
fn has_scratch_file(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok()).any(|target| {
        let target = target.to_string_lossy().into_owned();
        target.starts_with(&*dir.to_string_lossy()) && target.ends_with("(deleted)")
    })
}

#[test]
fn an_interrupted_export_leaves_no_file() {
    // About 60 MB of raw events: many seconds of work for a debug qlog.
    let mut events: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
    for vm in VMS {
        let mut workload = Workload::new(11, vm);
        events.insert(vm, (0..25_000).map(|_| workload.next_event()).collect());
    }
    let sink = sink_with(&events);
    interrupted_export_leaves_nothing(&sink, libc::SIGINT);
    interrupted_export_leaves_nothing(&sink, libc::SIGTERM);
}

#[test]
fn a_failed_export_leaves_no_file() {
    let dir = tempdir();
    let bundle = dir.path().join("out.tar.zst");
    let mut cmd = Command::new(bin_path("qlog"));
    cmd.arg("--socket").arg(dir.path().join("no-such.sock")).arg("export").arg("-o").arg(&bundle);
    let failed = run(cmd, dir.path());
    assert!(!failed.status.success());
    assert!(failed.stderr.contains("is qlogd running?"), "{}", failed.stderr);
    assert_eq!(files_in(dir.path()), BTreeSet::new());
}

/// The bundle with one entry's bytes changed by `edit`, recompressed.
fn tampered(bundle: &[u8], path: &str, edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let (_, entries) = unpack(bundle);
    let mut builder = tar::Builder::new(Vec::new());
    for (p, mut content) in entries {
        if p == path {
            edit(&mut content);
        }
        let mut header = tar::Header::new_ustar();
        header.set_path(&p).unwrap();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, &content[..]).unwrap();
    }
    zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap()
}

#[test]
fn verify_names_the_file_that_was_changed() {
    let sink = sink_with(&corpus_events());
    let dir = tempdir();
    let bundle = dir.path().join("b.tar.zst");
    export(&sink, dir.path(), &[os("-o"), bundle.as_os_str()]).assert_ok("export");
    let original = std::fs::read(&bundle).unwrap();
    let (_, entries) = unpack(&original);
    let events_path =
        entries.iter().map(|(p, _)| p.clone()).find(|p| p.ends_with(".jsonl")).unwrap();

    let verify = |bytes: &[u8], name: &str| -> Run {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let mut cmd = qlog_command(&sink);
        cmd.args(["bundle", "verify"]).arg(&path);
        run(cmd, dir.path())
    };
    verify(&original, "same.tar.zst").assert_ok("verify of an untouched bundle");

    let changed = tampered(&original, &events_path, |c| {
        let at = c.windows(3).position(|w| w == b"\"6\"").expect("an info record");
        c[at + 1] = b'7';
    });
    let failed = verify(&changed, "changed.tar.zst");
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains(&format!("{events_path}: does not match the manifest")),
        "{}",
        failed.stderr
    );

    let leaky = tampered(&original, "report.html", |c| c.extend_from_slice(b"<p>10.0.0.1</p>\n"));
    let failed = verify(&leaky, "leaky.tar.zst");
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains("report.html: rule ipv4 matches after redaction"),
        "{}",
        failed.stderr
    );
    assert!(!failed.stderr.contains("10.0.0.1"), "verify printed the value: {}", failed.stderr);

    let dropped_line = tampered(&original, &events_path, |c| {
        let first_end = c.iter().position(|&b| b == b'\n').unwrap();
        c.drain(..=first_end);
    });
    let failed = verify(&dropped_line, "short.tar.zst");
    assert!(failed.stderr.contains(&format!("{events_path}: has ")), "{}", failed.stderr);
}

#[test]
fn dry_run_shows_counts_and_redacted_examples_and_writes_nothing() {
    let sink = sink_with(&corpus_events());
    let dir = tempdir();
    let bundle = dir.path().join("never.tar.zst");
    let dry = export(&sink, dir.path(), &[os("--dry-run"), os("-o"), bundle.as_os_str()]);
    dry.assert_ok("export --dry-run");
    assert_eq!(files_in(dir.path()), BTreeSet::new(), "a dry run wrote something");
    let out = &dry.stdout;
    let ipv4 = out
        .lines()
        .find(|l| l.starts_with("ipv4 "))
        .unwrap_or_else(|| panic!("no ipv4 line:\n{out}"));
    let replaced: u64 = ipv4.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(replaced > 10, "{ipv4}");
    assert!(out.contains("    ") && out.contains("ip-"), "no redacted examples:\n{out}");
    assert!(out.contains("leak check: passed"), "{out}");
    let lower = out.to_lowercase();
    for needle in needles() {
        assert!(!lower.contains(&needle), "the dry run showed {needle:?}");
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/bundle").join(name)
}

#[test]
fn rules_file_keywords_and_regexes_are_redacted_and_allowlisted_domains_kept() {
    let mut events = BTreeMap::new();
    events.insert(
        VAULT,
        vec![
            event(&[("MESSAGE", b"draft for Project BLUEBIRD saved"), ("PRIORITY", b"6")]),
            event(&[("MESSAGE", b"ticket CASE-123456 opened by the desk"), ("PRIORITY", b"3")]),
            event(&[
                ("MESSAGE", b"docs at docs.securedrop.org, mirror at mirror.freedom.press"),
                ("PRIORITY", b"6"),
            ]),
            event(&[("MESSAGE", b"bluebird"), ("PRIORITY", b"6"), ("_UID", b"1000")]),
        ],
    );
    let sink = sink_with(&events);
    let dir = tempdir();
    let bundle = dir.path().join("rules.tar.zst");
    let rules = fixture("newsroom-rules.toml");
    export(&sink, dir.path(), &[os("-o"), bundle.as_os_str(), os("--rules"), rules.as_os_str()])
        .assert_ok("export --rules");
    let (tar_bytes, entries) = unpack(&std::fs::read(&bundle).unwrap());
    let lower = tar_bytes.to_ascii_lowercase();
    for gone in ["bluebird", "case-123456", "123456", "freedom.press", VAULT] {
        assert!(!find(&lower, gone.as_bytes()), "{gone} survived");
    }
    assert!(find(&tar_bytes, b"docs.securedrop.org"), "the allowlisted domain was replaced");
    assert!(find(&tar_bytes, b"ticket case-"), "the regex rule's token prefix");
    assert!(find(&tar_bytes, b"\"_UID\":\"1000\""), "the field the rules file allows");

    let manifest = json(entry(&entries, "manifest.json"));
    assert_eq!(manifest["redaction"]["profile"], "newsroom");
    let rules: Vec<String> = manifest["redaction"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}={}", r["rule"].as_str().unwrap(), r["replaced"]))
        .collect();
    assert!(rules.contains(&"keyword=2".to_owned()), "{rules:?}");
    assert!(rules.contains(&"regex:case-number=1".to_owned()), "{rules:?}");
    let manifest_text = String::from_utf8_lossy(entry(&entries, "manifest.json")).to_lowercase();
    assert!(
        !manifest_text.contains("bluebird") && !manifest_text.contains("[0-9]"),
        "the manifest names a rule's value"
    );
}

#[test]
fn a_leak_found_after_redaction_aborts_the_export_and_names_rule_and_file() {
    let sink = sink_with(&corpus_events());
    let dir = tempdir();
    // A pattern that matches nothing a VM sent but something qlog writes after
    // redaction (a heading of the report): only the re-scan sees it, and it must stop
    // the export.
    let rules = dir.path().join("rules.toml");
    let text = "[[regex]]\nname = \"heading\"\npattern = \"Most frequent errors\"\n";
    std::fs::write(&rules, text).unwrap();
    let bundle = dir.path().join("b.tar.zst");
    let failed = export(
        &sink,
        dir.path(),
        &[os("-o"), bundle.as_os_str(), os("--rules"), rules.as_os_str()],
    );
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains("rule regex:heading still matches in report.html"),
        "{}",
        failed.stderr
    );
    assert_eq!(files_in(dir.path()), BTreeSet::from(["rules.toml".to_owned()]));
    for needle in needles() {
        assert!(!failed.stderr.to_lowercase().contains(&needle), "the message showed {needle}");
    }
}

#[test]
fn encrypted_bundles_round_trip_with_the_identity() {
    use age::secrecy::ExposeSecret;
    let sink = sink_with(&corpus_events());
    let dir = tempdir();
    let identity = age::x25519::Identity::generate();
    let identity_file = dir.path().join("support-team.key");
    std::fs::write(&identity_file, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    let recipient = identity.to_public().to_string();
    let bundle = dir.path().join("sealed.tar.zst.age");
    export(&sink, dir.path(), &[os("-o"), bundle.as_os_str(), os("--encrypt-to"), os(&recipient)])
        .assert_ok("export --encrypt-to");

    let sealed = std::fs::read(&bundle).unwrap();
    assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
    let decryptor = age::Decryptor::new_buffered(&sealed[..]).unwrap();
    let mut plain = Vec::new();
    decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let (tar_bytes, entries) = unpack(&plain);
    assert_eq!(entries[0].0, "manifest.json");
    let lower = tar_bytes.to_ascii_lowercase();
    for needle in needles() {
        assert!(!find(&lower, needle.as_bytes()), "{needle:?} survived in the encrypted bundle");
    }

    let command = |args: &[&OsStr]| {
        let mut cmd = qlog_command(&sink);
        cmd.arg("bundle").args(args);
        run(cmd, dir.path())
    };
    let ok =
        command(&[os("verify"), bundle.as_os_str(), os("--identity"), identity_file.as_os_str()]);
    ok.assert_ok("verify --identity");
    let inspected =
        command(&[os("inspect"), bundle.as_os_str(), os("--identity"), identity_file.as_os_str()]);
    inspected.assert_ok("inspect --identity");
    assert!(
        inspected.stdout.contains("age-encrypted") && inspected.stdout.contains("vm-"),
        "{}",
        inspected.stdout
    );
    let refused = command(&[os("verify"), bundle.as_os_str()]);
    assert!(
        !refused.status.success() && refused.stderr.contains("--identity"),
        "{}",
        refused.stderr
    );
    let wrong = dir.path().join("other.key");
    let other = age::x25519::Identity::generate();
    std::fs::write(&wrong, format!("{}\n", other.to_string().expose_secret())).unwrap();
    let refused = command(&[os("verify"), bundle.as_os_str(), os("--identity"), wrong.as_os_str()]);
    assert!(
        !refused.status.success() && refused.stderr.contains("cannot decrypt"),
        "{}",
        refused.stderr
    );
}
