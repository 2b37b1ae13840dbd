//! Stuck or wasteful (issue 22, items 5–8): no duplicate uploads or look-ups.

use std::time::Duration;

use crate::proxy::Proxy;
use crate::support::*;

/// A file in a new directory is re-enqueued while its upload is in flight (the 0.2/1/5 s rescans
/// of a new directory find it): that marked it dirty, its record provisional, and it was uploaded
/// a second time (9 files → 15 PUTs; since the verified-copy rule, a second HEAD and full read to
/// adopt). An unchanged file is handled once; one written again while in flight still is
/// uploaded again (the record of the first bytes is provisional).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_found_again_while_its_upload_is_in_flight_is_put_once() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    // Long enough for the 0.2 s and 1 s rescans of its new directory to find the file in flight.
    proxy.set_put_delay(Duration::from_millis(1_500));
    let bucket = create_bucket(&env, "dirty").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    crate::daemon::fast(&mut raw);
    let mut d = Daemon::start(validated(raw));
    d.ready().await;
    let files: Vec<_> = (0..4)
        .map(|i| {
            let rel = format!("local_content/du/p{i}/file");
            (rel.clone(), store.write_bytes(&rel, bytes(70 + i, 50_000)))
        })
        .collect();
    eventually("the files in the bucket", Duration::from_secs(60), || {
        listed(&env, &bucket, &files)
    })
    .await;
    // A rescheduled duplicate keeps the item queued until its second PUT is done.
    d.drained().await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
    // One look-up and one PUT each. A second round after a spurious dirty mark costs a HEAD and
    // a full read of the file to adopt its own object (a second PUT before issue 13's rule).
    for method in ["HEAD", "PUT"] {
        let requests = proxy.object_requests(method);
        for (rel, _) in &files {
            let key = format!("/{rel}");
            let n = requests
                .iter()
                .filter(|r| r.path.split('?').next() == Some(&*format!("/{bucket}{key}")))
                .count();
            assert_eq!(n, 1, "{rel}: {method} {n} times");
        }
    }

    // Written again (new bytes, a later mtime) while its PUT is in flight: uploaded again.
    proxy.clear();
    let rel = "local_content/du/re/file".to_owned();
    store.write(&rel, &bytes(80, 50_000));
    wait_until("its PUT in flight", Duration::from_secs(20), || {
        !proxy.object_requests("PUT").is_empty()
    })
    .await;
    let second = store.write_bytes(&rel, bytes(81, 50_000));
    let want = [(rel.clone(), second)];
    eventually(
        "the second content in the bucket",
        Duration::from_secs(60),
        || all_uploaded(&env, &bucket, &want),
    )
    .await;
    d.stop_drained().await;
}

/// The PUTs the proxy saw of `rel` in `bucket`.
fn puts_of(proxy: &Proxy, bucket: &str, rel: &str) -> usize {
    let want = format!("/{bucket}/{rel}");
    proxy
        .object_requests("PUT")
        .iter()
        .filter(|r| r.path.split('?').next() == Some(&*want))
        .count()
}

/// Synapse closes a new file, then runs its spam checker, then deletes the file if the checker
/// rejects it (`MediaStorage.store_into_file`). We uploaded on the close event (and the new
/// directory's rescans found it at once too): the rejected media reached the bucket. Now no file
/// is PUT before `upload.hold_after_close` (1 s by default) has passed since its close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_synapse_deletes_right_after_closing_it_never_reaches_the_bucket() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "spam").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    crate::daemon::fast(&mut raw);
    let mut d = Daemon::start(validated(raw));
    d.ready().await;
    let rejected = "local_content/sp/am/rejectedmedia";
    store.write(rejected, &bytes(90, 30_000));
    // The spam checker answers after 300 ms: "spam".
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_file(store.root.join(rejected)).unwrap();
    let kept = vec![(
        "local_content/sp/am/acceptedmedia".to_owned(),
        store.write_bytes("local_content/sp/am/acceptedmedia", bytes(91, 30_000)),
    )];
    eventually(
        "the accepted file in the bucket",
        Duration::from_secs(30),
        || listed(&env, &bucket, &kept),
    )
    .await;
    d.drained().await;
    assert_eq!(
        puts_of(&proxy, &bucket, rejected),
        0,
        "the rejected file was PUT"
    );
    assert!(!objects(&env, &bucket).await.contains_key(rejected));
    d.stop_drained().await;
}

