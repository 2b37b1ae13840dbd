//! `audit`: reconciles Synapse's database, the bucket and the local store, and answers "is every
//! media my users can request actually somewhere?".
//!
//! Four sorted streams (see [`sources`]) are merged by relative path, so a store of millions of
//! media is audited with bounded memory. Each path falls into at most a few categories:
//! - **lost**: the database lists it, but it is neither local nor in the bucket;
//! - **not uploaded**: a local file without a verified object (our record matching the file, and
//!   an object of the same size);
//! - **mismatched**: the object's size differs from the local file or our record, or its digest
//!   (when the listing's ETag is an MD5 and a HEAD confirms it) differs from our record;
//! - **orphan**: an object whose media has no database row; **unknown local**: the same for files;
//! - **incomplete uploads**: multipart uploads under the prefix never completed nor aborted
//!   ([`incomplete`]; `--fix` aborts those of media keys older than a day).
//!
//! Safety (DESIGN.md 1, 5): the audit reads; it writes only with `--fix` (queues uploads) and
//! `--delete-orphans` (see [`prune`]). Any S3, database or walk error aborts it before any deletion.
//! Orphan sightings are recorded by every audit; an orphan is deletable only once an earlier
//! audit saw it orphaned at least the grace period ago, and this one still does.

mod forget;
mod incomplete;
mod incremental;
pub mod job;
pub mod limits;
mod prune;
mod report;
pub mod sources;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use self::forget::{ForgetItem, ForgetReport, forget, forget_standalone};
pub use self::job::{PrunePath, PruneReport};
pub use self::report::{Category, Report};
use self::sources::{BucketStream, DbKind, DbStream, DiskStream, StateStream};
use crate::config::Config;
use crate::layout::MediaPath;
use crate::queue::Queue;
use crate::state::{Committer, Op, State, StateHandle, now_ms};
use crate::synapse_db::{Db, DbError};
use crate::upload::s3::ObjectStore;

/// Deletions one audit prepares at most; the next audit goes on.
const MAX_DELETIONS: usize = 100_000;
/// Ops per state transaction while the merge runs.
const OPS_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "the audit needs Synapse's database: set synapse_config (homeserver.yaml), or a database: section"
    )]
    NoDatabase,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    S3(#[from] crate::upload::s3::S3Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("cannot walk the media store: {0}")]
    Walk(String),
    #[error(
        "{what} returned {after:?} after {before:?}, out of byte order; the audit needs sorted sources and stopped (nothing was deleted)"
    )]
    OutOfOrder {
        what: &'static str,
        before: String,
        after: String,
    },
    #[error("interrupted (nothing was deleted)")]
    Cancelled,
    #[error(
        "lost the sweep lock ({0}); stopped so that no two sweeps or prunes run at once (what was deleted before is in the log; the next run takes the lock again)"
    )]
    LostLock(String),
}

/// What to do besides reporting.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Options {
    /// Queue uploads for the not-uploaded and mismatched files.
    pub fix: bool,
    /// Delete orphaned objects seen orphaned for `older_than` (two audits at least).
    pub delete_orphans: bool,
    pub older_than: Option<Duration>,
    /// Delete nothing; report what would be deleted.
    pub dry_run: bool,
    /// Examples kept per category.
    pub examples: usize,
    /// Prune even when [`limits`] refuse (the admin checked that the orphans are real).
    #[serde(default)]
    pub ignore_prune_limits: bool,
}

/// What an audit reads and writes.
pub struct Auditor<'a> {
    pub config: &'a Config,
    pub db: &'a Db,
    pub store: &'a ObjectStore,
    pub state: &'a State,
    pub committer: &'a Committer,
    pub queue: &'a Queue,
}

/// The `database:` section, or why there is none.
fn db_config(config: &Config) -> Result<&crate::config::DatabaseConfig, AuditError> {
    config.database.as_ref().ok_or(AuditError::NoDatabase)
}

/// `audit` without a running daemon: opens the state itself.
pub async fn run_standalone(
    config: &Config,
    opts: &Options,
    cancel: &CancellationToken,
) -> Result<Report, AuditError> {
    let db = Db::new(db_config(config)?)?;
    let h = StateHandle::open(&config.state_dir)?;
    let queue = Arc::new(Queue::open(&h.state, h.committer.clone(), &config.upload)?);
    let store = ObjectStore::new(&config.s3, config.upload.multipart_part_size).await;
    let report = Auditor {
        config,
        db: &db,
        store: &store,
        state: &h.state,
        committer: &h.committer,
        queue: &queue,
    }
    .run(opts, cancel)
    .await;
    drop(queue);
    h.close().await;
    report
}

