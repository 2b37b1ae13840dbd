//! Following Synapse's deletions (issue 18): the prune job's incremental and full paths, its limits
//! and lock, the daemon's schedule with `status` and metrics, and `forget`. Media are deleted the
//! way Synapse deletes them: the rows (media and thumbnails) and the local files go.

use std::time::{Duration, Instant};

use synapse_s3_offload::audit::{self, PrunePath, PruneReport, job};
use synapse_s3_offload::backfill::{self, Progress};
use synapse_s3_offload::config::{Config, RawConfig};
use synapse_s3_offload::state::State;
use tokio_util::sync::CancellationToken;

use crate::audit::{config_for, put};
use crate::support::*;

const GRACE: Duration = Duration::from_secs(2);

struct Case {
    store: Store,
    db: TestDb,
    bucket: String,
    config: Config,
}

/// Media `aaKEEPmedia01` (stays), `bbGONEmedia01` (deleted below by the tests) with a thumbnail,
/// `ccBACKmedia01` (its row comes back), a remote media, all uploaded; a URL preview and an object
/// outside the prefix that no pruning may touch.
async fn case(env: &S3Env, tweak: impl FnOnce(&mut RawConfig)) -> Case {
    let store = Store::new();
    let db = TestDb::create().await;
    let bucket = create_bucket(env, "prune").await;
    let t = days_ago(1);
    for (i, id) in ["aaKEEPmedia01", "bbGONEmedia01", "ccBACKmedia01"]
        .iter()
        .enumerate()
    {
        db.local(id, t, None, None).await;
        db.local_thumb(id, 32, 32, "image/png", "crop").await;
        let (a, b, c) = (&id[..2], &id[2..4], &id[4..]);
        store.write(&format!("local_content/{a}/{b}/{c}"), &bytes(i as u64, 300));
        store.write(
            &format!("local_thumbnails/{a}/{b}/{c}/32-32-image-png-crop"),
            &bytes(10 + i as u64, 30),
        );
    }
    db.remote("r.org", "remoteid1", "ddREMOTEmed01", t, None)
        .await;
    store.write("remote_content/r.org/dd/RE/MOTEmed01", &bytes(20, 200));
    db.local("eeURLprev0001", t, None, Some("https://example.com/"))
        .await;
    store.write("url_cache/2026-01-01/eeURLprev0001", &bytes(21, 50));
    let config = config_for(env, &bucket, &store, &db, |raw| {
        raw.upload.include_url_cache = Some(true);
        raw.prune.grace = Some("2s".into());
        // A small fixture: one media of four is a large share.
        raw.prune.max_orphan_percent = Some(60.0);
        tweak(raw);
    });
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0, "{s}");
    put(
        env,
        &bucket,
        "elsewhere/local_content/bb/GO/NEmedia01",
        b"not ours",
    )
    .await;
    Case {
        store,
        db,
        bucket,
        config,
    }
}

