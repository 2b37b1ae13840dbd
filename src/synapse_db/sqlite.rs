//! The SQLite backend: Synapse's `homeserver.db`, read next to a running Synapse. Each method has
//! its PostgreSQL twin in `postgres.rs`.
//!
//! Living beside Synapse (which writes in WAL mode):
//! - Opened read-only (`SQLITE_OPEN_READ_ONLY`, never created; `query_only` on top): a wrong path
//!   is an error, not a new empty database that would make every media look deleted.
//! - One statement per call, so each read transaction lasts one page: a long reader would stop
//!   Synapse's WAL checkpoints and let the `-wal` file grow.
//! - Every call is bounded by `database.statement_timeout`: `busy_timeout` waits for a writer
//!   (rollback-journal mode, or a checkpoint that needs the lock) up to the deadline, a progress
//!   handler interrupts a query that runs past it, and the caller stops waiting a second later.
//!   A locked database is then an error, and a sweep that meets one deletes nothing more.
//! - rusqlite is synchronous: every call runs on a blocking thread, never on the runtime's.
//!
//! The sweep's lock: SQLite has no advisory locks, so sweeps exclude each other with `flock` on
//! [`LOCK_FILE`] in `state_dir` (instances sharing one SQLite file share a host). The kernel
//! drops a flock with its descriptor: a crashed sweep never leaves it held.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, params};

use super::{AgedMedia, DbError};
use crate::config::SqliteConfig;
use crate::layout::MediaRef;

/// The sweep's lock file, in `state_dir`.
pub const LOCK_FILE: &str = "sweep.lock";

/// Idle connections kept for the next call (opening one parses Synapse's ~500-entry schema).
const IDLE_MAX: usize = 4;

/// One file Synapse expects, as audit's sorted stream reads it (see `audit::sources`):
/// `kind` 0 original, 1 thumbnail, 2 a media's thumbnail directory.
#[derive(Debug, Clone)]
pub struct MediaFileRow {
    pub key: String,
    pub kind: i64,
    pub len: Option<i64>,
    pub sha256: Option<[u8; 32]>,
}

pub struct SqliteDb {
    path: PathBuf,
    lock_dir: Option<PathBuf>,
    pub(super) timeout: Duration,
    idle: Arc<Mutex<Vec<Connection>>>,
    sha256_column: tokio::sync::OnceCell<bool>,
}

/// The sweep's flock; released when dropped (the descriptor closes).
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    pub fn release(self) {
        // SAFETY: flock on a descriptor we own; closing it would release the lock as well.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Held as long as the path still names our file: a removed or replaced lock file would let
    /// another sweep lock a new one beside us.
    pub fn still_held(&self) -> Result<(), String> {
        let ours = self.file.metadata().map_err(|e| e.to_string())?;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => Ok(()),
            Ok(_) => Err(format!(
                "its lock file {} was replaced",
                self.path.display()
            )),
            Err(e) => Err(format!(
                "its lock file {} is gone ({e})",
                self.path.display()
            )),
        }
    }
}

/// Opens the file read-only and reads its header, so that a missing, unreadable or corrupt file
/// fails here with a clear error.
fn open(path: &Path) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| DbError::SqliteOpen {
        path: path.to_owned(),
        reason: if path.exists() {
            e.to_string()
        } else {
            "the file does not exist".into()
        },
    })?;
    conn.pragma_update(None, "query_only", true)
        .map_err(|e| classify("open", path, Duration::ZERO, e))?;
    Ok(conn)
}

/// Turns SQLite's error codes into the errors an admin can act on.
fn classify(what: &'static str, path: &Path, after: Duration, e: rusqlite::Error) -> DbError {
    let path = path.to_owned();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            DbError::SqliteBusy { what, path, after }
        }
        Some(ErrorCode::OperationInterrupted) => DbError::Timeout { what, after },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => DbError::SqliteCorrupt {
            path,
            detail: e.to_string(),
        },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => DbError::SqliteOpen {
            path,
            reason: e.to_string(),
        },
        _ => DbError::Sqlite {
            what,
            path,
            source: Box::new(e),
        },
    }
}

/// A text column that may be NULL (SQLite columns hold any type: a non-text value is `None`).
fn opt_text(row: &Row, idx: usize) -> rusqlite::Result<Option<String>> {
    Ok(match row.get_ref(idx)? {
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
        _ => None,
    })
}

