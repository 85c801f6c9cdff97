//! The qrexec-client-vm double behaves as `shared/QREXEC.md` says the real one does.
//!
//! Each test plays the target VM's socket service with a `UnixListener` and checks one
//! thing production code relies on: the descriptor, the half-close, the live relay, the
//! service lookup and every exit code.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use qlog_tests::process::{pidfd_open, poll_readable, wait_timeout};
use qlog_tests::IO_TIMEOUT;
use tempfile::TempDir;

const DOUBLE: &str = env!("CARGO_BIN_EXE_qrexec-client-vm");
const SOURCE_VM: &str = "sd-app";

/// A service directory with a listener at `dir/name`.
fn service(dir: &TempDir, name: &str) -> UnixListener {
    UnixListener::bind(dir.path().join(name)).expect("the temp dir takes a socket")
}

fn service_dir() -> TempDir {
    tempfile::Builder::new().prefix("qrexec-double.").tempdir_in("/tmp").expect("/tmp works")
}

/// The double, calling `target service` with its environment set for `dir`.
fn double(dir: &Path, target: &str, service: &str) -> Command {
    let mut command = Command::new(DOUBLE);
    for name in ["QREXEC_DOUBLE_POLICY", "QREXEC_DOUBLE_TARGET", "QREXEC_DOUBLE_DIE_AFTER_BYTES"] {
        command.env_remove(name);
    }
    command
        .args([target, service])
        .env("QREXEC_DOUBLE_SERVICE_DIR", dir)
        .env("QREXEC_DOUBLE_SOURCE_VM", SOURCE_VM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Accepts the double's connection, failing fast if the double exits instead.
fn accept(listener: &UnixListener, child: &mut Child) -> UnixStream {
    let pidfd = pidfd_open(child.id()).expect("the double has a pidfd");
    let ready =
        poll_readable(&[listener.as_raw_fd(), pidfd.as_raw_fd()], IO_TIMEOUT).expect("poll works");
    if !ready[0] {
        let status = wait_timeout(child, IO_TIMEOUT).expect("the double can be waited for");
        panic!("the double did not connect (exit: {status:?}): {}", stderr_of(child));
    }
    let (stream, _) = listener.accept().expect("a pending connection can be accepted");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeouts can be set");
    stream
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    match wait_timeout(child, IO_TIMEOUT).expect("the double can be waited for") {
        Some(status) => status,
        None => {
            let _ = child.kill();
            panic!("the double did not exit within {IO_TIMEOUT:?}");
        }
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// Runs the double to completion with nothing to connect to and returns its exit code and
/// stderr.
fn run_unconnected(mut command: Command) -> (Option<i32>, String) {
    let mut child = command.stdin(Stdio::null()).spawn().expect("the double runs");
    let status = wait_exit(&mut child);
    (status.code(), stderr_of(&mut child))
}

/// Reads until the double half-closes (stdin EOF), with a deadline.
fn read_to_eof(stream: &mut UnixStream) -> Vec<u8> {
    let mut received = Vec::new();
    stream.read_to_end(&mut received).expect("the double half-closes within the timeout");
    received
}

#[test]
fn descriptor_names_service_argument_and_source_vm() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut child = double(dir.path(), "sd-log", "qlog.Ingest+journal").spawn().unwrap();
    let mut stream = accept(&listener, &mut child);
    drop(child.stdin.take());
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+journal sd-app\0");
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn descriptor_always_has_a_plus_even_without_argument() {
    for service_arg in ["qlog.Ingest", "qlog.Ingest+"] {
        let dir = service_dir();
        let listener = service(&dir, "qlog.Ingest");
        let mut child = double(dir.path(), "sd-log", service_arg).spawn().unwrap();
        let mut stream = accept(&listener, &mut child);
        drop(child.stdin.take());
        assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+ sd-app\0", "{service_arg}");
        drop(stream);
        assert_eq!(wait_exit(&mut child).code(), Some(0));
    }
}

#[test]
fn descriptor_can_share_a_read_with_the_first_data() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut child = double(dir.path(), "sd-log", "qlog.Ingest").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x00\x00\x00\x01\x05data").unwrap();
    drop(stdin);
    let mut stream = accept(&listener, &mut child);

    // Once the double has half-closed, everything it sent is queued, and one read takes
    // descriptor and data together: the sink must split at the first NUL itself.
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, IO_TIMEOUT.as_millis() as i32) };
    assert_eq!(rc, 1, "the double half-closes after its data");
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"qlog.Ingest+ sd-app\0\x00\x00\x00\x01\x05data");
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn service_with_argument_is_preferred_over_the_bare_service() {
    let dir = service_dir();
    let specific = service(&dir, "qlog.Ingest+special");
    let bare = service(&dir, "qlog.Ingest");

    let mut child = double(dir.path(), "sd-log", "qlog.Ingest+special").spawn().unwrap();
    let mut stream = accept(&specific, &mut child);
    drop(child.stdin.take());
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+special sd-app\0");
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));

    let mut child = double(dir.path(), "sd-log", "qlog.Ingest+other").spawn().unwrap();
    let mut stream = accept(&bare, &mut child);
    drop(child.stdin.take());
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+other sd-app\0");
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn service_reached_through_a_symlink() {
    let dir = service_dir();
    let listener = service(&dir, "elsewhere.sock");
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere.sock"), services.join("qlog.Ingest"))
        .unwrap();
    let mut child = double(&services, "sd-log", "qlog.Ingest").spawn().unwrap();
    let mut stream = accept(&listener, &mut child);
    drop(child.stdin.take());
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+ sd-app\0");
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn stdin_eof_is_a_half_close_and_the_final_reply_still_arrives() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut child = double(dir.path(), "sd-log", "qlog.Ingest").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"last words").unwrap();
    drop(stdin);

    let mut stream = accept(&listener, &mut child);
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+ sd-app\0last words");
    // After the caller's EOF the service can still answer, then closes.
    stream.write_all(b"BYE").unwrap();
    drop(stream);

    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    assert_eq!(stdout, b"BYE");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn replies_reach_stdout_live_while_stdin_is_open() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut child = double(dir.path(), "sd-log", "qlog.Ingest").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stream = accept(&listener, &mut child);

    let mut descriptor = [0u8; 20];
    stream.read_exact(&mut descriptor).unwrap();
    assert_eq!(&descriptor, b"qlog.Ingest+ sd-app\0");
    for round in 0..3u8 {
        stdin.write_all(&[b'a' + round]).unwrap();
        let mut byte = [0u8];
        stream.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], b'a' + round);
        stream.write_all(&[b'A' + round]).unwrap();
        // The reply arrives with the caller's stdin still open: nothing is buffered.
        stdout.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], b'A' + round);
    }
    drop(stdin);
    assert!(read_to_eof(&mut stream).is_empty());
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn exits_0_at_once_when_the_service_closes_mid_stream() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut child = double(dir.path(), "sd-log", "qlog.Ingest").spawn().unwrap();
    // Stdin stays open and keeps supplying data the service never reads, until the
    // double is gone and the pipe breaks.
    let mut stdin = child.stdin.take().unwrap();
    let producer = std::thread::spawn(move || while stdin.write_all(&[7u8; 4096]).is_ok() {});
    let stream = accept(&listener, &mut child);
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    producer.join().unwrap();
}

