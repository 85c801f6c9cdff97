//! qlogd against hostile ingest peers: whatever one connection sends, it ends only that
//! connection, and every other VM is served and loses nothing.
//!
//! Each test talks to a real qlogd through [`RawIngest`], which writes the descriptor that
//! qrexec would write, so it can forge, cut and garble every byte. Each hostile peer runs
//! while a well-behaved VM ([`BYSTANDER`]) sends before, during and after it; the
//! bystander's events are then checked one by one, and qlogd must still be running and
//! answering queries. The rejections are checked by their `Error` frame's code and, where
//! the descriptor named a valid VM, by that VM's `frames_rejected`.

use std::io::Write;
use std::ops::RangeInclusive;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qlog_rpc::descriptor::{MAX_DESCRIPTOR_LEN, MAX_VM_NAME_LEN};
use qlog_rpc::event::encode_event_payload;
use qlog_rpc::frame::encode_to_vec;
use qlog_rpc::message::{decode_json, decode_u64, encode_u64};
use qlog_rpc::query::{EventsQuery, Filter, Record, RecordKind, VmInfo};
use qlog_rpc::{fields, ErrorCode, ErrorFrame, Event, Frame, FrameType, Limits};
use qlog_tests::ingest::{descriptor, event_frame, hello_frame};
use qlog_tests::{
    hello, ingest_events, query_events, query_vms, Follower, RawIngest, RunningSink, SinkOptions,
    IO_TIMEOUT,
};

/// The well-behaved VM that sends alongside every hostile peer.
const BYSTANDER: &str = "sd-app";
const BYSTANDER_BEFORE: u64 = 200;
const BYSTANDER_DURING: u64 = 2_000;
const BYSTANDER_AFTER: u64 = 200;
const BYSTANDER_TOTAL: u64 = BYSTANDER_BEFORE + BYSTANDER_DURING + BYSTANDER_AFTER;

/// The sink's own `max_frame_len` (PROTOCOL.md 5.4): 64 KiB below the protocol default.
const SINK_MAX_FRAME_LEN: u32 = Limits::DEFAULT.max_frame_len - 64 * 1024;

fn message(text: &str) -> Event {
    let mut event = Event::new();
    event.push(fields::MESSAGE, text);
    event
}

fn bystander_events(seqs: RangeInclusive<u64>) -> Vec<Event> {
    seqs.map(|seq| message(&format!("bystander event {seq}"))).collect()
}

fn send_bystander(sink: &RunningSink, seqs: RangeInclusive<u64>) {
    let last = *seqs.end();
    let stored = ingest_events(sink, BYSTANDER, "journal", &bystander_events(seqs))
        .expect("qlogd stores the bystander's events");
    assert_eq!(stored, last);
}

/// Runs `hostile` while the bystander sends, before, during and after it, then checks
/// that qlogd still runs and stored every bystander event exactly once.
///
/// The bystander's last session also orders the checks after it: the committer takes
/// requests in the order connections send them, and a rejected connection reports
/// itself before it writes its `Error` frame, so once that session's `End` has arrived,
/// every counter the hostile peer raised is published.
fn alongside_bystander<T>(sink: &mut RunningSink, hostile: impl FnOnce(&RunningSink) -> T) -> T {
    let shared: &RunningSink = sink;
    send_bystander(shared, 1..=BYSTANDER_BEFORE);
    let result = std::thread::scope(|scope| {
        let during = scope.spawn(|| {
            send_bystander(shared, BYSTANDER_BEFORE + 1..=BYSTANDER_BEFORE + BYSTANDER_DURING)
        });
        let result = hostile(shared);
        during.join().expect("the bystander's sender does not panic");
        result
    });
    send_bystander(shared, BYSTANDER_BEFORE + BYSTANDER_DURING + 1..=BYSTANDER_TOTAL);

    let records = records_of(shared, BYSTANDER);
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=BYSTANDER_TOTAL).collect::<Vec<_>>(), "the bystander's sequence");
    for record in &records {
        assert_eq!(record.kind, RecordKind::Event, "{record:?}");
        let expected = format!("bystander event {}", record.seq);
        assert_eq!(record.event.get_str(fields::MESSAGE), Some(expected.as_str()));
    }
    let bystander = vm_info(shared, BYSTANDER).expect("the bystander is known");
    assert_eq!(bystander.frames_rejected, 0, "{bystander:?}");
    assert!(sink.is_running(), "qlogd died{}", sink.log_tail());
    result
}

