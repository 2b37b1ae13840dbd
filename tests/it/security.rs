//! Security (DESIGN.md invariants 5 and 6): no secret in any output or /metrics, at any log
//! level; nothing outside media_store_path read or deleted, whatever the database or the
//! filesystem says.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use synapse_s3_offload::layout::MediaPath;
use synapse_s3_offload::state::State;
use synapse_s3_offload::upload::s3::ObjectStore;
use synapse_s3_offload::upload::{Outcome, Uploader};
use tokio_util::sync::CancellationToken;

use crate::metrics::get;
use crate::support::*;

// Two of each secret: the one in the config file and the one that overrides it from the
// environment. The S3 secret itself must be the server's (it is checked below too).
const YAML_TOKEN: &str = "yaml-session-token-1f0e";
const ENV_TOKEN: &str = "env-session-token-2a9c";
const YAML_SSE: &str = "yamlSSECkey-0123456789abcdefghij";
const ENV_SSE: &str = "envSSECkey-0123456789abcdefghijk";
const YAML_DB_PASSWORD: &str = "yaml-db-password-7b3d";
const ENV_DB_PASSWORD: &str = "env-db-password-4c2e";

fn needles(env: &S3Env) -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    vec![
        env.secret_key.clone(),
        YAML_TOKEN.into(),
        ENV_TOKEN.into(),
        YAML_SSE.into(),
        ENV_SSE.into(),
        // The SSE-C key travels base64-encoded in a header.
        b64(YAML_SSE),
        b64(ENV_SSE),
        YAML_DB_PASSWORD.into(),
        ENV_DB_PASSWORD.into(),
    ]
}

