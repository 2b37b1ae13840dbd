//! The sweep: frees local disk by deleting the local copies of media nobody accessed for
//! `sweep.keep_local_for`, never the only copy.
//!
//! Invariants (DESIGN.md 1, 2, 5, 7, 8):
//! - A file is deleted only if, right before, the bucket holds an object at its key with the same
//!   size and digest (HEAD, or in a dense sweep a listing page read during this sweep at most
//!   [`dense::MAX_PAGE_AGE`] before: see [`dense`] for why that is as good and the window left;
//!   the digest from our record when the file still matches it, else from reading the file), its
//!   media is aged out per PostgreSQL, and the file's size and mtime did not change between that
//!   check and the unlink.
//! - Where Synapse's database holds the media's sha256, the original is deleted only if its bytes
//!   match it (and so, by the MD5 above, the object's do): a bad local copy confirms nothing, and
//!   neither does an object holding the same wrong bytes.
//! - Any error while confirming a media (S3, timeout, permission) deletes nothing of that media; a
//!   database error stops the sweep. Both are reported.
//! - A file whose object is missing or different, or that does not match Synapse's hash, is not
//!   deleted: it is queued, and the upload decides what is right (the verified object wins, see
//!   [`crate::upload::verdict`]): a missing object is uploaded again, a bad local copy is healed
//!   from the bucket, never uploaded over the object. The sweep never forgets which bytes were
//!   verified: it only marks the record stale.
//! - Paths come from validated database ids through [`MediaPath`]; nothing outside the store is
//!   touched, symlinks are never followed, and only the AB/CD levels below a top-level folder
//!   (never the folder itself, nor a remote origin's folder) are removed when they become empty.
//! - One sweep at a time across instances: PostgreSQL advisory lock
//!   [`crate::synapse_db::SWEEP_LOCK_KEY`], held on a connection that never returns to the pool
//!   ([`SweepLock`]), or on SQLite a `flock` on `state_dir/sweep.lock`; confirmed every second;
//!   a sweep that cannot confirm it (PostgreSQL restarted, lock file removed) deletes nothing
//!   more and stops.

pub mod dense;
mod files;
mod pages;
pub mod provider;
pub mod report;
mod walk;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use self::dense::{Cursor as ListingCursor, Seen};
use self::files::Verdict;
pub use self::report::Report;
use crate::config::{Config, Listing};
use crate::queue::Queue;
use crate::state::{Committer, State, StateHandle, now_ms};
use crate::synapse_db::{AgedMedia, Db, DbError};
use crate::upload::s3::ObjectStore;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("refusing to sweep: {0}")]
    Unsafe(String),
    #[error(
        "the sweep needs Synapse's database: set synapse_config (homeserver.yaml), or a database: section"
    )]
    NoDatabase,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// What a sweep needs.
pub struct Sweeper {
    pub config: Config,
    pub db: Arc<Db>,
    pub store: Arc<ObjectStore>,
    pub state: State,
    pub committer: Committer,
    pub queue: Arc<Queue>,
}

