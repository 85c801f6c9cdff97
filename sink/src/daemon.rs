//! Wiring and lifecycle: open the store, bind both sockets, run until a signal.
//!
//! Shutdown is one sequence, owned here: on SIGTERM or SIGINT the listeners stop
//! accepting, the shutdown flag tells every ingest connection to stop reading and hand
//! over what it has, the committer commits that and raises the final acks, connections
//! send them and close, and the process exits. Each step is bounded so the whole takes
//! under two seconds even with peers that never read.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::committer::{Committer, Request, Settings};
use crate::ingest::IngestContext;
use crate::query::QueryContext;
use crate::shared::Shared;
use crate::store::Store;
use crate::{ingest, log_events, notify, query};

/// Everything qlogd needs to run; `main.rs` fills it from flags and the environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub ingest_socket: PathBuf,
    pub query_socket: PathBuf,
    /// Group to own the ingest socket (qrexec connects as root or the default user;
    /// `qubes` in production). By default, the socket keeps our own group.
    pub ingest_group: Option<String>,
    /// Group whose members may query. By default, the socket keeps our own group.
    pub query_group: Option<String>,
    pub settings: Settings,
    /// Bytes of sled page cache. By default, 64 MiB.
    pub cache_bytes: u64,
    /// Most ingest connections at once over all VMs. By default, 512.
    pub max_connections: usize,
    /// Most ingest connections at once from one VM. By default, 16.
    pub max_connections_per_vm: usize,
    /// Most ingest connections in their handshake at once. By default, 256.
    pub max_handshakes: usize,
    /// Time a new ingest connection has to send its descriptor and hello. By default, 10 s.
    pub handshake_timeout: Duration,
    /// A fixed idle timeout for established streams instead of the one derived from
    /// their heartbeat interval (tests only). By default, `None`.
    pub idle_timeout: Option<Duration>,
}

/// Most chunks queued for the committer; with `ingest::CHUNK_BYTES` this bounds the
/// memory held between connections and the store.
const COMMIT_QUEUE: usize = 64;
/// How often age-based retention runs.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Pause after a failed accept (see `accept_failed`).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// How often the committer judges every VM's health.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Budget for connections to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

pub fn run(config: Config) -> anyhow::Result<()> {
    // A warning, not a refusal: tests and a developer's first run start qlogd as root.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        log_events::running_as_root();
    }
    let store = Store::open(&config.state_dir, config.cache_bytes)?;
    let vms: BTreeMap<String, _> = store.load_vms()?.into_iter().collect();
    // Quotas keep one VM from taking the others' room, but only if they fit the disk
    // together: say so at start rather than find out when commits stop.
    if let Some(disk) = store.filesystem_bytes() {
        let mut names: Vec<&String> = vms.keys().chain(&config.settings.expected_vms).collect();
        names.sort();
        names.dedup();
        let sum: u64 = names.iter().map(|vm| config.settings.quota(vm)).sum();
        if sum > disk {
            log_events::quotas_exceed_disk(sum, disk, names.len());
        }
    }
    let streams = store.load_streams()?.into_iter().collect();
    let shared = Shared::new(
        vms,
        streams,
        store.next_batch_id()?.saturating_sub(1),
        config.settings.clone(),
    );
    // The committer compresses batches on rayon's pool (one thread per core; batch.rs,
    // committer.rs); named, its threads show as qlogd's in `top -H`. A pool already
    // built (a second daemon in one test process) is kept.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("qlogd-compress-{i}"))
        .build_global();
    let committer = Committer::new(store.clone(), Arc::clone(&shared), config.settings.clone())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("qlogd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, store, shared, committer))
}

