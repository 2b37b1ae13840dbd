//! Adopting Synapse's own config: `synapse_config` (+ conf.d) fills media path, database and S3.

use synapse_s3_offload::config::{self, SslMode};

use crate::support::*;

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synapse")
}

/// Writes our config with `extra` and loads it; the media path is replaced by a real directory.
fn load(extra: &str, conf_d: bool) -> Result<config::Config, config::ConfigError> {
    let store = Store::new();
    let hs = std::fs::read_to_string(fixture_dir().join("homeserver.yaml"))
        .unwrap()
        .replace(
            "/var/lib/matrix-synapse/media",
            &store.root.display().to_string(),
        );
    let hs_path = store.dir.path().join("homeserver.yaml");
    std::fs::write(&hs_path, hs).unwrap();
    let cfg = store.dir.path().join("offload.yaml");
    let dir = if conf_d {
        format!(
            "synapse_config_dir: {}\n",
            fixture_dir().join("conf.d").display()
        )
    } else {
        String::new()
    };
    write_yaml(
        &cfg,
        &format!(
            "synapse_config: {}\n{dir}state_dir: {}\n{extra}",
            hs_path.display(),
            store.state.display()
        ),
    );
    let r = config::load(&cfg);
    drop(store);
    r
}

#[test]
fn homeserver_yaml_and_conf_d_fill_everything() {
    let c = load("", true).unwrap();
    assert_eq!(c.s3.bucket, "synapse-media");
    assert_eq!(c.s3.prefix, "media/");
    assert_eq!(
        c.s3.endpoint_url.as_deref(),
        Some("https://s3.eu-central-1.wasabisys.com")
    );
    assert_eq!(c.s3.region_name.as_deref(), Some("eu-central-1"));
    assert_eq!(c.s3.access_key_id.as_deref(), Some("AKEXAMPLEKEY"));
    assert_eq!(
        c.s3.secret_access_key.as_ref().unwrap().expose(),
        "provider-secret-key"
    );
    assert_eq!(c.s3.storage_class.as_deref(), Some("STANDARD_IA"));
    let db = c.database.expect("psycopg2 from conf.d overrides sqlite3");
    assert_eq!(
        (
            db.host.as_str(),
            db.port,
            db.user.as_str(),
            db.dbname.as_str()
        ),
        ("/var/run/postgresql", 5433, "synapse_user", "synapse")
    );
    assert!(db.is_socket());
    assert_eq!(db.password.unwrap().expose(), "db-secret-password");
    assert_eq!(db.sslmode, SslMode::Prefer);
    assert!(!c.synapse_uses_sqlite);
    // store_local + store_synchronous: true fights the daemon.
    assert!(
        c.warnings.iter().any(|w| w.contains("store_synchronous")),
        "{:?}",
        c.warnings
    );
    assert!(!format!("{:?}", c.s3).contains("provider-secret-key"));
}

#[test]
fn our_keys_win() {
    let c = load("s3:\n  bucket: our-bucket\n  prefix: ''\ndatabase:\n  host: 127.0.0.1\n  database: other\n", true).unwrap();
    assert_eq!(c.s3.bucket, "our-bucket");
    assert_eq!(c.s3.prefix, "");
    assert_eq!(
        c.s3.endpoint_url.as_deref(),
        Some("https://s3.eu-central-1.wasabisys.com"),
        "unset keys still come from Synapse"
    );
    let db = c.database.unwrap();
    assert_eq!(
        (db.host.as_str(), db.dbname.as_str()),
        ("127.0.0.1", "other")
    );
}

#[test]
fn sqlite_and_a_missing_provider_are_explained() {
    // homeserver.yaml alone: SQLite and no provider.
    let err = load("", false).unwrap_err().to_string();
    assert!(err.contains("s3.bucket"), "no bucket anywhere: {err}");
    let c = load("s3:\n  bucket: b-ucket\n", false).unwrap();
    assert!(c.synapse_uses_sqlite && c.database.is_none());
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("no s3_storage_provider")),
        "{:?}",
        c.warnings
    );
    let err = synapse_s3_offload::sweep::SweepError::Sqlite.to_string();
    assert!(err.contains("PostgreSQL") && err.contains("upload and run still work"));
}

#[test]
fn a_config_with_secrets_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let store = Store::new();
    let cfg = store.dir.path().join("c.yaml");
    write_yaml(
        &cfg,
        &format!(
            "media_store_path: {}\nstate_dir: /tmp/x-state\ns3:\n  bucket: b-ucket\n  access_key_id: a\n  secret_access_key: s\n",
            store.root.display()
        ),
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = config::load(&cfg).unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("chmod 600")),
        "{:?}",
        c.warnings
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(config::load(&cfg).unwrap().warnings.is_empty());
}
