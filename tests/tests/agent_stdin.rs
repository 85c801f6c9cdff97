//! `producer | qlog-agent --source stdin`: every input event reaches qlogd exactly once
//! with its fields intact, in all three input formats, and the exit status says whether
//! all of them were acknowledged.
//!
//! JSON and export input come from the workload generator, whose entries carry what a
//! real journal holds, including multi-line, binary and invalid UTF-8 values. Unlike the
//! journal source, stdin has no buffer but the agent's memory, so its exit status is the
//! producer's only proof of delivery: 0 after the last acknowledgement, 1 with the count
//! of what may be lost.

use std::time::Duration;

use qlog_rpc::fields::MESSAGE;
use qlog_rpc::query::{EventsQuery, Record, RecordKind};
use qlog_rpc::Event;
use qlog_tests::workload::{write_export, write_json, Workload};
use qlog_tests::{query_events, AgentOptions, RunningAgent, RunningSink, SinkOptions, IO_TIMEOUT};

const SOURCE_VM: &str = "sd-app";

/// How long a SIGTERMed agent waits for acknowledgements that cannot come.
const SHUTDOWN_TIMEOUT_MS: &str = "300";

fn stdin_agent(sink: &RunningSink, format: &str) -> AgentOptions {
    AgentOptions::new(sink, SOURCE_VM)
        .args(["--source", "stdin", "--input-format", format])
        .args(["--shutdown-timeout-ms", SHUTDOWN_TIMEOUT_MS])
        .fast_backoff()
}

/// Feeds `input` to a new agent, closes its stdin and waits for it to exit 0.
fn forward(options: AgentOptions, input: &[u8]) -> RunningAgent {
    let mut agent = RunningAgent::spawn(options);
    agent.write_stdin(input);
    agent.close_stdin();
    let status = agent.wait(IO_TIMEOUT);
    assert!(status.success(), "{status}\n{}", agent.log_tail());
    agent
}

/// Every record qlogd holds, checked to be this VM's stdin stream, numbered 1, 2, 3, ...
/// with no gap record.
fn stored_stream(sink: &RunningSink) -> Vec<Record> {
    let records = query_events(sink.query_socket(), &EventsQuery::default()).unwrap();
    for (i, record) in records.iter().enumerate() {
        assert_eq!((record.vm.as_str(), record.stream.as_str()), (SOURCE_VM, "stdin"));
        assert_eq!(record.kind, RecordKind::Event, "seq {}: {:?}", record.seq, record.event);
        assert_eq!(record.seq, i as u64 + 1, "sequence numbers are contiguous");
    }
    records
}

fn workload(count: usize) -> Vec<Event> {
    let mut workload = Workload::new(11, SOURCE_VM);
    let events: Vec<Event> = (0..count).map(|_| workload.next_event()).collect();
    // The mix the tests rely on is there.
    assert!(events.iter().any(|e| e.get("BINARY_BLOB").is_some()));
    assert!(events.iter().any(|e| e.get(MESSAGE).is_some_and(|m| m.contains(&b'\n'))));
    assert!(events.iter().any(|e| e.get(MESSAGE).is_some_and(|m| std::str::from_utf8(m).is_err())));
    events
}

/// The fields of an event sorted by name, then value: JSON objects have no field order.
fn sorted_fields(event: &Event) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<_> =
        event.fields.iter().map(|f| (f.name.clone(), f.value.clone())).collect();
    fields.sort();
    fields
}

#[test]
fn lines_arrive_once_byte_for_byte() {
    let sink = RunningSink::start(SinkOptions::default());
    let mut lines: Vec<Vec<u8>> = (0..1000).map(|i| format!("line {i}").into_bytes()).collect();
    lines.extend([
        b"".to_vec(),
        b"not UTF-8: \xff\xfe\xc0\xaf".to_vec(),
        b"\x1b[31mred\x1b[0m \x07 bell, tab\there, carriage return\r".to_vec(),
        b"NUL \x00 inside".to_vec(),
        vec![b'x'; 10 * 1024],
        b"MESSAGE=looks like a field".to_vec(),
    ]);
    let mut input = lines.join(&b"\n"[..]);
    // The last line has no newline, and is still a line.
    input.extend_from_slice(b"\nlast, unterminated");
    lines.push(b"last, unterminated".to_vec());

    forward(stdin_agent(&sink, "lines"), &input);

    let records = stored_stream(&sink);
    let stored: Vec<&[u8]> = records.iter().map(|r| r.event.get(MESSAGE).unwrap()).collect();
    assert_eq!(stored.len(), lines.len(), "each line once");
    for (stored, line) in stored.iter().zip(&lines) {
        assert_eq!(stored, line);
    }
    assert!(records.iter().all(|r| r.event.fields.len() == 1), "a line is only its MESSAGE");
}

