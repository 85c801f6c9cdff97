//! A private systemd-journald for agent tests, in a mount namespace of its own.
//!
//! Owns giving a test a real journald whose journal nobody else writes to and which
//! leaves the machine's journal alone, plus ways to write to it (`systemd-cat`, `logger`,
//! the native protocol) and read it back (`journalctl -o export`, parsed by
//! [`parse_export`]). Needs root, for the namespace and the mounts.
//!
//! The recipe: a holder process enters a new mount namespace with private propagation,
//! mounts fresh tmpfs on `/run/systemd` and `/run/log` (and on `/var/log/journal`, where
//! that exists, so nothing can reach the machine's persistent journal), puts a drop-in in
//! `/run/systemd/journald.conf.d/` for volatile storage without rate limits or
//! forwarding, says `ok` and sleeps. journald is started inside with `nsenter` and is
//! waited for by its `READY=1` on a socket in our temp dir under `/tmp`, which the
//! namespace shares with us. Anything run with [`JournalNamespace::command`] sees this
//! journald as the system's. [`JournalNamespace::start_as_new_machine`] also mounts a
//! fresh machine ID and boot ID over the machine's, for tests of a new DisposableVM.
//!
//! journald logs a few entries of its own at start, so tests should pick out their
//! entries by `SYSLOG_IDENTIFIER`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use qlog_rpc::{Event, Field};
use tempfile::TempDir;

use crate::notify::NotifySocket;
use crate::process::{die_with_parent_thread, kill_and_reap, log_stdio, quote_log};
use crate::STARTUP_TIMEOUT;

/// Where journald keeps a volatile journal, inside the namespace.
pub const JOURNAL_DIR: &str = "/run/log/journal";

/// journald's native-protocol socket, inside the namespace.
const NATIVE_SOCKET: &str = "/run/systemd/journal/socket";

/// journald's syslog socket (what `/dev/log` points to on a systemd machine).
const SYSLOG_SOCKET: &str = "/run/systemd/journal/dev-log";

/// Named to sort after any drop-in a distribution ships, so its settings win.
const DROP_IN_NAME: &str = "zz-qlog-tests.conf";

const DROP_IN: &str = "\
# Written by qlog-tests for a private journald in a test's mount namespace.
[Journal]
Storage=volatile
RateLimitIntervalSec=0
RateLimitBurst=0
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
ReadKMsg=no
";

