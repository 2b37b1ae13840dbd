//! Provider conformance: the checks that must hold on every S3 implementation an admin may run,
//! against the server named by `SSO_PROVIDER` (scripts/test-providers.sh runs them on s3s-fs,
//! Garage, SeaweedFS, moto and s3rver and prints a table). A check a server cannot do is skipped
//! for that server only, with the reason printed and logged ([`skip_unless`]).
//!
//! `server_restarted_mid_upload` stops the shared server when `SSO_TEST_S3_RESTART` is set, so the
//! script runs it alone; without it (scripts/test.sh, s3s-fs) it restarts a private s3s-fs.

use std::process::Command;
use std::time::Duration;

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use synapse_s3_offload::backfill::{self, Progress, Summary};
use synapse_s3_offload::config::{Config, RawConfig, Secret, SizeValue};
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::support::*;

const MIB: usize = 1 << 20;
/// 32 bytes: an AES256 SSE-C key.
const SSE_KEY: &str = "provider-sse-c-key-0123456789abc";

async fn backfill(config: &Config) -> Summary {
    backfill::run(config, Progress::Log, CancellationToken::new())
        .await
        .expect("backfill")
}

/// 5 MiB parts (the S3 minimum, enforced by Garage and moto) from 5 MiB up.
fn small_parts(raw: &mut RawConfig) {
    raw.upload.multipart_threshold = Some(SizeValue::Text("5MiB".into()));
    raw.upload.multipart_part_size = Some(SizeValue::Text("5MiB".into()));
}

fn upload_yaml(store: &Store, env: &S3Env, bucket: &str, secret: &str, s3_extra: &str) -> String {
    config_yaml(
        store,
        &env.endpoint,
        bucket,
        (&env.access_key, secret),
        &format!("  max_attempts: 1\n{s3_extra}"),
        "",
    )
}

fn run_bin(cfg: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn head(
    env: &S3Env,
    bucket: &str,
    key: &str,
) -> aws_sdk_s3::operation::head_object::HeadObjectOutput {
    client(env)
        .await
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {key}: {e:?}"))
}

/// Single PUTs (in memory and streamed from disk, and an empty file) arrive byte-identical with
/// their digest in `x-amz-meta-md5`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_put_verified() {
    let env = s3_env();
    let bucket = create_bucket(&env, "single").await;
    let store = Store::new();
    store.write("local_content/ab/cd/small", &bytes(1, 20_000));
    store.write("local_content/ab/cd/streamed", &bytes(2, 1_500_000));
    store.write("local_content/ab/cd/empty", b"");
    store.write(
        "local_thumbnails/ab/cd/small/32-32-image-png-crop",
        &bytes(3, 900),
    );
    let s = backfill(&validated(raw_config(&env, &env.endpoint, &bucket, &store))).await;
    assert_eq!((s.uploaded, s.failed), (4, 0), "{s}");
    all_uploaded(&env, &bucket, &store.read_all(""))
        .await
        .unwrap();
    let h = head(&env, &bucket, "local_content/ab/cd/small").await;
    assert_eq!(
        h.metadata().and_then(|m| m.get("md5")).map(String::as_str),
        Some(hex::encode(synapse_s3_offload::md5::Md5::digest(&bytes(1, 20_000))).as_str())
    );
}

/// A multipart upload (three 5 MiB-aligned parts, the last one short) arrives byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_verified() {
    let env = s3_env();
    let bucket = create_bucket(&env, "multipart").await;
    let store = Store::new();
    store.write("local_content/mp/pa/rts", &bytes(4, 11 * MIB + 17));
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    small_parts(&mut raw);
    let s = backfill(&validated(raw)).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    all_uploaded(&env, &bucket, &store.read_all(""))
        .await
        .unwrap();
    let h = head(&env, &bucket, "local_content/mp/pa/rts").await;
    assert!(
        h.metadata().is_some_and(|m| m.contains_key("md5")),
        "digest metadata kept on a multipart object: {h:?}"
    );
}