fn assert_no_secret(env: &S3Env, what: &str, text: &str) {
    for n in needles(env) {
        if let Some(at) = text.find(&n) {
            let line = text[..at].rsplit('\n').next().unwrap_or_default();
            panic!("{what} shows the secret {n:?}: …{line}{n}…");
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_prints_a_secret_at_any_log_level() {
    use std::os::unix::fs::PermissionsExt;
    let env = s3_env();
    let bucket = create_bucket(&env, "secrets").await;
    let store = Store::new();
    let db = TestDb::create().await;
    // Something for every command to do: a file to upload, an aged media to sweep.
    db.local("seCRetsmedia01", days_ago(60), None, None).await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = store.dir.path().join("config.yaml");
    write_yaml(
        &cfg,
        &format!(
            "media_store_path: {}\nstate_dir: {}\ns3:\n  bucket: {bucket}\n  endpoint_url: {}\n  region_name: us-east-1\n  access_key_id: {}\n  secret_access_key: {}\n  session_token: {YAML_TOKEN}\n  sse_customer_key: {YAML_SSE}\ndatabase:\n  host: {}\n  port: {}\n  user: {}\n  password: {YAML_DB_PASSWORD}\n  database: {}\n  sslmode: disable\nsweep:\n  keep_local_for: 30d\n  confirm_synapse_reads_from_bucket: true\nmetrics:\n  listen: {metrics}\n",
            store.root.display(),
            store.state.display(),
            env.endpoint,
            env.access_key,
            env.secret_key,
            db.host,
            db.port,
            db.user,
            db.name
        ),
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = cfg.to_str().unwrap();
    let overrides = [
        (
            "SYNAPSE_S3_OFFLOAD__S3__SECRET_ACCESS_KEY",
            env.secret_key.as_str(),
        ),
        ("SYNAPSE_S3_OFFLOAD__S3__SESSION_TOKEN", ENV_TOKEN),
        ("SYNAPSE_S3_OFFLOAD__S3__SSE_CUSTOMER_KEY", ENV_SSE),
        ("SYNAPSE_S3_OFFLOAD__DATABASE__PASSWORD", ENV_DB_PASSWORD),
    ];
    for (format, filter) in [("human", "trace"), ("json", "debug,aws=trace")] {
        // (Again in the second round: the first one's sweep deleted it.)
        store.write("local_content/se/CR/etsmedia01", &bytes(1, 5_000));
        let mut env_vars = overrides.to_vec();
        env_vars.push(("RUST_LOG", filter));
        let run = |args: &[&str]| {
            let mut all = vec!["--config", config, "--log-format", format];
            all.extend_from_slice(args);
            let r = crate::bad_input::run_bin(&[], &all, &env_vars);
            let what = format!("{args:?} ({format}, RUST_LOG={filter})");
            assert_no_secret(&env, &format!("stdout of {what}"), &r.stdout);
            assert_no_secret(&env, &format!("stderr of {what}"), &r.stderr);
            assert_eq!(r.code, 0, "{what}:\n{}\n{}", r.stdout, r.stderr);
            r
        };
        run(&["--help"]);
        run(&["check"]);
        run(&["upload"]);
        run(&["status"]);
        run(&["status", "--json"]);
        let dry = run(&["sweep", "--dry-run"]);
        assert!(
            dry.stdout
                .contains("would delete local_content/se/CR/etsmedia01"),
            "{}",
            dry.stdout
        );

        // The daemon, with its metrics endpoint, then stopped.
        let log = store.dir.path().join(format!("run-{format}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"));
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") || k.starts_with("SYNAPSE_S3_OFFLOAD") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(["--config", config, "--log-format", format, "run"])
            .envs(env_vars.iter().copied())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        eventually("/metrics after a scan", Duration::from_secs(30), || async {
            let (status, m) = get(&metrics, "/metrics").await;
            if status == 200 && m.contains("synapse_s3_offload_scans_total") {
                Ok(())
            } else {
                Err(format!("no /metrics after a scan: HTTP {status}"))
            }
        })
        .await;
        let (_, body) = get(&metrics, "/metrics").await;
        assert_no_secret(&env, "/metrics", &body);
        let (_, health) = get(&metrics, "/health").await;
        assert_no_secret(&env, "/health", &health);
        signal(child.id(), libc::SIGTERM);
        let status = tokio::task::block_in_place(|| child.wait().unwrap());
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "{log}");
        assert_no_secret(&env, &format!("the log of run ({format})"), &log);

        let swept = run(&["sweep"]);
        assert!(
            swept
                .stdout
                .contains("deleted local_content/se/CR/etsmedia01"),
            "{}",
            swept.stdout
        );
    }
}

/// Aged media whose ids from the database would lead outside the store, and a media whose
/// directory was replaced by a symlink to elsewhere: nothing outside the store is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_nothing_outside_the_store() {
    let env = s3_env();
    let bucket = create_bucket(&env, "traversal").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let top = store.dir.path().to_owned(); // the store is top/media
    let bait = |rel: &str| {
        let p = top.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"not media").unwrap();
        p
    };
    let mut baits = vec![
        // remote_content/../../etc/ab/cd/efgh
        bait("etc/ab/cd/efgh"),
        // remote_content/../ab/cd/efgh
        bait("media/ab/cd/efgh"),
        // local_content/../../efgh ("....efgh" split as Synapse does: "..", "..", "efgh")
        bait("efgh"),
        bait("outside/x"),
    ];
    let old = days_ago(60);
    db.remote("../../etc", "m1", "abcdefgh", old, None).await;
    db.remote("..", "m2", "abcdefgh", old, None).await;
    db.remote("example.org", "m3", "ab/../../../../outside/x", old, None)
        .await;
    db.remote("example.org", "m4", "....efgh", old, None).await;
    db.local("....efgh", old, None, None).await;
    db.local("../../../outside/x", old, None, None).await;

    // A real media, uploaded, whose AB directories are then replaced by symlinks to elsewhere
    // (its files moved there, unchanged: the bucket still confirms them).
    db.local("syMLinkedmedia", old, None, None).await;
    store.write("local_content/sy/ML/inkedmedia", &bytes(1, 3_000));
    store.write(
        "local_thumbnails/sy/ML/inkedmedia/32-32-image-png-crop",
        &bytes(2, 300),
    );
    // A real media whose thumbnail level is a symlink to elsewhere, where an empty directory
    // stands at the thumbnail path: its original goes, that directory must stay.
    db.local("thMBlinkedmedia", old, None, None).await;
    store.write("local_content/th/MB/linkedmedia", &bytes(4, 2_000));
    // And one that is simply aged: it is deleted, so the sweep did run.
    db.local("okLEGITmedia01", old, None, None).await;
    store.write("local_content/ok/LE/GITmedia01", &bytes(3, 1_000));

    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    let config = validated(raw);
    let s = synapse_s3_offload::backfill::run(
        &config,
        synapse_s3_offload::backfill::Progress::Log,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(s.uploaded, 4, "{s}");
    let empty_outside = top.join("elsewhere/th/MB/linkedmedia");
    std::fs::create_dir_all(&empty_outside).unwrap();
    std::fs::create_dir_all(store.root.join("local_thumbnails")).unwrap();
    std::os::unix::fs::symlink(
        top.join("elsewhere/th"),
        store.root.join("local_thumbnails/th"),
    )
    .unwrap();
    for top_dir in ["local_content", "local_thumbnails"] {
        let real = store.root.join(top_dir).join("sy");
        let moved = top.join("outside").join(top_dir);
        std::fs::create_dir_all(&moved).unwrap();
        std::fs::rename(&real, moved.join("sy")).unwrap();
        std::os::unix::fs::symlink(moved.join("sy"), &real).unwrap();
    }
    baits.push(top.join("outside/local_content/sy/ML/inkedmedia"));
    baits.push(top.join("outside/local_thumbnails/sy/ML/inkedmedia/32-32-image-png-crop"));

    let report =
        synapse_s3_offload::sweep::run_standalone(&config, false, &CancellationToken::new())
            .await
            .unwrap();
    let mut deleted = report.deleted.clone();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            "local_content/ok/LE/GITmedia01",
            "local_content/th/MB/linkedmedia"
        ],
        "{report}: {:?}",
        report.errors
    );
    assert!(
        empty_outside.is_dir(),
        "an empty directory behind a symlinked thumbnail level was removed"
    );
    let refused = report
        .errors
        .iter()
        .filter(|e| e.contains("refusing the unsafe id"))
        .count();
    assert_eq!(refused, 6, "{:?}", report.errors);
    for b in &baits {
        assert!(b.exists(), "{} was deleted", b.display());
    }
    assert!(
        top.join("outside/local_thumbnails/sy/ML/inkedmedia")
            .is_dir(),
        "the thumbnail directory behind the symlink is left alone"
    );
}

