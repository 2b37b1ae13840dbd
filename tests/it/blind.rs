//! Never quietly blind (issue 22, items 1–3): the daemon's watch must recover from an inotify
//! queue overflow, a replaced or remounted media store, and a part of the store that was
//! unreadable for a while, and say it is degraded only while it is.

use std::time::Duration;

use crate::daemon::daemon_files;
use crate::support::*;

/// Files written into `dirs` (absolute), returned as (relative path, content).
fn write_into(store: &Store, dirs: &[String], seed: u64) -> Vec<(String, Vec<u8>)> {
    dirs.iter()
        .enumerate()
        .map(|(i, d)| {
            let rel = format!("{d}/after{seed}");
            let data = bytes(seed * 100 + i as u64, 2_000 + i * 10);
            store.write(&rel, &data);
            (rel, data)
        })
        .collect()
}

/// The kernel drops events when its inotify queue overflows, the "directory created" ones too:
/// notify then never adds watches for those directories. Files written there later were found
/// only by the 6-hourly scan (0 of 5 within 20 s); now the watch is set up again after the
/// overflow's scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_inotify_overflow_new_directories_are_watched_again() {
    let env = s3_env();
    let bucket = create_bucket(&env, "ovfl").await;
    let store = Store::new();
    // Outside Synapse's folders: watched (the whole root is), never uploaded.
    std::fs::create_dir(store.root.join("noise")).unwrap();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    // Stopped, the daemon reads no events: the kernel queue (fs.inotify.max_queued_events,
    // 16384 by default) fills with opens and closes after writing (alternating, so the kernel
    // cannot merge them), then drops everything after it.
    signal(child.id(), libc::SIGSTOP);
    let queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(16_384);
    let noise = store.root.join("noise/noise");
    tokio::task::block_in_place(|| {
        for _ in 0..queued / 2 + 1_000 {
            drop(std::fs::File::create(&noise).unwrap());
        }
    });
    let dirs: Vec<String> = (0..5).map(|i| format!("local_content/nw/d{i}")).collect();
    for d in &dirs {
        std::fs::create_dir_all(store.root.join(d)).unwrap();
    }
    let scans = child.log().matches("Scan finished").count();
    signal(child.id(), libc::SIGCONT);
    eventually("the overflow noticed", Duration::from_secs(30), || async {
        let log = child.log();
        if log.contains("inotify queue overflowed") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    // The overflow's own full scan has run (it found the new directories empty): what is
    // written there now can only arrive by events, or by the scan under a new watch.
    wait_until("the overflow's scan", Duration::from_secs(30), || {
        child.log().matches("Scan finished").count() > scans
    })
    .await;
    let files = write_into(&store, &dirs, 1);
    eventually(
        "files in the new directories, by their events",
        Duration::from_secs(20),
        || listed(&env, &bucket, &files),
    )
    .await;
    child.stop();
}

/// One overflow on a store of many directories turned into an endless storm: the overflow's full
/// scan ran beside the new watch's setup, whose thread reads no event while it adds watches, and
/// the scan's opendirs (an event each on the new watches) overflowed the new queue again: a full
/// scan and a new watch every 5 s (208 in a 30-minute soak). Now the scan waits for the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_overflow_on_a_large_store_is_one_rewatch_not_a_storm() {
    let env = s3_env();
    let bucket = create_bucket(&env, "storm").await;
    let store = Store::new();
    let queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(16_384);
    // More directories than the kernel queue holds events (none has a file: nothing to upload).
    tokio::task::block_in_place(|| {
        for i in 0..queued + 8_000 {
            let d = store
                .root
                .join(format!("local_content/{:02x}/{:04x}", i % 256, i));
            std::fs::create_dir_all(d).unwrap();
        }
    });
    std::fs::create_dir(store.root.join("noise")).unwrap();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    wait_until("the startup scan", Duration::from_secs(60), || {
        child.log().contains("Scan finished")
    })
    .await;
    signal(child.id(), libc::SIGSTOP);
    let noise = store.root.join("noise/noise");
    tokio::task::block_in_place(|| {
        for _ in 0..queued / 2 + 1_000 {
            drop(std::fs::File::create(&noise).unwrap());
        }
    });
    signal(child.id(), libc::SIGCONT);
    wait_until("the overflow noticed", Duration::from_secs(30), || {
        child.log().contains("inotify queue overflowed")
    })
    .await;
    // Long enough for four more rounds of the storm (a new watch at most every 5 s).
    let until = std::time::Instant::now() + Duration::from_secs(22);
    wait_until("20 s after the overflow", Duration::from_secs(30), || {
        std::time::Instant::now() >= until
    })
    .await;
    let overflows = child.log().matches("inotify queue overflowed").count();
    assert!(overflows <= 2, "{overflows} overflows after one: a storm");
    child.stop();
}

