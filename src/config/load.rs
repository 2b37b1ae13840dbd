//! Reading the layers of the config: our file, then `SYNAPSE_S3_OFFLOAD__…` variables over it, then
//! Synapse's files under what is still unset; each value's [`Origin`] is kept for the errors.

use std::path::Path;

use super::origin::{KeyLines, Origin, Origins, describe_yaml_error, yaml_options};
use super::{
    ConfigError, RawConfig, RawDatabase, RawMetrics, RawPrune, RawS3, RawSweep, RawUpload, env,
};

/// The raw config with the origin of every value set, and the warnings found on the way.
#[derive(Debug)]
pub struct Layers {
    pub raw: RawConfig,
    pub origins: Origins,
    pub warnings: Vec<String>,
}

/// Our file, then the environment over it, then Synapse's files under it.
pub fn load_layers(path: &Path) -> Result<Layers, ConfigError> {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with(env::ENV_VAR_PREFIX)
                .then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    load_layers_with_env(path, vars)
}

pub fn load_layers_with_env(
    path: &Path,
    mut vars: Vec<(String, String)>,
) -> Result<Layers, ConfigError> {
    let mut origins = Origins::default();
    let mut raw = read_file(path, &mut origins)?;
    // Only secrets written in the file make its mode matter; secrets from the environment (or
    // from Synapse's files, which are Synapse's business) do not.
    let file_has_secrets = raw.s3.secret_access_key.is_some()
        || raw.s3.session_token.is_some()
        || raw.s3.sse_customer_key.is_some()
        || raw.database.as_ref().is_some_and(|d| d.password.is_some());
    vars.sort();
    for (var, value) in vars {
        let one = env::parse_one(&var, &value).map_err(|e| ConfigError::Env {
            var: var.clone(),
            problem: e.to_string(),
        })?;
        raw.overlay(one);
        if let Some(key) = env::key_of(&var) {
            origins.set(key, Origin::Env { var });
        }
    }
    let mut warnings = import_synapse(&mut raw, &mut origins)?;
    use std::os::unix::fs::PermissionsExt;
    if file_has_secrets
        && let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o044 != 0
    {
        warnings.push(format!(
            "config file {} holds secrets and is readable by other users: chmod 600 {} (and chown it to the user the daemon runs as)",
            path.display(),
            path.display()
        ));
    }
    Ok(Layers {
        raw,
        origins,
        warnings,
    })
}

/// Our file alone (YAML, or TOML when it ends in `.toml`), with the line of each key.
pub fn read_file(path: &Path, origins: &mut Origins) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "toml") {
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's Display quotes the source line; its span gives the line without the text.
            detail: match e.span() {
                Some(s) => format!(
                    "line {}: not valid TOML, or a key or value of the wrong kind (see config/example.yaml)",
                    text[..s.start.min(text.len())].lines().count().max(1)
                ),
                None => "not valid TOML".into(),
            },
        })?;
        for key in raw.keys_set() {
            origins.set(
                key,
                Origin::File {
                    path: path.to_owned(),
                    line: 0,
                },
            );
        }
        return Ok(raw);
    }
    let lines = KeyLines::of(&text);
    let raw: RawConfig =
        serde_saphyr::from_str_with_options(&text, yaml_options()).map_err(|e| {
            ConfigError::Parse {
                path: path.to_owned(),
                detail: describe_yaml_error(&e, &lines).trim_start().into(),
            }
        })?;
    for (key, line) in lines.0 {
        origins.set(
            key,
            Origin::File {
                path: path.to_owned(),
                line,
            },
        );
    }
    Ok(raw)
}

/// Fills unset keys from Synapse's own config when `synapse_config` is set.
fn import_synapse(raw: &mut RawConfig, origins: &mut Origins) -> Result<Vec<String>, ConfigError> {
    let Some(path) = raw.synapse_config.clone() else {
        return Ok(Vec::new());
    };
    let hs =
        super::homeserver::read_all(&path, raw.synapse_config_dir.as_deref()).map_err(|e| {
            ConfigError::Synapse {
                origin: origins.get("synapse_config").cloned(),
                source: e,
            }
        })?;
    Ok(super::homeserver::fill(raw, &hs, origins))
}

