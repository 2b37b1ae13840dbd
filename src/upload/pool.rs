//! The upload stage: a pool that claims due queue items and runs one upload per item (at most
//! `upload.concurrency` at once), the settle check of files found by scans, the outcome → queue
//! bookkeeping (record, retry with backoff, problem), and the minute-by-minute status line.
//!
//! The queue is the only retry layer: an upload is one attempt; its error decides transient
//! (retried with backoff) or permanent (retried at `failed_retry_interval`, the operator must
//! act). A file counts as uploaded only once its record is committed with its queue change.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::layout::MediaPath;
use crate::metrics as m;
use crate::queue::{Failure, Queue};
use crate::state::{Committer, State, now_ms};
use crate::upload::digest::{self, Stat};
use crate::upload::limiter::{self, Breaker, Permit, Signal};
use crate::upload::s3::ErrorKind;
use crate::upload::{Outcome, UploadError, Uploader};

/// Counts since this start, for the status line.
#[derive(Default)]
pub struct Stats {
    uploaded: AtomicU64,
    adopted: AtomicU64,
    healed: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
}

/// How long the pool waits, once its grace is over, for the blocking reads it cancelled.
const READS_END_WITHIN: Duration = Duration::from_secs(2);

/// What the pool left behind when it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Blocking reads still running (a read that hangs, e.g. on a dead NFS server): abandoned to
    /// the process's exit.
    pub abandoned_reads: usize,
    /// Multipart uploads dropped by the end of the grace and aborted in the bucket.
    pub aborted_multiparts: usize,
}

/// The upload stage.
pub struct Pool {
    pub queue: Arc<Queue>,
    pub uploader: Uploader,
    /// Records a bad local copy or a conflict for `status` and `audit`.
    pub committer: Committer,
    pub health: Arc<m::Health>,
    pub media_store_path: PathBuf,
    pub concurrency: usize,
    pub max_requests_per_second: Option<f64>,
    pub settle: Duration,
    /// `upload.hold_after_close`, for files found by a scan (see [`settle_decision`]).
    pub hold: Duration,
    pub shutdown_grace: Duration,
    pub stats: Arc<Stats>,
    /// Last time (ms) the dispatcher loop ran: the systemd watchdog's liveness signal.
    pub heartbeat: Arc<AtomicU64>,
}

impl Pool {
    pub fn new(
        config: &crate::config::Config,
        queue: Arc<Queue>,
        uploader: Uploader,
        committer: Committer,
        health: Arc<m::Health>,
    ) -> Pool {
        Pool {
            queue,
            uploader,
            committer,
            health,
            media_store_path: config.media_store_path.clone(),
            concurrency: config.upload.concurrency,
            max_requests_per_second: config.upload.max_requests_per_second,
            settle: config.upload.settle,
            hold: config.upload.hold_after_close,
            shutdown_grace: config.shutdown_grace,
            stats: Arc::default(),
            heartbeat: Arc::new(AtomicU64::new(now_ms())),
        }
    }

    /// The status line of this pool's counts.
    pub fn status_line(&self, state: State) -> StatusLine {
        StatusLine {
            queue: self.queue.clone(),
            state,
            stats: self.stats.clone(),
        }
    }