#[test]
fn service_half_close_ends_stdout_but_stdin_still_flows() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut child = double(dir.path(), "sd-log", "qlog.Ingest").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stream = accept(&listener, &mut child);

    stream.write_all(b"done sending").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut output = Vec::new();
    stdout.read_to_end(&mut output).unwrap();
    assert_eq!(output, b"done sending", "the caller sees stdout EOF");

    // The call goes on: the caller's data still reaches the service.
    stdin.write_all(b"more").unwrap();
    drop(stdin);
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+ sd-app\0more");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn policy_deny_refuses_with_126() {
    let dir = service_dir();
    let _listener = service(&dir, "qlog.Ingest");
    let mut command = double(dir.path(), "sd-log", "qlog.Ingest");
    command.env("QREXEC_DOUBLE_POLICY", "deny");
    let (code, stderr) = run_unconnected(command);
    assert_eq!(code, Some(126));
    assert_eq!(stderr.trim_end(), "Request refused");
}

#[test]
fn unknown_target_refuses_with_126() {
    let dir = service_dir();
    let _listener = service(&dir, "qlog.Ingest");
    let mut command = double(dir.path(), "sd-other", "qlog.Ingest");
    command.env("QREXEC_DOUBLE_TARGET", "sd-log");
    let (code, stderr) = run_unconnected(command);
    assert_eq!(code, Some(126));
    assert_eq!(stderr.trim_end(), "Request refused");
}

