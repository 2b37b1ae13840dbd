//! The sweep, audit and check on Synapse's SQLite database, built from Synapse's real schema
//! (tests/fixtures/synapse_sqlite_schema.sql, made by Synapse's own code: see
//! scripts/gen-synapse-sqlite-fixture.sh), next to a writer as Synapse would be.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use synapse_s3_offload::audit::{self, Options};
use synapse_s3_offload::backfill::{self, Progress};
use synapse_s3_offload::config::{Config, RawConfig, RawDatabase};
use synapse_s3_offload::sweep::{self, Report};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A Synapse SQLite database in a test's directory.
pub(crate) struct SynapseSqlite {
    pub path: PathBuf,
    conn: Connection,
}

impl SynapseSqlite {
    /// Synapse's schema in `dir/homeserver.db`; `wal` as Synapse sets it (else rollback journal).
    pub fn create(dir: &Path, wal: bool) -> SynapseSqlite {
        let path = dir.join("homeserver.db");
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row(
                &format!(
                    "PRAGMA journal_mode = {}",
                    if wal { "wal" } else { "delete" }
                ),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(mode, if wal { "wal" } else { "delete" });
        // One transaction: ~1,000 statements committed one by one take seconds of fsync.
        conn.execute_batch(concat!(
            "BEGIN;",
            include_str!("../fixtures/synapse_sqlite_schema.sql"),
            "COMMIT;"
        ))
        .unwrap();
        SynapseSqlite { path, conn }
    }

    pub fn raw(&self) -> RawDatabase {
        RawDatabase {
            name: Some("sqlite3".into()),
            database: Some(self.path.display().to_string()),
            ..Default::default()
        }
    }

    pub fn local(&self, id: &str, created: i64, access: Option<i64>, url: Option<&str>) {
        self.local_sha(id, created, access, url, None);
    }

    pub fn local_sha(
        &self,
        id: &str,
        created: i64,
        access: Option<i64>,
        url: Option<&str>,
        sha256: Option<&str>,
    ) {
        self.conn
            .execute(
                "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, url_cache, last_access_ts, sha256) VALUES (?1, 'image/png', 1, ?2, 'x.png', '@u:example.com', ?3, ?4, ?5)",
                params![id, created, url, access, sha256],
            )
            .unwrap();
    }

    pub fn remote(&self, origin: &str, id: &str, fs_id: &str, created: i64, access: Option<i64>) {
        self.conn
            .execute(
                "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts, media_length, filesystem_id, last_access_ts) VALUES (?1, ?2, 'image/png', ?3, 1, ?4, ?5)",
                params![origin, id, created, fs_id, access],
            )
            .unwrap();
    }

    pub fn local_thumb(&self, id: &str, w: i32, h: i32, ty: &str, method: &str) {
        self.conn
            .execute(
                "INSERT INTO local_media_repository_thumbnails (media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length) VALUES (?1, ?2, ?3, ?4, ?5, 7)",
                params![id, w, h, ty, method],
            )
            .unwrap();
    }
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(synapse_s3_offload::sha256::Sha256::digest(data))
}

struct Case {
    env: S3Env,
    store: Store,
    db: SynapseSqlite,
    bucket: String,
    deleted: Vec<&'static str>,
    kept: Vec<&'static str>,
}

const OLD: i64 = 60;

/// Every case of the sweep on SQLite, uploaded; three objects then tampered with.
async fn sweep_case(wal: bool) -> Case {
    let env = s3_env();
    let store = Store::new();
    let db = SynapseSqlite::create(store.dir.path(), wal);
    let bucket = create_bucket(&env, "sqlite").await;
    let mut n = 0;
    let mut w = |rel: &str| {
        n += 1;
        store.write(rel, &bytes(n, 900 + n as usize * 13))
    };
    db.local("aaAGEDuploaded1", days_ago(400), Some(days_ago(OLD)), None);
    w("local_content/aa/AG/EDuploaded1");
    db.local_thumb("aaAGEDuploaded1", 32, 32, "image/png", "crop");
    w("local_thumbnails/aa/AG/EDuploaded1/32-32-image-png-crop");
    // Never downloaded, with Synapse's sha256 matching its bytes.
    let p = w("local_content/bb/NE/VERaccessed");
    let sha = hex_sha256(&std::fs::read(p).unwrap());
    db.local_sha("bbNEVERaccessed", days_ago(OLD), None, None, Some(&sha));
    db.local("ccFRESHaccess01", days_ago(400), Some(days_ago(1)), None);
    w("local_content/cc/FR/ESHaccess01");
    db.local("ddMISSINGobject", days_ago(OLD), None, None);
    w("local_content/dd/MI/SSINGobject");
    // Synapse's hash says other bytes: the local copy confirms nothing.
    db.local_sha(
        "eeWRONGsha25601",
        days_ago(OLD),
        None,
        None,
        Some(&hex_sha256(b"other bytes")),
    );
    w("local_content/ee/WR/ONGsha25601");
    db.local(
        "ggURLpreview001",
        days_ago(OLD),
        None,
        Some("https://example.com/"),
    );
    w("local_content/gg/UR/Lpreview001");
    db.remote(
        "matrix.org",
        "r1",
        "hhREMOTEaged001",
        days_ago(OLD),
        Some(days_ago(OLD)),
    );
    w("remote_content/matrix.org/hh/RE/MOTEaged001");
    db.remote(
        "matrix.org",
        "r2",
        "iiREMOTEfresh01",
        days_ago(OLD),
        Some(days_ago(1)),
    );
    w("remote_content/matrix.org/ii/RE/MOTEfresh01");

    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.upload.include_url_cache = Some(false);
    raw.database = Some(db.raw());
    let s = backfill::run(&validated(raw), Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0, "{s}");
    client(&env)
        .await
        .delete_object()
        .bucket(&bucket)
        .key("local_content/dd/MI/SSINGobject")
        .send()
        .await
        .unwrap();
    Case {
        env,
        store,
        db,
        bucket,
        deleted: vec![
            "local_content/aa/AG/EDuploaded1",
            "local_content/bb/NE/VERaccessed",
            "local_thumbnails/aa/AG/EDuploaded1/32-32-image-png-crop",
            "remote_content/matrix.org/hh/RE/MOTEaged001",
        ],
        kept: vec![
            "local_content/cc/FR/ESHaccess01",
            "local_content/dd/MI/SSINGobject",
            "local_content/ee/WR/ONGsha25601",
            "local_content/gg/UR/Lpreview001",
            "remote_content/matrix.org/ii/RE/MOTEfresh01",
        ],
    }
}

fn config(c: &Case, tweak: impl FnOnce(&mut RawConfig)) -> Config {
    let mut raw = raw_config(&c.env, &c.env.endpoint, &c.bucket, &c.store);
    raw.database = Some(c.db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    tweak(&mut raw);
    validated(raw)
}

async fn sweep_once(config: &Config) -> Report {
    sweep::run_standalone(config, false, &CancellationToken::new())
        .await
        .unwrap()
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn all_exist(c: &Case, paths: &[&str]) -> bool {
    paths.iter().all(|p| c.store.root.join(p).exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sweep_deletes_only_aged_confirmed_media_while_synapse_writes() {
    let c = sweep_case(true).await;
    // Synapse in the middle of a write transaction (WAL): our reads do not wait for it.
    let writer = Connection::open(&c.db.path).unwrap();
    writer
        .execute_batch("BEGIN IMMEDIATE; UPDATE local_media_repository SET last_access_ts = last_access_ts WHERE media_id = 'ccFRESHaccess01';")
        .unwrap();
    let r = sweep_once(&config(&c, |_| {})).await;
    writer.execute_batch("COMMIT").unwrap();
    assert_eq!(r.stopped, None, "{r}");
    assert_eq!(sorted(&r.deleted), c.deleted, "{r}");
    for p in &c.deleted {
        assert!(!c.store.root.join(p).exists(), "{p} should be gone");
    }
    assert!(all_exist(&c, &c.kept), "{r}");
    assert_eq!((r.kept_not_in_bucket, r.kept_bad_copy), (1, 1), "{r}");
    assert_eq!(r.media_examined, 5, "aged non-preview media: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_database_makes_the_sweep_wait_then_give_up_deleting_nothing() {
    // Rollback-journal mode: a writer's EXCLUSIVE lock keeps every reader out.
    let c = sweep_case(false).await;
    let lock = |c: &Case| {
        let w = Connection::open(&c.db.path).unwrap();
        w.execute_batch("BEGIN EXCLUSIVE").unwrap();
        w
    };
    let all: Vec<&str> = c.deleted.iter().chain(&c.kept).copied().collect();
    let writer = lock(&c);
    let cfg = config(&c, |r| {
        r.database.as_mut().unwrap().statement_timeout = Some("2s".into())
    });
    let started = Instant::now();
    let r = sweep_once(&cfg).await;
    let waited = started.elapsed();
    let why = r.stopped.clone().unwrap_or_default();
    assert!(
        why.contains("locked") && why.contains("nothing was changed"),
        "{r}"
    );
    assert!(r.deleted.is_empty() && all_exist(&c, &all), "{r}");
    assert!(
        waited >= Duration::from_millis(1900),
        "gave up before its timeout: {waited:?}"
    );
    // A writer that lets go within the timeout: the sweep waits for it, then sweeps.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        writer.execute_batch("ROLLBACK").unwrap();
    });
    let cfg = config(&c, |r| {
        r.database.as_mut().unwrap().statement_timeout = Some("20s".into())
    });
    let r = sweep_once(&cfg).await;
    release.join().unwrap();
    assert_eq!(r.stopped, None, "{r}");
    assert_eq!(sorted(&r.deleted), c.deleted, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_corrupt_sqlite_file_is_a_clear_error_and_deletes_nothing() {
    let c = sweep_case(true).await;
    let all: Vec<&str> = c.deleted.iter().chain(&c.kept).copied().collect();
    let missing = c.store.dir.path().join("no-such.db");
    let corrupt = c.store.dir.path().join("corrupt.db");
    std::fs::write(&corrupt, vec![b'x'; 8192]).unwrap();
    for (file, want) in [
        (&missing, "does not exist"),
        (&corrupt, "not a SQLite database or is corrupt"),
    ] {
        let cfg = config(&c, |r| {
            r.database.as_mut().unwrap().database = Some(file.display().to_string())
        });
        let r = sweep_once(&cfg).await;
        let why = r.stopped.clone().unwrap_or_default();
        assert!(
            why.contains(want) && why.contains(&file.display().to_string()),
            "{r}"
        );
        assert!(r.deleted.is_empty() && all_exist(&c, &all), "{r}");
        let e = audit::run_standalone(&cfg, &Options::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        let msg = synapse_s3_offload::Chain(&e).to_string();
        assert!(msg.contains(want), "{msg}");
    }
    assert!(!missing.exists(), "opened read-only: never created");
    // `check` names the problem too.
    let yaml = config_yaml(
        &c.store,
        &c.env.endpoint,
        &c.bucket,
        (&c.env.access_key, &c.env.secret_key),
        "",
        &format!(
            "database:\n  name: sqlite3\n  database: {}\n",
            corrupt.display()
        ),
    );
    let cfg = c.store.dir.path().join("check.yaml");
    write_yaml(&cfg, &yaml);
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["check"]));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("✗ SQLite") && out.contains("not a SQLite database or is corrupt"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_sqlite_sweep_lock_file_skips_the_sweep() {
    use std::os::fd::AsRawFd;
    let c = sweep_case(true).await;
    let cfg = config(&c, |_| {});
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(
            cfg.state_dir
                .join(synapse_s3_offload::synapse_db::LOCK_FILE),
        )
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let r = sweep_once(&cfg).await;
    assert!(r.skipped_locked && r.deleted.is_empty(), "{r}");
    drop(f);
    let r = sweep_once(&cfg).await;
    assert_eq!(sorted(&r.deleted), c.deleted, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_audit_finds_each_category_and_prunes_orphans() {
    let env = s3_env();
    let store = Store::new();
    let db = SynapseSqlite::create(store.dir.path(), true);
    let bucket = create_bucket(&env, "sqlite-audit").await;
    let t = days_ago(1);
    let mut n = 0;
    let mut w = |rel: &str| {
        n += 1;
        store.write(rel, &bytes(n, 400 + n as usize * 7));
    };
    db.local("aaOKmedia00001", t, None, None);
    db.local_thumb("aaOKmedia00001", 32, 32, "image/png", "crop");
    w("local_content/aa/OK/media00001");
    w("local_thumbnails/aa/OK/media00001/32-32-image-png-crop");
    db.local("bbLOSTmedia001", t, None, None);
    db.local("ddMISMATCH0001", t, None, None);
    w("local_content/dd/MI/SMATCH0001");
    // Byte order: `-` sorts before `/` (BINARY collation, as the bucket lists).
    for id in ["jjORDERaa", "jjORDERaa-b"] {
        db.local(id, t, None, None);
        w(&format!("local_content/jj/OR/{}", &id[4..]));
    }
    db.remote("a.org", "rid", "hhREMOTEok0001", t, None);
    w("remote_content/a.org/hh/RE/MOTEok0001");
    db.remote("../../etc", "x", "iiINVALID00001", t, None);
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    raw.s3.prefix = Some("media/".into());
    raw.prune.max_orphan_percent = Some(50.0);
    let config = validated(raw);
    let s = backfill::run(&config, Progress::Log, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.failed, 0, "{s}");
    let put = async |key: &str, body: &[u8]| {
        crate::audit::put(&env, &bucket, key, body).await;
    };
    put("media/local_content/dd/MI/SMATCH0001", b"other size").await;
    put("media/local_content/ee/OR/PHAN00001", b"orphan1").await;
    put("media/remote_content/gone.org/ff/OR/PHANremote", b"orphan2").await;
    w("local_content/gg/UN/KNOWNfile1");

    let opts = Options {
        examples: 10,
        ..Options::default()
    };
    let r = crate::audit::run(&config, &opts).await;
    use crate::audit::paths;
    assert_eq!(paths(&r.lost), ["local_content/bb/LO/STmedia001"], "{r}");
    assert_eq!(
        paths(&r.mismatched),
        ["local_content/dd/MI/SMATCH0001"],
        "{r}"
    );
    assert_eq!(
        paths(&r.orphans),
        [
            "local_content/ee/OR/PHAN00001",
            "remote_content/gone.org/ff/OR/PHANremote"
        ],
        "{r}"
    );
    assert_eq!(
        paths(&r.unknown_local),
        ["local_content/gg/UN/KNOWNfile1"],
        "{r}"
    );
    assert_eq!(
        paths(&r.not_uploaded),
        ["local_content/gg/UN/KNOWNfile1"],
        "{r}"
    );
    assert_eq!(r.invalid_database_rows.count, 1, "{r}");
    // aa ×2, bb, dd, jj ×2, remote.
    assert_eq!(r.database_files, 7, "{r}");

    // Pruning, on the second sighting (the audit above was the first; each orphan is checked
    // against the database again right before its DELETE); an orphan whose media row is back
    // is kept.
    let prune = Options {
        delete_orphans: true,
        older_than: Some(Duration::ZERO),
        ..opts
    };
    db.remote("gone.org", "back", "ffORPHANremote", t, None);
    let r = crate::audit::run(&config, &prune).await;
    assert_eq!(
        paths(&r.orphans_deleted),
        ["local_content/ee/OR/PHAN00001"],
        "{r}"
    );
    let left = objects(&env, &bucket).await;
    assert!(!left.contains_key("media/local_content/ee/OR/PHAN00001"));
    assert!(left.contains_key("media/remote_content/gone.org/ff/OR/PHANremote"));
    assert!(left.contains_key("media/local_content/aa/OK/media00001"));
}

fn cli(cfg: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), all)
}

/// Only `synapse_config` (and where our state lives): Synapse's SQLite, media path and provider
/// block are enough for `check`, `upload`, `sweep`, `audit` and `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_of_only_synapse_config_on_sqlite_works_for_every_command() {
    let env = s3_env();
    let bucket = create_bucket(&env, "sqlite-cli").await;
    let store = Store::new();
    let db = SynapseSqlite::create(store.dir.path(), true);
    db.local("aaAGEDmedia0001", days_ago(400), Some(days_ago(OLD)), None);
    store.write("local_content/aa/AG/EDmedia0001", &bytes(1, 3000));
    db.local("bbFRESHmedia001", days_ago(1), None, None);
    store.write("local_content/bb/FR/ESHmedia001", &bytes(2, 3000));
    let hs = store.dir.path().join("homeserver.yaml");
    write_yaml(
        &hs,
        &format!(
            "server_name: example.com\nmedia_store_path: {}\ndatabase:\n  name: sqlite3\n  args:\n    database: {}\nmedia_storage_providers:\n- module: s3_storage_provider.S3StorageProviderBackend\n  store_local: false\n  store_remote: false\n  store_synchronous: false\n  config:\n    bucket: {bucket}\n    endpoint_url: {}\n    region_name: us-east-1\n    access_key_id: {}\n    secret_access_key: {}\n",
            store.root.display(),
            db.path.display(),
            env.endpoint,
            env.access_key,
            env.secret_key,
        ),
    );
    let cfg = store.dir.path().join("offload.yaml");
    write_yaml(
        &cfg,
        &format!(
            "synapse_config: {}\nstate_dir: {}\n",
            hs.display(),
            store.state.display()
        ),
    );
    std::fs::create_dir(&store.state).unwrap();
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["check"]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("✓ SQLite")
            && out.contains("2 local media")
            && out.contains("journal mode wal"),
        "{out}"
    );
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["upload"]));
    assert_eq!(code, 0, "{out}");
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["sweep"]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("deleted local_content/aa/AG/EDmedia0001"),
        "{out}"
    );
    assert!(!store.root.join("local_content/aa/AG/EDmedia0001").exists());
    assert!(store.root.join("local_content/bb/FR/ESHmedia001").exists());
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["audit", "--json"]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"database_files\": 2"), "{out}");

    // The daemon: uploads a new file; a sweep and an audit asked of it run on SQLite.
    let log = store.dir.path().join("daemon.log");
    let d = ChildDaemon::spawn(&cfg, &log, &[]);
    d.ready().await;
    db.local("ccNEWmedia00001", days_ago(1), None, None);
    store.write("local_content/cc/NE/Wmedia00001", &bytes(3, 2000));
    eventually("the new file uploaded", Duration::from_secs(30), || async {
        let keys = list_sizes(&env, &bucket).await;
        if keys.contains_key("local_content/cc/NE/Wmedia00001") {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        }
    })
    .await;
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["sweep", "--dry-run"]));
    assert_eq!(code, 0, "{out}\n{}", d.log());
    let (code, out) = tokio::task::block_in_place(|| cli(&cfg, &["audit", "--json"]));
    assert_eq!(code, 0, "{out}\n{}", d.log());
    assert!(out.contains("\"database_files\": 3"), "{out}");
    d.stop();
}
