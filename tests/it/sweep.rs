//! The sweep against the real PostgreSQL and S3 server: only aged media confirmed in the bucket
//! lose their local copy.

use std::path::Path;
use std::time::Duration;

use synapse_s3_offload::backfill::{self, Progress};
use synapse_s3_offload::config::{Config, RawConfig};
use synapse_s3_offload::state::State;
use synapse_s3_offload::sweep::{self, Report, SweepError};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A store and database where every case of the sweep is present. Returns the paths expected to
/// be deleted and those expected to stay.
pub(crate) struct Fixture {
    pub store: Store,
    pub db: TestDb,
    pub bucket: String,
    pub deleted: Vec<&'static str>,
    pub kept: Vec<&'static str>,
}

const OLD: i64 = 60; // days
const FRESH: i64 = 1;

pub(crate) async fn fixture(env: &S3Env, endpoint: &str) -> Fixture {
    let store = Store::new();
    let db = TestDb::create().await;
    let bucket = create_bucket(env, "sweep").await;
    let mut n = 0;
    let mut w = |rel: &str| {
        n += 1;
        store.write(rel, &bytes(n, 1_000 + n as usize * 10));
    };
    // Aged by last access, uploaded: original and thumbnails go.
    db.local("aaAGEDuploaded1", days_ago(400), Some(days_ago(OLD)), None)
        .await;
    w("local_content/aa/AG/EDuploaded1");
    w("local_thumbnails/aa/AG/EDuploaded1/32-32-image-png-crop");
    w("local_thumbnails/aa/AG/EDuploaded1/640-480-image-jpeg-scale");
    // Never downloaded (NULL last_access_ts): created_ts decides.
    db.local("bbNEVERaccessed", days_ago(OLD), None, None).await;
    w("local_content/bb/NE/VERaccessed");
    // Recently accessed (created long ago): stays.
    db.local(
        "ccFRESHaccess01",
        days_ago(400),
        Some(days_ago(FRESH)),
        None,
    )
    .await;
    w("local_content/cc/FR/ESHaccess01");
    // Aged but its object will be missing / of another size / of other content: stays, queued.
    db.local("ddMISSINGobject", days_ago(OLD), None, None).await;
    w("local_content/dd/MI/SSINGobject");
    db.local("eeOTHERsize0001", days_ago(OLD), None, None).await;
    w("local_content/ee/OT/HERsize0001");
    db.local("ffOTHERdigest01", days_ago(OLD), None, None).await;
    w("local_content/ff/OT/HERdigest01");
    // A URL preview, aged: never swept.
    db.local(
        "ggURLpreview001",
        days_ago(OLD),
        None,
        Some("https://example.com/"),
    )
    .await;
    w("local_content/gg/UR/Lpreview001");
    // Remote media, aged and fresh.
    db.remote(
        "matrix.org",
        "remoteid1",
        "hhREMOTEaged001",
        days_ago(OLD),
        Some(days_ago(OLD)),
    )
    .await;
    w("remote_content/matrix.org/hh/RE/MOTEaged001");
    w("remote_thumbnail/matrix.org/hh/RE/MOTEaged001/96-96-image-jpeg-crop");
    db.remote(
        "matrix.org",
        "remoteid2",
        "iiREMOTEfresh01",
        days_ago(OLD),
        Some(days_ago(FRESH)),
    )
    .await;
    w("remote_content/matrix.org/ii/RE/MOTEfresh01");
    // A file with no database row at all: not the sweep's business.
    w("local_content/zz/NO/ROWatall");

    let mut raw = raw_config(env, endpoint, &bucket, &store);
    raw.upload.include_url_cache = Some(false);
    let config = validated(raw);
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0);
    // Tamper with three objects.
    let c = client(env).await;
    c.delete_object()
        .bucket(&bucket)
        .key("local_content/dd/MI/SSINGobject")
        .send()
        .await
        .unwrap();
    c.put_object()
        .bucket(&bucket)
        .key("local_content/ee/OT/HERsize0001")
        .body(b"short".to_vec().into())
        .send()
        .await
        .unwrap();
    let len = std::fs::metadata(store.root.join("local_content/ff/OT/HERdigest01"))
        .unwrap()
        .len() as usize;
    c.put_object()
        .bucket(&bucket)
        .key("local_content/ff/OT/HERdigest01")
        .body(vec![b'x'; len].into())
        .send()
        .await
        .unwrap();

    Fixture {
        store,
        db,
        bucket,
        deleted: vec![
            "local_content/aa/AG/EDuploaded1",
            "local_thumbnails/aa/AG/EDuploaded1/32-32-image-png-crop",
            "local_thumbnails/aa/AG/EDuploaded1/640-480-image-jpeg-scale",
            "local_content/bb/NE/VERaccessed",
            "remote_content/matrix.org/hh/RE/MOTEaged001",
            "remote_thumbnail/matrix.org/hh/RE/MOTEaged001/96-96-image-jpeg-crop",
        ],
        kept: vec![
            "local_content/cc/FR/ESHaccess01",
            "local_content/dd/MI/SSINGobject",
            "local_content/ee/OT/HERsize0001",
            "local_content/ff/OT/HERdigest01",
            "local_content/gg/UR/Lpreview001",
            "remote_content/matrix.org/ii/RE/MOTEfresh01",
            "local_content/zz/NO/ROWatall",
        ],
    }
}

