//! Shared test support: the real S3 server from the environment (started by scripts/test.sh),
//! unique buckets, Synapse-like media stores and configs, and the daemon under test ([`daemon`]).

mod daemon;
mod provider;

#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use provider::*;

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
        use futures::StreamExt;
        let keys: Vec<String> = page
            .contents()
            .iter()
            .map(|o| o.key().unwrap().to_owned())
            .collect();
        let c = &c;
        let fetched: Vec<_> = futures::stream::iter(keys)
            .map(|key| async move {
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
                (key, body.into_bytes().to_vec())
            })
            .buffer_unordered(16)
            .collect()
            .await;
        out.extend(fetched);
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

    /// [`Store::write`], returning the content.
    #[allow(dead_code)]
    pub fn write_bytes(&self, rel: &str, data: Vec<u8>) -> Vec<u8> {
        self.write(rel, &data);
        data
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
        database: None,
        sweep: Default::default(),
        prune: Default::default(),
        synapse_config: None,
        synapse_config_dir: None,
        metrics: Default::default(),
    }
}

pub fn validated(raw: RawConfig) -> Config {
    config::validate(raw).expect("valid test config")
}

/// A random Synapse-like relative path for a new local media (media id split 2/2/rest).
#[allow(dead_code)]
pub fn media_name(rng: &mut impl Rng) -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let id: String = (0..24)
        .map(|_| A[rng.random_range(0..A.len())] as char)
        .collect();
    format!("local_content/{}/{}/{}", &id[..2], &id[2..4], &id[4..])
}

/// Writes `raw`-equivalent YAML for CLI tests.
/// The start of most command-line tests: a bucket, a store holding one file
/// (`local_content/ab/cd/ef` with `data`), and where the config file goes.
#[allow(dead_code)]
pub struct CliCase {
    pub env: S3Env,
    pub bucket: String,
    pub store: Store,
    pub cfg: PathBuf,
}

#[allow(dead_code)]
pub async fn cli_case(hint: &str, data: &[u8]) -> CliCase {
    let env = s3_env();
    let bucket = create_bucket(&env, hint).await;
    let store = Store::new();
    store.write("local_content/ab/cd/ef", data);
    let cfg = store.dir.path().join("config.yaml");
    CliCase {
        env,
        bucket,
        store,
        cfg,
    }
}

/// A test's YAML config: the store, its state_dir, the bucket at `endpoint` with these keys;
/// `s3_extra` are more keys of the `s3:` section (each line indented two spaces), `extra` more
/// top-level YAML after it.
#[allow(dead_code)]
pub fn config_yaml(
    store: &Store,
    endpoint: &str,
    bucket: &str,
    (access_key, secret_key): (&str, &str),
    s3_extra: &str,
    extra: &str,
) -> String {
    format!(
        "media_store_path: {}\nstate_dir: {}\ns3:\n  bucket: {bucket}\n  endpoint_url: {endpoint}\n  region_name: us-east-1\n  access_key_id: {access_key}\n  secret_access_key: {secret_key}\n{s3_extra}{extra}",
        store.root.display(),
        store.state.display(),
    )
}

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

/// A private s3s-fs instance (for tests that stop the server), on its own port and data dir.
pub struct PrivateS3 {
    pub port: u16,
    pub root: tempfile::TempDir,
    child: Option<std::process::Child>,
}

#[allow(dead_code)]
impl PrivateS3 {
    pub fn start(env: &S3Env) -> PrivateS3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = PrivateS3 {
            port,
            root: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.resume(env);
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data.
    pub fn resume(&mut self, env: &S3Env) {
        let bin = std::env::var("SSO_TEST_S3FS_BIN").unwrap_or_else(|_| "s3s-fs".into());
        let child = std::process::Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--access-key",
                &env.access_key,
                "--secret-key",
                &env.secret_key,
            ])
            .arg(self.root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} (set SSO_TEST_S3FS_BIN or run scripts/test.sh): {e}")
            });
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < end, "private s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn env(&self, env: &S3Env) -> S3Env {
        S3Env {
            endpoint: self.endpoint(),
            addr: format!("127.0.0.1:{}", self.port).parse().unwrap(),
            access_key: env.access_key.clone(),
            secret_key: env.secret_key.clone(),
        }
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether every (relative path, content) of the store is in `bucket` under `prefix`, identical.
#[allow(dead_code)]
pub async fn all_uploaded(
    env: &S3Env,
    bucket: &str,
    files: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let objects = objects(env, bucket).await;
    let mut missing = Vec::new();
    for (rel, data) in files {
        match objects.get(rel) {
            Some(o) if o == data => {}
            Some(_) => missing.push(format!("{rel} (differs)")),
            None => missing.push(rel.clone()),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} not in the bucket, e.g. {:?}",
            missing.len(),
            files.len(),
            &missing[..missing.len().min(5)]
        ))
    }
}

/// Key → size of every object (one LIST, no GETs; cheap enough to poll).
#[allow(dead_code)]
pub async fn list_sizes(env: &S3Env, bucket: &str) -> std::collections::BTreeMap<String, u64> {
    let c = client(env).await;
    let mut out = std::collections::BTreeMap::new();
    let mut token = None;
    loop {
        let Ok(page) = c
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token)
            .send()
            .await
        else {
            return out;
        };
        for o in page.contents() {
            out.insert(o.key().unwrap().to_owned(), o.size().unwrap_or(0) as u64);
        }
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    out
}

