//! The `qlog` CLI as a library: what the binaries run (main.rs, and bin/qlog-bundle.rs
//! for the bundle commands, see [`helper`]), so that the fuzz targets (tests/fuzz) can
//! reach the redaction engine. Only [`cli`] and [`helper`] (for the binaries) and the
//! parts of [`bundle`] and [`output`] the fuzzers use are public.

#[doc(hidden)]
pub mod bundle;
pub mod cli;
mod client;
mod demo;
mod escape;
pub mod helper;
mod metrics;
#[doc(hidden)]
pub mod output;
mod stats;
mod timespec;
mod top;
mod verify;
mod vms;
