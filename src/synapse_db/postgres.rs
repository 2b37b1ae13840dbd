//! The PostgreSQL backend: a small deadpool pool, `statement_timeout` on the server and a
//! client-side timeout on every query, keyset pages, the sweep's advisory lock on a connection of
//! its own. Each method here has its SQLite twin in `sqlite.rs`; `mod.rs` picks one.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::{AgedMedia, DbError, SWEEP_LOCK_KEY, tls};
use crate::config::{PostgresConfig, SslMode};
use crate::layout::MediaRef;

pub struct PgDb {
    pool: Pool,
    target: String,
    pub(super) timeout: Duration,
    /// Whether Synapse's media tables have the `sha256` column (schema delta 91/01, Synapse
    /// 1.128); asked once.
    sha256_column: tokio::sync::OnceCell<bool>,
}

/// Holds the sweep's advisory lock on a connection of its own that never goes back to the pool.
///
/// Why not a pooled connection: a session advisory lock belongs to its connection. If
/// `pg_try_advisory_lock` succeeded on the server while our client-side timeout fired (a network
/// stall), a pooled connection went back to the pool holding the lock (fast recycling resets
/// nothing): every instance then saw "another sweep is running" until a restart, and a sweep that
/// re-entered the lock on that connection (advisory locks count) left it held after unlocking.
/// A connection of its own is closed whenever the lock is given up, on success, error or drop,
/// and the server releases the lock with its session.
pub struct PgLock {
    client: deadpool_postgres::ClientWrapper,
    timeout: Duration,
}

/// Whether the lock's session is still the one holding the lock: the key as PostgreSQL splits a
/// bigint key in `pg_locks` (high 32 bits in `classid`, low in `objid`, `objsubid` 1).
const LOCK_HELD_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
     AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
     AND ((classid::int8 << 32) | objid::int8) = $1)";

impl PgLock {
    /// Unlocks, then closes the connection either way (closing alone would release it too; the
    /// unlock only makes the release immediate).
    pub async fn release(self) {
        let unlock = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_LOCK_KEY]);
        let _ = tokio::time::timeout(Duration::from_secs(10), unlock).await;
    }

    pub async fn still_held(&self) -> Result<(), String> {
        if self.client.is_closed() {
            return Err(
                "its connection to PostgreSQL closed (server restart or network cut)".into(),
            );
        }
        let check = self.client.query_one(LOCK_HELD_SQL, &[&SWEEP_LOCK_KEY]);
        match timed_with(self.timeout, "check the sweep lock", check).await {
            Ok(row) if row.get::<_, bool>(0) => Ok(()),
            Ok(_) => Err("PostgreSQL no longer lists it as ours".into()),
            Err(e) => Err(format!("cannot confirm it: {}", crate::Chain(&e))),
        }
    }
}

/// Runs one query future with a client-side timeout.
pub async fn timed_with<T>(
    after: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(after, f).await {
        Ok(r) => r.map_err(|source| DbError::Query { what, source }),
        Err(_) => Err(DbError::Timeout { what, after }),
    }
}

