//! The daemon (`run`): every closed file reaches the bucket, across kill -9, S3 outages, lost
//! inotify events and the watch limit; clean shutdown.

use std::time::{Duration, Instant};

use rand::Rng;
use synapse_s3_offload::config::RawConfig;
use synapse_s3_offload::daemon::{self, Options};
use synapse_s3_offload::state::State;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::support::*;

pub(crate) fn fast(raw: &mut RawConfig) {
    raw.upload.settle = Some("300ms".into());
    raw.upload.max_backoff = Some("2s".into());
}

/// Writes `n` files Synapse-style (makedirs, open/write/close) as fast as possible.
fn write_burst(store: &Store, n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    write_burst_at(&store.root, n, seed)
}

fn write_burst_at(root: &std::path::Path, n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let rel = media_name(&mut rng);
            let data = bytes(seed * 100_000 + i as u64, 500 + (i * 37) % 20_000);
            let p = root.join(&rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &data).unwrap();
            (rel, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_files_written_at_full_speed_all_arrive() {
    let env = s3_env();
    let bucket = create_bucket(&env, "burst").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    fast(&mut raw);
    let d = Daemon::start(validated(raw));
    let s = &store;
    let mut files = tokio::task::block_in_place(|| write_burst(s, 450, 1));
    // Thumbnails written into the media's new thumbnail directory right after, like Synapse.
    for (i, (rel, _)) in files.clone().iter().take(50).enumerate() {
        let t = format!(
            "{}/32-32-image-png-crop",
            rel.replace("local_content", "local_thumbnails")
        );
        let data = bytes(9_000 + i as u64, 3_000);
        store.write(&t, &data);
        files.push((t, data));
    }
    eventually("500 files in the bucket", Duration::from_secs(90), || {
        listed(&env, &bucket, &files)
    })
    .await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_are_recovered_by_a_rescan() {
    let env = s3_env();
    let bucket = create_bucket(&env, "overflow").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    fast(&mut raw);
    // Existing directories: no Create(Folder) events whose directory scans would find the files.
    for d in 0..30 {
        std::fs::create_dir_all(store.root.join(format!("local_content/ov/{d:02}"))).unwrap();
    }
    // A two-slot channel between notify and the daemon: most events of a burst are dropped.
    let mut d = Daemon::start_with(
        validated(raw),
        Options {
            event_buffer: 2,
            ..Options::default()
        },
    );
    d.ready().await;
    let files: Vec<_> = (0..300)
        .map(|i| {
            let rel = format!("local_content/ov/{:02}/file{i}", i % 30);
            let data = bytes(2_000 + i, 1_000 + i as usize);
            store.write(&rel, &data);
            (rel, data)
        })
        .collect();
    eventually("300 files in the bucket", Duration::from_secs(60), || {
        listed(&env, &bucket, &files)
    })
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_loses_nothing() {
    let env = s3_env();
    let mut s3 = PrivateS3::start(&env);
    let penv = s3.env(&env);
    let bucket = create_bucket(&penv, "outage").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &s3.endpoint(), &bucket, &store);
    fast(&mut raw);
    raw.s3.connect_timeout = Some("1s".into());
    let d = Daemon::start(validated(raw));
    let mut files = tokio::task::block_in_place(|| write_burst(&store, 20, 3));
    eventually("the first files", Duration::from_secs(30), || {
        listed(&penv, &bucket, &files)
    })
    .await;

    s3.stop();
    // Files keep arriving for 30 s while the server is down.
    let until = Instant::now() + Duration::from_secs(30);
    let mut seed = 100;
    while Instant::now() < until {
        files.extend(tokio::task::block_in_place(|| write_burst(&store, 3, seed)));
        seed += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s3.resume(&env);
    let back = Instant::now();
    eventually(
        "everything after the outage",
        Duration::from_secs(30),
        || listed(&penv, &bucket, &files),
    )
    .await;
    // Backoff is capped at 2 s here: all retried promptly once the server is back.
    assert!(
        back.elapsed() < Duration::from_secs(15),
        "took {:?}",
        back.elapsed()
    );
    all_uploaded(&penv, &bucket, &files).await.unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_deleted_and_rewritten_files() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "edge").await;
    let store = Store::new();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    raw.upload.settle = Some("2s".into());
    let config = validated(raw);
    let state_dir = config.state_dir.clone();
    let mut d = Daemon::start(config);
    d.ready().await;

    // Written slowly over 5 s into a brand-new directory: uploaded once, with its final content.
    let slow = "local_content/sl/ow/slowlywrittenfile";
    std::fs::create_dir_all(store.root.join("local_content/sl/ow")).unwrap();
    let mut full = Vec::new();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(store.root.join(slow)).unwrap();
        for i in 0..10 {
            let chunk = bytes(500 + i, 10_000);
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
            full.extend(chunk);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Deleted right after close (spam checker): no error, no loop.
    for i in 0..20 {
        let p = store.write(&format!("local_content/de/le/ted{i}"), b"spam");
        std::fs::remove_file(p).unwrap();
    }
    let files = vec![(slow.to_owned(), full.clone())];
    eventually("the slow file", Duration::from_secs(30), || {
        listed(&env, &bucket, &files)
    })
    .await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
    let puts = proxy
        .object_requests("PUT")
        .into_iter()
        .filter(|r| r.path.contains("slowlywritten"))
        .count();
    assert_eq!(puts, 1, "uploaded once");

    // Rewritten with other bytes after its verified upload: Synapse media never change, so this
    // is a bad local copy (DESIGN.md invariant 8): healed from the bucket, never uploaded.
    let v2 = bytes(999, 12_345);
    store.write(slow, &v2);
    wait_until("the bad copy healed", Duration::from_secs(30), || {
        std::fs::read(store.root.join(slow)).is_ok_and(|b| b == full)
    })
    .await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
    // The heal's rename is an event of its own: the path is looked at once more (unchanged).
    d.drained().await;
    d.stop().await;

    let state = State::open(&state_dir).unwrap();
    assert!(
        state.queue_items().unwrap().is_empty(),
        "nothing left queued or failing"
    );
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process.

/// The config and log paths of a child daemon's test (see [`config_yaml`]).
pub(crate) fn daemon_files(
    store: &Store,
    env: &S3Env,
    endpoint: &str,
    bucket: &str,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cfg = config_yaml(store, env, endpoint, bucket, extra);
    (cfg, store.dir.path().join("daemon.log"))
}

fn config_yaml(
    store: &Store,
    env: &S3Env,
    endpoint: &str,
    bucket: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = store.dir.path().join("config.yaml");
    let yaml = crate::support::config_yaml(
        store,
        endpoint,
        bucket,
        (&env.access_key, &env.secret_key),
        "",
        &format!(
            "scan_interval_when_degraded: 1s\nupload:\n  settle: 300ms\n  max_backoff: 2s\n{extra}"
        ),
    );
    write_yaml(&path, &yaml);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_random_moments_loses_nothing() {
    let env = s3_env();
    let bucket = create_bucket(&env, "kill9").await;
    let store = Store::new();
    let cfg = config_yaml(&store, &env, &env.endpoint, &bucket, "");
    let log = store.dir.path().join("daemon.log");
    let mut files = Vec::new();
    for round in 0..5u64 {
        let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
        let writer = {
            let root = store.root.clone();
            std::thread::spawn(move || write_burst_at(&root, 400, 10 + round))
        };
        let pause = rand::rng().random_range(50..1500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.kill9();
        files.extend(writer.join().unwrap());
    }
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    let check = eventually(
        "2000 files after 5 kill -9",
        Duration::from_secs(120),
        || listed(&env, &bucket, &files),
    );
    check.await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
    assert!(child.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_uploads_in_flight_exits_zero_and_loses_nothing() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    proxy.set_put_delay(Duration::from_secs(3));
    let bucket = create_bucket(&env, "sigterm").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(
        &store,
        &env,
        &proxy.endpoint(),
        &bucket,
        "shutdown_grace: 5s\n",
    );
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    let files = tokio::task::block_in_place(|| write_burst(&store, 30, 20));
    wait_until("a PUT in flight", Duration::from_secs(20), || {
        !proxy.object_requests("PUT").is_empty()
    })
    .await;
    let t = Instant::now();
    let status = child.terminate();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5 + 3),
        "exited within the grace period: {:?}",
        t.elapsed()
    );

    proxy.set_put_delay(Duration::ZERO);
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    eventually("all files after restart", Duration::from_secs(60), || {
        listed(&env, &bucket, &files)
    })
    .await;
    assert!(child.terminate().success());
}

/// A new file goes straight to PUT, without a HEAD looking for an object that is not there (one
/// request per file instead of two): one reported by its close event, and one a scan finds while
/// younger than `upload.settle`. An older file found by the startup scan may be in the bucket
/// already (uploaded before a crash, or by s3_media_upload): it is looked up first and adopted
/// without a PUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_files_are_looked_up_once_then_put_and_older_ones_found_at_startup_are_adopted() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    let bucket = create_bucket(&env, "nohead").await;
    let store = Store::new();
    let old = bytes(21, 30_000);
    let path = store.write("local_content/ol/dd/alreadythere", &old);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    client(&env)
        .await
        .put_object()
        .bucket(&bucket)
        .key("local_content/ol/dd/alreadythere")
        .body(old.into())
        .send()
        .await
        .unwrap();
    let young = [("local_content/yo/un/gfile".to_owned(), bytes(23, 20_000))];
    store.write(&young[0].0, &young[0].1);
    std::fs::create_dir_all(store.root.join("local_content/ne/ww")).unwrap();
    let cfg = config_yaml(&store, &env, &proxy.endpoint(), &bucket, "");
    // Every file written during the test stays "young"; a read lease says it is complete.
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    write_yaml(&cfg, &yaml.replace("settle: 300ms", "settle: 1h"));
    let log = store.dir.path().join("daemon.log");
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    // From the end of the first scan made with the watch in place, new files reach the daemon by
    // their events only (the next periodic scan is hours away).
    child.ready().await;
    let new = [(
        "local_content/ne/ww/closedfile".to_owned(),
        bytes(22, 40_000),
    )];
    store.write(&new[0].0, &new[0].1);
    let both = [young[0].clone(), new[0].clone()];
    eventually(
        "the young and the closed file",
        Duration::from_secs(30),
        || listed(&env, &bucket, &both),
    )
    .await;
    all_uploaded(&env, &bucket, &both).await.unwrap();
    assert!(child.terminate().success());

    let on = |method: &str, key: &str| {
        proxy
            .object_requests(method)
            .into_iter()
            .filter(|r| r.path.contains(key))
            .count()
    };
    // A file the watcher sees as new may be Synapse writing a verified object back (after a
    // sweep): one HEAD before its PUT, so a verified object is never overwritten blindly.
    for key in ["ne/ww/closedfile", "yo/un/gfile"] {
        let first = proxy
            .requests()
            .into_iter()
            .find(|r| r.is_object() && r.path.contains(key))
            .map(|r| r.method);
        assert_eq!(
            first.as_deref(),
            Some("HEAD"),
            "{key}: a HEAD before the PUT"
        );
        assert!(on("PUT", key) >= 1, "{key}");
    }
    assert!(on("HEAD", "ol/dd/alreadythere") >= 1, "looked up first");
    assert_eq!(on("PUT", "ol/dd/alreadythere"), 0, "adopted, not uploaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inotify_watch_limit_degrades_to_scans_and_loses_nothing() {
    let env = s3_env();
    let bucket = create_bucket(&env, "watchlimit").await;
    let store = Store::new();
    // More directories than the 20 watches the daemon will get.
    for i in 0..40 {
        store.write(&format!("local_content/w{i:02}/xx/existing"), b"old");
    }
    let cfg = config_yaml(&store, &env, &env.endpoint, &bucket, "");
    let log = store.dir.path().join("daemon.log");
    // A user namespace of its own, where inotify watches are limited to 20 (the limit is per
    // user namespace, so other tests are not affected).
    let mut child = ChildDaemon::spawn(
        &cfg,
        &log,
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            "echo 20 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"",
        ],
    );
    let mut files: Vec<_> = (0..40)
        .map(|i| {
            (
                format!("local_content/w{i:02}/xx/existing"),
                b"old".to_vec(),
            )
        })
        .collect();
    // The startup of degraded mode: the watch limit was met (and said).
    wait_until("the watch limit", Duration::from_secs(60), || {
        child.log().contains("max_user_watches")
    })
    .await;
    files.extend(tokio::task::block_in_place(|| write_burst(&store, 50, 30)));
    eventually(
        "all files with degraded watching",
        Duration::from_secs(60),
        || listed(&env, &bucket, &files),
    )
    .await;
    assert!(child.terminate().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("max_user_watches"),
        "the limit is explained: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_fails_at_once() {
    let env = s3_env();
    let bucket = create_bucket(&env, "second").await;
    let store = Store::new();
    let raw = raw_config(&env, &env.endpoint, &bucket, &store);
    let config = validated(raw);
    let d = Daemon::start(config.clone());
    let state_dir = config.state_dir.clone();
    answering(&state_dir).await;
    // It used to wait 10 s in silence, then fail.
    let started = Instant::now();
    let second = daemon::run(config, CancellationToken::new()).await;
    let err = second.expect_err("a second daemon must not start");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("already running"), "{err}");
    d.stop().await;
}

/// What an admin reads in the journal: one line with the effective setup (no secret), and no
/// notify noise when a watched directory goes away (the sweep removes emptied ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_shows_the_setup_once_and_no_watch_removal_noise() {
    let env = s3_env();
    let bucket = create_bucket(&env, "logs").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the watches", Duration::from_secs(30), || {
        read().contains("Watching the media store.")
    })
    .await;
    let first = vec![("local_content/lo/gs/gone".to_string(), bytes(1, 100))];
    store.write(&first[0].0, &first[0].1);
    eventually("the first file", Duration::from_secs(30), || {
        listed(&env, &bucket, &first)
    })
    .await;
    // The watched directories of that media go, as after a sweep.
    std::fs::remove_dir_all(store.root.join("local_content/lo")).unwrap();
    let second = vec![("local_content/lo/gt/next".to_string(), bytes(2, 100))];
    store.write(&second[0].0, &second[0].1);
    eventually("a file after the removal", Duration::from_secs(30), || {
        listed(&env, &bucket, &second)
    })
    .await;
    assert!(child.terminate().success());
    let text = read();
    assert!(
        !text.contains("unable to remove watch descriptor"),
        "{text}"
    );
    let starting: Vec<&str> = text.lines().filter(|l| l.contains("Starting.")).collect();
    assert_eq!(starting.len(), 1, "{text}");
    for want in [
        format!("bucket {bucket}"),
        env.endpoint.clone(),
        "metrics off".into(),
        "sweep off (no database: section)".into(),
    ] {
        assert!(starting[0].contains(&want), "{want}: {}", starting[0]);
    }
    assert!(!text.contains(&env.secret_key), "{text}");
}

/// SIGHUP (a reload request, or the terminal of a foreground run going away) must not stop the
/// daemon: it died with exit 129, which systemd counts as clean, so `Restart=on-failure` left it
/// down and nothing was uploaded any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_stop_the_daemon() {
    let env = s3_env();
    let bucket = create_bucket(&env, "sighup").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    crate::support::signal(child.id(), libc::SIGHUP);
    wait_until("the SIGHUP logged", Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("SIGHUP"))
    })
    .await;
    let files = [("local_content/hu/pp/edfile".to_owned(), bytes(31, 4_000))];
    store.write(&files[0].0, &files[0].1);
    eventually("the file after SIGHUP", Duration::from_secs(30), || {
        all_uploaded(&env, &bucket, &files)
    })
    .await;
    let status = child.terminate();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

