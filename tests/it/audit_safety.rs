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
    on_empty.database.as_mut().unwrap().dbname = empty.name.clone();
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
