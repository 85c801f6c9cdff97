//! The agent's one control loop: connect, serve, tear down, back off, shut down.
//!
//! Owns the lifecycle. Every other thread (signals, source, ack reader, writer) reports
//! here through one channel of [`Msg`], and only this loop decides what happens next, so
//! shutdown is handled in one place:
//!
//! - SIGTERM/SIGINT: stop reading, end the stream after the items held, and wait at most
//!   the shutdown timeout for the last ack; a second signal exits at once.
//! - End of stdin: the same, but without a time limit, reconnecting as often as needed.
//! - Otherwise a lost connection is followed by a jittered backoff and a new one, which
//!   replays every unacknowledged item; the loop never moves past an unacknowledged item.
//!
//! The exit status is 0 if and only if every item read was acknowledged.

use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use qlog_rpc::Welcome;

use crate::backoff::{Backoff, XorShift64};
use crate::config::{Config, Source};
use crate::log::{Level, Log};
use crate::shared::Shared;
use crate::signals;
use crate::source::{self, SourceContext, SourceHandle};
use crate::transport::{
    describe_exit, hello_frame, spawn_reader, spawn_writer, CloseReason, ConnContext, Intervals,
    RunningQrexecClient,
};
use crate::window::{Acked, Resumed, Window};

/// How long the hello may wait for a welcome. qrexec may first start the log VM, and
/// allows itself 120 s for the data connection after that.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a client that closed its output gets to exit before it is killed.
const CLIENT_EXIT_GRACE: Duration = Duration::from_secs(2);

/// A connection that stayed up this long made progress, even if it acked nothing (an idle
/// journal), so the next failure starts the backoff afresh.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);

/// Everything the supervisor hears about.
#[derive(Debug)]
pub enum Msg {
    /// A termination signal arrived.
    Signal(i32),
    /// The sink welcomed connection `conn`; the reader already applied its resume point
    /// (`None` on the first welcome, which only set where numbering starts).
    Welcome { conn: u64, welcome: Welcome, resumed: Option<Resumed> },
    /// The sink acknowledged up to `seq`; the reader already applied it.
    Acked { conn: u64, seq: u64, outcome: Acked },
    /// The sink answered our end of stream.
    SinkEnd { conn: u64, last_seq: u64 },
    /// Connection `conn` is over, for `reason`.
    Closed { conn: u64, reason: CloseReason },
    /// The stdin source read its last event.
    InputDone,
}

/// How serving one connection ended.
enum Served {
    /// Every item is acknowledged and nothing more will come: exit 0.
    Finished,
    /// Exit now with whatever is still unacknowledged.
    ExitNow,
    /// The connection failed; try again after a backoff.
    Failed { progressed: bool, reason: Option<CloseReason> },
}

/// Runs the agent until its input ends or it is told to stop.
pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    let (to, from) = mpsc::channel();
    // First, before any thread exists, so that every thread inherits the blocked mask.
    signals::forward_termination_signals(to.clone())
        .context("cannot block SIGTERM and SIGINT for orderly shutdown")?;
    let seed = XorShift64::seed_from_time_and_pid();
    let window = Window::new(1, config.max_in_flight_events, config.max_in_flight_bytes);
    let mut supervisor = Supervisor {
        log: config.log,
        backoff: Backoff::new(config.backoff_initial, config.backoff_max, seed),
        shared: Arc::new(Shared::new(window)),
        config,
        to,
        from,
        source: None,
        conn: 0,
        deadline: None,
        signals: 0,
    };
    supervisor.run()
}

struct Supervisor {
    config: Config,
    log: Log,
    shared: Arc<Shared>,
    to: Sender<Msg>,
    from: Receiver<Msg>,
    backoff: Backoff,
    /// Started at the first welcome, which says where to begin.
    source: Option<SourceHandle>,
    /// The number of the latest connection; messages from older ones are stale.
    conn: u64,
    /// Set by the first signal: when waiting for acknowledgements ends.
    deadline: Option<Instant>,
    /// Termination signals received.
    signals: u32,
}

