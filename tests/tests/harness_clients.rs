//! The harness's own clients speak the protocol as `qlog_rpc` defines it.
//!
//! Each test plays qlogd with a scripted peer on a socket in a temp dir, so a failure in
//! a sink test later can be blamed on the sink and not on the harness. The peers are
//! written against `qlog_rpc` directly, never against the harness code they check.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use qlog_rpc::event::decode_event_payload;
use qlog_rpc::frame::encode_to_vec;
use qlog_rpc::message::{decode_json, decode_u64, encode_json, encode_u64};
use qlog_rpc::query::{Done, EventsQuery, Lagged, Record, RecordKind, Request, VmInfo, VmsReply};
use qlog_rpc::{
    ErrorCode, ErrorFrame, Event, Frame, FrameDecoder, FrameType, Hello, Limits, ResumePoint,
    Welcome,
};
use qlog_tests::query::FollowItem;
use qlog_tests::{
    bin_path, ingest_events_at, query_events, query_events_reply, query_vms, Follower, RawIngest,
    IO_TIMEOUT,
};
use tempfile::TempDir;

const SHORT: Duration = Duration::from_millis(200);

/// A listener in a fresh temp dir, and a thread running `script` on its one connection.
struct ScriptedPeer {
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl ScriptedPeer {
    fn start(script: impl FnOnce(PeerConnection) + Send + 'static) -> ScriptedPeer {
        let dir = tempfile::Builder::new().prefix("qlog-peer.").tempdir_in("/tmp").unwrap();
        let socket = dir.path().join("peer.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            script(PeerConnection { stream, decoder: FrameDecoder::new(Limits::DEFAULT) });
        });
        ScriptedPeer { socket, thread: Some(thread), _dir: dir }
    }

    /// Waits for the script to finish, passing on its panic.
    fn finish(mut self) {
        if let Err(panic) = self.thread.take().unwrap().join() {
            std::panic::resume_unwind(panic);
        }
    }
}

struct PeerConnection {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl PeerConnection {
    fn read_descriptor(&mut self) -> Vec<u8> {
        let mut descriptor = Vec::new();
        let mut byte = [0u8];
        while descriptor.last() != Some(&0) {
            self.stream.read_exact(&mut byte).unwrap();
            descriptor.push(byte[0]);
        }
        descriptor
    }

