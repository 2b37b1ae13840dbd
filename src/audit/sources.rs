//! The four sorted streams `audit` merges: Synapse's database, the bucket listing, the local store
//! and our records (plus the orphan sightings). Each yields relative media paths in byte order, a
//! page at a time, so memory stays bounded whatever the store's size.
//!
//! Why byte order everywhere: S3 lists keys in UTF-8 binary order; PostgreSQL sorts the same way
//! with `COLLATE "C"`; redb orders `&str` keys by bytes; the local walk sorts each directory by
//! `name` + `/` for directories, which makes a depth-first walk come out in full-path byte order
//! (`a-b` < `a/x`, because `-` < `/`). Each stream is checked as it is consumed: a source that
//! breaks the order aborts the audit instead of producing false orphans.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::AuditError;
use crate::layout::{MEDIA_DIRS, MediaPath};
use crate::state::{Record, State};
use crate::synapse_db::{Db, DbError};
use crate::upload::digest::Snapshot;
use crate::upload::s3::{Listed, ObjectStore};

/// Rows or records fetched per round trip.
const PAGE: usize = 5000;

/// What a database row says about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// An original (`local_content`, `remote_content`).
    Content,
    /// A thumbnail row.
    Thumbnail,
    /// The thumbnail folder of an existing media (`…/AB/CD/REST/`): thumbnails under it belong to
    /// a media that exists, even without a row of their own.
    MediaDir,
}

#[derive(Debug, Clone, Copy)]
pub struct DbRow {
    pub kind: DbKind,
    /// Bytes per the database (`media_length`, `thumbnail_length`).
    pub len: Option<i64>,
    /// Synapse's sha256 of an original, where the database has one.
    pub sha256: Option<[u8; 32]>,
}

/// Remembers the last key taken and refuses one that does not sort after it.
struct Order {
    what: &'static str,
    last: Option<String>,
    allow_equal: bool,
}

impl Order {
    fn check(&mut self, key: &str) -> Result<(), AuditError> {
        if let Some(last) = &self.last {
            let ok = if self.allow_equal {
                key >= last.as_str()
            } else {
                key > last.as_str()
            };
            if !ok {
                return Err(AuditError::OutOfOrder {
                    what: self.what,
                    before: last.clone(),
                    after: key.to_owned(),
                });
            }
        }
        self.last = Some(key.to_owned());
        Ok(())
    }
}

/// A page buffer with the order check; `T` is the payload of a key.
pub struct Buffered<T> {
    buf: VecDeque<(String, T)>,
    order: Order,
    pub done: bool,
}

impl<T> Buffered<T> {
    fn new(what: &'static str, allow_equal: bool) -> Self {
        Buffered {
            buf: VecDeque::new(),
            order: Order {
                what,
                last: None,
                allow_equal,
            },
            done: false,
        }
    }

    fn push_page(&mut self, page: Vec<(String, T)>) -> Result<(), AuditError> {
        for (k, _) in &page {
            self.order.check(k)?;
        }
        self.buf.extend(page);
        Ok(())
    }

    pub fn peek(&self) -> Option<&str> {
        self.buf.front().map(|(k, _)| k.as_str())
    }

    /// Takes the head if its key is `key`.
    pub fn take(&mut self, key: &str) -> Option<T> {
        if self.peek() == Some(key) {
            self.buf.pop_front().map(|(_, v)| v)
        } else {
            None
        }
    }

    /// Drops the head, whatever its key.
    pub fn pop(&mut self) {
        self.buf.pop_front();
    }

    fn needs(&self) -> bool {
        self.buf.is_empty() && !self.done
    }
}

/// Synapse's media, as the paths of the files Synapse expects: through a cursor (PostgreSQL), or
/// page by page after the last key, each page its own short read transaction (SQLite: a
/// transaction held across the audit would stall Synapse's WAL checkpoints).
pub struct DbStream<'a> {
    source: Source<'a>,
    /// The server's `statement_timeout` of the audit's queries, and our client-side one.
    statement_timeout: Duration,
    timeout: Duration,
    /// When the current snapshot was taken, and how old it may get (see [`DbStream::fill`]).
    snapshot_at: std::time::Instant,
    max_age: Duration,
    /// Whether Synapse's media tables have the sha256 column.
    has_sha256: bool,
    /// The last path the cursor returned (valid or not): a new snapshot goes on after it.
    last: Option<String>,
    pub rows: Buffered<DbRow>,
    /// Rows whose ids make no safe path (`..`, `/`, too short): reported, never touched.
    pub invalid: Vec<String>,
    pub invalid_count: u64,
}

enum Source<'a> {
    Postgres(deadpool_postgres::ClientWrapper),
    Sqlite(&'a Db),
}

