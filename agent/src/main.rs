//! qlog-agent: forwards this VM's journal or stdin to qlogd in the log VM over qrexec.
//!
//! The binary is thin: it parses the command line ([`config`]), then hands over to
//! [`supervisor::run`]. The modules live in the library (lib.rs), whose documentation is
//! the codemap.

use std::process::ExitCode;

use clap::Parser;
use qlog_agent::{config, supervisor};

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
