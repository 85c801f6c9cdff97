//! qlog-agent's library: everything the binary runs, as a library so that the fuzz targets
//! (tests/fuzz) can reach the parsers. Only what main.rs and the fuzzers use is public.
//!
//! The binary (main.rs) is thin: it parses the command line ([`config`]), then hands over
//! to [`supervisor::run`]. The codemap, along the path an event takes:
//!
//! - [`source`] reads journalctl or stdin, through [`export`] and [`input`] (parsers),
//!   [`filter`] (what is forwarded) and [`limits`] (cutting to the sink's limits);
//! - [`window`] numbers events and holds them until acknowledged, behind [`shared`];
//! - [`transport`] runs `qrexec-client-vm`, writes frames and reads acks;
//! - [`supervisor`] reconnects with [`backoff`] and owns shutdown, fed by [`signals`];
//! - [`process`] is how children start and die, and [`log`] is how the agent speaks.
//!
//! Invariants: the agent keeps nothing on disk; it never opens a socket; it never sends
//! an item past one that is unacknowledged without replaying that one first; wire types
//! come only from `qlog_rpc`.

mod backoff;
pub mod config;
#[doc(hidden)]
pub mod export;
mod filter;
mod input;
#[doc(hidden)]
pub mod limits;
mod log;
mod process;
mod shared;
mod signals;
mod source;
pub mod supervisor;
mod telemetry;
mod transport;
mod window;
