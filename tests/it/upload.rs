//! The one-shot `upload` (backfill): verified, byte-identical, idempotent, and honest about what it
//! sends.

use std::time::Duration;

use synapse_s3_offload::backfill::{self, Progress, Summary};
use synapse_s3_offload::config::{Config, SizeValue};
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::support::*;

async fn backfill(config: &Config) -> Summary {
    backfill::run(config, Progress::Log, CancellationToken::new())
        .await
        .expect("backfill")
}

/// A store with every kind of Synapse media, a URL-preview file and one file above the multipart
/// threshold (5 MiB here, so the multipart path runs with two parts).
fn synapse_store(store: &Store) {
    store.write("local_content/ab/cd/efghijklmnop", &bytes(1, 150_000));
    store.write(
        "local_thumbnails/ab/cd/efghijklmnop/32-32-image-png-crop",
        &bytes(2, 3_000),
    );
    store.write(
        "local_thumbnails/ab/cd/efghijklmnop/800-600-image-jpeg-scale",
        &bytes(3, 40_000),
    );
    store.write(
        "remote_content/matrix.org/xy/zw/remotefileid",
        &bytes(4, 70_000),
    );
    store.write(
        "remote_thumbnail/matrix.org/xy/zw/remotefileid/96-96-image-jpeg-crop",
        &bytes(5, 5_000),
    );
    store.write("local_content/qq/rr/emptyfile", b"");
    store.write(
        "local_content/vv/ww/bigvideo",
        &bytes(6, 7 * 1024 * 1024 + 123),
    );
    store.write("url_cache/2024-01-01/preview", &bytes(7, 1_000));
    store.write(
        "url_cache_thumbnails/2024-01-01/preview/32-32-image-png-crop",
        &bytes(8, 100),
    );
}