    /// Claims due items and runs up to `upload.concurrency` uploads at once until `cancel`; then
    /// lets the uploads in flight finish within `shutdown_grace` (the rest stays queued), stops
    /// the reads and aborts the multipart uploads of those that did not (within a few seconds
    /// more: [`READS_END_WITHIN`], [`crate::upload::s3::ABANDONED_WITHIN`]).
    pub async fn run(self, cancel: CancellationToken) -> Drained {
        let s = Arc::new(self);
        let mut running = JoinSet::new();
        // The store's limiter decides how many run at once: adaptive, at most `upload.concurrency`,
        // paused while S3 throttles, one probe at a time while S3 is down.
        let limiter = s.uploader.store().limiter().clone();
        limiter.set_cap(s.concurrency);
        limiter.set_rate(s.max_requests_per_second);
        loop {
            s.heartbeat.store(now_ms(), Ordering::Relaxed);
            let mut gated = false;
            while !cancel.is_cancelled() {
                let Some(permit) = limiter.try_start() else {
                    gated = true;
                    break;
                };
                let Some((path, settle)) = s.queue.claim() else {
                    break;
                };
                running.spawn(process(s.clone(), path, settle, permit));
            }
            // Wake on a new item, a finished upload, the next due time — or, with no permit left,
            // the limiter's next change: the end of a throttling pause or the next probe (not the
            // due time of items already due, which would spin). At most 1 s: the fallback.
            let wait = if gated {
                limiter.next_wake().unwrap_or(Duration::from_secs(1))
            } else {
                s.queue.next_due().map_or(Duration::from_secs(1), |due| {
                    Duration::from_millis(due.saturating_sub(now_ms()))
                })
            }
            .min(Duration::from_secs(1));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = s.queue.notified() => {}
                _ = limiter.changed(), if gated => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Shutdown: let uploads in flight finish within the grace period; the rest stays queued.
        // Aborting one is safe at any await: its record is committed with its queue change in
        // one transaction or not at all, so its item is at worst still queued (looked at again at
        // the next start: a duplicate upload at most, never a lost one).
        let grace = tokio::time::sleep(s.shutdown_grace);
        tokio::pin!(grace);
        while !running.is_empty() {
            tokio::select! {
                _ = &mut grace => {
                    tracing::warn!(left = running.len(), "Grace period over; unfinished uploads stay queued.");
                    // The reads first: a dropped upload leaves its blocking read running (a 3 GB
                    // hash held the process 12 s past a 1 s grace); cancelled, it ends within a
                    // chunk as `Cancelled`, which records nothing.
                    s.uploader.abandon();
                    running.abort_all();
                    while running.join_next().await.is_some() {}
                    break;
                }
                _ = running.join_next() => {}
            }
        }
        // The dropped uploads' futures are gone: their multipart uploads would keep their parts
        // in the bucket (billed) until a lifecycle rule removes them. Abort them now, while the
        // cancelled reads end.
        let (abandoned_reads, aborted_multiparts) = tokio::join!(
            s.uploader.blocking_ended(READS_END_WITHIN),
            s.uploader.store().abort_abandoned()
        );
        if abandoned_reads > 0 {
            tracing::warn!(
                reads = abandoned_reads,
                "Reads of media files still running after the shutdown's grace (a hung filesystem?); abandoned: the process exits without them."
            );
        }
        Drained {
            abandoned_reads,
            aborted_multiparts,
        }
    }
}

/// What the settle check decides about a file found by a scan.
#[derive(Debug, PartialEq, Eq)]
enum Settle {
    /// Modified at least `settle` ago: upload.
    Old,
    /// Young, but nobody has it open for writing: complete, upload.
    Complete,
    /// Look again at `until`; `once`: then upload without another settle check.
    Wait { until: u64, once: bool },
}

/// The settle check of a file modified at `mtime_ms`, `now` being the wall clock; `writing` is
/// the read-lease answer for a young file (`None`: leases unavailable, e.g. on NFS). A complete
/// file still waits until it is `hold_ms` old (`upload.hold_after_close`: Synapse's spam checker
/// runs after the close and deletes a rejected file; a scan that finds a file right after its
/// close, such as the rescans of a new directory, must not upload it sooner than its close event
/// would have).
///
/// A file whose mtime is in the future (the clock stepped back since it was written) has no age
/// to go by: waiting until the clock reaches `mtime + settle` would strand it for as long as the
/// step. It waits `settle` (or the hold) from now once (or 250 ms while open for writing), then goes.
fn settle_decision(
    mtime_ms: u64,
    now: u64,
    settle_ms: u64,
    hold_ms: u64,
    writing: Option<bool>,
) -> Settle {
    let settled_at = mtime_ms.saturating_add(settle_ms);
    let held_at = mtime_ms.saturating_add(hold_ms);
    let held = hold_ms == 0 || held_at <= now;
    if settled_at <= now && held {
        return Settle::Old;
    }
    let future = mtime_ms > now;
    let wait = |until, once| Settle::Wait { until, once };
    match writing {
        Some(false) if held => Settle::Complete,
        Some(false) if future => wait(now + hold_ms, true),
        Some(false) => wait(held_at, false),
        // Still open for writing: look again shortly (its close event may also come first).
        Some(true) => wait(settled_at.min(now + 250), false),
        None if future => wait(now + settle_ms.max(hold_ms), true),
        None => wait(settled_at.max(held_at), false),
    }
}

async fn process(s: Arc<Pool>, path: MediaPath, settle: bool, permit: Permit) {
    if settle {
        // Found by a scan, not by a close event: a file modified less than `settle` ago may still
        // be being written. If the kernel says nobody has it open for writing, it is complete
        // (Synapse closes a file once written; some complete files never get an event at all).
        let abs = path.to_path(&s.media_store_path);
        let settle_ms = s.settle.as_millis() as u64;
        let hold_ms = s.hold.as_millis() as u64;
        let check = tokio::task::spawn_blocking(move || match digest::stat(&abs) {
            Ok(Stat::File(snap)) => {
                let mtime_ms = (snap.mtime_ns / 1_000_000).max(0) as u64;
                let now = now_ms();
                let young = mtime_ms.saturating_add(settle_ms.max(hold_ms)) > now;
                Some(settle_decision(
                    mtime_ms,
                    now,
                    settle_ms,
                    hold_ms,
                    young.then(|| digest::open_for_writing(&abs)).flatten(),
                ))
            }
            _ => None,
        });
        match check.await.ok().flatten() {
            None | Some(Settle::Old | Settle::Complete) => {}
            Some(Settle::Wait { until, once }) => {
                tracing::trace!(path = %path, "Not settled yet.");
                if once {
                    s.queue.defer_once(&path, until);
                } else {
                    s.queue.defer(&path, until);
                }
                return;
            }
        }
    }
    let started = std::time::Instant::now();
    let enqueued_ms = s.queue.enqueued_at(&path);
    let result = s.uploader.upload(&path).await;
    let signal = limiter::signal(&result);
    let breaker = permit.finish(signal);
    if let Ok(Outcome::Uploaded { .. } | Outcome::Adopted { .. } | Outcome::Healed { .. }) = &result
    {
        s.health.upload_ok();
        metrics::histogram!(m::UPLOAD_DURATION).record(started.elapsed().as_secs_f64());
        if let Some(t) = enqueued_ms {
            metrics::histogram!(m::CLOSE_TO_UPLOADED)
                .record(now_ms().saturating_sub(t) as f64 / 1000.0);
        }
    }
    let done = match result {
        Ok(Outcome::Uploaded { record }) => {
            s.stats.uploaded.fetch_add(1, Ordering::Relaxed);
            s.stats.bytes.fetch_add(record.size, Ordering::Relaxed);
            metrics::counter!(m::UPLOADED, "outcome" => "uploaded").increment(1);
            metrics::counter!(m::UPLOADED_BYTES).increment(record.size);
            tracing::debug!(path = %path, bytes = record.size, ms = started.elapsed().as_millis() as u64, "Uploaded.");
            if s.queue.take_dirty(&path) {
                let abs = path.to_path(&s.media_store_path);
                let now = tokio::task::spawn_blocking(move || digest::stat(&abs)).await;
                let unchanged = matches!(now, Ok(Ok(Stat::File(snap))) if snap.size == record.size && snap.mtime_ns == record.mtime_ns);
                if !unchanged {
                    s.queue.mark_dirty(&path);
                }
            }
            s.queue.finish_written(&path, record).await
        }
        Ok(Outcome::Adopted { record }) => {
            s.stats.adopted.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::UPLOADED, "outcome" => "adopted").increment(1);
            s.queue.finish(&path, Some(record)).await
        }
        Ok(Outcome::Healed { record }) => {
            s.stats.healed.fetch_add(1, Ordering::Relaxed);
            s.queue.finish(&path, Some(record)).await
        }
        Ok(Outcome::Withdrawn) => {
            // Forget first: a crash before the queue change looks again and finds nothing.
            match s
                .committer
                .apply(vec![crate::state::Op::Forget(path.clone())])
                .await
            {
                Ok(()) => s.queue.finish(&path, None).await,
                Err(e) => Err(e),
            }
        }
        Ok(Outcome::Unchanged | Outcome::Vanished | Outcome::NotRegular) => {
            s.queue.finish(&path, None).await
        }
        // The shutdown stopped it (only possible once the grace is over): no failure, no state
        // write; the file is still in the durable queue for the next start.
        Err(UploadError::Cancelled) => {
            s.queue.defer(&path, now_ms());
            Ok(())
        }
        Err(e) if signal == Signal::Unavailable && breaker == Breaker::Open => {
            // S3 is down (the breaker logged it once, with counts): put the file back as it was,
            // due at once, without an attempt, a log line or a state write per try — an outage
            // with 200k files queued would otherwise rewrite each one's error every backoff
            // round. The pool starts only probes until S3 answers, then the backlog drains.
            s.stats.failures.fetch_add(1, Ordering::Relaxed);
            s.health.upload_failed("S3 requests");
            metrics::counter!(m::UPLOAD_FAILURES, "kind" => "unavailable").increment(1);
            tracing::debug!(path = %path, error = %crate::Chain(&e), "Upload failed: S3 is down.");
            s.queue.defer(&path, now_ms());
            Ok(())
        }
        Err(e) => {
            s.stats.failures.fetch_add(1, Ordering::Relaxed);
            let kind = match e.kind() {
                ErrorKind::Permanent => Failure::Permanent,
                // NotFound (e.g. a multipart upload that vanished) is retried with backoff.
                _ => Failure::Transient,
            };
            let message = crate::Chain(&e).to_string();
            // `/health` follows uploads, not the bucket probe: S3 refusing PUTs (403) or files
            // that cannot be read make it unhealthy. A conflict or bad copy is one file's content
            // (its own metric, `status`, `audit`), not the daemon's health.
            match &e {
                UploadError::S3(_) => s.health.upload_failed("S3 requests"),
                UploadError::Read { .. } => s.health.upload_failed("reading files"),
                UploadError::State(_) => s.health.upload_failed("the state database"),
                _ => {}
            }
            let label = if kind == Failure::Permanent {
                "permanent"
            } else {
                "transient"
            };
            metrics::counter!(m::UPLOAD_FAILURES, "kind" => label).increment(1);
            // A bad local copy or a conflict is remembered for `status` and `audit` until an
            // upload of the path is verified.
            if let Some(problem) = e.problem() {
                let _ = s
                    .committer
                    .submit(vec![crate::state::Op::Problem(path.clone(), problem)]);
            }
            match s.queue.retry_later(&path, kind, message).await {
                Ok(delay) if kind == Failure::Permanent => {
                    tracing::error!(path = %path, error = %crate::Chain(&e), retry_in = ?delay, "Upload failed; the operator must act.");
                    Ok(())
                }
                Ok(delay) => {
                    tracing::warn!(path = %path, error = %crate::Chain(&e), retry_in = ?delay, "Upload failed; will retry.");
                    Ok(())
                }
                Err(se) => Err(se),
            }
        }
    };
    if let Err(e) = done {
        tracing::error!(path = %path, error = %crate::Chain(&e), "Cannot update the queue; the file stays queued.");
    }
}