/// Polls the async check `f` until it returns Ok or `deadline` passes (then panics with its error).
#[allow(dead_code)]
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = Instant::now() + deadline;
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if Instant::now() >= end => {
                panic!("timed out after {deadline:?} waiting for {what}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether the listing holds every file with its size (quick check before a byte-level one).
#[allow(dead_code)]
pub async fn listed(env: &S3Env, bucket: &str, files: &[(String, Vec<u8>)]) -> Result<(), String> {
    let sizes = list_sizes(env, bucket).await;
    let missing: Vec<_> = files
        .iter()
        .filter(|(k, d)| sizes.get(k) != Some(&(d.len() as u64)))
        .map(|(k, _)| k)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} missing, e.g. {:?}",
            missing.len(),
            files.len(),
            &missing[..missing.len().min(3)]
        ))
    }
}

/// A fresh PostgreSQL database with Synapse's media tables, on the machine's server
/// (SSO_TEST_PG_HOST/PORT/USER, default 127.0.0.1:5432 as postgres). Fails when PostgreSQL is down.
#[allow(dead_code)]
pub struct TestDb {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub client: tokio_postgres::Client,
}

#[allow(dead_code)]
impl TestDb {
    pub async fn create() -> TestDb {
        let host = std::env::var("SSO_TEST_PG_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port: u16 = std::env::var("SSO_TEST_PG_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5432);
        let user = std::env::var("SSO_TEST_PG_USER").unwrap_or_else(|_| "postgres".into());
        Self::create_on(&host, port, &user).await
    }

    pub async fn create_on(host: &str, port: u16, user: &str) -> TestDb {
        let connect = |db: String| {
            let (host, user) = (host.to_owned(), user.to_owned());
            async move {
                let mut c = tokio_postgres::Config::new();
                c.host(&host)
                    .port(port)
                    .user(&user)
                    .dbname(&db)
                    .connect_timeout(Duration::from_secs(5));
                let (client, conn) = c.connect(tokio_postgres::NoTls).await.unwrap_or_else(|e| {
                    panic!("PostgreSQL is not reachable at {host}:{port} as {user} ({e}); scripts/test.sh starts it (CI=true: a missing service is a failure)")
                });
                tokio::spawn(conn);
                client
            }
        };
        let admin = connect("postgres".into()).await;
        let name = unique_bucket("db").replace('-', "_");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let client = connect(name.clone()).await;
        client
            .batch_execute(include_str!("../../fixtures/synapse_media_schema.sql"))
            .await
            .unwrap();
        TestDb {
            name,
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            client,
        }
    }

    /// The `database:` section of a YAML config for this database.
    pub fn yaml(&self) -> String {
        format!(
            "database:\n  host: {}\n  port: {}\n  user: {}\n  database: {}\n  sslmode: disable\n",
            self.host, self.port, self.user, self.name
        )
    }

    pub fn raw(&self) -> synapse_s3_offload::config::RawDatabase {
        synapse_s3_offload::config::RawDatabase {
            host: Some(self.host.clone()),
            port: Some(self.port),
            user: Some(self.user.clone()),
            database: Some(self.name.clone()),
            sslmode: Some("disable".into()),
            ..Default::default()
        }
    }

    /// Ends the PostgreSQL sessions holding advisory locks in this database (the sweep's lock),
    /// as a server restart or a cut connection would.
    pub async fn end_lock_sessions(&self) {
        self.client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap();
    }

    /// Inserts a local media row; `last_access` None = never downloaded.
    pub async fn local(
        &self,
        media_id: &str,
        created_ms: i64,
        last_access_ms: Option<i64>,
        url_cache: Option<&str>,
    ) {
        self.client
            .execute(
                "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, url_cache, last_access_ts) VALUES ($1, 'image/png', 1, $2, 'x.png', '@u:example.com', $3, $4)",
                &[&media_id, &created_ms, &url_cache, &last_access_ms],
            )
            .await
            .unwrap();
    }

    pub async fn remote(
        &self,
        origin: &str,
        media_id: &str,
        filesystem_id: &str,
        created_ms: i64,
        last_access_ms: Option<i64>,
    ) {
        self.client
            .execute(
                "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts, media_length, filesystem_id, last_access_ts) VALUES ($1, $2, 'image/png', $3, 1, $4, $5)",
                &[&origin, &media_id, &created_ms, &filesystem_id, &last_access_ms],
            )
            .await
            .unwrap();
    }
}

#[allow(dead_code)]
impl TestDb {
    /// A thumbnail row of a local media (`type` like `image/png`).
    pub async fn local_thumb(&self, media_id: &str, w: i32, h: i32, ty: &str, method: &str) {
        self.client
            .execute(
                "INSERT INTO local_media_repository_thumbnails (media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length) VALUES ($1, $2, $3, $4, $5, 7)",
                &[&media_id, &w, &h, &ty, &method],
            )
            .await
            .unwrap();
    }

    /// A thumbnail row of a remote media.
    #[allow(clippy::too_many_arguments)]
    pub async fn remote_thumb(
        &self,
        origin: &str,
        media_id: &str,
        fs_id: &str,
        w: i32,
        h: i32,
        ty: &str,
        method: &str,
    ) {
        self.client
            .execute(
                "INSERT INTO remote_media_cache_thumbnails (media_origin, media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length, filesystem_id) VALUES ($1, $2, $3, $4, $5, $6, 7, $7)",
                &[&origin, &media_id, &w, &h, &ty, &method, &fs_id],
            )
            .await
            .unwrap();
    }
}

/// Milliseconds since the epoch, `days` ago.
#[allow(dead_code)]
pub fn days_ago(days: i64) -> i64 {
    synapse_s3_offload::state::now_ms() as i64 - days * 86_400_000
}
