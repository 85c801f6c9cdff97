//! Hard limits on everything a peer can make the other side allocate.
//!
//! Every decoder in this crate checks a length against these limits before it allocates
//! for it, so a hostile peer can make us hold at most one frame of `max_frame_len` bytes
//! per connection.

use serde::{Deserialize, Serialize};

/// Size limits for frames and events, announced by the sink in its welcome.
///
/// By default, an event may carry 1,024 fields of up to 48 KiB each, and no frame may
/// exceed 1 MiB; journald's own per-field guidance is 48 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame payload (type byte excluded) either side accepts.
    pub max_frame_len: u32,
    /// Largest payload of a JSON control frame (hello, welcome, error, gap, heartbeat).
    pub max_control_len: u32,
    /// Most fields one event may carry.
    pub max_fields: u32,
    /// Longest field value in bytes.
    pub max_value_len: u32,
    /// Longest field name in bytes (journald allows 64).
    pub max_name_len: u32,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_frame_len: 1024 * 1024,
        max_control_len: 64 * 1024,
        max_fields: 1024,
        max_value_len: 48 * 1024,
        max_name_len: 64,
    };

    /// The limits both sides can live with: the smaller of each pair.
    pub fn intersect(self, other: Limits) -> Limits {
        Limits {
            max_frame_len: self.max_frame_len.min(other.max_frame_len),
            max_control_len: self.max_control_len.min(other.max_control_len),
            max_fields: self.max_fields.min(other.max_fields),
            max_value_len: self.max_value_len.min(other.max_value_len),
            max_name_len: self.max_name_len.min(other.max_name_len),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}
