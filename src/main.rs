//! `qlog`: the operator's tool in the log qube. Parses the command line and dispatches;
//! the modules live in the library (lib.rs).

use std::process::ExitCode;

use clap::Parser;
use qlog::cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            // A closed pipe (`qlog query | head`) is the reader's choice, not a failure.
            let broken_pipe = error
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("qlog: {error:#}");
            ExitCode::FAILURE
        }
    }
}
