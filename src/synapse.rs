//! What Synapse's own configuration says about reading media back from the bucket.
//!
//! Deleting a local copy is safe only if Synapse can fetch the file from the bucket again, through
//! `s3_storage_provider` configured with the same bucket, prefix and endpoint as ours. Only the
//! keys we need are parsed (unknown keys are ignored; homeserver.yaml has hundreds).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::S3Config;

pub const PROVIDER_MODULE: &str = "s3_storage_provider.S3StorageProviderBackend";

#[derive(Debug, thiserror::Error)]
pub enum SynapseConfigError {
    #[error("cannot read synapse_config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("synapse_config {path} is not valid YAML: {detail}")]
    Parse { path: PathBuf, detail: String },
}

#[derive(Debug, Default, Deserialize)]
pub struct HomeserverYaml {
    #[serde(default)]
    pub media_store_path: Option<PathBuf>,
    #[serde(default)]
    pub media_storage_providers: Vec<ProviderEntry>,
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

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProviderConfig {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint_url: Option<String>,
}

pub fn read(path: &Path) -> Result<HomeserverYaml, SynapseConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| SynapseConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| SynapseConfigError::Parse {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

impl HomeserverYaml {
    /// The first `s3_storage_provider` entry.
    pub fn s3_provider(&self) -> Option<&ProviderEntry> {
        self.media_storage_providers
            .iter()
            .find(|p| p.module == PROVIDER_MODULE)
    }
}

fn norm_endpoint(e: Option<&str>) -> Option<String> {
    e.filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('/').to_ascii_lowercase())
}

/// Whether Synapse (per `hs`) reads back from the bucket we upload to. `Err` explains the mismatch.
pub fn reads_from_our_bucket(hs: &HomeserverYaml, s3: &S3Config) -> Result<(), String> {
    let Some(p) = hs.s3_provider() else {
        return Err(format!(
            "Synapse has no {PROVIDER_MODULE} in media_storage_providers, so it could not serve media whose local copy was deleted; add it (see README) before sweeping"
        ));
    };
    let theirs = (
        p.config.bucket.clone().unwrap_or_default(),
        p.config.prefix.clone().unwrap_or_default(),
        norm_endpoint(p.config.endpoint_url.as_deref()),
    );
    let ours = (
        s3.bucket.clone(),
        s3.prefix.clone(),
        norm_endpoint(s3.endpoint_url.as_deref()),
    );
    if theirs != ours {
        return Err(format!(
            "Synapse's s3_storage_provider reads bucket {:?}, prefix {:?}, endpoint {:?}, but we upload to bucket {:?}, prefix {:?}, endpoint {:?}; make them the same before sweeping",
            theirs.0, theirs.1, theirs.2, ours.0, ours.1, ours.2
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str, endpoint: Option<&str>) -> S3Config {
        let raw = crate::config::RawS3 {
            bucket: Some(bucket.into()),
            prefix: Some(prefix.into()),
            endpoint_url: endpoint.map(Into::into),
            ..Default::default()
        };
        crate::config::validate_s3_for_tests(raw)
    }

    const HS: &str = r#"
server_name: example.com
media_store_path: /var/lib/matrix-synapse/media
database:
  name: psycopg2
  args: {user: synapse, database: synapse}
media_storage_providers:
- module: file_system
  store_local: true
  config: {directory: /mnt/backup}
- module: s3_storage_provider.S3StorageProviderBackend
  store_local: false
  store_remote: false
  store_synchronous: false
  config:
    bucket: media
    prefix: "syn/"
    endpoint_url: https://S3.example.com/
    access_key_id: x
"#;

    #[test]
    fn finds_the_provider_and_compares() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("homeserver.yaml");
        std::fs::write(&p, HS).unwrap();
        let hs = read(&p).unwrap();
        assert_eq!(hs.s3_provider().unwrap().store_local, Some(false));
        reads_from_our_bucket(&hs, &s3("media", "syn/", Some("https://s3.example.com"))).unwrap();
        let err = reads_from_our_bucket(&hs, &s3("media", "", Some("https://s3.example.com")))
            .unwrap_err();
        assert!(err.contains("prefix"), "{err}");
        assert!(
            reads_from_our_bucket(&HomeserverYaml::default(), &s3("media", "", None))
                .unwrap_err()
                .contains("no s3_storage_provider")
        );
    }
}