impl Supervisor {
    fn run(&mut self) -> anyhow::Result<ExitCode> {
        self.log.info(format_args!(
            "forwarding {} as stream {} to qlogd in {}",
            match &self.config.source {
                Source::Journal { .. } => "the journal",
                Source::Stdin { .. } => "stdin",
            },
            self.config.stream,
            self.config.log_vm
        ));
        loop {
            if let Some(code) = self.exit_if_done() {
                return Ok(code);
            }
            let started = Instant::now();
            let (progressed, reason, status) = match self.connect_and_serve()? {
                (Served::Finished, _) => return Ok(self.exit_code()),
                (Served::ExitNow, _) => return Ok(self.exit_code()),
                (Served::Failed { progressed, reason }, status) => (progressed, reason, status),
            };
            if progressed || started.elapsed() >= STABLE_CONNECTION {
                self.backoff.reset();
            }
            if let Some(code) = self.exit_if_done() {
                return Ok(code);
            }

            let delay = self.backoff.next_delay();
            if let Some(reason) = &reason {
                self.log.at(reason.level(), reason);
            }
            let unacked = self.shared.unacked();
            let (level, what) = match status {
                ClientEnd::CannotStart(msg) => (Level::Error, msg),
                ClientEnd::Exited(status) => describe_exit(status, unacked),
            };
            self.log
                .at(level, format_args!("{what}; reconnecting in {:.1} s", delay.as_secs_f64()));
            if let Some(code) = self.sleep(delay) {
                return Ok(code);
            }
        }
    }

    /// The exit code once the loop is over, with the count of what is lost.
    fn exit_code(&self) -> ExitCode {
        let unacked = self.shared.unacked();
        // For stdin, success also needs the whole input read: an agent stopped before
        // that (say, qlogd was never reached) has delivered nothing of the rest.
        let input_ended = self.shared.lock().input_ended;
        if matches!(self.config.source, Source::Stdin { .. }) && !input_ended {
            self.log.error(format_args!(
                "exiting before the end of stdin: the rest of the input was not read, and {unacked} events not acknowledged by qlogd may be lost"
            ));
            return ExitCode::FAILURE;
        }
        if unacked == 0 {
            self.log.info("every event read was acknowledged by qlogd");
            return ExitCode::SUCCESS;
        }
        match self.config.source {
            Source::Journal { .. } => self.log.warn(format_args!(
                "exiting with {unacked} events not acknowledged by qlogd; the journal still \
                 holds them, and the next agent resumes from qlogd's cursor"
            )),
            Source::Stdin { .. } => self.log.error(format_args!(
                "exiting with {unacked} events not acknowledged by qlogd: they may be lost"
            )),
        }
        ExitCode::FAILURE
    }

    /// `Some` exit code if and only if there is nothing left to do.
    fn exit_if_done(&self) -> Option<ExitCode> {
        let (finishing, empty) = {
            let state = self.shared.lock();
            (state.finishing, state.window.is_empty())
        };
        if finishing && empty {
            return Some(self.exit_code());
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(self.exit_code());
        }
        None
    }

    /// Handles a termination signal; true if and only if the agent must exit at once.
    fn on_signal(&mut self, signal: i32) -> bool {
        self.signals += 1;
        if self.signals > 1 {
            self.log.warn(format_args!("{} again: exiting now", signals::name(signal)));
            return true;
        }
        let timeout = self.config.shutdown_timeout;
        match self.shared.unacked() {
            0 => self.log.info(format_args!("{}: ending the stream", signals::name(signal))),
            unacked => self.log.info(format_args!(
                "{}: ending the stream and waiting up to {} ms for qlogd to acknowledge {unacked} \
                 events",
                signals::name(signal),
                timeout.as_millis(),
            )),
        }
        self.shared.begin_shutdown();
        if let Some(source) = &self.source {
            source.stop();
        }
        self.deadline = Some(Instant::now() + timeout);
        false
    }

    /// Waits out a backoff delay, still handling signals; `Some` if the agent must exit.
    fn sleep(&mut self, delay: Duration) -> Option<ExitCode> {
        let mut until = Instant::now() + delay;
        loop {
            if let Some(deadline) = self.deadline {
                until = until.min(deadline);
            }
            if let Some(code) = self.exit_if_done() {
                return Some(code);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            match self.from.recv_timeout(until - now) {
                Ok(Msg::Signal(signal)) => {
                    if self.on_signal(signal) {
                        return Some(self.exit_code());
                    }
                }
                // Anything else is from a connection already torn down, or InputDone,
                // whose effect is already in the shared state.
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the supervisor holds a sender of its own channel")
                }
            }
        }
    }

    fn start_source(&mut self, welcome: &Welcome) -> anyhow::Result<()> {
        let limits = self.shared.lock().limits;
        let ctx = SourceContext {
            shared: Arc::clone(&self.shared),
            to: self.to.clone(),
            log: self.log,
            filters: self.config.filters.clone(),
            limits,
            backoff: Backoff::new(
                self.config.backoff_initial,
                self.config.backoff_max,
                XorShift64::seed_from_time_and_pid(),
            ),
        };
        let handle = source::start(&self.config.source, &welcome.resume, ctx)
            .context("cannot start the source thread")?;
        self.source = Some(handle);
        Ok(())
    }

