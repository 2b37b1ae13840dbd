//! The daemon's periodic sweep and prune job and its control socket (`sweep`, `audit`, `prune`,
//! `forget` and `status` from the CLI), the systemd notifications and the metrics endpoint: the
//! services beside the stages.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::queue::Queue;
use crate::scan::{Signals, Unreadable};
use crate::state::{Committer, State};
use crate::sweep::Sweeper;
use crate::upload::s3::ObjectStore;

/// What the sweeps, the audits and the control socket share.
pub(super) struct Services {
    pub(super) config: Config,
    pub(super) state: State,
    pub(super) committer: Committer,
    pub(super) queue: Arc<Queue>,
    /// Present when the database is configured.
    pub(super) sweeper: Option<Arc<Sweeper>>,
    /// One sweep at a time in this process (the advisory lock covers other instances).
    pub(super) sweeping: tokio::sync::Mutex<()>,
    /// Filled by the scans, shown by `status`.
    pub(super) unreadable: Unreadable,
    /// The watch's degraded causes, shown by `status`.
    pub(super) signals: Signals,
}

/// Runs the sweep every `sweep.interval`, counted from the last sweep (remembered in the state),
/// not from this start: a daemon restarted more often than the interval (a crash loop, a disk
/// full enough to fail its commits) would otherwise never sweep. When the media store's disk is
/// nearly full ([`nearly_full`]), the next sweep is due at once (at most every
/// [`FULL_DISK_SWEEP_GAP`]): freeing space is what the sweep is for.
pub(super) async fn sweeps(s: Arc<Services>, intake: CancellationToken) {
    if s.sweeper.is_none() || !s.config.sweep.enabled {
        return;
    }
    crate::metrics::sweep_metrics_at_zero();
    let interval = s.config.sweep.interval;
    let last = crate::sweep::report::Last::load(&s.state)
        .ok()
        .and_then(|l| l.sweep)
        .map(|r| r.started_at_ms);
    let mut wait = first_wait(last, crate::state::now_ms(), interval);
    // When this process last started a sweep (none yet: a nearly full disk sweeps at once).
    let mut started: Option<tokio::time::Instant> = None;
    loop {
        let full = nearly_full(&s.config.media_store_path);
        if let Some((free, total)) = full {
            let now = tokio::time::Instant::now();
            let earliest = started.map_or(now, |t| t + FULL_DISK_SWEEP_GAP.min(interval));
            if now + wait > earliest {
                tracing::warn!(
                    free_mb = free / 1_000_000,
                    total_mb = total / 1_000_000,
                    "The media store's disk is nearly full: sweeping now rather than at the next sweep.interval."
                );
                wait = earliest.saturating_duration_since(now);
            }
        }
        tokio::select! {
            _ = intake.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        started = Some(tokio::time::Instant::now());
        let _ = sweep(&s, s.config.sweep.dry_run, &intake).await;
        wait = interval;
    }
}

/// Shortest time between two sweeps started because the disk is nearly full.
const FULL_DISK_SWEEP_GAP: std::time::Duration = std::time::Duration::from_secs(300);

/// How long after this start the first sweep is due: an interval after the last sweep began
/// (`last_ms`, none: an interval from now), at once if that is past. A last sweep "in the future"
/// (the clock stepped back) counts as just now.
fn first_wait(
    last_ms: Option<u64>,
    now_ms: u64,
    interval: std::time::Duration,
) -> std::time::Duration {
    match last_ms {
        None => interval,
        Some(t) => {
            interval.saturating_sub(std::time::Duration::from_millis(now_ms.saturating_sub(t)))
        }
    }
}

/// The file system holding `path` has less than 5 % or less than 1 GiB free (for us: what an
/// unprivileged writer such as Synapse can use): `Some((free, total))` in bytes.
fn nearly_full(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer for the call's duration.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    let (free, total) = (st.f_bavail as u64 * unit, st.f_blocks as u64 * unit);
    (total > 0 && (free < total / 20 || free < 1 << 30)).then_some((free, total))
}

/// One sweep, serialized with any other in this process; its report is remembered for `status`.
pub(super) async fn sweep(s: &Services, dry_run: bool, cancel: &CancellationToken) -> Response {
    let Some(sweeper) = &s.sweeper else {
        return Response::Error(
            "the sweep needs Synapse's database (synapse_config or a database: section)".into(),
        );
    };
    let _one = s.sweeping.lock().await;
    use crate::metrics as m;
    match sweeper.run(dry_run, cancel).await {
        Ok(report) => {
            if dry_run {
                tracing::info!(report = %report, "Dry-run sweep finished (nothing deleted).");
            } else {
                tracing::info!(report = %report, "Sweep finished.");
            }
            // A dry run deletes nothing: it is not a sweep that kept the disk in check.
            let outcome = match (&report.stopped, report.skipped_locked) {
                (_, true) => "skipped_locked",
                (Some(_), _) => "stopped",
                (None, _) if dry_run => "dry_run",
                (None, _) => "done",
            };
            metrics::counter!(m::SWEEPS, "outcome" => outcome).increment(1);
            if !dry_run {
                metrics::counter!(m::SWEEP_DELETED_FILES).increment(report.files_deleted);
                metrics::counter!(m::SWEEP_DELETED_BYTES).increment(report.bytes_freed);
            }
            if !dry_run {
                metrics::counter!(m::SWEEP_KEPT).increment(
                    report.kept_not_in_bucket
                        + report.kept_different
                        + report.kept_error
                        + report.kept_bad_copy,
                );
            }
            if outcome == "done" {
                metrics::gauge!(m::LAST_SWEEP).set(report.started_at_ms as f64 / 1000.0);
            }
            if !report.skipped_locked
                && let Err(e) = s
                    .committer
                    .apply(vec![crate::sweep::report::remember(&report)])
                    .await
            {
                tracing::warn!(error = %crate::Chain(&e), "Cannot remember the sweep report.");
            }
            Response::Sweep(report)
        }
        Err(e) => {
            metrics::counter!(m::SWEEPS, "outcome" => "refused").increment(1);
            tracing::error!(error = %crate::Chain(&e), "Sweep refused.");
            Response::Error(crate::Chain(&e).to_string())
        }
    }
}

/// One audit, run by the daemon (which owns the state database); serialized with the sweeps.
async fn audit(
    s: &Services,
    options: &crate::audit::Options,
    cancel: &CancellationToken,
) -> Response {
    let Some(sweeper) = &s.sweeper else {
        return Response::Error(
            "the audit needs Synapse's database (synapse_config or a database: section)".into(),
        );
    };
    let _one = s.sweeping.lock().await;
    let auditor = crate::audit::Auditor {
        config: &s.config,
        db: &sweeper.db,
        store: &sweeper.store,
        state: &s.state,
        committer: &s.committer,
        queue: &s.queue,
    };
    match auditor.run(options, cancel).await {
        Ok(report) => {
            tracing::info!(
                lost = report.lost.count,
                not_uploaded = report.not_uploaded.count,
                mismatched = report.mismatched.count,
                orphans = report.orphans.count,
                orphans_deleted = report.orphans_deleted.count,
                "Audit finished."
            );
            Response::Audit(Box::new(report))
        }
        Err(e) => {
            tracing::error!(error = %crate::Chain(&e), "Audit failed.");
            Response::Error(crate::Chain(&e).to_string())
        }
    }
}

/// Runs the prune job every `prune.interval` (first one an interval after startup), when enabled.
pub(super) async fn prunes(s: Arc<Services>, intake: CancellationToken) {
    if s.sweeper.is_none() || !s.config.prune.enabled {
        return;
    }
    crate::metrics::prune_metrics_at_zero();
    loop {
        tokio::select! {
            _ = intake.cancelled() => return,
            _ = tokio::time::sleep(s.config.prune.interval) => {}
        }
        let _ = prune(&s, None, false, &intake).await;
    }
}

/// One prune run, serialized with the sweeps and audits of this process (the advisory lock, taken
/// by the run, covers other instances); its report is remembered for `status`.
async fn prune(
    s: &Services,
    path: Option<crate::audit::PrunePath>,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Response {
    let Some(sweeper) = &s.sweeper else {
        return Response::Error(
            "pruning needs the database: section (Synapse's PostgreSQL)".into(),
        );
    };
    let _one = s.sweeping.lock().await;
    let auditor = auditor(s, sweeper);
    use crate::metrics as m;
    let due = path.unwrap_or_else(|| {
        crate::audit::job::due_path(&s.state, s.config.prune.full_every).unwrap_or_default()
    });
    match crate::audit::job::run(&auditor, Some(due), dry_run, cancel).await {
        Ok(report) => {
            tracing::info!(report = %report, "Prune finished.");
            let p = report.path.as_str();
            let outcome = match (&report.refused, report.skipped_locked) {
                (_, true) => "skipped_locked",
                (Some(_), _) => "refused",
                (None, _) if dry_run => "dry_run",
                (None, _) => "done",
            };
            metrics::counter!(m::PRUNES, "path" => p, "outcome" => outcome).increment(1);
            if !report.skipped_locked {
                metrics::gauge!(m::PRUNE_ORPHANS, "path" => p).set(report.orphans as f64);
            }
            let reason = match report.refused_reason.as_deref() {
                Some("empty_database") => Some("empty_database"),
                Some("too_many_orphans") => Some("too_many_orphans"),
                Some(_) => Some("too_many_deletions"),
                None => None,
            };
            if let Some(reason) = reason {
                metrics::counter!(m::PRUNE_REFUSED, "reason" => reason).increment(1);
            }
            if outcome == "done" {
                metrics::counter!(m::PRUNED_OBJECTS).increment(report.deleted.count);
                metrics::counter!(m::PRUNED_BYTES).increment(report.deleted.bytes);
                metrics::gauge!(m::LAST_PRUNE).set(report.started_at_ms as f64 / 1000.0);
            }
            if !report.skipped_locked
                && let Err(e) = s
                    .committer
                    .apply(crate::audit::job::remember(&report))
                    .await
            {
                tracing::warn!(error = %crate::Chain(&e), "Cannot remember the prune report.");
            }
            Response::Prune(Box::new(report))
        }
        Err(e) => {
            metrics::counter!(m::PRUNES, "path" => due.as_str(), "outcome" => "failed")
                .increment(1);
            tracing::error!(error = %crate::Chain(&e), "Prune failed (nothing more deleted).");
            Response::Error(crate::Chain(&e).to_string())
        }
    }
}

/// `forget`: at once, not behind a running sweep or prune (a legal removal does not wait an
/// hour); it touches only the named media, whose rows are gone.
async fn forget(s: &Services, targets: &[String], dry_run: bool) -> Response {
    let Some(sweeper) = &s.sweeper else {
        return Response::Error("forget needs the database: section (Synapse's PostgreSQL)".into());
    };
    match crate::audit::forget(&auditor(s, sweeper), targets, dry_run).await {
        Ok(report) => {
            if !dry_run {
                let n: usize = report.items.iter().map(|i| i.removed.len()).sum();
                metrics::counter!(crate::metrics::FORGOTTEN_OBJECTS).increment(n as u64);
            }
            tracing::info!(removed = %report, "Forget finished.");
            Response::Forget(report)
        }
        Err(e) => {
            tracing::error!(error = %crate::Chain(&e), "Forget failed.");
            Response::Error(crate::Chain(&e).to_string())
        }
    }
}

fn auditor<'a>(s: &'a Services, sweeper: &'a Sweeper) -> crate::audit::Auditor<'a> {
    crate::audit::Auditor {
        config: &s.config,
        db: &sweeper.db,
        store: &sweeper.store,
        state: &s.state,
        committer: &s.committer,
        queue: &s.queue,
    }
}

/// Answers `status`, `sweep`, `audit`, `prune` and `forget` on the control socket until shutdown.
pub(super) async fn control(s: Arc<Services>, listener: UnixListener, intake: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = intake.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            // At most MAX_CONNECTIONS at once: the rest wait in the listen backlog.
            r = listener.accept(), if conns.len() < control::MAX_CONNECTIONS => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (EMFILE) fails every accept at once: retrying at once
                    // spun a core and wrote a million log lines in two seconds.
                    tracing::warn!(error = %crate::Chain(&e), "Control socket accept failed; retrying in 1 s.");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let s = s.clone();
        let cancel = intake.clone();
        conns.spawn(async move {
            control::serve_one(stream, move |req| async move {
                match req {
                    Request::Status => match control::status(&s.state, &s.queue, true) {
                        Ok(mut st) => {
                            st.unreadable = s.unreadable.lock().expect("not poisoned").clone();
                            st.degraded = s
                                .signals
                                .blind_causes()
                                .into_iter()
                                .map(String::from)
                                .collect();
                            Response::Status(st)
                        }
                        Err(e) => Response::Error(crate::Chain(&e).to_string()),
                    },
                    Request::Sweep { dry_run } => sweep(&s, dry_run, &cancel).await,
                    Request::Audit { options } => audit(&s, &options, &cancel).await,
                    Request::Prune { path, dry_run } => prune(&s, path, dry_run, &cancel).await,
                    Request::Forget { targets, dry_run } => forget(&s, &targets, dry_run).await,
                }
            })
            .await
        });
    }
    conns.abort_all();
    let path = s.config.state_dir.join(control::SOCKET);
    let _ = std::fs::remove_file(path);
}

/// systemd integration (a no-op without `NOTIFY_SOCKET`): READY=1 once started, then every half
/// watchdog interval WATCHDOG=1 — only while the dispatcher loop is alive — and STATUS= with the
/// queue depth.
pub(super) async fn systemd(
    queue: Arc<Queue>,
    heartbeat: Arc<AtomicU64>,
    intake: CancellationToken,
) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(std::time::Duration::from_secs(10), |w| w / 2);
    loop {
        tokio::select! {
            _ = intake.cancelled() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let d = queue.depth();
        let status = format!(
            "queued {}, in flight {}, failed {}",
            d.queued, d.in_flight, d.failed
        );
        let mut states = vec![sd_notify::NotifyState::Status(&status)];
        // The dispatcher wakes at least once a second; a stale heartbeat means it is stuck.
        let beat = heartbeat.load(std::sync::atomic::Ordering::Relaxed);
        if watchdog.is_some() && crate::state::now_ms().saturating_sub(beat) < 30_000 {
            states.push(sd_notify::NotifyState::Watchdog);
        }
        let _ = sd_notify::notify(&states);
    }
}

/// `/metrics` and `/health`, plus an S3 probe so `/health` notices an outage while idle.
pub(super) async fn metrics(
    max_backoff: std::time::Duration,
    probe_every: std::time::Duration,
    queue: Arc<Queue>,
    store: Arc<ObjectStore>,
    health: Arc<crate::metrics::Health>,
    listener: tokio::net::TcpListener,
    intake: CancellationToken,
) {
    use crate::metrics as m;
    let handle = m::install();
    let refresh: Arc<dyn Fn() -> usize + Send + Sync> = Arc::new(move || {
        let d = queue.depth();
        metrics::gauge!(m::QUEUE_DEPTH).set(d.queued as f64);
        metrics::gauge!(m::QUEUE_IN_FLIGHT).set(d.in_flight as f64);
        metrics::gauge!(m::QUEUE_FAILED).set(d.failed as f64);
        d.queued
    });
    // Unhealthy when work waits and nothing succeeded for this long.
    let stale = max_backoff.max(std::time::Duration::from_secs(60)) * 2;
    let server = tokio::spawn(m::serve(
        listener,
        handle,
        health.clone(),
        stale,
        refresh,
        intake.clone(),
    ));
    let every = probe_every;
    loop {
        tokio::select! {
            _ = intake.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        match store.check_bucket().await {
            Ok(()) => health.probe_ok(),
            Err(_) => health.probe_failed(),
        }
    }
    let _ = server.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_sweep_is_an_interval_after_the_last_one_not_after_this_start() {
        let h = Duration::from_secs(3600);
        let now = 10_000_000_000;
        assert_eq!(first_wait(None, now, h), h);
        assert_eq!(
            first_wait(Some(now - 600_000), now, h),
            Duration::from_secs(3000)
        );
        assert_eq!(first_wait(Some(now - 7_200_000), now, h), Duration::ZERO);
        assert_eq!(first_wait(Some(now + 60_000), now, h), h);
    }
}