    /// The next frame, `None` at EOF.
    fn read_frame(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(frame);
            }
            let n = self.stream.read(&mut buf).unwrap();
            if n == 0 {
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn read_request(&mut self) -> Request {
        let frame = self.read_frame().expect("a query frame");
        assert_eq!(frame.ty, FrameType::Query);
        decode_json(frame.ty, &frame.payload).unwrap()
    }
}

fn record(seq: u64, message: &str) -> Record {
    let mut event = Event::new();
    event.push("MESSAGE", message);
    event.push("BINARY", vec![0u8, 0xff]);
    Record {
        vm: "sd-app".into(),
        stream: "journal".into(),
        received_usec: 1_700_000_000_000_000 + seq,
        seq,
        kind: RecordKind::Event,
        event,
    }
}

fn record_frame(record: &Record) -> Vec<u8> {
    let mut payload = Vec::new();
    record.encode(&mut payload);
    encode_to_vec(FrameType::Record, &payload)
}

#[test]
fn bin_path_finds_this_packages_double() {
    let found = bin_path("qrexec-client-vm");
    assert_eq!(found, PathBuf::from(env!("CARGO_BIN_EXE_qrexec-client-vm")));
}

#[test]
fn query_events_collects_records_until_done() {
    let sent = vec![record(1, "one"), record(2, "two")];
    let script_records = sent.clone();
    let peer = ScriptedPeer::start(move |mut conn| {
        let Request::Events(query) = conn.read_request() else { panic!("expected events") };
        assert_eq!(query.vms, ["sd-app"]);
        assert!(!query.follow);
        for record in &script_records {
            conn.send(&record_frame(record));
        }
        conn.send(&encode_json(FrameType::Done, &Done { matched: 7 }));
    });

    let query = EventsQuery { vms: vec!["sd-app".into()], ..EventsQuery::default() };
    let reply = query_events_reply(&peer.socket, &query).unwrap();
    assert_eq!(reply.records, sent);
    assert_eq!(reply.matched, 7);
    peer.finish();
}

#[test]
fn query_error_frame_is_returned_as_a_refusal() {
    let peer = ScriptedPeer::start(|mut conn| {
        conn.read_request();
        conn.send(&ErrorFrame::new(ErrorCode::BadQuery, "bad regex").encode());
    });
    let error = query_events(&peer.socket, &EventsQuery::default()).unwrap_err();
    let refusal = error.refusal().expect("an error frame becomes a refusal");
    assert_eq!(refusal.code, ErrorCode::BadQuery);
    peer.finish();
}

#[test]
fn query_cut_short_is_an_error_not_a_short_result() {
    let peer = ScriptedPeer::start(|mut conn| {
        conn.read_request();
        conn.send(&record_frame(&record(1, "one")));
    });
    let error = query_events(&peer.socket, &EventsQuery::default()).unwrap_err();
    assert!(matches!(error, qlog_tests::QueryError::Closed), "{error}");
    peer.finish();
}

#[test]
fn query_vms_reads_the_reply_frame() {
    let peer = ScriptedPeer::start(|mut conn| {
        assert_eq!(conn.read_request(), Request::Vms);
        let reply = VmsReply {
            vms: vec![VmInfo { vm: "sd-app".into(), events_stored: 3, ..VmInfo::default() }],
        };
        conn.send(&encode_json(FrameType::Reply, &reply));
    });
    let reply = query_vms(&peer.socket).unwrap();
    assert_eq!(reply.vms.len(), 1);
    assert_eq!((reply.vms[0].vm.as_str(), reply.vms[0].events_stored), ("sd-app", 3));
    peer.finish();
}

#[test]
fn follower_separates_stored_and_live_records_and_counts_lag() {
    let peer = ScriptedPeer::start(|mut conn| {
        let Request::Events(query) = conn.read_request() else { panic!("expected events") };
        assert!(query.follow, "the follower sets follow");
        conn.send(&record_frame(&record(1, "stored")));
        conn.send(&encode_json(FrameType::Done, &Done { matched: 1 }));
        conn.send(&encode_json(FrameType::Lagged, &Lagged { missed: 3 }));
        conn.send(&record_frame(&record(5, "live")));
        // The follower hangs up when dropped, which ends this read.
        assert!(conn.read_frame().is_none());
    });

    let mut follower = Follower::start(&peer.socket, EventsQuery::default()).unwrap();
    let stored = follower.wait_done(IO_TIMEOUT);
    assert_eq!(stored, [record(1, "stored")]);
    assert_eq!(follower.next_record(IO_TIMEOUT), record(5, "live"));
    assert_eq!(follower.lagged_missed(), 3);
    assert_eq!(follower.done(), Some(&Done { matched: 1 }));
    assert!(follower.try_next_record(SHORT).is_none(), "nothing more was sent");
    drop(follower);
    peer.finish();
}

#[test]
fn follower_reports_the_sink_ending_the_follow() {
    let peer = ScriptedPeer::start(|mut conn| {
        conn.read_request();
        conn.send(&encode_json(FrameType::Done, &Done { matched: 0 }));
        conn.send(&ErrorFrame::new(ErrorCode::ShuttingDown, "bye").encode());
    });
    let mut follower = Follower::start(&peer.socket, EventsQuery::default()).unwrap();
    assert!(follower.wait_done(IO_TIMEOUT).is_empty());
    match follower.recv(IO_TIMEOUT) {
        Some(FollowItem::Refused(frame)) => assert_eq!(frame.code, ErrorCode::ShuttingDown),
        other => panic!("expected the error frame, got {other:?}"),
    }
    peer.finish();
}

/// A sink that welcomes with `resume_at`, acks every event, and answers the end.
fn scripted_sink(resume_at: u64, expect_events: usize) -> ScriptedPeer {
    ScriptedPeer::start(move |mut conn| {
        assert_eq!(conn.read_descriptor(), b"qlog.Ingest+ sd-app\0");
        let frame = conn.read_frame().unwrap();
        let hello: Hello = decode_json(FrameType::Hello, &frame.payload).unwrap();
        let welcome = Welcome {
            version: 1,
            sink: "scripted".into(),
            vm: "sd-app".into(),
            stream: hello.stream,
            limits: Limits::DEFAULT,
            resume: ResumePoint { last_seq: resume_at, cursor: None },
        };
        conn.send(&encode_json(FrameType::Welcome, &welcome));
        for i in 0..expect_events {
            let frame = conn.read_frame().unwrap();
            assert_eq!(frame.ty, FrameType::Event);
            let (seq, event) = decode_event_payload(&frame.payload, &Limits::DEFAULT).unwrap();
            assert_eq!(seq, resume_at + 1 + i as u64);
            assert_eq!(event.get_str("MESSAGE"), Some(format!("event {i}").as_str()));
            conn.send(&encode_u64(FrameType::Ack, seq));
        }
        let frame = conn.read_frame().unwrap();
        assert_eq!(frame.ty, FrameType::End);
        let last = decode_u64(frame.ty, &frame.payload).unwrap();
        assert_eq!(last, resume_at + expect_events as u64);
        conn.send(&encode_u64(FrameType::End, last));
    })
}

fn numbered_events(count: usize) -> Vec<Event> {
    (0..count)
        .map(|i| {
            let mut event = Event::new();
            event.push("MESSAGE", format!("event {i}"));
            event
        })
        .collect()
}

#[test]
fn ingest_events_numbers_from_the_resume_point_and_waits_for_the_end() {
    // Enough events that unread acks would fill the socket if nobody read them.
    let peer = scripted_sink(41, 20_000);
    let last = ingest_events_at(&peer.socket, "sd-app", "journal", &numbered_events(20_000));
    assert_eq!(last.unwrap(), 20_041);
    peer.finish();
}

#[test]
fn ingest_events_reports_the_sinks_error_frame() {
    let peer = ScriptedPeer::start(|mut conn| {
        conn.read_descriptor();
        conn.read_frame().unwrap();
        conn.send(&ErrorFrame::new(ErrorCode::UnsupportedVersion, "too new").encode());
    });
    let error = ingest_events_at(&peer.socket, "sd-app", "journal", &numbered_events(1));
    let text = format!("{:#}", error.unwrap_err());
    assert!(text.contains("too new"), "{text}");
    peer.finish();
}

#[test]
fn raw_ingest_sends_what_it_is_told_and_sees_the_close() {
    let peer = ScriptedPeer::start(|mut conn| {
        assert_eq!(conn.read_descriptor(), b"qlog.Ingest+forged dom0\0");
        let mut garbage = [0u8; 3];
        conn.stream.read_exact(&mut garbage).unwrap();
        assert_eq!(&garbage, b"\xff\xfe\xfd");
        conn.send(&ErrorFrame::new(ErrorCode::BadFrame, "garbage").encode());
    });
    let mut raw = RawIngest::connect(&peer.socket).unwrap();
    raw.send_descriptor("dom0", "forged").unwrap();
    raw.send_bytes(b"\xff\xfe\xfd").unwrap();
    assert_eq!(raw.expect_error(IO_TIMEOUT).code, ErrorCode::BadFrame);
    assert!(raw.expect_closed(IO_TIMEOUT).is_empty());
    peer.finish();
}
