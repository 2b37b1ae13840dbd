//! `run`: watch → durable queue → upload workers, with scans as the safety net.
//!
//! Tasks (all stopped by one `CancellationToken`, none detached):
//! - the watcher thread (notify) feeds a bounded channel; the event task turns events into queue
//!   entries and directory scans;
//! - the scan task runs a full scan at startup (beside the watcher, so startup is not blocked),
//!   every `scan_interval` (`scan_interval_when_degraded` without full inotify coverage) and
//!   whenever events were lost;
//! - the dispatcher claims due items and runs up to `upload.concurrency` uploads.
//!
//! Shutdown: intake stops at once; uploads in flight get `shutdown_grace` to finish; whatever is
//! left stays in the durable queue for the next start.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod service;
mod workers;

use crate::config::Config;
use crate::layout::MediaPath;
use crate::queue::Queue;
use crate::scan::{self, Item};
use crate::state::{Committer, State, StateError, now_ms};
use crate::sweep::Sweeper;
use crate::upload::Uploader;
use crate::upload::s3::{ObjectStore, S3Error};
use crate::watch::{self, Action, Msg};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the bucket is not usable")]
    Bucket(#[source] S3Error),
    #[error(transparent)]
    Db(#[from] crate::synapse_db::DbError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cannot listen on metrics.listen {addr} (in use? another daemon?)")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Knobs that are not configuration (tests use them to provoke overflows).
#[derive(Debug, Clone)]
pub struct Options {
    /// Capacity of the channel between notify's thread and the event task.
    pub event_buffer: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { event_buffer: 8192 }
    }
}

#[derive(Default)]
struct Stats {
    uploaded: AtomicU64,
    adopted: AtomicU64,
    healed: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
}

struct Shared {
    config: Config,
    queue: Arc<Queue>,
    uploader: Uploader,
    state: State,
    committer: Committer,
    /// Present when the database is configured.
    sweeper: Option<Arc<Sweeper>>,
    /// One sweep at a time in this process (the advisory lock covers other instances).
    sweeping: tokio::sync::Mutex<()>,
    stats: Stats,
    /// Set when events were lost; the scan task then runs a full scan.
    rescan: Arc<AtomicBool>,
    wake_scan: Arc<tokio::sync::Notify>,
    /// inotify does not cover the whole store (watch limit, watch error).
    degraded: AtomicBool,
    /// The first parts of the store a scan could not read, for `status` (not only the log).
    pub(super) unreadable: std::sync::Mutex<Vec<String>>,
    /// The watch is in place: a scan that starts now misses nothing written before it started.
    watching: AtomicBool,
    /// Last time (ms) the dispatcher loop ran: the systemd watchdog's liveness signal.
    heartbeat: AtomicU64,
    health: Arc<crate::metrics::Health>,
}

/// Opens the state database. A running daemon holds it for good: fail at once. A `status`, `sweep`
/// or `upload` run holds it for a moment: wait for it, and say so.
async fn open_state(state_dir: &std::path::Path) -> Result<State, DaemonError> {
    let dir = state_dir.to_owned();
    match tokio::task::spawn_blocking(move || State::open(&dir))
        .await
        .expect("open does not panic")
    {
        Err(StateError::Locked { .. }) => {}
        other => return Ok(other?),
    }
    if let Ok(Some(_)) = crate::control::request(state_dir, &crate::control::Request::Status).await
    {
        return Err(crate::control::ControlError::AlreadyRunning(state_dir.to_owned()).into());
    }
    tracing::info!(
        state_dir = %state_dir.display(),
        "Waiting up to 10 s for the state database: another synapse-s3-offload command (status, sweep, upload) holds it."
    );
    Ok(State::open_waiting(state_dir, Duration::from_secs(10)).await?)
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    run_with(config, shutdown, Options::default()).await
}

pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    opts: Options,
) -> Result<(), DaemonError> {
    crate::upload::limit_malloc_arenas();
    let state = open_state(&config.state_dir).await?;
    let (committer, commit_thread) = Committer::start(state.clone());
    let queue = Arc::new(Queue::open(&state, committer.clone(), &config.upload)?);
    let control = crate::control::bind(&config.state_dir).await?;
    // The queue is the only retry layer of the daemon: one attempt per S3 request.
    let mut s3 = config.s3.clone();
    s3.max_attempts = 1;
    let store = Arc::new(ObjectStore::new(&s3, config.upload.multipart_part_size).await);
    let bucket_ok = match store.check_bucket().await {
        Ok(()) => true,
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %crate::Chain(&e), "S3 is not reachable yet; files are queued and retried.");
            false
        }
        Err(e) => return Err(DaemonError::Bucket(e)),
    };
    // The recorder goes in before any task runs, so nothing counted at startup is lost.
    let metrics_listener = match config.metrics.listen {
        Some(addr) => {
            crate::metrics::install();
            let listener = crate::metrics::bind(addr).await;
            Some(listener.map_err(|source| DaemonError::Metrics { addr, source })?)
        }
        None => None,
    };
    // One pool for the sweep and the uploads' arbiter (Synapse's sha256 of a media).
    let db = match &config.database {
        Some(db) => Some(Arc::new(crate::synapse_db::Db::new(db)?)),
        None => None,
    };
    let sweeper = db.as_ref().map(|db| {
        Arc::new(Sweeper {
            config: config.clone(),
            db: db.clone(),
            store: store.clone(),
            state: state.clone(),
            committer: committer.clone(),
            queue: queue.clone(),
        })
    });
    let uploader = Uploader::new(
        config.media_store_path.clone(),
        store,
        state.clone(),
        config.upload.multipart_threshold,
        config.upload.multipart_part_size,
    )
    .arbiter(db)
    .heal(
        config
            .upload
            .heal_bad_local_copies
            .then_some(config.upload.settle),
    );
    let shared = Arc::new(Shared {
        config,
        queue,
        uploader,
        state,
        committer: committer.clone(),
        sweeper,
        sweeping: tokio::sync::Mutex::new(()),
        stats: Stats::default(),
        rescan: Arc::new(AtomicBool::new(true)),
        wake_scan: Arc::new(tokio::sync::Notify::new()),
        degraded: AtomicBool::new(false),
        unreadable: std::sync::Mutex::new(Vec::new()),
        watching: AtomicBool::new(false),
        heartbeat: AtomicU64::new(now_ms()),
        health: Arc::new(crate::metrics::Health::default()),
    });
    if bucket_ok {
        shared.health.s3_ok();
    }
    let depth = shared.queue.depth();
    tracing::info!(queued = depth.queued, failed = depth.failed, setup = %shared.config.summary(), "Starting.");

    let intake = shutdown.child_token();
    let mut tasks = JoinSet::new();
    let (tx, rx) = tokio::sync::mpsc::channel(opts.event_buffer);
    // Adding the watches walks the whole tree: do it beside the startup scan, not before it.
    let watcher = {
        let s = shared.clone();
        tokio::task::spawn_blocking(move || {
            let w = watch::start(
                &s.config.media_store_path,
                tx,
                s.rescan.clone(),
                s.wake_scan.clone(),
            );
            match &w {
                // Files written while the watches were being added have no events: one more scan,
                // now that the watch is in place, finds them (it costs only stats: recorded and
                // queued files are skipped).
                Ok(_) => {
                    let dirs = scan::count_dirs(&s.config.media_store_path);
                    metrics::gauge!(crate::metrics::WATCHED_DIRS).set(dirs as f64);
                    tracing::info!(dirs, "Watching the media store.");
                    s.watching.store(true, Ordering::SeqCst);
                    s.rescan.store(true, Ordering::SeqCst);
                    s.wake_scan.notify_one();
                }
                Err(e) => watch_failed(&s, e),
            }
            w.ok()
        })
    };
    tasks.spawn(events(shared.clone(), rx, intake.clone()));
    tasks.spawn(scans(shared.clone(), intake.clone()));
    tasks.spawn(workers::summaries(shared.clone(), intake.clone()));
    tasks.spawn(service::sweeps(shared.clone(), intake.clone()));
    tasks.spawn(service::control(shared.clone(), control, intake.clone()));
    tasks.spawn(service::systemd(shared.clone(), intake.clone()));
    if let Some(listener) = metrics_listener {
        tasks.spawn(service::metrics(shared.clone(), listener, intake.clone()));
    }
    let dispatcher = tokio::spawn(workers::dispatch(shared.clone(), intake.clone()));

    // A failed commit means the state database cannot record anything any more (redb needs to
    // be opened again after an I/O error): stop, loudly, rather than run on without being able to
    // record an upload or queue a file. Nothing is lost: queued files stay in the last committed
    // state, and the next start's scan finds the files that could not be queued. The supervisor
    // restarts the daemon (systemd: Restart=on-failure), which works again once space returns.
    let failed = tokio::select! {
        _ = shutdown.cancelled() => None,
        e = committer.failure() => Some(e),
    };
    if let Some(e) = &failed {
        tracing::error!(error = %e, state_dir = %shared.config.state_dir.display(), "The state database cannot be written (full or failing disk?); stopping. Free space or fix the disk, then start the daemon again.");
    }
    tracing::info!(grace = ?shared.config.shutdown_grace, "Shutting down: finishing uploads in flight.");
    intake.cancel();
    let watch = watcher.await.ok().flatten();
    drop(watch);
    while tasks.join_next().await.is_some() {}
    let _ = dispatcher.await;
    let depth = shared.queue.depth();
    drop(shared);
    drop(committer);
    // The uploader's last committer clone went with `shared`: the thread flushes and ends.
    let _ = tokio::task::spawn_blocking(move || commit_thread.join()).await;
    tracing::info!(queued = depth.queued, "Stopped.");
    match failed {
        Some(e) => Err(DaemonError::State(StateError::Commit(e))),
        None => Ok(()),
    }
}

