//! `qlog`: the operator's tool in the log qube. Parses the command line and dispatches;
//! the modules live in the library (lib.rs). `qlog export` and `qlog bundle` go on in
//! the helper binary (src/bin/qlog-bundle.rs), which this one does not link.

use std::process::ExitCode;

use clap::Parser;
use qlog::cli;

fn main() -> ExitCode {
    cli::finish(cli::run(cli::Cli::parse()))
}