/// A second stop signal exits at once, even while uploads hold the shutdown (an admin's second
/// Ctrl-C); the file is uploaded by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_exits_at_once_and_loses_nothing() {
    let env = s3_env();
    let proxy = Proxy::start(env.addr).await;
    proxy.set_put_delay(Duration::from_secs(20));
    let bucket = create_bucket(&env, "twosig").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(
        &store,
        &env,
        &proxy.endpoint(),
        &bucket,
        "shutdown_grace: 60s\n",
    );
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    let files = [("local_content/tw/os/ignals".to_owned(), bytes(32, 4_000))];
    store.write(&files[0].0, &files[0].1);
    wait_until("a PUT in flight", Duration::from_secs(20), || {
        !proxy.object_requests("PUT").is_empty()
    })
    .await;
    let t = Instant::now();
    crate::support::signal(child.id(), libc::SIGTERM);
    wait_until("the shutdown under way", Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Shutting down"))
    })
    .await;
    let status = child.terminate();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());

    proxy.set_put_delay(Duration::ZERO);
    let child = ChildDaemon::spawn(&cfg, &log, &[]);
    eventually(
        "the file after the restart",
        Duration::from_secs(30),
        || all_uploaded(&env, &bucket, &files),
    )
    .await;
    child.stop();
}

