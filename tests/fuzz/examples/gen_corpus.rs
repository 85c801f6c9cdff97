//! Writes the seed corpora in `corpus/<target>/`: a handful of realistic inputs per fuzz
//! target, built with the real encoders so that they stay valid as the protocol grows.
//! Run from tests/fuzz: `cargo +nightly run --example gen-corpus` (it replaces every `seed-*` file).

use std::fs;
use std::path::Path;

use qlog_rpc::event::encode_event_payload;
use qlog_rpc::frame::encode;
use qlog_rpc::message::{encode_json, encode_u64};
use qlog_rpc::query::{
    Done, EventsQuery, Filter, Grep, Lagged, Record, RecordKind, Request, StreamInfo, VmInfo,
    VmsReply,
};
use qlog_rpc::{
    ErrorCode, ErrorFrame, Event, FrameType, Gap, Heartbeat, Hello, Limits, ResumePoint, Welcome,
};

/// Knob bytes that pick the default limits and reads of up to `max_read` bytes.
fn knobs(len: usize, max_read: u8) -> Vec<u8> {
    let mut k = vec![0u8; len];
    k[1] = 0x5a;
    k[2] = 0xa5;
    k[3] = 0x17;
    if len > 4 {
        k[4] = max_read;
    }
    k
}

/// Knob bytes that pick small limits (frame 300, control 200, 6 fields, values of 40,
/// names of 12) and one-byte reads.
fn small_knobs(len: usize) -> Vec<u8> {
    let mut k = vec![1, 44, 1, 200, 0, 6, 40, 0, 12, 1, 0, 0, 1];
    k.resize(len, 0);
    k
}

fn event(fields: &[(&str, &[u8])]) -> Event {
    let mut e = Event::new();
    for (name, value) in fields {
        e.push(*name, value.to_vec());
    }
    e
}

fn sample_event(n: u64) -> Event {
    event(&[
        ("__CURSOR", format!("s=3f2a;i={n:x};b=9d1c;m=1a2b;t=5f0e;x=77").as_bytes()),
        ("__REALTIME_TIMESTAMP", b"1700000000123456"),
        ("_BOOT_ID", b"9d1c0f6e2b7a4c5d8e9f0a1b2c3d4e5f"),
        ("PRIORITY", b"6"),
        ("SYSLOG_IDENTIFIER", b"sshd"),
        ("_SYSTEMD_UNIT", b"ssh.service"),
        ("MESSAGE", format!("Accepted publickey for user from 10.137.0.{n} port 51234").as_bytes()),
    ])
}

fn record(kind: RecordKind, ev: Event) -> Record {
    Record {
        vm: "sd-app".into(),
        stream: "journal".into(),
        received_usec: 1_700_000_000_500_000,
        seq: 42,
        kind,
        event: ev,
    }
}

fn events_query() -> EventsQuery {
    EventsQuery {
        vms: vec!["sd-app".into(), "work".into()],
        filter: Filter {
            priority: Some((0, 4)),
            units: vec!["ssh".into(), "systemd-*".into()],
            identifiers: vec!["sshd".into(), "kernel".into()],
            grep: Some(Grep { pattern: r"(?:fail|error)\w*".into(), case_insensitive: true }),
            since_usec: Some(1_700_000_000_000_000),
            until_usec: Some(1_800_000_000_000_000),
            matches: vec![("_TRANSPORT".into(), "journal".into()), ("_UID".into(), "0".into())],
        },
        limit: Some(100),
        reverse: true,
        follow: false,
    }
}

fn export_entry(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(format!("__CURSOR=s=3f2a;i={n:x};b=9d1c;m=1a;t=5f;x=77\n").as_bytes());
    out.extend_from_slice(b"__REALTIME_TIMESTAMP=1700000000123456\n");
    out.extend_from_slice(b"__MONOTONIC_TIMESTAMP=123456789\n_BOOT_ID=9d1c0f6e2b7a4c5d\n");
    out.extend_from_slice(b"PRIORITY=6\n_TRANSPORT=journal\nSYSLOG_IDENTIFIER=NetworkManager\n");
    out.extend_from_slice(format!("MESSAGE=<info> device (eth0): state change {n}\n").as_bytes());
    out.extend_from_slice(b"_HOSTNAME=sd-app\n\n");
}

