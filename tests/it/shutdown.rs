//! Shutdown against the real servers: a multipart upload interrupted by SIGTERM (or by Ctrl-C of
//! `upload`) is aborted in the bucket, not left billing its parts; a long hash does not hold the
//! process past `shutdown_grace`, and "Stopped." is logged only once it ended; `check` and
//! `audit` find incomplete multipart uploads under the prefix (moto lists them; s3s-fs does not
//! implement ListMultipartUploads, and says so).

use std::path::Path;
use std::time::{Duration, Instant};

use synapse_s3_offload::backfill::{self, Progress};
use synapse_s3_offload::config::{Config, SizeValue};
use synapse_s3_offload::state::State;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::support::*;

const BIG: &str = "local_content/ab/cd/bigfile";

/// What s3s-fs keeps of the multipart uploads in progress in its data dir: an upload's info
/// (`.upload-ID.json`, until completed or aborted) and its parts (`.upload_id-ID.part-N`).
fn in_progress(root: &Path) -> (usize, usize) {
    let (mut uploads, mut parts) = (0, 0);
    for e in std::fs::read_dir(root).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with(".upload-") && name.ends_with(".json") {
            uploads += 1;
        } else if name.starts_with(".upload_id-") {
            parts += 1;
        }
    }
    (uploads, parts)
}

/// A private s3s-fs (its data dir shows the uploads in progress) behind a proxy that holds every
/// PUT (so each part) for 30 s: a 12 MiB file in 5 MiB parts stays mid-upload.
struct Case {
    s3: PrivateS3,
    proxy: Proxy,
    store: Store,
    config: Config,
}

async fn case(hint: &str) -> Case {
    let env = s3_env();
    let s3 = PrivateS3::start(&env);
    let penv = s3.env(&env);
    let bucket = create_bucket(&penv, hint).await;
    let proxy = Proxy::start(penv.addr).await;
    proxy.set_put_delay(Duration::from_secs(30));
    let store = Store::new();
    store.write(BIG, &bytes(5, 12 << 20));
    let mut raw = raw_config(&penv, &proxy.endpoint(), &bucket, &store);
    raw.shutdown_grace = Some("1s".into());
    raw.upload.multipart_threshold = Some(SizeValue::Text("5MiB".into()));
    raw.upload.multipart_part_size = Some(SizeValue::Text("5MiB".into()));
    let config = validated(raw);
    Case {
        s3,
        proxy,
        store,
        config,
    }
}

impl Case {
    /// Waits until the multipart upload is created and its parts are on their way.
    async fn mid_upload(&self) {
        let root = self.s3.root.path().to_owned();
        wait_until(
            "a multipart upload in progress",
            Duration::from_secs(30),
            || {
                in_progress(&root).0 == 1
                    && self
                        .proxy
                        .requests()
                        .iter()
                        .any(|r| r.method == "PUT" && r.path.contains("partNumber"))
            },
        )
        .await;
    }

    /// Nothing of the upload is left in the bucket, and the file is still queued for next time.
    fn nothing_left(&self) {
        assert_eq!(
            in_progress(self.s3.root.path()),
            (0, 0),
            "the interrupted multipart upload is still in the bucket (its parts billed)"
        );
        let aborts = self
            .proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "DELETE" && r.path.contains("uploadId"))
            .count();
        assert_eq!(aborts, 1, "one AbortMultipartUpload");
    }
}

/// SIGTERM (the daemon's shutdown token) while a multipart upload's parts are in flight: after
/// `shutdown_grace` its upload is dropped, and aborted in the bucket within a few seconds more;
/// the file stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_multipart_upload_aborts_it_in_the_bucket() {
    let c = case("abortdaemon").await;
    let mut d = Daemon::start(c.config.clone());
    d.ready().await;
    c.mid_upload().await;
    let t = Instant::now();
    d.stop().await;
    let took = t.elapsed();
    eprintln!("daemon stopped {took:?} after the signal (shutdown_grace 1s)");
    assert!(
        took < Duration::from_secs(1 + 5),
        "stopped {took:?} after the signal"
    );
    c.nothing_left();
    let state = State::open(&c.config.state_dir).unwrap();
    let queued: Vec<String> = state
        .queue_items()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(queued, [BIG], "the file stays queued for the next start");
    drop(state);
    // The next start uploads it.
    c.proxy.set_put_delay(Duration::ZERO);
    let mut d = Daemon::start(c.config.clone());
    d.ready().await;
    d.stop_drained().await;
    let env = c.s3.env(&s3_env());
    let files = c.store.read_all("local_content");
    all_uploaded(&env, c.config.s3.bucket.as_str(), &files)
        .await
        .unwrap();
}

