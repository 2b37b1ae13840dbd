//! The verified copy wins (DESIGN.md invariant 8): a media is uploaded and verified, its local copy
//! swept, and Synapse writes it back through `ensure_media_is_in_local_cache` (`open(path, "wb")`,
//! no temp file, no cleanup), cut short: a truncated local copy. In every path — the daemon's
//! close event, its scan, a sweep with and without a daemon, `audit --fix` — the object must stay
//! byte for byte what was verified, the bad copy must be reported, and healed from the bucket
//! when healing is on. Where Synapse's database has the media's sha256, it decides.

use std::io::Write;
use std::time::Duration;

use synapse_s3_offload::backfill::{self, Progress, Summary};
use synapse_s3_offload::config::{Config, RawConfig};
use synapse_s3_offload::control::{self, Request, Response};
use synapse_s3_offload::sha256::Sha256;
use synapse_s3_offload::state::{ProblemKind, State};
use synapse_s3_offload::{audit, sweep};
use tokio_util::sync::CancellationToken;

use crate::daemon::fast;
use crate::proxy::Proxy;
use crate::support::*;

const MEDIA_ID: &str = "trUNCATEDwriteback";
const REL: &str = "local_content/tr/UN/CATEDwriteback";

struct Case {
    env: S3Env,
    proxy: Proxy,
    bucket: String,
    store: Store,
    db: TestDb,
    original: Vec<u8>,
}

impl Case {
    /// An aged media (60 days) in Synapse's database, its original written locally.
    async fn new(hint: &str) -> Case {
        let env = s3_env();
        let proxy = Proxy::start(env.addr).await;
        let bucket = create_bucket(&env, hint).await;
        let store = Store::new();
        let db = TestDb::create().await;
        db.local(MEDIA_ID, days_ago(60), None, None).await;
        let original = bytes(77, 300_000);
        store.write(REL, &original);
        Case {
            env,
            proxy,
            bucket,
            store,
            db,
            original,
        }
    }

    fn config(&self, tweak: impl FnOnce(&mut RawConfig)) -> Config {
        let mut raw = raw_config(&self.env, &self.proxy.endpoint(), &self.bucket, &self.store);
        raw.database = Some(self.db.raw());
        raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
        fast(&mut raw);
        tweak(&mut raw);
        validated(raw)
    }

    fn local(&self) -> Vec<u8> {
        std::fs::read(self.store.root.join(REL)).unwrap_or_default()
    }

    /// Synapse writing the media back from the bucket and failing after `len` bytes: the file is
    /// created (truncated) in place, written in part, and closed.
    fn interrupted_write_back(&self, len: usize) {
        let mut f = std::fs::File::create(self.store.root.join(REL)).unwrap();
        f.write_all(&self.original[..len]).unwrap();
    }

    async fn object(&self) -> Option<Vec<u8>> {
        objects(&self.env, &self.bucket).await.remove(REL)
    }

    fn puts(&self) -> usize {
        self.proxy
            .object_requests("PUT")
            .iter()
            .filter(|r| r.path.contains("CATEDwriteback"))
            .count()
    }

    async fn set_sha256(&self, data: &[u8]) {
        self.db
            .client
            .execute(
                "UPDATE local_media_repository SET sha256 = $1 WHERE media_id = $2",
                &[&hex::encode(Sha256::digest(data)), &MEDIA_ID],
            )
            .await
            .unwrap();
    }

    /// Checks the verified object is intact and that no PUT was made since the proxy was cleared.
    async fn assert_object_intact(&self) {
        assert_eq!(
            self.puts(),
            0,
            "nothing was uploaded over the verified object"
        );
        assert!(
            self.object().await.as_deref() == Some(&self.original[..]),
            "the object is still the verified original"
        );
    }
}

async fn upload(config: &Config) -> Summary {
    backfill::run(config, Progress::Log, CancellationToken::new())
        .await
        .unwrap()
}

async fn sweep_now(config: &Config) -> sweep::Report {
    sweep::run_standalone(config, false, &CancellationToken::new())
        .await
        .unwrap()
}

fn problems(config: &Config) -> Vec<(String, ProblemKind)> {
    let state = State::open(&config.state_dir).unwrap();
    state
        .problems_after(None, 100)
        .unwrap()
        .into_iter()
        .map(|(p, pr)| (p, pr.kind))
        .collect()
}

