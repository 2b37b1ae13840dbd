//! The binary as an admin runs it: exit status and one clear line for each bad input, never a
//! secret in the output.

use std::process::Command;

use crate::support::*;

const SECRET: &str = "sso-test-secret";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(config: &std::path::Path, env: &[(&str, &str)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(config)
        .arg("upload")
        .envs(env.iter().copied())
        // Never let the SDK look for credentials or a region on an instance-metadata endpoint.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn yaml(store: &Store, endpoint: &str, bucket: &str, secret: &str) -> String {
    config_yaml(
        store,
        endpoint,
        bucket,
        ("sso-test-key", secret),
        "  max_attempts: 1\n",
        "",
    )
}

/// Fails with exit 1 and a single `error:` line containing each of `needles`, and no secret.
fn assert_clear_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 1, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    let errors: Vec<_> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", r.stderr);
    for n in needles {
        assert!(errors[0].contains(n), "{:?} lacks {n:?}", errors[0]);
    }
    for secret in [SECRET, "wrong-secret-value"] {
        assert!(
            !r.stderr.contains(secret) && !r.stdout.contains(secret),
            "secret leaked: {}",
            r.stderr
        );
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[tokio::test]
async fn a_good_config_uploads_and_exits_zero() {
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("cliok", b"hello").await;
    write_yaml(&cfg, &yaml(&store, &env.endpoint, &bucket, &env.secret_key));
    let r = run(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("uploaded 1"), "{}", r.stdout);
    // Env overrides reach nested snake_case keys.
    let other = create_bucket(&env, "clienv").await;
    let r = run(
        &cfg,
        &[
            ("SYNAPSE_S3_OFFLOAD__S3__BUCKET", &other),
            (
                "SYNAPSE_S3_OFFLOAD__STATE_DIR",
                "/tmp/sso-test-env-state-ignored",
            ),
        ],
    );
    let _ = std::fs::remove_dir_all("/tmp/sso-test-env-state-ignored");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        objects(&env, &other)
            .await
            .contains_key("local_content/ab/cd/ef")
    );
}

#[tokio::test]
async fn bad_inputs_each_give_one_clear_line() {
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("clibad", b"hello").await;
    let good = yaml(&store, &env.endpoint, &bucket, SECRET);

    write_yaml(
        &cfg,
        &yaml(&store, &env.endpoint, &bucket, "wrong-secret-value"),
    );
    assert_clear_error(&run(&cfg, &[]), &["403", "s3.secret_access_key"]);

    write_yaml(
        &cfg,
        &yaml(&store, &env.endpoint, "no-such-bucket-here", SECRET),
    );
    assert_clear_error(&run(&cfg, &[]), &["no-such-bucket-here", "s3.bucket"]);

    write_yaml(&cfg, &yaml(&store, "http://127.0.0.1:9", &bucket, SECRET));
    assert_clear_error(&run(&cfg, &[]), &["cannot connect", "s3.endpoint_url"]);

    write_yaml(
        &cfg,
        &good.replace(&store.root.display().to_string(), "/nonexistent/media"),
    );
    assert_clear_error(&run(&cfg, &[]), &["media_store_path", "/nonexistent/media"]);

    write_yaml(&cfg, &format!("{good}  bukket: x\n"));
    assert_clear_error(
        &run(&cfg, &[]),
        &["unknown key `bukket`", "line 10, key `s3.bukket`"],
    );

    write_yaml(&cfg, "media_store_path: [unclosed\n");
    assert_clear_error(&run(&cfg, &[]), &["config.yaml", "not valid YAML"]);

    // A typo'd environment variable names the variable, not the file.
    write_yaml(&cfg, &good);
    assert_clear_error(
        &run(&cfg, &[("SYNAPSE_S3_OFFLOAD__S3__BUKET", "x")]),
        &[
            "environment variable SYNAPSE_S3_OFFLOAD__S3__BUKET",
            "`buket`",
        ],
    );

    write_yaml(&cfg, &format!("{good}upload:\n  concurrency: many\n"));
    assert_clear_error(&run(&cfg, &[]), &["upload.concurrency"]);

    write_yaml(
        &cfg,
        &format!("{good}upload:\n  multipart_threshold: huge\n"),
    );
    assert_clear_error(&run(&cfg, &[]), &["upload.multipart_threshold", "16MiB"]);

    write_yaml(
        &cfg,
        &good
            .replace("us-east-1", "us-east-1\n  endpoint_url: not a url")
            .replacen(&format!("  endpoint_url: {}\n", env.endpoint), "", 1),
    );
    assert_clear_error(&run(&cfg, &[]), &["s3.endpoint_url"]);

    write_yaml(
        &cfg,
        &good.replace(&format!("bucket: {bucket}"), "bucket: my/bucket"),
    );
    assert_clear_error(&run(&cfg, &[]), &["s3.bucket", "s3.prefix"]);

    assert_clear_error(
        &run(&store.dir.path().join("missing.yaml"), &[]),
        &["cannot read config file", "missing.yaml"],
    );

    // Nothing was uploaded or recorded by any of these.
    assert!(objects(&env, &bucket).await.is_empty());
}

#[tokio::test]
async fn a_corrupted_state_database_is_refused_with_the_recovery_steps() {
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("corrupt", b"hello").await;
    write_yaml(&cfg, &yaml(&store, &env.endpoint, &bucket, SECRET));
    assert_eq!(run(&cfg, &[]).code, 0);
    let db = store.state.join("state.redb");
    // Garbage over the middle of the file (its pages), and a file that is not redb at all.
    let mut bytes_ = std::fs::read(&db).unwrap();
    let mid = bytes_.len() / 4;
    for b in &mut bytes_[mid..] {
        *b = 0xff;
    }
    for content in [bytes_, b"not a database at all".repeat(100)] {
        std::fs::write(&db, &content).unwrap();
        let r = run(&cfg, &[]);
        assert_eq!(r.code, 1, "a clear refusal, not a crash: {}", r.stderr);
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            line.contains("state.redb") && line.contains("move it aside"),
            "{}",
            r.stderr
        );
        assert_eq!(
            std::fs::read(&db).unwrap(),
            content,
            "the broken file is left for inspection"
        );
    }
    // The documented recovery: move it aside and upload again; nothing is uploaded twice.
    std::fs::rename(&db, store.state.join("state.redb.broken")).unwrap();
    let r = run(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("uploaded 0") && r.stdout.contains("already in bucket 1"),
        "{}",
        r.stdout
    );
}

