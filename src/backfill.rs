//! `upload`: one pass over the whole store, uploading every file not yet verified in the bucket,
//! with `upload.concurrency` files in flight. The adoption command for an existing server, and the
//! cron-style fallback.
//!
//! A walker thread lists the store and drops files whose record matches (no request at all); the
//! rest go through a bounded channel to the uploaders. A failed file is reported and does not stop
//! the others, except for errors that would fail every file (credentials, bucket), which end the
//! run with that one error.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::layout::MediaPath;
use crate::scan::{self, Item};
use crate::state::{Op, State, StateError, StateHandle};
use crate::upload::limiter::{self, Breaker, Signal};
use crate::upload::s3::{ObjectStore, S3Error};
use crate::upload::{Outcome, UploadError, Uploader};

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the bucket is not usable")]
    Bucket(#[source] S3Error),
    #[error("the database: section is not usable")]
    Database(#[source] crate::synapse_db::DbError),
    #[error("stopped after {done} files")]
    Fatal {
        done: u64,
        #[source]
        source: UploadError,
    },
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub uploaded: u64,
    pub adopted: u64,
    pub unchanged: u64,
    pub vanished: u64,
    pub skipped: u64,
    /// Files whose upload failed.
    pub failed: u64,
    /// Parts of the store (directories, mostly) that could not be read: their files, whatever
    /// they hold, were not looked at, so they are not "failed files". The first few, described.
    pub unreadable: Vec<String>,
    pub unreadable_count: u64,
    /// Bad local copies replaced with their verified object.
    pub healed: u64,
    /// Of the failed: bad local copies left as they are (healing off) and conflicts.
    pub bad_copies: u64,
    pub conflicts: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "uploaded {} ({:.1} MB), already in bucket {}, unchanged {}, vanished {}, skipped {}, failed {} in {:.1}s",
            self.uploaded,
            self.bytes as f64 / 1e6,
            self.adopted,
            self.unchanged,
            self.vanished,
            self.skipped,
            self.failed,
            secs
        )?;
        if self.unreadable_count > 0 {
            write!(
                f,
                "; {} part(s) of the media store could not be read, their files were not looked at:",
                self.unreadable_count
            )?;
            for u in &self.unreadable {
                write!(f, "\n  {u}")?;
            }
        }
        if self.healed + self.bad_copies + self.conflicts > 0 {
            write!(
                f,
                "; bad local copies healed {}, not healed {}; conflicts {}",
                self.healed, self.bad_copies, self.conflicts
            )?;
        }
        Ok(())
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on stderr when it is a terminal, else a log line every 10 s.
    Auto,
    /// Log lines only.
    Log,
}