#[test]
fn missing_service_exits_127() {
    let dir = service_dir();
    let (code, _) = run_unconnected(double(dir.path(), "sd-log", "qlog.Ingest"));
    assert_eq!(code, Some(127));
}

#[test]
fn socket_nobody_listens_on_exits_125() {
    let dir = service_dir();
    // Binding and dropping a listener leaves its socket file behind, unconnectable.
    drop(service(&dir, "qlog.Ingest"));
    assert!(dir.path().join("qlog.Ingest").exists());
    let (code, _) = run_unconnected(double(dir.path(), "sd-log", "qlog.Ingest"));
    assert_eq!(code, Some(125));
}

#[test]
fn dangling_service_symlink_exits_125() {
    let dir = service_dir();
    std::os::unix::fs::symlink(dir.path().join("gone.sock"), dir.path().join("qlog.Ingest"))
        .unwrap();
    let (code, _) = run_unconnected(double(dir.path(), "sd-log", "qlog.Ingest"));
    assert_eq!(code, Some(125));
}

#[test]
fn target_dying_after_n_bytes_exits_255() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut command = double(dir.path(), "sd-log", "qlog.Ingest");
    command.env("QREXEC_DOUBLE_DIE_AFTER_BYTES", "4");
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"abcdefgh").unwrap();

    let mut stream = accept(&listener, &mut child);
    // Exactly N bytes get through; then the connection ends like a caller's crash does.
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+ sd-app\0abcd");
    assert_eq!(wait_exit(&mut child).code(), Some(255));
    drop(stdin);
}

#[test]
fn real_options_are_accepted_and_ignored() {
    let dir = service_dir();
    let listener = service(&dir, "qlog.Ingest");
    let mut command = Command::new(DOUBLE);
    command
        .args(["--buffer-size=65536", "-t", "-T", "--no-filter-escape-chars-stdout"])
        .args(["--no-filter-escape-chars-stderr", "--agent-socket", "/nonexistent"])
        .args(["sd-log", "qlog.Ingest+x"])
        .env("QREXEC_DOUBLE_SERVICE_DIR", dir.path())
        .env("QREXEC_DOUBLE_SOURCE_VM", SOURCE_VM)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stream = accept(&listener, &mut child);
    assert_eq!(read_to_eof(&mut stream), b"qlog.Ingest+x sd-app\0");
    drop(stream);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn local_program_and_missing_settings_are_local_errors() {
    let dir = service_dir();
    let _listener = service(&dir, "qlog.Ingest");

    let mut command = double(dir.path(), "sd-log", "qlog.Ingest");
    command.arg("/bin/cat");
    let (code, stderr) = run_unconnected(command);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("local_program"), "{stderr}");

    let mut command = double(dir.path(), "sd-log", "qlog.Ingest");
    command.env_remove("QREXEC_DOUBLE_SOURCE_VM");
    let (code, stderr) = run_unconnected(command);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("QREXEC_DOUBLE_SOURCE_VM"), "{stderr}");

    let mut command = double(dir.path(), "sd-log", "qlog.Ingest");
    command.arg("--no-such-option");
    let (code, _) = run_unconnected(command);
    assert_eq!(code, Some(1));
}

#[test]
fn call_log_records_each_call() {
    let dir = service_dir();
    let log = dir.path().join("calls.log");
    for _ in 0..2 {
        let mut command = double(dir.path(), "sd-log", "qlog.Ingest+journal");
        command.env("QREXEC_DOUBLE_CALL_LOG", &log);
        let (code, _) = run_unconnected(command);
        assert_eq!(code, Some(127));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("target=sd-log service=qlog.Ingest+journal pid="), "{text}");
}