/// `upload` as root on a store that belongs to Synapse's user would leave a root-owned state_dir
/// that the service cannot use: refused before anything is created, with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_against_a_store_owned_by_another_user_is_refused_with_advice() {
    if unsafe { libc::geteuid() } != 0 {
        return; // Only root can be root.
    }
    let env = s3_env();
    let bucket = create_bucket(&env, "root").await;
    let store = Store::new();
    let cfg = store.dir.path().join("c.yaml");
    write_yaml(&cfg, &yaml(&store, &env.endpoint, &bucket, &env.secret_key));
    std::os::unix::fs::chown(&store.root, Some(65534), Some(65534)).unwrap();
    let r = tokio::task::block_in_place(|| run(&cfg, &[]));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("running as root") && r.stderr.contains("chown -R"),
        "{}",
        r.stderr
    );
    assert!(!store.state.exists(), "state_dir created by root");
    // A root-owned state_dir says root is the daemon's user (a container): allowed.
    std::fs::create_dir(&store.state).unwrap();
    let r = tokio::task::block_in_place(|| run(&cfg, &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// The binary's allocator options (`malloc_conf` in `src/main.rs`) are read and valid: jemalloc
/// ignores an unknown or misspelt option with only a line on stderr, and a symbol renamed by a
/// tikv-jemallocator upgrade would drop all of them silently (RSS back to ~60 MB).
#[test]
fn the_allocator_reads_our_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "confirm_conf:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for option in [
        "narenas:2",
        "dirty_decay_ms:100",
        "muzzy_decay_ms:0",
        "tcache_max:1024",
    ] {
        assert!(
            stderr.contains(&format!("Set conf value: {option}")),
            "{option} not applied:\n{stderr}"
        );
    }
    assert!(!stderr.contains("Invalid conf"), "{stderr}");
}