/// A second run answers everything from its records: no object request at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_makes_no_put() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "rerun").await;
    let store = Store::new();
    store.write("local_content/re/ru/n1", &bytes(5, 3_000));
    store.write("local_content/re/ru/n2", &bytes(6, 6 * MIB));
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    small_parts(&mut raw);
    let config = validated(raw);
    assert_eq!(backfill(&config).await.uploaded, 2);
    proxy.clear();
    let s = backfill(&config).await;
    assert_eq!((s.uploaded, s.unchanged), (0, 2), "{s}");
    let reqs = proxy.requests();
    assert!(reqs.iter().all(|r| !r.is_object()), "{reqs:?}");
}

/// Objects another tool uploaded (a plain PUT, and boto3-style 8 MiB multipart, neither with our
/// metadata) are recognised by their ETag and recorded without a PUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_existing_objects() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "adopt").await;
    let store = Store::new();
    let c = client(&env).await;
    let plain = bytes(7, 4_000);
    store.write("local_content/pl/ai/nput", &plain);
    c.put_object()
        .bucket(&bucket)
        .key("local_content/pl/ai/nput")
        .body(plain.into())
        .send()
        .await
        .unwrap();
    let rel = "local_content/mp/ET/agupload";
    let data = bytes(8, 9 * MIB);
    store.write(rel, &data);
    let up = c
        .create_multipart_upload()
        .bucket(&bucket)
        .key(rel)
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(8 * MIB).enumerate() {
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
    let config = validated(raw_config(&env, &proxy.endpoint(), &bucket, &store));
    let s = backfill(&config).await;
    assert_eq!(
        (s.adopted, s.uploaded, s.conflicts, s.failed),
        (2, 0, 0, 0),
        "{s}"
    );
    assert!(proxy.object_requests("PUT").is_empty());
}

/// SSE-C: single and multipart objects are written with the key, confirmed by HEAD with it, read
/// back with it; the server refuses to serve them without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_c() {
    if skip_unless("sse_c", Feature::SseC) {
        return;
    }
    let env = s3_env();
    let bucket = create_bucket(&env, "ssec").await;
    let store = Store::new();
    store.write("local_content/ss/ec/small", &bytes(9, 10_000));
    store.write("local_content/ss/ec/big", &bytes(10, 6 * MIB));
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    small_parts(&mut raw);
    raw.s3.sse_customer_key = Some(Secret::new(SSE_KEY));
    let config = validated(raw);
    let s = backfill(&config).await;
    assert_eq!((s.uploaded, s.failed), (2, 0), "{s}");
    // A second look from scratch HEADs with the key and confirms both (adopted, no PUT).
    std::fs::remove_dir_all(&store.state).unwrap();
    let s = backfill(&config).await;
    assert_eq!((s.adopted, s.uploaded, s.failed), (2, 0, 0), "{s}");
    // Read back through the daemon's own client (it copes with SeaweedFS's repeated SSE-C
    // header, which the plain SDK client refuses), and without the key by a plain client.
    let store_client = synapse_s3_offload::upload::s3::ObjectStore::new(&config.s3, 5 << 20).await;
    let c = client(&env).await;
    for (rel, data) in store.read_all("") {
        let got = store_client
            .get_bytes(&rel)
            .await
            .unwrap_or_else(|e| panic!("GET {rel} with the key: {e}"));
        assert!(got == data, "{rel} differs");
        assert!(
            c.get_object()
                .bucket(&bucket)
                .key(&rel)
                .send()
                .await
                .is_err(),
            "{rel} was served without the key"
        );
    }
}

/// A storage class reaches the object (single PUT and multipart), as HEAD reports it. On a server
/// without storage classes, asking for one fails with a hint naming `s3.storage_class`, or works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class() {
    let env = s3_env();
    let bucket = create_bucket(&env, "sclass").await;
    let store = Store::new();
    store.write("local_content/sc/la/small", &bytes(11, 10_000));
    store.write("local_content/sc/la/big", &bytes(12, 6 * MIB));
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    small_parts(&mut raw);
    raw.s3.storage_class = Some("STANDARD_IA".into());
    let config = validated(raw);
    let summary = backfill::run(&config, Progress::Log, CancellationToken::new()).await;
    if skip_unless("storage_class", Feature::StorageClasses) {
        // Whatever the server does with the header, nothing may be half-done or unexplained.
        if let Ok(s) = &summary
            && s.failed == 0
        {
            all_uploaded(&env, &bucket, &store.read_all(""))
                .await
                .unwrap();
        } else {
            let state = synapse_s3_offload::state::State::open(&config.state_dir).unwrap();
            let problems = state.problems_after(None, 10).unwrap();
            assert!(
                problems
                    .iter()
                    .all(|(_, p)| format!("{p:?}").contains("s3.storage_class")),
                "{summary:?} {problems:?}"
            );
        }
        return;
    }
    let s = summary.expect("backfill");
    assert_eq!((s.uploaded, s.failed), (2, 0), "{s}");
    for (rel, _) in store.read_all("") {
        let h = head(&env, &bucket, &rel).await;
        assert_eq!(
            h.storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{rel}"
        );
    }
}

