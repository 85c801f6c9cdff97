//! A test double for Qubes' `qrexec-client-vm`, for calls to socket services.
//!
//! Owns emulating, on one machine, what a source VM's caller sees when it calls a socket
//! service in a target VM: the service lookup, the descriptor that dom0 writes before the
//! caller's data, the half-close on stdin EOF, and the exit codes of `shared/QREXEC.md`.
//! It takes the same command line as the real client, `qrexec-client-vm [options] TARGET
//! SERVICE[+ARG]`, so production code runs it unchanged. It leaves out executable services,
//! `local_program`, dom0 and the vchan itself.
//!
//! The environment plays the parts of dom0 and the target VM:
//!
//! - `QREXEC_DOUBLE_SERVICE_DIR` (required) is the target's `/etc/qubes-rpc`: the service
//!   is `$DIR/SERVICE+ARG` if that entry exists, else `$DIR/SERVICE`. Symlinks are
//!   followed when connecting, so the entry may point at a socket elsewhere.
//! - `QREXEC_DOUBLE_SOURCE_VM` (required) is the source VM name dom0 writes into the
//!   descriptor.
//! - `QREXEC_DOUBLE_POLICY` is `allow` (by default) or `deny`.
//! - `QREXEC_DOUBLE_TARGET`, if set, is the only target the policy knows; a call to any
//!   other target is refused, as a call to a missing VM is.
//! - `QREXEC_DOUBLE_DIE_AFTER_BYTES=N` makes the target side die after N bytes of stdin
//!   have been relayed: the socket is closed and the exit code is 255.
//! - `QREXEC_DOUBLE_CALL_LOG`, if set, is a file to which one line per call is appended
//!   before the policy is consulted, so a test can count calls and see their targets.
//!
//! Exit codes: 126 ("Request refused") for a policy deny, 127 for a missing service, 125
//! for a service that exists but cannot be connected, 0 when the service closes, 255 when
//! the target dies, and 1 for local errors, including misuse of the double itself.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::exit;

/// The real client's exit codes for the cases the double emulates.
const EXIT_OK: i32 = 0;
const EXIT_LOCAL_ERROR: i32 = 1;
const EXIT_CANNOT_CONNECT: i32 = 125;
const EXIT_REFUSED: i32 = 126;
const EXIT_NOT_FOUND: i32 = 127;
const EXIT_TARGET_DIED: i32 = 255;

/// Bytes moved per read, the size of one qrexec protocol 3 data chunk.
const CHUNK: usize = 65_536;

/// Everything the command line and the environment decide.
struct Call {
    target: String,
    service: String,
    /// The argument after `+`, empty when there is none.
    argument: String,
    /// Bytes from `--prefix-data`, sent after the descriptor and before stdin.
    prefix_data: Vec<u8>,
    service_dir: PathBuf,
    source_vm: String,
    /// True if and only if `QREXEC_DOUBLE_POLICY=deny`.
    deny: bool,
    /// The only target the policy allows; by default, any target.
    allowed_target: Option<String>,
    /// Stdin bytes to relay before the target side dies; by default, no limit.
    die_after_bytes: Option<u64>,
    call_log: Option<PathBuf>,
}

fn main() {
    // Ignoring SIGPIPE turns a write to a closed socket or stdout into EPIPE, which the
    // relay maps to the exit code the real client would give. (Rust already does this
    // before main; saying it here keeps the behaviour from depending on that.)
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    let call = match parse_call(std::env::args_os().skip(1).collect()) {
        Ok(call) => call,
        Err(message) => {
            eprintln!("qrexec-client-vm (test double): {message}");
            exit(EXIT_LOCAL_ERROR);
        }
    };
    log_call(&call);

    // Dom0 decides before the target is even looked at.
    let wrong_target = call.allowed_target.as_ref().is_some_and(|t| *t != call.target);
    if call.deny || wrong_target {
        eprintln!("Request refused");
        exit(EXIT_REFUSED);
    }

    let socket = match connect_service(&call) {
        Ok(socket) => socket,
        Err(code) => exit(code),
    };
    exit(relay(&call, socket));
}

