//! Reading Synapse's own configuration (homeserver.yaml, then conf.d): the media store, the
//! database and the `s3_storage_provider` block, to fill what our config leaves unset, and for the
//! sweep's provider guard ([`crate::sweep::provider`]). Only the keys we need are parsed (unknown
//! keys are ignored; homeserver.yaml has hundreds).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::origin::{KeyLines, describe_yaml_error, yaml_options};
use super::{DurationValue, Origin, Origins, RawConfig, RawDatabase, Secret};

pub const PROVIDER_MODULE: &str = "s3_storage_provider.S3StorageProviderBackend";

#[derive(Debug, thiserror::Error)]
pub enum SynapseConfigError {
    #[error("cannot read Synapse's config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `detail` names the line and key, never the text (homeserver.yaml holds secrets).
    #[error("{detail}")]
    Parse { detail: String },
}

/// The keys of homeserver.yaml we use. Each is optional: conf.d files set some of them.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct HomeserverYaml {
    #[serde(default)]
    pub media_store_path: Option<PathBuf>,
    #[serde(default)]
    pub media_storage_providers: Option<Vec<ProviderEntry>>,
    #[serde(default)]
    pub database: Option<SynapseDatabase>,
    /// File and line of each key above (dotted, e.g. `database.args.host`).
    #[serde(skip)]
    pub origins: Origins,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SynapseDatabase {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub args: DatabaseArgs,
}

/// psycopg2 connection arguments as Synapse passes them (unknown ones, e.g. keepalives, ignored).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DatabaseArgs {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub database: Option<String>,
    pub dbname: Option<String>,
    pub host: Option<String>,
    pub port: Option<PortValue>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Option<DurationValue>,
    pub cp_min: Option<u32>,
    pub cp_max: Option<u32>,
}

/// YAML writes ports as numbers or strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(u16),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProviderEntry {
    #[serde(default)]
    pub module: String,
    #[serde(default)]
    pub store_local: Option<bool>,
    #[serde(default)]
    pub store_remote: Option<bool>,
    #[serde(default)]
    pub store_synchronous: Option<bool>,
    #[serde(default)]
    pub config: ProviderConfig,
}

/// The `config:` block of `s3_storage_provider` (the keys we share; others ignored).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProviderConfig {
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
}

/// One file, read as Synapse (PyYAML) reads it: a duplicate key is no error, the last one wins.
pub fn read(path: &Path) -> Result<HomeserverYaml, SynapseConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| SynapseConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let lines = KeyLines::of(&text);
    let mut hs: HomeserverYaml = serde_saphyr::from_str_with_options(&text, yaml_options())
        .map_err(|e| SynapseConfigError::Parse {
            detail: format!(
                "Synapse's config {}{}",
                path.display(),
                describe_yaml_error(&e, &lines)
            ),
        })?;
    for (key, line) in lines.0 {
        hs.origins.set(
            key,
            Origin::Synapse {
                path: path.to_owned(),
                line,
            },
        );
    }
    Ok(hs)
}

