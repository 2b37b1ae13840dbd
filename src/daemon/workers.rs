//! The upload workers: the dispatcher that claims due queue items, one upload per item, and the
//! minute-by-minute status line.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::layout::MediaPath;
use crate::metrics as m;
use crate::state::now_ms;
use crate::upload::digest::{self, Stat};
use crate::upload::s3::ErrorKind;
use crate::upload::{Outcome, UploadError};

/// Claims due items and runs up to `upload.concurrency` uploads at once.
pub(super) async fn dispatch(s: Arc<Shared>, intake: CancellationToken) {
    let mut running = JoinSet::new();
    let limit = s.config.upload.concurrency;
    loop {
        s.heartbeat.store(now_ms(), Ordering::Relaxed);
        while running.len() < limit && !intake.is_cancelled() {
            let Some((path, settle)) = s.queue.claim() else {
                break;
            };
            running.spawn(process(s.clone(), path, settle));
        }
        // Wake on a new item, a finished upload, the next due time (at most 1 s: the fallback).
        let wait = s.queue.next_due().map_or(Duration::from_secs(1), |due| {
            Duration::from_millis(due.saturating_sub(now_ms())).min(Duration::from_secs(1))
        });
        tokio::select! {
            _ = intake.cancelled() => break,
            _ = s.queue.notified() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Shutdown: let uploads in flight finish within the grace period; the rest stays queued.
    let grace = tokio::time::sleep(s.config.shutdown_grace);
    tokio::pin!(grace);
    while !running.is_empty() {
        tokio::select! {
            _ = &mut grace => {
                tracing::warn!(left = running.len(), "Grace period over; unfinished uploads stay queued.");
                running.abort_all();
                while running.join_next().await.is_some() {}
                break;
            }
            _ = running.join_next() => {}
        }
    }
}

async fn process(s: Arc<Shared>, path: MediaPath, settle: bool) {
    if settle {
        // Found by a scan, not by a close event: a file modified less than `settle` ago may still
        // be being written. If the kernel says nobody has it open for writing, it is complete
        // (Synapse closes a file once written; some complete files never get an event at all).
        let abs = path.to_path(&s.config.media_store_path);
        let settle_ms = s.config.upload.settle.as_millis() as u64;
        let check = tokio::task::spawn_blocking(move || match digest::stat(&abs) {
            Ok(Stat::File(snap)) => {
                let settled_at = (snap.mtime_ns / 1_000_000).max(0) as u64 + settle_ms;
                (settled_at > now_ms()).then(|| (settled_at, digest::open_for_writing(&abs)))
            }
            _ => None,
        });
        match check.await.ok().flatten() {
            None | Some((_, Some(false))) => {}
            // Still open for writing: look again shortly (its close event may also come first).
            Some((settled_at, Some(true))) => {
                tracing::trace!(path = %path, "Still open for writing.");
                s.queue.defer(&path, settled_at.min(now_ms() + 250));
                return;
            }
            Some((settled_at, None)) => {
                tracing::trace!(path = %path, "Not settled yet.");
                s.queue.defer(&path, settled_at);
                return;
            }
        }
    }
    let started = std::time::Instant::now();
    let enqueued_ms = s.queue.enqueued_at(&path);
    let result = s.uploader.upload(&path).await;
    if let Ok(Outcome::Uploaded { .. } | Outcome::Adopted { .. } | Outcome::Healed { .. }) = &result
    {
        s.health.s3_ok();
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
        Ok(Outcome::Unchanged | Outcome::Vanished | Outcome::NotRegular) => {
            s.queue.finish(&path, None).await
        }
        Err(e) => {
            s.stats.failures.fetch_add(1, Ordering::Relaxed);
            let kind = e.kind();
            let message = crate::Chain(&e).to_string();
            if let UploadError::S3(_) = &e {
                s.health.s3_failed(&message);
            }
            let label = if kind == ErrorKind::Permanent {
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
                Ok(delay) if kind == ErrorKind::Permanent => {
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
pub(super) async fn summaries(s: Arc<Shared>, intake: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    every.tick().await;
    let mut last = None;
    loop {
        tokio::select! {
            _ = intake.cancelled() => return,
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
