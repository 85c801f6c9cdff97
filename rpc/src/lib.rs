//! The qlog wire protocol, shared by the agent, the sink and the CLI.
//!
//! Owns every type that crosses a process boundary: the qrexec service descriptor
//! ([`descriptor`]), the length-prefixed frame layer ([`frame`]), journald-style events
//! ([`event`]), the ingest handshake and control messages ([`message`]), the local query
//! plane ([`query`]), telemetry samples and rollups ([`telemetry`]) and the hard limits that bound all of them ([`limits`]).
//!
//! Nothing here does IO or depends on an async runtime: callers feed bytes in and take
//! frames out, so the same code serves the blocking agent, the tokio sink and the fuzzers.
//! The byte-level layout is specified in `rpc/PROTOCOL.md`.

pub mod descriptor;
pub mod event;
pub mod fields;
pub mod frame;
pub mod glob;
pub mod limits;
pub mod message;
pub mod query;
pub mod telemetry;

pub use event::{Event, Field, FieldNameError};
pub use frame::{Frame, FrameDecoder, FrameError, FrameType};
pub use limits::Limits;
pub use message::{
    Ack, End, ErrorCode, ErrorFrame, Gap, Heartbeat, Hello, MessageError, ResumePoint, Welcome,
};

/// The ingest protocol versions this build speaks, oldest first.
///
/// Version 1 is the first and only version so far; the handshake picks the highest version
/// both sides support, so a later version can be added without breaking old agents.
pub const PROTOCOL_VERSIONS: &[u16] = &[1];

/// The qrexec service name the sink answers to.
pub const INGEST_SERVICE: &str = "qlog.Ingest";