/// homeserver.yaml, then every `*.yaml` of `dir` in file-name order, merged the way Synapse merges
/// several `-c` files: a top-level key of a later file replaces the earlier one.
pub fn read_all(path: &Path, dir: Option<&Path>) -> Result<HomeserverYaml, SynapseConfigError> {
    let mut hs = read(path)?;
    if let Some(dir) = dir {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| SynapseConfigError::Read {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for f in files {
            let more = read(&f)?;
            macro_rules! later_wins {
                ($($key:ident),*) => {$(
                    if more.$key.is_some() {
                        hs.$key = more.$key;
                        hs.origins.replace_under(stringify!($key), &more.origins);
                    }
                )*};
            }
            later_wins!(media_store_path, media_storage_providers, database);
        }
    }
    Ok(hs)
}

/// Fills what `raw` leaves unset from Synapse's config (our own keys win). Returns warnings about
/// provider settings that fight the daemon.
pub fn fill(raw: &mut RawConfig, hs: &HomeserverYaml, origins: &mut Origins) -> Vec<String> {
    let mut warnings = Vec::new();
    let theirs = |key: &str| hs.origins.get(key).cloned();
    if raw.media_store_path.is_none() && hs.media_store_path.is_some() {
        raw.media_store_path = hs.media_store_path.clone();
        if let Some(o) = theirs("media_store_path") {
            origins.set("media_store_path", o);
        }
    }
    if let Some(db) = &hs.database {
        let a = &db.args;
        let from_synapse = RawDatabase {
            // Synapse's default when the block has no name is SQLite, but a block without a
            // name is not a config Synapse writes; leave it to ours (PostgreSQL by default).
            name: (!db.name.is_empty()).then(|| db.name.clone()),
            args: None,
            host: a.host.clone(),
            port: match &a.port {
                Some(PortValue::Number(n)) => Some(*n),
                Some(PortValue::Text(t)) => t.parse().ok(),
                None => None,
            },
            user: a.user.clone(),
            password: a.password.clone(),
            database: a.database.clone(),
            dbname: a.dbname.clone(),
            sslmode: a.sslmode.clone(),
            sslrootcert: a.sslrootcert.clone(),
            connect_timeout: a.connect_timeout.clone(),
            cp_min: a.cp_min,
            cp_max: a.cp_max,
            statement_timeout: None,
        };
        // Key by key, as for s3: a `database:` of ours with only a password (or an env
        // override) keeps Synapse's host, user and database name. Our `args:` counts as ours.
        let mut ours = raw.database.take().unwrap_or_default();
        if let Some(args) = ours.args.take() {
            ours = RawDatabase::over(*args, ours);
        }
        if !ours_sets(&ours, "name")
            && let Some(o) = theirs("database.name")
        {
            origins.set("database.name", o);
        }
        for key in [
            "host",
            "port",
            "user",
            "password",
            "database",
            "dbname",
            "sslmode",
            "sslrootcert",
            "connect_timeout",
        ] {
            if !ours_sets(&ours, key)
                && let Some(o) = theirs(&format!("database.args.{key}"))
            {
                origins.set(format!("database.{key}"), o);
            }
        }
        raw.database = Some(RawDatabase::over(from_synapse, ours));
    }
    match hs.s3_provider() {
        None => warnings.push(format!(
            "Synapse's config has no {PROVIDER_MODULE} in media_storage_providers: Synapse cannot read back media whose local copy the sweep deletes (the sweep refuses to run)"
        )),
        Some(p) => {
            let (c, s3) = (&p.config, &mut raw.s3);
            let provider = theirs("media_storage_providers");
            macro_rules! take {
                ($($f:ident),*) => {$(
                    if s3.$f.is_none() && c.$f.is_some() {
                        s3.$f = c.$f.clone();
                        if let Some(o) = &provider {
                            origins.set(concat!("s3.", stringify!($f)), o.clone());
                        }
                    }
                )*};
            }
            take!(bucket, prefix, endpoint_url, region_name, access_key_id, secret_access_key, session_token, storage_class, sse_customer_key, sse_customer_algo);
            if p.store_local == Some(true) && p.store_synchronous == Some(true) {
                warnings.push(
                    "s3_storage_provider has store_local: true and store_synchronous: true: Synapse also uploads every file during the user's request, which duplicates this daemon's work and slows uploads; set store_local: false, store_remote: false, store_synchronous: false".into(),
                );
            }
        }
    }
    warnings
}

/// Whether our `database:` sets `key` itself.
fn ours_sets(ours: &RawDatabase, key: &str) -> bool {
    match key {
        "name" => ours.name.is_some(),
        "host" => ours.host.is_some(),
        "port" => ours.port.is_some(),
        "user" => ours.user.is_some(),
        "password" => ours.password.is_some(),
        // Either name replaces both of Synapse's (see RawDatabase::over).
        "database" | "dbname" => ours.database.is_some() || ours.dbname.is_some(),
        "sslmode" => ours.sslmode.is_some(),
        "sslrootcert" => ours.sslrootcert.is_some(),
        "connect_timeout" => ours.connect_timeout.is_some(),
        _ => false,
    }
}

impl HomeserverYaml {
    /// The first `s3_storage_provider` entry.
    pub fn s3_provider(&self) -> Option<&ProviderEntry> {
        self.media_storage_providers
            .iter()
            .flatten()
            .find(|p| p.module == PROVIDER_MODULE)
    }
}
