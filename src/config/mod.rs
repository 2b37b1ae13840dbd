//! Configuration: a raw serde view of the file (+ env overrides) → a validated [`Config`].
//!
//! Key names mirror what Synapse admins already have: the `s3:` block uses the names of
//! `s3_storage_provider`'s `config:` block, so it can be pasted. Unknown keys are errors (a typo must
//! not silently fall back to a default). Environment variables override the file:
//! `SYNAPSE_S3_OFFLOAD__S3__BUCKET=…` (prefix and separator are both `__`, so snake_case keys stay
//! reachable).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use self::load::{Layers, load_layers, load_layers_with_env};
pub use self::origin::{Origin, Origins};
pub use self::prune::{PruneConfig, RawPrune};
pub use self::sweep::{
    DatabaseConfig, Listing, PostgresConfig, RawDatabase, RawSweep, SqliteConfig, SslMode,
    SweepConfig,
};

mod env;
pub mod homeserver;
mod load;
pub mod origin;
mod prune;
mod s3;
mod summary;
mod upload;
#[cfg(test)]
pub(crate) use self::s3::validate_s3_for_tests;
use self::upload::validate_upload;
pub use upload::DEFAULT_UPLOAD_CONCURRENCY;
mod sweep;

pub const ENV_PREFIX: &str = "SYNAPSE_S3_OFFLOAD";

/// A secret string: never printed, by `Debug` or `Display`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is handed to the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}{}", read_hint(source, path))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `detail` names the line and key, never the text (it may hold a secret).
    #[error("config file {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("environment variable {var}: {problem}")]
    Env { var: String, problem: String },
    #[error("synapse_config{}", from(origin))]
    Synapse {
        origin: Option<Origin>,
        #[source]
        source: homeserver::SynapseConfigError,
    },
    #[error("config key `{key}`{} is invalid: {reason}", from(origin))]
    Invalid {
        key: &'static str,
        reason: String,
        origin: Option<Origin>,
    },
    /// The value is fine but what it points to cannot be used (permissions, I/O): not "invalid".
    #[error("config key `{key}`{}: {reason}", from(origin))]
    Inaccessible {
        key: &'static str,
        reason: String,
        origin: Option<Origin>,
    },
    #[error(
        "config key `{key}` is required (set it in the config file or as {}): {hint}",
        env_var(key)
    )]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}

/// The usual cause of a config the service cannot read: root created it 0600.
fn read_hint(e: &std::io::Error, path: &Path) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            " (run as the user that owns it, or give it to the daemon's user: chown matrix-synapse: {} && chmod 600 {})",
            path.display(),
            path.display()
        ),
        _ => String::new(),
    }
}

fn from(origin: &Option<Origin>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" (from {o})"))
        .unwrap_or_default()
}

/// The variable that sets `key` (`s3.bucket` → `SYNAPSE_S3_OFFLOAD__S3__BUCKET`).
pub fn env_var(key: &str) -> String {
    format!(
        "{}{}",
        env::ENV_VAR_PREFIX,
        key.to_ascii_uppercase().replace('.', "__")
    )
}

impl ConfigError {
    /// Names where the offending value came from.
    pub fn with_origin(mut self, origins: &Origins) -> Self {
        if let ConfigError::Invalid { key, origin, .. }
        | ConfigError::Inaccessible { key, origin, .. } = &mut self
        {
            *origin = origins.get(key).cloned();
        }
        self
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
        origin: None,
    }
}

fn inaccessible(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Inaccessible {
        key,
        reason: reason.into(),
        origin: None,
    }
}