async fn serve(
    config: Config,
    store: Store,
    shared: Arc<Shared>,
    committer: Committer,
) -> anyhow::Result<()> {
    let ingest_listener = bind(&config.ingest_socket, config.ingest_group.as_deref())?;
    let query_listener = bind(&config.query_socket, config.query_group.as_deref())?;

    let (commit_tx, commit_rx) = mpsc::channel(COMMIT_QUEUE);
    let committer_thread = std::thread::Builder::new()
        .name("qlogd-commit".into())
        .spawn(move || committer.run(commit_rx))
        .context("cannot start the committer thread")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ingest_ctx = Arc::new(
        IngestContext::new(
            commit_tx.clone(),
            Arc::clone(&shared),
            config.handshake_timeout,
            config.max_connections_per_vm,
            shutdown_rx.clone(),
        )
        .with_max_handshakes(config.max_handshakes)
        .with_idle_timeout(config.idle_timeout),
    );
    let pool = crate::query::DecodePool::per_core().context("cannot start the decode workers")?;
    let query_ctx =
        Arc::new(QueryContext { store: store.clone(), shared: Arc::clone(&shared), pool });

    // Retention ticks hold only a weak sender, so they never keep the committer alive.
    let weak = commit_tx.downgrade();
    drop(commit_tx);
    let health_weak = weak.clone();
    let telemetry = config.settings.telemetry;
    tokio::spawn(async move {
        if !telemetry {
            return;
        }
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(tx) = health_weak.upgrade() else { return };
            if tx.send(Request::HealthTick).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETENTION_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(tx) = weak.upgrade() else { return };
            if tx.send(Request::RetentionTick).await.is_err() {
                return;
            }
        }
    });

    let mut sigterm =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    log_events::listening(&config.ingest_socket, &config.query_socket, &config.state_dir);
    notify::ready();
    if let Some(interval) = notify::watchdog_interval() {
        // The ping comes from the runtime, so a wedged runtime stops it; the committer's
        // own liveness is reported through its acks, not here.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                notify::watchdog();
            }
        });
    }

    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut ingest_tasks = JoinSet::new();
    let mut query_tasks = JoinSet::new();
    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            accepted = ingest_listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        accept_failed("ingest", &error).await;
                        continue;
                    }
                };
                // Over the global limit the connection is closed at once; qrexec reports
                // that to the agent, which backs off and retries.
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    log_events::too_many_connections("all", config.max_connections);
                    continue;
                };
                let Some(handshake) = ingest::handshake_place(&ingest_ctx) else { continue };
                let ctx = Arc::clone(&ingest_ctx);
                ingest_tasks.spawn(async move {
                    ingest::serve(stream, ctx, handshake).await;
                    drop(permit);
                });
            }
            accepted = query_listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        accept_failed("query", &error).await;
                        continue;
                    }
                };
                query_tasks.spawn(query::serve(stream, Arc::clone(&query_ctx)));
            }
            Some(_) = ingest_tasks.join_next(), if !ingest_tasks.is_empty() => {}
            Some(_) = query_tasks.join_next(), if !query_tasks.is_empty() => {}
        }
    };

    let started = Instant::now();
    log_events::shutting_down(signal_name);
    notify::stopping();
    drop(ingest_listener);
    drop(query_listener);
    let _ = std::fs::remove_file(&config.ingest_socket);
    let _ = std::fs::remove_file(&config.query_socket);
    let _ = shutdown_tx.send(true);
    query_tasks.abort_all();

    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while ingest_tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        ingest_tasks.abort_all();
    }
    drop(ingest_ctx);
    // The committer exits once the last sender is gone, after committing what is queued.
    tokio::task::spawn_blocking(move || committer_thread.join()).await.ok();
    log_events::shutdown_complete(started.elapsed());
    Ok(())
}

/// Logs a failed accept and pauses: out of descriptors (EMFILE, ENFILE) the connection
/// stays queued and the next accept fails at once, so retrying without a pause would
/// spin a core until a descriptor is freed.
async fn accept_failed(socket: &str, error: &std::io::Error) {
    log_events::accept_failed(socket, error);
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Binds a Unix socket at `path`, mode 0660, replacing a stale socket file but never a
/// live one or a file of another kind.
///
/// Connecting takes write permission on the socket file, so the socket is created
/// owner-only (under a umask of 0177) and opened to its group only once it has that
/// group: at no moment can anyone but our own user, or a member of our own primary
/// group when the socket is meant for another, connect to it.
fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; remove it or choose another path",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use by a running qlogd; stop it first", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let gid = group.map(group_id).transpose()?;
    let listener = bind_owner_only(path)?;
    if let (Some(group), Some(gid)) = (group, gid) {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))?;
    Ok(listener)
}

/// Binds with the process umask at 0177, so the socket file is born mode 0600.
///
/// The umask is process-wide: a file another thread creates meanwhile is born without
/// group and other permissions too, which is stricter, never looser, than intended.
fn bind_owner_only(path: &Path) -> anyhow::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file mode creation mask; it cannot fail.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask we found.
    unsafe { libc::umask(previous) };
    bound.with_context(|| format!("cannot listen on {}", path.display()))
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("cannot read /etc/group")?;
    groups
        .lines()
        .find_map(|line| {
            let mut parts = line.split(':');
            (parts.next() == Some(name)).then(|| parts.nth(1)?.parse().ok()).flatten()
        })
        .with_context(|| format!("group {name} does not exist; create it or pass a numeric gid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Whatever umask qlogd was started with, a socket is born owner-only: nobody else
    /// can connect in the moment before `bind` gives it its group and mode.
    #[tokio::test]
    async fn sockets_are_born_owner_only_under_any_umask() {
        let dir = std::env::temp_dir().join(format!("qlogd-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("born.sock");
        let _ = std::fs::remove_file(&path);
        // SAFETY: umask cannot fail; this test restores it.
        let previous = unsafe { libc::umask(0) };
        let bound = bind_owner_only(&path);
        let born = std::fs::metadata(&path).map(|m| m.mode() & 0o777);
        // SAFETY: as above.
        unsafe { libc::umask(previous) };
        let listener = bound.expect("binds in a temp dir");
        assert_eq!(born.expect("the socket exists"), 0o600);

        // bind() then opens it to its group, and only that far.
        drop(listener);
        std::fs::remove_file(&path).expect("the socket can be removed");
        let _listener = bind(&path, None).expect("binds again");
        assert_eq!(std::fs::metadata(&path).expect("exists").mode() & 0o777, 0o660);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
