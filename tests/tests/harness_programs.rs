//! The harness drives the real programs: qlogd's lifecycle, and an agent reaching qlogd
//! through the qrexec double, from stdin and from a private journald.
//!
//! These are the harness's acceptance tests, kept to the plumbing (readiness, restart
//! over the same state, the double's descriptor, the journalctl wrapper); what qlogd and
//! the agent promise beyond that is tested in their own files.

use std::time::Instant;

use qlog_rpc::query::{EventsQuery, Record};
use qlog_rpc::Event;
use qlog_tests::{
    ingest_events, query_events, AgentOptions, Follower, JournalNamespace, RunningAgent,
    RunningSink, SinkOptions, IO_TIMEOUT,
};

fn message(text: &str) -> Event {
    let mut event = Event::new();
    event.push("MESSAGE", text);
    event
}

fn messages(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.event.get_str("MESSAGE").unwrap_or("(not UTF-8)")).collect()
}

#[test]
fn sink_restarts_over_the_same_state() {
    let mut sink = RunningSink::start(SinkOptions::default());
    assert_eq!(
        ingest_events(&sink, "sd-app", "journal", &[message("a"), message("b")]).unwrap(),
        2
    );

    let first_pid = sink.pid();
    sink.kill9();
    assert!(!sink.is_running());
    sink.restart();
    assert_ne!(sink.pid(), first_pid);
    assert_eq!(ingest_events(&sink, "sd-app", "journal", &[message("c")]).unwrap(), 3);

    let records = query_events(sink.query_socket(), &EventsQuery::default()).unwrap();
    assert_eq!(messages(&records), ["a", "b", "c"]);
    let (status, _took) = sink.terminate();
    assert!(status.success(), "{status}{}", sink.log_tail());
}

#[test]
fn agent_reaches_the_sink_through_the_double() {
    let sink = RunningSink::start(SinkOptions::default());
    let mut follower = Follower::start(sink.query_socket(), EventsQuery::default()).unwrap();
    assert!(follower.wait_done(IO_TIMEOUT).is_empty());

    let options = AgentOptions::new(&sink, "sd-app").args(["--source", "stdin"]);
    let mut agent = RunningAgent::spawn(options.args(["--stream", "stdin"]));
    agent.write_stdin(b"hello from stdin\n");
    let record = follower.next_record(IO_TIMEOUT);
    assert_eq!(record.event.get_str("MESSAGE"), Some("hello from stdin"));
    // The name the double put in the descriptor, not anything the agent said.
    assert_eq!((record.vm.as_str(), record.stream.as_str()), ("sd-app", "stdin"));

    agent.close_stdin();
    let status = agent.wait(IO_TIMEOUT);
    assert!(status.success(), "{status}{}", agent.log_tail());
    let calls = agent.qrexec_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("target=sd-log service=qlog.Ingest+ "), "{calls:?}");
}

#[test]
fn agent_forwards_the_private_journal_through_the_wrapper() {
    if !JournalNamespace::require_root() {
        return;
    }
    let journal = JournalNamespace::start();
    let sink = RunningSink::start(SinkOptions::default());
    let mut follower = Follower::start(sink.query_socket(), EventsQuery::default()).unwrap();
    follower.wait_done(IO_TIMEOUT);

    let options = AgentOptions::new(&sink, "sd-app").arg("--journalctl");
    let mut agent = RunningAgent::spawn(options.arg(journal.journalctl_wrapper()));
    journal.systemd_cat("qlog-harness", 5, "from the private journal");

    // journald's own start-up entries come first; look for ours until the deadline.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(record) = follower.try_next_record(left) else {
            panic!("the entry never reached the sink{}", agent.log_tail());
        };
        if record.event.get_str("SYSLOG_IDENTIFIER") == Some("qlog-harness") {
            assert_eq!(record.event.get_str("MESSAGE"), Some("from the private journal"));
            assert_eq!(record.event.get_str("PRIORITY"), Some("5"));
            break;
        }
    }
    let (status, _took) = agent.terminate(IO_TIMEOUT);
    assert!(status.success(), "{status}{}", agent.log_tail());
}