/// A wrong secret is refused by the server; the command says which key to fix and never prints
/// the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_refused() {
    if skip_unless("wrong_secret_refused", Feature::Signatures) {
        return;
    }
    let c = cli_case("wrongsecret", b"data").await;
    let wrong = "wrong-secret-value-never-shown";
    write_yaml(&c.cfg, &upload_yaml(&c.store, &c.env, &c.bucket, wrong, ""));
    let (code, out) = tokio::task::block_in_place(|| run_bin(&c.cfg, &["upload"]));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("s3.secret_access_key"), "{out}");
    assert!(
        !out.contains(wrong) && !out.contains(&c.env.secret_key),
        "{out}"
    );
    assert!(list_sizes(&c.env, &c.bucket).await.is_empty());
}

/// The daemon: a file closed in the store becomes its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_close_to_object() {
    let env = s3_env();
    let bucket = create_bucket(&env, "daemon").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    crate::daemon::fast(&mut raw);
    let mut d = Daemon::start(validated(raw));
    assert!(d.ready().await);
    store.write("local_content/da/em/onfile", &bytes(13, 70_000));
    store.write("local_content/da/em/big", &bytes(14, 17 * MIB));
    let files = store.read_all("");
    eventually("the objects", Duration::from_secs(60), || {
        listed(&env, &bucket, &files)
    })
    .await;
    d.stop_drained().await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
}

/// The sweep HEADs each aged file's object and deletes only the confirmed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_confirms_and_deletes() {
    let env = s3_env();
    let f = crate::sweep::fixture(&env, &env.endpoint).await;
    let mut raw = raw_config(&env, &env.endpoint, &f.bucket, &f.store);
    raw.database = Some(f.db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    let config = validated(raw);
    let report =
        synapse_s3_offload::sweep::run_standalone(&config, false, &CancellationToken::new())
            .await
            .expect("sweep");
    for rel in &f.deleted {
        assert!(!f.store.root.join(rel).exists(), "{rel} kept: {report:?}");
    }
    for rel in &f.kept {
        assert!(f.store.root.join(rel).exists(), "{rel} deleted: {report:?}");
    }
}

/// The audit lists the bucket and finds what is missing, mismatched and orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_listing() {
    use synapse_s3_offload::audit;
    let env = s3_env();
    let bucket = create_bucket(&env, "audit").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let t = days_ago(1);
    // 1,100 uploaded media: the listing takes two pages.
    for i in 0..1_100 {
        let id = format!("aa{i:04}mediaok");
        db.local(&id, t, None, None).await;
        store.write(
            &format!("local_content/aa/{}/{}", &id[2..4], &id[4..]),
            &bytes(i, 40),
        );
    }
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    let config = validated(raw);
    assert_eq!(backfill(&config).await.uploaded, 1_100);
    // Not uploaded: a new media. Orphan: an object without a row.
    db.local("bbNOTuploaded1", t, None, None).await;
    store.write("local_content/bb/NO/Tuploaded1", b"new");
    crate::audit::put(&env, &bucket, "local_content/zz/OR/PHAN", b"orphan").await;
    let r = audit::run_standalone(
        &config,
        &audit::Options {
            examples: 10,
            ..Default::default()
        },
        &CancellationToken::new(),
    )
    .await
    .expect("audit");
    assert_eq!(r.objects, 1_101, "{r:?}");
    assert_eq!(
        (
            r.lost.count,
            r.not_uploaded.count,
            r.mismatched.count,
            r.orphans.count
        ),
        (0, 1, 0, 1),
        "{r:?}"
    );
}