    fn on_welcome(&mut self, welcome: &Welcome, resumed: Option<Resumed>) -> anyhow::Result<()> {
        let unacked = self.shared.unacked();
        self.log.info(format_args!(
            "connected to qlogd in {} as VM {}, stream {} (protocol {}); it holds up to seq {}{}",
            self.config.log_vm,
            welcome.vm,
            welcome.stream,
            welcome.version,
            welcome.resume.last_seq,
            if unacked > 0 { format!("; resending {unacked} events") } else { String::new() }
        ));
        if welcome.stream != self.config.stream {
            self.log.warn(format_args!(
                "qlogd files this stream as {:?}, not {:?} as asked",
                welcome.stream, self.config.stream
            ));
        }
        let last = welcome.resume.last_seq;
        match resumed {
            // FIXME: the journal source could restart journalctl at the sink's cursor here
            // and recover what the sink lost; worth doing if sinks are ever restored from
            // backups, which is the one way a sink loses acknowledged events.
            Some(Resumed::SinkBehind { acked_before }) => self.log.error(format_args!(
                "qlogd resumes stream {} at seq {last}, below seq {acked_before} it had \
                 acknowledged: it lost stored events, which this agent no longer holds",
                welcome.stream
            )),
            Some(Resumed::SinkAhead { renumbered, old_last }) => self.log.error(format_args!(
                "qlogd holds stream {} up to seq {last}, past this agent's last seq {old_last}: \
                 is another agent sending the same stream? {renumbered} unacknowledged events \
                 now follow seq {last}",
                welcome.stream
            )),
            Some(Resumed::InStep { acked }) if acked > 0 => {
                self.log.debug(format_args!("qlogd already held {acked} events whose ack was lost"))
            }
            Some(Resumed::InStep { .. }) => {}
            None => self.start_source(welcome)?,
        }
        Ok(())
    }

    /// One connection, from starting the client to reaping it.
    fn connect_and_serve(&mut self) -> anyhow::Result<(Served, ClientEnd)> {
        self.conn += 1;
        let conn = self.conn;
        if conn > 1 {
            self.shared.update(|state| state.counters.reconnects += 1);
        }
        let program = &self.config.qrexec_client;
        let (mut client, mut stdin, stdout) =
            match RunningQrexecClient::spawn(program, &self.config.log_vm) {
                Ok(started) => started,
                Err(e) => {
                    let msg = format!(
                        "cannot run {} ({e}): is qrexec installed? set --qrexec-client or \
                         QLOG_QREXEC_CLIENT",
                        program.display()
                    );
                    let failed = Served::Failed { progressed: false, reason: None };
                    return Ok((failed, ClientEnd::CannotStart(msg)));
                }
            };
        self.log.debug(format_args!(
            "connection {conn}: started {} {} {}",
            program.display(),
            self.config.log_vm,
            qlog_rpc::INGEST_SERVICE
        ));
        let ctx = ConnContext {
            conn,
            shared: Arc::clone(&self.shared),
            to: self.to.clone(),
            log: self.log,
        };
        let hello = hello_frame(
            &self.config.stream,
            self.config.heartbeat_interval,
            self.config.telemetry_interval,
        );
        // A client that fails at once (a policy refusal) may close its stdin before the
        // hello is in; its exit status then says why, so this is no reason to stop here.
        let hello_sent = std::io::Write::write_all(&mut stdin, &hello);
        let reader = spawn_reader(ctx.clone(), stdout).context("cannot start a reader thread")?;
        let mut stdin = Some(stdin);
        let mut writer: Option<JoinHandle<()>> = None;

        let served = match hello_sent {
            Ok(()) => self.serve(&ctx, &mut stdin, &mut writer)?,
            Err(e) => {
                Served::Failed { progressed: false, reason: Some(CloseReason::WriteFailed(e)) }
            }
        };

        // Tear down: stop the writer (its stdin closing tells the sink we are gone), let
        // the client exit or make it, then collect the threads, whose pipes are closed by
        // then.
        self.shared.update(|state| state.active_conn = 0);
        drop(stdin);
        let status = match &served {
            Served::ExitNow => client.stop(),
            Served::Finished | Served::Failed { .. } => {
                client.wait_for_exit(CLIENT_EXIT_GRACE).or_else(|| client.stop())
            }
        };
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        let _ = reader.join();
        Ok((served, ClientEnd::Exited(status)))
    }

