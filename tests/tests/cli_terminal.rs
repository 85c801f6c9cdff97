//! `qlog top` and `qlog stats` on a real terminal: each runs in a tmux pane, driven
//! with send-keys and read back with capture-pane, against a real qlogd with one busy
//! and one idle VM.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qlog_rpc::Event;
use qlog_tests::workload::Workload;
use qlog_tests::{bin_path, ingest_events, poll_until, RawIngest, RunningSink, SinkOptions};

const WAIT: Duration = Duration::from_secs(60);

/// A tmux server of our own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A server with a placeholder session, and panes that stay after their command
    /// exits (set before any command starts, so a quick one cannot slip past it).
    fn new(tag: &str) -> Tmux {
        let tmux = Tmux { socket: format!("qlog-test-{tag}-{}", std::process::id()) };
        tmux.run(&["-f", "/dev/null", "new-session", "-d", "-s", "keep", "sleep 86400"]);
        tmux.run(&["set-option", "-g", "remain-on-exit", "on"]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs (install it: apt-get install tmux)");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `command` in a detached 150x40 pane of its own session; once it exits, the
    /// pane shows its exit status (tmux's own `pane_dead_status` is not always filled).
    fn start(&self, name: &str, command: &str) {
        // The shell stays: tmux does not always keep what a dead pane last showed.
        let wrapped = format!("{command}; echo qlog-exit=$?; exec sleep 86400");
        self.run(&["new-session", "-d", "-s", name, "-x", "150", "-y", "40", &wrapped]);
    }

    fn screen(&self, name: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", name])
    }

    /// The command's exit status once it has ended.
    fn exit_status(&self, name: &str) -> Option<i32> {
        let screen = self.screen(name);
        let line = screen.lines().find_map(|l| l.trim().strip_prefix("qlog-exit="))?;
        line.parse().ok()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.socket).arg("kill-server").status();
    }
}

fn qlog_command(socket: &Path, locale: &str, args: &str) -> String {
    format!(
        "env QLOG_QUERY_SOCKET={} LANG={locale} LC_ALL={locale} TERM=xterm-256color {} {args}",
        socket.display(),
        bin_path("qlog").display()
    )
}

fn events(vm: &str, n: usize) -> Vec<Event> {
    let mut w = Workload::new(5, vm);
    (0..n).map(|_| w.next_event()).collect()
}

#[test]
fn top_shows_the_busiest_vm_first_and_quits_on_q() {
    let sink = RunningSink::start(SinkOptions::default());
    ingest_events(&sink, "sd-idle", "journal", &events("sd-idle", 10)).unwrap();
    // sd-busy keeps sending while top runs, one event at a time, until told to stop.
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Set on every way out of the scope, a failed assertion included, so the sender
    // thread ends and the scope can return.
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| {
            let (mut conn, welcome) =
                RawIngest::handshake(sink.ingest_socket(), "sd-busy", "journal");
            let mut seq = welcome.resume.last_seq;
            let mut w = Workload::new(6, "sd-busy");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                conn.send_event(seq, &w.next_event()).unwrap();
                conn.expect_ack(seq, Duration::from_secs(20));
            }
        });
        let tmux = Tmux::new("top");
        tmux.start("top", &qlog_command(sink.query_socket(), "C.UTF-8", "top"));
        let screen = poll_until("top to rank sd-busy first with a rate", WAIT, || {
            let s = tmux.screen("top");
            let rows: Vec<&str> = s.lines().filter(|l| l.starts_with("sd-")).collect();
            let busy_first = rows.first().is_some_and(|r| r.starts_with("sd-busy"));
            let rate: f64 = rows
                .first()
                .and_then(|r| r.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if busy_first && rate > 0.0 && rows.len() == 2 && s.contains("qlog top:") {
                Ok(s)
            } else {
                Err(s)
            }
        });
        assert!(screen.contains("HEALTH") && screen.contains("EVENTS/S"), "{screen}");
        assert!(
            screen.lines().any(|l| l.starts_with("sd-idle") && l.contains(" 0.0 ")),
            "{screen}"
        );
        tmux.run(&["send-keys", "-t", "top", "q"]);
        let status = poll_until("top to exit after q", WAIT, || {
            tmux.exit_status("top").ok_or_else(|| tmux.screen("top"))
        });
        assert_eq!(status, 0);
        // The alternate screen is gone: what top drew is not left on the terminal.
        assert!(!tmux.screen("top").contains("EVENTS/S"), "{}", tmux.screen("top"));
    });
}

#[test]
fn stats_draws_blocks_on_a_utf8_terminal_and_ascii_otherwise() {
    let sink = RunningSink::start(SinkOptions::default());
    ingest_events(&sink, "sd-app", "journal", &events("sd-app", 2_000)).unwrap();
    let tmux = Tmux::new("stats");
    let blocks: &[char] = &['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    for (name, locale, args) in [
        ("utf8", "C.UTF-8", "stats sd-app -S -10min"),
        ("asked", "C.UTF-8", "stats sd-app -S -10min --ascii"),
        ("plain", "C", "stats sd-app -S -10min"),
    ] {
        tmux.start(name, &qlog_command(sink.query_socket(), locale, args));
        let status = poll_until("stats to finish", WAIT, || {
            tmux.exit_status(name).ok_or_else(|| tmux.screen(name))
        });
        let screen = tmux.screen(name);
        assert_eq!(status, 0, "{screen}");
        let events = screen
            .lines()
            .find(|l| l.trim_start().starts_with("events "))
            .unwrap_or_else(|| panic!("{screen}"));
        // The 2,000 events may straddle a minute boundary, so only their presence is sure.
        assert!(events.contains(" max ") && !events.contains("no data"), "{screen}");
        assert!(screen.lines().any(|l| l.trim_start().starts_with("bytes ")), "{screen}");
        if name == "utf8" {
            assert!(events.contains(blocks), "{screen}");
        } else {
            assert!(events.is_ascii() && events.contains('#'), "{screen}");
        }
    }
}
