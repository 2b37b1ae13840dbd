//! `audit` where a wrong answer would cost data or report false alarms: orphan pruning against a
//! wrong or empty database, duplicate database keys on a page boundary, a symlinked top-level
//! folder, and a bounded database snapshot.

use std::time::Duration;

use synapse_s3_offload::audit::Options;

use crate::audit::{fixture, opts, paths, run};
use crate::support::*;

fn prune() -> Options {
    Options {
        delete_orphans: true,
        older_than: Some(Duration::ZERO),
        ..opts()
    }
}

/// `database:` pointed at an empty database, then at a wrong one (a single media row): every
/// object looks orphaned, two audits apart, and the re-check before each DELETE asks that same
/// database. The limits refuse, say why, and delete nothing; the real database with a count
/// limit refuses too; `ignore_prune_limits` goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_refuses_a_wrong_database_and_too_many_orphans_unless_overridden() {
    let env = s3_env();
    let f = fixture(&env).await;
    let before = objects(&env, &f.bucket).await;

    let empty = TestDb::create().await;
    let mut on_empty = f.config.clone();
    let Some(synapse_s3_offload::config::DatabaseConfig::Postgres(p)) = on_empty.database.as_mut()
    else {
        panic!("PostgreSQL expected")
    };
    p.dbname = empty.name.clone();
    run(&on_empty, &prune()).await; // first sightings of everything
    let r = run(&on_empty, &prune()).await;
    let why = r.prune_refused.as_deref().unwrap_or_default();
    assert!(why.contains("lists no media"), "{r}");
    assert_eq!(r.orphans_deleted.count, 0, "{r}");
    assert!(r.to_string().contains("refused"), "{r}");
    let forced = Options {
        ignore_prune_limits: true,
        ..prune()
    };
    let r = run(&on_empty, &forced).await;
    assert!(
        r.prune_refused.is_some(),
        "no override for an empty database: {r}"
    );
    assert_eq!(objects(&env, &f.bucket).await, before, "nothing deleted");

    empty.local("aaOKmedia00001", days_ago(1), None, None).await;
    let r = run(&on_empty, &prune()).await;
    let why = r.prune_refused.as_deref().unwrap_or_default();
    assert!(why.contains("prune.max_orphan_percent (5 %)"), "{r}");
    assert_eq!(objects(&env, &f.bucket).await, before, "nothing deleted");

    // The real database: 3 orphans, both seen before; a share limit that lets them through, a
    // count limit that does not.
    let mut real = f.config.clone();
    real.prune.max_orphan_percent = 50.0;
    real.prune.max_deletions_per_run = 2;
    run(&real, &prune()).await;
    let r = run(&real, &prune()).await;
    let why = r.prune_refused.as_deref().unwrap_or_default();
    assert!(why.contains("would delete 3 orphaned objects"), "{r}");
    assert_eq!(objects(&env, &f.bucket).await, before, "nothing deleted");

    let r = run(
        &real,
        &Options {
            ignore_prune_limits: true,
            ..prune()
        },
    )
    .await;
    assert_eq!(r.prune_refused, None, "{r}");
    assert_eq!(
        paths(&r.orphans_deleted),
        [
            "local_content/ee/OR/PHAN00001",
            "local_thumbnails/ee/OR/PHAN00001/32-32-image-png-crop",
            "remote_content/gone.org/ff/OR/PHANremote"
        ],
        "{r}"
    );
}

/// Quarantined media keep their rows (Synapse only refuses to serve them): never orphans, never
/// pruned, even as the only copy and with the limits overridden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_media_are_not_orphans() {
    let env = s3_env();
    let f = fixture(&env).await;
    f.db.client
        .batch_execute(
            "UPDATE local_media_repository SET quarantined_by = '@admin:example.com' WHERE media_id = 'aaOKmedia00001'; \
             UPDATE remote_media_cache SET quarantined_by = '@admin:example.com' WHERE filesystem_id = 'hhREMOTEok0001'",
        )
        .await
        .unwrap();
    std::fs::remove_file(f.store.root.join("local_content/aa/OK/media00001")).unwrap();
    let all = Options {
        ignore_prune_limits: true,
        ..prune()
    };
    run(&f.config, &all).await;
    let r = run(&f.config, &all).await;
    assert_eq!(r.orphans.count, 3, "only the three real orphans: {r}");
    assert_eq!(r.orphans_deleted.count, 3, "{r}");
    assert!(
        !paths(&r.lost).contains(&"local_content/aa/OK/media00001"),
        "{r}"
    );
    let left = objects(&env, &f.bucket).await;
    for kept in [
        "media/local_content/aa/OK/media00001",
        "media/local_thumbnails/aa/OK/media00001/32-32-image-png-crop",
        "media/remote_content/a.org/hh/RE/MOTEok0001",
    ] {
        assert!(left.contains_key(kept), "{kept} must stay: {r}");
    }
}