fn small_multipart(raw: &mut synapse_s3_offload::config::RawConfig) {
    raw.upload.multipart_threshold = Some(SizeValue::Text("5MiB".into()));
    raw.upload.multipart_part_size = Some(SizeValue::Text("5MiB".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_a_synapse_store_byte_identical_at_the_right_keys() {
    let env = s3_env();
    let bucket = create_bucket(&env, "layout").await;
    let store = Store::new();
    synapse_store(&store);
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.s3.prefix = Some("synapse/".into());
    small_multipart(&mut raw);
    let s = backfill(&validated(raw)).await;
    assert_eq!((s.uploaded, s.failed, s.adopted), (7, 0, 0), "{s}");

    let objects = objects(&env, &bucket).await;
    let mut expected: Vec<_> = store
        .read_all("")
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("url_cache"))
        .map(|(rel, data)| (format!("synapse/{rel}"), data))
        .collect();
    expected.sort();
    let got: Vec<_> = objects.into_iter().collect();
    assert_eq!(got.len(), expected.len());
    for ((gk, gv), (ek, ev)) in got.iter().zip(&expected) {
        assert_eq!(gk, ek);
        assert!(gv == ev, "object {gk} differs from the file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_cache_is_uploaded_only_when_asked() {
    let env = s3_env();
    let bucket = create_bucket(&env, "urlcache").await;
    let store = Store::new();
    store.write("url_cache/2024-01-01/preview", &bytes(7, 1_000));
    store.write("local_content/ab/cd/x", &bytes(8, 10));
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.upload.include_url_cache = Some(true);
    let s = backfill(&validated(raw)).await;
    assert_eq!(s.uploaded, 2, "{s}");
    assert!(
        objects(&env, &bucket)
            .await
            .contains_key("url_cache/2024-01-01/preview")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_makes_no_object_requests_at_all() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "rerun").await;
    let store = Store::new();
    synapse_store(&store);
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    small_multipart(&mut raw);
    let config = validated(raw);
    let first = backfill(&config).await;
    assert_eq!(first.uploaded, 7);
    assert_eq!(
        proxy.object_requests("PUT").len(),
        6 + 2,
        "6 PUTs and 2 parts, no more"
    );
    // An empty bucket has nothing to adopt: the only HEAD confirms the multipart upload.
    assert_eq!(proxy.object_requests("HEAD").len(), 1);

    proxy.clear();
    let second = backfill(&config).await;
    assert_eq!((second.uploaded, second.unchanged), (0, 7), "{second}");
    let reqs = proxy.requests();
    assert!(
        reqs.iter().all(|r| !r.is_object()),
        "the records answer everything: {reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_already_in_the_bucket_are_recorded_without_a_put() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "adopt").await;
    let store = Store::new();
    synapse_store(&store);
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    small_multipart(&mut raw);
    let config = validated(raw);
    backfill(&config).await;

    // Lose the records (a new machine, or the state was moved aside) and add an object the way
    // s3_media_upload does: a plain PUT, no digest metadata (its ETag is the MD5).
    std::fs::remove_dir_all(&store.state).unwrap();
    let legacy = bytes(9, 2_000);
    store.write("local_content/le/ga/cyupload", &legacy);
    client(&env)
        .await
        .put_object()
        .bucket(&bucket)
        .key("local_content/le/ga/cyupload")
        .body(legacy.into())
        .send()
        .await
        .unwrap();
    // And one whose object has other content, which we never verified and no database hash
    // arbitrates: a conflict, both kept (never adopted, never overwritten).
    store.write("local_content/ot/he/rcontent", b"local version");
    client(&env)
        .await
        .put_object()
        .bucket(&bucket)
        .key("local_content/ot/he/rcontent")
        .body(b"bucket version!".to_vec().into())
        .send()
        .await
        .unwrap();

    proxy.clear();
    let s = backfill(&config).await;
    assert_eq!(
        (s.adopted, s.uploaded, s.failed, s.conflicts),
        (8, 0, 1, 1),
        "{s}"
    );
    let puts = proxy.object_requests("PUT");
    assert!(puts.is_empty(), "{puts:?}");
    assert_eq!(
        objects(&env, &bucket).await["local_content/ot/he/rcontent"],
        b"bucket version!"
    );
    assert_eq!(
        std::fs::read(store.root.join("local_content/ot/he/rcontent")).unwrap(),
        b"local version"
    );
    // Reported for status and audit until resolved.
    let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
    let problems = state.problems_after(None, 10).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "local_content/ot/he/rcontent");
    assert_eq!(
        problems[0].1.kind,
        synapse_s3_offload::state::ProblemKind::Conflict
    );
    drop(state);

    // The operator resolves it (README): the local file is right, so the object is deleted; the
    // next run uploads the file and the conflict is over.
    client(&env)
        .await
        .delete_object()
        .bucket(&bucket)
        .key("local_content/ot/he/rcontent")
        .send()
        .await
        .unwrap();
    let s = backfill(&config).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
    assert_eq!(state.problems_after(None, 10).unwrap(), []);
    drop(state);
    // Or the object is right: the local file is deleted (Synapse reads the object back).
    store.write("local_content/ot/he/rcontent2", b"local version");
    client(&env)
        .await
        .put_object()
        .bucket(&bucket)
        .key("local_content/ot/he/rcontent2")
        .body(b"bucket version!".to_vec().into())
        .send()
        .await
        .unwrap();
    assert_eq!(backfill(&config).await.conflicts, 1);
    std::fs::remove_file(store.root.join("local_content/ot/he/rcontent2")).unwrap();
    assert_eq!(backfill(&config).await.failed, 0);
    let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
    assert_eq!(
        state.problems_after(None, 10).unwrap(),
        [],
        "over once the file is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_growing_during_its_upload_ends_up_with_its_final_content() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "growing").await;
    let store = Store::new();
    let path = store.write("local_content/gr/ow/ing", &bytes(10, 50_000));
    let config = validated(raw_config(&env, &proxy.endpoint(), &bucket, &store));
    proxy.set_put_delay(Duration::from_millis(700));
    let run = tokio::spawn(async move { backfill(&config).await });
    wait_until("the first PUT", Duration::from_secs(20), || {
        !proxy.object_requests("PUT").is_empty()
    })
    .await;
    // Synapse (or anyone) appends while the first PUT is in flight.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&bytes(11, 30_000))
        .unwrap();
    let s = run.await.unwrap();
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    assert_eq!(
        proxy.object_requests("PUT").len(),
        2,
        "uploaded again after the change"
    );
    let final_content = std::fs::read(&path).unwrap();
    assert_eq!(final_content.len(), 80_000);
    assert!(objects(&env, &bucket).await["local_content/gr/ow/ing"] == final_content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_checksum_headers_or_chunked_bodies_by_default() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "nochecksum").await;
    let store = Store::new();
    synapse_store(&store);
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    small_multipart(&mut raw);
    backfill(&validated(raw)).await;
    let reqs = proxy.requests();
    assert!(reqs.len() > 10);
    for r in &reqs {
        for (k, v) in &r.headers {
            assert!(
                !k.starts_with("x-amz-checksum")
                    && k != "x-amz-sdk-checksum-algorithm"
                    && k != "x-amz-trailer",
                "{r:?}"
            );
            assert!(
                !v.contains("aws-chunked") && !v.contains("STREAMING-"),
                "{r:?}"
            );
        }
        if r.method == "PUT" {
            assert!(
                r.header("content-md5").is_some(),
                "every PUT and part carries Content-MD5: {r:?}"
            );
        }
    }

    // The same check sees them when they are turned on, so it can fail.
    let proxy2 = Proxy::start(env.addr).await;
    let bucket2 = create_bucket(&env, "withchecksum").await;
    let store2 = Store::new();
    store2.write("local_content/ab/cd/x", &bytes(1, 1000));
    let mut raw = raw_config(&env, &proxy2.endpoint(), &bucket2, &store2);
    raw.s3.request_checksum_calculation = Some("when_supported".into());
    backfill(&validated(raw)).await;
    let put = &proxy2.object_requests("PUT")[0];
    assert!(
        put.headers
            .iter()
            .any(|(k, _)| k.starts_with("x-amz-checksum") || k == "x-amz-trailer"),
        "{put:?}"
    );
}

/// Bodies are sent without a SHA-256 in the signature (UNSIGNED-PAYLOAD, the cheapest way to
/// sign), so Content-MD5 alone must stop a body damaged on the way: every PUT, from memory or
/// streamed from disk, is refused and its file is not recorded (so it is tried again).
/// (s3s-fs 0.14.1 keeps the damaged object despite its BadDigest answer, where S3 stores nothing,
/// and does not check Content-MD5 on UploadPart at all, so parts are not covered here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_damaged_in_transit_is_refused_by_its_content_md5() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "damaged").await;
    let store = Store::new();
    store.write("local_content/ab/cd/inline", &bytes(11, 20_000));
    store.write("local_content/ab/cd/streamed", &bytes(12, 1_500_000));
    let config = validated(raw_config(&env, &proxy.endpoint(), &bucket, &store));
    proxy.corrupt_puts(true);
    let summary = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .expect("a damaged body fails its file, not the run");
    assert_eq!((summary.uploaded, summary.failed), (0, 2), "{summary}");
    let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
    assert_eq!(state.record_count().unwrap(), 0);
    drop(state);
    let puts = proxy.object_requests("PUT");
    assert!(puts.len() >= 2, "{puts:?}");
    for put in &puts {
        assert_eq!(
            put.header("x-amz-content-sha256"),
            Some("UNSIGNED-PAYLOAD"),
            "{put:?}"
        );
        assert!(put.header("content-md5").is_some(), "{put:?}");
    }

    // s3s-fs kept the damaged bodies (S3 stores nothing on BadDigest): objects we never verified
    // that differ from the files, so they are conflicts, reported and never overwritten blindly.
    proxy.corrupt_puts(false);
    let summary = backfill(&config).await;
    assert_eq!((summary.conflicts, summary.failed), (2, 2), "{summary}");
    // As on S3, with no damaged object left behind, the same run succeeds: the failures above
    // came from the damage alone.
    for key in ["local_content/ab/cd/inline", "local_content/ab/cd/streamed"] {
        client(&env)
            .await
            .delete_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    let summary = backfill(&config).await;
    assert_eq!((summary.uploaded, summary.failed), (2, 0), "{summary}");
    let got = objects(&env, &bucket).await;
    for (rel, data) in store.read_all("local_content") {
        assert!(got[&rel] == data, "{rel} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_and_sse_c_reach_the_server() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "sse").await;
    let store = Store::new();
    store.write("local_content/ab/cd/small", &bytes(1, 1000));
    store.write("local_content/ab/cd/big", &bytes(2, 6 * 1024 * 1024));
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    small_multipart(&mut raw);
    raw.s3.storage_class = Some("REDUCED_REDUNDANCY".into());
    raw.s3.sse_customer_key = Some(synapse_s3_offload::config::Secret::new(
        "0123456789abcdef0123456789abcdef",
    ));
    let s = backfill(&validated(raw)).await;
    assert_eq!(s.failed, 0, "{s}");
    let reqs: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.is_object())
        .collect();
    // base64("0123456789abcdef0123456789abcdef")
    let key_b64 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    for r in &reqs {
        let creating =
            r.method == "PUT" && !r.path.contains("partNumber") || r.path.contains("?uploads");
        if creating {
            assert_eq!(
                r.header("x-amz-storage-class"),
                Some("REDUCED_REDUNDANCY"),
                "{r:?}"
            );
        }
        if r.method == "PUT" || r.method == "HEAD" || r.path.contains("?uploads") {
            assert_eq!(
                r.header("x-amz-server-side-encryption-customer-algorithm"),
                Some("AES256"),
                "{r:?}"
            );
            assert_eq!(
                r.header("x-amz-server-side-encryption-customer-key"),
                Some(key_b64),
                "{r:?}"
            );
            assert!(
                r.header("x-amz-server-side-encryption-customer-key-md5")
                    .is_some(),
                "{r:?}"
            );
        }
    }
    assert!(reqs.iter().any(|r| r.method == "HEAD"));
    assert!(reqs.iter().any(|r| r.path.contains("partNumber")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_store_entries_are_uploaded_with_stable_keys_or_skipped() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let env = s3_env();
    let bucket = create_bucket(&env, "odd").await;
    let store = Store::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"outside the store").unwrap();
    // Uploaded, with keys equal to their paths.
    store.write("local_content/sp/ac/with space", b"space");
    store.write("local_content/un/ic/odé_😀", b"unicode");
    store.write("local_content/ze/ro/empty", b"");
    // Skipped: a name that is not UTF-8, a symlink out of the store, a FIFO.
    std::fs::create_dir_all(store.root.join("local_content/ba/dn")).unwrap();
    std::fs::write(
        store
            .root
            .join(OsStr::from_bytes(b"local_content/ba/dn/\xff\xfe")),
        b"x",
    )
    .unwrap();
    std::fs::create_dir_all(store.root.join("local_content/li/nk")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        store.root.join("local_content/li/nk/out"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), store.root.join("local_content/li/dir")).unwrap();
    let fifo = store.root.join("local_content/li/nk/fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { mkfifo(c.as_ptr(), 0o600) }, 0);

    let s = backfill(&validated(raw_config(&env, &env.endpoint, &bucket, &store))).await;
    assert_eq!((s.uploaded, s.failed), (3, 0), "{s}");
    assert_eq!(
        s.skipped, 1,
        "the non-UTF-8 name is reported and skipped: {s}"
    );
    let objects = objects(&env, &bucket).await;
    let keys: Vec<_> = objects.keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "local_content/sp/ac/with space",
            "local_content/un/ic/odé_😀",
            "local_content/ze/ro/empty"
        ]
    );
    assert!(objects.values().all(|v| v != b"outside the store"));
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"outside the store"
    );
}

unsafe extern "C" {
    fn mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}

/// An undecodable record (a damaged page, a bug) does not fail its file forever: the object is
/// looked up again and a good record written over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_is_verified_again_and_rewritten() {
    let env = s3_env();
    let bucket = create_bucket(&env, "badrecord").await;
    let store = Store::new();
    let rel = "local_content/ba/DR/ecord";
    store.write(rel, &bytes(3, 5_000));
    let config = validated(raw_config(&env, &env.endpoint, &bucket, &store));
    assert_eq!(backfill(&config).await.uploaded, 1);
    {
        const UPLOADED: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("uploaded");
        let db = redb::Database::create(store.state.join("state.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(UPLOADED)
            .unwrap()
            .insert(rel, b"\x09garbage".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let p = synapse_s3_offload::layout::MediaPath::parse(rel).unwrap();
    let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
    assert!(state.record(&p).is_err(), "the record is unreadable");
    drop(state);
    let s = backfill(&config).await;
    assert_eq!((s.adopted, s.failed), (1, 0), "{s}");
    let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
    assert!(state.record(&p).unwrap().is_some(), "rewritten");
}

/// An object another tool uploaded in several parts (`s3_media_upload`: boto3's 8 MiB parts, no
/// digest metadata) is recognised by its multipart ETag and recorded: neither a conflict nor a
/// second upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_objects_of_other_tools_are_recognised_by_their_etag() {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "mpetag").await;
    let store = Store::new();
    let rel = "local_content/mp/ET/agupload";
    let data = bytes(8, 9 << 20);
    store.write(rel, &data);
    let c = client(&env).await;
    let up = c
        .create_multipart_upload()
        .bucket(&bucket)
        .key(rel)
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(8 << 20).enumerate() {
        let n = i as i32 + 1;
        let out = c
            .upload_part()
            .bucket(&bucket)
            .key(rel)
            .upload_id(id)
            .part_number(n)
            .body(chunk.to_vec().into())
            .send()
            .await
            .unwrap();
        parts.push(
            CompletedPart::builder()
                .part_number(n)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build(),
        );
    }
    c.complete_multipart_upload()
        .bucket(&bucket)
        .key(rel)
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let head = c
        .head_object()
        .bucket(&bucket)
        .key(rel)
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag()
            .is_some_and(|e| e.ends_with("-2\"") || e.ends_with("-2")),
        "the server gives a multipart ETag: {:?}",
        head.e_tag()
    );
    let config = validated(raw_config(&env, &proxy.endpoint(), &bucket, &store));
    let s = backfill(&config).await;
    assert_eq!((s.adopted, s.uploaded, s.conflicts), (1, 0, 0), "{s}");
    assert!(proxy.object_requests("PUT").is_empty());
}