fn records_of(sink: &RunningSink, vm: &str) -> Vec<Record> {
    let query = EventsQuery { vms: vec![vm.to_owned()], ..EventsQuery::default() };
    query_events(sink.query_socket(), &query).expect("qlogd answers an events query")
}

fn vm_info(sink: &RunningSink, vm: &str) -> Option<VmInfo> {
    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    table.vms.into_iter().find(|info| info.vm == vm)
}

fn known_vms(sink: &RunningSink) -> Vec<String> {
    let table = query_vms(sink.query_socket()).expect("qlogd answers a vms query");
    table.vms.into_iter().map(|info| info.vm).collect()
}

/// Reads until qlogd closes the connection, which it must do right after an `Error`
/// frame; returns that frame and what came before it.
fn rejection(conn: &mut RawIngest) -> (ErrorFrame, Vec<Frame>) {
    let mut frames = conn.expect_closed(IO_TIMEOUT);
    let last = frames.pop().expect("qlogd sends an Error frame before it closes");
    assert_eq!(last.ty, FrameType::Error, "the last frame before the close");
    let error = decode_json(last.ty, &last.payload).expect("an Error frame is valid JSON");
    (error, frames)
}

/// The highest `Ack` among `frames`, which must all be acks; 0 if there is none.
fn highest_ack(frames: &[Frame]) -> u64 {
    frames
        .iter()
        .map(|frame| {
            assert_eq!(frame.ty, FrameType::Ack, "only acks come before the Error frame");
            decode_u64(frame.ty, &frame.payload).expect("an ack is a u64")
        })
        .max()
        .unwrap_or(0)
}

/// Connects, sends `bytes`, half-closes, and returns qlogd's rejection.
fn send_and_get_rejected(sink: &RunningSink, bytes: &[u8]) -> ErrorFrame {
    let mut conn = RawIngest::connect(sink.ingest_socket()).expect("the ingest socket accepts");
    conn.send_bytes(bytes).expect("qlogd reads what it is sent");
    conn.half_close().expect("a connected socket can be half-closed");
    let (error, frames) = rejection(&mut conn);
    assert!(frames.is_empty(), "nothing but the Error frame before a handshake: {frames:?}");
    error
}

#[test]
fn peer_that_sends_nothing_gets_bad_descriptor() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        // Closed for good at once: nobody is left to tell, qlogd just carries on.
        drop(UnixStream::connect(sink.ingest_socket()).expect("the ingest socket accepts"));
        let error = send_and_get_rejected(sink, b"");
        assert_eq!(error.code, ErrorCode::BadDescriptor, "{error:?}");
    });
    assert_eq!(known_vms(&sink), [BYSTANDER]);
}

#[test]
fn frames_without_a_descriptor_are_a_bad_descriptor() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        let error = send_and_get_rejected(sink, &hello_frame("journal"));
        assert_eq!(error.code, ErrorCode::BadDescriptor, "{error:?}");
        let error = send_and_get_rejected(sink, &event_frame(1, &message("no descriptor")));
        assert_eq!(error.code, ErrorCode::BadDescriptor, "{error:?}");
    });
    assert_eq!(known_vms(&sink), [BYSTANDER]);
}

