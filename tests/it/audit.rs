//! `audit` against the real PostgreSQL and S3 server: every category found with exact counts and
//! examples, `--fix`, orphan pruning with its two-sighting grace, and errors that delete nothing.

use std::time::Duration;

use synapse_s3_offload::audit::{self, Options, Report};
use synapse_s3_offload::backfill::{self, Progress};
use synapse_s3_offload::config::{Config, RawConfig};
use synapse_s3_offload::control::{self, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::support::*;

pub(crate) struct Fixture {
    pub store: Store,
    pub db: TestDb,
    pub bucket: String,
    pub config: Config,
}

pub(crate) async fn put(env: &S3Env, bucket: &str, key: &str, body: &[u8]) {
    client(env)
        .await
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
}

pub(crate) fn config_for(
    env: &S3Env,
    bucket: &str,
    store: &Store,
    db: &TestDb,
    tweak: impl FnOnce(&mut RawConfig),
) -> Config {
    let mut raw = raw_config(env, &env.endpoint, bucket, store);
    raw.database = Some(db.raw());
    raw.s3.prefix = Some("media/".into());
    tweak(&mut raw);
    validated(raw)
}

/// A store, database and bucket where each category is present (see the comments).
pub(crate) async fn fixture(env: &S3Env) -> Fixture {
    let store = Store::new();
    let db = TestDb::create().await;
    let bucket = create_bucket(env, "audit").await;
    let t = days_ago(1);
    let mut n = 0;
    let mut w = |rel: &str| {
        n += 1;
        store.write(rel, &bytes(n, 500 + n as usize * 7));
    };
    // Fine: original, a thumbnail with a row, a thumbnail without a row (its media exists).
    db.local("aaOKmedia00001", t, None, None).await;
    db.local_thumb("aaOKmedia00001", 32, 32, "image/png", "crop")
        .await;
    w("local_content/aa/OK/media00001");
    w("local_thumbnails/aa/OK/media00001/32-32-image-png-crop");
    w("local_thumbnails/aa/OK/media00001/96-96-image-jpeg-scale");
    // Lost: a thumbnail row of that media, and a whole media, with no file anywhere.
    db.local_thumb("aaOKmedia00001", 64, 64, "image/png", "crop")
        .await;
    db.local("bbLOSTmedia001", t, None, None).await;
    // Not uploaded (written after the backfill); mismatched (object replaced below).
    db.local("ccNOTuploaded1", t, None, None).await;
    db.local("ddMISMATCH0001", t, None, None).await;
    w("local_content/dd/MI/SMATCH0001");
    // Recorded as uploaded, then the object was deleted behind our back.
    db.local("kkDELETEDobj01", t, None, None).await;
    w("local_content/kk/DE/LETEDobj01");
    // Byte order traps: `-` sorts before `/`, `.` before `/`; none of these is an orphan.
    for id in ["jjORDERaa", "jjORDERaa-b"] {
        db.local(id, t, None, None).await;
        db.local_thumb(id, 8, 8, "image/png", "crop").await;
        w(&format!("local_content/jj/OR/{}", &id[4..]));
        w(&format!(
            "local_thumbnails/jj/OR/{}/8-8-image-png-crop",
            &id[4..]
        ));
    }
    for origin in ["a.org", "a.org.uk"] {
        db.remote(origin, "rid", "hhREMOTEok0001", t, None).await;
        db.remote_thumb(
            origin,
            "rid",
            "hhREMOTEok0001",
            96,
            96,
            "image/jpeg",
            "crop",
        )
        .await;
        w(&format!("remote_content/{origin}/hh/RE/MOTEok0001"));
        w(&format!(
            "remote_thumbnail/{origin}/hh/RE/MOTEok0001/96-96-image-jpeg-crop"
        ));
    }
    // An unsafe id: reported, never turned into a path.
    db.remote("../../etc", "x", "iiINVALID00001", t, None).await;
    // A URL preview: outside the audit.
    db.local("llURLpreview01", t, None, Some("https://example.com/"))
        .await;
    w("url_cache/2026-01-01/llURLpreview01");

    let config = config_for(env, &bucket, &store, &db, |_| {});
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0, "{s}");

    put(
        env,
        &bucket,
        "media/local_content/dd/MI/SMATCH0001",
        b"other size",
    )
    .await;
    client(env)
        .await
        .delete_object()
        .bucket(&bucket)
        .key("media/local_content/kk/DE/LETEDobj01")
        .send()
        .await
        .unwrap();
    // Orphans: objects whose media has no row (a local media and its thumbnail, a remote one).
    put(
        env,
        &bucket,
        "media/local_content/ee/OR/PHAN00001",
        b"orphan1",
    )
    .await;
    put(
        env,
        &bucket,
        "media/local_thumbnails/ee/OR/PHAN00001/32-32-image-png-crop",
        b"o2",
    )
    .await;
    put(
        env,
        &bucket,
        "media/remote_content/gone.org/ff/OR/PHANremote",
        b"orphan3",
    )
    .await;
    // Not Synapse media paths under the prefix; and an object outside the prefix.
    put(env, &bucket, "media/url_cache/2026-01-01/xyz", b"preview").await;
    put(
        env,
        &bucket,
        "elsewhere/local_content/ee/OR/PHAN00001",
        b"not ours",
    )
    .await;
    // After the backfill: a file not uploaded yet, and a file with no database row.
    w("local_content/cc/NO/Tuploaded1");
    w("local_content/gg/UN/KNOWNfile1");
    Fixture {
        store,
        db,
        bucket,
        config,
    }
}

