//! Ingest control messages: the handshake, acks, end of stream, gaps, heartbeats, errors.
//!
//! Control frames carry JSON so fields can be added without a new protocol version
//! (unknown fields are ignored); the hot-path frames (`Ack`, `End`) are a bare `u64`.
//! serde_json's recursion limit and the control-frame size limit bound what a hostile
//! peer can make the parser do.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{encode_to_vec, FrameType};
use crate::limits::Limits;

/// Longest stream name an agent may announce.
pub const MAX_STREAM_NAME_LEN: usize = 64;

/// The stream name of records the sink writes itself; agents may not use it.
pub const SINK_STREAM: &str = "qlogd";

/// The stream name agents use when none is given.
pub const DEFAULT_STREAM: &str = "journal";

#[derive(Debug, Error)]
pub enum MessageError {
    #[error("{ty:?} frame is not valid JSON for its type: {source}")]
    BadJson { ty: FrameType, source: serde_json::Error },
    #[error("{ty:?} frame must be {expected} bytes, got {len}")]
    BadLength { ty: FrameType, expected: usize, len: usize },
    #[error("stream name {name:?} is invalid: use 1 to 64 of A-Z a-z 0-9 _ . - (and not \"qlogd\", which the sink uses)")]
    BadStreamName { name: String },
    #[error("no common protocol version: peer offers {offered:?}, we speak {ours:?}")]
    NoCommonVersion { offered: Vec<u16>, ours: Vec<u16> },
}

/// First frame from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the agent speaks.
    pub versions: Vec<u16>,
    /// Free text naming the agent build, for the sink's logs.
    pub agent: String,
    /// Which stream of this VM the connection carries; one VM may run several agents.
    pub stream: String,
    /// The limits the agent itself can handle; the sink answers with the intersection.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Seconds between heartbeats the agent promises; the sink judges silence by it.
    #[serde(default)]
    pub heartbeat_interval_secs: Option<u32>,
    /// Seconds between telemetry samples the agent promises; `None` sends none.
    #[serde(default)]
    pub telemetry_interval_secs: Option<u32>,
}

/// The sink's answer to a valid hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides now speak.
    pub version: u16,
    /// Free text naming the sink build.
    pub sink: String,
    /// The source VM as qrexec named it: the identity every event will be stored under.
    pub vm: String,
    pub stream: String,
    /// Limits the agent must respect for the rest of the connection.
    pub limits: Limits,
    /// Where the agent resumes: everything up to here is durably stored.
    pub resume: ResumePoint,
}

/// The last durably stored position of one (VM, stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Highest sequence number stored; 0 if the stream is new. The next event is `last_seq+1`.
    pub last_seq: u64,
    /// The `__CURSOR` of the last event stored with one, if the latest event had one. A
    /// gap record keeps the previous cursor; an event without a cursor clears it.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Cumulative acknowledgement: every event up to and including `seq` is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
}

/// End of stream. From the agent: nothing follows `last_seq`. From the sink: the reply
/// once `last_seq` is durable, after which the sink closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub last_seq: u64,
}

/// Events the agent knows are missing, stored as a gap record in their place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The sequence number this gap record takes, like an event.
    pub seq: u64,
    /// A short machine-readable reason: `cursor-lost`, `agent-restart`, `filtered`, ...
    pub reason: String,
    /// How many events are missing, where the agent knows.
    #[serde(default)]
    pub missed: Option<u64>,
    /// Human-readable detail.
    #[serde(default)]
    pub detail: String,
}

/// Liveness signal from the agent; not stored as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's clock, microseconds since the epoch: a claim, kept beside our own time.
    pub sent_usec: u64,
    #[serde(default)]
    pub interval_secs: Option<u32>,
}

/// What went wrong, in a form a program can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadDescriptor,
    UnsupportedVersion,
    BadHello,
    BadFrame,
    UnexpectedFrame,
    BadEvent,
    SequenceNotIncreasing,
    TooManyConnections,
    /// The stream sent nothing for longer than its heartbeat promise allows.
    IdleTimeout,
    ShuttingDown,
    BadQuery,
    UnknownVm,
    Internal,
    /// An error code from a newer peer.
    #[serde(other)]
    Other,
}

