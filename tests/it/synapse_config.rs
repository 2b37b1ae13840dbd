//! Adopting Synapse's own config: `synapse_config` (+ conf.d) fills media path, database and S3.

use synapse_s3_offload::config::{self, DatabaseConfig, PostgresConfig, SslMode};

use crate::support::*;

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synapse")
}

/// The PostgreSQL database of a config, or a panic naming what it was.
fn pg(db: Option<DatabaseConfig>) -> PostgresConfig {
    match db {
        Some(DatabaseConfig::Postgres(p)) => p,
        other => panic!("expected PostgreSQL, got {other:?}"),
    }
}

/// Writes our config with `extra` and loads it; the media path is replaced by a real directory.
fn load(extra: &str, conf_d: bool) -> Result<config::Config, config::ConfigError> {
    load_env(extra, conf_d, &[])
}

fn load_env(
    extra: &str,
    conf_d: bool,
    vars: &[(&str, &str)],
) -> Result<config::Config, config::ConfigError> {
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
    let r = config::load_with_env(&cfg, vars);
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
    let db = pg(c.database); // psycopg2 from conf.d overrides sqlite3
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
    let db = pg(c.database);
    assert_eq!(
        (db.host.as_str(), db.dbname.as_str()),
        ("127.0.0.1", "other")
    );
}

#[test]
fn sqlite_is_adopted_and_a_missing_provider_is_explained() {
    // homeserver.yaml alone: SQLite and no provider.
    let err = load("", false).unwrap_err().to_string();
    assert!(err.contains("s3.bucket"), "no bucket anywhere: {err}");
    let c = load("s3:\n  bucket: b-ucket\n", false).unwrap();
    match &c.database {
        Some(DatabaseConfig::Sqlite(s)) => assert_eq!(
            s.path,
            std::path::Path::new("/var/lib/matrix-synapse/homeserver.db")
        ),
        other => panic!("Synapse's sqlite3 block: {other:?}"),
    }
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("no s3_storage_provider")),
        "{:?}",
        c.warnings
    );
    // A PostgreSQL key of ours beside Synapse's SQLite names the clash.
    let err = load(
        "s3:\n  bucket: b-ucket\ndatabase:\n  host: 127.0.0.1\n",
        false,
    )
    .unwrap_err();
    let err = synapse_s3_offload::Chain(&err).to_string();
    assert!(
        err.contains("database.host") && err.contains("sqlite3"),
        "{err}"
    );
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

#[test]
fn a_partial_database_section_or_env_override_merges_key_by_key_with_synapses() {
    // Only a password of ours: host, port, user and database name stay Synapse's.
    let c = load("database:\n  password: our-password\n", true).unwrap();
    let db = pg(c.database);
    assert_eq!(
        (
            db.host.as_str(),
            db.port,
            db.user.as_str(),
            db.dbname.as_str()
        ),
        ("/var/run/postgresql", 5433, "synapse_user", "synapse")
    );
    assert_eq!(db.password.unwrap().expose(), "our-password");
    // Our `dbname` replaces Synapse's `database` (the same key under psycopg2's other name).
    let db = pg(load("database:\n  dbname: other\n", true).unwrap().database);
    assert_eq!(
        (db.dbname.as_str(), db.user.as_str()),
        ("other", "synapse_user")
    );
    // An environment override alone merges too.
    let db = pg(load_env(
        "",
        true,
        &[("SYNAPSE_S3_OFFLOAD__DATABASE__PASSWORD", "00123")],
    )
    .unwrap()
    .database);
    assert_eq!(db.password.unwrap().expose(), "00123");
    assert_eq!(db.dbname, "synapse");
}

#[test]
fn a_bad_value_from_homeserver_yaml_is_named_as_synapses() {
    // Docker's media path, which does not exist here: the error says it came from Synapse's file
    // (our file has no media_store_path).
    let store = Store::new();
    let hs_path = store.dir.path().join("homeserver.yaml");
    std::fs::write(
        &hs_path,
        "server_name: x\nmedia_store_path: /data/media_store\n",
    )
    .unwrap();
    let cfg = store.dir.path().join("offload.yaml");
    write_yaml(
        &cfg,
        &format!(
            "synapse_config: {}\ns3:\n  bucket: b-ucket\n",
            hs_path.display()
        ),
    );
    let err = config::load_with_env(&cfg, &[]).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "`media_store_path` (from Synapse's config {} line 2)",
            hs_path.display()
        )) && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn duplicate_keys_in_homeserver_yaml_are_read_as_synapse_does_and_never_printed() {
    let store = Store::new();
    let hs_path = store.dir.path().join("homeserver.yaml");
    // PyYAML accepts duplicates, the last one winning; a harmless duplicate below a secret.
    std::fs::write(
        &hs_path,
        format!(
            "media_store_path: {}\nmax_upload_size: 50M\ndatabase:\n  name: psycopg2\n  args:\n    password: first-db-secret\n    password: second-db-secret\n    database: synapse\nmax_upload_size: 100M\nmedia_storage_providers:\n- module: s3_storage_provider.S3StorageProviderBackend\n  config:\n    bucket: b-ucket\n    secret_access_key: s3-first-secret\n    secret_access_key: s3-second-secret\n    access_key_id: a\n",
            store.root.display()
        ),
    )
    .unwrap();
    let cfg = store.dir.path().join("offload.yaml");
    write_yaml(&cfg, &format!("synapse_config: {}\n", hs_path.display()));
    let c = config::load_with_env(&cfg, &[]).unwrap();
    assert_eq!(
        pg(c.database).password.unwrap().expose(),
        "second-db-secret"
    );
    assert_eq!(c.s3.secret_access_key.unwrap().expose(), "s3-second-secret");
    // A value of the wrong kind in Synapse's file: file, line and key, no text of it.
    let text = std::fs::read_to_string(&hs_path).unwrap();
    std::fs::write(
        &hs_path,
        text.replace(
            "    database: synapse\n",
            "    database: synapse\n    port: [first-db-secret]\n",
        ),
    )
    .unwrap();
    let err = config::load_with_env(&cfg, &[]).unwrap_err();
    let shown = format!("{:#}", anyhow::Error::from(err));
    assert!(
        shown.contains(&format!(
            "{} line 9, key `database.args.port`",
            hs_path.display()
        )),
        "{shown}"
    );
    for secret in ["first-db-secret", "second-db-secret", "s3-first-secret"] {
        assert!(!shown.contains(secret), "{shown}");
    }
}
