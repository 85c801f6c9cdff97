//! Health and telemetry, end to end through a real qlogd: silence judged by each VM's
//! promised heartbeat, never-seen expected VMs, rollups that equal the raw events and
//! survive a restart, hostile telemetry values contained, the real agent's samples and
//! qlogd's own metrics under the log qube's name.

use std::collections::BTreeMap;
use std::time::Duration;

use qlog_rpc::fields;
use qlog_rpc::frame::FrameType;
use qlog_rpc::query::{EventsQuery, HealthState, RecordKind, StatsQuery, StatsReply, VmInfo};
use qlog_rpc::telemetry::{Rollup, NO_PRIORITY};
use qlog_rpc::{Event, Heartbeat};
use qlog_tests::workload::Workload;
use qlog_tests::{
    hello, ingest_events, poll_until, query_events, query_stats, query_vms, AgentOptions,
    RawIngest, RunningAgent, RunningSink, SinkOptions,
};

const SINK_NAME: &str = "sd-log";
const WAIT: Duration = Duration::from_secs(60);
const IO: Duration = Duration::from_secs(20);

/// qlogd named `sd-log`, expecting `sd-app` and `sd-never`.
fn sink_with_config(extra: &[&str]) -> RunningSink {
    let dir = std::env::temp_dir().join(format!("qlog-telemetry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("qlogd-{}.toml", extra.len()));
    let text = "expected_vms = [\"sd-app\", \"sd-never\"]\n[health]\nstartup_grace_secs = 2\n";
    std::fs::write(&config, text).unwrap();
    let mut args: Vec<std::ffi::OsString> =
        vec!["--config".into(), config.into(), "--name".into(), SINK_NAME.into()];
    args.extend(extra.iter().map(Into::into));
    RunningSink::start(SinkOptions { args, ..SinkOptions::default() })
}

fn vm(sink: &RunningSink, name: &str) -> Result<VmInfo, String> {
    let table = query_vms(sink.query_socket()).map_err(|e| e.to_string())?;
    table.vms.into_iter().find(|v| v.vm == name).ok_or_else(|| format!("{name} not listed"))
}

fn wait_state(sink: &RunningSink, name: &str, state: HealthState) -> VmInfo {
    poll_until(&format!("{name} to be {}", state.as_str()), WAIT, || {
        let info = vm(sink, name)?;
        if info.health.state == state {
            Ok(info)
        } else {
            Err(format!("{:?}", info.health))
        }
    })
}

/// The health events qlogd stored in its own stream about `about`.
fn health_events(sink: &RunningSink, about: &str) -> Vec<(String, String)> {
    let q = EventsQuery { vms: vec![SINK_NAME.into()], ..EventsQuery::default() };
    let Ok(records) = query_events(sink.query_socket(), &q) else { return Vec::new() };
    records
        .iter()
        .filter(|r| r.event.get(fields::QLOG_HEALTH_VM) == Some(about.as_bytes()))
        .map(|r| {
            let text = |f| String::from_utf8_lossy(r.event.get(f).unwrap_or_default()).into_owned();
            (text(fields::QLOG_HEALTH), text(fields::MESSAGE))
        })
        .collect()
}

fn heartbeat() -> Heartbeat {
    Heartbeat { sent_usec: 1, interval_secs: Some(1) }
}

#[test]
fn silent_after_three_promised_heartbeats_and_back_when_they_return() {
    let sink = sink_with_config(&[]);
    let mut hello = hello("journal");
    hello.heartbeat_interval_secs = Some(1);
    let mut conn = RawIngest::connect(sink.ingest_socket()).unwrap();
    conn.send_descriptor("sd-app", "").unwrap();
    conn.send_hello(&hello).unwrap();
    conn.expect_welcome(IO);
    conn.send_heartbeat(&heartbeat()).unwrap();
    let ok = wait_state(&sink, "sd-app", HealthState::Ok);
    assert_eq!(ok.health.heartbeat_interval_secs, 1);

    // An expected VM that never connects is listed, and said so once in qlogd's stream.
    let never = wait_state(&sink, "sd-never", HealthState::NeverSeen);
    assert!(never.expected && never.health.reasons[0].contains("never connected"));

    // No more heartbeats: silent once three promised intervals pass, with one event.
    let silent = wait_state(&sink, "sd-app", HealthState::Silent);
    assert!(silent.health.reasons[0].contains("every 1 s"), "{:?}", silent.health);
    let events = poll_until("the silence event", WAIT, || {
        let e = health_events(&sink, "sd-app");
        if e.iter().any(|(state, _)| state == "silent") {
            Ok(e)
        } else {
            Err(format!("{e:?}"))
        }
    });
    assert!(events[0].1.contains("sd-app went silent"), "{events:?}");

    // A heartbeat on the same connection brings it back, and that is recorded too.
    conn.send_heartbeat(&heartbeat()).unwrap();
    wait_state(&sink, "sd-app", HealthState::Ok);
    let events = poll_until("the return event", WAIT, || {
        let e = health_events(&sink, "sd-app");
        if e.iter().any(|(state, _)| state == "ok") {
            Ok(e)
        } else {
            Err(format!("{e:?}"))
        }
    });
    assert_eq!(events.iter().filter(|(s, _)| s == "silent").count(), 1, "{events:?}");
    assert!(events.iter().any(|(_, m)| m.contains("talking again")), "{events:?}");
    poll_until("the never-seen event", WAIT, || {
        let e = health_events(&sink, "sd-never");
        if e.iter().any(|(state, _)| state == "never-seen") {
            Ok(())
        } else {
            Err(format!("{e:?}"))
        }
    });
}

fn stats(sink: &RunningSink, vm: &str) -> Rollup {
    try_stats(sink, vm).expect("qlogd answers a stats query")
}

/// All of `vm`'s rollups of the last hour merged; an error before qlogd knows the VM.
fn try_stats(sink: &RunningSink, vm: &str) -> Result<Rollup, String> {
    let now = chrono::Utc::now().timestamp_micros() as u64;
    let q = StatsQuery {
        vms: vec![vm.into()],
        since_usec: now - 3_600_000_000,
        until_usec: now + 60_000_000,
        bucket_minutes: 120,
        gauges: Vec::new(),
    };
    let replies: Vec<StatsReply> =
        query_stats(sink.query_socket(), &q).map_err(|e| e.to_string())?;
    let mut total = Rollup::default();
    for (_, r) in &replies[0].buckets {
        total.merge(r);
    }
    Ok(total)
}

/// What the stored events of `vm` add up to, by priority index.
fn counted(sink: &RunningSink, vm: &str) -> ([u64; 9], [u64; 9]) {
    let q = EventsQuery { vms: vec![vm.into()], ..EventsQuery::default() };
    let mut events = [0u64; 9];
    let mut bytes = [0u64; 9];
    for r in query_events(sink.query_socket(), &q).unwrap() {
        if r.kind != RecordKind::Event {
            continue;
        }
        let p = r
            .event
            .get(fields::PRIORITY)
            .and_then(qlog_rpc::event::priority_digit)
            .map_or(NO_PRIORITY, usize::from);
        events[p] += 1;
        bytes[p] += r.event.payload_len() as u64;
    }
    (events, bytes)
}

#[test]
fn rollups_equal_the_stored_events_and_survive_a_restart() {
    let mut sink = sink_with_config(&[]);
    let mut workload = Workload::new(11, "sd-app");
    let mut batch: Vec<Event> = (0..4_000).map(|_| workload.next_event()).collect();
    // A few without a PRIORITY, and with nonsense in it, land in the "none" bucket.
    for (i, e) in batch.iter_mut().enumerate().take(30) {
        let mut fresh = Event::new();
        for f in &e.fields {
            if f.name != fields::PRIORITY {
                fresh.push(&f.name, f.value.clone());
            }
        }
        if i % 2 == 0 {
            fresh.push(fields::PRIORITY, "nine");
        }
        *e = fresh;
    }
    ingest_events(&sink, "sd-app", "journal", &batch).unwrap();
    let other: Vec<Event> = (0..500).map(|_| Workload::new(12, "sd-web").next_event()).collect();
    ingest_events(&sink, "sd-web", "journal", &other).unwrap();

    let (events, bytes) = counted(&sink, "sd-app");
    assert!(events[NO_PRIORITY] >= 30, "{events:?}");
    let rollup = stats(&sink, "sd-app");
    assert_eq!(rollup.events, events);
    assert_eq!(rollup.bytes, bytes);
    assert_eq!(stats(&sink, "sd-web").total_events(), 500);

    // kill -9 and start again on the same store.
    sink.restart();
    assert_eq!(stats(&sink, "sd-app").events, events, "rollups after a restart");
    // Counting continues from what is stored, within the same minute too.
    ingest_events(&sink, "sd-app", "journal", &batch[..100]).unwrap();
    let (events, bytes) = counted(&sink, "sd-app");
    let rollup = stats(&sink, "sd-app");
    assert_eq!((rollup.events, rollup.bytes), (events, bytes));
    assert_eq!(rollup.total_events(), 4_100);
}

#[test]
fn hostile_telemetry_values_are_contained() {
    let sink = sink_with_config(&[]);
    let (mut conn, _) = RawIngest::handshake(sink.ingest_socket(), "sd-evil", "journal");
    let hostile = [
        r#"{"values":{"load1":-5,"load5":1e308,"load15":"high","mem_used_bytes":1e300,"uptime_secs":null}}"#,
        r#"{"values":{"sink_connections":99999,"agent_lag_secs":-1,"no_such_metric":1,"disk_rw_used_bytes":[1,2]}}"#,
        r#"{"sent_usec":18446744073709551615,"values":{"load1":0.5,"agent_lag_secs":4}}"#,
    ];
    for payload in hostile {
        conn.send_frame(FrameType::Telemetry, payload.as_bytes()).unwrap();
    }
    // Thousands of values in one sample are cut, not aggregated.
    let many: BTreeMap<String, f64> = (0..2_000).map(|i| (format!("m{i:04}"), 1.0)).collect();
    let big = serde_json::json!({ "values": many }).to_string();
    conn.send_frame(FrameType::Telemetry, big.as_bytes()).unwrap();
    // A well-behaved VM beside it.
    let (mut good, _) = RawIngest::handshake(sink.ingest_socket(), "sd-good", "journal");
    good.send_frame(FrameType::Telemetry, br#"{"values":{"load1":1.25}}"#).unwrap();
    conn.send_heartbeat(&heartbeat()).unwrap();

    let evil = poll_until("the hostile samples' rollup", WAIT, || {
        let r = try_stats(&sink, "sd-evil")?;
        if r.gauges.contains_key("load1") && r.telemetry_rejected >= 2_009 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    // Only the plausible values were kept; the rest were counted.
    let names: Vec<&String> = evil.gauges.keys().collect();
    assert_eq!(names, ["agent_lag_secs", "load1"], "{evil:?}");
    assert_eq!(evil.gauges["load1"].max, 0.5);
    assert_eq!(evil.gauges["agent_lag_secs"].last, 4.0);
    assert!(evil.gauges.values().all(|g| g.min.is_finite() && g.max.is_finite()));
    // The connection was not dropped for it, and the good VM's numbers are its own.
    let good_stats = poll_until("the good VM's sample", WAIT, || {
        let r = try_stats(&sink, "sd-good")?;
        r.gauges
            .get("load1")
            .map(|g| g.last)
            .filter(|v| *v == 1.25)
            .map(|_| r)
            .ok_or_else(|| "not yet".to_owned())
    });
    assert_eq!(good_stats.telemetry_rejected, 0);
    assert_eq!(vm(&sink, "sd-evil").unwrap().frames_rejected, 0);
    let event = qlog_tests::workload::Workload::new(1, "sd-evil").next_event();
    conn.send_event(1, &event).unwrap();
    conn.expect_ack(1, IO);
    // Not JSON at all is a bad frame, like any control frame.
    conn.send_frame(FrameType::Telemetry, b"\xff\xfe").unwrap();
    let err = conn.expect_error(IO);
    assert!(err.message.contains("Telemetry"), "{err:?}");
}

#[test]
fn the_agent_reports_its_vm_and_qlogd_reports_itself() {
    let sink = sink_with_config(&[]);
    let agent = RunningAgent::spawn(
        AgentOptions::new(&sink, "sd-app")
            .arg("--source")
            .arg("stdin")
            .arg("--telemetry-interval")
            .arg("1"),
    );
    let rollup = poll_until("the agent's samples", WAIT, || {
        let r = try_stats(&sink, "sd-app")?;
        let read = r.gauges.get("agent_events_read").map_or(0.0, |g| g.last);
        if r.gauges.contains_key("load1") && r.gauges.contains_key("mem_available_bytes") {
            Ok((r, read))
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert!(rollup.0.gauges.contains_key("uptime_secs"));
    assert_eq!(rollup.0.telemetry_rejected, 0, "{:?}", rollup.0);
    // qlogd samples itself every 10 s under the log qube's name.
    let own = poll_until("qlogd's own metrics", WAIT, || {
        let r = try_stats(&sink, SINK_NAME)?;
        if r.gauges.contains_key("sink_connections") {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    for g in ["sink_ingest_events_per_sec", "sink_commit_latency_ms", "sink_store_bytes"] {
        assert!(own.gauges.contains_key(g), "{g} missing: {own:?}");
    }
    assert!(own.gauges["sink_connections"].max >= 1.0);
    let info = vm(&sink, "sd-app").unwrap();
    assert_eq!(info.health.state, HealthState::Ok, "{:?}", info.health);
    assert_eq!(info.health.heartbeat_interval_secs, 30);
    drop(agent);
}