/// What Synapse does when an admin deletes a local media: rows and local files go.
async fn synapse_deletes(c: &Case, id: &str) {
    c.db.client
        .execute(
            "DELETE FROM local_media_repository_thumbnails WHERE media_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    c.db.client
        .execute(
            "DELETE FROM local_media_repository WHERE media_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (a, b, rest) = (&id[..2], &id[2..4], &id[4..]);
    let _ = std::fs::remove_file(c.store.root.join(format!("local_content/{a}/{b}/{rest}")));
    let _ = std::fs::remove_dir_all(
        c.store
            .root
            .join(format!("local_thumbnails/{a}/{b}/{rest}")),
    );
}

async fn prune(config: &Config, path: PrunePath) -> PruneReport {
    job::run_standalone(config, Some(path), false, &CancellationToken::new())
        .await
        .unwrap()
}

fn keys(objects: &std::collections::BTreeMap<String, Vec<u8>>) -> Vec<&str> {
    objects.keys().map(String::as_str).collect()
}

const GONE: [&str; 2] = [
    "media/local_content/bb/GO/NEmedia01",
    "media/local_thumbnails/bb/GO/NEmedia01/32-32-image-png-crop",
];
const NEVER_TOUCHED: [&str; 5] = [
    "media/local_content/aa/KE/EPmedia01",
    "media/local_thumbnails/aa/KE/EPmedia01/32-32-image-png-crop",
    "media/remote_content/r.org/dd/RE/MOTEmed01",
    "media/url_cache/2026-01-01/eeURLprev0001",
    "elsewhere/local_content/bb/GO/NEmedia01",
];

/// Runs `path` until it deletes something (at most `deadline`); every run before the grace period
/// has passed since `since` must delete nothing.
async fn prune_until_deleted(
    config: &Config,
    path: PrunePath,
    since: Instant,
    deadline: Duration,
) -> PruneReport {
    let end = Instant::now() + deadline;
    loop {
        let before = Instant::now();
        let r = prune(config, path).await;
        if r.deleted.count > 0 {
            assert!(
                since.elapsed() >= GRACE,
                "deleted after {:?}, before the grace period: {r}",
                since.elapsed()
            );
            return r;
        }
        assert!(before < end, "nothing deleted within {deadline:?}: {r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The incremental path: a media deleted through Synapse leaves the bucket once the grace period
/// has passed since its first sighting, not before; a media whose row comes back is kept; the
/// other media, URL previews and objects outside the prefix stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_prune_follows_deletions_after_the_grace_period_only() {
    let env = s3_env();
    let c = case(&env, |_| {}).await;
    let all = objects(&env, &c.bucket).await;
    synapse_deletes(&c, "bbGONEmedia01").await;
    // ccBACK: deleted, seen orphaned, then its row is restored (a database restore).
    c.db.client
        .batch_execute("DELETE FROM local_media_repository_thumbnails WHERE media_id = 'ccBACKmedia01'; DELETE FROM local_media_repository WHERE media_id = 'ccBACKmedia01'")
        .await
        .unwrap();
    let seen_at = Instant::now();
    let r = prune(&c.config, PrunePath::Incremental).await;
    assert_eq!(r.checked, 7, "every record but the URL preview: {r}");
    assert_eq!((r.orphans, r.deleted.count), (4, 0), "first sightings: {r}");
    assert_eq!(objects(&env, &c.bucket).await, all, "nothing deleted yet");
    c.db.local("ccBACKmedia01", days_ago(1), None, None).await;

    let r = prune_until_deleted(
        &c.config,
        PrunePath::Incremental,
        seen_at,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(r.path, PrunePath::Incremental);
    assert_eq!(r.deleted.count, 2, "{r}");
    let left = objects(&env, &c.bucket).await;
    for k in GONE {
        assert!(!left.contains_key(k), "{k} must be gone: {:?}", keys(&left));
    }
    for k in NEVER_TOUCHED
        .iter()
        .chain(&["media/local_content/cc/BA/CKmedia01"])
    {
        assert!(left.contains_key(*k), "{k} must stay: {:?}", keys(&left));
    }
    // The deleted media's records went with their objects: the next run sees nothing new.
    let r = prune(&c.config, PrunePath::Incremental).await;
    assert_eq!((r.checked, r.orphans, r.deleted.count), (5, 0, 0), "{r}");
    let state = State::open(&c.config.state_dir).unwrap();
    let last = job::last(&state).unwrap().expect("remembered");
    assert_eq!(last.path, PrunePath::Incremental);
    drop(state);
    drop(c.store);
}

/// The full path finds objects we never uploaded (no record), under the same two-sighting grace,
/// and is the path of a first run; a `prune` with nothing due afterwards is incremental.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_prune_finds_objects_we_did_not_upload() {
    let env = s3_env();
    let c = case(&env, |_| {}).await;
    put(
        &env,
        &c.bucket,
        "media/local_content/zz/NO/TOURS00001",
        b"another tool's",
    )
    .await;
    synapse_deletes(&c, "bbGONEmedia01").await;
    let cfg = c.config.clone();
    // Before the run: its sightings are stamped during it (a loaded machine's run took 0.5 s, and
    // a grace measured from its end looked broken by that much).
    let seen_at = Instant::now();
    let first = job::run_standalone(&cfg, None, false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        first.path,
        PrunePath::Full,
        "the first run lists the bucket: {first}"
    );
    assert_eq!(first.deleted.count, 0, "{first}");
    let r = prune_until_deleted(&cfg, PrunePath::Full, seen_at, Duration::from_secs(20)).await;
    assert_eq!(r.deleted.count, 3, "{r}");
    let left = objects(&env, &c.bucket).await;
    assert!(
        !left.contains_key("media/local_content/zz/NO/TOURS00001"),
        "{:?}",
        keys(&left)
    );
    for k in NEVER_TOUCHED {
        assert!(left.contains_key(k), "{k} must stay: {:?}", keys(&left));
    }
    let next = job::run_standalone(&cfg, None, false, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        next.path,
        PrunePath::Incremental,
        "a full run is not due: {next}"
    );
}

/// The limits refuse a wrong or empty database on the incremental path too (every record looks
/// orphaned there), and a run skips while another holds the sweep's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_refuses_a_wrong_or_empty_database_and_waits_for_the_lock() {
    let env = s3_env();
    let c = case(&env, |_| {}).await;
    let all = objects(&env, &c.bucket).await;
    let empty = TestDb::create().await;
    let mut on_empty = c.config.clone();
    let Some(synapse_s3_offload::config::DatabaseConfig::Postgres(p)) = on_empty.database.as_mut()
    else {
        panic!("a PostgreSQL database")
    };
    p.dbname = empty.name.clone();
    for path in [PrunePath::Incremental, PrunePath::Full] {
        for _ in 0..2 {
            tokio::time::sleep(GRACE).await; // past the grace: only the limits stand in the way
            let r = prune(&on_empty, path).await;
            assert_eq!(r.deleted.count, 0, "{r}");
            assert_eq!(r.refused_reason.as_deref(), Some("empty_database"), "{r}");
        }
    }
    empty.local("ffOTHERmedia1", days_ago(1), None, None).await;
    tokio::time::sleep(GRACE).await;
    let r = prune(&on_empty, PrunePath::Incremental).await;
    assert_eq!(r.refused_reason.as_deref(), Some("too_many_orphans"), "{r}");
    assert_eq!(objects(&env, &c.bucket).await, all, "nothing deleted");

    let db = synapse_s3_offload::synapse_db::Db::new(c.config.database.as_ref().unwrap()).unwrap();
    let lock = db.try_lock().await.unwrap().expect("the lock is free");
    let r = prune(&c.config, PrunePath::Incremental).await;
    assert!(r.skipped_locked, "{r}");
    lock.release().await;
    let r = prune(&c.config, PrunePath::Incremental).await;
    assert!(!r.skipped_locked, "{r}");
}

/// `forget`: a media deleted through Synapse leaves the bucket at once (original and thumbnails);
/// a live media, a media with local files left, and paths outside media are refused; a dry run
/// removes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_removes_a_deleted_media_at_once_and_refuses_a_live_one() {
    let env = s3_env();
    let c = case(&env, |_| {}).await;
    let all = objects(&env, &c.bucket).await;
    let t = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let r = audit::forget_standalone(
        &c.config,
        &t(&[
            "mxc://example.com/aaKEEPmedia01",
            "mxc://example.com/bbGONEmedia01",
            "mxc://r.org/remoteid1",
            "url_cache/2026-01-01/eeURLprev0001",
        ]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.refused(), 4, "{r}");
    let why = |i: usize| r.items[i].refused.clone().unwrap_or_default();
    assert!(why(0).contains("still has a row"), "{r}");
    assert!(why(1).contains("still has a row"), "{r}");
    assert!(why(2).contains("remote media of r.org"), "{r}");
    assert_eq!(objects(&env, &c.bucket).await, all, "nothing removed");

    // The row is gone but Synapse's local files are not (yet).
    c.db.client
        .batch_execute("DELETE FROM local_media_repository_thumbnails WHERE media_id = 'bbGONEmedia01'; DELETE FROM local_media_repository WHERE media_id = 'bbGONEmedia01'")
        .await
        .unwrap();
    let gone = t(&["mxc://example.com/bbGONEmedia01"]);
    let r = audit::forget_standalone(&c.config, &gone, false)
        .await
        .unwrap();
    assert!(why_of(&r).contains("local files"), "{r}");

    synapse_deletes(&c, "bbGONEmedia01").await;
    let r = audit::forget_standalone(&c.config, &gone, true)
        .await
        .unwrap();
    assert_eq!(r.items[0].removed.len(), 2, "{r}");
    assert_eq!(
        objects(&env, &c.bucket).await,
        all,
        "a dry run removes nothing"
    );
    let r = audit::forget_standalone(&c.config, &gone, false)
        .await
        .unwrap();
    assert_eq!(
        r.items[0].removed,
        [
            "local_content/bb/GO/NEmedia01",
            "local_thumbnails/bb/GO/NEmedia01/32-32-image-png-crop"
        ],
        "{r}"
    );
    let left = objects(&env, &c.bucket).await;
    for k in GONE {
        assert!(!left.contains_key(k), "{k}: {:?}", keys(&left));
    }
    for k in NEVER_TOUCHED {
        assert!(left.contains_key(k), "{k} must stay: {:?}", keys(&left));
    }
    let state = State::open(&c.config.state_dir).unwrap();
    let p = synapse_s3_offload::layout::MediaPath::parse("local_content/bb/GO/NEmedia01").unwrap();
    assert_eq!(state.record(&p).unwrap(), None, "its record went with it");
    drop(state);

    // A remote media, by its original's path once its row is gone.
    c.db.client
        .batch_execute("DELETE FROM remote_media_cache WHERE filesystem_id = 'ddREMOTEmed01'")
        .await
        .unwrap();
    std::fs::remove_file(c.store.root.join("remote_content/r.org/dd/RE/MOTEmed01")).unwrap();
    let r = audit::forget_standalone(
        &c.config,
        &t(&["remote_content/r.org/dd/RE/MOTEmed01"]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        r.items[0].removed,
        ["remote_content/r.org/dd/RE/MOTEmed01"],
        "{r}"
    );
}

fn why_of(r: &audit::ForgetReport) -> String {
    r.items[0].refused.clone().unwrap_or_default()
}

/// The daemon's job: on its schedule, deleted media leave the bucket; `status` shows the last
/// prune and the metrics count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_prunes_on_schedule_and_reports_it() {
    let env = s3_env();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let c = case(&env, |raw| {
        raw.prune.enabled = Some(true);
        raw.prune.interval = Some("1s".into());
        raw.sweep.enabled = Some(false);
        raw.metrics.listen = Some(addr.clone());
    })
    .await;
    synapse_deletes(&c, "bbGONEmedia01").await;
    let mut d = Daemon::start(c.config.clone());
    d.ready().await;
    let bucket = c.bucket.clone();
    eventually(
        "the deleted media left the bucket",
        Duration::from_secs(60),
        || {
            let bucket = bucket.clone();
            async move {
                // A LIST only: a GET of an object the daemon deletes meanwhile would fail.
                let left = list_sizes(&s3_env(), &bucket).await;
                match GONE.iter().filter(|k| left.contains_key(**k)).count() {
                    0 => Ok(()),
                    n => Err(format!("{n} still there")),
                }
            }
        },
    )
    .await;
    let left = objects(&env, &c.bucket).await;
    for k in NEVER_TOUCHED {
        assert!(left.contains_key(k), "{k} must stay: {:?}", keys(&left));
    }
    let st = d.status().await;
    let last = st.last_prune.as_ref().expect("status shows the last prune");
    assert!(!last.skipped_locked, "{last}");
    assert!(st.to_string().contains("last prune:"), "{st}");
    let (_, m) = crate::metrics::get(&addr, "/metrics").await;
    let pruned = m
        .lines()
        .find(|l| l.starts_with("synapse_s3_offload_pruned_objects_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(pruned.is_some_and(|n| n >= 2.0), "{m}");
    assert!(
        m.contains("synapse_s3_offload_prunes_total{path=\"full\",outcome=\"done\"}"),
        "{m}"
    );
    d.stop().await;
}

/// The commands: `forget` exits non-zero and names why for a live media, removes a deleted one;
/// `prune --dry-run --json` prints its report and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forget_and_prune_commands() {
    let env = s3_env();
    let c = case(&env, |_| {}).await;
    let yaml = config_yaml(
        &c.store,
        &env.endpoint,
        &c.bucket,
        (&env.access_key, &env.secret_key),
        "  prefix: media/\n",
        &format!(
            "{}prune:\n  grace: 2s\n  max_orphan_percent: 60\n",
            c.db.yaml()
        ),
    );
    let path = c.store.state.with_extension("yaml");
    write_yaml(&path, &yaml);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
            .args(["--config", path.to_str().unwrap()])
            .args(args)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let out = cli(&["forget", "mxc://example.com/aaKEEPmedia01"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("still has a row"), "{stdout}");
    synapse_deletes(&c, "bbGONEmedia01").await;
    let all = objects(&env, &c.bucket).await;
    let out = cli(&["prune", "--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["path"], "full", "{json}");
    assert_eq!(json["orphans"], 2, "{json}");
    assert_eq!(
        objects(&env, &c.bucket).await,
        all,
        "a dry run deletes nothing"
    );
    let out = cli(&["forget", "mxc://example.com/bbGONEmedia01"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("removed 2 objects"), "{stdout}");
    let left = objects(&env, &c.bucket).await;
    assert!(
        GONE.iter().all(|k| !left.contains_key(*k)),
        "{:?}",
        keys(&left)
    );
}

/// The prune job shares the sweep's lock: when its PostgreSQL session ends mid-run (a restart, a
/// cut connection; here the server terminates it) another instance could take the lock, so the
/// run stops with an error instead of deleting on. What it deleted were orphans; the next run
/// deletes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_that_loses_its_lock_stops() {
    let env = s3_env();
    let proxy = crate::faults_proxy::FaultProxy::start(env.addr, 18).await;
    let endpoint = proxy.endpoint();
    let c = case(&env, |raw| {
        raw.s3.endpoint_url = Some(endpoint);
        raw.prune.max_orphan_percent = Some(100.0);
    })
    .await;
    // Forty more media, uploaded, then deleted through Synapse: 80 orphaned objects.
    let ids: Vec<String> = (0..40).map(|i| format!("ffLOCK{i:07}")).collect();
    for (i, id) in ids.iter().enumerate() {
        c.db.local(id, days_ago(1), None, None).await;
        c.db.local_thumb(id, 32, 32, "image/png", "crop").await;
        let (a, b, r) = (&id[..2], &id[2..4], &id[4..]);
        c.store.write(
            &format!("local_content/{a}/{b}/{r}"),
            &bytes(500 + i as u64, 100),
        );
        c.store.write(
            &format!("local_thumbnails/{a}/{b}/{r}/32-32-image-png-crop"),
            &bytes(600 + i as u64, 20),
        );
    }
    let s = backfill::run(&c.config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0, "{s}");
    for id in &ids {
        synapse_deletes(&c, id).await;
    }
    let before = list_sizes(&env, &c.bucket).await.len();
    let first = prune(&c.config, PrunePath::Incremental).await;
    assert_eq!((first.orphans, first.deleted.count), (80, 0), "{first}");
    tokio::time::sleep(GRACE).await;
    // Slow DELETEs: the run lasts long enough to lose its lock in the middle.
    proxy.latency(Duration::from_millis(150));
    let cfg = c.config.clone();
    let run = tokio::spawn(async move {
        job::run_standalone(
            &cfg,
            Some(PrunePath::Incremental),
            false,
            &CancellationToken::new(),
        )
        .await
    });
    eventually("the first deletions", Duration::from_secs(30), || async {
        match list_sizes(&env, &c.bucket).await.len() < before {
            true => Ok(()),
            false => Err("nothing deleted yet".to_owned()),
        }
    })
    .await;
    c.db.end_lock_sessions().await;
    let stopped = run.await.unwrap();
    proxy.latency(Duration::ZERO);
    let why = match stopped {
        Err(audit::AuditError::LostLock(why)) => why,
        other => panic!("the run went on after losing its lock: {other:?}"),
    };
    assert!(why.contains("PostgreSQL"), "{why}");
    let left = list_sizes(&env, &c.bucket).await;
    assert!(
        left.len() > before - 80,
        "stopped early: {} of 80 left",
        left.len() + 80 - before
    );
    for k in NEVER_TOUCHED {
        assert!(left.contains_key(k), "{k} was deleted");
    }
    // The next run takes the lock again and finishes.
    let r = prune_until_deleted(
        &c.config,
        PrunePath::Incremental,
        Instant::now() - GRACE,
        Duration::from_secs(20),
    )
    .await;
    assert!(r.deleted.count > 0, "{r}");
    assert_eq!(list_sizes(&env, &c.bucket).await.len(), before - 80);
}