fn watch_failed(s: &Shared, e: &notify::Error) {
    if !s.degraded.swap(true, Ordering::SeqCst) {
        if watch::is_watch_limit(e) {
            tracing::error!("{}", watch::WATCH_LIMIT_ADVICE);
        } else {
            tracing::error!(error = %crate::Chain(e), "Cannot watch the media store; relying on periodic scans (scan_interval_when_degraded).");
        }
    }
    s.rescan.store(true, Ordering::SeqCst);
    s.wake_scan.notify_one();
}

/// Turns notify's events into queue entries and directory scans.
async fn events(
    s: Arc<Shared>,
    mut rx: tokio::sync::mpsc::Receiver<Msg>,
    intake: CancellationToken,
) {
    let root = s.config.media_store_path.clone();
    // New directories are scanned again a little later: notify adds the watch of a new directory
    // only after delivering its Create event, so a file written and closed in between has no
    // event, and an immediate scan may run before it exists. A scan after the watch is in place
    // closes that gap (the file is then either seen by the scan or has its own events).
    let mut rescans: std::collections::BTreeMap<tokio::time::Instant, Vec<std::path::PathBuf>> =
        Default::default();
    loop {
        let next_rescan = rescans.keys().next().copied();
        let first = tokio::select! {
            _ = intake.cancelled() => return,
            _ = async { tokio::time::sleep_until(next_rescan.expect("guarded")).await }, if next_rescan.is_some() => {
                let (_, dirs) = rescans.pop_first().expect("guarded");
                let found = scan_dirs(&s, dirs).await;
                if !found.is_empty() {
                    enqueue(&s, found).await;
                }
                continue;
            }
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        // Batch what is already waiting: one transaction for a burst of events.
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut files = Vec::new();
        let mut new_dirs = Vec::new();
        for msg in batch {
            match msg {
                Msg::Error(e) if watch::is_watch_limit(&e) => watch_failed(&s, &e),
                Msg::Error(e) => {
                    tracing::warn!(error = %crate::Chain(&e), "Watch error; scanning the store.");
                    s.rescan.store(true, Ordering::SeqCst);
                    s.wake_scan.notify_one();
                }
                Msg::Event(ev) => {
                    for action in watch::classify(&ev) {
                        match action {
                            Action::Rescan => {
                                tracing::warn!("inotify queue overflowed; scanning the store.");
                                s.rescan.store(true, Ordering::SeqCst);
                                s.wake_scan.notify_one();
                            }
                            Action::Dir(dir) => {
                                let now = tokio::time::Instant::now();
                                for later in NEW_DIR_RESCANS {
                                    rescans.entry(now + later).or_default().push(dir.clone());
                                }
                                new_dirs.push(dir);
                            }
                            Action::File(p) => {
                                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                                    new_dirs.push(p);
                                } else if let Some(mp) =
                                    media_path(&root, &p, s.config.upload.include_url_cache)
                                {
                                    files.push((mp, now_ms(), false));
                                }
                            }
                        }
                    }
                }
            }
        }
        // The batch's new directories are scanned together; everything is enqueued in one commit.
        if !new_dirs.is_empty() {
            files.extend(scan_dirs(&s, new_dirs).await);
        }
        if !files.is_empty() {
            enqueue(&s, files).await;
        }
    }
}

