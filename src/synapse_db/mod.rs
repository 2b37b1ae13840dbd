//! Synapse's database, read-only, for every user of it (the sweep, `audit`, `check`, and the
//! uploads' arbiter of which bytes are right): which media are aged out or exist, their sha256, and
//! the lock that keeps sweeps from running at once. PostgreSQL (`postgres.rs`) or SQLite
//! (`sqlite.rs`), chosen by the config's `database.name` (Synapse's own key).
//!
//! Adding a query: one method in `postgres.rs`, its twin in `sqlite.rs`, and one dispatching
//! method on [`Db`] below (`on_backend!`); callers never see which backend answered.
//!
//! Rows are read page by page with keyset pagination (`… > last key ORDER BY key LIMIT n`): memory
//! stays bounded at any table size, and no long transaction holds back Synapse's vacuum
//! (PostgreSQL) or its WAL checkpoints (SQLite). Every call is bounded in time: PostgreSQL by a
//! client-side timeout and the server's `statement_timeout`, SQLite by `busy_timeout` plus a
//! progress handler that interrupts a query past its deadline.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::DatabaseConfig;
use crate::layout::MediaRef;

mod postgres;
mod sqlite;
mod tls;

pub use self::sqlite::{LOCK_FILE, MediaFileRow};

/// The advisory lock key of the sweep (`pg_try_advisory_lock(7_135_921_405_338_915_661)`): the
/// bytes of "cS3offld" read as a big-endian i64. Fixed forever: instances of different versions
/// must exclude each other.
pub const SWEEP_LOCK_KEY: i64 = i64::from_be_bytes(*b"cS3offld");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "cannot connect to PostgreSQL {target} (check the database: section: host, port, user, password, database)"
    )]
    Connect {
        target: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("PostgreSQL query `{what}` failed")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database query `{what}` timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("cannot set up TLS for PostgreSQL: {0}")]
    Tls(String),
    #[error(
        "cannot open Synapse's SQLite database {path} read-only: {reason} (check database.database, or database.args.database in homeserver.yaml)"
    )]
    SqliteOpen { path: PathBuf, reason: String },
    #[error(
        "{path} is not a SQLite database or is corrupt ({detail}); check that database.database names Synapse's homeserver.db"
    )]
    SqliteCorrupt { path: PathBuf, detail: String },
    #[error(
        "Synapse's SQLite database {path} stayed locked by a writer for {after:?} (`{what}`): gave up, nothing was changed; the next run tries again (a longer database.statement_timeout waits longer)"
    )]
    SqliteBusy {
        what: &'static str,
        path: PathBuf,
        after: Duration,
    },
    #[error("SQLite query `{what}` on {path} failed")]
    Sqlite {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<rusqlite::Error>,
    },
    #[error("the thread of the SQLite query `{what}` failed: {detail}")]
    Thread { what: &'static str, detail: String },
    #[error(
        "cannot take the sweep's lock file {path} (it lives in state_dir, which must exist and be writable)"
    )]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not available on this kind of database (a bug: please report it)")]
    Unsupported(&'static str),
}

/// One aged media, as the database names it. `sha256` is Synapse's hash of the original, where
/// the database has one (Synapse ≥ 1.128, for media stored since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgedMedia {
    Local {
        media_id: String,
        sha256: Option<[u8; 32]>,
    },
    Remote {
        origin: String,
        media_id: String,
        filesystem_id: String,
        sha256: Option<[u8; 32]>,
    },
}

impl AgedMedia {
    /// The media as the layout names it (its files: [`MediaRef::original`], ...).
    pub fn media_ref(&self) -> MediaRef {
        match self {
            AgedMedia::Local { media_id, .. } => MediaRef::Local(media_id.clone()),
            AgedMedia::Remote {
                origin,
                filesystem_id,
                ..
            } => MediaRef::Remote {
                origin: origin.clone(),
                fs_id: filesystem_id.clone(),
            },
        }
    }

    pub fn sha256(&self) -> Option<[u8; 32]> {
        match self {
            AgedMedia::Local { sha256, .. } | AgedMedia::Remote { sha256, .. } => *sha256,
        }
    }
}

pub struct Db {
    backend: Backend,
}

enum Backend {
    Postgres(postgres::PgDb),
    Sqlite(sqlite::SqliteDb),
}