/// `AB/CD/REST` of an id, as Synapse splits it (by characters).
fn split(col: &str) -> String {
    format!("substr({col},1,2) || '/' || substr({col},3,2) || '/' || substr({col},5)")
}

fn thumb_name(t: &str) -> String {
    format!(
        "{t}.thumbnail_width || '-' || {t}.thumbnail_height || '-' || replace({t}.thumbnail_type, '/', '-') || '-' || {t}.thumbnail_method"
    )
}

/// One query for every file Synapse knows, as relative paths, in byte order, after `after` if
/// given. URL previews are left out (they live under `url_cache*`, which the audit does not cover).
fn expected_files_sql(after: Option<&str>, has_sha256: bool) -> String {
    // A literal, not a parameter (DECLARE takes none): quotes doubled, with
    // standard_conforming_strings on (set with it), so backslashes are plain characters.
    let after = after.map_or(String::new(), |k| {
        format!(" AND k COLLATE \"C\" > '{}'", k.replace('\'', "''"))
    });
    // Synapse's hash of originals (Synapse ≥ 1.128); NULL before the column existed.
    let (msha, rsha) = if has_sha256 {
        ("m.sha256", "r.sha256")
    } else {
        ("NULL::text", "NULL::text")
    };
    let (lm, lt, rm, rt) = (
        split("m.media_id"),
        split("t.media_id"),
        split("r.filesystem_id"),
        split("t.filesystem_id"),
    );
    let (ltn, rtn) = (thumb_name("t"), thumb_name("t"));
    format!(
        "SELECT k, kind, len, sha FROM ( \
           SELECT 'local_content/' || {lm} AS k, 0 AS kind, m.media_length::int8 AS len, {msha} AS sha \
             FROM local_media_repository m WHERE m.url_cache IS NULL \
           UNION ALL SELECT 'local_thumbnails/' || {lm} || '/', 2, NULL, NULL \
             FROM local_media_repository m WHERE m.url_cache IS NULL \
           UNION ALL SELECT 'local_thumbnails/' || {lt} || '/' || {ltn}, 1, t.thumbnail_length::int8, NULL \
             FROM local_media_repository_thumbnails t WHERE NOT EXISTS ( \
               SELECT 1 FROM local_media_repository u WHERE u.media_id = t.media_id AND u.url_cache IS NOT NULL) \
           UNION ALL SELECT 'remote_content/' || r.media_origin || '/' || {rm}, 0, r.media_length::int8, {rsha} \
             FROM remote_media_cache r \
           UNION ALL SELECT 'remote_thumbnail/' || r.media_origin || '/' || {rm} || '/', 2, NULL, NULL \
             FROM remote_media_cache r \
           UNION ALL SELECT 'remote_thumbnail/' || t.media_origin || '/' || {rt} || '/' || {rtn}, 1, t.thumbnail_length::int8, NULL \
             FROM remote_media_cache_thumbnails t \
         ) files WHERE k IS NOT NULL{after} ORDER BY k COLLATE \"C\""
    )
}

/// How long one snapshot of Synapse's database may be held. A transaction open for a whole audit
/// of millions of media (tens of minutes) holds back vacuum on Synapse's busiest tables; a new one
/// every few minutes costs a sort of the rows still to come.
pub const MAX_SNAPSHOT_AGE: Duration = Duration::from_secs(300);

/// The longest a single FETCH may take: the first one sorts every row.
const MIN_FETCH_TIMEOUT: Duration = Duration::from_secs(300);

