//! `run`: the wiring of the stages: watch → durable queue → upload pool, with scans as the
//! safety net, and the sweep, control socket, systemd and metrics services beside them.
//!
//! Stages (each owns its long-lived task, all stopped by one `CancellationToken`, none detached):
//! - [`Watcher`] (watch): sets up notify beside the startup scan, turns events into queue
//!   entries and directory scans, and every gap it notices into a full scan;
//! - [`Scanner`] (scan): a full scan at startup, every `scan_interval`
//!   (`scan_interval_when_degraded` without full inotify coverage) and whenever events were lost;
//!   the first one under the watch resolves [`Ready`];
//! - [`Pool`] (upload): claims due items and runs up to `upload.concurrency` uploads.
//!
//! They meet only through the durable queue, the [`Intake`] that feeds it and the scan
//! [`Signals`]. Shutdown: intake stops at once; uploads in flight get `shutdown_grace` to finish;
//! then their reads are cancelled (they end within a chunk) and their multipart uploads aborted
//! (at most a few seconds more); the commit thread flushes; whatever is left stays in the durable
//! queue for the next start. "Stopped." is logged once all of that is over: nothing of ours runs
//! any more, except reads that hang in the kernel, which it counts (`abandoned_reads`) and the
//! process's exit ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod service;

use crate::config::Config;
use crate::queue::Queue;
use crate::scan::{Intake, Scanner, Signals};
use crate::state::{State, StateError, StateHandle};
use crate::sweep::Sweeper;
use crate::upload::Uploader;
use crate::upload::pool::Pool;
use crate::upload::s3::{ObjectStore, S3Error};
use crate::watch::Watcher;

pub use crate::scan::Ready;

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

/// Knobs that are not configuration (tests use them to provoke overflows and to wait for the
/// startup).
#[derive(Debug, Clone)]
pub struct Options {
    /// Capacity of the channel between notify's thread and the event task.
    pub event_buffer: usize,
    /// Resolved once the startup is over (see [`Ready`]).
    pub ready: Ready,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            event_buffer: 8192,
            ready: Ready::new(),
        }
    }
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
    let handle = StateHandle::start(open_state(&config.state_dir).await?);
    let (state, committer) = (handle.state.clone(), handle.committer.clone());
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
            if !addr.ip().is_loopback() {
                // /metrics names media counts and the bucket's health: not for the internet.
                tracing::warn!(%addr, "metrics.listen is not a loopback address: /metrics and /health are reachable from the network. Bind 127.0.0.1 (or a private interface behind a firewall) unless a scraper elsewhere needs it.");
            }
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
        store.clone(),
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
    let health = Arc::new(crate::metrics::Health::default());
    health.started();
    if bucket_ok {
        health.probe_ok();
    } else {
        health.probe_failed();
    }
    let depth = queue.depth();
    tracing::info!(queued = depth.queued, failed = depth.failed, setup = %config.summary(), "Starting.");

    let unreadable = crate::scan::Unreadable::default();
    let signals = Signals::new();
    let feed = Intake {
        root: config.media_store_path.clone(),
        include_url_cache: config.upload.include_url_cache,
        queue: queue.clone(),
        state: state.clone(),
        signals: signals.clone(),
        unreadable: unreadable.clone(),
        hold: config.upload.hold_after_close,
    };
    let watcher = Watcher {
        intake: feed.clone(),
        signals: signals.clone(),
        event_buffer: opts.event_buffer,
    };
    let scanner = Scanner {
        intake: feed,
        signals: signals.clone(),
        interval: config.scan_interval,
        interval_when_degraded: config.scan_interval_when_degraded,
        ready: opts.ready,
    };
    let pool = Pool::new(
        &config,
        queue.clone(),
        uploader,
        committer.clone(),
        health.clone(),
    );
    let status_line = pool.status_line(state.clone());
    let heartbeat = pool.heartbeat.clone();
    let services = Arc::new(service::Services {
        config: config.clone(),
        state,
        committer: committer.clone(),
        queue: queue.clone(),
        sweeper,
        sweeping: tokio::sync::Mutex::new(()),
        unreadable,
        signals,
    });

    let intake = shutdown.child_token();
    let mut tasks = JoinSet::new();
    tasks.spawn(watcher.run(intake.clone()));
    tasks.spawn(scanner.run(intake.clone()));
    tasks.spawn(status_line.run(intake.clone()));
    tasks.spawn(service::sweeps(services.clone(), intake.clone()));
    tasks.spawn(service::prunes(services.clone(), intake.clone()));
    tasks.spawn(service::control(services, control, intake.clone()));
    tasks.spawn(service::systemd(queue.clone(), heartbeat, intake.clone()));
    if let Some(listener) = metrics_listener {
        tasks.spawn(service::metrics(
            config.upload.max_backoff,
            config.metrics.s3_probe_interval,
            queue.clone(),
            store,
            health,
            listener,
            intake.clone(),
        ));
    }
    let dispatcher = tokio::spawn(pool.run(intake.clone()));

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
        tracing::error!(error = %e, state_dir = %config.state_dir.display(), "The state database cannot be written (full or failing disk?); stopping. Free space or fix the disk, then start the daemon again.");
    }
    tracing::info!(grace = ?config.shutdown_grace, "Shutting down: finishing uploads in flight.");
    // Stop intake first (the watch is dropped when its stage ends), then let the pool drain.
    intake.cancel();
    while tasks.join_next().await.is_some() {}
    let drained = dispatcher.await.unwrap_or_default();
    let depth = queue.depth();
    // The stages' committer clones went with their tasks; these are the last ones (the queue
    // holds one too): the thread then flushes and ends.
    drop((queue, committer));
    handle.close().await;
    tracing::info!(
        queued = depth.queued,
        aborted_multipart_uploads = drained.aborted_multiparts,
        abandoned_reads = drained.abandoned_reads,
        "Stopped."
    );
    match failed {
        Some(e) => Err(DaemonError::State(StateError::Commit(e))),
        None => Ok(()),
    }
}