/// The daemon raises its soft limit of open files to the hard one: the usual soft limit (1,024)
/// runs out with inotify, uploads and their parts, and connections, and every accept and file
/// open then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let env = s3_env();
    let bucket = create_bucket(&env, "nofile").await;
    let store = Store::new();
    let cfg = config_yaml(&store, &env, &env.endpoint, &bucket, "");
    let log = store.dir.path().join("daemon.log");
    let child = ChildDaemon::spawn(&cfg, &log, &["prlimit", "--nofile=256:4096", "--"]);
    child.ready().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{line}");
    child.stop();
}

/// A hard limit too low for `upload.concurrency` uploads with their parts (9 descriptors each):
/// the cap is lowered to what fits, with a warning naming `LimitNOFILE=`, and files still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_lowers_the_concurrency_cap_and_says_so() {
    let env = s3_env();
    let bucket = create_bucket(&env, "fewfds").await;
    let store = Store::new();
    let cfg = config_yaml(&store, &env, &env.endpoint, &bucket, "");
    let log = store.dir.path().join("daemon.log");
    // (400 - 256) / 9 = 16 of the default 64.
    let child = ChildDaemon::spawn(&cfg, &log, &["prlimit", "--nofile=400:400", "--"]);
    child.ready().await;
    let files = write_burst(&store, 40, 31);
    eventually("the files in the bucket", Duration::from_secs(60), || {
        listed(&env, &bucket, &files)
    })
    .await;
    let text = child.log();
    assert!(
        text.contains("upload.concurrency lowered")
            && text.contains("LimitNOFILE")
            && text.contains("to=16"),
        "{text}"
    );
    child.stop();
}

/// A stop signal while a very large file is being hashed (a blocking task) ends the process
/// within the grace period; it used to wait for the hash (12 s for 3 GB with a 1 s grace), holding
/// the state lock, so a restart by the service manager failed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_the_hash_of_a_huge_file_ends_within_the_grace() {
    let env = s3_env();
    let bucket = create_bucket(&env, "bighash").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "shutdown_grace: 1s\n");
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    // 16 GB of holes: no disk, but reading and hashing it takes far longer than the grace.
    let big = store.root.join("local_content/bi/gh/ashfile");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    std::fs::File::create(&big)
        .unwrap()
        .set_len(16 << 30)
        .unwrap();
    // Let the upload start hashing it.
    wait_until("the upload under way", Duration::from_secs(20), || {
        std::fs::read_to_string(format!("/proc/{}/io", child.id()))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("rchar: ").map(|n| n.trim().parse::<u64>()))
            })
            .and_then(Result::ok)
            .is_some_and(|read| read > 100 << 20)
    })
    .await;
    let t = Instant::now();
    let status = child.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "exited {:?} after SIGTERM with a 1 s grace",
        t.elapsed()
    );
}
