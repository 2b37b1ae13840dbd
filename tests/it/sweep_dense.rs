//! The dense sweep (confirming aged files from a bucket listing, src/sweep/dense.rs) against the
//! real servers: s3s-fs, whose listings carry no ETag (so every file still gets its HEAD), and
//! moto's S3 server, whose listings carry them as S3's do (started by scripts/test.sh).

use std::time::Duration;

use synapse_s3_offload::backfill::{self, Progress};
use synapse_s3_offload::config::{Config, RawConfig, SizeValue};
use synapse_s3_offload::state::State;
use synapse_s3_offload::sweep::{self, Report};
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::support::*;
use crate::sweep::{Fixture, fixture};

/// moto's S3 server from the environment (scripts/test.sh starts it). Fails, never skips, when
/// it is not there.
pub(crate) fn moto_env() -> S3Env {
    let endpoint = std::env::var("SSO_TEST_MOTO_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "no SSO_TEST_MOTO_ENDPOINT: run the tests with scripts/test.sh, which installs and starts moto's S3 server"
        )
    });
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("SSO_TEST_MOTO_ENDPOINT {endpoint:?}: {e}"));
    S3Env {
        endpoint,
        addr,
        access_key: "moto-test".into(),
        secret_key: "moto-test-secret".into(),
    }
}

