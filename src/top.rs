//! `qlog top`: a live table of every VM, refreshed every second, busiest first.
//!
//! Each refresh asks qlogd for its VM table and turns the difference between two
//! snapshots of each VM's event and byte counts into rates. On a terminal it draws in
//! the alternate screen with the keyboard in raw mode, so `q` (or Ctrl-C) quits and the
//! terminal is restored on every way out; otherwise (or with `--once`) it prints plain
//! frames one after another.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use qlog_rpc::query::{HealthState, VmInfo};

use crate::client::Client;
use crate::escape::escape_line;
use crate::vms::human_bytes;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print this many frames and exit (by default, run until q or Ctrl-C).
    #[arg(short = 'n', long)]
    pub iterations: Option<u64>,
    /// Never colour output (NO_COLOR in the environment does the same).
    #[arg(long)]
    pub no_color: bool,
}

/// Each VM's [`totals`] at one moment.
type Totals = HashMap<String, (u64, u64)>;

/// Events and bytes a VM has ever had stored: monotonic, unlike what is stored now.
fn totals(vm: &VmInfo) -> (u64, u64) {
    (vm.events_stored + vm.events_dropped_quota + vm.events_expired, vm.bytes_stored)
}

pub fn run(socket: &Path, args: &TopArgs) -> anyhow::Result<ExitCode> {
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let interactive = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    let color = !args.no_color && std::env::var_os("NO_COLOR").is_none() && interactive;
    let _screen = if interactive { Some(Screen::enter()?) } else { None };
    let mut previous: Option<(Instant, Totals)> = None;
    let mut frames = 0u64;
    loop {
        let reply = Client::vms(socket)?;
        let now = Instant::now();
        let snapshot: Totals = reply.vms.iter().map(|v| (v.vm.clone(), totals(v))).collect();
        let rates = previous.as_ref().map(|(at, before)| {
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            snapshot
                .iter()
                .map(|(vm, (e, b))| {
                    let (e0, b0) = before.get(vm).copied().unwrap_or((*e, *b));
                    let rate =
                        (e.saturating_sub(e0) as f64 / secs, b.saturating_sub(b0) as f64 / secs);
                    (vm.clone(), rate)
                })
                .collect::<HashMap<_, _>>()
        });
        let width = crate::stats::terminal_columns();
        let text = frame(&reply.vms, rates.as_ref(), width, color);
        let mut out = std::io::stdout().lock();
        if interactive {
            // Home, draw, clear what the previous frame left below.
            write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\r\n"))
        } else {
            writeln!(out, "{text}")
        }
        .and_then(|_| out.flush())
        .context("cannot write output")?;
        drop(out);
        frames += 1;
        if args.iterations.is_some_and(|n| frames >= n) {
            return Ok(ExitCode::SUCCESS);
        }
        previous = Some((now, snapshot));
        if interactive {
            if wait_for_quit(interval)? {
                return Ok(ExitCode::SUCCESS);
            }
        } else {
            std::thread::sleep(interval);
        }
    }
}

