//! Prometheus metrics and `/health` on `metrics.listen` (off when unset).
//!
//! Names are constants here, each described once; labels are bounded (operation, outcome, kind):
//! never a path or a key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::state::now_ms;

/// `/metrics` and `/health` connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

pub const QUEUE_DEPTH: &str = "synapse_s3_offload_queue_depth";
pub const QUEUE_IN_FLIGHT: &str = "synapse_s3_offload_queue_in_flight";
pub const QUEUE_FAILED: &str = "synapse_s3_offload_queue_failed";
pub const ENQUEUED: &str = "synapse_s3_offload_enqueued_total";
pub const UPLOADED: &str = "synapse_s3_offload_uploaded_total";
pub const UPLOADED_BYTES: &str = "synapse_s3_offload_uploaded_bytes_total";
pub const WITHDRAWN: &str = "synapse_s3_offload_withdrawn_total";
pub const UPLOAD_FAILURES: &str = "synapse_s3_offload_upload_failures_total";
pub const UPLOAD_LIMIT: &str = "synapse_s3_offload_upload_concurrency_limit";
pub const S3_BREAKER_OPEN: &str = "synapse_s3_offload_s3_unreachable";
pub const UPLOAD_DURATION: &str = "synapse_s3_offload_upload_duration_seconds";
pub const CLOSE_TO_UPLOADED: &str = "synapse_s3_offload_close_to_uploaded_seconds";
pub const BAD_LOCAL_COPIES: &str = "synapse_s3_offload_bad_local_copies_total";
pub const CONFLICTS: &str = "synapse_s3_offload_upload_conflicts_total";
pub const SCANS: &str = "synapse_s3_offload_scans_total";
pub const SCAN_DURATION: &str = "synapse_s3_offload_scan_duration_seconds";
pub const WATCHED_DIRS: &str = "synapse_s3_offload_inotify_watched_directories";
pub const DEGRADED: &str = "synapse_s3_offload_watch_degraded";
pub const REWATCHES: &str = "synapse_s3_offload_watch_reestablished_total";
pub const SWEEPS: &str = "synapse_s3_offload_sweeps_total";
pub const SWEEP_DELETED_FILES: &str = "synapse_s3_offload_sweep_deleted_files_total";
pub const SWEEP_DELETED_BYTES: &str = "synapse_s3_offload_sweep_deleted_bytes_total";
pub const SWEEP_KEPT: &str = "synapse_s3_offload_sweep_kept_unconfirmed_total";
pub const LAST_SWEEP: &str = "synapse_s3_offload_last_successful_sweep_timestamp_seconds";
pub const PRUNES: &str = "synapse_s3_offload_prunes_total";
pub const PRUNE_ORPHANS: &str = "synapse_s3_offload_prune_orphans";
pub const PRUNED_OBJECTS: &str = "synapse_s3_offload_pruned_objects_total";
pub const PRUNED_BYTES: &str = "synapse_s3_offload_pruned_bytes_total";
pub const PRUNE_REFUSED: &str = "synapse_s3_offload_prune_refused_total";
pub const LAST_PRUNE: &str = "synapse_s3_offload_last_successful_prune_timestamp_seconds";
pub const FORGOTTEN_OBJECTS: &str = "synapse_s3_offload_forgotten_objects_total";
pub const BUILD_INFO: &str = "synapse_s3_offload_build_info";

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(QUEUE_DEPTH, "Files in the durable upload queue.");
    describe_gauge!(QUEUE_IN_FLIGHT, "Uploads in flight.");
    describe_gauge!(
        QUEUE_FAILED,
        "Queued files whose last attempt failed permanently."
    );
    describe_counter!(ENQUEUED, "Files enqueued (by events and scans).");
    describe_counter!(
        UPLOADED,
        "Files verified in the bucket, by outcome (uploaded, adopted)."
    );
    describe_counter!(UPLOADED_BYTES, Unit::Bytes, "Bytes uploaded.");
    describe_counter!(
        WITHDRAWN,
        "Objects deleted right after their upload: Synapse removed the file meanwhile and has no database row for its media (its spam checker rejected it)."
    );
    describe_counter!(
        UPLOAD_FAILURES,
        "Failed upload attempts, by kind (transient = retried with backoff, permanent, unavailable = S3 down: put back without an attempt)."
    );
    describe_gauge!(
        UPLOAD_LIMIT,
        "Uploads allowed in flight now: adaptive, at most upload.concurrency, cut by throttling."
    );
    describe_gauge!(
        S3_BREAKER_OPEN,
        "1 while S3 is unreachable (the circuit breaker is open: only probes are sent)."
    );
    describe_histogram!(
        UPLOAD_DURATION,
        Unit::Seconds,
        "Time to upload and verify one file."
    );
    describe_histogram!(
        CLOSE_TO_UPLOADED,
        Unit::Seconds,
        "Time from enqueue (close event or scan) to verified in the bucket."
    );
    describe_counter!(
        BAD_LOCAL_COPIES,
        "Local files found to differ from their verified object (a bad copy, e.g. an interrupted write-back by Synapse), by outcome (healed from the bucket, reported)."
    );
    describe_counter!(
        CONFLICTS,
        "Local files that differ from an object we never verified, with nothing to tell which is right (both kept)."
    );
    describe_counter!(SCANS, "Full scans of the media store.");
    describe_histogram!(SCAN_DURATION, Unit::Seconds, "Duration of full scans.");
    describe_gauge!(
        WATCHED_DIRS,
        "Directories of the media store seen by the last full scan (inotify watches needed); 0 while degraded."
    );
    describe_gauge!(
        DEGRADED,
        "1 while inotify does not cover the whole media store (watch limit, unreadable part, store gone): new files are then found by scans every scan_interval_when_degraded; `status` says why."
    );
    describe_counter!(
        REWATCHES,
        "Times the watch was set up again (after an inotify queue overflow, the store replaced or remounted, or a part readable again), by reason."
    );
    describe_counter!(
        SWEEPS,
        "Sweeps, by outcome (done, dry_run, skipped_locked, stopped, refused)."
    );
    describe_counter!(SWEEP_DELETED_FILES, "Local files deleted by sweeps.");
    describe_counter!(SWEEP_DELETED_BYTES, Unit::Bytes, "Bytes freed by sweeps.");
    describe_counter!(
        SWEEP_KEPT,
        "Aged files kept because the bucket did not confirm them (missing, different, error)."
    );
    describe_gauge!(
        LAST_SWEEP,
        Unit::Seconds,
        "Unix time of the last sweep (not dry run) that ran to the end; 0 until the first."
    );
    describe_counter!(
        PRUNES,
        "Runs of the prune job (or `prune`), by path (incremental, full) and outcome (done, dry_run, refused, skipped_locked, failed)."
    );
    describe_gauge!(
        PRUNE_ORPHANS,
        "Orphans (objects or records whose media has no database row) seen by the last prune run, by path."
    );
    describe_counter!(
        PRUNED_OBJECTS,
        "Orphaned objects deleted from the bucket by prune runs."
    );
    describe_counter!(
        PRUNED_BYTES,
        Unit::Bytes,
        "Bytes of orphaned objects deleted by prune runs."
    );
    describe_counter!(
        PRUNE_REFUSED,
        "Prune runs whose deletions a sanity limit refused, by reason (empty_database, too_many_orphans, too_many_deletions)."
    );
    describe_gauge!(
        LAST_PRUNE,
        Unit::Seconds,
        "Unix time of the last prune run (not dry run) that ran to the end unrefused; 0 until the first."
    );
    describe_counter!(
        FORGOTTEN_OBJECTS,
        "Objects removed by `forget` (legal removals of deleted media)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells the build.");
}