fn sweep_config(
    env: &S3Env,
    endpoint: &str,
    f: &Fixture,
    tweak: impl FnOnce(&mut RawConfig),
) -> Config {
    let mut raw = raw_config(env, endpoint, &f.bucket, &f.store);
    raw.database = Some(f.db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    tweak(&mut raw);
    validated(raw)
}

async fn run(config: &Config, dry_run: bool) -> Result<Report, SweepError> {
    sweep::run_standalone(config, dry_run, &CancellationToken::new()).await
}

fn exists(root: &Path, rel: &str) -> bool {
    root.join(rel).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_only_aged_media_confirmed_in_the_bucket() {
    let env = s3_env();
    let f = fixture(&env, &env.endpoint).await;
    let config = sweep_config(&env, &env.endpoint, &f, |_| {});
    let r = run(&config, false).await.unwrap();
    let mut deleted = r.deleted.clone();
    deleted.sort();
    let mut want: Vec<String> = f.deleted.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(deleted, want, "{r}");
    for p in &f.deleted {
        assert!(!exists(&f.store.root, p), "{p} should be gone");
    }
    for p in &f.kept {
        assert!(exists(&f.store.root, p), "{p} must be kept");
    }
    assert_eq!(
        (r.kept_not_in_bucket, r.kept_different, r.kept_error),
        (1, 2, 0),
        "{r}"
    );
    assert_eq!(
        r.media_examined, 6,
        "aged, non-URL-preview media: 5 local + 1 remote... {r}"
    );
    // Again: the media swept just now have nothing local left, and are not "examined".
    let again = run(&config, true).await.unwrap();
    assert!(again.media_without_local_files >= 1, "{again}");
    assert_eq!(
        again.media_examined + again.media_without_local_files,
        6,
        "{again}"
    );
    assert!(again.to_string().contains("no local file left"), "{again}");
    // The media's own thumbnail directory went with its files; top-level folders stay.
    assert!(!exists(&f.store.root, "local_thumbnails/aa/AG/EDuploaded1"));
    for top in [
        "local_content",
        "local_thumbnails",
        "remote_content",
        "remote_thumbnail",
    ] {
        assert!(exists(&f.store.root, top));
    }
    // The three unconfirmed files are queued for upload.
    let state = State::open(&config.state_dir).unwrap();
    let mut queued: Vec<_> = state
        .queue_items()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    queued.sort();
    assert_eq!(
        queued,
        [
            "local_content/dd/MI/SSINGobject",
            "local_content/ee/OT/HERsize0001",
            "local_content/ff/OT/HERdigest01"
        ]
    );
    // Their records (from the backfill) no longer vouch for the files: stale, so the uploads
    // really look again; but they still say which bytes were verified (DESIGN.md invariant 8).
    for p in &queued {
        let p = synapse_s3_offload::layout::MediaPath::parse(p).unwrap();
        let r = state
            .record(&p)
            .unwrap()
            .expect("the verified digest is kept");
        assert!(r.stale, "{p}: {r:?}");
    }
    drop(state);

    // A second sweep finds nothing more to delete.
    let again = run(&config, false).await.unwrap();
    assert_eq!(again.files_deleted, 0, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_and_deletes_nothing_and_the_provider_check_refuses() {
    let env = s3_env();
    let f = fixture(&env, &env.endpoint).await;
    // Without synapse_config or the explicit confirmation, a real sweep refuses...
    let unsafe_config = sweep_config(&env, &env.endpoint, &f, |r| {
        r.sweep.confirm_synapse_reads_from_bucket = None
    });
    let err = run(&unsafe_config, false).await.unwrap_err();
    assert!(matches!(err, SweepError::Unsafe(_)), "{err}");
    assert!(
        err.to_string()
            .contains("confirm_synapse_reads_from_bucket"),
        "{err}"
    );
    // ...but a dry run always works, and deletes nothing.
    let r = run(&unsafe_config, true).await.unwrap();
    assert!(r.dry_run);
    assert_eq!(r.files_deleted, 6, "{r}");
    for p in f.deleted.iter().chain(&f.kept) {
        assert!(
            exists(&f.store.root, p),
            "{p} must still exist after a dry run"
        );
    }

    // With synapse_config: the provider must read our bucket and prefix.
    let hs = f.store.dir.path().join("homeserver.yaml");
    let write_hs = |prefix: &str| {
        std::fs::write(
            &hs,
            format!(
                "server_name: example.com\nmedia_store_path: /x\nmedia_storage_providers:\n- module: s3_storage_provider.S3StorageProviderBackend\n  store_local: false\n  config:\n    bucket: {}\n    prefix: \"{prefix}\"\n    endpoint_url: {}\n",
                f.bucket, env.endpoint
            ),
        )
        .unwrap()
    };
    write_hs("other/");
    let config = sweep_config(&env, &env.endpoint, &f, |r| {
        r.sweep.confirm_synapse_reads_from_bucket = None;
        r.synapse_config = Some(hs.clone());
    });
    let err = run(&config, false).await.unwrap_err().to_string();
    assert!(err.contains("prefix") && err.contains("other/"), "{err}");
    write_hs("");
    let r = run(&config, false).await.unwrap();
    assert_eq!(r.files_deleted, 6, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_skips_while_the_lock_is_held() {
    let env = s3_env();
    let f = fixture(&env, &env.endpoint).await;
    let config = sweep_config(&env, &env.endpoint, &f, |_| {});
    // Another instance (here: a session of ours) holds the sweep lock.
    let key = synapse_s3_offload::synapse_db::SWEEP_LOCK_KEY;
    f.db.client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    let r = run(&config, false).await.unwrap();
    assert!(r.skipped_locked, "{r}");
    assert!(exists(&f.store.root, f.deleted[0]));
    f.db.client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    let r = run(&config, false).await.unwrap();
    assert!(!r.skipped_locked && r.files_deleted == 6, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_or_database_down_deletes_nothing_and_the_next_sweep_completes() {
    let env = s3_env();
    let mut s3 = PrivateS3::start(&env);
    let penv = s3.env(&env);
    let f = fixture(&penv, &s3.endpoint()).await;
    let config = sweep_config(&env, &s3.endpoint(), &f, |r| {
        r.s3.max_attempts = Some(1);
        r.s3.connect_timeout = Some("1s".into());
    });

    s3.stop();
    let r = run(&config, false).await.unwrap();
    assert_eq!(r.files_deleted, 0, "{r}");
    assert!(r.kept_error > 0 && !r.errors.is_empty(), "{r}");
    for p in &f.deleted {
        assert!(exists(&f.store.root, p));
    }

    // Database unreachable: the sweep stops with an error before deleting anything.
    let down = sweep_config(&env, &s3.endpoint(), &f, |r| {
        let mut db = f.db.raw();
        db.port = Some(1);
        db.connect_timeout = Some(synapse_s3_offload::config::DurationValue::Seconds(2));
        r.database = Some(db);
    });
    s3.resume(&env);
    let err = run(&down, false).await.unwrap_err().to_string();
    assert!(err.contains("PostgreSQL"), "{err}");
    for p in &f.deleted {
        assert!(exists(&f.store.root, p));
    }

    let r = run(&config, false).await.unwrap();
    assert_eq!(r.files_deleted, 6, "{r}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// `n` aged local media with one small file each, uploaded; returns their relative paths.
async fn bulk_aged(env: &S3Env, f: &Fixture, n: usize) -> Vec<String> {
    let mut paths = Vec::new();
    for i in 0..n {
        let id = format!("bulk{i:020}");
        f.db.local(&id, days_ago(OLD), None, None).await;
        let rel = format!("local_content/bu/lk/{}", &id[4..]);
        f.store.write(&rel, &bytes(50_000 + i as u64, 300));
        paths.push(rel);
    }
    let config = validated(raw_config(env, &env.endpoint, &f.bucket, &f.store));
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0);
    paths
}

/// Every aged file is either still here, or in the bucket (with its size; the digest was checked
/// when it was uploaded). Returns how many are gone from the disk.
async fn nothing_lost(env: &S3Env, f: &Fixture, paths: &[String]) -> usize {
    let objects = list_sizes(env, &f.bucket).await;
    let mut gone = 0;
    for p in paths {
        if !f.store.root.join(p).exists() {
            gone += 1;
            assert_eq!(objects.get(p), Some(&300), "{p} deleted without its object");
        }
    }
    gone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_failing_mid_sweep_deletes_only_confirmed_files() {
    let env = s3_env();
    let f = fixture(&env, &env.endpoint).await;
    let paths = bulk_aged(&env, &f, 300).await;
    let proxy = crate::proxy::Proxy::start(env.addr).await;
    let config = sweep_config(&env, &proxy.endpoint(), &f, |r| {
        r.s3.max_attempts = Some(1);
        r.sweep.concurrency = Some(4);
    });
    proxy.fail_after(Some(100));
    let r = run(&config, false).await.unwrap();
    let gone = nothing_lost(&env, &f, &paths).await;
    assert!(
        gone > 0 && gone < 300,
        "some deleted before the failure, not all: {r}"
    );
    assert!(r.kept_error > 0, "{r}");
    proxy.fail_after(None);
    let r = run(&config, false).await.unwrap();
    assert_eq!(r.kept_error, 0, "{r}");
    assert_eq!(nothing_lost(&env, &f, &paths).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_lost_mid_sweep_stops_cleanly_and_the_next_sweep_completes() {
    let env = s3_env();
    let f = fixture(&env, &env.endpoint).await;
    let paths = bulk_aged(&env, &f, 2500).await;
    let pg = crate::proxy::TcpProxy::start(format!("{}:{}", f.db.host, f.db.port).parse().unwrap())
        .await;
    let config = sweep_config(&env, &env.endpoint, &f, |r| {
        let mut db = f.db.raw();
        db.port = Some(pg.addr.port());
        db.connect_timeout = Some(synapse_s3_offload::config::DurationValue::Seconds(2));
        r.database = Some(db);
        r.sweep.concurrency = Some(2);
    });
    let c2 = config.clone();
    let sweep = tokio::spawn(async move { run(&c2, false).await });
    let root = f.store.root.clone();
    let first = paths[0].clone();
    wait_until("the first deletions", Duration::from_secs(30), || {
        !root.join(&first).exists()
    })
    .await;
    pg.cut();
    let r = sweep.await.unwrap().unwrap();
    assert!(
        r.stopped
            .as_deref()
            .is_some_and(|s| s.contains("PostgreSQL")),
        "{r}"
    );
    let gone = nothing_lost(&env, &f, &paths).await;
    assert!(gone < 2500, "stopped before the end: {r}");
    pg.restore();
    let r = run(&config, false).await.unwrap();
    assert!(r.stopped.is_none(), "{r}");
    assert_eq!(nothing_lost(&env, &f, &paths).await, 2500);
}

/// Whether a session of the test's own can take the sweep lock in the fixture's database (advisory
/// locks are per database), releasing it again at once.
async fn lock_is_free(db: &TestDb) -> bool {
    // Asked of pg_locks, not by trying the lock: a probe that takes the lock for a moment can
    // make the sweep's own attempt answer "held elsewhere", so the grant this waits for never
    // happens (seen once in six runs).
    let held: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    held == 0
}

/// `pg_try_advisory_lock` succeeds on the server while the reply is held up past our timeout (a
/// network stall): the connection that holds the lock must be closed, never handed back to the
/// pool, where it kept the lock (every instance then skipped its sweeps until a restart) and a
/// re-entering sweep left it held after unlocking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_reply_times_out_is_not_left_held() {
    use synapse_s3_offload::synapse_db::Db;
    let env = s3_env();
    let store = Store::new();
    let db = TestDb::create().await;
    let pg =
        crate::proxy::TcpProxy::start(format!("{}:{}", db.host, db.port).parse().unwrap()).await;
    let mut raw = raw_config(&env, &env.endpoint, "unused", &store);
    let mut d = db.raw();
    d.port = Some(pg.addr.port());
    d.statement_timeout = Some("1s".into());
    raw.database = Some(d);
    let config = validated(raw);
    let sweeps = Db::new(config.database.as_ref().unwrap()).unwrap();
    // A pooled connection first, so that a leaked one would be reused by the next sweep.
    sweeps.media_counts().await.unwrap();

    pg.hold_replies_after("pg_try_advisory_lock");
    let sweeps = std::sync::Arc::new(sweeps);
    let s2 = sweeps.clone();
    let attempt = tokio::spawn(async move { s2.try_lock().await.map(|l| l.is_some()) });
    // The server grants it; its answer is what stalls.
    eventually(
        "the server to grant the lock",
        Duration::from_secs(10),
        || async {
            if lock_is_free(&db).await {
                Err("not granted yet".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let e = attempt
        .await
        .unwrap()
        .expect_err("the answer was held past the timeout");
    assert!(e.to_string().contains("timed out"), "{e}");
    pg.hold_replies(false);
    eventually(
        "the timed-out lock released",
        Duration::from_secs(10),
        || async {
            if lock_is_free(&db).await {
                Ok(())
            } else {
                Err("another session still holds the sweep lock".into())
            }
        },
    )
    .await;
    // Held: confirmed as such. Its session ended by the server (as by a restart): noticed.
    let lock = sweeps.try_lock().await.unwrap().expect("the lock is free");
    lock.still_held().await.unwrap();
    db.end_lock_sessions().await;
    eventually("the lost lock noticed", Duration::from_secs(10), || async {
        match lock.still_held().await {
            Err(why) => {
                assert!(why.contains("PostgreSQL"), "{why}");
                Ok(())
            }
            Ok(()) => Err("still reported held".into()),
        }
    })
    .await;
    lock.release().await;
    // The next sweeps take and release it as usual, leaving it free.
    for _ in 0..2 {
        let lock = sweeps.try_lock().await.unwrap().expect("the lock is free");
        assert!(!lock_is_free(&db).await, "held while the sweep runs");
        lock.release().await;
        eventually("the lock released", Duration::from_secs(10), || async {
            if lock_is_free(&db).await {
                Ok(())
            } else {
                Err("still held after the sweep".into())
            }
        })
        .await;
    }
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk shared with the store: the daemon that restarts (its commits fail) before its first
/// sweep, an interval after each start, never frees anything. With the store's file system nearly
/// full (here a 16 MiB tmpfs: less than 1 GiB free) the first sweep starts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_on_a_nearly_full_disk_sweeps_at_startup() {
    let env = s3_env();
    let store = Store::new();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&store.root)
        .status()
        .unwrap();
    assert!(status.success(), "this test needs `mount -t tmpfs` (root)");
    let _mounted = Tmpfs(store.root.clone());
    let db = TestDb::create().await;
    let bucket = create_bucket(&env, "fullsweep").await;
    db.local("ffULLdiskaged01", days_ago(400), Some(days_ago(60)), None)
        .await;
    let aged = "local_content/ff/UL/Ldiskaged01";
    store.write(aged, &bytes(7, 20_000));
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    raw.sweep.interval = Some("1h".into());
    let config = validated(raw);
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0);
    let mut d = Daemon::start(config);
    d.ready().await;
    wait_until("the startup sweep", Duration::from_secs(30), || {
        !exists(&store.root, aged)
    })
    .await;
    d.stop().await;
}
