//! Durable state in `state_dir/state.redb`: what has been verified in the bucket.
//!
//! Invariants:
//! - A record is written only after the bucket confirmed the object (a PUT whose Content-MD5 the
//!   server checked, or a HEAD showing the same size and digest). A record therefore never claims
//!   more than the bucket holds at the time it was written.
//! - Records are keyed by [`MediaPath`] and hold the size and mtime seen *before* the file was read,
//!   so a file changed after its upload no longer matches its record and is uploaded again.
//! - Writes go through [`State::apply`], one redb transaction per batch, committed with redb's
//!   default durability (fsync). A crash before the commit loses only the record, never data: the
//!   next pass finds the object by HEAD and records it without a second PUT.
//!
//! redb takes an exclusive lock on the file, so only one process uses a state directory at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::layout::MediaPath;

mod commit;
mod handle;
mod record;

pub use self::commit::{Committer, Pending};
pub use self::handle::StateHandle;
pub use self::record::{Problem, ProblemKind, Record};

/// Relative media path → encoded [`Record`].
const UPLOADED: TableDefinition<&str, &[u8]> = TableDefinition::new("uploaded");
/// The upload queue: relative media path → item encoded by [`crate::queue`].
const QUEUE: TableDefinition<&str, &[u8]> = TableDefinition::new("queue");
/// Small named texts (the last sweep's report, as JSON).
const TEXT: TableDefinition<&str, &str> = TableDefinition::new("meta_text");
/// `audit`'s orphan sightings: relative path of an object whose media has no database row → when
/// an audit first saw it so (ms). Cleared as soon as an audit sees the object belong to a media.
const ORPHANS: TableDefinition<&str, u64> = TableDefinition::new("orphan_sightings");
/// Copy problems found by uploads: relative path → JSON [`Problem`] (a bad local copy that is not
/// healed, or a conflict between the local file and an object we never verified). An entry lives
/// while the problem does: the upload that finally verifies the path clears it.
const PROBLEMS: TableDefinition<&str, &str> = TableDefinition::new("copy_problems");
/// Schema metadata (`version`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEMA_VERSION: u64 = 1;
pub const STATE_FILE: &str = "state.redb";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state_dir {path} (create it and make it writable by this user)")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state database {path} is in use by another synapse-s3-offload process (a running daemon?); stop it or use its control commands"
    )]
    Locked { path: PathBuf },
    #[error(
        "state_dir {} is not writable by this user: make it owned by the user the daemon runs as (e.g. chown -R matrix-synapse {})",
        dir.display(),
        dir.display()
    )]
    NotWritable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot open state database {path} (if it is corrupted, move it aside and run `upload` to rebuild the records from the bucket: objects already there are recognised, not re-uploaded)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error(
        "state database {path} has schema version {found}, this build knows {SCHEMA_VERSION}; use a matching synapse-s3-offload"
    )]
    Schema { path: PathBuf, found: u64 },
    #[error("state database operation failed")]
    Db(#[from] redb::Error),
    #[error(
        "state database {path} is corrupted; move it aside (e.g. mv {path} {path}.broken) and run `upload`: every file is looked at again, and objects already in the bucket are recognised by HEAD, not re-uploaded"
    )]
    Corrupted { path: PathBuf },
    #[error("committing to the state database failed: {0}")]
    Commit(String),
    #[error("a record in the state database is corrupted (key {key})")]
    BadRecord { key: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self { StateError::Db(e.into()) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One change, applied atomically with the others of its batch.
#[derive(Debug, Clone)]
pub enum Op {
    Record(MediaPath, Record),
    Forget(MediaPath),
    /// Insert or replace a queue item.
    QueuePut(MediaPath, Vec<u8>),
    QueueRemove(MediaPath),
    SetText(&'static str, String),
    /// First sighting of an orphaned object (`audit`).
    OrphanSeen(MediaPath, u64),
    OrphanClear(MediaPath),
    /// A copy problem (see [`Problem`]), replacing any earlier one of the path.
    Problem(MediaPath, Problem),
    ProblemClear(MediaPath),
}

/// Handle to the state database; cheap to clone.
#[derive(Clone)]
pub struct State {
    db: Arc<Database>,
    path: PathBuf,
}

/// Creates `path` empty with mode 0600 if it does not exist, and removes group and other
/// permissions from an existing one. Best effort: a failure here shows up when redb opens it.
fn owner_only(path: &Path) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

impl State {
    /// Opens (or creates) `state_dir/state.redb`.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        // Owner-only when we create it: it holds the control socket and the list of media paths.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StateError::CreateDir {
                path: state_dir.to_owned(),
                source,
            })?;
        let path = state_dir.join(STATE_FILE);
        // Owner-only too (redb would create it 0644): created empty here first (redb initializes
        // an empty file), and an older file readable by others is narrowed.
        owner_only(&path);
        // A bounded cache: the records are small and the working set is the recent uploads.
        // redb panics (rather than erroring) on some kinds of page corruption; turn that into the
        // same clear refusal instead of a crash loop. Nothing is lost: the files are still local.
        let opened =
            std::panic::catch_unwind(|| Database::builder().set_cache_size(16 << 20).create(&path))
                .map_err(|_| StateError::Corrupted { path: path.clone() })?;
        let db = opened.map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked { path: path.clone() },
            // Not a corruption: say so, instead of the recovery steps of `Open`.
            redb::DatabaseError::Storage(redb::StorageError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                StateError::NotWritable {
                    dir: state_dir.to_owned(),
                    source: e,
                }
            }
            source => StateError::Open {
                path: path.clone(),
                source,
            },
        })?;
        let state = State {
            db: Arc::new(db),
            path,
        };
        state.init_schema()?;
        Ok(state)
    }

    /// Like [`State::open`], but waits up to `wait` while another process holds the database
    /// (a `status` or `sweep` run that opened it for a moment).
    pub async fn open_waiting(
        state_dir: &Path,
        wait: std::time::Duration,
    ) -> Result<Self, StateError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let dir = state_dir.to_owned();
            match tokio::task::spawn_blocking(move || State::open(&dir))
                .await
                .expect("open does not panic")
            {
                Err(StateError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    fn init_schema(&self) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("version")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("version", SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(StateError::Schema {
                        path: self.path.clone(),
                        found,
                    });
                }
            }
            txn.open_table(UPLOADED)?;
            txn.open_table(QUEUE)?;
            txn.open_table(TEXT)?;
            // Added after schema 1 shipped: created on first open, ignored by older builds.
            txn.open_table(ORPHANS)?;
            txn.open_table(PROBLEMS)?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record of `path`, if any. Blocking (a read transaction); cheap.
    pub fn record(&self, path: &MediaPath) -> Result<Option<Record>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(UPLOADED)?;
        let Some(v) = table.get(path.as_str())? else {
            return Ok(None);
        };
        Record::decode(v.value())
            .map(Some)
            .ok_or_else(|| StateError::BadRecord {
                key: path.to_string(),
            })
    }

    /// Applies `ops` in one durable transaction. Blocking (fsync): call from a blocking thread.
    pub fn apply(&self, ops: &[Op]) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut uploaded = txn.open_table(UPLOADED)?;
            let mut queue = txn.open_table(QUEUE)?;
            let mut text = txn.open_table(TEXT)?;
            let mut orphans = txn.open_table(ORPHANS)?;
            let mut problems = txn.open_table(PROBLEMS)?;
            for op in ops {
                match op {
                    Op::Record(p, r) => {
                        uploaded.insert(p.as_str(), r.encode().as_slice())?;
                    }
                    Op::Forget(p) => {
                        uploaded.remove(p.as_str())?;
                    }
                    Op::QueuePut(p, item) => {
                        queue.insert(p.as_str(), item.as_slice())?;
                    }
                    Op::QueueRemove(p) => {
                        queue.remove(p.as_str())?;
                    }
                    Op::SetText(k, v) => {
                        text.insert(*k, v.as_str())?;
                    }
                    Op::OrphanSeen(p, ms) => {
                        orphans.insert(p.as_str(), *ms)?;
                    }
                    Op::OrphanClear(p) => {
                        orphans.remove(p.as_str())?;
                    }
                    Op::Problem(p, problem) => {
                        let json = serde_json::to_string(problem).expect("a problem serialises");
                        problems.insert(p.as_str(), json.as_str())?;
                    }
                    Op::ProblemClear(p) => {
                        problems.remove(p.as_str())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// A named text set by [`Op::SetText`].
    pub fn text(&self, key: &str) -> Result<Option<String>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TEXT)?;
        Ok(table.get(key)?.map(|v| v.value().to_owned()))
    }

    /// Every queue item, raw (loaded once at startup).
    pub fn queue_items(&self) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(QUEUE)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Up to `limit` entries of `table` with keys after `after` (from the start when `None`), in
    /// key (byte) order, each value turned into a `T` by `decode`: lets `audit` stream a table in
    /// pages, each its own short read transaction.
    fn page_after<V: redb::Value + 'static, T>(
        &self,
        table: TableDefinition<&str, V>,
        after: Option<&str>,
        limit: usize,
        decode: impl Fn(&str, V::SelfType<'_>) -> Result<T, StateError>,
    ) -> Result<Vec<(String, T)>, StateError> {
        use std::ops::Bound;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let range = match after {
            Some(a) => table.range::<&str>((Bound::Excluded(a), Bound::Unbounded))?,
            None => table.range::<&str>(..)?,
        };
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (k, v) = entry?;
            let key = k.value().to_owned();
            let t = decode(&key, v.value())?;
            out.push((key, t));
        }
        Ok(out)
    }

    /// A page of the records (see [`State::page_after`]).
    pub fn records_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StateError> {
        self.page_after(UPLOADED, after, limit, |key, v| {
            Record::decode(v).ok_or_else(|| StateError::BadRecord {
                key: key.to_owned(),
            })
        })
    }

    /// A page of the orphan sightings (path → first seen, ms).
    pub fn sightings_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StateError> {
        self.page_after(ORPHANS, after, limit, |_, v| Ok(v))
    }

    /// Like [`State::record`], but an undecodable record (a bug or a damaged page) counts as no
    /// record, with a warning: the upload then looks the object up again and writes a good record
    /// over it, instead of failing that path every retry interval forever.
    pub fn record_or_none(&self, path: &MediaPath) -> Result<Option<Record>, StateError> {
        match self.record(path) {
            Err(StateError::BadRecord { key }) => {
                tracing::warn!(path = %key, "Unreadable upload record; looking the object up again to rewrite it.");
                Ok(None)
            }
            other => other,
        }
    }

    /// A page of the copy problems (see [`State::page_after`]).
    pub fn problems_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Problem)>, StateError> {
        self.page_after(PROBLEMS, after, limit, |key, v| {
            serde_json::from_str(v).map_err(|_| StateError::BadRecord {
                key: key.to_owned(),
            })
        })
    }

    /// The copy problem of one path, if any.
    pub fn problem(&self, path: &MediaPath) -> Result<Option<Problem>, StateError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROBLEMS)?;
        Ok(table
            .get(path.as_str())?
            .and_then(|v| serde_json::from_str(v.value()).ok()))
    }

    /// Number of recorded files.
    pub fn record_count(&self) -> Result<u64, StateError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(UPLOADED)?.len()?)
    }
}