/// A spam checker slower than the hold: the file is deleted while its PUT is in flight. Synapse
/// never inserts a row for a rejected media, so once the PUT is done and the file is gone, the
/// object is deleted (nothing of Synapse's can read it). A file that vanishes the same way but
/// whose media has a row (an asynchronous upload's row comes first) keeps its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_during_its_upload_is_withdrawn_only_without_a_database_row() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    proxy.set_put_delay(Duration::from_millis(1_500));
    let bucket = create_bucket(&env, "withdraw").await;
    let db = TestDb::create().await;
    let store = Store::new();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    crate::daemon::fast(&mut raw);
    raw.upload.hold_after_close = Some("0s".into());
    raw.database = Some(db.raw());
    let mut d = Daemon::start(validated(raw));
    d.ready().await;
    let (rejected, rowed) = (
        "local_content/wi/th/rejectedmedia",
        "local_content/wi/th/rowedmediaid0",
    );
    db.local("withrowedmediaid0", 0, None, None).await;
    store.write(rejected, &bytes(92, 30_000));
    store.write(rowed, &bytes(93, 30_000));
    wait_until("both PUTs in flight", Duration::from_secs(20), || {
        puts_of(&proxy, &bucket, rejected) > 0 && puts_of(&proxy, &bucket, rowed) > 0
    })
    .await;
    std::fs::remove_file(store.root.join(rejected)).unwrap();
    std::fs::remove_file(store.root.join(rowed)).unwrap();
    d.drained().await;
    let now = objects(&env, &bucket).await;
    assert!(
        !now.contains_key(rejected),
        "the rejected media's object stayed"
    );
    assert!(
        now.contains_key(rowed),
        "an object whose media has a row was deleted"
    );
    d.stop_drained().await;
}

/// A spam checker slower than the hold and the PUT: the file is deleted after its record was
/// committed. Its deletion event brings it back to the upload, which finds no database row for
/// the media and deletes the object (and forgets its record). A fresh media that keeps its row
/// (deleted locally by someone else) keeps its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_synapse_deletes_after_its_upload_is_withdrawn_without_a_database_row() {
    let env = s3_env();
    let bucket = create_bucket(&env, "late-spam").await;
    let db = TestDb::create().await;
    let store = Store::new();
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    crate::daemon::fast(&mut raw);
    raw.upload.hold_after_close = Some("200ms".into());
    raw.database = Some(db.raw());
    // The media's directory exists before the daemon starts, so the startup watch covers it: a
    // directory made with the files is watched a moment after them, and under CI's load the
    // upload and the test's deletion could both come before that watch (no deletion event: the
    // object stays until the prune job finds it orphaned). This test is about the deletion.
    std::fs::create_dir_all(store.root.join("local_content/la/te")).unwrap();
    let mut d = Daemon::start(validated(raw));
    d.ready().await;
    let (rejected, rowed) = (
        "local_content/la/te/rejectedmedia",
        "local_content/la/te/rowedmediaid0",
    );
    db.local("laterowedmediaid0", 0, None, None).await;
    let files = vec![
        (
            rejected.to_owned(),
            store.write_bytes(rejected, bytes(94, 20_000)),
        ),
        (
            rowed.to_owned(),
            store.write_bytes(rowed, bytes(95, 20_000)),
        ),
    ];
    eventually("both in the bucket", Duration::from_secs(30), || {
        listed(&env, &bucket, &files)
    })
    .await;
    d.drained().await;
    // The checker answers now, seconds later: "spam" for one, the other is deleted locally.
    std::fs::remove_file(store.root.join(rejected)).unwrap();
    std::fs::remove_file(store.root.join(rowed)).unwrap();
    eventually(
        "the rejected media's object gone",
        Duration::from_secs(30),
        || async {
            match list_sizes(&env, &bucket).await.contains_key(rejected) {
                true => Err("still there".to_owned()),
                false => Ok(()),
            }
        },
    )
    .await;
    d.drained().await;
    assert!(objects(&env, &bucket).await.contains_key(rowed));
    d.stop_drained().await;
}