/// Upload latencies: 10 ms to 10 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Full scans: 100 ms to 2 h.
const SCAN_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 7200.0,
];

/// The sweep's series, at 0 from startup when the daemon sweeps, so that a rate or an alert on
/// them works before the first sweep (`last_successful_sweep` 0 means never).
pub fn sweep_metrics_at_zero() {
    for outcome in ["done", "dry_run", "skipped_locked", "stopped", "refused"] {
        metrics::counter!(SWEEPS, "outcome" => outcome).increment(0);
    }
    metrics::counter!(SWEEP_DELETED_FILES).increment(0);
    metrics::counter!(SWEEP_DELETED_BYTES).increment(0);
    metrics::counter!(SWEEP_KEPT).increment(0);
    metrics::gauge!(LAST_SWEEP).increment(0.0);
}

/// The prune job's series at 0 from startup when the job is enabled (see
/// [`sweep_metrics_at_zero`]).
pub fn prune_metrics_at_zero() {
    for path in ["incremental", "full"] {
        for outcome in ["done", "dry_run", "refused", "skipped_locked", "failed"] {
            metrics::counter!(PRUNES, "path" => path, "outcome" => outcome).increment(0);
        }
        metrics::gauge!(PRUNE_ORPHANS, "path" => path).increment(0.0);
    }
    for reason in ["empty_database", "too_many_orphans", "too_many_deletions"] {
        metrics::counter!(PRUNE_REFUSED, "reason" => reason).increment(0);
    }
    metrics::counter!(PRUNED_OBJECTS).increment(0);
    metrics::counter!(PRUNED_BYTES).increment(0);
    metrics::counter!(FORGOTTEN_OBJECTS).increment(0);
    metrics::gauge!(LAST_PRUNE).increment(0.0);
}