#[test]
fn descriptor_is_cut_off_at_65535_bytes() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        // No NUL in all the bytes qrexec could ever send as a descriptor.
        let error = send_and_get_rejected(sink, &vec![b'A'; MAX_DESCRIPTOR_LEN]);
        assert_eq!(error.code, ErrorCode::BadDescriptor, "{error:?}");

        // The longest descriptor, NUL included, is a valid call with a long argument...
        let vm = "sd-long-arg";
        let fixed = descriptor(vm, "").len();
        let longest = descriptor(vm, &"A".repeat(MAX_DESCRIPTOR_LEN - fixed));
        assert_eq!(longest.len(), MAX_DESCRIPTOR_LEN);
        let mut conn = RawIngest::connect(sink.ingest_socket()).expect("the socket accepts");
        conn.send_bytes(&longest).expect("qlogd reads the descriptor");
        conn.send_hello(&hello("journal")).expect("qlogd reads the hello");
        let welcome = conn.expect_welcome(IO_TIMEOUT);
        assert_eq!(welcome.vm, vm);
        conn.send_event(1, &message("after the longest descriptor")).expect("qlogd reads");
        conn.send_end(1).expect("qlogd reads the end");
        conn.expect_ack(1, IO_TIMEOUT);

        // ...and one byte more is not.
        let too_long = descriptor(vm, &"A".repeat(MAX_DESCRIPTOR_LEN - fixed + 1));
        let error = send_and_get_rejected(sink, &too_long);
        assert_eq!(error.code, ErrorCode::BadDescriptor, "{error:?}");
    });
    let stored = records_of(&sink, "sd-long-arg");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event.get_str(fields::MESSAGE), Some("after the longest descriptor"));
}

#[test]
fn garbage_descriptors_are_rejected() {
    let garbage: [&[u8]; 8] = [
        b"\0",
        b" \0",
        b"\xff\xfe\xfd qlog\0",
        b"qlog.Ingest sd-garbage\0",
        b"qlog.Ingest+ sd-garbage dom0 name\0",
        b"qlog.Ingest+  sd-garbage\0",
        b"qlog.Ingest+ sd-garbage \0",
        b"qlog.Ingest+\nsd-garbage\0",
    ];
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        for bytes in garbage {
            let mut connection = bytes.to_vec();
            connection.extend(hello_frame("journal"));
            let error = send_and_get_rejected(sink, &connection);
            assert_eq!(error.code, ErrorCode::BadDescriptor, "{bytes:?}: {error:?}");
        }
    });
    assert_eq!(known_vms(&sink), [BYSTANDER]);
}

#[test]
fn descriptor_for_another_service_is_rejected() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        for call in
            ["qlog.Other+ sd-other\0", "QLOG.INGEST+ sd-other\0", "qlog.Ingest2+ sd-other\0"]
        {
            let mut connection = call.as_bytes().to_vec();
            connection.extend(hello_frame("journal"));
            connection.extend(event_frame(1, &message("to the wrong service")));
            let error = send_and_get_rejected(sink, &connection);
            assert_eq!(error.code, ErrorCode::BadDescriptor, "{call:?}: {error:?}");
        }
    });
    let other = vm_info(&sink, "sd-other");
    assert!(other.as_ref().is_none_or(|info| info.events_stored == 0), "{other:?}");
}

#[test]
fn invalid_vm_names_are_rejected_and_never_become_known() {
    let longest = format!("a{}", "b".repeat(MAX_VM_NAME_LEN - 1));
    let too_long = format!("{longest}c");
    let invalid = ["1bad", &too_long, "a.b", "Domain-0", "none", "default", "sys-net-dm", "-vm"];
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        for vm in invalid {
            let mut connection = descriptor(vm, "");
            connection.extend(hello_frame("journal"));
            connection.extend(event_frame(1, &message("from an invalid name")));
            let error = send_and_get_rejected(sink, &connection);
            assert_eq!(error.code, ErrorCode::BadDescriptor, "{vm:?}: {error:?}");
        }
        // 31 characters is still a name.
        let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), &longest, "journal");
        assert_eq!(welcome.vm, longest);
        conn.send_event(1, &message("from the longest name")).expect("qlogd reads the event");
        conn.send_end(1).expect("qlogd reads the end");
        conn.expect_ack(1, IO_TIMEOUT);
    });
    let mut expected = vec![longest.clone(), BYSTANDER.to_owned()];
    expected.sort();
    assert_eq!(known_vms(&sink), expected);
}