/// Runs the backfill until done or `cancel` fires (in-flight files get `shutdown_grace` to
/// finish; then their reads stop and their multipart uploads are aborted; the rest wait for the
/// next run).
pub async fn run(
    config: &Config,
    progress: Progress,
    cancel: CancellationToken,
) -> Result<Summary, BackfillError> {
    let started = Instant::now();
    let state = State::open(&config.state_dir)?;
    let store = Arc::new(ObjectStore::new(&config.s3, config.upload.multipart_part_size).await);
    store.check_bucket().await.map_err(BackfillError::Bucket)?;
    // Records may wait a little for their commit: fewer, larger transactions (see below).
    let handle = StateHandle::start_lingering(state.clone(), COMMIT_LINGER);
    // An empty prefix has nothing to adopt: skip the HEAD before every PUT (half the requests).
    let empty = store
        .prefix_is_empty()
        .await
        .map_err(BackfillError::Bucket)?;
    if empty {
        tracing::info!(
            "The bucket prefix is empty: uploading without looking for existing objects."
        );
    }
    let arbiter = match &config.database {
        Some(db) => Some(Arc::new(
            crate::synapse_db::Db::new(db).map_err(BackfillError::Database)?,
        )),
        None => None,
    };
    let uploader = Uploader::new(
        config.media_store_path.clone(),
        store,
        state.clone(),
        config.upload.multipart_threshold,
        config.upload.multipart_part_size,
    )
    .assume_absent(empty)
    .arbiter(arbiter)
    .heal(
        config
            .upload
            .heal_bad_local_copies
            .then_some(config.upload.settle),
    );

    let bar = Bar::new(progress);
    let stop_walk = Arc::new(AtomicBool::new(false));
    // Found files go to the uploads in batches: with the channel full (the walk is far ahead),
    // every file taken woke the walking thread, one context switch per file.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<scan::Found>>(16);
    let (problem_tx, mut problem_rx) = tokio::sync::mpsc::unbounded_channel::<scan::Problem>();
    let walker = {
        let root = config.media_store_path.clone();
        let include_url_cache = config.upload.include_url_cache;
        let stop = stop_walk.clone();
        let state = state.clone();
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || {
            let mut unchanged = 0u64;
            let mut batch = Vec::with_capacity(WALK_BATCH);
            scan::walk(&root, include_url_cache, |item| {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                match item {
                    Item::File(found) => {
                        // Skip what is recorded with the same size and mtime without any request.
                        if let Ok(Some(rec)) = state.record(&found.path)
                            && rec.matches(found.snapshot.size, found.snapshot.mtime_ns)
                        {
                            unchanged += 1;
                            bar.found(1, 0);
                            bar.done(0);
                            return true;
                        }
                        bar.found(1, found.snapshot.size);
                        batch.push(found);
                        batch.len() < WALK_BATCH
                            || tx
                                .blocking_send(std::mem::replace(
                                    &mut batch,
                                    Vec::with_capacity(WALK_BATCH),
                                ))
                                .is_ok()
                    }
                    Item::Problem(p) => problem_tx.send(p).is_ok(),
                }
            });
            if !batch.is_empty() && !stop.load(Ordering::Relaxed) {
                let _ = tx.blocking_send(batch);
            }
            unchanged
        })
    };

    let mut summary = Summary::default();
    let mut fatal = None;
    let mut done = 0u64;
    {
        let files = futures::stream::poll_fn(|cx| rx.poll_recv(cx)).flat_map(futures::stream::iter);
        // The store's limiter sets how many run at once (adaptive, at most
        // `upload.concurrency`, paused by throttling); `halt` drops the files still waiting for a
        // slot once the run stops (they wait for the next run).
        let limiter = uploader.store().limiter().clone();
        limiter.set_cap(config.upload.concurrency);
        limiter.set_rate(config.upload.max_requests_per_second);
        let halt = CancellationToken::new();
        let mut results = files
            .map(|found| {
                let (uploader, limiter, halt) = (&uploader, &limiter, &halt);
                async move {
                    let permit = tokio::select! {
                        p = limiter.start() => p,
                        _ = halt.cancelled() => return (None, found),
                    };
                    let result = uploader.upload(&found.path).await;
                    let breaker = permit.finish(limiter::signal(&result));
                    (Some((result, breaker)), found)
                }
            })
            .buffer_unordered(config.upload.concurrency);
        // Records waiting for their commit. A file counts as uploaded only once its record is
        // durable, but its upload slot does not wait for that fsync: the slot takes the next file,
        // and the records that pile up meanwhile share the next transaction (fewer, larger
        // commits).
        let mut commits = futures::stream::FuturesUnordered::new();
        let mut walking = true;
        // Set by an interruption: the uploads in flight get `shutdown_grace`, like the daemon's.
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            if !walking && commits.is_empty() {
                break;
            }
            let (result, found) = tokio::select! {
                _ = cancel.cancelled(), if grace.is_none() => {
                    tracing::warn!(grace = ?config.shutdown_grace, "Interrupted: finishing the uploads in flight within shutdown_grace, the rest waits for the next run.");
                    stop_walk.store(true, Ordering::Relaxed);
                    halt.cancel();
                    grace = Some(Box::pin(tokio::time::sleep(config.shutdown_grace)));
                    continue;
                }
                _ = async { grace.as_mut().expect("set").await }, if walking && grace.is_some() => {
                    // The uploads still in flight are dropped with `results` below (their
                    // records were not committed: they are looked at again next time); their
                    // reads stop at the next chunk.
                    tracing::warn!("Grace period over; unfinished uploads wait for the next run.");
                    uploader.abandon();
                    walking = false;
                    continue;
                }
                next = results.next(), if walking && commits.len() < MAX_COMMITS_WAITING => {
                    let Some((result, found)) = next else {
                        walking = false;
                        continue;
                    };
                    let Some((result, breaker)) = result else { continue };
                    // S3 went down mid-run (the breaker opened: several files in a row could
                    // not reach it): stop with that error instead of failing every remaining
                    // file one probe at a time. Nothing is lost: the next run picks up here.
                    if breaker == Breaker::Open
                        && matches!(&result, Err(e) if limiter::error_signal(e) == Signal::Unavailable)
                    {
                        stop_walk.store(true, Ordering::Relaxed);
                        halt.cancel();
                        if let Err(e) = result {
                            summary.failed += 1;
                            fatal.get_or_insert(e);
                        }
                        done += 1;
                        bar.done(found.snapshot.size);
                        continue;
                    }
                    let ops = match &result {
                        Ok(o) => o.record().map(|r| vec![
                            Op::Record(found.path.clone(), r),
                            Op::ProblemClear(found.path.clone()),
                        ]),
                        // Remembered for `status` and `audit` until an upload is verified.
                        Err(e) => e.problem().map(|p| vec![Op::Problem(found.path.clone(), p)]),
                    };
                    if let Some(ops) = ops {
                        let pending = handle.committer.submit(ops);
                        commits.push(async move {
                            match pending.wait().await {
                                Ok(()) => (result, found),
                                Err(e) => (Err(e.into()), found),
                            }
                        });
                        continue;
                    }
                    (result, found)
                }
                Some(committed) = commits.next(), if !commits.is_empty() => committed,
            };
            done += 1;
            tally(&mut summary, &mut fatal, &stop_walk, result, &found);
            bar.done(found.snapshot.size);
            while let Ok(p) = problem_rx.try_recv() {
                report_problem(&p, &mut summary);
            }
        }
    }
    // The dropped uploads' multipart uploads hold their parts in the bucket (billed) until
    // aborted; their cancelled reads end meanwhile.
    let (_, aborted) = tokio::join!(
        uploader.blocking_ended(Duration::from_secs(2)),
        uploader.store().abort_abandoned()
    );
    if aborted > 0 {
        tracing::info!(
            uploads = aborted,
            "Aborted the multipart uploads the interruption left unfinished."
        );
    }
    drop(rx);
    summary.unchanged += walker.await.unwrap_or(0);
    while let Ok(p) = problem_rx.try_recv() {
        report_problem(&p, &mut summary);
    }
    // Copy problems of files that are gone (an operator resolved a conflict by deleting the local
    // file; the walk never met them again) are over.
    if !stop_walk.load(Ordering::Relaxed) {
        let gone = problems_of_gone_files(&state, &config.media_store_path);
        if !gone.is_empty() {
            handle
                .committer
                .apply(gone.into_iter().map(Op::ProblemClear).collect())
                .await?;
        }
    }
    // The commit thread ends once it has committed what is left.
    handle.close().await;
    bar.finish();
    summary.elapsed = started.elapsed();
    if let Some(source) = fatal {
        return Err(BackfillError::Fatal { done, source });
    }
    Ok(summary)
}

