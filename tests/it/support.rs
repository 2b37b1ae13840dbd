//! Shared test support: the real S3 server from the environment (started by scripts/test.sh),
//! unique buckets, Synapse-like media stores and configs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use rand::{Rng, SeedableRng};
use synapse_s3_offload::config::{self, Config, RawConfig, RawS3, RawUpload, Secret};

pub struct S3Env {
    pub endpoint: String,
    pub addr: SocketAddr,
    pub access_key: String,
    pub secret_key: String,
}

/// The S3 server the tests use. Fails (never skips) when it is not running: run `scripts/test.sh`.
pub fn s3_env() -> S3Env {
    let endpoint =
        std::env::var("SSO_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:8014".into());
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let addr: SocketAddr = hostport
        .parse()
        .unwrap_or_else(|e| panic!("SSO_TEST_S3_ENDPOINT {endpoint:?}: {e}"));
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        panic!(
            "no S3 test server at {endpoint}{}: run the tests with scripts/test.sh, which installs and starts s3s-fs",
            if ci {
                " (CI=true: a missing service is a failure)"
            } else {
                ""
            }
        );
    }
    S3Env {
        endpoint,
        addr,
        access_key: std::env::var("SSO_TEST_S3_ACCESS_KEY")
            .unwrap_or_else(|_| "sso-test-key".into()),
        secret_key: std::env::var("SSO_TEST_S3_SECRET_KEY")
            .unwrap_or_else(|_| "sso-test-secret".into()),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A bucket name unique to this test process and call.
pub fn unique_bucket(hint: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hint: String = hint
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("t-{hint}-{}-{n}", std::process::id())
}

/// A plain SDK client for inspecting the bucket from the test side.
pub async fn client(env: &S3Env) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&env.endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &env.access_key,
            &env.secret_key,
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

pub async fn create_bucket(env: &S3Env, hint: &str) -> String {
    let name = unique_bucket(hint);
    client(env)
        .await
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .expect("create bucket");
    name
}

/// Everything under a key prefix: key → bytes.
pub async fn objects(env: &S3Env, bucket: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let c = client(env).await;
    let mut out = std::collections::BTreeMap::new();
    let mut token = None;
    loop {
        let page = c
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        for o in page.contents() {
            let key = o.key().unwrap().to_owned();
            let body = c
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .unwrap()
                .body
                .collect()
                .await
                .unwrap();
            out.insert(key, body.into_bytes().to_vec());
        }
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    out
}

/// A temporary media store + state dir.
pub struct Store {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
}

impl Store {
    pub fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("media");
        std::fs::create_dir(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let state = dir.path().join("state");
        Store { dir, root, state }
    }

    /// Writes `data` at `rel` the way Synapse does: makedirs, then open/write/close.
    pub fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    }

    /// Relative path → content of every file written under `root`.
    pub fn read_all(&self, rel_prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(self.root.join(rel_prefix)) {
            let e = e.unwrap();
            if e.file_type().is_file() {
                let rel = e
                    .path()
                    .strip_prefix(&self.root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                out.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
        out
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A raw config pointing at `endpoint`/`bucket` for `store`; tweak it, then [`validated`].
pub fn raw_config(env: &S3Env, endpoint: &str, bucket: &str, store: &Store) -> RawConfig {
    RawConfig {
        media_store_path: Some(store.root.clone()),
        state_dir: Some(store.state.clone()),
        scan_interval: None,
        scan_interval_when_degraded: None,
        shutdown_grace: None,
        s3: RawS3 {
            bucket: Some(bucket.into()),
            endpoint_url: Some(endpoint.into()),
            region_name: Some("us-east-1".into()),
            access_key_id: Some(env.access_key.clone()),
            secret_access_key: Some(Secret::new(env.secret_key.clone())),
            ..Default::default()
        },
        upload: RawUpload::default(),
    }
}

pub fn validated(raw: RawConfig) -> Config {
    config::validate(raw).expect("valid test config")
}

/// Writes `raw`-equivalent YAML for CLI tests.
pub fn write_yaml(path: &Path, yaml: &str) {
    std::fs::write(path, yaml).unwrap();
}

/// Polls `cond` until it holds or `deadline` passes.
#[allow(dead_code)]
pub async fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut cond: F) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
