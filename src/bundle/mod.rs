//! Redacted support bundles: `qlog export`, `qlog bundle verify`, `qlog bundle inspect`.
//!
//! A bundle is one file an operator can hand to a support team: the events they asked
//! for, with everything that identifies a person, a machine or a place replaced by
//! consistent keyed tokens, plus the VM health table, a readable report and a manifest
//! that lets the receiver check it is complete and unchanged.
//!
//! # Format (version 1)
//!
//! A ustar archive compressed with zstd (`.tar.zst`); with `--encrypt-to`, that whole
//! file encrypted with age (binary age format). Entries, in this order:
//!
//! - `manifest.json`, always first: version, creation time, time range, VMs and their
//!   record counts, the SHA-256 and size of every other entry, the redaction profile and
//!   how often each rule fired (never a value);
//! - `events/NAME.export` with `--with-export`: the records in the journal export format;
//! - `events/NAME.jsonl`, one per VM: one JSON object per record, as `qlog query -o json`
//!   prints it, after redaction;
//! - `report.html`: one self-contained page with per-VM event-rate charts and the most
//!   frequent errors;
//! - `vms.json`: the `qlog vms --json` table, redacted.
//!
//! NAME is the VM's name in the bundle: a `vm-` token, or the name itself if the profile
//! allowlists it. Tar headers carry mode 0644, uid and gid 0, no owner names and the
//! creation time as mtime; JSON keys are sorted. So the same store, key and options give
//! the same bytes, once the creation time is pinned with `--created-at` or
//! `SOURCE_DATE_EPOCH` (it is in the manifest). `docs/bundle-format.md` is the full
//! description.
//!
//! # Redaction
//!
//! On unless `--no-redact` is spelled out. Only allowlisted fields leave
//! ([`rules::DEFAULT_FIELDS`]); every value of those, and every VM name, goes through the
//! detectors ([`detectors`]), the VM names the sink knows, and the operator's rules file
//! ([`rules`]); what they find becomes an HMAC token under a key that is random per
//! export unless `--key-file` gives one ([`pseudonym`]). After redaction every byte
//! written is scanned again with the same rules and any finding aborts the export
//! ([`redact::Redactor::leak`]). An export that fails or is interrupted leaves no file
//! ([`cleanup`]).
//!
//! # Module map
//!
//! `export` runs an export; `verify` checks and summarises a bundle; `archive` is the
//! container, `manifest` its index, `report` the HTML page.

mod archive;
mod cleanup;
mod detectors;
mod export;
mod manifest;
#[doc(hidden)]
pub mod pseudonym;
#[doc(hidden)]
pub mod redact;
mod report;
#[doc(hidden)]
pub mod rules;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// `qlog export`: which events, where to, and how to redact them.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Which events, as for qlog query. No VM means every VM.
    #[command(flatten)]
    pub filters: crate::cli::Filters,
    /// The bundle to write (a .tar.zst; age-encrypted with --encrypt-to).
    #[arg(short = 'o', long = "output", value_name = "FILE", required_unless_present = "dry_run")]
    pub output: Option<PathBuf>,
    /// Also write each VM's records in the journal export format.
    #[arg(long)]
    pub with_export: bool,
    /// Redaction rules: extra fields, allowlisted domains and VMs, keywords, regexes
    /// (TOML; see docs/redaction-rules.example.toml).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Compute tokens under this key (32 bytes, or 64 hex digits) instead of a random
    /// one, so that bundles made with the same key share tokens.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Write the token-to-value map here for yourself (mode 0600, never overwritten).
    /// It never goes into the bundle: keep it in this qube.
    #[arg(long, value_name = "FILE")]
    pub map_out: Option<PathBuf>,
    /// Show what each rule would replace, with redacted examples; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Export every field exactly as stored, with real VM names. Prints a warning.
    #[arg(long, conflicts_with_all = ["rules", "key_file", "map_out"])]
    pub no_redact: bool,
    /// Encrypt the bundle with age to this recipient (age1...). Repeatable.
    #[arg(long = "encrypt-to", value_name = "RECIPIENT")]
    pub encrypt_to: Vec<String>,
    /// The creation time recorded in the bundle ("@SECONDS" or as --since); by default
    /// SOURCE_DATE_EPOCH if set, else now. Pin it to make exports reproducible.
    #[arg(long, value_name = "TIME")]
    pub created_at: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Check a bundle: every hash, the manifest's counts, and a re-scan for leaks.
    ///
    /// Exits non-zero, naming each file that does not match, if anything is wrong.
    Verify {
        /// The bundle.
        file: PathBuf,
        /// The age identity file to decrypt an encrypted bundle with.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Also re-scan for this rules file's keywords and regexes.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
    },
    /// Summarise a bundle: VMs (by their bundle names), time range, counts, rules fired.
    Inspect {
        /// The bundle.
        file: PathBuf,
        /// The age identity file to decrypt an encrypted bundle with.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
}

pub fn export(socket: &Path, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    export::run(socket, args)
}

pub fn bundle(command: &BundleCommand) -> anyhow::Result<ExitCode> {
    match command {
        BundleCommand::Verify { file, identity, rules } => {
            verify::verify(file, identity.as_deref(), rules.as_deref())
        }
        BundleCommand::Inspect { file, identity } => verify::inspect(file, identity.as_deref()),
    }
}