/// One screenful: a summary line, a header and a row per VM, busiest first.
pub fn frame(
    vms: &[VmInfo],
    rates: Option<&HashMap<String, (f64, f64)>>,
    width: usize,
    color: bool,
) -> String {
    let rate = |vm: &str| rates.and_then(|r| r.get(vm).copied());
    let mut rows: Vec<&VmInfo> = vms.iter().collect();
    rows.sort_by(|a, b| {
        let (ra, rb) = (rate(&a.vm).map_or(0.0, |r| r.0), rate(&b.vm).map_or(0.0, |r| r.0));
        rb.total_cmp(&ra).then_with(|| a.vm.cmp(&b.vm))
    });
    let total: f64 = rows.iter().filter_map(|v| rate(&v.vm)).map(|r| r.0).sum();
    let unhealthy = rows.iter().filter(|v| v.health.state != HealthState::Ok).count();
    let mut out = format!(
        "qlog top: {} VMs, {} events/s, {} not ok    {}    q quits\n\n",
        rows.len(),
        if rates.is_some() { format!("{total:.1}") } else { "-".into() },
        unhealthy,
        chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
    );
    out.push_str(&format!(
        "{:<24} {:<11} {:>10} {:>11} {:>10} {:>6} {:<4} WHY\n",
        "VM", "HEALTH", "EVENTS/S", "BYTES/S", "STORED", "QUOTA", "CONN"
    ));
    for vm in rows {
        let (eps, bps) = match rate(&vm.vm) {
            Some((e, b)) => (format!("{e:.1}"), format!("{}/s", human_bytes(b as u64))),
            None => ("-".into(), "-".into()),
        };
        let quota = if vm.quota_bytes == 0 {
            0.0
        } else {
            vm.bytes_stored as f64 * 100.0 / vm.quota_bytes as f64
        };
        let state = format!("{:<11}", vm.health.state.as_str());
        let why = vm.health.reasons.first().map(|r| escape_line(r.as_bytes())).unwrap_or_default();
        let cells = |state: &str| {
            format!(
                "{:<24} {} {:>10} {:>11} {:>10} {:>5.1}% {:<4} ",
                escape_line(vm.vm.as_bytes()),
                state,
                eps,
                bps,
                human_bytes(vm.bytes_stored),
                quota,
                if vm.connected { "yes" } else { "no" },
            )
        };
        let plain = cells(&state);
        // The reason goes last and is cut to the terminal, so rows never wrap.
        let room = width.saturating_sub(plain.chars().count());
        let paint = match vm.health.state {
            _ if !color => None,
            HealthState::Ok => None,
            HealthState::Gaps | HealthState::Lagging => Some("\x1b[33m"),
            _ => Some("\x1b[1;31m"),
        };
        let mut line = match paint {
            Some(code) => cells(&format!("{code}{state}\x1b[0m")),
            None => plain,
        };
        line.extend(why.chars().take(room));
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The alternate screen with the cursor hidden and the keyboard in raw mode, for as long
/// as this lives.
struct Screen {
    saved: libc::termios,
}

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr fills the struct we own; fd 0 is a terminal (checked).
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot read the terminal mode");
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        raw.c_cc[libc::VMIN] = 0;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above, with a termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot set the terminal mode");
        }
        print!("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J");
        let _ = std::io::stdout().flush();
        Ok(Screen { saved })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        // SAFETY: restores the mode saved in enter().
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Waits up to `interval` for a key; true if it was q, Q, Esc or Ctrl-C.
fn wait_for_quit(interval: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + interval;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("cannot wait for the keyboard");
        }
        if n == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 32];
        // SAFETY: reads into a buffer we own.
        let got = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            // The terminal went away: nothing to draw on.
            return Ok(true);
        }
        if buf[..got as usize].iter().any(|b| matches!(b, b'q' | b'Q' | 0x1b | 0x03)) {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlog_rpc::query::Health;

    fn vm(name: &str, state: HealthState, reason: &str) -> VmInfo {
        VmInfo {
            vm: name.into(),
            health: Health {
                state,
                reasons: if reason.is_empty() { vec![] } else { vec![reason.into()] },
                ..Health::default()
            },
            ..VmInfo::default()
        }
    }

    #[test]
    fn busiest_first_with_health_and_reason_cut_to_width() {
        let vms = vec![
            vm(
                "sd-quiet",
                HealthState::Silent,
                "nothing heard for 95 s (it promised a heartbeat every 30 s)",
            ),
            vm("sd-busy", HealthState::Ok, ""),
        ];
        let rates = HashMap::from([
            ("sd-busy".to_string(), (120.0, 2048.0)),
            ("sd-quiet".to_string(), (0.0, 0.0)),
        ]);
        let text = frame(&vms, Some(&rates), 100, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[3].starts_with("sd-busy") && lines[3].contains("120.0"), "{text}");
        assert!(lines[4].starts_with("sd-quiet") && lines[4].contains("silent"), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 100), "{text}");
        assert!(lines[0].contains("120.0 events/s") && lines[0].contains("1 not ok"), "{text}");
    }
}