/// The holder's script; `$1` is the drop-in to install and `$2` its name. If `$3` is not
/// empty, it is a directory whose `machine-id` and `boot_id` are mounted over the
/// machine's, so the namespace looks like another machine's boot. It prints `ok` only once
/// every mount is in place, so journald never starts on the machine's own `/run`.
const HOLDER_SCRIPT: &str = "\
set -e
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mount -t tmpfs -o mode=0755 tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
if [ -n \"$3\" ]; then
  mount --bind \"$3/machine-id\" /etc/machine-id
  mount --bind \"$3/boot_id\" /proc/sys/kernel/random/boot_id
fi
mkdir /run/systemd/journald.conf.d
cp \"$1\" /run/systemd/journald.conf.d/\"$2\"
echo ok
exec sleep infinity
";

/// Where Debian and most others install journald.
const JOURNALD_PATHS: &[&str] =
    &["/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald"];

/// Syslog severity names by number, for `logger`.
const SEVERITIES: [&str; 8] =
    ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"];

/// A running private journald. Dropping it kills journald and the holder, which ends
/// the namespace and its tmpfs mounts.
#[derive(Debug)]
pub struct JournalNamespace {
    /// `None` only while dropping.
    journald: Option<Child>,
    /// The process whose mount namespace the journal lives in.
    holder: Child,
    journald_log: PathBuf,
    dir: TempDir,
}

impl JournalNamespace {
    /// True if this process can create the namespace. Otherwise prints why the test is
    /// skipped and returns false, so a test can `if !JournalNamespace::require_root() {
    /// return; }`.
    ///
    /// # Panics
    ///
    /// If `CI` is set and we are not root: CI runs as root, so there a skip would hide a
    /// broken setup.
    pub fn require_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("this test needs root, and CI must not skip it: run CI as root");
        }
        eprintln!("skipping: needs root (CI runs as root)");
        false
    }

    /// Creates the namespace and starts journald in it.
    ///
    /// # Panics
    ///
    /// If the holder cannot mount, or journald does not report `READY=1` within
    /// [`STARTUP_TIMEOUT`], quoting their logs.
    pub fn start() -> JournalNamespace {
        JournalNamespace::start_with_identity(false)
    }

    /// Like [`JournalNamespace::start`], but the namespace also gets a machine ID and a
    /// boot ID of its own, freshly drawn, mounted over `/etc/machine-id` and
    /// `/proc/sys/kernel/random/boot_id`: to journald and journalctl it is a new machine
    /// in its first boot, as a fresh DisposableVM is.
    ///
    /// # Panics
    ///
    /// As [`JournalNamespace::start`].
    pub fn start_as_new_machine() -> JournalNamespace {
        JournalNamespace::start_with_identity(true)
    }

    /// The machine ID journald in the namespace sees.
    pub fn machine_id(&self) -> String {
        let path = format!("/proc/{}/root/etc/machine-id", self.holder_pid());
        std::fs::read_to_string(path).expect("the namespace has a machine ID").trim().to_owned()
    }

    fn start_with_identity(new_identity: bool) -> JournalNamespace {
        let dir = tempfile::Builder::new()
            .prefix("qlog-journal.")
            .tempdir_in("/tmp")
            .expect("/tmp is writable");
        let drop_in = dir.path().join(DROP_IN_NAME);
        std::fs::write(&drop_in, DROP_IN).expect("the fresh temp dir is writable");

        let identity = new_identity.then(|| {
            let identity = dir.path().join("identity");
            std::fs::create_dir(&identity).expect("the fresh temp dir is writable");
            // The kernel draws a fresh random UUID on every read of this file.
            let uuid = || std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("procfs");
            let machine_id = uuid().trim().replace('-', "");
            std::fs::write(identity.join("machine-id"), format!("{machine_id}\n"))
                .expect("the fresh temp dir is writable");
            std::fs::write(identity.join("boot_id"), uuid()).expect("the temp dir is writable");
            identity
        });
        let holder_log = dir.path().join("holder.log");
        let holder = start_holder(&drop_in, identity.as_deref(), &holder_log);

        let journald_log = dir.path().join("journald.log");
        let mut namespace = JournalNamespace { journald: None, holder, journald_log, dir };
        namespace.start_journald();
        namespace
    }

    /// The pid whose mount namespace holds the journal, for `nsenter -t`.
    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    pub fn journald_pid(&self) -> u32 {
        self.journald.as_ref().expect("journald runs until drop").id()
    }

    /// A command running `program` inside the namespace (`nsenter -t PID -m -- program`).
    /// Only the mounts differ: the environment, pids and network are ours.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg("-t").arg(self.holder_pid().to_string()).args(["-m", "--"]).arg(program);
        command
    }

    /// A script that runs `journalctl` inside the namespace with its arguments, for the
    /// agent's `--journalctl PATH`.
    pub fn journalctl_wrapper(&self) -> PathBuf {
        let path = self.dir.path().join("journalctl");
        if !path.exists() {
            let script = format!(
                "#!/bin/sh\n# Runs journalctl in a qlog-tests journal namespace.\n\
                 exec nsenter -t {} -m -- journalctl \"$@\"\n",
                self.holder_pid()
            );
            std::fs::write(&path, script).expect("the temp dir is writable");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("the temp dir is ours");
        }
        path
    }

    /// Logs `message` through `systemd-cat -t IDENTIFIER -p PRIORITY`, the stdout-stream
    /// transport: journald makes one entry per line.
    pub fn systemd_cat(&self, identifier: &str, priority: u8, message: &str) {
        let mut command = self.command("systemd-cat");
        command.args(["-t", identifier, "-p", &priority.to_string()]);
        run_with_stdin(command, message.as_bytes());
    }

    /// Logs `message` through `logger` to journald's syslog socket, as `user.SEVERITY`.
    pub fn logger(&self, identifier: &str, priority: u8, message: &str) {
        let severity = SEVERITIES.get(usize::from(priority)).expect("priorities are 0 to 7");
        let mut command = self.command("logger");
        command
            .args(["--socket-errors=on", "-u", SYSLOG_SOCKET, "-t", identifier])
            .arg("-p")
            .arg(format!("user.{severity}"))
            .arg("--")
            .arg(message);
        run_with_stdin(command, b"");
    }

    /// Sends one entry with exactly these fields over journald's native protocol, the one
    /// `sd_journal_send` uses. Values may hold newlines and any bytes; journald adds its
    /// trusted `_` fields. The entry must fit in one datagram (a few hundred KiB).
    pub fn send(&self, fields: &[(&str, &[u8])]) {
        let mut datagram = Vec::new();
        for (name, value) in fields {
            // The binary-safe form, `NAME\n<le64 length><value>\n`, works for every value.
            datagram.extend_from_slice(name.as_bytes());
            datagram.push(b'\n');
            datagram.extend_from_slice(&(value.len() as u64).to_le_bytes());
            datagram.extend_from_slice(value);
            datagram.push(b'\n');
        }
        // The namespace's /run is reachable from outside through the holder's root.
        let socket = format!("/proc/{}/root{NATIVE_SOCKET}", self.holder_pid());
        let sender = UnixDatagram::unbound().expect("a datagram socket can be created");
        if let Err(e) = sender.send_to(&datagram, &socket) {
            panic!("cannot send to journald at {socket}: {e}{}", self.quoted_log());
        }
    }

    /// Syncs the journal, then stops journald with SIGSTOP, so the journal is idle for
    /// certain: journald writes nothing more, not even the change it posts to readers a
    /// moment after its last write. Readers like journalctl keep working on the files.
    /// Nothing can be logged afterwards; dropping the namespace still kills journald.
    pub fn freeze_journald(&self) {
        self.sync();
        let pid = libc::pid_t::try_from(self.journald_pid()).expect("Linux pids fit in pid_t");
        // SAFETY: kill has no memory-safety preconditions; journald is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }

    /// Waits until journald has written everything it has been sent so far
    /// (`journalctl --sync`).
    pub fn sync(&self) {
        let mut command = self.command("journalctl");
        command.arg("--sync");
        run_with_stdin(command, b"");
    }

    /// The whole journal in export format, after a [`JournalNamespace::sync`].
    pub fn journalctl_export(&self) -> Vec<u8> {
        self.sync();
        let mut command = self.command("journalctl");
        command.args(["-D", JOURNAL_DIR, "-o", "export", "--all"]);
        run_with_stdin(command, b"").stdout
    }

    /// The journal's entries, parsed, optionally only those with this identifier.
    pub fn entries(&self, identifier: Option<&str>) -> Vec<Event> {
        let export = self.journalctl_export();
        let entries = parse_export(&export).expect("journalctl writes valid export format");
        entries
            .into_iter()
            .filter(|e| match identifier {
                Some(id) => e.get_str("SYSLOG_IDENTIFIER") == Some(id),
                None => true,
            })
            .collect()
    }

    /// The end of journald's own stdout and stderr.
    pub fn journald_log_tail(&self) -> String {
        crate::process::tail(&self.journald_log)
    }

    fn start_journald(&mut self) {
        let program = JOURNALD_PATHS
            .iter()
            .find(|p| Path::new(p).is_file())
            .expect("systemd-journald is installed (apt-get install systemd)");
        let notify = NotifySocket::bind(&self.dir.path().join("journald-notify.sock"))
            .expect("a datagram socket can be bound in the fresh temp dir");

        let mut command = self.command(program);
        // Socket activation variables of our own would make journald look for sockets
        // it was never given.
        for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "JOURNAL_STREAM"] {
            command.env_remove(name);
        }
        let (stdout, stderr) = log_stdio(&self.journald_log);
        command
            .env("NOTIFY_SOCKET", notify.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        die_with_parent_thread(&mut command);

        let mut journald = command.spawn().expect("nsenter can be spawned");
        if let Err(why) = notify.wait_ready(&mut journald, STARTUP_TIMEOUT) {
            kill_and_reap(&mut journald);
            panic!("journald did not become ready: {why}{}", self.quoted_log());
        }
        self.journald = Some(journald);
    }

    fn quoted_log(&self) -> String {
        quote_log("journald", &self.journald_log)
    }
}