/// `sweep` without a running daemon: opens the state itself, sweeps once, remembers the report.
pub async fn run_standalone(
    config: &Config,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<Report, SweepError> {
    let db_config = config.database.as_ref().ok_or(SweepError::NoDatabase)?;
    if !dry_run {
        provider::check_provider(config)?;
    }
    let h = StateHandle::open(&config.state_dir)?;
    let queue = Arc::new(Queue::open(&h.state, h.committer.clone(), &config.upload)?);
    let sweeper = Sweeper {
        config: config.clone(),
        db: Arc::new(Db::new(db_config)?),
        store: Arc::new(ObjectStore::new(&config.s3, config.upload.multipart_part_size).await),
        state: h.state.clone(),
        committer: h.committer.clone(),
        queue,
    };
    let report = sweeper.run(dry_run, cancel).await;
    if let Ok(r) = &report
        && !r.skipped_locked
    {
        h.committer.apply(vec![report::remember(r)]).await?;
    }
    drop(sweeper);
    h.close().await;
    report
}

impl Sweeper {
    /// One sweep. `dry_run` deletes nothing and lists what would be deleted.
    pub async fn run(
        &self,
        dry_run: bool,
        cancel: &CancellationToken,
    ) -> Result<Report, SweepError> {
        if !dry_run {
            provider::check_provider(&self.config)?;
        }
        let started = Instant::now();
        let mut report = Report {
            dry_run,
            started_at_ms: now_ms(),
            ..Report::default()
        };
        let Some(lock) = self.db.try_lock().await? else {
            tracing::info!("Another sweep is running (sweep lock held); skipping.");
            report.skipped_locked = true;
            return Ok(report);
        };
        let cutoff =
            now_ms().saturating_sub(self.config.sweep.keep_local_for.as_millis() as u64) as i64;
        report.dense = self.choose_dense(cutoff).await;
        let deletions = AtomicU64::new(0);
        // The sweep stops once the lock cannot be confirmed held (a PostgreSQL restart ends its
        // session and frees it for another instance): two sweeps must never run at once.
        let stop = cancel.child_token();
        let done = CancellationToken::new();
        let sweep = async {
            let r = self
                .sweep_all(cutoff, dry_run, &deletions, &mut report, &stop)
                .await;
            done.cancel();
            r
        };
        let (result, lost) = tokio::join!(sweep, lock.watch(&stop, &done));
        lock.release().await;
        if let Some(why) = lost {
            let why = format!(
                "lost the sweep lock ({why}); stopped so that no two sweeps run at once (the next sweep takes it again)"
            );
            tracing::warn!(reason = %why, "Sweep stopped: lost its sweep lock. Nothing unconfirmed was deleted.");
            report.stopped = Some(why);
        }
        if let Err(e) = result {
            report.stopped = Some(crate::Chain(&e).to_string());
            tracing::error!(error = %crate::Chain(&e), "Sweep stopped: database error. Nothing unconfirmed was deleted.");
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Whether this sweep confirms local media from listings ([`dense::choose`]). A failed count
    /// keeps the HEADs (the sweep itself then reports the database error).
    async fn choose_dense(&self, cutoff: i64) -> bool {
        let mode = self.config.sweep.listing;
        if mode != Listing::Auto {
            return dense::choose(mode, 0, 0);
        }
        match self.db.aged_local_count(cutoff).await {
            Ok((aged, all)) => {
                let dense = dense::choose(mode, aged, all);
                tracing::info!(
                    aged_local_media = aged,
                    local_media = all,
                    dense,
                    "Sweep: confirming from {}.",
                    if dense {
                        "bucket listings"
                    } else {
                        "one HEAD per file"
                    }
                );
                dense
            }
            Err(e) => {
                tracing::warn!(error = %crate::Chain(&e), "Cannot count the aged media; confirming with one HEAD per file.");
                false
            }
        }
    }

    async fn sweep_all(
        &self,
        cutoff: i64,
        dry_run: bool,
        deletions: &AtomicU64,
        report: &mut Report,
        cancel: &CancellationToken,
    ) -> Result<(), DbError> {
        // The listing cursors of a dense sweep, one per folder of local media; dropped once a
        // listing fails (each file then gets its HEAD, as in a sparse sweep).
        let mut listing = report.dense.then(|| {
            [
                ListingCursor::new("local_content/"),
                ListingCursor::new("local_thumbnails/"),
                ListingCursor::new("remote_content/"),
                ListingCursor::new("remote_thumbnail/"),
            ]
        });
        let mut list_requests = 0;
        // Boxed: the sweep's future nested in the command's and the daemon's overflowed the
        // compiler's type-layout depth once the dense path was added.
        let r = Box::pin(self.sweep_pages(
            cutoff,
            dry_run,
            deletions,
            report,
            cancel,
            &mut listing,
            &mut list_requests,
        ))
        .await;
        report.list_requests =
            list_requests + listing.iter().flatten().map(|c| c.requests).sum::<u64>();
        r
    }

    fn limit_reached(&self, deletions: &AtomicU64) -> bool {
        self.config
            .sweep
            .max_deletions_per_run
            .is_some_and(|max| deletions.load(Ordering::SeqCst) >= max)
    }

    /// Takes one deletion from `sweep.max_deletions_per_run`; false when none is left.
    fn reserve(&self, deletions: &AtomicU64) -> bool {
        match self.config.sweep.max_deletions_per_run {
            None => {
                deletions.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(max) => deletions
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                    (d < max).then_some(d + 1)
                })
                .is_ok(),
        }
    }

    /// Confirms and deletes the files of one media (as examined; `seen`: what a dense sweep's
    /// listing showed of each, in the same order, or empty), and says whether it had any local
    /// file left. Errors affect this media only.
    async fn sweep_examined(
        &self,
        media: AgedMedia,
        examined: Result<files::Examined, String>,
        seen: Vec<Option<Seen>>,
        dry_run: bool,
        deletions: &AtomicU64,
        cancel: &CancellationToken,
    ) -> (files::MediaOutcome, bool) {
        let examined = match examined {
            Ok(f) => f,
            Err(e) => {
                let mut out = files::MediaOutcome::default();
                out.error(format!("{}: {e}", media_name(&media)));
                return (out, true);
            }
        };
        let had_local_files = examined.iter().any(|(_, l)| !matches!(l, Ok(None)));
        (
            self.sweep_files(media, examined, seen, dry_run, deletions, cancel)
                .await,
            had_local_files,
        )
    }

    /// A file's verdict: from the dense sweep's listing entry when it confirms, else a HEAD.
    async fn confirm(
        &self,
        path: &crate::layout::MediaPath,
        local: files::Local,
        seen: Option<&Seen>,
        out: &mut files::MediaOutcome,
    ) -> Verdict {
        match files::confirm_listed(&local, seen) {
            Some(v) => {
                if matches!(v, Verdict::Confirmed { .. }) {
                    out.confirmed_by_listing += 1;
                }
                v
            }
            None => {
                out.heads += 1;
                files::confirm(self, path, local).await
            }
        }
    }

    async fn sweep_files(
        &self,
        media: AgedMedia,
        examined: files::Examined,
        seen: Vec<Option<Seen>>,
        dry_run: bool,
        deletions: &AtomicU64,
        cancel: &CancellationToken,
    ) -> files::MediaOutcome {
        let mut out = files::MediaOutcome::default();
        // Confirm every file first: an error on any of them keeps the whole media.
        let mut verdicts = Vec::with_capacity(examined.len());
        let mut seen = seen.into_iter();
        for (path, local) in examined {
            let hint = seen.next().flatten();
            let (record, v) = match local {
                Ok(Some(l)) => (
                    l.record,
                    self.confirm(&path, l, hint.as_ref(), &mut out).await,
                ),
                Ok(None) => (None, Verdict::Gone),
                Err(e) => (None, Verdict::Error(e)),
            };
            if let Verdict::Error(e) = &v {
                out.error(format!("{path}: {e}"));
                out.kept_error += 1;
                return out;
            }
            verdicts.push((path, record, v));
        }
        let mut to_upload = Vec::new();
        let mut stale = Vec::new();
        let mut to_delete = Vec::new();
        for (path, record, v) in verdicts {
            match v {
                Verdict::Confirmed { snapshot, record } => {
                    if let Some(r) = record {
                        // Remember what we just verified (a file uploaded by another tool).
                        let _ = self
                            .committer
                            .apply(vec![crate::state::Op::Record(path.clone(), r)])
                            .await;
                    }
                    if cancel.is_cancelled() || !self.reserve(deletions) {
                        break;
                    }
                    if dry_run {
                        out.deleted.push((path.to_string(), snapshot.size));
                        continue;
                    }
                    to_delete.push((path, snapshot));
                }
                // The file is kept and queued: the upload decides (DESIGN.md invariant 8). A
                // missing object is uploaded again; a bad local copy of a verified object is
                // healed from it, never uploaded over it; a conflict is reported. Our record's
                // (size, mtime) shortcut no longer holds (else the upload would trust it and skip
                // the file), but its digest stays: it is our memory of which bytes were verified.
                Verdict::Missing | Verdict::Different | Verdict::BadCopy => {
                    match v {
                        Verdict::Missing => out.kept_not_in_bucket += 1,
                        Verdict::Different => out.kept_different += 1,
                        _ => {
                            out.kept_bad_copy += 1;
                            tracing::error!(path = %path, "Sweep kept a local file that does not match Synapse's sha256 (a bad local copy); queued for healing.");
                        }
                    }
                    if let Some(r) = record.filter(|r| !r.stale) {
                        stale.push(crate::state::Op::Record(path.clone(), r.stale()));
                    }
                    to_upload.push(path);
                }
                Verdict::Gone => {}
                Verdict::Error(_) => unreachable!("returned above"),
            }
        }
        // Each file is checked unchanged again right before its unlink (same size and mtime as
        // confirmed), all in one blocking task with the removal of the emptied thumbnail directory.
        // Stopped meanwhile (shutdown, or the lock was lost): delete nothing more.
        if cancel.is_cancelled() && !to_delete.is_empty() {
            deletions.fetch_sub(to_delete.len() as u64, Ordering::SeqCst);
            to_delete.clear();
        }
        let root = &self.config.media_store_path;
        for (path, snapshot, r) in files::delete_unchanged(root, &media, to_delete).await {
            match r {
                Ok(true) => {
                    tracing::debug!(path = %path, bytes = snapshot.size, "Deleted local copy.");
                    out.deleted.push((path.to_string(), snapshot.size));
                }
                Ok(false) => {
                    deletions.fetch_sub(1, Ordering::SeqCst);
                    out.kept_changed += 1;
                    to_upload.push(path);
                }
                Err(e) => {
                    deletions.fetch_sub(1, Ordering::SeqCst);
                    out.kept_error += 1;
                    out.error(format!("{path}: cannot delete: {e}"));
                }
            }
        }
        // A record of a file whose object is gone or different (deleted by hand, a lifecycle rule,
        // another tool, a bad local copy) no longer vouches for the file: marked stale before the
        // file is queued, so a crash in between leaves a stale record, which the next scan queues;
        // never a record that hides a missing object. A dry run leaves the records alone.
        if !dry_run
            && !stale.is_empty()
            && let Err(e) = self.committer.apply(stale).await
        {
            out.error(format!("cannot forget records: {e}"));
        }
        if !to_upload.is_empty() {
            let now = now_ms();
            let items = to_upload.into_iter().map(|p| (p, now, false)).collect();
            if let Err(e) = self.queue.enqueue(items).await {
                out.error(format!("cannot queue uploads: {e}"));
            }
        }
        out
    }
}

/// A media as an admin finds it in Synapse's admin API: `media_id`, or `origin/media_id`.
fn media_name(m: &AgedMedia) -> String {
    match m {
        AgedMedia::Local { media_id, .. } => format!("local media {media_id}"),
        AgedMedia::Remote {
            origin, media_id, ..
        } => format!("remote media {origin}/{media_id}"),
    }
}