/// `key:` with nothing after it (all its keys commented out) means the defaults, as an absent
/// section does; serde alone would refuse the null.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Raw form: exactly what the file says.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub media_store_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub scan_interval: Option<String>,
    pub scan_interval_when_degraded: Option<String>,
    pub shutdown_grace: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub s3: RawS3,
    #[serde(default, deserialize_with = "null_default")]
    pub upload: RawUpload,
    pub database: Option<RawDatabase>,
    #[serde(default, deserialize_with = "null_default")]
    pub sweep: RawSweep,
    #[serde(default, deserialize_with = "null_default")]
    pub prune: RawPrune,
    /// Synapse's homeserver.yaml: fills media_store_path, database and s3 when they are not set
    /// here, and is checked before a sweep deletes anything (see `sweep::provider`).
    pub synapse_config: Option<PathBuf>,
    #[serde(default, deserialize_with = "null_default")]
    pub metrics: RawMetrics,
    /// Extra Synapse config files (conf.d), merged after synapse_config in file-name order.
    pub synapse_config_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint_url: Option<String>,
    pub region_name: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    pub storage_class: Option<String>,
    pub sse_customer_key: Option<Secret>,
    pub sse_customer_algo: Option<String>,
    pub force_path_style: Option<bool>,
    pub request_checksum_calculation: Option<String>,
    pub response_checksum_validation: Option<String>,
    pub max_attempts: Option<u32>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpload {
    pub concurrency: Option<usize>,
    pub multipart_threshold: Option<SizeValue>,
    pub multipart_part_size: Option<SizeValue>,
    pub include_url_cache: Option<bool>,
    pub max_backoff: Option<String>,
    pub settle: Option<String>,
    pub hold_after_close: Option<String>,
    pub failed_retry_interval: Option<String>,
    pub heal_bad_local_copies: Option<bool>,
    pub max_requests_per_second: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `host:port` for /metrics and /health; off when unset.
    pub listen: Option<String>,
    /// How often an idle daemon checks that S3 answers (for /health).
    pub s3_probe_interval: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: Option<std::net::SocketAddr>,
    pub s3_probe_interval: Duration,
}

/// A duration as a number of seconds (psycopg2 style) or text (`10s`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    pub fn to_duration(&self) -> Result<Duration, String> {
        match self {
            DurationValue::Seconds(0) => Err("must be greater than zero".into()),
            DurationValue::Seconds(n) => Ok(Duration::from_secs(*n)),
            // A number as text (an environment variable) is seconds too.
            DurationValue::Text(s) => match s.trim().parse::<u64>() {
                Ok(n) => DurationValue::Seconds(n).to_duration(),
                Err(_) => parse_duration(s),
            },
        }
    }
}

/// A size as written by a human (`16MiB`, `8 MB`) or a plain number of bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

// ---------------------------------------------------------------------------------------------
// Validated form.

#[derive(Debug, Clone)]
pub struct Config {
    /// Canonical absolute path of Synapse's media store.
    pub media_store_path: PathBuf,
    /// Where the redb state lives.
    pub state_dir: PathBuf,
    /// Full scans of the store by the daemon (the safety net under inotify).
    pub scan_interval: Duration,
    /// Full scans while inotify cannot watch everything (watch limit reached).
    pub scan_interval_when_degraded: Duration,
    /// How long in-flight uploads may take to finish on SIGTERM.
    pub shutdown_grace: Duration,
    pub s3: S3Config,
    pub upload: UploadConfig,
    /// Synapse's database (PostgreSQL or SQLite): the sweep, audit and the uploads' arbiter.
    pub database: Option<DatabaseConfig>,
    pub sweep: SweepConfig,
    /// Sanity limits of orphan pruning.
    pub prune: PruneConfig,
    pub synapse_config: Option<PathBuf>,
    pub synapse_config_dir: Option<PathBuf>,
    pub metrics: MetricsConfig,
    /// Warnings about Synapse's provider settings, logged at startup and shown by `check`.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    WhenRequired,
    WhenSupported,
}