/// Sent before closing a connection on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

/// Checks a stream name: 1 to 64 of `A-Z a-z 0-9 _ . -`.
pub fn validate_stream_name(name: &str) -> Result<(), MessageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_STREAM_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok && name != SINK_STREAM {
        Ok(())
    } else {
        let name: String = name.chars().take(MAX_STREAM_NAME_LEN).collect();
        Err(MessageError::BadStreamName { name })
    }
}

/// Picks the highest version both sides speak.
pub fn negotiate_version(offered: &[u16]) -> Result<u16, MessageError> {
    crate::PROTOCOL_VERSIONS.iter().rev().find(|v| offered.contains(v)).copied().ok_or_else(|| {
        MessageError::NoCommonVersion {
            offered: offered.iter().take(16).copied().collect(),
            ours: crate::PROTOCOL_VERSIONS.to_vec(),
        }
    })
}

/// Serialises a control message into a whole frame.
pub fn encode_json<T: Serialize>(ty: FrameType, msg: &T) -> Vec<u8> {
    let payload = serde_json::to_vec(msg).expect("control messages always serialise");
    encode_to_vec(ty, &payload)
}

/// Parses a control frame's payload.
pub fn decode_json<T: DeserializeOwned>(ty: FrameType, payload: &[u8]) -> Result<T, MessageError> {
    serde_json::from_slice(payload).map_err(|source| MessageError::BadJson { ty, source })
}

/// Encodes an `Ack` or `End` frame, whose payload is one big-endian `u64`.
pub fn encode_u64(ty: FrameType, value: u64) -> Vec<u8> {
    encode_to_vec(ty, &value.to_be_bytes())
}

/// Decodes the payload of an `Ack` or `End` frame.
pub fn decode_u64(ty: FrameType, payload: &[u8]) -> Result<u64, MessageError> {
    let bytes: [u8; 8] = payload.try_into().map_err(|_| MessageError::BadLength {
        ty,
        expected: 8,
        len: payload.len(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame { code, message: message.into() }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_json(FrameType::Error, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;

    #[test]
    fn hello_round_trips_and_ignores_unknown_fields() {
        let hello = Hello {
            versions: vec![1],
            agent: "qlog-agent/0.1".into(),
            stream: "journal".into(),
            limits: None,
            heartbeat_interval_secs: Some(30),
            telemetry_interval_secs: None,
        };
        let wire = encode_json(FrameType::Hello, &hello);
        let mut dec = FrameDecoder::new(Limits::DEFAULT);
        dec.feed(&wire);
        let frame = dec.next_frame().unwrap().unwrap();
        let back: Hello = decode_json(frame.ty, &frame.payload).unwrap();
        assert_eq!(back, hello);

        let newer = br#"{"versions":[1,2],"agent":"x","stream":"s","future":{"a":1}}"#;
        let back: Hello = decode_json(FrameType::Hello, newer).unwrap();
        assert_eq!(negotiate_version(&back.versions).unwrap(), 1);
    }

    #[test]
    fn rejects_deeply_nested_json() {
        let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(decode_json::<Hello>(FrameType::Hello, nested.as_bytes()).is_err());
    }

    #[test]
    fn negotiation_fails_without_common_version() {
        assert!(matches!(negotiate_version(&[7, 8]), Err(MessageError::NoCommonVersion { .. })));
    }

    #[test]
    fn validates_stream_names() {
        assert!(validate_stream_name("journal").is_ok());
        assert!(validate_stream_name("app.log-2_x").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65), "\u{1b}[2J", SINK_STREAM] {
            assert!(validate_stream_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn u64_frames_check_their_length() {
        assert_eq!(decode_u64(FrameType::Ack, &5u64.to_be_bytes()).unwrap(), 5);
        assert!(decode_u64(FrameType::Ack, &[1, 2, 3]).is_err());
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_still_parse() {
        let e: ErrorFrame =
            decode_json(FrameType::Error, br#"{"code":"brand-new","message":"m"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Other);
    }
}
