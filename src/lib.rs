//! The `qlog` CLI as a library: what the binary (main.rs) runs, so that the fuzz targets
//! (tests/fuzz) can reach the redaction engine. Only [`cli`] (for main.rs) and the parts
//! of [`bundle`] and [`output`] the fuzzers use are public.

#[doc(hidden)]
pub mod bundle;
pub mod cli;
mod client;
mod demo;
mod escape;
mod metrics;
#[doc(hidden)]
pub mod output;
mod stats;
mod timespec;
mod top;
mod verify;
mod vms;