#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended verbatim to the media path, as `s3_storage_provider` does.
    pub prefix: String,
    pub endpoint_url: Option<String>,
    pub region_name: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    pub storage_class: Option<String>,
    pub sse_customer_key: Option<Secret>,
    pub sse_customer_algo: String,
    pub force_path_style: bool,
    pub request_checksum_calculation: ChecksumMode,
    pub response_checksum_validation: ChecksumMode,
    /// Attempts per S3 request made by the SDK's retry layer (1 = no retry).
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct UploadConfig {
    pub concurrency: usize,
    pub multipart_threshold: u64,
    pub multipart_part_size: u64,
    pub include_url_cache: bool,
    /// Cap of the daemon's exponential backoff after transient failures.
    pub max_backoff: Duration,
    /// A file found by a scan is uploaded once it has not been modified for this long.
    pub settle: Duration,
    /// No file is PUT sooner than this after it was closed (or, found by a scan, last modified):
    /// Synapse runs its spam checker after closing a file and deletes a rejected one.
    pub hold_after_close: Duration,
    /// Retry interval of files whose upload failed permanently (403, unreadable, …).
    pub failed_retry_interval: Duration,
    /// Replace a local file that differs from its verified object with the object's bytes
    /// (false: report only).
    pub heal_bad_local_copies: bool,
    /// Object requests (HEAD, PUT, parts) sent per second at most, by uploads; None: no cap
    /// (the adaptive limit and throttling answers still apply).
    pub max_requests_per_second: Option<f64>,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/synapse-s3-offload";
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Loads the file at `path` (YAML, or TOML when it ends in `.toml`), applies env overrides,
/// fills the rest from Synapse's config and validates the result.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    finish(load_layers(path)?)
}

/// [`load`] with these environment variables instead of the process's (for tests).
pub fn load_with_env(path: &Path, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    finish(load_layers_with_env(path, vars)?)
}

fn finish(layers: Layers) -> Result<Config, ConfigError> {
    let mut config = validate_parts(layers.raw, &layers.origins).into_config()?;
    config.warnings = layers.warnings;
    Ok(config)
}

pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    validate_parts(raw, &Origins::default()).into_config()
}

/// Each part of the config validated on its own, so `check` can report every bad key and still
/// check what is right (S3 with a good `s3:` while `media_store_path` is wrong).
pub struct Parts {
    pub media_store_path: Result<PathBuf, ConfigError>,
    pub state_dir: Result<PathBuf, ConfigError>,
    pub s3: Result<S3Config, ConfigError>,
    pub upload: Result<UploadConfig, ConfigError>,
    pub database: Result<Option<DatabaseConfig>, ConfigError>,
    pub synapse_config: Option<PathBuf>,
    pub synapse_config_dir: Option<PathBuf>,
    rest: Result<Rest, ConfigError>,
}

struct Rest {
    scan_interval: Duration,
    scan_interval_when_degraded: Duration,
    shutdown_grace: Duration,
    sweep: SweepConfig,
    prune: PruneConfig,
    metrics: MetricsConfig,
}

