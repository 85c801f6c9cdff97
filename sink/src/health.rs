//! Per-VM health: which VMs are talking, which went quiet, which flood or lag.
//!
//! The committer thread owns a [`HealthBook`] and feeds it everything it hears: handshakes
//! (with the heartbeat interval the agent promised), heartbeats, chunks, telemetry lag
//! and per-minute counts. Once a second it [`HealthBook::evaluate`]s every known VM and
//! publishes the result for `qlog vms`; the transitions into and out of silence come back
//! as [`Transition`]s, which the committer stores as events in its own stream so that
//! `qlog tail` shows them.
//!
//! Silence is judged by the interval each VM promised, so a VM configured to beat every
//! 5 s is silent after 15 s and one beating every 60 s after 3 minutes.

use std::collections::{BTreeMap, HashMap, VecDeque};

use qlog_rpc::query::{Health, HealthState};

use crate::rollup::minute_of;
use crate::store::VmState;

/// Heartbeat interval assumed for an agent that promised none.
pub const DEFAULT_HEARTBEAT_SECS: u32 = 30;
/// Silence is this many promised intervals without a word.
const SILENT_AFTER_INTERVALS: u64 = 3;
/// Minutes of per-minute counts kept: the last hour, for the gap window and the baseline.
const WINDOW_MINUTES: u64 = 60;

#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// VMs that should be sending.
    pub expected: Vec<String>,
    /// The log qube's own name, under which qlogd records itself; never silent.
    pub sink_name: String,
    /// An agent reporting a lag above this is lagging.
    pub lag_secs: f64,
    /// A VM is flooding above `flood_factor` times its own last-hour average rate per
    /// minute, but never below `flood_floor_per_minute`.
    pub flood_factor: f64,
    pub flood_floor_per_minute: u64,
    /// How long after qlogd starts an expected VM may take to connect before it is
    /// reported never seen, and a stored VM to say anything before it is silent. By
    /// default, three default heartbeat intervals.
    pub startup_grace_secs: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            expected: Vec::new(),
            sink_name: "qlogd".into(),
            lag_secs: 120.0,
            flood_factor: 10.0,
            flood_floor_per_minute: 6_000,
            startup_grace_secs: u64::from(DEFAULT_HEARTBEAT_SECS) * SILENT_AFTER_INTERVALS,
        }
    }
}

/// Counts of one VM in one receive-time minute.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    minute: u64,
    events: u64,
    gaps: u64,
    refused: u64,
}

#[derive(Debug, Default)]
struct Liveness {
    last_heard_usec: u64,
    heartbeat_secs: Option<u32>,
    /// The silence transition was recorded and the return is not yet.
    silent_since_usec: Option<u64>,
    never_seen_reported: bool,
    tallies: VecDeque<Tally>,
    lag_secs: Option<f64>,
}

impl Liveness {
    fn tally(&mut self, usec: u64) -> &mut Tally {
        let minute = minute_of(usec);
        if self.tallies.back().is_none_or(|t| t.minute < minute) {
            self.tallies.push_back(Tally { minute, ..Tally::default() });
            while self.tallies.front().is_some_and(|t| t.minute + WINDOW_MINUTES < minute) {
                self.tallies.pop_front();
            }
        }
        // Receive times never go backwards in the committer, so the last one is current.
        self.tallies.back_mut().expect("just pushed")
    }
}

/// A change worth an event in qlogd's own stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Silent { vm: String, quiet_secs: u64, interval_secs: u32 },
    Back { vm: String, quiet_secs: u64 },
    NeverSeen { vm: String },
}

pub struct HealthBook {
    settings: HealthSettings,
    started_usec: u64,
    vms: HashMap<String, Liveness>,
}

impl HealthBook {
    pub fn new(settings: HealthSettings, started_usec: u64) -> HealthBook {
        HealthBook { settings, started_usec, vms: HashMap::new() }
    }

    fn vm(&mut self, vm: &str) -> &mut Liveness {
        self.vms.entry(vm.to_owned()).or_default()
    }

    /// A connection from `vm` finished its handshake, promising heartbeats every
    /// `heartbeat_secs` (clamped to 1 s .. 1 h).
    pub fn hello(&mut self, vm: &str, heartbeat_secs: Option<u32>, now: u64) {
        let l = self.vm(vm);
        l.heartbeat_secs = heartbeat_secs.map(|s| s.clamp(1, 3600));
        l.last_heard_usec = l.last_heard_usec.max(now);
    }

    /// Anything at all arrived from `vm`.
    pub fn heard(&mut self, vm: &str, now: u64) {
        let l = self.vm(vm);
        l.last_heard_usec = l.last_heard_usec.max(now);
    }

    pub fn count(&mut self, vm: &str, usec: u64, events: u64, gaps: u64, refused: u64) {
        let t = self.vm(vm).tally(usec);
        t.events += events;
        t.gaps += gaps;
        t.refused += refused;
    }

