//! The SQLite backend against Synapse's real schema (tests/fixtures/synapse_sqlite_schema.sql).

use super::*;

#[tokio::test]
async fn the_lock_file_excludes_a_second_sweep_and_is_lost_when_removed() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::new(&SqliteConfig {
        path: dir.path().join("homeserver.db"),
        statement_timeout: Duration::from_secs(1),
        lock_dir: Some(dir.path().to_owned()),
    });
    let lock = db.try_lock().await.unwrap().expect("free");
    assert!(db.try_lock().await.unwrap().is_none(), "held: refused");
    assert_eq!(lock.still_held(), Ok(()));
    std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
    let why = lock.still_held().unwrap_err();
    assert!(why.contains("is gone"), "{why}");
    lock.release();
    assert!(
        db.try_lock().await.unwrap().is_some(),
        "released: free again"
    );
}

/// The queries not driven end to end by the integration tests: presence re-checks of both
/// kinds, Synapse's hash of a remote media, remote keyset pages.
#[tokio::test]
async fn presence_hash_and_remote_pages_on_synapses_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("homeserver.db");
    let w = Connection::open(&path).unwrap();
    // One transaction: ~1,000 statements committed one by one take seconds of fsync.
    w.execute_batch(concat!(
        "BEGIN;",
        include_str!("../../../tests/fixtures/synapse_sqlite_schema.sql"),
        "COMMIT;"
    ))
    .unwrap();
    let sha = "ab".repeat(32);
    w.execute_batch(&format!(
        "INSERT INTO local_media_repository (media_id, created_ts) VALUES ('aaLOCAL', 1); \
         INSERT INTO local_media_repository_thumbnails (media_id) VALUES ('bbTHUMBONLY'); \
         INSERT INTO remote_media_cache (media_origin, media_id, filesystem_id, created_ts, sha256) \
           VALUES ('a.org', 'm1', 'fsONE', 1, '{sha}'), ('a.org', 'm2', 'fsTWO', 1, NULL), \
                  ('b.org', 'm1', 'fsTHREE', 5, NULL); \
         INSERT INTO remote_media_cache_thumbnails (media_origin, media_id, filesystem_id) \
           VALUES ('c.org', 'm9', 'fsTHUMB');"
    ))
    .unwrap();
    let db = SqliteDb::new(&SqliteConfig {
        path,
        statement_timeout: Duration::from_secs(5),
        lock_dir: None,
    });
    let ids = ["aaLOCAL", "bbTHUMBONLY", "ccGONE", "it's \"odd\""].map(String::from);
    let present = db.local_media_present(&ids).await.unwrap();
    assert_eq!(
        present,
        HashSet::from(["aaLOCAL".into(), "bbTHUMBONLY".into()])
    );
    let origins = ["a.org", "a.org", "c.org", "b.org"].map(String::from);
    let fs_ids = ["fsONE", "fsGONE", "fsTHUMB", "fsONE"].map(String::from);
    let present = db.remote_media_present(&origins, &fs_ids).await.unwrap();
    let want = [("a.org", "fsONE"), ("c.org", "fsTHUMB")];
    assert_eq!(
        present,
        want.iter()
            .map(|(o, f)| (o.to_string(), f.to_string()))
            .collect()
    );
    let remote = |o: &str, f: &str| MediaRef::Remote {
        origin: o.into(),
        fs_id: f.into(),
    };
    let hash = db.content_sha256(&remote("a.org", "fsONE")).await.unwrap();
    assert_eq!(hash, crate::sha256::parse_hex(&sha));
    assert_eq!(
        db.content_sha256(&remote("a.org", "fsTWO")).await.unwrap(),
        None
    );
    assert_eq!(
        db.content_sha256(&MediaRef::Local("nope".into()))
            .await
            .unwrap(),
        None
    );
    // Pages of one after (origin, media_id); b.org's media is not aged at cutoff 2.
    let mut after = (String::new(), String::new());
    let mut seen = Vec::new();
    loop {
        let page = db.aged_remote(2, (&after.0, &after.1), 1).await.unwrap();
        let Some(AgedMedia::Remote {
            origin,
            media_id,
            filesystem_id,
            ..
        }) = page.into_iter().next()
        else {
            break;
        };
        seen.push(filesystem_id);
        after = (origin, media_id);
    }
    assert_eq!(seen, ["fsONE", "fsTWO"]);
}
