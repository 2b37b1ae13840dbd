//! The `database:` and `sweep:` sections. `database:` takes Synapse's keys, as written in
//! `homeserver.yaml`: either its whole `database:` block (`name:` + `args:`) or the `args` alone
//! (psycopg2's keys; `name` defaults to PostgreSQL). `name: sqlite3` with `database: PATH` (or
//! `args: {database: PATH}`) selects Synapse's SQLite file.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret, duration, invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// Synapse's `database.name`: `psycopg2` / `psycopg` (PostgreSQL, the default) or `sqlite3`.
    pub name: Option<String>,
    /// Synapse's `database.args`, so its whole block can be pasted; keys set beside `args` win.
    pub args: Option<Box<RawDatabase>>,
    /// Host name, IP address, or a directory holding the Unix socket.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// PostgreSQL: the database name. SQLite: the database file (an absolute path).
    pub database: Option<String>,
    /// psycopg2's other name for `database`.
    pub dbname: Option<String>,
    /// disable | allow | prefer | require | verify-ca | verify-full
    pub sslmode: Option<String>,
    /// Root certificates (PEM) for verify-ca / verify-full; default: the system's.
    pub sslrootcert: Option<PathBuf>,
    /// psycopg2 accepts it in seconds; so do we (or a duration like `10s`).
    pub connect_timeout: Option<super::DurationValue>,
    /// Synapse's pool settings; accepted so `database.args` can be pasted, otherwise unused.
    pub cp_min: Option<u32>,
    pub cp_max: Option<u32>,
    /// Timeout of every query.
    pub statement_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSweep {
    pub enabled: Option<bool>,
    pub interval: Option<String>,
    pub keep_local_for: Option<String>,
    pub dry_run: Option<bool>,
    pub confirm_synapse_reads_from_bucket: Option<bool>,
    pub max_deletions_per_run: Option<u64>,
    pub concurrency: Option<usize>,
    /// auto | always | never: confirm aged files from a bucket listing (see [`Listing`]).
    pub listing: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Synapse's database: which kind, and how to reach it.
#[derive(Debug, Clone)]
pub enum DatabaseConfig {
    Postgres(PostgresConfig),
    Sqlite(SqliteConfig),
}

/// Synapse's SQLite file (`database.name: sqlite3`), read next to a running Synapse.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file (absolute).
    pub path: PathBuf,
    /// Bound of every call: waiting for Synapse's write lock (`busy_timeout`) and running.
    pub statement_timeout: Duration,
    /// Where the sweep's lock file lives (`state_dir`; set once `state_dir` is validated). There
    /// is no advisory lock in SQLite: sweeps exclude each other with `flock` on a file there.
    pub lock_dir: Option<PathBuf>,
}

impl DatabaseConfig {
    /// The bound of one query.
    pub fn statement_timeout(&self) -> Duration {
        match self {
            DatabaseConfig::Postgres(p) => p.statement_timeout,
            DatabaseConfig::Sqlite(s) => s.statement_timeout,
        }
    }

    /// Names the database for messages: `PostgreSQL` or `SQLite`.
    pub fn kind(&self) -> &'static str {
        match self {
            DatabaseConfig::Postgres(_) => "PostgreSQL",
            DatabaseConfig::Sqlite(_) => "SQLite",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
}

impl PostgresConfig {
    /// Whether `host` is a Unix-socket directory (libpq's rule: it starts with '/').
    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }
}

#[derive(Debug, Clone)]
pub struct SweepConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub keep_local_for: Duration,
    pub dry_run: bool,
    pub confirm_synapse_reads_from_bucket: bool,
    pub max_deletions_per_run: Option<u64>,
    /// Media confirmed at once (HEAD requests in flight ≈ this × files per media).
    pub concurrency: usize,
    pub listing: Listing,
}

/// How the sweep confirms aged files in the bucket (`sweep.listing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// From a listing when many media age out at once (a "dense" sweep, see `sweep::dense`),
    /// else one HEAD per file.
    Auto,
    /// Always from a listing (what the listing cannot confirm still gets a HEAD).
    Always,
    /// One HEAD per file.
    Never,
}