#[test]
fn json_lines_from_the_workload_arrive_once_with_every_field() {
    let sink = RunningSink::start(SinkOptions::default());
    let events = workload(2000);
    let mut input = Vec::new();
    for event in &events {
        write_json(event, &mut input).unwrap();
    }

    forward(stdin_agent(&sink, "json"), &input);

    let records = stored_stream(&sink);
    assert_eq!(records.len(), events.len(), "each object once");
    for (record, event) in records.iter().zip(&events) {
        assert_eq!(sorted_fields(&record.event), sorted_fields(event), "seq {}", record.seq);
    }
}

#[test]
fn export_entries_from_the_workload_arrive_once_field_for_field() {
    let sink = RunningSink::start(SinkOptions::default());
    let events = workload(2000);
    let mut input = Vec::new();
    for event in &events {
        write_export(event, &mut input).unwrap();
    }

    forward(stdin_agent(&sink, "export"), &input);

    let records = stored_stream(&sink);
    assert_eq!(records.len(), events.len(), "each entry once");
    for (record, event) in records.iter().zip(&events) {
        assert_eq!(record.event.fields, event.fields, "seq {}", record.seq);
    }
}

#[test]
fn exit_0_means_every_event_was_acknowledged_even_over_dying_connections() {
    let sink = RunningSink::start(SinkOptions::default());
    let events = workload(1500);
    let mut input = Vec::new();
    for event in &events {
        write_export(event, &mut input).unwrap();
    }
    // Every call dies after 256 KiB, mid-frame, so the input takes several connections
    // and each new one must replay what the last did not get acknowledged.
    let options = stdin_agent(&sink, "export").env("QREXEC_DOUBLE_DIE_AFTER_BYTES", "262144");

    let agent = forward(options, &input);

    // Exit 0 came after the last acknowledgement, so everything is stored by now.
    let calls = agent.qrexec_calls().len();
    assert!(calls as u64 > input.len() as u64 / 262_144, "only {calls} calls");
    let records = stored_stream(&sink);
    assert_eq!(records.len(), events.len(), "each entry once, over {calls} calls");
    for (record, event) in records.iter().zip(&events) {
        assert_eq!(record.event.fields, event.fields, "seq {}", record.seq);
    }
}

#[test]
fn sigterm_with_events_unacknowledged_exits_1_and_counts_them() {
    let mut sink = RunningSink::start(SinkOptions::default());
    let mut agent = RunningAgent::spawn(stdin_agent(&sink, "lines"));
    // Once welcomed, the agent reads stdin; before, it does not know how to number it.
    agent.wait_for_log("the welcome", IO_TIMEOUT, |log| log.contains("connected to qlogd"));

    // qlogd goes away for good; the agent reads 100 lines it cannot deliver.
    sink.kill9();
    let lines: String = (0..100).map(|i| format!("stranded {i}\n")).collect();
    agent.write_stdin(lines.as_bytes());
    agent.close_stdin();
    agent.wait_for_log("the end of stdin", IO_TIMEOUT, |log| log.contains("stdin ended after"));

    let (status, took) = agent.terminate(IO_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{status}\n{}", agent.log_tail());
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?} with a 300 ms timeout");
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.contains("error: exiting with 100 events not acknowledged by qlogd: they may be lost"),
        "{log}"
    );
}

#[test]
fn sigterm_before_qlogd_was_ever_reached_exits_non_zero() {
    // qlogd is down from the start: its socket file exists, and nobody listens.
    let mut sink = RunningSink::start(SinkOptions::default());
    sink.kill9();
    let mut agent = RunningAgent::spawn(stdin_agent(&sink, "lines"));
    let lines: String = (0..50).map(|i| format!("never sent {i}\n")).collect();
    agent.write_stdin(lines.as_bytes());
    agent.close_stdin();
    agent.wait_for_calls(3, IO_TIMEOUT);

    let (status, _) = agent.terminate(IO_TIMEOUT);
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    // The stdin source starts only at the first welcome, so this agent read nothing; it
    // must still fail, since `producer | qlog-agent` delivered none of its 50 lines.
    assert!(!status.success(), "exit 0 though nothing was delivered:\n{log}");
}
