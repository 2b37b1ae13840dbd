//! `check` and `audit` find incomplete multipart uploads under the prefix (never others'): on
//! moto, which implements ListMultipartUploads; on s3s-fs, which does not, they say "not
//! supported by this provider" instead of failing.
//!
//! moto's quirks, seen here: every upload's `Initiated` is 2010-11-10 (so each looks years old,
//! which lets `audit --fix` be tested; that a young one is never aborted is unit-tested in
//! `audit::incomplete`), and its ListParts answer has the wrong XML root (`ListPartsResponse`),
//! which the SDK refuses: the bytes are summed on s3s-fs, which implements ListParts.

use std::process::Command;

use synapse_s3_offload::audit;
use synapse_s3_offload::upload::s3::{Incomplete, ObjectStore};
use tokio_util::sync::CancellationToken;

use crate::support::*;
use crate::sweep_dense::moto_env;

/// Starts a multipart upload of `key` with one part of `part` bytes, left incomplete.
async fn leave_incomplete(env: &S3Env, bucket: &str, key: &str, part: usize) -> String {
    let c = client(env).await;
    let id = c
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    c.upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(&id)
        .part_number(1)
        .body(bytes(9, part).into())
        .send()
        .await
        .unwrap();
    id
}

fn check(cfg: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(cfg)
        .arg("check")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn line<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} line: {out}"))
}

async fn audit_report(config: &synapse_s3_offload::config::Config, fix: bool) -> audit::Report {
    let opts = audit::Options {
        fix,
        examples: 10,
        ..Default::default()
    };
    audit::run_standalone(config, &opts, &CancellationToken::new())
        .await
        .unwrap()
}

/// The config file of `store` for `bucket` on `env`; `s3_extra` goes into the `s3:` section.
fn write_config(store: &Store, env: &S3Env, bucket: &str, s3_extra: &str) -> std::path::PathBuf {
    let cfg = store.dir.path().join("config.yaml");
    write_yaml(
        &cfg,
        &config_yaml(
            store,
            &env.endpoint,
            bucket,
            (&env.access_key, &env.secret_key),
            s3_extra,
            "",
        ),
    );
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_audit_count_incomplete_uploads_under_the_prefix_only() {
    let env = moto_env();
    let bucket = create_bucket(&env, "incomplete").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let cfg = write_config(&store, &env, &bucket, "  prefix: media/\n");
    let clean = check(&cfg);
    assert!(
        line(&clean, "incomplete multipart uploads").starts_with("✓")
            && clean.contains("none under prefix \"media/\""),
        "{clean}"
    );

    leave_incomplete(&env, &bucket, "media/local_content/ab/cd/efgh", 1000).await;
    // Another tool's key under our prefix: counted, never aborted.
    leave_incomplete(&env, &bucket, "media/backups/db.tar", 1000).await;
    // Another user's of the bucket, outside our prefix: never counted, never touched.
    leave_incomplete(&env, &bucket, "backups/db.tar", 2000).await;
    let out = check(&cfg);
    let l = line(&out, "incomplete multipart uploads");
    assert!(
        l.starts_with("! ")
            && l.contains("2 under prefix \"media/\"")
            && l.contains("days ago")
            && l.contains("AbortIncompleteMultipartUpload")
            && l.contains("audit --fix"),
        "{out}"
    );

    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.s3.prefix = Some("media/".into());
    raw.database = Some(db.raw());
    let config = validated(raw);
    let r = audit_report(&config, false).await;
    assert_eq!(r.incomplete_uploads_unlisted, None);
    assert_eq!(r.incomplete_uploads.count, 2, "{r}");
    let mut paths: Vec<_> = r
        .incomplete_uploads
        .examples
        .iter()
        .map(|e| e.path.as_str())
        .collect();
    paths.sort();
    assert_eq!(paths, ["backups/db.tar", "local_content/ab/cd/efgh"], "{r}");
    let text = r.to_string();
    assert!(
        text.contains("incomplete uploads:   2 multipart uploads")
            && text.contains("lifecycle rule"),
        "{text}"
    );
    // --fix aborts the (by moto's clock, years old) upload of a media key under the prefix, and
    // neither another tool's key under it nor anything outside it.
    let r = audit_report(&config, true).await;
    assert_eq!(
        (r.incomplete_uploads.count, r.incomplete_uploads_aborted),
        (2, 1),
        "{r}"
    );
    let still = client(&env)
        .await
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<_> = still.uploads().iter().filter_map(|u| u.key()).collect();
    keys.sort();
    assert_eq!(keys, ["backups/db.tar", "media/backups/db.tar"]);
    let r = audit_report(&config, false).await;
    assert_eq!(r.incomplete_uploads.count, 1, "{r}");
}

/// The bytes an incomplete upload holds (ListParts), on s3s-fs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parts_of_an_incomplete_upload_are_summed() {
    let env = s3_env();
    let bucket = create_bucket(&env, "partbytes").await;
    let store = Store::new();
    let key = "local_content/ab/cd/efgh";
    let upload_id = leave_incomplete(&env, &bucket, key, 1234).await;
    let config = validated(raw_config(&env, &env.endpoint, &bucket, &store));
    let s = ObjectStore::new(&config.s3, 5 << 20).await;
    let u = Incomplete {
        key: key.into(),
        upload_id,
        initiated_ms: None,
    };
    assert_eq!(s.incomplete_bytes(&u).await.unwrap(), 1234);
    s.abort_incomplete(&u).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_list_multipart_uploads_check_and_audit_say_so() {
    let env = s3_env();
    let bucket = create_bucket(&env, "nolistmp").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let cfg = write_config(&store, &env, &bucket, "");
    let out = check(&cfg);
    let l = line(&out, "incomplete multipart uploads");
    assert!(
        l.starts_with("! ") && l.contains("not supported by this provider"),
        "{out}"
    );
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    let r = audit_report(&validated(raw), false).await;
    assert_eq!(
        r.incomplete_uploads_unlisted.as_deref(),
        Some("not supported by this provider"),
        "{r}"
    );
    assert!(
        r.to_string()
            .contains("incomplete uploads:   not supported by this provider"),
        "{r}"
    );
}