/// When a new directory is scanned again after its immediate scan.
const NEW_DIR_RESCANS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

fn media_path(root: &Path, p: &Path, include_url_cache: bool) -> Option<MediaPath> {
    MediaPath::from_absolute(root, p)
        .ok()
        .filter(|m| m.is_uploadable(include_url_cache))
}

async fn enqueue(s: &Shared, files: Vec<(MediaPath, u64, bool)>) {
    metrics::counter!(crate::metrics::ENQUEUED).increment(files.len() as u64);
    for (p, due, settle) in &files {
        tracing::trace!(path = %p, due, settle, "Enqueue.");
    }
    if let Err(e) = s.queue.enqueue(files).await {
        // Cannot make it durable: the next full scan finds these files again.
        tracing::error!(error = %crate::Chain(&e), "Cannot enqueue; will rescan.");
        s.rescan.store(true, Ordering::SeqCst);
    }
}

/// Scans new directories (their files may have produced no events); returns what to enqueue.
async fn scan_dirs(s: &Arc<Shared>, dirs: Vec<std::path::PathBuf>) -> Vec<(MediaPath, u64, bool)> {
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let root = &s2.config.media_store_path;
        let mut out = Vec::new();
        for dir in dirs {
            if MediaPath::from_absolute(root, &dir).is_err() {
                continue;
            }
            scan::walk_dir(root, &dir, &mut |item| {
                if let Some(x) = to_enqueue(&s2, item) {
                    out.push(x);
                }
                true
            });
        }
        out
    })
    .await
    .unwrap_or_default()
}