/// An info line at most once a minute, and only when something changed: an idle daemon does not
/// repeat the same numbers all day. `uploaded` means what it means in `status`: files verified in
/// the bucket (in total, not since this start).
pub struct StatusLine {
    queue: Arc<Queue>,
    state: State,
    stats: Arc<Stats>,
}

impl StatusLine {
    pub async fn run(self, cancel: CancellationToken) {
        let s = &self;
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.tick().await;
        let mut last = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let d = s.queue.depth();
            let Ok(uploaded) = s.state.record_count() else {
                continue;
            };
            let now = (d.queued, d.in_flight, d.retrying, d.failed, uploaded);
            if last == Some(now) {
                continue;
            }
            last = Some(now);
            tracing::info!(
                queued = d.queued,
                in_flight = d.in_flight,
                retrying = d.retrying,
                failed = d.failed,
                uploaded,
                uploaded_since_start = s.stats.uploaded.load(Ordering::Relaxed),
                already_in_bucket_since_start = s.stats.adopted.load(Ordering::Relaxed),
                mb_since_start = s.stats.bytes.load(Ordering::Relaxed) as f64 / 1e6,
                healed_since_start = s.stats.healed.load(Ordering::Relaxed),
                "Status."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settle_check_waits_at_most_settle_even_for_future_mtimes() {
        let (now, settle) = (1_000_000_000, 2_000);
        let wait = |until, once| Settle::Wait { until, once };
        for (mtime, writing, expected) in [
            (now - 5_000, None, Settle::Old),
            (now - 2_000, Some(true), Settle::Old),
            (now - 500, Some(false), Settle::Complete),
            (now - 500, Some(true), wait(now + 250, false)),
            (now - 1_900, Some(true), wait(now + 100, false)),
            (now - 500, None, wait(now + 1_500, false)),
            // Three hours in the future: bounded by `settle` from now, then uploaded.
            (now + 10_800_000, None, wait(now + 2_000, true)),
            (now + 10_800_000, Some(true), wait(now + 250, false)),
            (now + 10_800_000, Some(false), Settle::Complete),
        ] {
            assert_eq!(
                settle_decision(mtime, now, settle, 0, writing),
                expected,
                "mtime {mtime}, writing {writing:?}"
            );
        }
    }

    #[test]
    fn a_complete_file_found_by_a_scan_still_waits_for_the_hold() {
        let (now, settle, hold) = (1_000_000_000, 2_000, 1_000);
        let wait = |until, once| Settle::Wait { until, once };
        for (mtime, settle, hold, writing, expected) in [
            // Closed 300 ms ago, nobody writing: held until 1 s after its mtime.
            (now - 300, settle, hold, Some(false), wait(now + 700, false)),
            (now - 1_000, settle, hold, Some(false), Settle::Complete),
            (now - 300, settle, hold, None, wait(now + 1_700, false)),
            // A hold longer than the settle time.
            (now - 3_000, settle, 5_000, None, wait(now + 2_000, false)),
            (now - 5_000, settle, 5_000, Some(false), Settle::Old),
            // Future mtime: once, from now.
            (
                now + 10_800_000,
                settle,
                hold,
                Some(false),
                wait(now + 1_000, true),
            ),
            (
                now + 10_800_000,
                settle,
                5_000,
                None,
                wait(now + 5_000, true),
            ),
        ] {
            assert_eq!(
                settle_decision(mtime, now, settle, hold, writing),
                expected,
                "mtime {mtime}, hold {hold}, writing {writing:?}"
            );
        }
    }
}