#[test]
fn frames_over_the_limit_are_rejected_from_their_header() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        // A 4 GiB hello, announced before any limit was negotiated.
        let mut connection = descriptor("sd-big-hello", "");
        connection.extend([0xff, 0xff, 0xff, 0xff, FrameType::Hello as u8]);
        let error = send_and_get_rejected(sink, &connection);
        assert_eq!(error.code, ErrorCode::BadFrame, "{error:?}");

        // A 4 GiB event, and a frame type nobody assigned, after a good handshake.
        for header in [[0xff, 0xff, 0xff, 0xff, FrameType::Event as u8], [0, 0, 0, 1, 0x1f]] {
            let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-big", "journal");
            conn.send_bytes(&header).expect("qlogd reads the header");
            let (error, before) = rejection(&mut conn);
            assert_eq!(error.code, ErrorCode::BadFrame, "{header:?}: {error:?}");
            assert_eq!(highest_ack(&before), 0);
        }
    });
    assert_eq!(vm_info(&sink, "sd-big-hello").map(|v| v.frames_rejected), Some(1));
    assert_eq!(vm_info(&sink, "sd-big").map(|v| v.frames_rejected), Some(2));
}

#[test]
fn largest_event_frame_is_stored_and_one_byte_more_is_rejected() {
    // Twenty of the longest values overfill the sink's frame limit by a little (each field
    // is 6 bytes of lengths and name plus its value, after 12 bytes of seq and count);
    // the last value is cut so that the payload is exactly the limit.
    let value_len = Limits::DEFAULT.max_value_len as usize;
    let mut largest = Event::new();
    for name in ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"] {
        largest.push(name, vec![0xa5; value_len]);
        largest.push(name, vec![0x00; value_len]);
    }
    let mut payload = Vec::new();
    encode_event_payload(1, &largest, &mut payload);
    let excess = payload.len() - SINK_MAX_FRAME_LEN as usize;
    let last = largest.fields.last_mut().expect("twenty fields");
    last.value.truncate(value_len - excess);
    payload.clear();
    encode_event_payload(1, &largest, &mut payload);
    assert_eq!(payload.len(), SINK_MAX_FRAME_LEN as usize);

    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-big", "journal");
        assert_eq!(welcome.limits.max_frame_len, SINK_MAX_FRAME_LEN);
        conn.send_frame(FrameType::Event, &payload).expect("qlogd reads the largest event");
        conn.expect_ack(1, IO_TIMEOUT);
        let one_more = (SINK_MAX_FRAME_LEN + 1).to_be_bytes();
        conn.send_bytes(&[&one_more[..], &[FrameType::Event as u8]].concat())
            .expect("qlogd reads the header");
        let (error, _) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::BadFrame, "{error:?}");
    });
    let stored = records_of(&sink, "sd-big");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event, largest, "the largest event comes back as it was sent");
    assert_eq!(vm_info(&sink, "sd-big").map(|v| v.frames_rejected), Some(1));
}

#[test]
fn truncated_frames_are_rejected_and_what_came_before_is_kept() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        // End of file in the middle of a payload, after three good events.
        let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-cut", "journal");
        for seq in 1..=3 {
            conn.send_event(seq, &message(&format!("kept {seq}"))).expect("qlogd reads");
        }
        let cut = event_frame(4, &message("cut short"));
        conn.send_bytes(&cut[..cut.len() - 3]).expect("qlogd reads the partial frame");
        conn.half_close().expect("a connected socket can be half-closed");
        let (error, before) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::BadFrame, "{error:?}");
        assert_eq!(highest_ack(&before), 3, "the events before the cut are acknowledged");

        // End of file inside a frame header.
        let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-cut", "journal");
        assert_eq!(welcome.resume.last_seq, 3);
        conn.send_bytes(&cut[..3]).expect("qlogd reads the partial header");
        conn.half_close().expect("a connected socket can be half-closed");
        let (error, _) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::BadFrame, "{error:?}");
    });
    let records = records_of(&sink, "sd-cut");
    let messages: Vec<Option<&str>> =
        records.iter().map(|r| r.event.get_str(fields::MESSAGE)).collect();
    assert_eq!(messages, [Some("kept 1"), Some("kept 2"), Some("kept 3")]);
    assert_eq!(vm_info(&sink, "sd-cut").map(|v| v.frames_rejected), Some(2));
}