/// Parses `[options] TARGET SERVICE[+ARG]` and the double's environment.
fn parse_call(args: Vec<OsString>) -> Result<Call, String> {
    let mut positional = Vec::new();
    let mut prefix_data = Vec::new();
    let mut args = args.into_iter();
    let mut options_done = false;
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        if options_done || !arg.starts_with('-') || arg == "-" {
            positional.push(arg);
            // Like getopt with a leading `+`, options end at the first operand, so a
            // local program's own options are never taken for ours.
            options_done = true;
            continue;
        }
        if arg == "--" {
            options_done = true;
            continue;
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(value)),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            match inline_value {
                Some(v) => Ok(v.to_owned()),
                None => args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("option {what} needs a value")),
            }
        };
        match name.as_str() {
            // Accepted for compatibility; they change nothing a socket service can see.
            "-t" | "-T" | "--no-filter-escape-chars-stdout" | "--no-filter-escape-chars-stderr" => {
            }
            "--buffer-size" | "--agent-socket" | "-s" | "--source-qube" => {
                value(&name)?;
            }
            "-p" | "--prefix-data" => prefix_data = value(&name)?.into_bytes(),
            "--use-stdin-socket" => {
                return Err("--use-stdin-socket is not emulated".to_owned());
            }
            _ => return Err(format!("unknown option {name}")),
        }
    }

    let (target, service_arg) = match positional.as_slice() {
        [target, service] => (target.clone(), service.clone()),
        [_, _, program, ..] => {
            return Err(format!("local_program {program:?} given, but it is not emulated"));
        }
        _ => return Err("usage: qrexec-client-vm [options] TARGET SERVICE[+ARG]".to_owned()),
    };
    let (service, argument) = match service_arg.split_once('+') {
        Some((service, argument)) => (service.to_owned(), argument.to_owned()),
        None => (service_arg, String::new()),
    };
    if service.is_empty() || service.contains('/') || argument.contains('/') {
        return Err(format!("service name {service:?}+{argument:?} is invalid"));
    }

    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let service_dir = env("QREXEC_DOUBLE_SERVICE_DIR")
        .ok_or("QREXEC_DOUBLE_SERVICE_DIR is not set (it plays /etc/qubes-rpc)")?
        .into();
    let source_vm = env("QREXEC_DOUBLE_SOURCE_VM")
        .ok_or("QREXEC_DOUBLE_SOURCE_VM is not set (dom0 would name the caller)")?
        .into_string()
        .map_err(|_| "QREXEC_DOUBLE_SOURCE_VM is not UTF-8")?;
    let deny = match env("QREXEC_DOUBLE_POLICY").as_ref().and_then(|p| p.to_str()) {
        None | Some("allow") => false,
        Some("deny") => true,
        Some(other) => return Err(format!("QREXEC_DOUBLE_POLICY={other:?}: use allow or deny")),
    };
    let allowed_target = env("QREXEC_DOUBLE_TARGET").and_then(|t| t.into_string().ok());
    let die_after_bytes = match env("QREXEC_DOUBLE_DIE_AFTER_BYTES") {
        None => None,
        Some(n) => Some(
            n.to_str()
                .and_then(|n| n.parse().ok())
                .ok_or("QREXEC_DOUBLE_DIE_AFTER_BYTES must be a byte count")?,
        ),
    };
    let call_log = env("QREXEC_DOUBLE_CALL_LOG").map(PathBuf::from);

    Ok(Call {
        target,
        service,
        argument,
        prefix_data,
        service_dir,
        source_vm,
        deny,
        allowed_target,
        die_after_bytes,
        call_log,
    })
}

/// Appends `target=T service=S+A pid=P` to the call log, if there is one.
fn log_call(call: &Call) {
    let Some(path) = &call.call_log else { return };
    let line = format!(
        "target={} service={}+{} pid={}\n",
        call.target,
        call.service,
        call.argument,
        std::process::id()
    );
    // One write of a short line to an O_APPEND file lands whole even when agents race.
    let logged = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(error) = logged {
        eprintln!("qrexec-client-vm (test double): cannot log to {}: {error}", path.display());
        exit(EXIT_LOCAL_ERROR);
    }
}

/// Looks the service up as qrexec does and connects to it, or returns the exit code.
fn connect_service(call: &Call) -> Result<UnixStream, i32> {
    let with_argument = call.service_dir.join(format!("{}+{}", call.service, call.argument));
    let bare = call.service_dir.join(&call.service);
    // Existence is judged without following symlinks, as qrexec's lstat does; a dangling
    // symlink is a service that exists but cannot be started.
    let exists = |path: &Path| path.symlink_metadata().is_ok();
    let path = if exists(&with_argument) {
        with_argument
    } else if exists(&bare) {
        bare
    } else {
        return Err(EXIT_NOT_FOUND);
    };
    // ECONNREFUSED (nobody listens), ENOENT (dangling link), EACCES, and a path that is
    // not a socket at all all end in 125 with the real client; executable services, the
    // other thing a non-socket could be, are not emulated.
    UnixStream::connect(&path).map_err(|_| EXIT_CANNOT_CONNECT)
}