impl<'a> DbStream<'a> {
    /// Opens a read-only, repeatable-read transaction (one consistent snapshot) on a connection
    /// of its own and declares the cursor. The connection is closed when the stream is dropped,
    /// which ends the transaction; it never goes back to a pool.
    pub async fn open(db: &'a Db) -> Result<DbStream<'a>, DbError> {
        DbStream::open_with_max_age(db, MAX_SNAPSHOT_AGE).await
    }

    /// [`DbStream::open`], renewing the snapshot once it is older than `max_age`.
    pub async fn open_with_max_age(db: &'a Db, max_age: Duration) -> Result<DbStream<'a>, DbError> {
        let has_sha256 = db.has_sha256().await?;
        let source = if db.is_sqlite() {
            Source::Sqlite(db)
        } else {
            Source::Postgres(db.dedicated_client().await?)
        };
        let statement_timeout = db.statement_timeout().max(MIN_FETCH_TIMEOUT);
        let mut stream = DbStream {
            source,
            statement_timeout,
            timeout: statement_timeout + Duration::from_secs(5),
            snapshot_at: std::time::Instant::now(),
            max_age,
            has_sha256,
            last: None,
            rows: Buffered::new("the database (ORDER BY … COLLATE \"C\")", true),
            invalid: Vec::new(),
            invalid_count: 0,
        };
        if let Source::Postgres(_) = stream.source {
            stream.declare("BEGIN").await?;
        }
        Ok(stream)
    }

    /// Starts a snapshot and declares the cursor over the rows after the last one read. `start`
    /// is `BEGIN`, or `COMMIT; BEGIN` to end the previous snapshot (and its cursor) first.
    async fn declare(&mut self, start: &str) -> Result<(), DbError> {
        let Source::Postgres(client) = &self.source else {
            return Ok(());
        };
        let setup = format!(
            "{start} ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL statement_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = 0; \
             SET LOCAL standard_conforming_strings = on; \
             DECLARE audit_files NO SCROLL CURSOR FOR {}",
            self.statement_timeout.as_millis(),
            expected_files_sql(self.last.as_deref(), self.has_sha256)
        );
        Db::timed_with(
            self.timeout,
            "declare the audit cursor",
            client.batch_execute(&setup),
        )
        .await?;
        self.snapshot_at = std::time::Instant::now();
        Ok(())
    }

    /// Takes every row at `key` (duplicates count once), fetching on when they fill the buffer to
    /// its end: two rows of one path may straddle a FETCH.
    pub async fn take_all(
        &mut self,
        key: &str,
        examples: usize,
    ) -> Result<Option<DbRow>, AuditError> {
        let mut row = None;
        loop {
            while let Some(r) = self.rows.take(key) {
                row = Some(r);
            }
            if !self.rows.needs() {
                return Ok(row);
            }
            self.fill(examples).await?;
        }
    }

    pub async fn fill(&mut self, examples: usize) -> Result<(), AuditError> {
        while self.rows.needs() {
            let rows = self.next_rows().await?;
            if rows.len() < PAGE {
                self.rows.done = true;
            }
            let mut page = Vec::with_capacity(rows.len());
            if let Some(r) = rows.last() {
                self.last = Some(r.0.clone());
            }
            for (key, kind, len, sha256) in rows {
                let kind = match kind {
                    0 => DbKind::Content,
                    1 => DbKind::Thumbnail,
                    _ => DbKind::MediaDir,
                };
                let file = key.strip_suffix('/').unwrap_or(&key);
                if MediaPath::parse(file).is_err() {
                    if kind == DbKind::MediaDir {
                        continue; // its original is reported already
                    }
                    self.invalid_count += 1;
                    if self.invalid.len() < examples {
                        self.invalid.push(key);
                    }
                    continue;
                }
                page.push((key, DbRow { kind, len, sha256 }));
            }
            self.rows.push_page(page)?;
        }
        Ok(())
    }

    /// The next page of (path, kind, length, sha256), from the cursor or the next SQLite page.
    async fn next_rows(&mut self) -> Result<Vec<FileRow>, DbError> {
        if let Source::Sqlite(db) = self.source {
            let rows = db.media_files_page(self.last.as_deref(), PAGE).await?;
            return Ok(rows
                .into_iter()
                .map(|r| (r.key, r.kind, r.len, r.sha256))
                .collect());
        }
        // Between two FETCHes only: the rows after the last one read, in a new snapshot.
        // Each path is still read once and in order; a media created meanwhile behind that
        // point is missed, as it would have been by the old snapshot.
        if self.snapshot_at.elapsed() >= self.max_age {
            self.declare("COMMIT; BEGIN").await?;
        }
        let Source::Postgres(client) = &self.source else {
            return Err(DbError::Unsupported("fetch media rows"));
        };
        let q = format!("FETCH {PAGE} FROM audit_files");
        let rows = Db::timed_with(self.timeout, "fetch media rows", client.query(&q, &[])).await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    i64::from(r.get::<_, i32>(1)),
                    r.get(2),
                    r.get::<_, Option<String>>(3)
                        .as_deref()
                        .and_then(crate::sha256::parse_hex),
                )
            })
            .collect())
    }
}

/// A database row of the stream: path, kind (0 original, 1 thumbnail, 2 media directory),
/// length, sha256.
type FileRow = (String, i64, Option<i64>, Option<[u8; 32]>);

/// The bucket under our prefix, keys with the prefix removed.
pub struct BucketStream<'a> {
    store: &'a ObjectStore,
    token: Option<String>,
    pub objects: Buffered<Listed>,
}

impl<'a> BucketStream<'a> {
    pub fn new(store: &'a ObjectStore) -> Self {
        BucketStream {
            store,
            token: None,
            objects: Buffered::new("the bucket listing", false),
        }
    }

    pub async fn fill(&mut self) -> Result<(), AuditError> {
        while self.objects.needs() {
            let (page, next) = self.store.list_page(self.token.take()).await?;
            self.objects.done = next.is_none();
            self.token = next;
            let prefix = self.store.prefix();
            let page = page
                .into_iter()
                .filter_map(|o| Some((o.key.strip_prefix(prefix)?.to_owned(), o)))
                .collect();
            self.objects.push_page(page)?;
        }
        Ok(())
    }
}