/// A symlinked directory in the store leads outside it: neither the uploader nor the daemon's
/// watcher follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_uploaded_through_a_symlinked_directory() {
    let env = s3_env();
    let bucket = create_bucket(&env, "symdir").await;
    let store = Store::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(outside.path().join("nk")).unwrap();
    std::fs::write(outside.path().join("nk/secret"), b"outside the store").unwrap();
    std::fs::create_dir_all(store.root.join("local_content")).unwrap();
    std::os::unix::fs::symlink(outside.path(), store.root.join("local_content/li")).unwrap();
    let config = validated(raw_config(&env, &env.endpoint, &bucket, &store));

    // The uploader, asked directly (as an event or the sweep's re-queue would).
    {
        let state = State::open(&config.state_dir).unwrap();
        let s3 = Arc::new(ObjectStore::new(&config.s3, config.upload.multipart_part_size).await);
        let uploader = Uploader::new(
            config.media_store_path.clone(),
            s3,
            state,
            16 << 20,
            16 << 20,
        );
        let p = MediaPath::parse("local_content/li/nk/secret").unwrap();
        assert!(matches!(
            uploader.upload(&p).await.unwrap(),
            Outcome::NotRegular
        ));
    }

    // The daemon: a file written behind the symlink while it watches is never uploaded. Files
    // written inside the store before and after it show that events do flow.
    let d = Daemon::start(config.clone());
    let sentinel = |n: u8| {
        let rel = format!("local_content/se/nt/inel{n}");
        store.write(&rel, &[n]);
        vec![(rel, vec![n])]
    };
    let before = sentinel(1);
    eventually("the first sentinel", Duration::from_secs(30), || {
        listed(&env, &bucket, &before)
    })
    .await;
    std::fs::write(outside.path().join("nk/new"), b"written behind the symlink").unwrap();
    let after = sentinel(2);
    eventually("the second sentinel", Duration::from_secs(30), || {
        listed(&env, &bucket, &after)
    })
    .await;
    d.stop().await;
    let keys: Vec<_> = list_sizes(&env, &bucket).await.into_keys().collect();
    assert_eq!(
        keys,
        ["local_content/se/nt/inel1", "local_content/se/nt/inel2"]
    );
    let state = State::open(&config.state_dir).unwrap();
    let queued: Vec<_> = state
        .queue_items()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(queued.is_empty(), "{queued:?}");
    assert!(outside.path().join("nk/new").exists());
}

/// A file swapped for a symlink to a file outside the store after it was opened and hashed: the
/// upload streams from the descriptor it opened (never the path opened again), so what reaches
/// the bucket is the file that was checked, not the outside one. Multipart parts are built lazily
/// (four at a time), so the last parts of a slow upload are read after the swap.
/// (s3s-fs does not check Content-MD5 on UploadPart, so nothing else would catch a mixed body.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_reads_the_file_it_opened_not_a_symlink_swapped_in() {
    let env = s3_env();
    let proxy = crate::proxy::Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "swap").await;
    let store = Store::new();
    let rel = "local_content/sw/AP/pedfile";
    let original = bytes(5, 6 * 5 * 1024 * 1024);
    let path = store.write(rel, &original);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, bytes(6, original.len())).unwrap();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    raw.upload.multipart_threshold =
        Some(synapse_s3_offload::config::SizeValue::Text("5MiB".into()));
    raw.upload.multipart_part_size =
        Some(synapse_s3_offload::config::SizeValue::Text("5MiB".into()));
    let config = validated(raw);
    proxy.set_put_delay(Duration::from_millis(700));
    let run = tokio::spawn({
        let config = config.clone();
        async move {
            synapse_s3_offload::backfill::run(
                &config,
                synapse_s3_offload::backfill::Progress::Log,
                CancellationToken::new(),
            )
            .await
            .unwrap()
        }
    });
    wait_until("the first part", Duration::from_secs(30), || {
        !proxy.object_requests("PUT").is_empty()
    })
    .await;
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    let s = run.await.unwrap();
    // The path changed under the upload: it is not recorded as the file (it now is a symlink).
    assert_eq!(s.uploaded, 0, "{s}");
    let got = objects(&env, &bucket).await;
    if let Some(o) = got.get(rel) {
        assert!(
            *o == original,
            "the object holds bytes from outside the store"
        );
    }
}