/// Writes the descriptor, relays both ways until the call ends, and returns the exit code.
fn relay(call: &Call, socket: UnixStream) -> i32 {
    let mut head = format!("{}+{} {}\0", call.service, call.argument, call.source_vm).into_bytes();
    head.extend_from_slice(&call.prefix_data);
    if (&socket).write_all(&head).is_err() {
        // The service took the connection and closed it at once: a socket service that
        // closes always reports 0.
        return EXIT_OK;
    }

    let die_after_bytes = call.die_after_bytes;
    let Ok(writer) = socket.try_clone() else { return EXIT_LOCAL_ERROR };
    // Not joined: when the service side ends, the call ends, even while the stdin thread
    // is blocked reading a caller that has nothing to say (the process exit ends it).
    std::thread::spawn(move || stdin_to_socket(&writer, die_after_bytes));
    socket_to_stdout(&socket)
}

/// Relays stdin to the service; ends the process itself when the service has gone.
fn stdin_to_socket(socket: &UnixStream, die_after_bytes: Option<u64>) {
    let mut stdin = borrow_fd(libc::STDIN_FILENO);
    let mut budget = die_after_bytes;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if budget == Some(0) {
            // The target dies: exiting closes the socket, so the service sees EOF just as
            // when a real caller's VM goes away mid-stream.
            exit(EXIT_TARGET_DIED);
        }
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // An unreadable stdin ends the caller's data like EOF does.
            Err(_) => 0,
        };
        if n == 0 {
            // A real half-close: the service sees EOF and can still send its reply.
            let _ = socket.shutdown(Shutdown::Write);
            return;
        }
        let n = budget.map_or(n, |left| n.min(usize::try_from(left).unwrap_or(usize::MAX)));
        if write_all_retrying(socket, &buf[..n]).is_err() {
            // EPIPE or ECONNRESET: the service closed or crashed, and qrexec reports 0
            // for socket services whatever happened; undelivered bytes are dropped.
            exit(EXIT_OK);
        }
        if let Some(left) = budget.as_mut() {
            *left -= n as u64;
        }
    }
}

/// Relays the service's output to stdout, flushing every chunk so acks arrive live, and
/// returns the exit code once the service is gone.
fn socket_to_stdout(socket: &UnixStream) -> i32 {
    let mut stdout = borrow_fd(libc::STDOUT_FILENO);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match (&*socket).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return EXIT_OK,
        };
        if n == 0 {
            return service_eof(socket);
        }
        if write_all_retrying(&*stdout, &buf[..n]).and_then(|()| stdout.flush()).is_err() {
            // Nobody reads our output any more; the real client would end too.
            return EXIT_LOCAL_ERROR;
        }
    }
}

/// Handles EOF from the service: a close ends the call, a half-close only ends stdout.
fn service_eof(socket: &UnixStream) -> i32 {
    // A closed peer leaves both directions shut, which poll reports as POLLHUP; after a
    // mere `shutdown(SHUT_WR)` only our receive side is shut and POLLHUP stays clear
    // until the service closes for good or we have half-closed too.
    if !wait_for_hangup(socket, 0) {
        // The caller sees stdout EOF while its stdin still reaches the service, as
        // QREXEC.md describes for a sink's half-close.
        // SAFETY: fd 1 is ours; nothing writes to it after this point.
        unsafe { libc::close(libc::STDOUT_FILENO) };
        wait_for_hangup(socket, -1);
    }
    EXIT_OK
}

/// True if and only if the socket reported POLLHUP within `timeout_ms` (-1: no limit).
fn wait_for_hangup(socket: &UnixStream, timeout_ms: i32) -> bool {
    loop {
        // Asking for no events still reports POLLHUP and POLLERR.
        let mut pfd = libc::pollfd { fd: socket.as_raw_fd(), events: 0, revents: 0 };
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 && io::Error::last_os_error().kind() == ErrorKind::Interrupted {
            continue;
        }
        return rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0;
    }
}

/// `write_all` that retries on EINTR, for any writer.
fn write_all_retrying(mut out: impl Write, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match out.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An unbuffered handle on a standard descriptor that is never closed on drop.
///
/// Going around `std::io::stdin`/`stdout` avoids their buffers and locks, so the output
/// is never held back and `exit` from another thread never waits on a lock.
fn borrow_fd(fd: libc::c_int) -> ManuallyDrop<File> {
    // SAFETY: the standard descriptors stay open for the life of the process (fd 1 is
    // closed only in `service_eof`, after its last use), and ManuallyDrop keeps the File
    // from closing them.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}