impl PgDb {
    /// Builds the pool; connects lazily.
    pub fn new(cfg: &PostgresConfig) -> Result<PgDb, DbError> {
        let mut pg = tokio_postgres::Config::new();
        if cfg.is_socket() {
            pg.host_path(&cfg.host);
        } else {
            pg.host(&cfg.host);
        }
        pg.port(cfg.port)
            .user(&cfg.user)
            .dbname(&cfg.dbname)
            .application_name("synapse-s3-offload")
            .connect_timeout(cfg.connect_timeout)
            .options(format!(
                "-c statement_timeout={}",
                cfg.statement_timeout.as_millis()
            ));
        if let Some(p) = &cfg.password {
            pg.password(p.expose());
        }
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match cfg.sslmode {
            SslMode::Disable => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                Manager::from_config(pg, tokio_postgres::NoTls, mgr_cfg)
            }
            mode => {
                pg.ssl_mode(match mode {
                    SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                    _ => tokio_postgres::config::SslMode::Require,
                });
                let tls =
                    tls::client_config(mode, cfg.sslrootcert.as_deref()).map_err(DbError::Tls)?;
                Manager::from_config(
                    pg,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    mgr_cfg,
                )
            }
        };
        let pool = Pool::builder(mgr)
            .max_size(4)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(cfg.connect_timeout))
            .wait_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(|e| DbError::Tls(e.to_string()))?;
        let target = if cfg.is_socket() {
            format!(
                "{}/.s.PGSQL.{} (database {}, user {})",
                cfg.host, cfg.port, cfg.dbname, cfg.user
            )
        } else {
            format!(
                "{}:{} (database {}, user {})",
                cfg.host, cfg.port, cfg.dbname, cfg.user
            )
        };
        Ok(PgDb {
            pool,
            target,
            timeout: cfg.statement_timeout + Duration::from_secs(5),
            sha256_column: tokio::sync::OnceCell::new(),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|source| DbError::Connect {
            target: self.target.clone(),
            source,
        })
    }

    async fn timed<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        timed_with(self.timeout, what, f).await
    }

    pub async fn dedicated_client(&self) -> Result<deadpool_postgres::ClientWrapper, DbError> {
        Ok(deadpool_postgres::Object::take(self.client().await?))
    }

    pub async fn remote_media_exists(&self, origin: &str, media_id: &str) -> Result<bool, DbError> {
        let c = self.client().await?;
        let row = self
            .timed(
                "remote media row",
                c.query_one(
                    "SELECT EXISTS (SELECT 1 FROM remote_media_cache WHERE media_origin = $1 AND media_id = $2)",
                    &[&origin, &media_id],
                ),
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn aged_local_count(&self, cutoff_ms: i64) -> Result<(i64, i64), DbError> {
        let c = self.client().await?;
        let row = self
            .timed(
                "count aged local media",
                c.query_one(
                    "SELECT count(*) FILTER (WHERE COALESCE(last_access_ts, created_ts) < $1), count(*) \
                     FROM local_media_repository WHERE url_cache IS NULL",
                    &[&cutoff_ms],
                ),
            )
            .await?;
        Ok((row.get(0), row.get(1)))
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

    pub async fn local_media_present(&self, ids: &[String]) -> Result<HashSet<String>, DbError> {
        let c = self.client().await?;
        let rows = self
            .timed(
                "media still present (local)",
                c.query(
                    "SELECT media_id FROM local_media_repository WHERE media_id = ANY($1) \
                     UNION SELECT media_id FROM local_media_repository_thumbnails WHERE media_id = ANY($1)",
                    &[&ids],
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn remote_media_present(
        &self,
        origins: &[String],
        fs_ids: &[String],
    ) -> Result<HashSet<(String, String)>, DbError> {
        let c = self.client().await?;
        let rows = self
            .timed(
                "media still present (remote)",
                c.query(
                    "SELECT media_origin, filesystem_id FROM remote_media_cache \
                       WHERE (media_origin, filesystem_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
                     UNION SELECT media_origin, filesystem_id FROM remote_media_cache_thumbnails \
                       WHERE (media_origin, filesystem_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                    &[&origins, &fs_ids],
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn media_counts(&self) -> Result<(i64, i64), DbError> {
        let c = self.client().await?;
        self.timed(
            "media table columns",
            c.batch_execute(
                "SELECT media_id, created_ts, last_access_ts, url_cache FROM local_media_repository LIMIT 0; \
                 SELECT media_origin, media_id, filesystem_id, created_ts, last_access_ts FROM remote_media_cache LIMIT 0",
            ),
        )
        .await?;
        let row = self
            .timed(
                "count media",
                c.query_one("SELECT (SELECT count(*) FROM local_media_repository), (SELECT count(*) FROM remote_media_cache)", &[]),
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// On any error the connection is closed, which releases a lock the server may have granted
    /// after our timeout fired.
    pub async fn try_lock(&self) -> Result<Option<PgLock>, DbError> {
        let client = self.dedicated_client().await?;
        let row = self
            .timed(
                "pg_try_advisory_lock",
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK_KEY]),
            )
            .await?;
        Ok(row.get::<_, bool>(0).then_some(PgLock {
            client,
            timeout: self.timeout,
        }))
    }

    pub async fn aged_local(
        &self,
        cutoff_ms: i64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<AgedMedia>, DbError> {
        let sha = self.sha256_expr().await?;
        let c = self.client().await?;
        let rows = self
            .timed(
                "aged local media",
                c.query(
                    &format!(
                        "SELECT media_id, {sha} FROM local_media_repository \
                         WHERE url_cache IS NULL AND COALESCE(last_access_ts, created_ts) < $1 AND media_id > $2 \
                         ORDER BY media_id LIMIT $3"
                    ),
                    &[&cutoff_ms, &after, &limit],
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AgedMedia::Local {
                media_id: r.get(0),
                sha256: hash_at(r, 1),
            })
            .collect())
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
        let c = self.client().await?;
        let rows = self
            .timed(
                "aged remote media",
                c.query(
                    &format!(
                        "SELECT media_origin, media_id, filesystem_id, {sha} FROM remote_media_cache \
                         WHERE COALESCE(last_access_ts, created_ts) < $1 AND (media_origin, {key}) > ($2, $3) \
                         ORDER BY media_origin, {key} LIMIT $4"
                    ),
                    &[&cutoff_ms, &after.0, &after.1, &limit],
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AgedMedia::Remote {
                origin: r.get(0),
                media_id: r.get(1),
                filesystem_id: r.get(2),
                sha256: hash_at(r, 3),
            })
            .collect())
    }

    pub async fn has_sha256(&self) -> Result<bool, DbError> {
        self.sha256_column
            .get_or_try_init(|| async {
                let c = self.client().await?;
                let row = self
                    .timed(
                        "sha256 columns",
                        c.query_one(
                            "SELECT count(DISTINCT table_name) FROM information_schema.columns \
                             WHERE table_name IN ('local_media_repository', 'remote_media_cache') \
                               AND column_name = 'sha256' AND table_schema = ANY(current_schemas(false))",
                            &[],
                        ),
                    )
                    .await?;
                Ok(row.get::<_, i64>(0) == 2)
            })
            .await
            .copied()
    }

    /// The select-list expression of the hash: the column, or NULL before Synapse 1.128.
    async fn sha256_expr(&self) -> Result<&'static str, DbError> {
        Ok(if self.has_sha256().await? {
            "sha256"
        } else {
            "NULL::text"
        })
    }

    pub async fn content_sha256(&self, media: &MediaRef) -> Result<Option<[u8; 32]>, DbError> {
        if !self.has_sha256().await? {
            return Ok(None);
        }
        let c = self.client().await?;
        let row = match media {
            MediaRef::Local(id) => {
                self.timed(
                    "media sha256 (local)",
                    c.query_opt(
                        "SELECT sha256 FROM local_media_repository WHERE media_id = $1",
                        &[id],
                    ),
                )
                .await?
            }
            MediaRef::Remote { origin, fs_id } => {
                self.timed(
                    "media sha256 (remote)",
                    c.query_opt(
                        "SELECT sha256 FROM remote_media_cache WHERE media_origin = $1 AND filesystem_id = $2",
                        &[origin, fs_id],
                    ),
                )
                .await?
            }
        };
        Ok(row.and_then(|r| hash_at(&r, 0)))
    }
}

/// A hex SHA-256 column; `None` when NULL or not a hash.
fn hash_at(row: &tokio_postgres::Row, idx: usize) -> Option<[u8; 32]> {
    row.get::<_, Option<String>>(idx)
        .as_deref()
        .and_then(crate::sha256::parse_hex)
}
