//! Age-based retention: events older than their VM's retention period are removed, per
//! VM, and counted, while younger events and other VMs' events stay.
//!
//! The retention period is set in seconds through qlogd's hidden `--retention-seconds`,
//! and the test waits on the clock (until the first events are old enough) rather than
//! on qlogd: retention then runs on the first commit after start, which the test causes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qlog_rpc::query::EventsQuery;
use qlog_rpc::Event;
use qlog_tests::ingest::ingest_events;
use qlog_tests::query::{query_events, query_vms};
use qlog_tests::sink::{RunningSink, SinkOptions};

fn events(tag: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let mut e = Event::new();
            e.push("MESSAGE", format!("{tag} {i}"));
            e
        })
        .collect()
}

fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is past 1970").as_micros() as u64
}

#[test]
fn events_past_the_retention_period_are_removed_and_counted_per_vm() {
    let mut first = RunningSink::start(SinkOptions::default());
    ingest_events(&first, "sd-app", "journal", &events("old", 100)).expect("old events stored");
    let stored = query_events(first.query_socket(), &EventsQuery::default()).expect("query");
    assert_eq!(stored.len(), 100);
    let newest_old = stored.iter().map(|r| r.received_usec).max().expect("events were stored");
    let state_dir = first.state_dir().to_owned();
    let (status, _) = first.terminate();
    assert!(status.success(), "qlogd exits 0 on SIGTERM");

    // Wait until every old event is more than 2 s old: a deadline on the clock itself.
    let due = newest_old + 2_100_000;
    if let Some(wait) = due.checked_sub(now_usec()) {
        std::thread::sleep(Duration::from_micros(wait));
    }

    let options = SinkOptions {
        state_dir: Some(state_dir),
        args: vec!["--retention-seconds".into(), "2".into()],
        ..SinkOptions::default()
    };
    let second = RunningSink::start(options);
    // The first commit after start runs retention; these are younger than 2 s.
    ingest_events(&second, "sd-app", "journal", &events("new", 3)).expect("new events stored");
    ingest_events(&second, "sd-proxy", "journal", &events("other", 2)).expect("stored");

    let left = query_events(second.query_socket(), &EventsQuery::default()).expect("query");
    let messages: Vec<String> =
        left.iter().map(|r| r.event.get_str("MESSAGE").unwrap_or_default().to_owned()).collect();
    assert_eq!(messages.iter().filter(|m| m.starts_with("old")).count(), 0, "{messages:?}");
    assert_eq!(messages.iter().filter(|m| m.starts_with("new")).count(), 3, "{messages:?}");
    assert_eq!(messages.iter().filter(|m| m.starts_with("other")).count(), 2, "{messages:?}");

    let vms = query_vms(second.query_socket()).expect("vms");
    let app = vms.vms.iter().find(|v| v.vm == "sd-app").expect("sd-app is known");
    assert_eq!(app.events_expired, 100);
    assert_eq!(app.events_stored, 3);
    let proxy = vms.vms.iter().find(|v| v.vm == "sd-proxy").expect("sd-proxy is known");
    assert_eq!(proxy.events_expired, 0);
    // The stream's resume point survives retention: the agent must not resend.
    let stream = app.streams.iter().find(|s| s.name == "journal").expect("the stream is known");
    assert_eq!(stream.last_seq, 103);
}