/// The paths with a copy problem whose local file no longer exists. Blocking (a stat each; the
/// table holds only the problems of the moment).
fn problems_of_gone_files(state: &State, root: &std::path::Path) -> Vec<MediaPath> {
    let mut gone = Vec::new();
    let mut after: Option<String> = None;
    while let Ok(page) = state.problems_after(after.as_deref(), 1000) {
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (p, _) in page {
            if let Ok(p) = MediaPath::parse(&p)
                && matches!(
                    crate::upload::digest::stat(&p.to_path(root)),
                    Ok(crate::upload::digest::Stat::Vanished)
                )
            {
                gone.push(p);
            }
        }
    }
    gone
}

/// How long the commit thread gathers records before each commit. A crash loses only records not
/// yet committed: the next run finds those objects by HEAD and records them without a PUT.
const COMMIT_LINGER: Duration = Duration::from_millis(25);

/// Records waiting for their commit at most; beyond that, no new upload result is taken.
const MAX_COMMITS_WAITING: usize = 1024;

/// Found files per hand-over from the walk to the uploads (see `run`).
const WALK_BATCH: usize = 64;

/// Counts one finished file.
fn tally(
    summary: &mut Summary,
    fatal: &mut Option<UploadError>,
    stop_walk: &AtomicBool,
    result: Result<Outcome, UploadError>,
    found: &scan::Found,
) {
    match result {
        Ok(Outcome::Uploaded { record }) => {
            summary.uploaded += 1;
            summary.bytes += record.size;
            tracing::debug!(path = %found.path, bytes = record.size, "Uploaded.");
        }
        Ok(Outcome::Adopted { .. }) => summary.adopted += 1,
        Ok(Outcome::Healed { .. }) => summary.healed += 1,
        Ok(Outcome::Unchanged) => summary.unchanged += 1,
        Ok(Outcome::Vanished | Outcome::Withdrawn) => summary.vanished += 1,
        Ok(Outcome::NotRegular) => summary.skipped += 1,
        // Interrupted: not a failure; the next run looks at it again.
        Err(UploadError::Cancelled) => {}
        Err(e) if e.is_fatal_for_run() => {
            summary.failed += 1;
            stop_walk.store(true, Ordering::Relaxed);
            fatal.get_or_insert(e);
        }
        Err(e) => {
            summary.failed += 1;
            match &e {
                UploadError::BadCopy { .. } => summary.bad_copies += 1,
                UploadError::Conflict { .. } => summary.conflicts += 1,
                _ => {}
            }
            tracing::error!(path = %found.path, error = %crate::Chain(&e), "Upload failed.");
        }
    }
}