/// Two remote media sharing a filesystem id give two rows with the same path; when they straddle
/// the boundary of a 5,000-row FETCH, the second one must still count once with the first, not
/// come back alone as a lost file (its object was taken by the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_rows_on_a_page_boundary_count_once() {
    let env = s3_env();
    let store = Store::new();
    let db = TestDb::create().await;
    let bucket = create_bucket(&env, "auditdup").await;
    // 2,499 local media (a content row and a thumbnail-folder row each) and one thumbnail row:
    // 4,999 rows sort before remote_content, so its two equal rows are rows 5,000 and 5,001.
    db.client
        .batch_execute(
            "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id) \
               SELECT 'lm' || lpad(i::text, 10, '0'), 'image/png', 1, 0, 'x.png', '@u:example.com' FROM generate_series(1, 2499) i; \
             INSERT INTO local_media_repository_thumbnails VALUES ('lm0000000001', 8, 8, 'image/png', 'crop', 1)",
        )
        .await
        .unwrap();
    for media_id in ["first", "second"] {
        db.remote("dup.org", media_id, "duPLicate01", days_ago(1), None)
            .await;
    }
    crate::audit::put(
        &env,
        &bucket,
        "media/remote_content/dup.org/du/PL/icate01",
        b"shared",
    )
    .await;
    let config = crate::audit::config_for(&env, &bucket, &store, &db, |_| {});
    let r = run(
        &config,
        &Options {
            examples: 3000,
            ..opts()
        },
    )
    .await;
    assert_eq!(
        r.lost.count, 2500,
        "the local media and thumbnail only: {}",
        r.lost.count
    );
    assert!(
        !paths(&r.lost).contains(&"remote_content/dup.org/du/PL/icate01"),
        "the duplicate came back as lost"
    );
    assert_eq!(r.database_files, 2501, "{r}");
    assert_eq!(r.orphans.count, 0, "{r}");
}

/// A top-level folder that is a symlink to elsewhere is not walked (the uploader and the sweep
/// do not follow it either): its files are neither counted nor reported as the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_does_not_follow_a_symlinked_top_level_folder() {
    let env = s3_env();
    let store = Store::new();
    let db = TestDb::create().await;
    let bucket = create_bucket(&env, "auditlink").await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(outside.path().join("ab/cd")).unwrap();
    std::fs::write(outside.path().join("ab/cd/efgh"), b"not in the store").unwrap();
    std::fs::create_dir_all(&store.root).unwrap();
    std::os::unix::fs::symlink(outside.path(), store.root.join("local_content")).unwrap();
    store.write("remote_content/a.org/ab/cd/real", b"in the store");
    let config = crate::audit::config_for(&env, &bucket, &store, &db, |_| {});
    let r = run(&config, &opts()).await;
    assert_eq!(r.local_files, 1, "{r}");
    assert_eq!(
        paths(&r.unknown_local),
        ["remote_content/a.org/ab/cd/real"],
        "{r}"
    );
}

/// The database is read through a REPEATABLE READ snapshot; held for a whole audit of millions of
/// media it holds back Synapse's vacuum. The stream starts a new snapshot (going on after the
/// last path read) once the current one is older than its bound (here zero: before every FETCH),
/// and still yields every row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_snapshot_is_renewed_and_yields_every_row_once() {
    use synapse_s3_offload::audit::sources::DbStream;
    use synapse_s3_offload::synapse_db::Db;
    let env = s3_env();
    let store = Store::new();
    let db = TestDb::create().await;
    db.client
        .batch_execute(
            "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id) \
               SELECT 'sn' || lpad(i::text, 10, '0'), 'image/png', 1, 0, 'x.png', '@u:example.com' FROM generate_series(1, 6000) i",
        )
        .await
        .unwrap();
    let config = crate::audit::config_for(&env, "unused", &store, &db, |_| {});
    let pg = Db::new(config.database.as_ref().unwrap()).unwrap();
    let mut stream = DbStream::open_with_max_age(&pg, Duration::ZERO)
        .await
        .unwrap();
    // When the audit's transaction (the other session in this database) started.
    let snapshot_started = || async {
        db.client
            .query_one(
                "SELECT max(xact_start)::text FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
    };
    let (mut keys, mut rows) = (std::collections::BTreeSet::new(), 0);
    let mut snapshots = std::collections::BTreeSet::new();
    loop {
        let fetching = stream.rows.peek().is_none();
        stream.fill(0).await.unwrap();
        if fetching {
            snapshots.insert(snapshot_started().await);
        }
        let Some(key) = stream.rows.peek().map(str::to_owned) else {
            break;
        };
        while stream.rows.take(&key).is_some() {
            rows += 1;
        }
        assert!(keys.insert(key.clone()), "{key} yielded twice");
    }
    assert_eq!(
        rows, 12_000,
        "each media: a content row and a thumbnail-folder row"
    );
    assert!(
        snapshots.len() >= 3,
        "one snapshot per FETCH of 5,000 rows: {snapshots:?}"
    );
}