/// The same call on whichever backend this is (each arm type-checks on its own backend).
macro_rules! on_backend {
    ($self:ident, $db:ident => $call:expr) => {
        match &$self.backend {
            Backend::Postgres($db) => $call,
            Backend::Sqlite($db) => $call,
        }
    };
}

/// The sweep's lock: PostgreSQL's advisory lock on a connection of its own (instances on other
/// hosts share the database), or for SQLite `flock` on [`LOCK_FILE`] in `state_dir` (SQLite has
/// no advisory locks; its file is local, so are the instances that could share it).
pub struct SweepLock(LockKind);

/// How often a run holding the [`SweepLock`] confirms that it still does.
pub const LOCK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

enum LockKind {
    Postgres(postgres::PgLock),
    File(sqlite::FileLock),
}

impl SweepLock {
    /// Gives the lock up (PostgreSQL: unlocks, then closes its connection either way).
    pub async fn release(self) {
        match self.0 {
            LockKind::Postgres(l) => l.release().await,
            LockKind::File(l) => l.release(),
        }
    }

    /// `Err` with the reason once the lock cannot be confirmed held: PostgreSQL: its connection
    /// closed (a restart or a network cut ends the session, and the lock with it), PostgreSQL no
    /// longer lists it, or the check failed or timed out (then it may be lost: the sweep must
    /// assume it is). SQLite: the lock file was removed or replaced (another sweep could lock
    /// the new one).
    pub async fn still_held(&self) -> Result<(), String> {
        match &self.0 {
            LockKind::Postgres(l) => l.still_held().await,
            LockKind::File(l) => l.still_held(),
        }
    }

    /// Checks the lock every [`LOCK_CHECK_EVERY`] until `done`; once it cannot be confirmed,
    /// cancels `stop` (the run then deletes nothing more) and returns why. Every run that deletes
    /// under this lock (the sweep, the prune job) runs beside it.
    pub async fn watch(
        &self,
        stop: &tokio_util::sync::CancellationToken,
        done: &tokio_util::sync::CancellationToken,
    ) -> Option<String> {
        loop {
            tokio::select! {
                _ = done.cancelled() => return None,
                _ = tokio::time::sleep(LOCK_CHECK_EVERY) => {}
            }
            if let Err(why) = self.still_held().await {
                stop.cancel();
                return Some(why);
            }
        }
    }
}

impl Db {
    /// Builds the pool (PostgreSQL) or remembers the file (SQLite); connects lazily.
    pub fn new(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        let backend = match cfg {
            DatabaseConfig::Postgres(p) => Backend::Postgres(postgres::PgDb::new(p)?),
            DatabaseConfig::Sqlite(s) => Backend::Sqlite(sqlite::SqliteDb::new(s)),
        };
        Ok(Db { backend })
    }

