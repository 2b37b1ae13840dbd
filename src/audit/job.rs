//! The prune job: follows Synapse's deletions into the bucket, on the daemon's schedule
//! (`prune.enabled`, every `prune.interval`) or once with the `prune` command.
//!
//! Each run takes one of two paths: the **incremental** one ([`super::incremental`]: our upload
//! records checked against the database in pages) or the **full** one (`audit`'s merge of the
//! whole bucket listing with the database, which also finds objects we never uploaded), taken when
//! the last full run is older than `prune.full_every` (and at the first run). Both record
//! sightings in the same table and delete under the same rules and limits (DESIGN.md 9), so an
//! orphan first seen by one may be deleted by the other once the grace period has passed.
//!
//! One at a time: a run holds the sweep's advisory lock (`synapse_db::SweepLock`) for its whole
//! length, so no sweep, prune or other instance's prune runs beside it; a run that finds the lock
//! taken does nothing and says so.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{AuditError, Auditor, Category, Options, Report};
use crate::config::Config;
use crate::queue::Queue;
use crate::state::{Op, State, StateError, StateHandle, now_ms};
use crate::synapse_db::Db;
use crate::upload::s3::ObjectStore;

/// The last run's report (JSON) in the state's text table, for `status`.
pub const LAST_PRUNE: &str = "last_prune";
/// When the last full run that ran to the end started (ms, as text).
pub const LAST_FULL_PRUNE: &str = "last_full_prune_ms";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrunePath {
    #[default]
    Incremental,
    Full,
}

impl PrunePath {
    pub fn as_str(self) -> &'static str {
        match self {
            PrunePath::Incremental => "incremental",
            PrunePath::Full => "full",
        }
    }
}

/// What one prune run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    pub path: PrunePath,
    pub dry_run: bool,
    pub started_at_ms: u64,
    pub seconds: f64,
    /// Another instance (or a sweep) held the lock: nothing was done.
    pub skipped_locked: bool,
    /// Upload records (incremental) or objects under the prefix (full) looked at.
    pub checked: u64,
    /// Of those, without a database row for their media.
    pub orphans: u64,
    /// Orphans kept this time: seen first less than the grace period ago (or just now), the object
    /// too new, a local file present, or the limits refused.
    pub waiting: u64,
    /// Orphans whose media has a database row again: their grace starts over.
    pub reappeared: u64,
    /// Orphans whose object was already gone (incremental: their records are dropped).
    pub already_gone: u64,
    pub deleted: Category,
    /// Why nothing was deleted: the sanity limits refused (text for people, reason for metrics).
    pub refused: Option<String>,
    pub refused_reason: Option<String>,
    /// Requests made: PostgreSQL queries and S3 requests (the full path's are counted from its
    /// pages: one LIST per 1,000 objects, one FETCH per 5,000 rows).
    pub db_queries: u64,
    pub s3_requests: u64,
}

impl PruneReport {
    pub fn new(path: PrunePath, dry_run: bool) -> Self {
        PruneReport {
            path,
            dry_run,
            started_at_ms: now_ms(),
            ..PruneReport::default()
        }
    }

    /// Takes the pruning outcome of an audit report ([`super::prune`] writes into one).
    pub(super) fn absorb(&mut self, rep: &Report) {
        self.waiting += rep.orphans_waiting;
        self.reappeared += rep.orphans_reappeared;
        self.deleted.count += rep.orphans_deleted.count;
        self.deleted.bytes += rep.orphans_deleted.bytes;
        self.deleted
            .examples
            .extend(rep.orphans_deleted.examples.iter().cloned());
    }

    fn from_audit(rep: &Report, dry_run: bool) -> Self {
        let mut r = PruneReport {
            checked: rep.objects,
            orphans: rep.orphans.count,
            refused: rep.prune_refused.clone(),
            refused_reason: rep.prune_refused_reason.clone(),
            db_queries: rep.database_files.div_ceil(5000) + 2,
            s3_requests: rep.objects.div_ceil(1000).max(1) + rep.orphans_deleted.count,
            ..PruneReport::new(PrunePath::Full, dry_run)
        };
        r.started_at_ms = rep.started_at_ms;
        r.absorb(rep);
        r
    }
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.skipped_locked {
            return write!(
                f,
                "{} prune skipped: another sweep or prune holds the lock",
                self.path.as_str()
            );
        }
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        write!(
            f,
            "{} prune in {:.1}s: {} {} checked, {} orphaned; {verb} {} objects ({:.1} MB), {} waiting, {} have a row again, {} already gone; {} database queries, {} S3 requests",
            self.path.as_str(),
            self.seconds,
            self.checked,
            match self.path {
                PrunePath::Incremental => "records",
                PrunePath::Full => "objects",
            },
            self.orphans,
            self.deleted.count,
            self.deleted.bytes as f64 / 1e6,
            self.waiting,
            self.reappeared,
            self.already_gone,
            self.db_queries,
            self.s3_requests,
        )?;
        if let Some(why) = &self.refused {
            write!(f, "; refused: {why}")?;
        }
        Ok(())
    }
}

