//! The bad-input catalogue (issue 6) beyond what cli.rs, upload.rs and config/tests.rs already
//! cover: each bad input gives one clear error naming what to fix, or is skipped and reported,
//! and nothing is lost.

use std::process::Command;

use synapse_s3_offload::backfill::{self, Progress, Summary};
use synapse_s3_offload::config::{Config, SizeValue};
use synapse_s3_offload::state::State;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::support::*;

pub(crate) struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The single `error:` line (panics, with the output, unless there is exactly one).
    pub fn error_line(&self) -> &str {
        let errors: Vec<_> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(
            (self.code, errors.len()),
            (1, 1),
            "exit 1 with one error line expected;\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        // (A panic would exit 101. A library panic we catch, redb's on some corruptions, is
        // logged as one "Internal error." line before our error.)
        errors[0]
    }
}

/// Runs the binary with `args`, optionally under a wrapper command (e.g. `unshare`), with the
/// AWS environment cleared so nothing outside the test can provide credentials or a region.
pub(crate) fn run_bin(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Run {
    let bin = env!("CARGO_BIN_EXE_synapse-s3-offload");
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("SYNAPSE_S3_OFFLOAD") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn yaml(store: &Store, env: &S3Env, bucket: &str) -> String {
    config_yaml(
        store,
        &env.endpoint,
        bucket,
        (&env.access_key, &env.secret_key),
        "  max_attempts: 1\n",
        "",
    )
}

fn upload(cfg: &std::path::Path) -> Run {
    run_bin(&[], &["--config", cfg.to_str().unwrap(), "upload"], &[])
}

/// Runs as an unprivileged user (uid 1000 in a user namespace of its own, mapped to us): file
/// modes then apply, as they do to the `matrix-synapse` user, even though the tests run as root.
const AS_USER: &[&str] = &["unshare", "--user", "--map-user=1000", "--map-group=1000"];

async fn backfill(config: &Config) -> Summary {
    backfill::run(config, Progress::Log, CancellationToken::new())
        .await
        .expect("backfill")
}

#[tokio::test]
async fn zero_and_negative_durations_name_their_key() {
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("durations", b"x").await;
    let good = yaml(&store, &env, &bucket);
    for (extra, key) in [
        ("scan_interval: 0s\n", "scan_interval"),
        ("shutdown_grace: -5s\n", "shutdown_grace"),
        ("upload:\n  settle: 0ms\n", "upload.settle"),
        ("upload:\n  max_backoff: -1m\n", "upload.max_backoff"),
        ("sweep:\n  keep_local_for: 0d\n", "sweep.keep_local_for"),
        ("sweep:\n  interval: soon\n", "sweep.interval"),
        (
            "metrics:\n  s3_probe_interval: 0s\n",
            "metrics.s3_probe_interval",
        ),
        (
            "database:\n  database: x\n  connect_timeout: 0\n",
            "database.connect_timeout",
        ),
    ] {
        write_yaml(&cfg, &format!("{good}{extra}"));
        let r = upload(&cfg);
        let line = r.error_line();
        assert!(line.contains(key), "{extra:?}: {line}");
        assert!(
            line.contains("greater than zero") || line.contains("not a duration"),
            "{extra:?}: {line}"
        );
    }
    assert!(objects(&env, &bucket).await.is_empty(), "nothing uploaded");
}

#[tokio::test]
async fn missing_credentials_are_named_not_blamed_on_the_endpoint() {
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("nocreds", b"x").await;
    write_yaml(
        &cfg,
        &format!(
            "media_store_path: {}\nstate_dir: {}\ns3:\n  bucket: {bucket}\n  endpoint_url: {}\n  max_attempts: 1\n",
            store.root.display(),
            store.state.display(),
            env.endpoint
        ),
    );
    // No ~/.aws either.
    let home = store.dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    for command in ["upload", "run"] {
        let r = run_bin(
            &[],
            &["--config", cfg.to_str().unwrap(), command],
            &[("HOME", home.to_str().unwrap())],
        );
        let line = r.error_line();
        assert!(
            line.contains("no S3 credentials") && line.contains("s3.access_key_id"),
            "{command}: {line}"
        );
        assert!(!line.contains("endpoint_url"), "{command}: {line}");
    }
    let r = run_bin(
        &[],
        &["--config", cfg.to_str().unwrap(), "check"],
        &[("HOME", home.to_str().unwrap())],
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with('✗') && l.contains("no S3 credentials")),
        "{}",
        r.stdout
    );
    assert!(objects(&env, &bucket).await.is_empty());
}

#[tokio::test]
async fn media_store_path_missing_a_file_or_unreadable() {
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("storepath", b"x").await;
    let good = yaml(&store, &env, &bucket);
    let root = store.root.display().to_string();

    let file = store.dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    write_yaml(&cfg, &good.replace(&root, file.to_str().unwrap()));
    let line = upload(&cfg).error_line().to_owned();
    assert!(
        line.contains("media_store_path") && line.contains("not a directory"),
        "{line}"
    );

    write_yaml(&cfg, &good.replace(&root, "relative/media"));
    let line = upload(&cfg).error_line().to_owned();
    assert!(
        line.contains("media_store_path") && line.contains("absolute"),
        "{line}"
    );

    // Unreadable for the user the daemon runs as.
    use std::os::unix::fs::PermissionsExt;
    write_yaml(&cfg, &good);
    std::fs::set_permissions(&store.root, std::fs::Permissions::from_mode(0o000)).unwrap();
    let r = run_bin(AS_USER, &["--config", cfg.to_str().unwrap(), "upload"], &[]);
    std::fs::set_permissions(&store.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let line = r.error_line();
    assert!(
        line.contains("media_store_path") && line.contains("not readable"),
        "{line}"
    );
    assert!(objects(&env, &bucket).await.is_empty());
    assert!(
        store.root.join("local_content/ab/cd/ef").exists(),
        "nothing touched"
    );
}

#[tokio::test]
async fn state_dir_that_cannot_be_created_or_written() {
    use std::os::unix::fs::PermissionsExt;
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("statedir", b"x").await;
    let good = yaml(&store, &env, &bucket);
    let state = store.state.display().to_string();

    // Below a regular file: cannot be created.
    let file = store.dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let under_file = file.join("state");
    write_yaml(&cfg, &good.replace(&state, under_file.to_str().unwrap()));
    let line = upload(&cfg).error_line().to_owned();
    assert!(
        line.contains("cannot create state_dir") && line.contains("a-file/state"),
        "{line}"
    );

    // Exists, but not writable by the user the daemon runs as.
    std::fs::create_dir(&store.state).unwrap();
    std::fs::set_permissions(&store.state, std::fs::Permissions::from_mode(0o500)).unwrap();
    write_yaml(&cfg, &good);
    for command in ["upload", "run"] {
        let r = run_bin(AS_USER, &["--config", cfg.to_str().unwrap(), command], &[]);
        let line = r.error_line();
        assert!(
            line.contains("state_dir") && line.contains("not writable"),
            "{command}: {line}"
        );
    }
    std::fs::set_permissions(&store.state, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(objects(&env, &bucket).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_in_the_store_are_ignored() {
    let env = s3_env();
    let bucket = create_bucket(&env, "devnode").await;
    let store = Store::new();
    store.write("local_content/de/vi/regular", b"regular");
    // A character device like /dev/zero: reading it would never end.
    let dev = store.root.join("local_content/de/vi/zero");
    let c = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    let s = backfill(&validated(raw_config(&env, &env.endpoint, &bucket, &store))).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    let keys: Vec<_> = objects(&env, &bucket).await.into_keys().collect();
    assert_eq!(keys, ["local_content/de/vi/regular"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_above_the_threshold_is_uploaded_in_parts() {
    // 40 MiB with 5 MiB parts: 8 parts. (A 5 GiB sparse file would be written in full into
    // s3s-fs's data dir and take minutes; the part plan for 5 GiB is unit-tested in upload::s3.)
    const SIZE: u64 = 40 << 20;
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "sparse").await;
    let store = Store::new();
    let path = store.root.join("local_content/sp/ar/se");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    {
        use std::os::unix::fs::FileExt;
        f.write_at(b"end", SIZE - 3).unwrap();
    }
    drop(f);
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    raw.upload.multipart_threshold = Some(SizeValue::Text("5MiB".into()));
    raw.upload.multipart_part_size = Some(SizeValue::Text("5MiB".into()));
    let config = validated(raw);
    let s = backfill(&config).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    let parts = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("partNumber"))
        .count();
    assert_eq!(parts, 8);
    assert_eq!(
        list_sizes(&env, &bucket)
            .await
            .get("local_content/sp/ar/se"),
        Some(&SIZE)
    );
    // The record holds the digest of the whole content, which the HEAD after completion matched.
    let mut want = md5::Md5::default();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..39 {
        md5::Digest::update(&mut want, &zeros);
    }
    md5::Digest::update(&mut want, &zeros[..(1 << 20) - 3]);
    md5::Digest::update(&mut want, b"end");
    let want: [u8; 16] = md5::Digest::finalize(want).into();
    let state = State::open(&config.state_dir).unwrap();
    let rec = state
        .record(&synapse_s3_offload::layout::MediaPath::parse("local_content/sp/ar/se").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((rec.size, rec.md5), (SIZE, want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_removed_during_a_scan_do_not_abort_the_upload() {
    let env = s3_env();
    for round in 0..3u64 {
        let bucket = create_bucket(&env, "rmscan").await;
        let store = Store::new();
        for d in 0..30 {
            for f in 0..20 {
                store.write(&format!("local_content/d{d:02}/xx/f{f:02}"), b"x");
            }
        }
        let doomed = store.root.join("local_content");
        let remover = std::thread::spawn(move || {
            // Every other directory goes while the walk and the uploads run.
            for d in (round as usize % 2..30).step_by(2) {
                let _ = std::fs::remove_dir_all(doomed.join(format!("d{d:02}")));
            }
        });
        let s = backfill(&validated(raw_config(&env, &env.endpoint, &bucket, &store))).await;
        remover.join().unwrap();
        assert_eq!(s.failed, 0, "round {round}: {s}");
        let remaining = store.read_all("");
        assert_eq!(remaining.len(), 15 * 20);
        all_uploaded(&env, &bucket, &remaining)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aged_media_with_multibyte_ids_are_swept_without_a_panic() {
    let env = s3_env();
    let bucket = create_bucket(&env, "multibyte").await;
    let store = Store::new();
    let db = TestDb::create().await;
    // Synapse splits ids by character: media_id[0:2], [2:4], [4:].
    let cases = [
        ("éabcdefgh", "local_content/éa/bc/defgh"),
        ("日本語のファイル", "local_content/日本/語の/ファイル"),
    ];
    for (id, rel) in cases {
        db.local(id, days_ago(60), None, None).await;
        store.write(rel, id.as_bytes());
    }
    db.remote("example.org", "r1", "éé€€remote", days_ago(60), None)
        .await;
    store.write("remote_content/example.org/éé/€€/remote", b"remote");
    store.write(
        "remote_thumbnail/example.org/éé/€€/remote/32-32-image-png-crop",
        b"thumb",
    );
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    let config = validated(raw);
    assert_eq!(backfill(&config).await.uploaded, 4);
    let report =
        synapse_s3_offload::sweep::run_standalone(&config, false, &CancellationToken::new())
            .await
            .unwrap();
    assert_eq!(
        (report.media_examined, report.files_deleted),
        (3, 4),
        "{report}: {:?}",
        report.errors
    );
    assert!(store.read_all("").is_empty(), "every aged file went");
    // Their objects are all still there, at the keys Synapse reads.
    assert_eq!(list_sizes(&env, &bucket).await.len(), 4);
}

#[tokio::test]
async fn a_corrupted_state_database_stops_the_daemon_and_status_with_the_recovery_steps() {
    // (cli.rs covers `upload`.) Neither may start empty and forget what it recorded.
    let CliCase {
        env,
        bucket,
        store,
        cfg,
    } = cli_case("corruptrun", b"x").await;
    write_yaml(&cfg, &yaml(&store, &env, &bucket));
    assert_eq!(upload(&cfg).code, 0);
    let db = store.state.join("state.redb");
    let mut broken = std::fs::read(&db).unwrap();
    let quarter = broken.len() / 4;
    broken[quarter..].fill(0xff);
    std::fs::write(&db, &broken).unwrap();
    for command in ["run", "status"] {
        let r = run_bin(&[], &["--config", cfg.to_str().unwrap(), command], &[]);
        let line = r.error_line();
        assert!(
            line.contains("state.redb") && line.contains("move it aside"),
            "{command}: {line}"
        );
        assert_eq!(std::fs::read(&db).unwrap(), broken, "left for inspection");
    }
}