/// `check`'s probe (PUT, HEAD, GET, DELETE) passes, with SSE-C where the server has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_probe() {
    let c = cli_case("check", b"x").await;
    std::fs::create_dir(&c.store.state).unwrap();
    let sse = if provider().lacks(Feature::SseC).is_none() {
        format!("  sse_customer_key: {SSE_KEY}\n")
    } else {
        skip(
            "check_probe (with SSE-C)",
            "SSE-C not supported; probed without it",
        );
        String::new()
    };
    write_yaml(
        &c.cfg,
        &upload_yaml(&c.store, &c.env, &c.bucket, &c.env.secret_key, &sse),
    );
    let (code, out) = tokio::task::block_in_place(|| run_bin(&c.cfg, &["check"]));
    assert!(out.contains("✓ S3 bucket"), "{out}");
    assert!(out.contains("✓ S3 read/write"), "{out}");
    assert!(
        !out.contains(SSE_KEY) && !out.contains(&c.env.secret_key),
        "{out}"
    );
    // Only the S3 lines matter here (no database: section is a note, not a failure).
    assert_eq!(code, 0, "{out}");
    assert!(
        list_sizes(&c.env, &c.bucket).await.is_empty(),
        "probe left behind"
    );
}

/// A bucket that refuses SSE-C uploads (AWS S3's default for new buckets since April 2026,
/// answered here by the fault proxy in front of the server): `check` finds that the same PUT
/// without SSE-C works and says so, instead of a bare AccessDenied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_sse_c_refused_by_the_bucket() {
    use crate::faults_proxy::{FaultProxy, S3Fault};
    let mut c = cli_case("ssecblocked", b"x").await;
    std::fs::create_dir(&c.store.state).unwrap();
    let proxy = FaultProxy::start(c.env.addr, 1).await;
    proxy.deny_sse_c_puts(Some(S3Fault::AccessDenied));
    c.env.endpoint = proxy.endpoint();
    let sse = format!("  sse_customer_key: {SSE_KEY}\n");
    write_yaml(
        &c.cfg,
        &upload_yaml(&c.store, &c.env, &c.bucket, &c.env.secret_key, &sse),
    );
    let (code, out) = tokio::task::block_in_place(|| run_bin(&c.cfg, &["check"]));
    assert_ne!(code, 0, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("✗ S3 read/write"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("AccessDenied"), "{line}");
    assert!(line.contains("without SSE-C works"), "{line}");
    assert!(line.contains("s3.sse_customer_key"), "{line}");
    assert!(!out.contains(SSE_KEY), "{out}");
    assert!(
        list_sizes(&c.env, &c.bucket).await.is_empty(),
        "probes left behind"
    );
}

/// A storage class the provider does not know: `check` names `s3.storage_class` as the cause.
/// Needs a server that refuses GLACIER_IR (s3rver does); on others the skip says it accepted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_refused_storage_class() {
    let c = cli_case("sclassref", b"x").await;
    std::fs::create_dir(&c.store.state).unwrap();
    let accepted = client(&c.env)
        .await
        .put_object()
        .bucket(&c.bucket)
        .key("probe-glacier-ir")
        .storage_class(aws_sdk_s3::types::StorageClass::GlacierIr)
        .body(b"x".to_vec().into())
        .send()
        .await
        .is_ok();
    if accepted {
        let name = provider().name();
        skip(
            "check_names_a_refused_storage_class",
            &format!("{name} accepts GLACIER_IR: no refusal to name"),
        );
        return;
    }
    write_yaml(
        &c.cfg,
        &upload_yaml(
            &c.store,
            &c.env,
            &c.bucket,
            &c.env.secret_key,
            "  storage_class: GLACIER_IR\n",
        ),
    );
    let (code, out) = tokio::task::block_in_place(|| run_bin(&c.cfg, &["check"]));
    assert_ne!(code, 0, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("✗ S3 read/write"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("does not accept storage class GLACIER_IR"),
        "{line}"
    );
    assert!(
        list_sizes(&c.env, &c.bucket).await.is_empty(),
        "probes left behind"
    );
}