#[cfg(test)]
impl State {
    /// Holds redb's write lock until the transaction is dropped (never committed): commits wait
    /// meanwhile, so the file on disk is exactly what a crash at this instant would leave.
    pub(crate) fn block_writes(&self) -> redb::WriteTransaction {
        self.db.begin_write().expect("begin a write transaction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = MediaPath::parse("local_content/ab/cd/ef").unwrap();
        let r = Record::new(42, 1_700_000_000_123_456_789, [7; 16]);
        {
            let s = State::open(dir.path()).unwrap();
            assert_eq!(s.record(&p).unwrap(), None);
            s.apply(&[Op::Record(p.clone(), r)]).unwrap();
            assert_eq!(s.record(&p).unwrap(), Some(r));
        }
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.record(&p).unwrap(), Some(r));
        assert_eq!(s.record_count().unwrap(), 1);
        s.apply(&[Op::Forget(p.clone())]).unwrap();
        assert_eq!(s.record(&p).unwrap(), None);
    }

    #[test]
    fn a_new_state_dir_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("a/b");
        let _s = State::open(&state_dir).unwrap();
        let mode = std::fs::metadata(&state_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // The file too: it lists every media path (it was created 0644).
        let file = state_dir.join(STATE_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(_s);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _s = State::open(&state_dir).unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "an older, wider file is narrowed");
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = State::open(dir.path()).unwrap();
        let err = State::open(dir.path()).err().unwrap();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }
}