pub(crate) fn paths(c: &audit::Category) -> Vec<&str> {
    c.examples.iter().map(|e| e.path.as_str()).collect()
}

pub(crate) fn opts() -> Options {
    Options {
        examples: 10,
        ..Options::default()
    }
}

pub(crate) async fn run(config: &Config, o: &Options) -> Report {
    audit::run_standalone(config, o, &CancellationToken::new())
        .await
        .unwrap()
}

async fn run_some(config: &Config, o: &Options) -> Option<Report> {
    Some(run(config, o).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_each_category_with_exact_counts_and_fix_repairs() {
    let env = s3_env();
    let f = fixture(&env).await;
    let r = run(&f.config, &opts()).await;
    assert_eq!(
        paths(&r.lost),
        [
            "local_content/bb/LO/STmedia001",
            "local_thumbnails/aa/OK/media00001/64-64-image-png-crop"
        ],
        "{r}"
    );
    assert_eq!(r.lost.bytes, 1 + 7, "lengths from the database: {r}");
    assert_eq!(
        paths(&r.not_uploaded),
        [
            "local_content/cc/NO/Tuploaded1",
            "local_content/gg/UN/KNOWNfile1",
            "local_content/kk/DE/LETEDobj01"
        ],
        "{r}"
    );
    assert!(
        r.not_uploaded.examples[2]
            .detail
            .contains("gone from the bucket"),
        "{r}"
    );
    assert_eq!(
        paths(&r.mismatched),
        ["local_content/dd/MI/SMATCH0001"],
        "{r}"
    );
    assert_eq!(
        paths(&r.orphans),
        [
            "local_content/ee/OR/PHAN00001",
            "local_thumbnails/ee/OR/PHAN00001/32-32-image-png-crop",
            "remote_content/gone.org/ff/OR/PHANremote"
        ],
        "{r}"
    );
    assert_eq!(
        paths(&r.unknown_local),
        ["local_content/gg/UN/KNOWNfile1"],
        "{r}"
    );
    assert_eq!(r.invalid_database_rows.count, 1, "{r}");
    assert_eq!(r.ignored_objects, 1, "{r}");
    // aa ×3 rows, bb, cc, dd, kk, jj ×4, remote ×4.
    assert_eq!(r.database_files, 15, "{r}");
    assert_eq!(r.orphans_deleted.count, 0);
    // The JSON field names are an interface.
    let json = serde_json::to_value(&r).unwrap();
    for k in [
        "lost",
        "not_uploaded",
        "mismatched",
        "orphans",
        "unknown_local",
    ] {
        assert!(json[k]["count"].is_u64(), "{k} in {json}");
    }

    // --dry-run --fix queues nothing; --fix queues the four files, and an upload pass repairs them.
    let dry = run(
        &f.config,
        &Options {
            fix: true,
            dry_run: true,
            ..opts()
        },
    )
    .await;
    assert_eq!(dry.fix_queued, 4, "{dry}");
    let fixed = run(
        &f.config,
        &Options {
            fix: true,
            ..opts()
        },
    )
    .await;
    assert_eq!(fixed.fix_queued, 4, "{fixed}");
    let s = backfill::run(&f.config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0, "{s}");
    let after = run(&f.config, &opts()).await;
    assert_eq!(after.not_uploaded.count, 0, "{after}");
    assert_eq!(after.mismatched.count, 0, "{after}");
    assert_eq!(after.lost.count, 2, "{after}");
    let objects = objects(&env, &f.bucket).await;
    for rel in [
        "local_content/dd/MI/SMATCH0001",
        "local_content/kk/DE/LETEDobj01",
    ] {
        assert_eq!(
            objects.get(&format!("media/{rel}")),
            Some(&std::fs::read(f.store.root.join(rel)).unwrap()),
            "{rel} repaired byte for byte"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_deleted_only_after_two_sightings_past_the_grace_period() {
    let env = s3_env();
    let mut f = fixture(&env).await;
    // 3 or 4 orphans among about 20 objects: far above the default share (see audit_safety).
    f.config.prune.max_orphan_percent = 50.0;
    let grace = Options {
        delete_orphans: true,
        older_than: Some(Duration::from_secs(2)),
        ..opts()
    };
    // First sighting: nothing is deletable yet, not even with a grace period of zero.
    let first = run(
        &f.config,
        &Options {
            older_than: Some(Duration::ZERO),
            ..grace.clone()
        },
    )
    .await;
    assert_eq!(
        (first.orphans.count, first.orphans_deleted.count),
        (3, 0),
        "{first}"
    );
    // A dry run, repeated until the grace period has passed: lists, deletes nothing.
    let before = objects(&env, &f.bucket).await;
    let dry = Options {
        dry_run: true,
        ..grace.clone()
    };
    let dry = until(
        Duration::from_secs(20),
        || run_some(&f.config, &dry),
        |r| r.orphans_deleted.count == 3,
    )
    .await;
    assert_eq!(dry.orphans_waiting, 0, "{dry}");
    assert_eq!(
        objects(&env, &f.bucket).await,
        before,
        "a dry run deletes nothing"
    );

    // A new orphan, seen once; the media of one old orphan comes back before the real run.
    put(
        &env,
        &f.bucket,
        "media/remote_content/gone.org/zz/NE/WORPHAN01",
        b"new",
    )
    .await;
    f.db.remote("gone.org", "back", "ffORPHANremote", days_ago(1), None)
        .await;
    let r = run(&f.config, &grace).await;
    assert_eq!(
        paths(&r.orphans_deleted),
        [
            "local_content/ee/OR/PHAN00001",
            "local_thumbnails/ee/OR/PHAN00001/32-32-image-png-crop"
        ],
        "{r}"
    );
    let left = objects(&env, &f.bucket).await;
    assert!(!left.contains_key("media/local_content/ee/OR/PHAN00001"));
    for kept in [
        "media/remote_content/gone.org/ff/OR/PHANremote",
        "media/remote_content/gone.org/zz/NE/WORPHAN01",
        "elsewhere/local_content/ee/OR/PHAN00001",
        "media/url_cache/2026-01-01/xyz",
        "media/local_content/aa/OK/media00001",
    ] {
        assert!(left.contains_key(kept), "{kept} must stay: {r}");
    }
    // Nothing local was touched.
    assert!(f.store.root.join("local_content/aa/OK/media00001").exists());
}

/// Runs `f` until its report satisfies `ok` (polling), failing with the last report at `deadline`.
async fn until<F, Fut>(deadline: Duration, mut f: F, ok: impl Fn(&Report) -> bool) -> Report
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Report>>,
{
    let last = std::sync::Mutex::new(None);
    eventually("a report", deadline, || {
        let (next, last, ok) = (f(), &last, &ok);
        async move {
            let r = next.await.ok_or_else(|| "no report".to_string())?;
            let good = ok(&r);
            let text = format!("last report:\n{r}");
            *last.lock().unwrap() = Some(r);
            if good { Ok(()) } else { Err(text) }
        }
    })
    .await;
    last.into_inner().unwrap().expect("a good report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_through_the_daemon_and_fix_uploads_at_once() {
    let env = s3_env();
    let f = fixture(&env).await;
    let d = Daemon::start(f.config.clone());
    let ask = |o: Options| {
        let dir = f.config.state_dir.clone();
        async move {
            match control::request(&dir, &Request::Audit { options: o }).await {
                Ok(Some(Response::Audit(r))) => Some(*r),
                _ => None,
            }
        }
    };
    // The daemon uploads the new files itself; what it cannot know of stays for the audit.
    let r = until(
        Duration::from_secs(30),
        || ask(opts()),
        |r| r.not_uploaded.count == 1,
    )
    .await;
    assert_eq!(
        paths(&r.not_uploaded),
        ["local_content/kk/DE/LETEDobj01"],
        "{r}"
    );
    assert_eq!(r.mismatched.count, 1, "{r}");
    let fixed = ask(Options {
        fix: true,
        ..opts()
    })
    .await
    .unwrap();
    assert_eq!(fixed.fix_queued, 2, "{fixed}");
    until(
        Duration::from_secs(30),
        || ask(opts()),
        |r| r.not_uploaded.count + r.mismatched.count == 0,
    )
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_or_database_errors_abort_the_audit_and_delete_nothing() {
    let env = s3_env();
    let f = fixture(&env).await;
    let prune = Options {
        delete_orphans: true,
        older_than: Some(Duration::ZERO),
        ..opts()
    };
    run(&f.config, &prune).await; // first sightings
    let before = objects(&env, &f.bucket).await;

    let mut bad_bucket = f.config.clone();
    bad_bucket.s3.bucket = "no-such-bucket-for-audit".into();
    let e = audit::run_standalone(&bad_bucket, &prune, &CancellationToken::new())
        .await
        .unwrap_err();
    let msg = synapse_s3_offload::Chain(&e).to_string();
    assert!(msg.contains("LIST") && msg.contains("bucket"), "{msg}");

    let mut bad_db = f.config.clone();
    let Some(synapse_s3_offload::config::DatabaseConfig::Postgres(p)) = bad_db.database.as_mut()
    else {
        panic!("PostgreSQL expected")
    };
    p.dbname = "no_such_database_for_audit".into();
    let e = audit::run_standalone(&bad_db, &prune, &CancellationToken::new())
        .await
        .unwrap_err();
    let msg = synapse_s3_offload::Chain(&e).to_string();
    assert!(msg.contains("PostgreSQL"), "{msg}");
    assert_eq!(objects(&env, &f.bucket).await, before, "nothing deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_json_and_exits_3_when_media_are_lost() {
    let env = s3_env();
    let f = fixture(&env).await;
    let yaml = config_yaml(
        &f.store,
        &env.endpoint,
        &f.bucket,
        (&env.access_key, &env.secret_key),
        "  prefix: media/\n",
        &f.db.yaml(),
    );
    let path = f.store.state.with_extension("yaml");
    write_yaml(&path, &yaml);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .args(["--config", path.to_str().unwrap(), "audit", "--json"])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["lost"]["count"], 2, "{json}");
    assert_eq!(json["orphans"]["count"], 3, "{json}");
    assert!(stderr.contains("lost"), "{stderr}");
    // Pruning needs its grace period spelled out.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .args([
            "--config",
            path.to_str().unwrap(),
            "audit",
            "--delete-orphans",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"));
}