/// `overlay`: every key `other` sets replaces ours. Written by destructuring, so a new field that
/// is not listed here does not compile.
macro_rules! overlay_options {
    ($ty:ident { $($f:ident),* $(,)? }) => {
        impl $ty {
            pub fn overlay(&mut self, other: $ty) {
                let $ty { $($f),* } = other;
                $( if $f.is_some() { self.$f = $f; } )*
            }
        }
    };
}

overlay_options!(RawS3 {
    bucket,
    prefix,
    endpoint_url,
    region_name,
    access_key_id,
    secret_access_key,
    session_token,
    storage_class,
    sse_customer_key,
    sse_customer_algo,
    force_path_style,
    request_checksum_calculation,
    response_checksum_validation,
    max_attempts,
    connect_timeout,
    request_timeout,
});
overlay_options!(RawUpload {
    concurrency,
    multipart_threshold,
    multipart_part_size,
    include_url_cache,
    max_backoff,
    settle,
    hold_after_close,
    failed_retry_interval,
    heal_bad_local_copies,
    max_requests_per_second,
});
overlay_options!(RawSweep {
    enabled,
    interval,
    keep_local_for,
    dry_run,
    confirm_synapse_reads_from_bucket,
    max_deletions_per_run,
    concurrency,
    listing,
});
overlay_options!(RawPrune {
    enabled,
    interval,
    grace,
    full_every,
    max_orphan_percent,
    max_deletions_per_run
});
overlay_options!(RawMetrics {
    listen,
    s3_probe_interval
});
overlay_options!(RawDatabase {
    name,
    args,
    host,
    port,
    user,
    password,
    database,
    dbname,
    sslmode,
    sslrootcert,
    connect_timeout,
    cp_min,
    cp_max,
    statement_timeout,
});

impl RawDatabase {
    /// Ours over Synapse's, key by key. `database` and `dbname` name the same thing: whichever
    /// one we set replaces both of Synapse's.
    pub fn over(theirs: RawDatabase, ours: RawDatabase) -> RawDatabase {
        let mut merged = theirs;
        if ours.database.is_some() || ours.dbname.is_some() {
            merged.database = None;
            merged.dbname = None;
        }
        merged.overlay(ours);
        merged
    }
}

impl RawConfig {
    pub fn overlay(&mut self, other: RawConfig) {
        let RawConfig {
            media_store_path,
            state_dir,
            scan_interval,
            scan_interval_when_degraded,
            shutdown_grace,
            s3,
            upload,
            database,
            sweep,
            prune,
            synapse_config,
            metrics,
            synapse_config_dir,
        } = other;
        macro_rules! opt {
            ($($f:ident),*) => {$( if $f.is_some() { self.$f = $f; } )*};
        }
        opt!(
            media_store_path,
            state_dir,
            scan_interval,
            scan_interval_when_degraded,
            shutdown_grace,
            synapse_config,
            synapse_config_dir
        );
        self.s3.overlay(s3);
        self.upload.overlay(upload);
        self.sweep.overlay(sweep);
        self.prune.overlay(prune);
        self.metrics.overlay(metrics);
        self.database = match (self.database.take(), database) {
            (Some(mut a), Some(b)) => {
                a.overlay(b);
                Some(a)
            }
            (a, b) => b.or(a),
        };
    }

    /// The sections this config mentions (for origins where no line is known).
    fn keys_set(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.media_store_path.is_some() {
            keys.push("media_store_path");
        }
        if self.state_dir.is_some() {
            keys.push("state_dir");
        }
        if self.synapse_config.is_some() {
            keys.push("synapse_config");
        }
        if self.database.is_some() {
            keys.push("database");
        }
        keys
    }
}