#[test]
fn invalid_utf8_and_nul_bytes_in_values_are_stored_byte_for_byte() {
    let every_byte: Vec<u8> = (0..=255).collect();
    let mut binary = Event::new();
    binary.push(fields::MESSAGE, every_byte.clone());
    binary.push("NULS", b"\0\0a\0b\0".to_vec());
    binary.push("BAD_UTF8", b"\xc3\x28 \xa0\xa1 \xed\xa0\x80 \xf0\x28\x8c\x28 \xfe\xff".to_vec());
    binary.push("EMPTY", Vec::new());
    binary.push("ESCAPES", b"\x1b[2J\x1b]0;owned\x07\r\x08\xe2\x80\xae".to_vec());
    binary.push("NULS", b"second value of a repeated name\0".to_vec());
    let mut longest = Event::new();
    let value_len = Limits::DEFAULT.max_value_len as usize;
    longest.push(
        fields::MESSAGE,
        every_byte.iter().copied().cycle().take(value_len).collect::<Vec<_>>(),
    );
    let mut only_nul = Event::new();
    only_nul.push(fields::MESSAGE, vec![0u8]);
    let sent = vec![binary, longest, only_nul, Event::new()];

    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        assert_eq!(ingest_events(sink, "sd-bytes", "journal", &sent).expect("stored"), 4);
    });
    let stored: Vec<Event> = records_of(&sink, "sd-bytes").into_iter().map(|r| r.event).collect();
    assert_eq!(stored, sent, "values come back exactly as they were sent");
    assert_eq!(vm_info(&sink, "sd-bytes").map(|v| v.frames_rejected), Some(0));
}

#[test]
fn event_with_100000_fields_is_rejected_with_bad_event() {
    let mut widest = Event::new();
    for i in 0..Limits::DEFAULT.max_fields {
        widest.push(format!("F{i:04}"), format!("{i}"));
    }
    let mut too_wide = Event::new();
    for _ in 0..100_000 {
        too_wide.push("A", Vec::new());
    }

    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-fields", "journal");
        conn.send_event(1, &widest).expect("qlogd reads the widest event");
        conn.send_event(2, &too_wide).expect("qlogd reads the event it rejects");
        let (error, before) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::BadEvent, "{error:?}");
        assert_eq!(highest_ack(&before), 1);
    });
    let stored = records_of(&sink, "sd-fields");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event, widest, "1,024 fields is within the limit");
    assert_eq!(vm_info(&sink, "sd-fields").map(|v| v.frames_rejected), Some(1));
}

#[test]
fn deeply_nested_json_in_hello_is_rejected_with_bad_hello() {
    // About 60 KB, within the control-frame limit, nested far deeper than any parser's
    // stack should be asked to go.
    let depth = 30_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let bad_hellos = [
        nested.clone(),
        format!(r#"{{"versions":{nested},"agent":"a","stream":"journal"}}"#),
        format!(r#"{{"versions":[1],"agent":"a","stream":"journal","limits":{nested}}}"#),
    ];
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        for hello in &bad_hellos {
            assert!(hello.len() <= Limits::DEFAULT.max_control_len as usize);
            let mut connection = descriptor("sd-nested", "");
            connection.extend(encode_to_vec(FrameType::Hello, hello.as_bytes()));
            let error = send_and_get_rejected(sink, &connection);
            assert_eq!(error.code, ErrorCode::BadHello, "{error:?}");
        }

        // Unknown fields are ignored, however deep: the session goes on.
        let hello = format!(r#"{{"versions":[1],"agent":"a","stream":"journal","x":{nested}}}"#);
        let mut conn = RawIngest::connect(sink.ingest_socket()).expect("the socket accepts");
        conn.send_descriptor("sd-nested", "").expect("qlogd reads the descriptor");
        conn.send_frame(FrameType::Hello, hello.as_bytes()).expect("qlogd reads the hello");
        conn.expect_welcome(IO_TIMEOUT);
        conn.send_event(1, &message("after a deep hello")).expect("qlogd reads the event");
        conn.send_end(1).expect("qlogd reads the end");
        conn.expect_ack(1, IO_TIMEOUT);
    });
    let info = vm_info(&sink, "sd-nested").expect("a rejected VM is known");
    assert_eq!((info.frames_rejected, info.events_stored), (3, 1), "{info:?}");
}

fn sink_with_one_second_handshake() -> RunningSink {
    let args = ["--handshake-timeout", "1"].map(Into::into).to_vec();
    RunningSink::start(SinkOptions { args, ..SinkOptions::default() })
}

#[test]
fn silent_peer_is_closed_with_bad_hello_after_the_handshake_timeout() {
    let mut sink = sink_with_one_second_handshake();
    alongside_bystander(&mut sink, |sink| {
        // Taken before connecting, so qlogd's clock, which starts at accept, cannot have
        // started earlier.
        let connected = Instant::now();
        let mut conn = RawIngest::connect(sink.ingest_socket()).expect("the socket accepts");
        let (error, before) = rejection(&mut conn);
        assert!(connected.elapsed() >= Duration::from_secs(1), "closed before the timeout");
        assert!(before.is_empty(), "{before:?}");
        // PROTOCOL.md 5.1 and 5.11: a handshake that does not complete in time, whether
        // the descriptor or the Hello is missing, is answered with bad-hello.
        assert_eq!(error.code, ErrorCode::BadHello, "{error:?}");
    });
    assert_eq!(known_vms(&sink), [BYSTANDER]);
}

#[test]
fn peer_silent_after_its_descriptor_is_closed_and_not_counted_as_rejected() {
    let mut sink = sink_with_one_second_handshake();
    alongside_bystander(&mut sink, |sink| {
        let connected = Instant::now();
        let mut conn = RawIngest::connect(sink.ingest_socket()).expect("the socket accepts");
        conn.send_descriptor("sd-mute", "").expect("qlogd reads the descriptor");
        let (error, _) = rejection(&mut conn);
        assert!(connected.elapsed() >= Duration::from_secs(1), "closed before the timeout");
        assert_eq!(error.code, ErrorCode::BadHello, "{error:?}");
    });
    // PROTOCOL.md 5.11: handshake timeouts are not counted in frames_rejected, and 6.3:
    // a VM is known only once something was recorded for it.
    let mute = vm_info(&sink, "sd-mute");
    assert!(mute.as_ref().is_none_or(|info| info.frames_rejected == 0), "{mute:?}");
}

/// Reads `VmHWM` (peak resident set) of a process from /proc, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("qlogd runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("/proc/PID/status has VmHWM")
}

