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
//! qlogd can say to an operator.

pub mod committer;
pub mod config;
pub mod daemon;
pub mod filter;
pub mod ingest;
pub mod log_events;
pub mod notify;
pub mod query;
pub mod shared;
pub mod store;