impl Drop for JournalNamespace {
    fn drop(&mut self) {
        if let Some(mut journald) = self.journald.take() {
            kill_and_reap(&mut journald);
        }
        kill_and_reap(&mut self.holder);
        if std::thread::panicking() {
            eprintln!("{}", self.quoted_log());
        }
    }
}

/// Starts the holder and waits for its `ok`, which it prints once its mounts are done.
fn start_holder(drop_in: &Path, identity: Option<&Path>, log: &Path) -> Child {
    let (_, stderr) = log_stdio(log);
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "--", "sh", "-c", HOLDER_SCRIPT, "sh"])
        .arg(drop_in)
        .arg(DROP_IN_NAME)
        .arg(identity.map_or(OsStr::new(""), Path::as_os_str))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    die_with_parent_thread(&mut command);
    let mut holder = command.spawn().expect("unshare can be spawned");

    // The line arrives, or the pipe closes because the script failed and exited.
    let stdout = holder.stdout.take().expect("stdout was piped");
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_err() || line.trim_end() != "ok" {
        kill_and_reap(&mut holder);
        panic!(
            "the namespace holder failed to set up its mounts (read {line:?}, {read:?}){}",
            quote_log("the holder", log)
        );
    }
    holder
}

/// Runs a command to completion with `input` on its stdin.
///
/// # Panics
///
/// If it cannot be run or does not succeed, quoting its stderr.
fn run_with_stdin(mut command: Command, input: &[u8]) -> Output {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin was piped");
    // Written before waiting, and small: the tools here read all input before writing
    // much, so this cannot deadlock on a full stdout pipe.
    stdin.write_all(input).unwrap_or_else(|e| panic!("cannot feed {command:?}: {e}"));
    drop(stdin);
    let output = child.wait_with_output().expect("the child can be waited for");
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Why export-format input could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("field at byte {offset} has no name")]
    EmptyName { offset: usize },
    #[error("input ends inside a field at byte {offset}")]
    Truncated { offset: usize },
    #[error("binary field at byte {offset} is not followed by a newline")]
    MissingNewline { offset: usize },
}