impl Parts {
    /// Every error, in the order of the keys.
    pub fn errors(&self) -> Vec<&ConfigError> {
        [
            self.media_store_path.as_ref().err(),
            self.state_dir.as_ref().err(),
            self.s3.as_ref().err(),
            self.upload.as_ref().err(),
            self.database.as_ref().err(),
            self.rest.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    pub fn into_config(self) -> Result<Config, ConfigError> {
        let rest = self.rest?;
        Ok(Config {
            media_store_path: self.media_store_path?,
            state_dir: self.state_dir?,
            scan_interval: rest.scan_interval,
            scan_interval_when_degraded: rest.scan_interval_when_degraded,
            shutdown_grace: rest.shutdown_grace,
            s3: self.s3?,
            upload: self.upload?,
            database: self.database?,
            sweep: rest.sweep,
            prune: rest.prune,
            synapse_config: self.synapse_config,
            synapse_config_dir: self.synapse_config_dir,
            metrics: rest.metrics,
            warnings: Vec::new(),
        })
    }
}

/// Validates each part; each error names where its value came from, per `origins`.
pub fn validate_parts(raw: RawConfig, origins: &Origins) -> Parts {
    let media_store_path = raw
        .media_store_path
        .ok_or(ConfigError::Missing {
            key: "media_store_path",
            hint: "set it to Synapse's media_store_path (e.g. /var/lib/matrix-synapse/media), or set synapse_config",
        })
        .and_then(|p| validate_media_store(&p));
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let state_dir = if !state_dir.is_absolute() {
        Err(invalid("state_dir", "must be an absolute path"))
    } else if media_store_path
        .as_ref()
        .is_ok_and(|m| state_dir.starts_with(m))
    {
        Err(invalid(
            "state_dir",
            "must not be inside media_store_path (the daemon would upload its own database)",
        ))
    } else {
        Ok(state_dir)
    };
    let metrics = raw.metrics;
    let rest = (|| {
        Ok(Rest {
            scan_interval: duration("scan_interval", raw.scan_interval, "6h")?,
            scan_interval_when_degraded: duration(
                "scan_interval_when_degraded",
                raw.scan_interval_when_degraded,
                "1m",
            )?,
            shutdown_grace: duration("shutdown_grace", raw.shutdown_grace, "10s")?,
            sweep: sweep::validate_sweep(raw.sweep)?,
            prune: prune::validate_prune(raw.prune)?,
            metrics: MetricsConfig {
                listen: match metrics.listen.as_deref().filter(|s| !s.is_empty()) {
                    None => None,
                    Some(l) => Some(l.parse().map_err(|e| {
                        invalid(
                            "metrics.listen",
                            format!("{l:?} is not host:port ({e}); e.g. 127.0.0.1:9187"),
                        )
                    })?),
                },
                s3_probe_interval: duration(
                    "metrics.s3_probe_interval",
                    metrics.s3_probe_interval,
                    "30s",
                )?,
            },
        })
    })();
    // The SQLite sweep's lock file lives in state_dir (see synapse_db::sqlite).
    let database = sweep::validate_database(raw.database).map(|d| match (d, &state_dir) {
        (Some(DatabaseConfig::Sqlite(mut s)), Ok(dir)) => {
            s.lock_dir = Some(dir.clone());
            Some(DatabaseConfig::Sqlite(s))
        }
        (d, _) => d,
    });
    let o = |e: ConfigError| e.with_origin(origins);
    Parts {
        media_store_path: media_store_path.map_err(o),
        state_dir: state_dir.map_err(o),
        s3: s3::validate_s3(raw.s3).map_err(o),
        upload: validate_upload(raw.upload).map_err(o),
        database: database.map_err(o),
        synapse_config: raw.synapse_config,
        synapse_config_dir: raw.synapse_config_dir,
        rest: rest.map_err(o),
    }
}

fn validate_media_store(p: &Path) -> Result<PathBuf, ConfigError> {
    if !p.is_absolute() {
        return Err(invalid(
            "media_store_path",
            format!("{} is not an absolute path", p.display()),
        ));
    }
    let unusable = |e: std::io::Error, what: &str| {
        let reason = format!("{} {what} ({e})", p.display());
        match e.kind() {
            std::io::ErrorKind::NotFound => invalid(
                "media_store_path",
                format!(
                    "{} does not exist; point it at Synapse's media store",
                    p.display()
                ),
            ),
            // Not a bad value: the path is fine, we may not enter it.
            std::io::ErrorKind::PermissionDenied => inaccessible(
                "media_store_path",
                format!(
                    "{reason}; run as the user Synapse runs as (e.g. matrix-synapse), or give that user access"
                ),
            ),
            _ => inaccessible("media_store_path", reason),
        }
    };
    let canonical = std::fs::canonicalize(p).map_err(|e| unusable(e, "cannot be opened"))?;
    if !canonical.is_dir() {
        return Err(invalid(
            "media_store_path",
            format!("{} is not a directory", p.display()),
        ));
    }
    std::fs::read_dir(&canonical).map_err(|e| unusable(e, "is not readable"))?;
    Ok(canonical)
}

/// Parses a human duration (`30d`, `1h 30m`, `500ms`); zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 30s, 5m, 1h, 30d"))?;
    if d.is_zero() {
        return Err(format!("{s:?} must be greater than zero"));
    }
    Ok(d)
}

fn duration(key: &'static str, v: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(v.as_deref().unwrap_or(default)).map_err(|r| invalid(key, r))
}

/// Parses a human size (`16MiB`, `8 MB`, `1048576`).
pub fn parse_size(v: &SizeValue) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(n) => Ok(*n),
        SizeValue::Text(s) => parse_size::parse_size(s.trim())
            .map_err(|e| format!("{s:?} is not a size ({e}); write e.g. 16MiB or 8MB")),
    }
}

#[cfg(test)]
mod tests;