/// One regular file of the local store.
pub enum Walked {
    File(String, Snapshot),
    /// A name that is not UTF-8 (no key; the upload skips it too).
    BadName(String),
}

/// The local store, walked on a blocking thread in byte order of the relative paths.
pub struct DiskStream {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<Walked>, AuditError>>,
    pub files: Buffered<Snapshot>,
    pub bad_names: Vec<String>,
    pub bad_name_count: u64,
}

impl DiskStream {
    pub fn start(root: PathBuf) -> DiskStream {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        std::thread::Builder::new()
            .name("audit-walk".into())
            .spawn(move || walk(&root, &tx))
            .expect("spawning the audit walk thread");
        DiskStream {
            rx,
            files: Buffered::new("the local walk", false),
            bad_names: Vec::new(),
            bad_name_count: 0,
        }
    }

    pub async fn fill(&mut self, examples: usize) -> Result<(), AuditError> {
        while self.files.needs() {
            let Some(batch) = self.rx.recv().await else {
                self.files.done = true;
                break;
            };
            let mut page = Vec::new();
            for w in batch? {
                match w {
                    Walked::File(k, s) => page.push((k, s)),
                    Walked::BadName(n) => {
                        self.bad_name_count += 1;
                        if self.bad_names.len() < examples {
                            self.bad_names.push(n);
                        }
                    }
                }
            }
            self.files.push_page(page)?;
        }
        Ok(())
    }
}

/// Sort key of a directory entry: its name, with `/` appended for a directory.
fn sort_key(e: &walkdir::DirEntry) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut k = e.file_name().as_bytes().to_vec();
    if e.file_type().is_dir() {
        k.push(b'/');
    }
    k
}

type WalkTx = tokio::sync::mpsc::Sender<Result<Vec<Walked>, AuditError>>;

/// Walks the media folders (in byte order, they already are) without following symlinks; sends
/// regular files in batches. Ends early when the receiver is gone (audit aborted).
fn walk(root: &Path, tx: &WalkTx) {
    let mut batch = Vec::with_capacity(1000);
    for top in MEDIA_DIRS {
        let dir = root.join(top);
        // walkdir follows its root when it is a symlink (even with follow_links off): a
        // symlinked top-level folder would put files outside the store into the audit.
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                tracing::warn!(dir = %dir.display(), "Not auditing a symlinked top-level folder (symlinks are never followed).");
                continue;
            }
            _ => continue,
        }
        let walker = walkdir::WalkDir::new(&dir)
            .follow_links(false)
            .follow_root_links(false)
            .sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                // Gone while we walked (Synapse or the sweep deleted it): not an error.
                Err(e)
                    if e.io_error()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(AuditError::Walk(e.to_string())));
                    return;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(root) else {
                continue;
            };
            let item = match rel.to_str() {
                None => Walked::BadName(rel.to_string_lossy().into_owned()),
                Some(rel) => match entry.metadata() {
                    Ok(m) => Walked::File(rel.to_owned(), Snapshot::of(&m)),
                    Err(_) => continue, // vanished between readdir and lstat
                },
            };
            batch.push(item);
            if batch.len() == 1000
                && tx
                    .blocking_send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(1000))))
                    .is_err()
            {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

/// Reads up to `n` entries after a key.
type PageReader<T> =
    fn(&State, Option<&str>, usize) -> Result<Vec<(String, T)>, crate::state::StateError>;

/// Our records, or the orphan sightings: pages of the state database in key order.
pub struct StateStream<T> {
    state: State,
    read: PageReader<T>,
    after: Option<String>,
    pub items: Buffered<T>,
}

impl StateStream<Record> {
    pub fn records(state: State) -> Self {
        StateStream {
            state,
            read: |s, a, n| s.records_after(a, n),
            after: None,
            items: Buffered::new("the state database (records)", false),
        }
    }
}

impl StateStream<u64> {
    pub fn sightings(state: State) -> Self {
        StateStream {
            state,
            read: |s, a, n| s.sightings_after(a, n),
            after: None,
            items: Buffered::new("the state database (orphan sightings)", false),
        }
    }
}

impl<T: Send + 'static> StateStream<T> {
    pub async fn fill(&mut self) -> Result<(), AuditError> {
        while self.items.needs() {
            let (state, read, after) = (self.state.clone(), self.read, self.after.clone());
            let page = tokio::task::spawn_blocking(move || read(&state, after.as_deref(), PAGE))
                .await
                .expect("state reads do not panic")?;
            self.items.done = page.len() < PAGE;
            self.after = page.last().map(|(k, _)| k.clone()).or(self.after.take());
            self.items.push_page(page)?;
        }
        Ok(())
    }
}