fn report_problem(p: &scan::Problem, summary: &mut Summary) {
    match p {
        scan::Problem::Unreadable { .. } => {
            summary.unreadable_count += 1;
            if summary.unreadable.len() < 10 {
                summary.unreadable.push(p.to_string());
            }
            tracing::error!(problem = %p, "Cannot read part of the media store.");
        }
        scan::Problem::BadName { .. } | scan::Problem::SymlinkedDir { .. } => {
            summary.skipped += 1;
            tracing::warn!(problem = %p, "Skipped.");
        }
    }
}

/// Progress display: an indicatif bar on a terminal, else an info line every 10 s.
#[derive(Clone)]
struct Bar {
    inner: Option<indicatif::ProgressBar>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    found: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    ticker: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Bar {
    fn new(mode: Progress) -> Self {
        let counters = Arc::new(Counters::default());
        if mode == Progress::Auto && std::io::stderr().is_terminal() {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} files {msg}",
                )
                .expect("static template"),
            );
            pb.enable_steady_tick(Duration::from_millis(200));
            return Bar {
                inner: Some(pb),
                counters,
            };
        }
        let c = counters.clone();
        let started = Instant::now();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            every.tick().await;
            loop {
                every.tick().await;
                let done = c.done.load(Ordering::Relaxed);
                let bytes = c.bytes.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    done,
                    found = c.found.load(Ordering::Relaxed),
                    mb = bytes as f64 / 1e6,
                    files_per_s = (done as f64 / secs).round(),
                    "Uploading."
                );
            }
        });
        *counters.ticker.lock().expect("not poisoned") = Some(ticker);
        Bar {
            inner: None,
            counters,
        }
    }

    fn found(&self, files: u64, _bytes: u64) {
        self.counters.found.fetch_add(files, Ordering::Relaxed);
        if let Some(pb) = &self.inner {
            pb.inc_length(files);
        }
    }

    fn done(&self, bytes: u64) {
        self.counters.done.fetch_add(1, Ordering::Relaxed);
        let total = self.counters.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(pb) = &self.inner {
            pb.inc(1);
            let secs = pb.elapsed().as_secs_f64().max(0.001);
            pb.set_message(format!(
                "{:.1} MB, {:.1} MB/s",
                total as f64 / 1e6,
                total as f64 / 1e6 / secs
            ));
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.inner {
            pb.finish_and_clear();
        }
        if let Some(t) = self.counters.ticker.lock().expect("not poisoned").take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    #[test]
    fn an_unreadable_directory_is_not_a_failed_file_and_is_named_in_the_summary() {
        let mut s = Summary::default();
        report_problem(
            &scan::Problem::Unreadable {
                path: "/srv/media/local_content/ab".into(),
                error: "Permission denied (os error 13)".into(),
            },
            &mut s,
        );
        assert_eq!((s.failed, s.unreadable_count), (0, 1));
        let text = s.to_string();
        assert!(
            text.contains("failed 0")
                && text.contains("could not be read")
                && text.contains("/srv/media/local_content/ab"),
            "{text}"
        );
    }
}
