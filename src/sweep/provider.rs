//! The sweep's provider guard: deleting a local copy is safe only if Synapse can fetch the file
//! from the bucket again, through `s3_storage_provider` configured with the same bucket, prefix and
//! endpoint as ours, and the same SSE-C key and algorithm. Synapse's config is read by
//! [`crate::config::homeserver`]; what it must say before we delete is decided here.

use super::SweepError;
use crate::config::homeserver::{HomeserverYaml, PROVIDER_MODULE, ProviderConfig};
use crate::config::{Config, S3Config, Secret};

/// Refuses to delete anything unless Synapse can read media back from our bucket.
pub fn check_provider(config: &Config) -> Result<(), SweepError> {
    match &config.synapse_config {
        Some(path) => {
            let hs = crate::config::homeserver::read_all(path, config.synapse_config_dir.as_deref())
                .map_err(|e| SweepError::Unsafe(crate::Chain(&e).to_string()))?;
            reads_from_our_bucket(&hs, &config.s3).map_err(SweepError::Unsafe)
        }
        None if config.sweep.confirm_synapse_reads_from_bucket => Ok(()),
        None => Err(SweepError::Unsafe(
            "deleting local copies makes media unavailable unless Synapse reads them back from the bucket; set synapse_config (checked automatically) or sweep.confirm_synapse_reads_from_bucket: true once s3_storage_provider is configured with the same bucket and prefix".into(),
        )),
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
        let endpoint = |e: &Option<String>| e.clone().unwrap_or_else(|| "AWS S3 (none set)".into());
        return Err(format!(
            "Synapse's s3_storage_provider reads bucket {}, prefix {:?}, endpoint {}, but we upload to bucket {}, prefix {:?}, endpoint {}; make them the same before sweeping",
            theirs.0,
            theirs.1,
            endpoint(&theirs.2),
            ours.0,
            ours.1,
            endpoint(&ours.2)
        ));
    }
    same_sse_c(&p.config, s3)
}

/// Objects written with an SSE-C key can only be read with that key (and algorithm), and a
/// request with a key for an object stored without one fails: Synapse's side must match ours
/// exactly. The keys are compared, never printed.
fn same_sse_c(theirs: &ProviderConfig, s3: &S3Config) -> Result<(), String> {
    let their_key = theirs.sse_customer_key.as_ref().map(Secret::expose);
    let our_key = s3.sse_customer_key.as_ref().map(Secret::expose);
    let fix = "Synapse could not read back media whose local copy the sweep deletes; set the same sse_customer_key and sse_customer_algo in both (or leave both out) before sweeping";
    match (their_key, our_key) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(format!(
            "we upload with SSE-C (s3.sse_customer_key) but Synapse's s3_storage_provider has no sse_customer_key: {fix}"
        )),
        (Some(_), None) => Err(format!(
            "Synapse's s3_storage_provider reads with an SSE-C key (sse_customer_key) but we upload without one (s3.sse_customer_key): {fix}"
        )),
        (Some(a), Some(b)) if a != b => Err(format!(
            "Synapse's s3_storage_provider and we use different SSE-C keys (sse_customer_key; neither is shown): {fix}"
        )),
        (Some(_), Some(_)) => {
            // s3_storage_provider's default algorithm, as ours.
            let their_algo = theirs.sse_customer_algo.as_deref().unwrap_or("AES256");
            if their_algo == s3.sse_customer_algo {
                Ok(())
            } else {
                Err(format!(
                    "Synapse's s3_storage_provider uses sse_customer_algo {their_algo:?}, we use {:?}: {fix}",
                    s3.sse_customer_algo
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::homeserver::{ProviderEntry, read};

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

    /// An SSE-C key or algorithm that differs from Synapse's makes every swept media unreadable
    /// to Synapse: refused, with neither key in the message.
    #[test]
    fn compares_sse_c_without_printing_the_keys() {
        const OURS: &str = "k3yOURSk3yOURSk3yOURSk3yOURS0123";
        const THEIRS: &str = "k3yTHEIRSk3yTHEIRSk3yTHEIRS01234";
        let hs = |key: Option<&str>, algo: Option<&str>| HomeserverYaml {
            media_storage_providers: Some(vec![ProviderEntry {
                module: PROVIDER_MODULE.into(),
                store_local: None,
                store_remote: None,
                store_synchronous: None,
                config: ProviderConfig {
                    bucket: Some("media".into()),
                    sse_customer_key: key.map(Secret::new),
                    sse_customer_algo: algo.map(Into::into),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        };
        let ours = |key: Option<&str>| {
            let mut c = s3("media", "", None);
            c.sse_customer_key = key.map(Secret::new);
            c
        };
        reads_from_our_bucket(&hs(None, None), &ours(None)).unwrap();
        reads_from_our_bucket(&hs(Some(OURS), None), &ours(Some(OURS))).unwrap();
        reads_from_our_bucket(&hs(Some(OURS), Some("AES256")), &ours(Some(OURS))).unwrap();
        // Without a key, the algorithm is not used.
        reads_from_our_bucket(&hs(None, Some("aws:kms")), &ours(None)).unwrap();
        for (theirs, algo, mine) in [
            (Some(THEIRS), None, Some(OURS)),
            (None, None, Some(OURS)),
            (Some(THEIRS), None, None),
            (Some(OURS), Some("AES128"), Some(OURS)),
        ] {
            let e = reads_from_our_bucket(&hs(theirs, algo), &ours(mine)).unwrap_err();
            assert!(e.contains("sse_customer"), "{e}");
            assert!(
                !e.contains(OURS) && !e.contains(THEIRS),
                "a key printed: {e}"
            );
        }
    }

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
        assert!(!err.contains("Some("), "no programmer output: {err}");
        assert!(
            reads_from_our_bucket(&HomeserverYaml::default(), &s3("media", "", None))
                .unwrap_err()
                .contains("no s3_storage_provider")
        );
    }
}