/// Ctrl-C of `upload` mid multipart upload: the upload in flight gets `shutdown_grace`, then it
/// is dropped and aborted (it used to wait for every part however long, and a second Ctrl-C left
/// the parts in the bucket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backfill_aborts_its_multipart_upload() {
    let c = case("abortbackfill").await;
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (config, cancel) = (c.config.clone(), cancel.clone());
        async move { backfill::run(&config, Progress::Log, cancel).await }
    });
    c.mid_upload().await;
    let t = Instant::now();
    cancel.cancel();
    let summary = run.await.unwrap().unwrap();
    let took = t.elapsed();
    eprintln!("backfill ended {took:?} after Ctrl-C (shutdown_grace 1s)");
    assert!(
        took < Duration::from_secs(1 + 5),
        "the backfill ended {took:?} after Ctrl-C"
    );
    assert_eq!((summary.uploaded, summary.failed), (0, 0), "{summary}");
    c.nothing_left();
}

/// The files `pid` has open (their paths).
fn open_files(pid: u32) -> Vec<std::path::PathBuf> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

/// SIGTERM while a 3 GB file is being hashed, `shutdown_grace: 1s`: the hash stops at its next
/// chunk, so the process exits within the grace and a small bound (it used to hash on for
/// 12 s), "Stopped." is logged only once the read has ended (the file is closed by then), and
/// the file is still queued, with no failure, for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_a_long_hash_and_logs_stopped_once_it_ended() {
    let env = s3_env();
    let bucket = create_bucket(&env, "longhash").await;
    let store = Store::new();
    let huge = store.root.join(BIG);
    std::fs::create_dir_all(huge.parent().unwrap()).unwrap();
    // Sparse: 3 GB to read and hash, nothing on disk.
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let cfg = store.dir.path().join("config.yaml");
    write_yaml(
        &cfg,
        &config_yaml(
            &store,
            &env.endpoint,
            &bucket,
            (&env.access_key, &env.secret_key),
            "",
            "shutdown_grace: 1s\n",
        ),
    );
    let mut d = ChildDaemon::spawn(&cfg, &store.dir.path().join("daemon.log"), &[]);
    let pid = d.id();
    wait_until(
        "the daemon reading the 3 GB file",
        Duration::from_secs(60),
        || open_files(pid).contains(&huge),
    )
    .await;
    let t = Instant::now();
    signal(pid, libc::SIGTERM);
    // Until it exits: whenever the log says "Stopped.", the file must be closed already.
    let mut stopped_seen = false;
    while Path::new(&format!("/proc/{pid}/fd")).exists() && !open_files(pid).is_empty() {
        if d.log().contains("Stopped.") {
            stopped_seen = true;
            assert!(
                !open_files(pid).contains(&huge),
                "\"Stopped.\" was logged while the hash still ran: {}",
                d.log()
            );
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{}", d.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = d.wait();
    let took = t.elapsed();
    let log = d.log();
    eprintln!("process exited {took:?} after SIGTERM (shutdown_grace 1s)");
    assert!(status.success(), "{status:?}: {log}");
    assert!(
        took < Duration::from_secs(1 + 5),
        "exited {took:?} after SIGTERM with shutdown_grace 1s: {log}"
    );
    assert!(stopped_seen || log.contains("Stopped."), "{log}");
    assert!(log.contains("abandoned_reads=0"), "{log}");
    assert!(
        !log.contains("Upload failed"),
        "a cancelled hash is no failure: {log}"
    );
    let state = State::open(&store.state).unwrap();
    let queued: Vec<String> = state
        .queue_items()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(queued, [BIG], "the file stays queued for the next start");
}

/// The sweep's own hashing (an aged file without a record is read before its HEAD) stops at once
/// too when the sweep is cancelled (the daemon's shutdown, Ctrl-C of `sweep`): it used to read a
/// 3 GB file to its end first. The file is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sweep_stops_hashing_at_once() {
    let env = s3_env();
    let bucket = create_bucket(&env, "sweephash").await;
    let store = Store::new();
    let db = TestDb::create().await;
    db.local("abcdHUGEfile", days_ago(90), None, None).await;
    let huge = store.root.join("local_content/ab/cd/HUGEfile");
    std::fs::create_dir_all(huge.parent().unwrap()).unwrap();
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.database = Some(db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    let config = validated(raw);
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { synapse_s3_offload::sweep::run_standalone(&config, false, &cancel).await }
    });
    let me = std::process::id();
    wait_until(
        "the sweep reading the 3 GB file",
        Duration::from_secs(30),
        || open_files(me).contains(&huge),
    )
    .await;
    let t = Instant::now();
    cancel.cancel();
    let _ = run.await.unwrap();
    let took = t.elapsed();
    eprintln!("sweep ended {took:?} after its cancellation");
    assert!(
        took < Duration::from_secs(3),
        "the sweep ended {took:?} after its cancellation"
    );
    assert!(
        !open_files(me).contains(&huge),
        "the file is still being read"
    );
    assert!(huge.exists(), "kept");
}