/// Installs the recorder (once per process) and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Histograms, not the exporter's default summaries: quantiles of summaries cannot be
            // aggregated across instances, bucket counts can.
            use metrics_exporter_prometheus::Matcher;
            let buckets = |b: PrometheusBuilder, name: &str, v: &[f64]| {
                b.set_buckets_for_metric(Matcher::Full(name.into()), v)
                    .expect("bucket lists are not empty")
            };
            let b = PrometheusBuilder::new();
            let b = buckets(b, UPLOAD_DURATION, SECONDS_BUCKETS);
            let b = buckets(b, CLOSE_TO_UPLOADED, SECONDS_BUCKETS);
            let b = buckets(b, SCAN_DURATION, SCAN_BUCKETS);
            let handle = b
                .install_recorder()
                .expect("the metrics recorder is installed once");
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// What `/health` knows: the bucket probe's last success and failure, and the uploads'.
#[derive(Default)]
pub struct Health {
    /// The idle daemon's bucket probe (HEAD bucket).
    probe_ok_ms: AtomicU64,
    probe_err_ms: AtomicU64,
    /// Uploads: the last verified (uploaded, adopted, healed) and the last failed attempt.
    upload_ok_ms: AtomicU64,
    upload_err_ms: AtomicU64,
    /// What the last failure was, as a bounded word: never error text (it can hold keys,
    /// endpoints and paths, and `/health` is often reachable by more than the operator).
    last_failure: std::sync::Mutex<&'static str>,
}

impl Health {
    /// The bucket answered the probe. Says nothing about uploads: a bucket that answers HEAD while
    /// every PUT gets 403 is not healthy.
    pub fn probe_ok(&self) {
        self.probe_ok_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn probe_failed(&self) {
        self.probe_err_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The daemon started: how long uploads have not succeeded is counted from here.
    pub fn started(&self) {
        self.upload_ok_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// An upload was verified.
    pub fn upload_ok(&self) {
        self.upload_ok_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// An upload attempt failed; `what` is a bounded label (`"S3 requests"`, `"reading files"`).
    pub fn upload_failed(&self, what: &'static str) {
        self.upload_err_ms.store(now_ms(), Ordering::Relaxed);
        *self.last_failure.lock().expect("not poisoned") = what;
    }

    /// (healthy, JSON body). Unhealthy while the bucket probe fails, while files wait and the
    /// last upload attempt failed, or when files wait and no upload succeeded for `stale`.
    pub fn verdict(&self, queued: usize, stale: Duration) -> (bool, String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (probe_ok, probe_err) = (load(&self.probe_ok_ms), load(&self.probe_err_ms));
        let (up_ok, up_err) = (load(&self.upload_ok_ms), load(&self.upload_err_ms));
        let now = now_ms();
        let reason = if probe_err > probe_ok {
            Some("S3 failing: the bucket does not answer".to_owned())
        } else if queued > 0 && up_err > up_ok {
            Some(format!(
                "uploads failing ({}) with {queued} files queued",
                self.last_failure.lock().expect("not poisoned")
            ))
        } else if queued > 0 && now.saturating_sub(up_ok) > stale.as_millis() as u64 {
            Some(format!(
                "no upload succeeded for {}s with {queued} files queued",
                now.saturating_sub(up_ok) / 1000
            ))
        } else {
            None
        };
        match reason {
            Some(r) => (
                false,
                serde_json::json!({"status": "unhealthy", "reason": r, "queued": queued})
                    .to_string(),
            ),
            None => (
                true,
                serde_json::json!({"status": "ok", "queued": queued}).to_string(),
            ),
        }
    }
}

/// Serves `/metrics` and `/health` until `cancel`. `refresh` updates gauges before each scrape and
/// returns the queue depth for `/health`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    stale: Duration,
    refresh: Arc<dyn Fn() -> usize + Send + Sync>,
    cancel: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept(), if conns.len() < MAX_CONNECTIONS => match r {
                Ok((s, _)) => s,
                // Out of descriptors fails every accept at once: retrying at once spun a core.
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let (handle, health, refresh) = (handle.clone(), health.clone(), refresh.clone());
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (handle, health, refresh) = (handle.clone(), health.clone(), refresh.clone());
                async move {
                    let queued = refresh();
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => {
                            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
                        }
                        "/health" => match health.verdict(queued, stale) {
                            (true, b) => (StatusCode::OK, "application/json", b),
                            (false, b) => (StatusCode::SERVICE_UNAVAILABLE, "application/json", b),
                        },
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found: try /metrics or /health\n".into(),
                        ),
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
    conns.abort_all();
}

/// Binds the listener, with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
