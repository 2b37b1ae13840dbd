//! `check` against the real servers: all ✓ when right, the matching ✗ when not, never a secret.

use std::process::Command;

use crate::support::*;

const DB_PASSWORD: &str = "db-password-never-shown";
const SSE_KEY: &str = "sse-c-key-never-shown-0123456789";

fn config(
    env: &S3Env,
    store: &Store,
    bucket: &str,
    secret: &str,
    db: &TestDb,
    db_port: u16,
    media: &std::path::Path,
) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = store.dir.path().join(format!("check{n}.yaml"));
    write_yaml(
        &path,
        &format!(
            "media_store_path: {}\nstate_dir: {}\ns3:\n  bucket: {bucket}\n  endpoint_url: {}\n  region_name: us-east-1\n  access_key_id: {}\n  secret_access_key: {secret}\n  sse_customer_key: {SSE_KEY}\n  max_attempts: 1\ndatabase:\n  host: {}\n  port: {db_port}\n  user: {}\n  password: {DB_PASSWORD}\n  database: {}\n  sslmode: disable\n  connect_timeout: 2\nsweep:\n  confirm_synapse_reads_from_bucket: true\n",
            media.display(),
            store.state.display(),
            env.endpoint,
            env.access_key,
            db.host,
            db.user,
            db.name
        ),
    );
    path
}

fn check(cfg: &std::path::Path) -> (i32, String) {
    check_env(cfg, &[])
}

fn check_env(cfg: &std::path::Path, vars: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(cfg)
        .arg("check")
        .envs(vars.iter().copied())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [
        DB_PASSWORD,
        SSE_KEY,
        "sso-test-secret",
        "wrong-secret-value",
    ] {
        assert!(!all.contains(secret), "a secret leaked: {all}");
    }
    (out.status.code().unwrap_or(-1), all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_and_names_each_failure() {
    let env = s3_env();
    let bucket = create_bucket(&env, "check").await;
    let store = Store::new();
    let db = TestDb::create().await;
    store.write("local_content/ab/cd/ef", b"x");
    std::fs::create_dir(&store.state).unwrap();

    let good = config(
        &env,
        &store,
        &bucket,
        &env.secret_key,
        &db,
        db.port,
        &store.root,
    );
    let (code, out) = tokio::task::block_in_place(|| check(&good));
    assert_eq!(code, 0, "{out}");
    for what in [
        "config",
        "S3 bucket",
        "S3 read/write",
        "PostgreSQL",
        "media store",
        "inotify",
        "state_dir",
        "sweep safety",
    ] {
        assert!(out.contains(&format!("✓ {what}")), "{what} not ✓:\n{out}");
    }
    assert!(!out.contains('✗'), "{out}");
    assert!(
        list_sizes(&env, &bucket).await.is_empty(),
        "the probe object was removed"
    );

    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (
            config(
                &env,
                &store,
                &bucket,
                "wrong-secret-value",
                &db,
                db.port,
                &store.root,
            ),
            "✗ S3 bucket",
        ),
        (
            config(
                &env,
                &store,
                "no-such-bucket-check",
                &env.secret_key,
                &db,
                db.port,
                &store.root,
            ),
            "✗ S3 bucket",
        ),
        (
            config(&env, &store, &bucket, &env.secret_key, &db, 1, &store.root),
            "✗ PostgreSQL",
        ),
    ];
    for (cfg, want) in cases {
        let (code, out) = tokio::task::block_in_place(|| check(&cfg));
        assert_ne!(code, 0, "{out}");
        assert!(out.contains(want), "{want} expected:\n{out}");
    }

    // A read-only media store (root ignores permission bits, so mount one read-only).
    let ro = store.dir.path().join("ro-media");
    std::fs::create_dir(&ro).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a read-only tmpfs (needs root)"
    );
    let cfg = config(&env, &store, &bucket, &env.secret_key, &db, db.port, &ro);
    let (code, out) = tokio::task::block_in_place(|| check(&cfg));
    let _ = Command::new("umount").arg(&ro).status();
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("✗ media store"), "{out}");
}

/// A homeserver.yaml for the test servers, as an admin has it: the provider block and
/// database.args.
fn homeserver_yaml(env: &S3Env, store: &Store, bucket: &str, db: &TestDb) -> std::path::PathBuf {
    let path = store.dir.path().join("homeserver.yaml");
    write_yaml(
        &path,
        &format!(
            "server_name: example.com\nmedia_store_path: {}\ndatabase:\n  name: psycopg2\n  args:\n    user: {}\n    password: {DB_PASSWORD}\n    dbname: {}\n    host: {}\n    port: {}\n    sslmode: disable\n    cp_min: 5\nmedia_storage_providers:\n- module: s3_storage_provider.S3StorageProviderBackend\n  store_local: false\n  store_remote: false\n  store_synchronous: false\n  config:\n    bucket: {bucket}\n    endpoint_url: {}\n    region_name: us-east-1\n    access_key_id: {}\n    secret_access_key: {}\n",
            store.root.display(),
            db.user,
            db.name,
            db.host,
            db.port,
            env.endpoint,
            env.access_key,
            env.secret_key,
        ),
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_example_passes_check_next_to_a_synapse_config() {
    let env = s3_env();
    let bucket = create_bucket(&env, "example").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let hs = homeserver_yaml(&env, &store, &bucket, &db);
    // The example byte for byte; only where Synapse's config and our state live differ from the
    // defaults it names, given as environment overrides.
    let cfg = store.dir.path().join("config.yaml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.yaml"),
        &cfg,
    )
    .unwrap();
    let hs = hs.display().to_string();
    let state = store.state.display().to_string();
    std::fs::create_dir(&store.state).unwrap();
    let vars = [
        ("SYNAPSE_S3_OFFLOAD__SYNAPSE_CONFIG", hs.as_str()),
        ("SYNAPSE_S3_OFFLOAD__STATE_DIR", state.as_str()),
    ];
    let (code, out) = tokio::task::block_in_place(|| check_env(&cfg, &vars));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains('✗'), "{out}");
    for what in [
        "config",
        "S3 read/write",
        "PostgreSQL",
        "media store",
        "sweep safety",
    ] {
        assert!(out.contains(&format!("✓ {what}")), "{what} not ✓:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_a_bad_config_still_checks_what_it_can_and_creates_no_state_dir() {
    let env = s3_env();
    let bucket = create_bucket(&env, "badcfg").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let missing = store.dir.path().join("no-such-media");
    let cfg = config(
        &env,
        &store,
        &bucket,
        &env.secret_key,
        &db,
        db.port,
        &missing,
    );
    let (code, out) = tokio::task::block_in_place(|| check(&cfg));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("✗ config: config key `media_store_path` (from ")
            && out.contains("does not exist"),
        "{out}"
    );
    for what in ["S3 bucket", "S3 read/write", "PostgreSQL"] {
        assert!(out.contains(&format!("✓ {what}")), "{what} not ✓:\n{out}");
    }
    assert!(out.contains("error: 1 check failed"), "{out}");
    // state_dir did not exist: said so, not created.
    let cfg = config(
        &env,
        &store,
        &bucket,
        &env.secret_key,
        &db,
        db.port,
        &store.root,
    );
    let (_, out) = tokio::task::block_in_place(|| check(&cfg));
    assert!(
        out.contains("! state_dir:") && out.contains("does not exist"),
        "{out}"
    );
    assert!(!store.state.exists(), "check created state_dir");
    let status = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && err.contains("does not exist"),
        "{err}"
    );
    assert!(!store.state.exists(), "status created state_dir");
}
