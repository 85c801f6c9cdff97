//! qlogd, the qlog sink: ingest from qrexec, durable per-VM storage, local queries.
//!
//! Data flows one way through these modules:
//!
//! ```text
//! ingest (one task per qrexec connection)
//!   -> committer (one thread: dedup, quotas, group commit)
//!     -> store (sled; the only module that touches it)
//!     -> shared (published accounting and the live feed)
//!       -> query (the CLI's socket: history from the store, follow from the feed)
//! ```
//!
//! `daemon` wires them together and owns shutdown; `log_events` is the list of what
//! qlogd can say to an operator. Beside the data path, the committer keeps per-minute
//! telemetry `rollup`s and judges every VM's `health`.

pub mod batch;
pub mod chain;
pub mod committer;
pub mod config;
pub mod daemon;
pub mod filter;
pub mod health;
pub mod ingest;
pub mod log_events;
pub mod lz4hc;
pub mod notify;
pub mod query;
pub mod rate_limit;
pub mod rollup;
pub mod shared;
pub mod store;