/// The ops that remember `r` for `status` (and, for a full run, when it ran).
pub fn remember(r: &PruneReport) -> Vec<Op> {
    let mut kept = r.clone();
    kept.deleted.examples.clear();
    let mut ops = vec![Op::SetText(
        LAST_PRUNE,
        serde_json::to_string(&kept).expect("reports serialize"),
    )];
    if r.path == PrunePath::Full && !r.skipped_locked && !r.dry_run {
        ops.push(Op::SetText(LAST_FULL_PRUNE, r.started_at_ms.to_string()));
    }
    ops
}

/// The last run remembered (`None`: never, or unreadable).
pub fn last(state: &State) -> Result<Option<PruneReport>, StateError> {
    Ok(state
        .text(LAST_PRUNE)?
        .and_then(|t| serde_json::from_str(&t).ok()))
}

/// The path a scheduled run takes: full when no full run finished within `full_every`.
pub fn due_path(state: &State, full_every: Duration) -> Result<PrunePath, StateError> {
    let last_full = state
        .text(LAST_FULL_PRUNE)?
        .and_then(|t| t.parse::<u64>().ok());
    Ok(match last_full {
        Some(t) if t.saturating_add(full_every.as_millis() as u64) > now_ms() => {
            PrunePath::Incremental
        }
        _ => PrunePath::Full,
    })
}

/// One prune run under the lock. `path`: the one asked for, or `None` for the one due.
pub async fn run(
    a: &Auditor<'_>,
    path: Option<PrunePath>,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<PruneReport, AuditError> {
    let started = Instant::now();
    let path = match path {
        Some(p) => p,
        None => due_path(a.state, a.config.prune.full_every)?,
    };
    let Some(lock) = a.db.try_lock().await? else {
        return Ok(PruneReport {
            skipped_locked: true,
            ..PruneReport::new(path, dry_run)
        });
    };
    let grace = a.config.prune.grace;
    // Deletions stop as soon as the lock cannot be confirmed (PostgreSQL restarted, the lock
    // file replaced): another sweep or prune may have it by then.
    let stop = cancel.child_token();
    let done = CancellationToken::new();
    let work = async {
        let r = match path {
            PrunePath::Incremental => super::incremental::run(a, grace, dry_run, 10, &stop).await,
            PrunePath::Full => {
                let opts = Options {
                    delete_orphans: true,
                    older_than: Some(grace),
                    dry_run,
                    examples: 10,
                    ..Options::default()
                };
                a.run(&opts, &stop)
                    .await
                    .map(|rep| PruneReport::from_audit(&rep, dry_run))
            }
        };
        done.cancel();
        r
    };
    let (result, lost) = tokio::join!(work, lock.watch(&stop, &done));
    lock.release().await;
    if let Some(why) = lost
        && !cancel.is_cancelled()
    {
        return Err(AuditError::LostLock(why));
    }
    let mut r = result?;
    r.seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

/// `prune` without a running daemon: opens the state itself, remembers the run.
pub async fn run_standalone(
    config: &Config,
    path: Option<PrunePath>,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<PruneReport, AuditError> {
    let db = Db::new(super::db_config(config)?)?;
    let h = StateHandle::open(&config.state_dir)?;
    let queue = Arc::new(Queue::open(&h.state, h.committer.clone(), &config.upload)?);
    let store = ObjectStore::new(&config.s3, config.upload.multipart_part_size).await;
    let a = Auditor {
        config,
        db: &db,
        store: &store,
        state: &h.state,
        committer: &h.committer,
        queue: &queue,
    };
    let r = run(&a, path, dry_run, cancel).await;
    if let Ok(r) = &r
        && !r.skipped_locked
    {
        h.committer.apply(remember(r)).await?;
    }
    drop(queue);
    h.close().await;
    r
}