/// Parses journald's export format into one [`Event`] per entry, fields in order.
///
/// An entry is a run of fields ended by an empty line. A field is `NAME=value\n`, or, for
/// values that are binary or hold a newline, `NAME\n`, a little-endian `u64` length, the
/// value and `\n`. Names are kept as they come, without validation.
pub fn parse_export(input: &[u8]) -> Result<Vec<Event>, ExportError> {
    let mut entries = Vec::new();
    let mut current = Event::new();
    let mut pos = 0;
    while pos < input.len() {
        let start = pos;
        let rest = &input[pos..];
        let end = rest.iter().position(|&b| b == b'=' || b == b'\n');
        let Some(end) = end else { return Err(ExportError::Truncated { offset: start }) };
        if end == 0 && rest[0] == b'\n' {
            // An empty line ends the entry.
            entries.push(std::mem::take(&mut current));
            pos += 1;
            continue;
        }
        if end == 0 {
            return Err(ExportError::EmptyName { offset: start });
        }
        let name = String::from_utf8_lossy(&rest[..end]).into_owned();
        let value = if rest[end] == b'=' {
            let value_start = end + 1;
            let newline = rest[value_start..].iter().position(|&b| b == b'\n');
            let Some(len) = newline else { return Err(ExportError::Truncated { offset: start }) };
            pos += value_start + len + 1;
            rest[value_start..value_start + len].to_vec()
        } else {
            let len_start = end + 1;
            let len_bytes = rest
                .get(len_start..len_start + 8)
                .ok_or(ExportError::Truncated { offset: start })?;
            let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
            let len = usize::try_from(len).map_err(|_| ExportError::Truncated { offset: start })?;
            let value_start = len_start + 8;
            let value = rest
                .get(value_start..value_start.saturating_add(len))
                .ok_or(ExportError::Truncated { offset: start })?;
            if rest.get(value_start + len) != Some(&b'\n') {
                return Err(ExportError::MissingNewline { offset: start });
            }
            pos += value_start + len + 1;
            value.to_vec()
        };
        current.fields.push(Field { name, value });
    }
    // The last entry's blank line may be missing at the very end.
    if !current.fields.is_empty() {
        entries.push(current);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_and_binary_fields_in_order() {
        let mut input = b"__CURSOR=s=1\nMESSAGE=one\n\n".to_vec();
        input.extend_from_slice(b"MESSAGE\n");
        input.extend_from_slice(&9u64.to_le_bytes());
        input.extend_from_slice(b"two\nlines\n");
        input.extend_from_slice(b"BIN\n");
        input.extend_from_slice(&3u64.to_le_bytes());
        input.extend_from_slice(&[0, 0xff, b'\n']);
        // The field's own newline, then the blank line ending the entry.
        input.extend_from_slice(b"\n\nEMPTY=\nMESSAGE=three");
        let Err(ExportError::Truncated { .. }) = parse_export(&input) else {
            panic!("a field without its newline is truncated");
        };
        input.push(b'\n');

        let entries = parse_export(&input).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].get_str("MESSAGE"), Some("one"));
        assert_eq!(entries[1].get_str("MESSAGE"), Some("two\nlines"));
        assert_eq!(entries[1].get("BIN"), Some(&[0, 0xff, b'\n'][..]));
        assert_eq!(entries[2].get("EMPTY"), Some(&b""[..]));
        assert_eq!(entries[2].get_str("MESSAGE"), Some("three"));
    }

    #[test]
    fn rejects_cut_binary_fields() {
        let mut input = b"MESSAGE\n".to_vec();
        input.extend_from_slice(&100u64.to_le_bytes());
        input.extend_from_slice(b"short\n");
        assert!(matches!(parse_export(&input), Err(ExportError::Truncated { offset: 0 })));
        let mut input = b"M\n".to_vec();
        input.extend_from_slice(&1u64.to_le_bytes());
        input.extend_from_slice(b"xy");
        assert!(matches!(parse_export(&input), Err(ExportError::MissingNewline { offset: 0 })));
        assert!(matches!(parse_export(b"=x\n"), Err(ExportError::EmptyName { offset: 0 })));
    }
}