fn binary_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut seeds: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();

    // The descriptor: good calls, with caller data after the NUL, and refusals.
    seeds.push((
        "descriptor",
        vec![
            b"qlog.Ingest+ sd-app\0".to_vec(),
            b"qlog.Ingest+journal work\0\x00\x00\x00\x02\x01{}".to_vec(),
            b"qlog.Ingest+ sys-net\0".to_vec(),
            b"qlog.Ingest+x disp1234-dm\0".to_vec(),
            b"qubes.Filecopy+ sd-app\0".to_vec(),
            b"qlog.Ingest+ dom0 keyword dom0\0".to_vec(),
            "qlog.Ingest+arg+more v\u{e9}m\0".as_bytes().to_vec(),
        ],
    ));

    // Frames: a whole ingest conversation each way, and the query plane.
    // From JSON, so that fields added later with a default do not break the generator.
    let hello: Hello = serde_json::from_value(serde_json::json!({
        "versions": [1, 2],
        "agent": "qlog-agent/0.1.0",
        "stream": "journal",
        "limits": Limits::DEFAULT,
        "heartbeat_interval_secs": 30,
    }))
    .unwrap();
    let mut ingest = knobs(13, 7);
    ingest.extend(encode_json(FrameType::Hello, &hello));
    for n in 1..=3 {
        let mut payload = Vec::new();
        encode_event_payload(n, &sample_event(n), &mut payload);
        encode(FrameType::Event, &payload, &mut ingest);
    }
    let gap = Gap { seq: 4, reason: "cursor-lost".into(), missed: Some(12), detail: "x".into() };
    ingest.extend(encode_json(FrameType::Gap, &gap));
    ingest.extend(encode_json(
        FrameType::Heartbeat,
        &Heartbeat { sent_usec: 1, interval_secs: Some(30) },
    ));
    ingest.extend(encode_u64(FrameType::End, 4));
    let welcome = Welcome {
        version: 1,
        sink: "qlogd/0.1.0".into(),
        vm: "sd-app".into(),
        stream: "journal".into(),
        limits: Limits::DEFAULT,
        resume: ResumePoint { last_seq: 41, cursor: Some("s=3f2a;i=29".into()) },
    };
    let mut reply = knobs(13, 64);
    reply.extend(encode_json(FrameType::Welcome, &welcome));
    reply.extend(encode_u64(FrameType::Ack, 3));
    reply.extend(ErrorFrame::new(ErrorCode::SequenceNotIncreasing, "seq 3 after 4").encode());
    let mut query = knobs(13, 200);
    query.extend(encode_json(FrameType::Query, &Request::Events(events_query())));
    let mut rec = Vec::new();
    record(RecordKind::Event, sample_event(9)).encode(&mut rec);
    encode(FrameType::Record, &rec, &mut query);
    query.extend(encode_json(FrameType::Lagged, &Lagged { missed: 7 }));
    query.extend(encode_json(FrameType::Done, &Done { matched: 1 }));
    let vms = VmsReply {
        vms: vec![VmInfo {
            vm: "sd-app".into(),
            events_stored: 10,
            streams: vec![StreamInfo { name: "journal".into(), last_seq: 10, connected: true }],
            ..VmInfo::default()
        }],
    };
    let mut table = knobs(13, 3);
    table.extend(encode_json(FrameType::Query, &Request::Vms));
    table.extend(encode_json(FrameType::Reply, &vms));
    let mut small = small_knobs(13);
    small.extend(encode_json(FrameType::Hello, &hello));
    small.extend(encode_u64(FrameType::Ack, 1));
    seeds.push(("frame", vec![ingest, reply, query, table, small]));

    // Field blocks: first knob byte even is an ingest event, odd a stored record.
    let mut ev = Vec::new();
    let mut with_binary = sample_event(5);
    with_binary.push("COREDUMP", vec![0, 0xff, 0xfe, b'\n', 0]);
    with_binary.push("_QLOG_VM", "spoofed");
    let mut e1 = knobs(10, 0);
    encode_event_payload(5, &with_binary, &mut e1);
    ev.push(e1);
    let mut e2 = knobs(10, 0);
    encode_event_payload(u64::MAX, &event(&[("MESSAGE", b"")]), &mut e2);
    ev.push(e2);
    let mut r1 = knobs(10, 0);
    r1[0] = 1;
    record(RecordKind::Event, sample_event(6)).encode(&mut r1);
    record(RecordKind::Gap, event(&[("_QLOG_GAP", b"cursor-lost"), ("_QLOG_GAP_COUNT", b"3")]))
        .encode(&mut r1);
    ev.push(r1);
    let mut r2 = small_knobs(10);
    r2[0] = 1;
    record(RecordKind::Notice, event(&[("MESSAGE", b"quota reached for sd-app")])).encode(&mut r2);
    ev.push(r2);
    seeds.push(("event", ev));

    // journalctl -o export output: text entries, a binary field, a cut stream.
    let mut ex = Vec::new();
    let mut plain = knobs(13, 17);
    for n in 0..3 {
        export_entry(&mut plain, n);
    }
    ex.push(plain);
    let mut bin = knobs(13, 5);
    bin.extend_from_slice(b"PRIORITY=3\n");
    binary_field(&mut bin, "MESSAGE", b"line one\nline two\0\xff");
    binary_field(&mut bin, "COREDUMP_CMDLINE", b"");
    bin.extend_from_slice(b"lower_case=name\n1DIGIT=x\n\n");
    ex.push(bin);
    let mut cut = small_knobs(13);
    export_entry(&mut cut, 7);
    cut.extend_from_slice(b"MESSAGE=");
    cut.extend(std::iter::repeat_n(b'A', 300));
    cut.extend_from_slice(b"\nBIN\n\x10\x00\x00\x00\x00\x00\x00\x00short");
    ex.push(cut);
    seeds.push(("export", ex));

    // Query requests as the CLI sends them, and one from a newer CLI.
    seeds.push((
        "query",
        vec![
            serde_json::to_vec(&Request::Events(events_query())).unwrap(),
            serde_json::to_vec(&Request::Vms).unwrap(),
            serde_json::to_vec(&Request::Events(EventsQuery { follow: true, ..Default::default() }))
                .unwrap(),
            br#"{"kind":"events","vms":[],"filter":{"units":["*"],"grep":{"pattern":"a{2,}|[[:alpha:]]+\\b","case_insensitive":false},"matches":[["_QLOG_VM","work"],["MESSAGE","x"]]},"new_option":1}"#.to_vec(),
        ],
    ));

    // Log lines with things to redact; the first byte picks the profile and the VM.
    seeds.push((
        "redact",
        vec![
            b"\x00Failed password for alice from 10.137.0.12 port 22 ssh2".to_vec(),
            b"\x01GET https://bob:hunter2@files.internal.corp:8443/home/bob/x?q=1 from fe80::1%eth0".to_vec(),
            b"\x02mail to carol@example.org via mx.qubes-os.org; mac 52:54:00:12:34:56; work vm".to_vec(),
            b"\x03/home/dave/.ssh/id_ed25519 token=ghp_0123456789abcdefghijABCDEFGHIJ012345 \
               uuid 123e4567-e89b-12d3-a456-426614174000 CASE-123456"
                .to_vec(),
            b"\x04onion duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion sd-app\nsecond line 192.168.1.1"
                .to_vec(),
        ],
    ));

    for (target, inputs) in seeds {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for old in fs::read_dir(&dir)? {
            let old = old?.path();
            if old.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-")) {
                fs::remove_file(old)?;
            }
        }
        for (i, input) in inputs.iter().enumerate() {
            fs::write(dir.join(format!("seed-{i}")), input)?;
        }
        println!("{target}: {} seeds", inputs.len());
    }
    Ok(())
}