fn hash_at(row: &Row, idx: usize) -> rusqlite::Result<Option<[u8; 32]>> {
    Ok(opt_text(row, idx)?
        .as_deref()
        .and_then(crate::sha256::parse_hex))
}

fn opt_int(row: &Row, idx: usize) -> rusqlite::Result<Option<i64>> {
    Ok(match row.get_ref(idx)? {
        ValueRef::Integer(i) => Some(i),
        ValueRef::Real(f) => Some(f as i64),
        _ => None,
    })
}

impl SqliteDb {
    pub fn new(cfg: &SqliteConfig) -> SqliteDb {
        SqliteDb {
            path: cfg.path.clone(),
            lock_dir: cfg.lock_dir.clone(),
            timeout: cfg.statement_timeout,
            idle: Arc::new(Mutex::new(Vec::new())),
            sha256_column: tokio::sync::OnceCell::new(),
        }
    }

    /// Runs `f` with a connection on a blocking thread, within the timeout (see the module
    /// comment). A connection is reused only after a call that succeeded.
    async fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, DbError> {
        let (path, idle, after) = (self.path.clone(), self.idle.clone(), self.timeout);
        let deadline = Instant::now() + after;
        let job = tokio::task::spawn_blocking(move || {
            let pooled = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open(&path)?,
            };
            let run = |conn: &Connection| {
                conn.busy_timeout(deadline.saturating_duration_since(Instant::now()))?;
                conn.progress_handler(1000, Some(move || Instant::now() >= deadline))?;
                let r = f(conn);
                conn.progress_handler(0, None::<fn() -> bool>)?;
                r
            };
            let r = run(&conn).map_err(|e| classify(what, &path, after, e))?;
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_MAX {
                idle.push(conn);
            }
            Ok(r)
        });
        match tokio::time::timeout(after + Duration::from_secs(1), job).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(DbError::Thread {
                what,
                detail: join.to_string(),
            }),
            Err(_) => Err(DbError::Timeout { what, after }),
        }
    }

    pub async fn remote_media_exists(&self, origin: &str, media_id: &str) -> Result<bool, DbError> {
        let (origin, media_id) = (origin.to_owned(), media_id.to_owned());
        self.call("remote media row", move |c| {
            c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM remote_media_cache \
                   WHERE media_origin = ?1 AND media_id = ?2)",
            )?
            .query_row([&origin, &media_id], |r| r.get(0))
        })
        .await
    }

    pub async fn local_media_present(&self, ids: &[String]) -> Result<HashSet<String>, DbError> {
        // The ids as one JSON array parameter (SQLite has no array type; json_each is built in).
        let ids = serde_json::to_string(ids).expect("strings serialize");
        self.call("media still present (local)", move |c| {
            let mut st = c.prepare_cached(
                "SELECT media_id FROM local_media_repository \
                   WHERE media_id IN (SELECT value FROM json_each(?1)) \
                 UNION SELECT media_id FROM local_media_repository_thumbnails \
                   WHERE media_id IN (SELECT value FROM json_each(?1))",
            )?;
            st.query_map([&ids], |r| r.get(0))?.collect()
        })
        .await
    }

    pub async fn remote_media_present(
        &self,
        origins: &[String],
        fs_ids: &[String],
    ) -> Result<HashSet<(String, String)>, DbError> {
        let pairs: Vec<(&String, &String)> = origins.iter().zip(fs_ids).collect();
        let pairs = serde_json::to_string(&pairs).expect("strings serialize");
        self.call("media still present (remote)", move |c| {
            let mut st = c.prepare_cached(
                "WITH p(o, f) AS (SELECT value ->> 0, value ->> 1 FROM json_each(?1)) \
                 SELECT media_origin, filesystem_id FROM remote_media_cache \
                   WHERE (media_origin, filesystem_id) IN (SELECT o, f FROM p) \
                 UNION SELECT media_origin, filesystem_id FROM remote_media_cache_thumbnails \
                   WHERE (media_origin, filesystem_id) IN (SELECT o, f FROM p)",
            )?;
            st.query_map([&pairs], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .await
    }

    pub async fn media_counts(&self) -> Result<(i64, i64), DbError> {
        self.call("media table columns", |c| {
            // Preparing names every column: a missing one fails here, before any count.
            c.prepare("SELECT media_id, created_ts, last_access_ts, url_cache, media_length FROM local_media_repository LIMIT 0")?;
            c.prepare("SELECT media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length FROM local_media_repository_thumbnails LIMIT 0")?;
            c.prepare("SELECT media_origin, media_id, filesystem_id, created_ts, last_access_ts, media_length FROM remote_media_cache LIMIT 0")?;
            c.prepare("SELECT media_origin, filesystem_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length FROM remote_media_cache_thumbnails LIMIT 0")?;
            c.query_row(
                "SELECT (SELECT count(*) FROM local_media_repository), (SELECT count(*) FROM remote_media_cache)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }

    pub async fn journal_mode(&self) -> Result<String, DbError> {
        self.call("journal mode", |c| {
            c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
        })
        .await
    }

    /// `flock(LOCK_EX | LOCK_NB)` on the lock file in `state_dir`: `None` while another sweep
    /// holds it. The file is never removed (removing a lock file races with its next user).
    pub async fn try_lock(&self) -> Result<Option<FileLock>, DbError> {
        let path = match &self.lock_dir {
            Some(dir) => dir.join(LOCK_FILE),
            None => {
                return Err(DbError::LockFile {
                    path: PathBuf::from(LOCK_FILE),
                    source: std::io::Error::other("no state_dir"),
                });
            }
        };
        let job = tokio::task::spawn_blocking(move || {
            let err = |source| DbError::LockFile {
                path: path.clone(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(err)?;
            // SAFETY: flock on the descriptor we just opened and own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => Ok(None),
                    _ => Err(err(e)),
                };
            }
            Ok(Some(FileLock {
                file,
                path: path.clone(),
            }))
        });
        job.await.unwrap_or_else(|e| {
            Err(DbError::LockFile {
                path: PathBuf::from(LOCK_FILE),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }

    pub async fn aged_local(
        &self,
        cutoff_ms: i64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        let sha = self.sha256_expr().await?;
        let after = after.to_owned();
        self.call("aged local media", move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT media_id, {sha} FROM local_media_repository \
                 WHERE url_cache IS NULL AND COALESCE(last_access_ts, created_ts) < ?1 AND media_id > ?2 \
                 ORDER BY media_id LIMIT ?3"
            ))?;
            st.query_map(params![cutoff_ms, after, limit], |r| {
                Ok(AgedMedia::Local {
                    media_id: r.get(0)?,
                    sha256: hash_at(r, 1)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn aged_remote(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        self.aged_remote_after("media_id", cutoff_ms, after, limit)
            .await
    }

    /// Aged remote media ordered by (origin, `key`) after `after`: `media_id` (the sweep), or
    /// `filesystem_id`, the order of their files' keys (the dense sweep).
    async fn aged_remote_after(
        &self,
        key: &'static str,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        let sha = self.sha256_expr().await?;
        let (origin, id) = (after.0.to_owned(), after.1.to_owned());
        self.call("aged remote media", move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT media_origin, media_id, filesystem_id, {sha} FROM remote_media_cache \
                 WHERE COALESCE(last_access_ts, created_ts) < ?1 AND (media_origin, {key}) > (?2, ?3) \
                 ORDER BY media_origin, {key} LIMIT ?4"
            ))?;
            st.query_map(params![cutoff_ms, origin, id, limit], |r| {
                Ok(AgedMedia::Remote {
                    origin: r.get(0)?,
                    media_id: r.get(1)?,
                    filesystem_id: r.get(2)?,
                    sha256: hash_at(r, 3)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn aged_local_count(&self, cutoff_ms: i64) -> Result<(i64, i64), DbError> {
        self.call("count aged local media", move |c| {
            c.prepare_cached(
                "SELECT count(*) FILTER (WHERE COALESCE(last_access_ts, created_ts) < ?1), count(*) \
                 FROM local_media_repository WHERE url_cache IS NULL",
            )?
            .query_row([cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?)))
        })
        .await
    }

    pub async fn aged_remote_by_path(
        &self,
        cutoff_ms: i64,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        self.aged_remote_after("filesystem_id", cutoff_ms, after, limit)
            .await
    }

    pub async fn has_sha256(&self) -> Result<bool, DbError> {
        self.sha256_column
            .get_or_try_init(|| {
                self.call("sha256 columns", |c| {
                    c.query_row(
                        "SELECT (SELECT count(*) FROM pragma_table_info('local_media_repository') WHERE name = 'sha256') \
                              + (SELECT count(*) FROM pragma_table_info('remote_media_cache') WHERE name = 'sha256')",
                        [],
                        |r| Ok(r.get::<_, i64>(0)? == 2),
                    )
                })
            })
            .await
            .copied()
    }

    async fn sha256_expr(&self) -> Result<&'static str, DbError> {
        Ok(if self.has_sha256().await? {
            "sha256"
        } else {
            "NULL"
        })
    }

    pub async fn content_sha256(&self, media: &MediaRef) -> Result<Option<[u8; 32]>, DbError> {
        if !self.has_sha256().await? {
            return Ok(None);
        }
        let media = media.clone();
        self.call("media sha256", move |c| {
            let hash = match &media {
                MediaRef::Local(id) => c
                    .prepare_cached("SELECT sha256 FROM local_media_repository WHERE media_id = ?1")?
                    .query_row([id], |r| hash_at(r, 0)),
                MediaRef::Remote { origin, fs_id } => c
                    .prepare_cached(
                        "SELECT sha256 FROM remote_media_cache WHERE media_origin = ?1 AND filesystem_id = ?2",
                    )?
                    .query_row([origin, fs_id], |r| hash_at(r, 0)),
            };
            Ok(hash.optional()?.flatten())
        })
        .await
    }

    /// The SQLite form of `audit::sources::expected_files_sql` (same rows, same byte order:
    /// SQLite's BINARY collation compares UTF-8 bytes). Each page sorts what is left with a
    /// top-`limit` sorter: a whole audit costs rows × pages, fine at the sizes SQLite serves.
    pub async fn media_files_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MediaFileRow>, DbError> {
        let has_sha = self.has_sha256().await?;
        let after = after.unwrap_or("").to_owned();
        self.call("media files page", move |c| {
            let mut st = c.prepare_cached(&media_files_sql(has_sha))?;
            st.query_map(params![after, limit as i64], |r| {
                Ok(MediaFileRow {
                    key: r.get(0)?,
                    kind: r.get(1)?,
                    len: opt_int(r, 2)?,
                    sha256: hash_at(r, 3)?,
                })
            })?
            .collect()
        })
        .await
    }
}

/// `AB/CD/REST` of an id, as Synapse splits it (by characters, as SQLite's substr counts).
fn split(col: &str) -> String {
    format!("substr({col},1,2) || '/' || substr({col},3,2) || '/' || substr({col},5)")
}

fn media_files_sql(has_sha256: bool) -> String {
    let (msha, rsha) = if has_sha256 {
        ("m.sha256", "r.sha256")
    } else {
        ("NULL", "NULL")
    };
    let (lm, lt, rm, rt) = (
        split("m.media_id"),
        split("t.media_id"),
        split("r.filesystem_id"),
        split("t.filesystem_id"),
    );
    let tn = "t.thumbnail_width || '-' || t.thumbnail_height || '-' || replace(t.thumbnail_type, '/', '-') || '-' || t.thumbnail_method";
    format!(
        "SELECT k, kind, len, sha FROM ( \
           SELECT 'local_content/' || {lm} AS k, 0 AS kind, m.media_length AS len, {msha} AS sha \
             FROM local_media_repository m WHERE m.url_cache IS NULL \
           UNION ALL SELECT 'local_thumbnails/' || {lm} || '/', 2, NULL, NULL \
             FROM local_media_repository m WHERE m.url_cache IS NULL \
           UNION ALL SELECT 'local_thumbnails/' || {lt} || '/' || {tn}, 1, t.thumbnail_length, NULL \
             FROM local_media_repository_thumbnails t WHERE NOT EXISTS ( \
               SELECT 1 FROM local_media_repository u WHERE u.media_id = t.media_id AND u.url_cache IS NOT NULL) \
           UNION ALL SELECT 'remote_content/' || r.media_origin || '/' || {rm}, 0, r.media_length, {rsha} \
             FROM remote_media_cache r \
           UNION ALL SELECT 'remote_thumbnail/' || r.media_origin || '/' || {rm} || '/', 2, NULL, NULL \
             FROM remote_media_cache r \
           UNION ALL SELECT 'remote_thumbnail/' || t.media_origin || '/' || {rt} || '/' || {tn}, 1, t.thumbnail_length, NULL \
             FROM remote_media_cache_thumbnails t \
         ) WHERE k IS NOT NULL AND k > ?1 ORDER BY k LIMIT ?2"
    )
}

#[cfg(test)]
mod tests;
