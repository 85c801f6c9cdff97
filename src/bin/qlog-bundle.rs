//! `qlog-bundle`: the helper `qlog` replaces itself with to run `qlog export` and `qlog
//! bundle`, so that their code (redaction, age, tar, zstd) is loaded only by the
//! commands that use it. It takes qlog's own command line; see helper.rs.

use std::process::ExitCode;

use clap::Parser;
use qlog::{cli, helper};

fn main() -> ExitCode {
    cli::finish(helper::run_in_helper(cli::Cli::parse()))
}
