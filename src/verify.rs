//! `qlog verify`: has qlogd walk each VM's hash chain over its stored batches and says
//! whether every chain holds, and if not, where it first breaks.
//!
//! The walk runs in qlogd (it alone reads the store); this module asks for it and prints
//! the answer. VM names and qlogd's details are escaped like any other text from the
//! store: a VM chose its name's bytes no more than its events', but the store itself is
//! what this command distrusts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use qlog_rpc::query::{ExpectedLink, VerifyQuery, VerifyReply, VmChain};

use crate::client::{self, Client};
use crate::escape::escape_line;

/// `qlog verify`: which VMs, and how to print the result.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// VMs to check; none means every VM with a chain or stored batches.
    #[arg(value_name = "VM")]
    pub vms: Vec<String>,
    /// Print qlogd's reply as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only show each chain's recorded head and anchor, reading no batch (instant, and
    /// what to write down to compare with a later verify).
    #[arg(long, conflicts_with = "against")]
    pub heads_only: bool,
    /// A `qlog verify --json` (or `--heads-only --json`) saved earlier, kept outside the
    /// log qube: each VM's chain must still pass through the head it had then. A chain
    /// rewritten since, by someone who recomputed its links, verifies clean without this.
    #[arg(long, value_name = "FILE")]
    pub against: Option<PathBuf>,
}

pub fn run(socket: &Path, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let against = args.against.is_some();
    let expect = match &args.against {
        Some(path) => saved_heads(path, &args.vms)?,
        None => Vec::new(),
    };
    let query = VerifyQuery { vms: args.vms.clone(), heads_only: args.heads_only, expect };
    let reply = match Client::verify(socket, &query) {
        Ok(reply) => reply,
        Err(e) if client::is_unknown_vm(&e) => {
            return Err(crate::vms::unknown_vm_error(socket, &args.vms, e))
        }
        Err(e) => return Err(e),
    };

    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply).expect("replies serialise"));
    } else if reply.vms.is_empty() {
        println!("no VM has stored anything yet");
    } else {
        println!(
            "{:<31} {:>9} {:>9} {:>9}  {:<11} HEAD",
            "VM", "CHECKED", "UNCHAINED", "TRIMMED", "STATUS"
        );
        for vm in &reply.vms {
            println!("{}", row(vm));
        }
        if against {
            let matched: u64 = reply.vms.iter().map(|v| v.expected_matched).sum();
            let unchecked: u64 = reply.vms.iter().map(|v| v.expected_unchecked).sum();
            println!(
                "saved heads: {matched} still in their chains, {unchecked} not checkable (trimmed since)"
            );
        }
    }

    let broken: Vec<&VmChain> = reply.vms.iter().filter(|v| is_broken(v)).collect();
    if broken.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for vm in &broken {
        eprintln!("qlog: {}", broken_message(vm));
    }
    eprintln!(
        "qlog: {} of {} chains are broken: the store was changed outside qlogd (or the disk damaged it); keep a copy of the state directory before anything else writes to it",
        broken.len(),
        reply.vms.len()
    );
    Ok(ExitCode::FAILURE)
}

/// The heads a saved verify recorded, for the VMs asked about (all if none are).
fn saved_heads(path: &Path, vms: &[String]) -> anyhow::Result<Vec<ExpectedLink>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let saved: VerifyReply = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not the output of qlog verify --json", path.display()))?;
    Ok(saved
        .vms
        .into_iter()
        .filter(|c| c.length > 0 && (vms.is_empty() || vms.contains(&c.vm)))
        .map(|c| ExpectedLink { vm: c.vm, position: c.length - 1, link: c.head })
        .collect())
}

/// True if and only if the walk found a break.
fn is_broken(vm: &VmChain) -> bool {
    vm.broken_links > 0 || vm.first_break.is_some()
}

fn row(vm: &VmChain) -> String {
    let status = if !vm.walked {
        "not walked"
    } else if is_broken(vm) {
        "BROKEN"
    } else {
        "ok"
    };
    format!(
        "{:<31} {:>9} {:>9} {:>9}  {:<11} {}",
        escape_line(vm.vm.as_bytes()),
        if vm.walked { vm.batches_checked.to_string() } else { "-".into() },
        vm.unchained,
        vm.trimmed,
        status,
        escape_line(vm.head.as_bytes())
    )
}

/// One sentence naming the VM and its first broken link.
fn broken_message(vm: &VmChain) -> String {
    let name = escape_line(vm.vm.as_bytes());
    let Some(b) = &vm.first_break else {
        return format!("the hash chain of VM {name} is broken ({} breaks)", vm.broken_links);
    };
    let at = match b.batch_id {
        Some(id) => format!("batch {id} (chain position {})", b.position),
        None => format!("chain position {}", b.position),
    };
    let more = match vm.broken_links {
        0 | 1 => String::new(),
        n => format!(" ({n} breaks in all)"),
    };
    format!(
        "the hash chain of VM {name} is broken: first broken link at {at}: {}: {}{more}",
        b.kind.as_str(),
        escape_line(b.detail.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::{BreakKind, ChainBreak};

    #[test]
    fn a_broken_chain_is_named_with_its_first_break_and_escaped() {
        let vm = VmChain {
            vm: "evil\u{1b}[2J".into(),
            walked: true,
            broken_links: 2,
            first_break: Some(ChainBreak {
                kind: BreakKind::ContentMismatch,
                batch_id: Some(77),
                position: 12,
                detail: "stored bytes hash to 00, the index entry recorded 11".into(),
            }),
            ..VmChain::default()
        };
        assert!(is_broken(&vm));
        let message = broken_message(&vm);
        assert_eq!(
            message,
            "the hash chain of VM evil\\e[2J is broken: first broken link at batch 77 (chain \
             position 12): content-mismatch: stored bytes hash to 00, the index entry \
             recorded 11 (2 breaks in all)"
        );
        assert!(row(&vm).contains("BROKEN"));
        let clean = VmChain { vm: "ok".into(), walked: true, ..VmChain::default() };
        assert!(!is_broken(&clean) && row(&clean).contains(" ok "));
    }
}