/// The default (`when_required`: Content-MD5, no aws-chunked trailer) works everywhere;
/// `when_supported` sends checksum trailers, which s3rver refuses like B2 did with boto3 1.36:
/// the failure then names the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_trailers() {
    let env = s3_env();
    let bucket = create_bucket(&env, "trailer").await;
    let store = Store::new();
    // Streamed from disk (above the in-memory limit): the body the SDK sends aws-chunked.
    store.write("local_content/tr/ai/ler", &bytes(15, 1_500_000));
    store.write("local_content/tr/ai/small", &bytes(16, 2_000));
    let default = validated(raw_config(&env, &env.endpoint, &bucket, &store));
    let s = backfill(&default).await;
    assert_eq!((s.uploaded, s.failed), (2, 0), "the default works: {s}");

    // when_supported: streamed bodies go aws-chunked with a checksum trailer.
    let c = cli_case("trailer2", &bytes(15, 1_500_000)).await;
    write_yaml(
        &c.cfg,
        &upload_yaml(
            &c.store,
            &c.env,
            &c.bucket,
            &c.env.secret_key,
            "  request_checksum_calculation: when_supported\n",
        ),
    );
    let (code, out) = tokio::task::block_in_place(|| run_bin(&c.cfg, &["upload"]));
    if skip_unless(
        "checksum_trailers (when_supported)",
        Feature::ChecksumTrailers,
    ) {
        // Refused, or (s3rver) stored with its chunk framing: either way not recorded as
        // uploaded, and the failure names the setting to change.
        assert_ne!(code, 0, "{out}");
        assert!(
            out.contains("s3.request_checksum_calculation: when_required"),
            "the failure names the fix: {out}"
        );
        let state = synapse_s3_offload::state::State::open(&c.store.state).unwrap();
        assert_eq!(
            state.record_count().unwrap(),
            0,
            "nothing recorded as verified"
        );
    } else {
        assert_eq!(code, 0, "{out}");
        all_uploaded(&c.env, &c.bucket, &c.store.read_all(""))
            .await
            .unwrap();
    }
}

/// Restarts the server the tests use (`SSO_TEST_S3_RESTART`, a command given by the script), or
/// `private` when there is none.
fn restart(private: Option<&mut PrivateS3>, env: &S3Env) {
    match (std::env::var("SSO_TEST_S3_RESTART"), private) {
        (Ok(cmd), _) => {
            let st = Command::new("sh").arg("-c").arg(&cmd).status().unwrap();
            assert!(st.success(), "{cmd}: {st}");
        }
        (Err(_), Some(p)) => {
            p.stop();
            std::thread::sleep(Duration::from_secs(1));
            p.resume(env);
        }
        (Err(_), None) => unreachable!(),
    }
}

/// The server stopped (for a second or two) and started again while uploads are in flight:
/// nothing is lost, every file ends up verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_mid_upload() {
    if skip_unless("server_restarted_mid_upload", Feature::Persistence) {
        return;
    }
    let shared = s3_env();
    let external = std::env::var("SSO_TEST_S3_RESTART").is_ok();
    if !external && provider() != Provider::S3sFs {
        panic!(
            "SSO_TEST_S3_RESTART is not set: scripts/test-providers.sh sets it for {}",
            provider().name()
        );
    }
    let mut private = (!external).then(|| PrivateS3::start(&shared));
    let env = match &private {
        Some(p) => p.env(&shared),
        None => shared,
    };
    let bucket = create_bucket(&env, "restart").await;
    let proxy = Proxy::start(env.addr).await;
    let store = Store::new();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    crate::daemon::fast(&mut raw);
    small_parts(&mut raw);
    raw.upload.failed_retry_interval = Some("1s".into());
    let mut d = Daemon::start(validated(raw));
    assert!(d.ready().await);
    proxy.set_put_delay(Duration::from_millis(300));
    store.write("local_content/re/st/big", &bytes(17, 12 * MIB));
    for i in 0..20 {
        store.write(&format!("local_content/re/st/f{i}"), &bytes(100 + i, 5_000));
    }
    let files = store.read_all("");
    wait_until("uploads in flight", Duration::from_secs(30), || {
        !proxy.object_requests("PUT").is_empty()
    })
    .await;
    tokio::task::block_in_place(|| restart(private.as_mut(), &env));
    proxy.set_put_delay(Duration::ZERO);
    eventually(
        "every file verified after the restart",
        Duration::from_secs(90),
        || all_uploaded(&env, &bucket, &files),
    )
    .await;
    d.stop_drained().await;
}