fn config(
    env: &S3Env,
    endpoint: &str,
    f: &Fixture,
    listing: &str,
    tweak: impl FnOnce(&mut RawConfig),
) -> Config {
    let mut raw = raw_config(env, endpoint, &f.bucket, &f.store);
    raw.database = Some(f.db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    raw.sweep.listing = Some(listing.into());
    tweak(&mut raw);
    validated(raw)
}

async fn run(config: &Config) -> Report {
    sweep::run_standalone(config, false, &CancellationToken::new())
        .await
        .unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The sweep's fixture twice (every case: aged and fresh, thumbnails, missing object, other size,
/// other bytes of the same size, URL preview, remote media), one copy swept with HEADs, the other
/// dense: the same files go, the same stay, for the same reasons. `records: false` sweeps from a
/// new state (objects uploaded by another tool: every file is read).
async fn same_as_heads(env: &S3Env, records: bool) -> (Report, Report) {
    let (a, b) = (
        fixture(env, &env.endpoint).await,
        fixture(env, &env.endpoint).await,
    );
    let fresh_state = |f: &Fixture| {
        let dir = f.store.dir.path().join("new-state");
        move |raw: &mut RawConfig| {
            if !records {
                raw.state_dir = Some(dir);
            }
        }
    };
    let heads = run(&config(env, &env.endpoint, &a, "never", fresh_state(&a))).await;
    let dense = run(&config(env, &env.endpoint, &b, "always", fresh_state(&b))).await;
    let want = sorted(a.deleted.iter().map(|s| s.to_string()).collect());
    assert_eq!(sorted(heads.deleted.clone()), want, "{heads}");
    assert_eq!(sorted(dense.deleted.clone()), want, "{dense}");
    for p in &b.kept {
        assert!(b.store.root.join(p).exists(), "{p} must be kept");
    }
    let counts = |r: &Report| {
        (
            r.media_examined,
            r.kept_not_in_bucket,
            r.kept_different,
            r.kept_error,
            r.kept_changed,
            r.kept_bad_copy,
            r.errors.clone(),
        )
    };
    assert_eq!(counts(&dense), counts(&heads), "{dense}\n{heads}");
    assert!(dense.dense && !heads.dense);
    assert_eq!(heads.list_requests, 0, "{heads}");
    assert!(dense.list_requests >= 1, "{dense}");
    (heads, dense)
}

/// Files the fixture's sweep deletes (a local original + 2 thumbnails, one more local original, a
/// remote original + thumbnail): the dense sweep confirms these from the listing where it carries
/// ETags. The three tampered objects keep their HEADs (the listing never says "missing" or
/// "different": the HEAD does).
const DELETED: u64 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_sweep_deletes_what_the_head_sweep_deletes_with_listed_etags() {
    for records in [true, false] {
        let (heads, dense) = same_as_heads(&moto_env(), records).await;
        assert_eq!(dense.confirmed_by_listing, DELETED, "{dense}");
        assert_eq!(
            dense.head_requests,
            heads.head_requests - DELETED,
            "{dense}\n{heads}"
        );
        // Four folders, each listed once.
        assert_eq!(dense.list_requests, 4, "{dense}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_sweep_on_a_server_that_lists_no_etags_heads_every_file() {
    let (heads, dense) = same_as_heads(&s3_env(), true).await;
    assert_eq!(dense.confirmed_by_listing, 0, "{dense}");
    assert_eq!(dense.head_requests, heads.head_requests, "{dense}\n{heads}");
}

/// Aged media past the first listing page, whose objects change while the listing is under way
/// (after its first page, before the page that shows them): deleted, cut short, replaced by
/// other bytes of the same size. The later page shows the change, so the listing confirms none of
/// them; their HEADs find them missing or different and the files stay. A file changed locally
/// after its page was read is caught by the size + mtime re-check right before the unlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_sweep_keeps_files_whose_objects_change_while_it_lists() {
    let env = moto_env();
    let store = Store::new();
    let db = TestDb::create().await;
    let bucket = create_bucket(&env, "densechange").await;
    // 1,000 aged media fill the first listing page; the last four come after it.
    const N: usize = 1004;
    let id = |i: usize| format!("dn{i:010}abc");
    let path = |i: usize| {
        let id = id(i);
        format!("local_content/{}/{}/{}", &id[..2], &id[2..4], &id[4..])
    };
    db.client
        .batch_execute(&format!(
            "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts) \
             SELECT 'dn' || lpad(i::text, 10, '0') || 'abc', 'image/png', 100, {}, 'x', '@u:example.com', {} FROM generate_series(0, {}) AS i",
            days_ago(400),
            days_ago(60),
            N - 1
        ))
        .await
        .unwrap();
    for i in 0..N {
        store.write(&path(i), &bytes(i as u64, 100 + i % 50));
    }
    let proxy = Proxy::start(env.addr).await;
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    raw.database = Some(db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    raw.sweep.listing = Some("always".into());
    let config = validated(raw);
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((s.failed, s.uploaded), (0, N as u64));

    // The backfill listed once already (is the prefix empty?): counted from here.
    let listed_before = proxy.lists_seen();
    proxy.hold_lists_after(1);
    let sweep = tokio::spawn({
        let config = config.clone();
        async move { run(&config).await }
    });
    wait_until(
        "the second listing page is asked for",
        Duration::from_secs(60),
        || proxy.lists_seen() >= listed_before + 2,
    )
    .await;
    let c = client(&env).await;
    let (deleted, cut, replaced, changed_locally) = (N - 4, N - 3, N - 2, N - 1);
    c.delete_object()
        .bucket(&bucket)
        .key(path(deleted))
        .send()
        .await
        .unwrap();
    c.put_object()
        .bucket(&bucket)
        .key(path(cut))
        .body(b"cut".to_vec().into())
        .send()
        .await
        .unwrap();
    let len = std::fs::metadata(store.root.join(path(replaced)))
        .unwrap()
        .len() as usize;
    c.put_object()
        .bucket(&bucket)
        .key(path(replaced))
        .body(vec![b'x'; len].into())
        .send()
        .await
        .unwrap();
    // Examined (hashed) already, confirmed from the page about to be read: only the re-check
    // before the unlink can notice.
    store.write(&path(changed_locally), b"written again meanwhile");
    proxy.release_lists();
    let r = sweep.await.unwrap();
    for i in [deleted, cut, replaced, changed_locally] {
        assert!(
            store.root.join(path(i)).exists(),
            "{} must be kept: {r}",
            path(i)
        );
    }
    assert_eq!(
        (r.kept_not_in_bucket, r.kept_different, r.kept_changed),
        (1, 2, 1),
        "{r}"
    );
    assert_eq!(r.files_deleted, N as u64 - 4, "{r}");
    assert_eq!(r.confirmed_by_listing, N as u64 - 3, "{r}");
    // Requests by type: 1,004 files with 2 LIST and 3 HEAD.
    assert_eq!((r.list_requests, r.head_requests), (2, 3), "{r}");
}

/// An object another tool uploaded in parts (its ETag is not the MD5 of the bytes, and it has no
/// digest metadata of ours), adopted by `upload`: the record keeps the multipart ETag the upload
/// verified, so the sweep recognises the object by it (by HEAD on s3s-fs, from the listing on
/// moto) without reading the file again. Before, the sweep found it "different" on every run,
/// kept the file, marked its record stale and queued it, and the upload read it twice more
/// (its digests, then the parts) to adopt it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_multipart_object_is_swept_without_reading_the_file() {
    for (env, listing) in [(s3_env(), "never"), (moto_env(), "always")] {
        let store = Store::new();
        let db = TestDb::create().await;
        let bucket = create_bucket(&env, "densemp").await;
        let rel = "local_content/mp/AR/Tsuploadedbyothers";
        let data = store.write_bytes(rel, bytes(7, (6 << 20) + 123));
        db.local(
            "mpARTsuploadedbyothers",
            days_ago(400),
            Some(days_ago(60)),
            None,
        )
        .await;
        // Another tool's multipart upload: two parts of 5 MiB and the rest, no metadata.
        let c = client(&env).await;
        let up = c
            .create_multipart_upload()
            .bucket(&bucket)
            .key(rel)
            .send()
            .await
            .unwrap();
        let upload_id = up.upload_id().unwrap();
        let mut parts = Vec::new();
        for (n, chunk) in data.chunks(5 << 20).enumerate() {
            let p = c
                .upload_part()
                .bucket(&bucket)
                .key(rel)
                .upload_id(upload_id)
                .part_number(n as i32 + 1)
                .body(chunk.to_vec().into())
                .send()
                .await
                .unwrap();
            parts.push(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(n as i32 + 1)
                    .e_tag(p.e_tag().unwrap())
                    .build(),
            );
        }
        c.complete_multipart_upload()
            .bucket(&bucket)
            .key(rel)
            .upload_id(upload_id)
            .multipart_upload(
                aws_sdk_s3::types::CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
        raw.upload.multipart_threshold = Some(SizeValue::Text("5MiB".into()));
        raw.upload.multipart_part_size = Some(SizeValue::Text("5MiB".into()));
        raw.database = Some(db.raw());
        raw.sweep.keep_local_for = Some("30d".into());
        raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
        raw.sweep.listing = Some(listing.into());
        let config = validated(raw);
        let s = backfill::run(&config, Progress::Log, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((s.adopted, s.uploaded, s.failed), (1, 0, 0), "{listing}");
        let record = State::open(&config.state_dir)
            .unwrap()
            .record(&synapse_s3_offload::layout::MediaPath::parse(rel).unwrap())
            .unwrap()
            .expect("adopted: recorded");
        assert!(
            record.sha256.is_some() && record.multipart_etag.is_some(),
            "{record:?}"
        );
        let r = run(&config).await;
        assert_eq!(r.deleted, vec![rel.to_owned()], "{listing}: {r}");
        assert_eq!(
            r.confirmed_by_listing,
            u64::from(listing == "always"),
            "{listing}: {r}"
        );
    }
}