    /// Handles messages while connection `ctx.conn` is up.
    fn serve(
        &mut self,
        ctx: &ConnContext,
        stdin: &mut Option<std::process::ChildStdin>,
        writer: &mut Option<JoinHandle<()>>,
    ) -> anyhow::Result<Served> {
        let conn = ctx.conn;
        let started = Instant::now();
        let mut welcomed = false;
        let mut progressed = false;
        // Set once every item is acknowledged at the end: how long to wait for the sink's
        // own end before closing anyway.
        let mut drain_until: Option<Instant> = None;
        loop {
            let (finishing, empty) = {
                let state = self.shared.lock();
                (state.finishing, state.window.is_empty())
            };
            if finishing && empty {
                if !welcomed {
                    // Nothing was ever sent on this connection, so nothing is owed.
                    return Ok(Served::Finished);
                }
                drain_until.get_or_insert_with(|| Instant::now() + self.config.shutdown_timeout);
            }

            let now = Instant::now();
            let mut wake: Option<Instant> = drain_until;
            if let Some(deadline) = self.deadline {
                wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
            }
            if !welcomed {
                let handshake = started + HANDSHAKE_TIMEOUT;
                wake = Some(wake.map_or(handshake, |w| w.min(handshake)));
            }
            let msg = match wake {
                Some(at) if at <= now => None,
                Some(at) => match self.from.recv_timeout(at - now) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        unreachable!("the supervisor holds a sender of its own channel")
                    }
                },
                None => Some(self.from.recv().expect("the supervisor holds a sender")),
            };

            let Some(msg) = msg else {
                // A timer fired.
                let now = Instant::now();
                if drain_until.is_some_and(|d| now >= d) {
                    self.log.debug("qlogd acknowledged everything but sent no end; closing");
                    return Ok(Served::Finished);
                }
                if self.deadline.is_some_and(|d| now >= d) {
                    return Ok(Served::ExitNow);
                }
                if !welcomed && now >= started + HANDSHAKE_TIMEOUT {
                    let reason = CloseReason::HandshakeTimeout(HANDSHAKE_TIMEOUT);
                    return Ok(Served::Failed { progressed, reason: Some(reason) });
                }
                continue;
            };

            match msg {
                Msg::Signal(signal) => {
                    if self.on_signal(signal) {
                        return Ok(Served::ExitNow);
                    }
                }
                Msg::InputDone => {}
                Msg::Welcome { conn: c, welcome, resumed } if c == conn => {
                    welcomed = true;
                    self.on_welcome(&welcome, resumed)?;
                    let stdin = stdin.take().expect("a connection is welcomed only once");
                    let intervals = Intervals {
                        heartbeat: self.config.heartbeat_interval,
                        telemetry: self.config.telemetry_interval,
                    };
                    self.shared.update(|state| state.active_conn = conn);
                    *writer = Some(
                        spawn_writer(ctx.clone(), stdin, intervals)
                            .context("cannot start a writer thread")?,
                    );
                }
                Msg::Acked { conn: c, seq, outcome } if c == conn => match outcome {
                    Acked::Released { released } => progressed |= released > 0,
                    Acked::Beyond { last_assigned, released } => {
                        progressed |= released > 0;
                        self.log.warn(format_args!(
                            "qlogd acknowledged seq {seq}, but the last seq sent is \
                             {last_assigned}; ignoring the excess"
                        ));
                    }
                },
                Msg::SinkEnd { conn: c, last_seq } if c == conn => {
                    let unacked = self.shared.unacked();
                    if unacked == 0 {
                        self.log.debug(format_args!("qlogd ended the stream at seq {last_seq}"));
                        if finishing {
                            return Ok(Served::Finished);
                        }
                    }
                    let reason = CloseReason::Protocol(format!(
                        "it ended the stream at seq {last_seq} with {unacked} events not \
                         acknowledged"
                    ));
                    let reason = (unacked > 0).then_some(reason);
                    return Ok(Served::Failed { progressed, reason });
                }
                Msg::Closed { conn: c, reason } if c == conn => {
                    return Ok(Served::Failed { progressed, reason: Some(reason) });
                }
                // Messages from connections already torn down.
                Msg::Welcome { .. }
                | Msg::Acked { .. }
                | Msg::SinkEnd { .. }
                | Msg::Closed { .. } => {}
            }
        }
    }
}

/// How the qrexec client of a connection ended.
enum ClientEnd {
    /// It could not be started; the message says why and what to do.
    CannotStart(String),
    /// It exited with this status, or `None` if the agent had to kill it.
    Exited(Option<std::process::ExitStatus>),
}