#[test]
fn peer_that_never_reads_neither_blocks_others_nor_grows_memory() {
    const FLOOD: u64 = 200_000;
    /// Far above what a debug qlogd needs, far below what buffering the flood's acks,
    /// or its events, without bound would take.
    const MAX_PEAK_RSS_KIB: u64 = 200 * 1024;
    let last_message = format!("flood {FLOOD}");

    // Everything the flooder will ever send, written without reading a single byte back.
    let mut flood = descriptor("sd-flood", "");
    flood.extend(hello_frame("journal"));
    for seq in 1..=FLOOD {
        flood.extend(event_frame(seq, &message(&format!("flood {seq}"))));
    }
    flood.extend(encode_u64(FrameType::End, FLOOD));

    let mut sink = RunningSink::start(SinkOptions::default());
    let filter = Filter {
        matches: vec![(fields::MESSAGE.to_owned(), last_message.clone())],
        ..Filter::default()
    };
    let mut last_stored =
        Follower::start(sink.query_socket(), EventsQuery { filter, ..EventsQuery::default() })
            .expect("qlogd accepts a follow query");
    last_stored.wait_done(IO_TIMEOUT);

    let flooder = alongside_bystander(&mut sink, |sink| {
        let flooder = UnixStream::connect(sink.ingest_socket()).expect("the socket accepts");
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| (&flooder).write_all(&flood));
            let record = last_stored.next_record(Duration::from_secs(120));
            assert_eq!((record.vm.as_str(), record.seq), ("sd-flood", FLOOD));
            writer.join().expect("the writer does not panic").expect("qlogd reads the flood");
        });
        // Kept open, unread, until the bystander has finished.
        flooder
    });

    let peak = peak_rss_kib(sink.pid());
    eprintln!("qlogd peak RSS with a peer that never reads: {} MiB", peak / 1024);
    assert!(peak < MAX_PEAK_RSS_KIB, "qlogd peaked at {peak} KiB");
    let info = vm_info(&sink, "sd-flood").expect("the flooder is known");
    assert_eq!(info.events_stored, FLOOD, "{info:?}");
    assert_eq!(info.frames_rejected, 0, "{info:?}");
    drop(flooder);
}