/// A scanned file that needs an upload (unless recorded with the same size and mtime).
fn to_enqueue(s: &Shared, item: Item) -> Option<(MediaPath, u64, bool)> {
    match item {
        Item::File(f) if f.path.is_uploadable(s.config.upload.include_url_cache) => {
            if let Ok(Some(rec)) = s.state.record(&f.path)
                && rec.matches(f.snapshot.size, f.snapshot.mtime_ns)
            {
                return None;
            }
            // Due now; the upload first checks that the file has settled (see `process`).
            Some((f.path, now_ms(), true))
        }
        Item::File(_) => None,
        Item::Problem(p) => {
            tracing::warn!(problem = %p, "Scan problem.");
            if matches!(p, scan::Problem::Unreadable { .. }) {
                let mut seen = s.unreadable.lock().expect("not poisoned");
                let text = p.to_string();
                if seen.len() < 10 && !seen.contains(&text) {
                    seen.push(text);
                }
                drop(seen);
                unreadable(s);
            }
            None
        }
    }
}

/// A directory of the store could not be read. notify silently skips a new directory it cannot
/// watch and never tries again, so files written there later, even once it is readable, may have
/// no events at all: from now on scan every `scan_interval_when_degraded` (as when the watch limit
/// is reached), instead of finding them only at the next `scan_interval` (hours).
fn unreadable(s: &Shared) {
    if !s.degraded.swap(true, Ordering::SeqCst) {
        tracing::error!(
            "Part of the media store cannot be read (see the scan problem above); it may not be watched either: scanning every scan_interval_when_degraded from now on. Fix the permissions, then restart the daemon to watch everything again."
        );
        // Not a rescan (the store may still be unreadable): the scan task picks the shorter
        // interval now rather than after its current wait.
        s.wake_scan.notify_one();
    }
}

/// Full scans: at startup, on lost events, and periodically.
async fn scans(s: Arc<Shared>, intake: CancellationToken) {
    loop {
        if s.rescan.swap(false, Ordering::SeqCst) {
            let started = std::time::Instant::now();
            // Logged with the result: the first scan with `watched=true` ends the startup (what
            // it did not find arrives by events); benchmarks and tests wait for it.
            let watched = s.watching.load(Ordering::SeqCst);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(MediaPath, u64, bool)>>(4);
            let s2 = s.clone();
            let stop = intake.clone();
            let walker = tokio::task::spawn_blocking(move || {
                let mut chunk = Vec::new();
                let mut files = 0u64;
                scan::walk(
                    &s2.config.media_store_path,
                    s2.config.upload.include_url_cache,
                    |item| {
                        files += matches!(item, Item::File(_)) as u64;
                        if let Some(x) = to_enqueue(&s2, item) {
                            chunk.push(x);
                            if chunk.len() >= 1000
                                && tx.blocking_send(std::mem::take(&mut chunk)).is_err()
                            {
                                return false;
                            }
                        }
                        !stop.is_cancelled()
                    },
                );
                if !chunk.is_empty() {
                    let _ = tx.blocking_send(chunk);
                }
                files
            });
            let mut not_recorded = 0;
            while let Some(chunk) = rx.recv().await {
                not_recorded += chunk.len();
                enqueue(&s, chunk).await;
            }
            let files = walker.await.unwrap_or(0);
            metrics::counter!(crate::metrics::SCANS).increment(1);
            metrics::histogram!(crate::metrics::SCAN_DURATION)
                .record(started.elapsed().as_secs_f64());
            tracing::info!(
                files,
                not_recorded,
                watched,
                secs = started.elapsed().as_secs_f64(),
                "Scan finished."
            );
        }
        let every = if s.degraded.load(Ordering::SeqCst) {
            s.config.scan_interval_when_degraded
        } else {
            s.config.scan_interval
        };
        tokio::select! {
            _ = intake.cancelled() => return,
            _ = s.wake_scan.notified() => {}
            _ = tokio::time::sleep(every) => s.rescan.store(true, Ordering::SeqCst),
        }
    }
}