/// Uploaded, verified and swept: only the bucket holds the media.
async fn uploaded_and_swept(c: &Case, config: &Config) {
    let s = upload(config).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    let r = sweep_now(config).await;
    assert_eq!(r.files_deleted, 1, "{r}");
    assert!(!c.store.root.join(REL).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_close_event_heals_a_truncated_write_back_and_never_uploads_it() {
    let c = Case::new("vclose").await;
    let config = c.config(|_| {});
    let d = Daemon::start(config.clone());
    let files = [(REL.to_owned(), c.original.clone())];
    eventually("the original", Duration::from_secs(30), || {
        all_uploaded(&c.env, &c.bucket, &files)
    })
    .await;
    // The sweep's effect (its record stays), then Synapse's write-back, cut short.
    std::fs::remove_file(c.store.root.join(REL)).unwrap();
    c.proxy.clear();
    c.interrupted_write_back(100_000);
    wait_until("the bad copy healed", Duration::from_secs(30), || {
        c.local() == c.original
    })
    .await;
    d.stop().await;
    c.assert_object_intact().await;
    assert!(
        !c.proxy.object_requests("GET").is_empty(),
        "healed from the bucket"
    );
    assert_eq!(problems(&config), [], "healed: nothing left to report");
    // The healed file is recorded: the next pass makes no request for it.
    c.proxy.clear();
    let s = upload(&config).await;
    assert_eq!((s.unchanged, s.uploaded, s.failed), (1, 0, 0), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_scan_reports_a_bad_copy_when_healing_is_off_and_heals_it_when_on() {
    let c = Case::new("vscan").await;
    let off = c.config(|r| {
        r.upload.heal_bad_local_copies = Some(false);
        r.upload.failed_retry_interval = Some("1s".into());
    });
    uploaded_and_swept(&c, &off).await;
    // Written back while no daemon runs: the startup scan finds it.
    c.interrupted_write_back(1);
    c.proxy.clear();
    let d = Daemon::start(off.clone());
    wait_until("the object looked up", Duration::from_secs(30), || {
        !c.proxy.object_requests("HEAD").is_empty()
    })
    .await;
    d.stop().await;
    c.assert_object_intact().await;
    assert_eq!(c.local(), &c.original[..1], "report only: the file is left");
    assert_eq!(
        problems(&off),
        [(REL.to_owned(), ProblemKind::BadLocalCopy)]
    );
    let st = control::status_standalone(&off).unwrap();
    assert_eq!(st.bad_local_copies, 1, "{st}");

    // Healing on: the queued file is healed.
    let on = c.config(|r| r.upload.failed_retry_interval = Some("1s".into()));
    let d = Daemon::start(on.clone());
    wait_until("the bad copy healed", Duration::from_secs(30), || {
        c.local() == c.original
    })
    .await;
    d.stop().await;
    c.assert_object_intact().await;
    assert_eq!(problems(&on), [], "cleared once healed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_without_a_daemon_then_upload_heals_instead_of_overwriting() {
    let c = Case::new("vsweep").await;
    let config = c.config(|_| {});
    uploaded_and_swept(&c, &config).await;
    c.interrupted_write_back(100_000);
    c.proxy.clear();
    // The sweep sees a local file that differs from the object: kept, queued, nothing else.
    let r = sweep_now(&config).await;
    assert_eq!((r.files_deleted, r.kept_different), (0, 1), "{r}");
    let s = upload(&config).await;
    assert_eq!((s.healed, s.uploaded, s.failed), (1, 0, 0), "{s}");
    assert_eq!(c.local(), c.original);
    c.assert_object_intact().await;
    // Once healed (and still aged), the next sweep frees it again.
    let r = sweep_now(&config).await;
    assert_eq!(r.files_deleted, 1, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_through_the_daemon_keeps_the_verified_object() {
    let c = Case::new("vdsweep").await;
    let config = c.config(|r| r.upload.heal_bad_local_copies = Some(false));
    let d = Daemon::start(config.clone());
    let files = [(REL.to_owned(), c.original.clone())];
    eventually("the original", Duration::from_secs(30), || {
        all_uploaded(&c.env, &c.bucket, &files)
    })
    .await;
    let sweep = || async {
        match control::request(&config.state_dir, &Request::Sweep { dry_run: false })
            .await
            .unwrap()
        {
            Some(Response::Sweep(r)) => r,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(sweep().await.files_deleted, 1);
    c.proxy.clear();
    c.interrupted_write_back(100_000);
    wait_until("the object looked up", Duration::from_secs(30), || {
        !c.proxy.object_requests("HEAD").is_empty()
    })
    .await;
    let r = sweep().await;
    assert_eq!((r.files_deleted, r.kept_different), (0, 1), "{r}");
    d.stop().await;
    c.assert_object_intact().await;
    assert_eq!(c.local(), &c.original[..100_000], "kept, never deleted");
    assert_eq!(
        problems(&config),
        [(REL.to_owned(), ProblemKind::BadLocalCopy)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_bad_copy_and_fix_heals_it() {
    let c = Case::new("vaudit").await;
    let config = c.config(|_| {});
    uploaded_and_swept(&c, &config).await;
    c.interrupted_write_back(100_000);
    c.proxy.clear();
    let opts = audit::Options {
        fix: true,
        examples: 5,
        ..audit::Options::default()
    };
    let r = audit::run_standalone(&config, &opts, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r.bad_local_copies.count, 1, "{r}");
    assert_eq!(r.bad_local_copies.examples[0].path, REL, "{r}");
    assert_eq!((r.mismatched.count, r.not_uploaded.count), (0, 0), "{r}");
    assert_eq!(r.fix_queued, 1, "{r}");
    let s = upload(&config).await;
    assert_eq!((s.healed, s.uploaded), (1, 0), "{s}");
    assert_eq!(c.local(), c.original);
    c.assert_object_intact().await;
}

/// Synapse's sha256 against a local file that does not match it: without our record (the state
/// was lost) the object, uploaded by another tool, would be a conflict; the hash says the object
/// is right, so the local copy is healed from it (the GET checked against the hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_hash_heals_a_bad_copy_from_an_object_we_never_verified() {
    let c = Case::new("vhash1").await;
    let config = c.config(|_| {});
    // s3_media_upload's object (a plain PUT), our state gone, and a truncated local copy.
    client(&c.env)
        .await
        .put_object()
        .bucket(&c.bucket)
        .key(REL)
        .body(c.original.clone().into())
        .send()
        .await
        .unwrap();
    c.interrupted_write_back(50_000);
    let s = upload(&config).await;
    assert_eq!(
        (s.conflicts, s.uploaded),
        (1, 0),
        "no hash: a conflict, {s}"
    );
    c.set_sha256(&c.original).await;
    c.proxy.clear();
    let s = upload(&config).await;
    assert_eq!((s.healed, s.uploaded, s.failed), (1, 0, 0), "{s}");
    assert_eq!(c.local(), c.original);
    c.assert_object_intact().await;
}

/// Synapse's sha256 against the object: an object that does not match it loses to a local file
/// that does (even one we once verified), and confirms nothing for the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_hash_overrules_a_wrong_object_and_the_sweep_never_trusts_it() {
    let c = Case::new("vhash2").await;
    let config = c.config(|_| {});
    // The local file holds a truncated copy, and so does the object once it is uploaded (no
    // object existed to compare with); Synapse's hash is of the original.
    let truncated = c.original[..70_000].to_vec();
    c.store.write(REL, &truncated);
    c.set_sha256(&c.original).await;
    let s = upload(&config).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    let r = sweep_now(&config).await;
    assert_eq!((r.files_deleted, r.kept_bad_copy), (0, 1), "{r}");
    assert_eq!(c.local(), truncated, "never deleted as confirmed");
    // The audit compares the SHA-256 we recorded with Synapse's, without reading the object.
    let r = audit::run_standalone(
        &config,
        &audit::Options {
            examples: 5,
            ..audit::Options::default()
        },
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.mismatched.count, 1, "{r}");
    assert!(r.mismatched.examples[0].detail.contains("sha256"), "{r}");

    // The complete original comes back locally (Synapse re-fetched it from a remote, or an
    // operator restored it): it matches the hash, so it replaces the wrong object.
    c.store.write(REL, &c.original);
    let s = upload(&config).await;
    assert_eq!((s.uploaded, s.failed), (1, 0), "{s}");
    assert!(c.object().await.as_deref() == Some(&c.original[..]));
    let r = sweep_now(&config).await;
    assert_eq!(r.files_deleted, 1, "{r}");
}