    pub fn lag(&mut self, vm: &str, lag_secs: f64) {
        self.vm(vm).lag_secs = Some(lag_secs);
    }

    /// Judges every VM in `stored` (what the store knows) and every expected VM, and
    /// returns their health and the transitions since the last call.
    pub fn evaluate(
        &mut self,
        now: u64,
        stored: &HashMap<String, VmState>,
    ) -> (BTreeMap<String, Health>, Vec<Transition>) {
        let mut names: Vec<String> = stored.keys().cloned().collect();
        names.extend(self.settings.expected.iter().cloned());
        names.extend(self.vms.keys().cloned());
        names.sort();
        names.dedup();
        let mut out = BTreeMap::new();
        let mut transitions = Vec::new();
        let settings = self.settings.clone();
        let started = self.started_usec;
        let grace = settings.startup_grace_secs.saturating_mul(1_000_000);
        for name in names {
            // qlogd itself is listed once it has stored something, like any VM.
            if name == settings.sink_name && !stored.contains_key(&name) {
                continue;
            }
            let first_seen = stored.get(&name).map_or(0, |s| s.first_seen_usec);
            let l = self.vm(&name);
            let interval = l.heartbeat_secs.unwrap_or(DEFAULT_HEARTBEAT_SECS);
            let mut conditions: Vec<(HealthState, String)> = Vec::new();
            let heard = l.last_heard_usec;
            if name == settings.sink_name {
                // Ourselves: alive by definition while this runs.
            } else if heard == 0 && first_seen == 0 {
                if settings.expected.contains(&name) {
                    conditions.push((
                        HealthState::NeverSeen,
                        "expected, but it has never connected".to_owned(),
                    ));
                    if !l.never_seen_reported && now.saturating_sub(started) > grace {
                        l.never_seen_reported = true;
                        transitions.push(Transition::NeverSeen { vm: name.clone() });
                    }
                }
            } else {
                // Before this run heard from it, count from our own start: a restart of
                // qlogd must not make every VM silent at once.
                let (since, limit) =
                    if heard > 0 { (heard, silence_usec(interval)) } else { (started, grace) };
                let quiet = now.saturating_sub(since);
                if quiet > limit {
                    let quiet_secs = quiet / 1_000_000;
                    conditions.push((
                        HealthState::Silent,
                        format!(
                            "nothing heard for {} (it promised a heartbeat every {interval} s)",
                            human_secs(quiet_secs)
                        ),
                    ));
                    if l.silent_since_usec.is_none() {
                        l.silent_since_usec = Some(since);
                        transitions.push(Transition::Silent {
                            vm: name.clone(),
                            quiet_secs,
                            interval_secs: interval,
                        });
                    }
                } else if let Some(since) = l.silent_since_usec.take() {
                    let quiet_secs = heard.saturating_sub(since) / 1_000_000;
                    transitions.push(Transition::Back { vm: name.clone(), quiet_secs });
                }
            }
            flooding(l, now, &settings, &mut conditions);
            if let Some(lag) = l.lag_secs.filter(|lag| *lag > settings.lag_secs) {
                conditions.push((
                    HealthState::Lagging,
                    format!(
                        "its agent has events unacknowledged for {} (limit {} s)",
                        human_secs(lag as u64),
                        settings.lag_secs
                    ),
                ));
            }
            let this_minute = minute_of(now);
            let gaps: u64 = l
                .tallies
                .iter()
                .filter(|t| t.minute + WINDOW_MINUTES > this_minute)
                .map(|t| t.gaps)
                .sum();
            if gaps > 0 {
                conditions.push((
                    HealthState::Gaps,
                    format!("{gaps} gap records in the last hour: events were lost before they were stored"),
                ));
            }
            conditions.sort_by_key(|c| c.0);
            let health = Health {
                state: conditions.first().map_or(HealthState::Ok, |c| c.0),
                reasons: conditions.into_iter().map(|c| c.1).collect(),
                last_heard_usec: heard,
                heartbeat_interval_secs: interval,
            };
            out.insert(name, health);
        }
        (out, transitions)
    }
}

fn silence_usec(interval_secs: u32) -> u64 {
    u64::from(interval_secs) * SILENT_AFTER_INTERVALS * 1_000_000
}