/// State carried along the merge.
struct Merge {
    report: Report,
    /// The thumbnail folder (`…/REST/`) of the last existing media the database listed.
    media_dir: Option<String>,
    ops: Vec<Op>,
    fix: Vec<MediaPath>,
    candidates: Vec<(MediaPath, u64)>,
    now: u64,
    grace_ms: Option<u64>,
}

impl Auditor<'_> {
    pub async fn run(
        &self,
        opts: &Options,
        cancel: &CancellationToken,
    ) -> Result<Report, AuditError> {
        let started = Instant::now();
        let n = opts.examples;
        let mut m = Merge {
            report: Report::new(self.store, &self.config.media_store_path, opts),
            media_dir: None,
            ops: Vec::new(),
            fix: Vec::new(),
            candidates: Vec::new(),
            now: now_ms(),
            grace_ms: opts.older_than.map(|d| d.as_millis() as u64),
        };
        let mut db = DbStream::open(self.db).await?;
        let mut bucket = BucketStream::new(self.store);
        let mut disk = DiskStream::start(self.config.media_store_path.clone());
        let mut records = StateStream::records(self.state.clone());
        let mut seen = StateStream::sightings(self.state.clone());
        loop {
            if cancel.is_cancelled() {
                return Err(AuditError::Cancelled);
            }
            // Refill whatever ran dry, in parallel: listing pages and FETCHes overlap.
            let (a, b, c, d, e) = tokio::join!(
                db.fill(n),
                bucket.fill(),
                disk.fill(n),
                records.fill(),
                seen.fill()
            );
            a?;
            b?;
            c?;
            d?;
            e?;
            let heads = [
                db.rows.peek(),
                bucket.objects.peek(),
                disk.files.peek(),
                records.items.peek(),
                seen.items.peek(),
            ];
            let Some(key) = heads.into_iter().flatten().min().map(str::to_owned) else {
                break;
            };
            // Duplicate rows (two remote media sharing a filesystem id) count once.
            let row = db.take_all(&key, n).await?;
            let object = bucket.objects.take(&key);
            let file = disk.files.take(&key);
            let record = records.items.take(&key);
            let sighting = seen.items.take(&key);
            self.one(&mut m, &key, row, object, file, record, sighting, n)
                .await?;
            if m.ops.len() >= OPS_BATCH {
                self.committer.apply(std::mem::take(&mut m.ops)).await?;
            }
            if m.fix.len() >= OPS_BATCH {
                self.fix(&mut m).await?;
            }
        }
        self.committer.apply(std::mem::take(&mut m.ops)).await?;
        self.fix(&mut m).await?;
        m.report.invalid_database_rows.count = db.invalid_count;
        m.report.invalid_database_rows.examples = db.invalid.iter().map(|p| p.into()).collect();
        m.report.unknown_local.count += disk.bad_name_count;
        for name in disk
            .bad_names
            .iter()
            .take(n.saturating_sub(m.report.unknown_local.examples.len()))
        {
            m.report.unknown_local.examples.push(
                (
                    name.as_str(),
                    "name is not UTF-8: it has no S3 key (rename it)",
                )
                    .into(),
            );
        }
        drop(db);
        if opts.delete_orphans {
            let counts = limits::Counts {
                database_files: m.report.database_files,
                objects: m.report.objects,
                orphans: m.report.orphans.count,
                deletions: m.candidates.len() as u64,
            };
            match limits::check(&self.config.prune, &counts) {
                // No override for an empty database: nothing there could be worth keeping.
                Err(why)
                    if !opts.ignore_prune_limits || why == limits::PruneRefused::EmptyDatabase =>
                {
                    tracing::error!(reason = %why, "Refusing to delete orphaned objects.");
                    m.report.orphans_waiting += counts.deletions;
                    m.report.prune_refused = Some(why.to_string());
                    m.report.prune_refused_reason = Some(why.label().to_owned());
                }
                checked => {
                    if let Err(why) = checked {
                        tracing::warn!(reason = %why, "Deleting orphaned objects beyond the limits (--ignore-prune-limits).");
                    }
                    prune::prune(self, &mut m.report, m.candidates, opts.dry_run, n, cancel)
                        .await?;
                }
            }
        }
        incomplete::audit(self.store, &mut m.report, opts.fix, opts.dry_run, n).await;
        m.report.seconds = started.elapsed().as_secs_f64();
        Ok(m.report)
    }

    /// Classifies one path.
    #[allow(clippy::too_many_arguments)]
    async fn one(
        &self,
        m: &mut Merge,
        key: &str,
        row: Option<sources::DbRow>,
        object: Option<crate::upload::s3::Listed>,
        file: Option<crate::upload::digest::Snapshot>,
        record: Option<crate::state::Record>,
        sighting: Option<u64>,
        n: usize,
    ) -> Result<(), AuditError> {
        let r = &mut m.report;
        if let Some(row) = &row
            && row.kind == DbKind::MediaDir
        {
            m.media_dir = Some(key.to_owned());
        }
        if let Some(o) = &object {
            r.objects += 1;
            r.object_bytes += o.size;
        }
        if let Some(f) = &file {
            r.local_files += 1;
            r.local_bytes += f.size;
        }
        if record.is_some() {
            r.records += 1;
        }
        let path = match MediaPath::parse(key) {
            Ok(p) if p.is_uploadable(false) => p,
            // A folder marker, a URL preview, check's probe, another tool's object: not ours to judge.
            _ => {
                if object.is_some() {
                    r.ignored_objects += 1;
                }
                if sighting.is_some()
                    && let Ok(p) = MediaPath::parse(key)
                {
                    m.ops.push(Op::OrphanClear(p));
                }
                return Ok(());
            }
        };
        let in_thumbs = matches!(path.top_dir(), "local_thumbnails" | "remote_thumbnail");
        let listed = matches!(
            row.map(|r| r.kind),
            Some(DbKind::Content | DbKind::Thumbnail)
        );
        let exists =
            listed || (in_thumbs && m.media_dir.as_deref().is_some_and(|d| key.starts_with(d)));
        if listed {
            r.database_files += 1;
        }
        if listed && file.is_none() && object.is_none() {
            let bytes = row.and_then(|r| r.len).unwrap_or(0).max(0) as u64;
            r.lost.add(
                key,
                bytes,
                "in the database; neither in the store nor in the bucket",
                n,
            );
        }
        // A bad local copy: the object is the one we verified, the local file is not (DESIGN.md
        // invariant 8); or an upload found one (same size, other bytes) or a conflict.
        let verified = |o: &crate::upload::s3::Listed| {
            record.is_some_and(|rec| !rec.provisional && rec.size == o.size)
        };
        let problem = match &file {
            Some(_) => self.state.problem(&path)?,
            None => None,
        };
        let mut mismatched = false;
        if let (Some(f), Some(o)) = (&file, &object)
            && f.size != o.size
            && verified(o)
        {
            mismatched = true;
            r.bad_local_copies.add(
                key,
                f.size,
                &format!(
                    "the local file has {} bytes, the verified object {}",
                    f.size, o.size
                ),
                n,
            );
            m.fix.push(path.clone());
        } else if let (Some(f), Some(p)) = (&file, &problem) {
            mismatched = true;
            let c = match p.kind {
                crate::state::ProblemKind::BadLocalCopy => &mut r.bad_local_copies,
                crate::state::ProblemKind::Conflict => &mut r.conflicts,
            };
            c.add(key, f.size, &p.detail, n);
            m.fix.push(path.clone());
        }
        // Mismatch: the object is not what the local file or our record says.
        if let Some(o) = &object
            && !mismatched
        {
            let why = match (&file, &record) {
                (Some(f), _) if f.size != o.size => Some(format!(
                    "object has {} bytes, the local file {}",
                    o.size, f.size
                )),
                (_, Some(rec)) if rec.size != o.size => Some(format!(
                    "object has {} bytes, our upload record {}",
                    o.size, rec.size
                )),
                (_, Some(rec)) if self.digest_differs(o, rec, &path).await? => {
                    Some("object's digest differs from our upload record".to_owned())
                }
                // What we verified (and the object still holds, by size and digest above) is
                // not what Synapse hashed: the object confirms nothing (DESIGN.md invariant 8).
                (_, Some(rec))
                    if !rec.provisional
                        && rec.size == o.size
                        && matches!(
                            (rec.sha256, row.and_then(|r| r.sha256)),
                            (Some(ours), Some(synapse)) if ours != synapse
                        ) =>
                {
                    Some("the verified object's sha256 differs from Synapse's".to_owned())
                }
                _ => None,
            };
            if let Some(why) = why {
                mismatched = true;
                r.mismatched.add(key, o.size, &why, n);
                if file.is_some() {
                    m.fix.push(path.clone());
                }
            }
        }
        if let (Some(f), false) = (&file, mismatched) {
            let recorded = record.is_some_and(|rec| rec.matches(f.size, f.mtime_ns));
            let in_bucket = object.as_ref().is_some_and(|o| o.size == f.size);
            if !(recorded && in_bucket) {
                let why = match (recorded, in_bucket, self.queue.describe(&path)) {
                    (true, false, _) => {
                        "recorded as uploaded, but the object is gone from the bucket".to_owned()
                    }
                    (_, _, Some(q)) => q,
                    (false, true, None) => {
                        "in the bucket, not verified by us (uploaded by another tool?)".to_owned()
                    }
                    (_, _, None) => "not queued".to_owned(),
                };
                r.not_uploaded.add(key, f.size, &why, n);
                m.fix.push(path.clone());
            }
        }
        if let (Some(f), false) = (&file, exists) {
            r.unknown_local
                .add(key, f.size, "no database row for its media", n);
        }
        match (&object, exists) {
            (Some(o), false) => {
                let first = sighting.unwrap_or(m.now);
                if sighting.is_none() {
                    m.ops.push(Op::OrphanSeen(path.clone(), m.now));
                }
                let age = humantime::format_duration(Duration::from_secs(
                    m.now.saturating_sub(first) / 1000,
                ));
                r.orphans.add(
                    key,
                    o.size,
                    &format!("no database row; orphaned for {age}"),
                    n,
                );
                let old = |ms: u64| m.grace_ms.is_some_and(|g| ms.saturating_add(g) <= m.now);
                let eligible = sighting.is_some_and(old)
                    && o.last_modified_ms.is_some_and(|t| old(t.max(0) as u64))
                    && file.is_none();
                if eligible && m.candidates.len() < MAX_DELETIONS {
                    m.candidates.push((path, o.size));
                } else {
                    r.orphans_waiting += 1;
                }
            }
            (_, _) if sighting.is_some() => m.ops.push(Op::OrphanClear(path)),
            _ => {}
        }
        Ok(())
    }

    /// Whether the object certainly differs from our record: the listing's ETag is an MD5 other
    /// than the record's, and a HEAD (our digest metadata first) agrees. ETags that are not MD5s
    /// (multipart, SSE-C, SSE-KMS) would otherwise look like mismatches.
    async fn digest_differs(
        &self,
        o: &crate::upload::s3::Listed,
        rec: &crate::state::Record,
        path: &MediaPath,
    ) -> Result<bool, AuditError> {
        let looks_md5 = o
            .etag
            .as_deref()
            .is_some_and(|e| e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()));
        if !looks_md5
            || o.etag
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(&hex::encode(rec.md5)))
        {
            return Ok(false);
        }
        let info = self.store.head(&path.key(self.store.prefix())).await?;
        Ok(info.is_some_and(|i| !i.confirms(rec.size, &rec.md5)))
    }

    /// `--fix`: mark the records of these files stale (so the upload does not trust their size and
    /// mtime, but still knows which bytes were verified) and queue them; the daemon handles them
    /// at once, or at its next start. The upload decides (DESIGN.md invariant 8): a missing
    /// object is uploaded, a bad local copy of a verified object is healed from it, a conflict is
    /// reported; a verified object is never overwritten with different bytes.
    async fn fix(&self, m: &mut Merge) -> Result<(), AuditError> {
        let paths = std::mem::take(&mut m.fix);
        if !m.report.fix || paths.is_empty() {
            return Ok(());
        }
        if m.report.dry_run {
            m.report.fix_queued += paths.len() as u64;
            return Ok(());
        }
        let mut stale = Vec::new();
        for p in &paths {
            if let Some(r) = self.state.record_or_none(p)?.filter(|r| !r.stale) {
                stale.push(Op::Record(p.clone(), r.stale()));
            }
        }
        self.committer.apply(stale).await?;
        let now = now_ms();
        m.report.fix_queued += paths.len() as u64;
        self.queue
            .enqueue(paths.into_iter().map(|p| (p, now, true)).collect())
            .await?;
        Ok(())
    }
}