pub(super) fn validate_database(
    raw: Option<RawDatabase>,
) -> Result<Option<DatabaseConfig>, ConfigError> {
    let Some(mut raw) = raw else { return Ok(None) };
    if let Some(args) = raw.args.take() {
        raw = RawDatabase::over(*args, raw);
    }
    match raw.name.as_deref() {
        None | Some("psycopg2" | "psycopg") => {}
        Some("sqlite3") => return validate_sqlite(raw).map(Some),
        Some(other) => {
            return Err(invalid(
                "database.name",
                format!(
                    "{other:?} is not one of Synapse's database names: psycopg2 (PostgreSQL), psycopg, sqlite3"
                ),
            ));
        }
    }
    let dbname = match (raw.database, raw.dbname) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(
                "database.dbname",
                "database and dbname are both set and differ; keep one",
            ));
        }
        (a, b) => a.or(b).ok_or(ConfigError::Missing {
            key: "database.database",
            hint: "the name of Synapse's database (database.args.database in homeserver.yaml)",
        })?,
    };
    let sslmode = match raw.sslmode.as_deref().unwrap_or("prefer") {
        "disable" | "allow" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(invalid(
                "database.sslmode",
                format!(
                    "{other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            ));
        }
    };
    let connect_timeout = match raw.connect_timeout {
        None => Duration::from_secs(10),
        Some(v) => v
            .to_duration()
            .map_err(|r| invalid("database.connect_timeout", r))?,
    };
    Ok(Some(DatabaseConfig::Postgres(PostgresConfig {
        host: raw.host.unwrap_or_else(|| "localhost".into()),
        port: raw.port.unwrap_or(5432),
        user: raw.user.unwrap_or_else(|| "synapse".into()),
        password: raw.password,
        dbname,
        sslmode,
        sslrootcert: raw.sslrootcert,
        connect_timeout,
        statement_timeout: duration("database.statement_timeout", raw.statement_timeout, "60s")?,
    })))
}

/// `name: sqlite3`: the file, and no PostgreSQL key (one would mean the config points at two
/// different databases; which one Synapse uses decides what the sweep may delete).
fn validate_sqlite(raw: RawDatabase) -> Result<DatabaseConfig, ConfigError> {
    for (key, set) in [
        ("database.host", raw.host.is_some()),
        ("database.port", raw.port.is_some()),
        ("database.user", raw.user.is_some()),
        ("database.password", raw.password.is_some()),
        ("database.sslmode", raw.sslmode.is_some()),
        ("database.sslrootcert", raw.sslrootcert.is_some()),
        ("database.connect_timeout", raw.connect_timeout.is_some()),
    ] {
        if set {
            return Err(invalid(
                key,
                "is a PostgreSQL key, but database.name is sqlite3: remove it, or set the name Synapse uses (psycopg2)",
            ));
        }
    }
    let path = match (raw.database, raw.dbname) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(
                "database.dbname",
                "database and dbname are both set and differ; keep one",
            ));
        }
        (a, b) => a.or(b).ok_or(ConfigError::Missing {
            key: "database.database",
            hint: "the path of Synapse's SQLite file (database.args.database in homeserver.yaml)",
        })?,
    };
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(invalid(
            "database.database",
            format!(
                "{} is not an absolute path: Synapse resolves it from its own working directory, which we cannot know; write the full path of the SQLite file",
                path.display()
            ),
        ));
    }
    Ok(DatabaseConfig::Sqlite(SqliteConfig {
        path,
        statement_timeout: duration("database.statement_timeout", raw.statement_timeout, "60s")?,
        lock_dir: None,
    }))
}

pub(super) fn validate_sweep(raw: RawSweep) -> Result<SweepConfig, ConfigError> {
    let concurrency = raw.concurrency.unwrap_or(16);
    if !(1..=256).contains(&concurrency) {
        return Err(invalid("sweep.concurrency", "must be between 1 and 256"));
    }
    if raw.max_deletions_per_run == Some(0) {
        return Err(invalid(
            "sweep.max_deletions_per_run",
            "0 would delete nothing; leave it out for no limit, or set sweep.enabled: false",
        ));
    }
    let listing = match raw.listing.as_deref().unwrap_or("auto") {
        "auto" => Listing::Auto,
        "always" => Listing::Always,
        "never" => Listing::Never,
        other => {
            return Err(invalid(
                "sweep.listing",
                format!("{other:?} is not one of auto, always, never"),
            ));
        }
    };
    Ok(SweepConfig {
        enabled: raw.enabled.unwrap_or(true),
        interval: duration("sweep.interval", raw.interval, "1h")?,
        keep_local_for: duration("sweep.keep_local_for", raw.keep_local_for, "30d")?,
        dry_run: raw.dry_run.unwrap_or(false),
        confirm_synapse_reads_from_bucket: raw.confirm_synapse_reads_from_bucket.unwrap_or(false),
        max_deletions_per_run: raw.max_deletions_per_run,
        concurrency,
        listing,
    })
}