fn flooding(
    l: &Liveness,
    now: u64,
    settings: &HealthSettings,
    conditions: &mut Vec<(HealthState, String)>,
) {
    let minute = minute_of(now);
    let recent = |back: u64| {
        l.tallies.iter().find(|t| t.minute + back == minute).copied().unwrap_or_default()
    };
    let (current, previous) = (recent(0), recent(1));
    let refused = current.refused + previous.refused;
    if refused > 0 {
        conditions.push((
            HealthState::Flooding,
            format!("{refused} events refused by its rate limit in the last two minutes"),
        ));
        return;
    }
    // The baseline is the average over the rest of the hour, missing minutes counting as
    // quiet ones, so a VM that is usually silent and suddenly bursts is noticed.
    let older: u64 =
        l.tallies.iter().filter(|t| t.minute + 1 < minute).map(|t| t.events).sum::<u64>();
    let baseline = older as f64 / (WINDOW_MINUTES - 1) as f64;
    let limit = (baseline * settings.flood_factor).max(settings.flood_floor_per_minute as f64);
    let rate = current.events.max(previous.events);
    if rate as f64 > limit {
        conditions.push((
            HealthState::Flooding,
            format!(
                "{rate} events in a minute, over {limit:.0} ({}x its last-hour average of {baseline:.0})",
                settings.flood_factor
            ),
        ));
    }
}

/// `95 s`, `4 min 10 s`, `3 h 2 min`.
pub fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const T0: u64 = 1_800_000_000 * S;

    fn book() -> HealthBook {
        let settings = HealthSettings {
            expected: vec!["sd-app".into(), "sd-never".into()],
            sink_name: "sd-log".into(),
            ..HealthSettings::default()
        };
        HealthBook::new(settings, T0)
    }

    #[test]
    fn silent_after_three_promised_intervals_and_back_when_heard() {
        let mut b = book();
        let stored = HashMap::new();
        b.hello("sd-app", Some(5), T0);
        let (h, t) = b.evaluate(T0 + 14 * S, &stored);
        assert_eq!(h["sd-app"].state, HealthState::Ok);
        assert!(t.is_empty());
        let (h, t) = b.evaluate(T0 + 16 * S, &stored);
        assert_eq!(h["sd-app"].state, HealthState::Silent, "{:?}", h["sd-app"]);
        assert!(matches!(&t[0], Transition::Silent { vm, interval_secs: 5, .. } if vm == "sd-app"));
        // Once per silence, not once per evaluation.
        assert!(b.evaluate(T0 + 20 * S, &stored).1.is_empty());
        b.heard("sd-app", T0 + 30 * S);
        let (h, t) = b.evaluate(T0 + 31 * S, &stored);
        assert_eq!(h["sd-app"].state, HealthState::Ok);
        assert_eq!(t, vec![Transition::Back { vm: "sd-app".into(), quiet_secs: 30 }]);
    }

    #[test]
    fn expected_vm_never_connected_is_never_seen_and_we_are_never_silent() {
        let mut b = book();
        let (h, t) = b.evaluate(T0 + 3600 * S, &HashMap::new());
        assert_eq!(h["sd-never"].state, HealthState::NeverSeen);
        assert!(t.contains(&Transition::NeverSeen { vm: "sd-never".into() }));
        assert!(!h.contains_key("sd-log"), "listed only once it stored something");
        let stored = HashMap::from([("sd-log".to_string(), VmState::default())]);
        assert_eq!(b.evaluate(T0 + 7200 * S, &stored).0["sd-log"].state, HealthState::Ok);
    }

    #[test]
    fn a_restart_gives_stored_vms_a_grace_period() {
        let mut b = book();
        let stored = HashMap::from([(
            "sd-old".to_string(),
            VmState { first_seen_usec: T0 - 86_400 * S, ..VmState::default() },
        )]);
        assert_eq!(b.evaluate(T0 + 60 * S, &stored).0["sd-old"].state, HealthState::Ok);
        assert_eq!(b.evaluate(T0 + 91 * S, &stored).0["sd-old"].state, HealthState::Silent);
    }

    #[test]
    fn flooding_lagging_and_gaps() {
        let mut b = book();
        let stored = HashMap::new();
        let now = T0 + 10 * 60 * S;
        b.heard("sd-flood", now);
        b.count("sd-flood", now, 50_000, 0, 0);
        b.heard("sd-limited", now);
        b.count("sd-limited", now, 10, 0, 3);
        b.heard("sd-lag", now);
        b.lag("sd-lag", 500.0);
        b.heard("sd-gap", now);
        b.count("sd-gap", now - 20 * 60 * S, 1, 1, 0);
        let (h, _) = b.evaluate(now, &stored);
        assert_eq!(h["sd-flood"].state, HealthState::Flooding);
        assert_eq!(h["sd-limited"].state, HealthState::Flooding);
        assert!(h["sd-limited"].reasons[0].contains("3 events refused"));
        assert_eq!(h["sd-lag"].state, HealthState::Lagging);
        assert_eq!(h["sd-gap"].state, HealthState::Gaps);
        // A steady high rate is its own baseline, not a flood.
        let mut steady = book();
        for m in 0..60 {
            steady.count("sd-busy", now - (59 - m) * 60 * S, 20_000, 0, 0);
        }
        steady.heard("sd-busy", now);
        assert_eq!(steady.evaluate(now, &stored).0["sd-busy"].state, HealthState::Ok);
    }
}