#[test]
fn sink_only_fields_from_a_vm_are_renamed_and_counted() {
    let long_name = format!("_QLOG_{}", "X".repeat(64 - "_QLOG_".len()));
    let mut claims = Event::new();
    claims.push(fields::MESSAGE, "i am dom0");
    claims.push(fields::QLOG_VM, "dom0");
    claims.push(fields::QLOG_STREAM, "qlogd");
    claims.push(fields::QLOG_SEQ, "999");
    claims.push(fields::QLOG_RECEIVED_USEC, "0");
    claims.push(fields::QLOG_GAP, "quota");
    claims.push(fields::QLOG_GAP_COUNT, "1000000");
    claims.push("_QLOG_", "bare prefix");
    claims.push(long_name.clone(), "long");
    claims.push("QLOG_VM", "no leading underscore: not sink-only");
    let renamed = 8;

    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        assert_eq!(ingest_events(sink, "sd-claims", "journal", &[claims.clone()]).unwrap(), 1);
    });

    let stored = records_of(&sink, "sd-claims");
    assert_eq!(stored.len(), 1);
    let record = &stored[0];
    assert_eq!(
        (record.vm.as_str(), record.stream.as_str(), record.seq),
        ("sd-claims", "journal", 1)
    );
    assert_eq!(record.kind, RecordKind::Event, "claiming _QLOG_GAP does not make a gap");
    let names: Vec<&str> = record.event.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names[..8],
        [
            "MESSAGE",
            "CLAIMED_QLOG_VM",
            "CLAIMED_QLOG_STREAM",
            "CLAIMED_QLOG_SEQ",
            "CLAIMED_QLOG_RECEIVED_USEC",
            "CLAIMED_QLOG_GAP",
            "CLAIMED_QLOG_GAP_COUNT",
            "CLAIMED_QLOG_",
        ]
    );
    // PROTOCOL.md 5.12 lets the renamed name grow to 71 bytes; what must hold either way
    // is that it is no longer under the sink-only prefix and keeps its place and value.
    let full = format!("CLAIMED_QLOG_{}", &long_name["_QLOG_".len()..]);
    assert!(full.starts_with(names[8]) && names[8].starts_with("CLAIMED_QLOG_X"), "{names:?}");
    assert_eq!(names[9], "QLOG_VM");
    let values: Vec<&[u8]> = record.event.fields.iter().map(|f| f.value.as_slice()).collect();
    let sent: Vec<&[u8]> = claims.fields.iter().map(|f| f.value.as_slice()).collect();
    assert_eq!(values, sent, "values and their order are kept");
    assert!(record.event.fields.iter().all(|f| !f.name.starts_with("_QLOG_")));

    let info = vm_info(&sink, "sd-claims").expect("the VM is known");
    assert_eq!(info.fields_quarantined, renamed, "{info:?}");
    // The claims match nothing that asks for the trusted facts.
    for (name, value) in
        [(fields::QLOG_VM, "dom0"), (fields::QLOG_GAP, "quota"), (fields::QLOG_SEQ, "999")]
    {
        let filter =
            Filter { matches: vec![(name.to_owned(), value.to_owned())], ..Filter::default() };
        let query = EventsQuery { filter, ..EventsQuery::default() };
        let found = query_events(sink.query_socket(), &query).expect("qlogd answers");
        assert!(found.is_empty(), "{name}={value} matched {found:?}");
    }
}

#[test]
fn sequence_numbers_that_do_not_increase_are_rejected() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-seq", "journal");
        for seq in [1, 2, 3] {
            conn.send_event(seq, &message(&format!("event {seq}"))).expect("qlogd reads");
        }
        conn.send_event(2, &message("backwards")).expect("qlogd reads the event");
        let (error, before) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::SequenceNotIncreasing, "{error:?}");
        assert_eq!(highest_ack(&before), 3);

        // Zero is never a sequence number, not even the first of a connection.
        let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-seq", "other");
        conn.send_event(0, &message("zero")).expect("qlogd reads the event");
        let (error, _) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::SequenceNotIncreasing, "{error:?}");

        // The same number twice in a row.
        let (mut conn, welcome) = RawIngest::handshake(sink.ingest_socket(), "sd-seq", "journal");
        assert_eq!(welcome.resume.last_seq, 3);
        conn.send_event(4, &message("event 4")).expect("qlogd reads the event");
        conn.send_event(4, &message("event 4 again")).expect("qlogd reads the event");
        let (error, before) = rejection(&mut conn);
        assert_eq!(error.code, ErrorCode::SequenceNotIncreasing, "{error:?}");
        assert_eq!(highest_ack(&before), 4);
    });
    let messages: Vec<String> = records_of(&sink, "sd-seq")
        .iter()
        .map(|r| r.event.get_str(fields::MESSAGE).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(messages, ["event 1", "event 2", "event 3", "event 4"]);
    assert_eq!(vm_info(&sink, "sd-seq").map(|v| v.frames_rejected), Some(3));
}

