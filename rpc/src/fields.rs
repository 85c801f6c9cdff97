//! Field names with a meaning to qlog, defined once so no crate retypes them.
//!
//! Names under [`TRUSTED_PREFIX`] are set only by the sink. A source VM that sends one has
//! it renamed under [`CLAIMED_PREFIX`] (see [`crate::event::Event::quarantine_trusted`]).

/// Prefix of the fields only the sink may set.
pub const TRUSTED_PREFIX: &str = "_QLOG_";
/// What a VM-sent field under [`TRUSTED_PREFIX`] is renamed to, keeping its value.
pub const CLAIMED_PREFIX: &str = "CLAIMED_QLOG_";

/// The source VM, from the qrexec descriptor.
pub const QLOG_VM: &str = "_QLOG_VM";
/// The sink's receive time, microseconds since the Unix epoch.
pub const QLOG_RECEIVED_USEC: &str = "_QLOG_RECEIVED_USEC";
/// The stream name the agent announced in its hello.
pub const QLOG_STREAM: &str = "_QLOG_STREAM";
/// The per-stream sequence number the agent gave the event.
pub const QLOG_SEQ: &str = "_QLOG_SEQ";
/// Set on gap records: why events are missing (`quota`, `retention`, `agent`, `seq`, ...).
pub const QLOG_GAP: &str = "_QLOG_GAP";
/// Set on gap records: how many events are missing, where that is known.
pub const QLOG_GAP_COUNT: &str = "_QLOG_GAP_COUNT";
/// Set on qlogd's health events: the state a VM entered (`silent`, `ok`, `never-seen`).
pub const QLOG_HEALTH: &str = "_QLOG_HEALTH";
/// Set on qlogd's health events: the VM the event is about.
pub const QLOG_HEALTH_VM: &str = "_QLOG_HEALTH_VM";

pub const MESSAGE: &str = "MESSAGE";
pub const PRIORITY: &str = "PRIORITY";
pub const SYSLOG_IDENTIFIER: &str = "SYSLOG_IDENTIFIER";
pub const SYSTEMD_UNIT: &str = "_SYSTEMD_UNIT";
pub const HOSTNAME: &str = "_HOSTNAME";
pub const REALTIME_TIMESTAMP: &str = "__REALTIME_TIMESTAMP";
pub const MONOTONIC_TIMESTAMP: &str = "__MONOTONIC_TIMESTAMP";
pub const CURSOR: &str = "__CURSOR";
pub const BOOT_ID: &str = "_BOOT_ID";
pub const SOURCE_REALTIME_TIMESTAMP: &str = "_SOURCE_REALTIME_TIMESTAMP";

/// Set by the agent on an event it had to cut to fit the limits: `NAME:original length`
/// per cut value, or `fields:count` when fields were dropped.
pub const QLOG_TRUNCATED: &str = "QLOG_TRUNCATED";
/// Set by the agent on an input line it could not parse; the line itself is MESSAGE.
pub const QLOG_PARSE_ERROR: &str = "QLOG_PARSE_ERROR";
