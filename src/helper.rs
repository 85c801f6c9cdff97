//! The split between `qlog` and its helper binary `qlog-bundle`, which runs `qlog export`
//! and `qlog bundle`.
//!
//! Writing and checking a support bundle needs the redaction engine, age, tar and zstd:
//! more than half of the CLI's code, and most of the pointers the loader has to relocate
//! at every process start. `qlog tail` and `qlog query` are started often and answer in
//! a few milliseconds, so they should not pay for that code. `qlog` parses the command
//! line with the full definitions (help, completions and man pages stay whole) and, for
//! the two bundle commands, replaces itself with the helper, giving it the same
//! arguments. The helper parses them with the same definitions and runs the command, so
//! behaviour, output and exit codes are the helper's and nothing is lost in between.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail};

use crate::cli::{Cli, Command};

/// The helper's file name.
const HELPER: &str = "qlog-bundle";

/// Where the helper may be, in the order tried: beside the running binary (a cargo
/// target directory, or a package that installs both in one place), then in the
/// package's library directory, which is where the Debian package puts it
/// (`/usr/bin/qlog` looks in `/usr/lib/qlog/`).
fn helper_candidates(exe: &Path) -> Vec<PathBuf> {
    let Some(dir) = exe.parent() else { return Vec::new() };
    let mut found = vec![dir.join(HELPER)];
    if let Some(prefix) = dir.parent() {
        found.push(prefix.join("lib/qlog").join(HELPER));
    }
    found
}

/// Replaces this process with the helper, given this process's own arguments. It
/// returns only when that cannot be done, with the reason.
pub fn exec_helper() -> anyhow::Error {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow!("cannot find where qlog runs from, to start {HELPER}: {e}"),
    };
    let candidates = helper_candidates(&exe);
    let Some(helper) = candidates.iter().find(|path| path.is_file()) else {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return anyhow!(
            "qlog export and qlog bundle run the helper {HELPER}, which is not installed \
             (looked for {}); reinstall the qlog-sink package, or build the workspace \
             with cargo build --workspace",
            looked.join(" and ")
        );
    };
    // exec only returns on failure; the helper's messages then say "qlog" too.
    let error =
        std::process::Command::new(helper).arg0("qlog").args(std::env::args_os().skip(1)).exec();
    anyhow!("cannot start {}: {error}", helper.display())
}

/// What `qlog-bundle` runs: the bundle commands, and nothing else.
pub fn run_in_helper(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Export(args) => crate::bundle::export(&cli.socket, &args),
        Command::Bundle { command } => crate::bundle::bundle(&command),
        _ => bail!("{HELPER} runs only qlog export and qlog bundle; run qlog for the others"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_is_looked_for_beside_qlog_then_in_the_library_directory() {
        assert_eq!(
            helper_candidates(Path::new("/usr/bin/qlog")),
            [PathBuf::from("/usr/bin/qlog-bundle"), PathBuf::from("/usr/lib/qlog/qlog-bundle")]
        );
        assert_eq!(
            helper_candidates(Path::new("/w/target/release/qlog"))[0],
            PathBuf::from("/w/target/release/qlog-bundle")
        );
    }
}