/// `mv media media.old; mkdir media` left the watch on the old directory: nothing written into
/// the new one was uploaded, without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_media_store_is_watched_again() {
    let env = s3_env();
    let bucket = create_bucket(&env, "replaced").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    std::fs::rename(&store.root, store.dir.path().join("media.old")).unwrap();
    wait_until(
        "the store's absence noticed",
        Duration::from_secs(30),
        || child.log().contains("The media store is gone"),
    )
    .await;
    // What the admin runs then: the config's media_store_path does not exist, yet the daemon
    // answers, and says it is blind.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("watch:        degraded (media store gone)"),
        "{text}"
    );
    std::fs::create_dir(&store.root).unwrap();
    let dirs: Vec<String> = (0..3).map(|i| format!("local_content/rp/d{i}")).collect();
    let files = write_into(&store, &dirs, 2);
    eventually("files in the new store", Duration::from_secs(20), || {
        listed(&env, &bucket, &files)
    })
    .await;
    // Found by the scans of degraded mode, perhaps; then watched again, and degraded mode left:
    // a file written now arrives by its events (the next full scan is hours away).
    wait_until("the new store watched", Duration::from_secs(30), || {
        child.log().contains("Watching the media store again")
    })
    .await;
    let later = write_into(&store, &dirs, 6);
    eventually("a file written after", Duration::from_secs(20), || {
        listed(&env, &bucket, &later)
    })
    .await;
    child.stop();
}

/// Unmounts its bind mount when dropped (the test may fail before it does).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A file system mounted over the media store after startup (the admin's late NFS mount): the
/// old watch sees nothing of it. Then it is unmounted again: back to the directory beneath.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_mounted_over_and_unmounted_is_watched_again() {
    let env = s3_env();
    let bucket = create_bucket(&env, "mounted").await;
    let store = Store::new();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    let other = store.dir.path().join("nfs");
    std::fs::create_dir(&other).unwrap();
    let status = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&other)
        .arg(&store.root)
        .status()
        .unwrap();
    assert!(status.success(), "this test needs `mount --bind` (root)");
    let mounted = Mounted(store.root.clone());
    let files = write_into(&store, &["local_content/mo/un".to_owned()], 3);
    eventually("a file on the mount", Duration::from_secs(20), || {
        listed(&env, &bucket, &files)
    })
    .await;
    drop(mounted);
    let below = write_into(&store, &["local_content/mo/un".to_owned()], 4);
    eventually("a file beneath the mount", Duration::from_secs(20), || {
        listed(&env, &bucket, &below)
    })
    .await;
    assert!(
        child.log().contains("a file system mounted over it"),
        "said why: {}",
        child.log()
    );
    child.stop();
}

/// Detaches its loop device (and unmounts it) when dropped.
struct Loop {
    dev: String,
    at: std::path::PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.at).status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "this test needs `{cmd}` (root, loop devices): {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The store's own file system unmounted and mounted again (same device, same root inode) within
/// one root check: the unmount removed every inotify watch and notify says nothing of it
/// (IN_UNMOUNT/IN_IGNORED are not reported), while device:inode looks unchanged. Files written
/// afterwards waited for the 6-hourly scan; the mount id tells the new mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_unmounted_and_mounted_again_at_once_is_watched_again() {
    let env = s3_env();
    let bucket = create_bucket(&env, "remount").await;
    let store = Store::new();
    let image = store.dir.path().join("fs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "this test needs `losetup` (root, loop devices)"
    );
    let lo = Loop {
        dev: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        at: store.root.clone(),
    };
    let root = store.root.to_str().unwrap();
    run("mount", &[&lo.dev, root]);
    std::fs::create_dir_all(store.root.join("local_content/re/mo")).unwrap();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    let first = write_into(&store, &["local_content/re/mo".to_owned()], 5);
    eventually("a file before the remount", Duration::from_secs(20), || {
        listed(&env, &bucket, &first)
    })
    .await;
    // Unmounted and mounted again at once: well within one root check (5 s).
    run("umount", &[root]);
    run("mount", &[&lo.dev, root]);
    let after = write_into(&store, &["local_content/re/mo".to_owned()], 6);
    eventually("a file after the remount", Duration::from_secs(20), || {
        listed(&env, &bucket, &after)
    })
    .await;
    assert!(
        child.log().contains("remounted"),
        "said why: {}",
        child.log()
    );
    child.stop();
    drop(lo);
}

/// Degraded mode was permanent after any unreadable directory, even once it was readable again
/// (a transient EMFILE or ESTALE did the same). Run in a user namespace of its own without a
/// mapping, where root's files are subject to their permission bits (chmod 000 denies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_mode_ends_once_the_store_is_readable_again() {
    use std::os::unix::fs::PermissionsExt;
    let env = s3_env();
    let bucket = create_bucket(&env, "unread").await;
    let store = Store::new();
    let old = vec![("local_content/ro/xx/old".to_owned(), bytes(41, 3_000))];
    store.write(&old[0].0, &old[0].1);
    let locked = store.root.join("local_content/ro");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let (cfg, log) = daemon_files(&store, &env, &env.endpoint, &bucket, "");
    let child = ChildDaemon::spawn(&cfg, &log, &["unshare", "--user"]);
    answering(&store.state).await;
    eventually("degraded mode", Duration::from_secs(30), || async {
        let s = status(&store.state).await;
        if s.degraded.is_empty() {
            Err(format!("{s:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    eventually("degraded mode left", Duration::from_secs(30), || async {
        let s = status(&store.state).await;
        if s.degraded.is_empty() && s.unreadable.is_empty() {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    eventually(
        "the file that was unreadable",
        Duration::from_secs(20),
        || listed(&env, &bucket, &old),
    )
    .await;
    // Out of degraded mode the scans are hours apart: a file written there now arrives by its
    // events, so that directory is watched.
    let new = write_into(&store, &["local_content/ro/xx".to_owned()], 5);
    eventually(
        "a new file in that directory",
        Duration::from_secs(20),
        || listed(&env, &bucket, &new),
    )
    .await;
    assert!(
        child.log().contains("readable again"),
        "said: {}",
        child.log()
    );
    child.stop();
}
