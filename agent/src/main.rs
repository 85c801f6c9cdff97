//! qlog-agent: forwards this VM's journal or stdin to qlogd in the log VM over qrexec.
//!
//! The binary is thin: it parses the command line ([`config`]), then hands over to
//! [`supervisor::run`]. The codemap, along the path an event takes:
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
mod config;
mod export;
mod filter;
mod input;
mod limits;
mod log;
mod process;
mod shared;
mod signals;
mod source;
mod supervisor;
mod transport;
mod window;

use std::process::ExitCode;

use clap::Parser;

/// Exit status for an invalid configuration, as clap uses for usage errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args = config::Args::parse();
    let qubesdb = config::system_qubesdb();
    let config = match config::Config::from_args(args, &qubesdb) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("qlog-agent: error: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match supervisor::run(config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qlog-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