#[test]
fn stream_named_qlogd_is_rejected() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        let mut connection = descriptor("sd-sink-stream", "");
        connection.extend(hello_frame(qlog_rpc::message::SINK_STREAM));
        connection.extend(event_frame(1, &message("pretending to be qlogd")));
        let error = send_and_get_rejected(sink, &connection);
        assert_eq!(error.code, ErrorCode::BadHello, "{error:?}");
    });
    let info = vm_info(&sink, "sd-sink-stream").expect("a rejected VM is known");
    assert_eq!(info.frames_rejected, 1, "{info:?}");
    assert!(info.streams.is_empty(), "{info:?}");
    assert_eq!(info.events_stored, 0, "{info:?}");
}

#[test]
fn frames_only_the_sink_sends_are_unexpected_from_a_peer() {
    let mut sink = RunningSink::start(SinkOptions::default());
    alongside_bystander(&mut sink, |sink| {
        // Before the hello.
        let mut connection = descriptor("sd-confused", "");
        connection.extend(encode_u64(FrameType::Ack, 1));
        let error = send_and_get_rejected(sink, &connection);
        assert_eq!(error.code, ErrorCode::UnexpectedFrame, "{error:?}");

        // After it: a second hello, an ack, an error frame, a query.
        let after = [
            hello_frame("journal"),
            encode_u64(FrameType::Ack, 1),
            ErrorFrame::new(ErrorCode::Internal, "from the peer").encode(),
            encode_to_vec(FrameType::Query, br#"{"kind":"vms"}"#),
        ];
        for frame in after {
            let (mut conn, _) =
                RawIngest::handshake(sink.ingest_socket(), "sd-confused", "journal");
            conn.send_bytes(&frame).expect("qlogd reads the frame");
            let (error, _) = rejection(&mut conn);
            assert_eq!(error.code, ErrorCode::UnexpectedFrame, "{frame:?}: {error:?}");
        }
    });
    assert_eq!(vm_info(&sink, "sd-confused").map(|v| v.frames_rejected), Some(5));
}

#[test]
fn a_vm_that_keeps_getting_rejected_is_answered_ever_slower_and_its_count_survives_a_restart() {
    let mut sink = RunningSink::start(SinkOptions::default());
    let bad_hello = [descriptor("sd-garbage", ""), vec![0xff; 64]].concat();
    // The budget (REJECTION_BURST in sink/src/rate_limit.rs): that many rejections are
    // answered at once...
    let budget = 10;
    for _ in 0..budget {
        assert_eq!(send_and_get_rejected(&sink, &bad_hello).code, ErrorCode::BadFrame);
    }
    // ...and past it each reply waits, the cost that slows a VM looping on garbage.
    // Only the lower bound is checked: the wait is the sink's, not the machine's.
    let started = Instant::now();
    for _ in 0..2 {
        assert_eq!(send_and_get_rejected(&sink, &bad_hello).code, ErrorCode::BadFrame);
    }
    let penalty = Duration::from_millis(250); // REJECTION_PENALTY
    assert!(started.elapsed() >= penalty * 2, "{:?} for two replies", started.elapsed());

    // Another VM's events go through as ever, and counts are published at once, though
    // rejections alone wait for a later commit to reach the store...
    send_bystander(&sink, 1..=10);
    assert_eq!(vm_info(&sink, "sd-garbage").map(|v| v.frames_rejected), Some(budget + 2));
    // ...which a clean shutdown makes.
    send_and_get_rejected(&sink, &bad_hello);
    sink.restart_cleanly();
    assert_eq!(vm_info(&sink, "sd-garbage").map(|v| v.frames_rejected), Some(budget + 3));
}