    /// `PostgreSQL` or `SQLite`, for messages.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "PostgreSQL",
            Backend::Sqlite(_) => "SQLite",
        }
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self.backend, Backend::Sqlite(_))
    }

    /// Runs one PostgreSQL query future with a client-side timeout.
    pub async fn timed_with<T>(
        after: Duration,
        what: &'static str,
        f: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        postgres::timed_with(after, what, f).await
    }

    /// The configured `statement_timeout`.
    pub fn statement_timeout(&self) -> Duration {
        match &self.backend {
            Backend::Postgres(p) => p.timeout - Duration::from_secs(5),
            Backend::Sqlite(s) => s.timeout,
        }
    }

    /// PostgreSQL only: a connection taken out of the pool for good (for a long transaction):
    /// it is closed when dropped, so an unfinished transaction can never be handed to another
    /// caller.
    pub async fn dedicated_client(&self) -> Result<deadpool_postgres::ClientWrapper, DbError> {
        match &self.backend {
            Backend::Postgres(p) => p.dedicated_client().await,
            Backend::Sqlite(_) => Err(DbError::Unsupported("dedicated_client")),
        }
    }

    /// Of these local media ids, those that have a row (media or thumbnail) right now.
    pub async fn local_media_present(&self, ids: &[String]) -> Result<HashSet<String>, DbError> {
        on_backend!(self, db => db.local_media_present(ids).await)
    }

    /// Of these (origin, filesystem_id) pairs, those that have a row (media or thumbnail) now.
    pub async fn remote_media_present(
        &self,
        origins: &[String],
        fs_ids: &[String],
    ) -> Result<HashSet<(String, String)>, DbError> {
        on_backend!(self, db => db.remote_media_present(origins, fs_ids).await)
    }

    /// Whether a cached remote media `mxc://origin/media_id` has a row (`forget` tells a remote
    /// media from a local one by it).
    pub async fn remote_media_exists(&self, origin: &str, media_id: &str) -> Result<bool, DbError> {
        on_backend!(self, db => db.remote_media_exists(origin, media_id).await)
    }

    /// Checks that Synapse's media tables have the columns the sweep reads; counts the media.
    pub async fn media_counts(&self) -> Result<(i64, i64), DbError> {
        on_backend!(self, db => db.media_counts().await)
    }

    /// SQLite's journal mode (`wal` under Synapse); `None` on PostgreSQL.
    pub async fn journal_mode(&self) -> Result<Option<String>, DbError> {
        match &self.backend {
            Backend::Postgres(_) => Ok(None),
            Backend::Sqlite(s) => s.journal_mode().await.map(Some),
        }
    }

    /// Takes the sweep lock if no other sweep holds it (see [`SweepLock`]). PostgreSQL: on a
    /// connection taken out of the pool for good, so no pooled connection ever holds the lock
    /// and none can hand it over re-entered.
    pub async fn try_lock(&self) -> Result<Option<SweepLock>, DbError> {
        Ok(match &self.backend {
            Backend::Postgres(p) => p
                .try_lock()
                .await?
                .map(|l| SweepLock(LockKind::Postgres(l))),
            Backend::Sqlite(s) => s.try_lock().await?.map(|l| SweepLock(LockKind::File(l))),
        })
    }

    /// Up to `limit` local media older than `cutoff_ms` (by last access, else creation), after
    /// `after` in media_id order. URL previews are excluded.
    pub async fn aged_local(
        &self,
        cutoff_ms: i64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        on_backend!(self, db => db.aged_local(cutoff_ms, after, limit).await)
    }

    /// (aged, all) local media, URL previews excluded: what the sweep's choice between HEADs and
    /// a listing (`sweep::dense::choose`) weighs. One count over the table, once per sweep.
    pub async fn aged_local_count(&self, cutoff_ms: i64) -> Result<(i64, i64), DbError> {
        on_backend!(self, db => db.aged_local_count(cutoff_ms).await)
    }

    /// Up to `limit` cached remote media older than `cutoff_ms`, after `(origin, media_id)`.
    pub async fn aged_remote(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        on_backend!(self, db => db.aged_remote(cutoff_ms, after, limit).await)
    }

    /// [`Db::aged_remote`] in the order of the files' keys: by (origin, filesystem id), after
    /// `after`. The sweep's dense mode walks the bucket listing in step with it. Two media sharing a
    /// filesystem id name the same files: one of them at a page boundary may be skipped, its files
    /// were swept with the other.
    pub async fn aged_remote_by_path(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        on_backend!(self, db => db.aged_remote_by_path(cutoff_ms, after, limit).await)
    }

    /// Whether Synapse's media tables have the `sha256` column (asked once per process).
    pub async fn has_sha256(&self) -> Result<bool, DbError> {
        on_backend!(self, db => db.has_sha256().await)
    }

    /// Synapse's SHA-256 of `media` (the arbiter of which bytes are right, DESIGN.md invariant 8),
    /// where the database has one: `None` for media without a row, rows without a hash (stored
    /// before Synapse 1.128) and databases without the column.
    pub async fn content_sha256(&self, media: &MediaRef) -> Result<Option<[u8; 32]>, DbError> {
        on_backend!(self, db => db.content_sha256(media).await)
    }

    /// SQLite only: up to `limit` of the files Synapse expects (audit's sorted stream), after
    /// `after`, in byte order, each page its own short read transaction. PostgreSQL streams the
    /// same rows through a cursor in `audit::sources` (one sort per snapshot).
    pub async fn media_files_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MediaFileRow>, DbError> {
        match &self.backend {
            Backend::Postgres(_) => Err(DbError::Unsupported("media_files_page")),
            Backend::Sqlite(s) => s.media_files_page(after, limit).await,
        }
    }
}

/// Shared handle.
pub type SharedDb = Arc<Db>;
