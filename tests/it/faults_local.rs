//! The fault matrix, local side: the state directory's filesystem fills up, the media store
//! becomes unreadable for a while, PostgreSQL restarts in the middle of a sweep.

use std::time::Duration;

use rand::SeedableRng;
use synapse_s3_offload::state::State;

use crate::faults_support::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_stops_the_daemon_loudly_without_corrupting_its_state() {
    let rig = Rig::new("statefull", 8).await;
    let mount = Tmpfs::mount(&rig.store.state, "1m");
    let config = rig.config(|_| {});
    let d = Daemon::start(config.clone());
    let mut files = join(stream(&rig.store.root, 10, Duration::ZERO, 80));
    rig.nothing_lost(&files).await;
    d.drained().await;

    let filler = mount.dir.join("filler");
    Tmpfs::fill(&filler);
    let writer = stream(&rig.store.root, 60, Duration::from_millis(20), 81);
    // The daemon cannot make the new files durable: it must stop with an error (its supervisor
    // restarts it) rather than go on pretending.
    let stopped = tokio::time::timeout(Duration::from_secs(30), d.handle).await;
    files.extend(join(writer));
    let err = stopped
        .expect("the daemon stops")
        .unwrap()
        .expect_err("with an error");
    let msg = format!("{:#}", anyhow::Error::from(err));
    assert!(msg.contains("state database"), "{msg}");

    // Space returns: the state opens again with everything it had committed, and a restarted
    // daemon (as systemd would) uploads what arrived meanwhile (the startup scan finds it).
    std::fs::remove_file(&filler).unwrap();
    let state = State::open(&config.state_dir).unwrap();
    assert!(state.record_count().unwrap() >= 10);
    drop(state);
    let d = Daemon::start(config.clone());
    rig.nothing_lost(&files).await;
    d.stop_drained().await;
    let state = State::open(&config.state_dir).unwrap();
    assert_eq!(state.record_count().unwrap(), files.len() as u64);
    drop(mount);
}

/// Writes a small file of pseudo-random bytes at each relative path, created with `mode`.
fn write_files(root: &std::path::Path, rels: &[String], seed: u64, mode: u32) -> Files {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    rels.iter()
        .enumerate()
        .map(|(i, rel)| {
            let data = bytes(seed * 100_000 + i as u64, 300 + i * 101);
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&p)
                .unwrap();
            f.write_all(&data).unwrap();
            (rel.clone(), data)
        })
        .collect()
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The media store unreadable for a while. We run as root, whose CAP_DAC_OVERRIDE and
/// CAP_DAC_READ_SEARCH ignore permissions, so the daemon runs as a child process without those two
/// capabilities (`setpriv --bounding-set`): for it, `chmod 000` means EACCES, exactly as for the
/// unprivileged user a real daemon runs as. (Overmounting a directory would make the files vanish
/// rather than be unreadable: another case, which the queue handles as a deleted file.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_media_store_fails_loudly_and_recovers() {
    require_root("an unreadable media store (setpriv)");
    let rig = Rig::new("unreadable", 9).await;
    let root = rig.store.root.clone();
    let state_dir = rig.store.state.clone();
    let cfg = rig.store.dir.path().join("config.yaml");
    write_yaml(
        &cfg,
        &format!(
            "media_store_path: {}\nstate_dir: {}\nscan_interval_when_degraded: 1s\nshutdown_grace: 3s\ns3:\n  bucket: {}\n  endpoint_url: {}\n  region_name: us-east-1\n  access_key_id: {}\n  secret_access_key: {}\nupload:\n  settle: 300ms\n  max_backoff: 1s\n  failed_retry_interval: 1s\n",
            root.display(),
            state_dir.display(),
            rig.bucket,
            rig.proxy.endpoint(),
            rig.env.access_key,
            rig.env.secret_key
        ),
    );
    let daemon = ChildDaemon::spawn(
        &cfg,
        &rig.store.dir.path().join("daemon.log"),
        &["setpriv", "--bounding-set=-dac_override,-dac_read_search"],
    );
    let mut files = join(stream(&root, 5, Duration::ZERO, 90));
    rig.nothing_lost(&files).await;

    // Files that cannot be read: reported as failed, with the reason; uploaded once readable.
    let mut rng = rand::rngs::StdRng::seed_from_u64(91);
    let names: Vec<String> = (0..10).map(|_| media_name(&mut rng)).collect();
    let locked = write_files(&root, &names, 91, 0o000);
    eventually(
        "the unreadable files reported",
        Duration::from_secs(30),
        || async {
            let s = status(&state_dir).await;
            let why = s
                .failures
                .iter()
                .all(|f| f.last_error.contains("Permission denied"));
            if s.failed == locked.len() && why {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    for (rel, _) in &locked {
        chmod(&root.join(rel), 0o644);
    }
    files.extend(locked);
    rig.nothing_lost(&files).await;

    // The whole store unreadable while files arrive, in directories the daemon watches and in
    // new ones (which it can neither watch nor scan meanwhile).
    chmod(&root, 0o000);
    let watched_dir = std::path::Path::new(&files[0].0)
        .parent()
        .unwrap()
        .to_owned();
    let in_watched: Vec<String> = (0..5)
        .map(|i| format!("{}/during{i}", watched_dir.display()))
        .collect();
    let mut during = write_files(&root, &in_watched, 92, 0o644);
    during.extend(join(stream(&root, 10, Duration::from_millis(30), 93)));
    // It lasts a while: the files with events failed twice.
    eventually("failed retries", Duration::from_secs(30), || async {
        let s = status(&state_dir).await;
        if s.failed == in_watched.len() && s.failures.iter().all(|f| f.attempts >= 2) {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    chmod(&root, 0o755);
    files.extend(during.clone());
    rig.nothing_lost(&files).await;

    // Later files below a directory created during the outage: its watch could not be added then,
    // so they have no events at all; the daemon must still find them.
    let new_ab = std::path::Path::new(&during.last().unwrap().0)
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_owned();
    let later: Vec<String> = (0..3)
        .map(|i| format!("{}/zz/later{i}", new_ab.display()))
        .collect();
    files.extend(write_files(&root, &later, 94, 0o644));
    rig.nothing_lost(&files).await;
    drained(&state_dir).await;
    daemon.stop();
}

/// PostgreSQL (a private server: restarting the machine's one would disturb the other tests)
/// restarts in the middle of a sweep run by the daemon while files keep arriving. The sweep notices
/// that it lost its lock and stops; it deleted only files confirmed in the bucket, and the next
/// one completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarting_during_a_sweep_deletes_only_confirmed_files() {
    use synapse_s3_offload::control::{self, Request, Response};

    let pg = tokio::task::block_in_place(PrivatePg::start);
    let db = TestDb::create_on("127.0.0.1", pg.port, "postgres").await;
    let rig = Rig::new("pgrestart", 10).await;
    let old = days_ago(60);
    let mut aged = Files::new();
    let mut gone_from_bucket = Files::new();
    let mut fresh = Files::new();
    for i in 0..300u64 {
        let id = format!("pgAG{i:020}");
        db.local(&id, old, None, None).await;
        let rel = format!("local_content/pg/AG/{i:020}");
        let data = rig
            .store
            .write_bytes(&rel, bytes(100_000 + i, 300 + i as usize));
        // Every 15th will have lost its object by the time of the sweep.
        if i % 15 == 7 {
            gone_from_bucket.push((rel, data));
        } else {
            aged.push((rel, data));
        }
    }
    for i in 0..20u64 {
        let fsid = format!("rmAG{i:020}");
        db.remote("example.org", &format!("remote{i}"), &fsid, old, Some(old))
            .await;
        let rel = format!("remote_content/example.org/rm/AG/{i:020}");
        aged.push((
            rel.clone(),
            rig.store.write_bytes(&rel, bytes(200_000 + i, 700)),
        ));
        let id = format!("pgFR{i:020}");
        db.local(&id, days_ago(1), None, None).await;
        let rel = format!("local_content/pg/FR/{i:020}");
        fresh.push((
            rel.clone(),
            rig.store.write_bytes(&rel, bytes(300_000 + i, 500)),
        ));
    }
    let config = rig.config(|r| {
        let mut d = db.raw();
        d.connect_timeout = Some(synapse_s3_offload::config::DurationValue::Seconds(2));
        r.database = Some(d);
        r.sweep.enabled = Some(false);
        r.sweep.keep_local_for = Some("30d".into());
        r.sweep.confirm_synapse_reads_from_bucket = Some(true);
        r.sweep.concurrency = Some(1);
    });
    let d = Daemon::start(config);
    let all: Files = [&aged, &gone_from_bucket, &fresh]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    rig.nothing_lost(&all).await;
    d.drained().await;
    let s3 = client(&rig.env).await;
    for (rel, _) in &gone_from_bucket {
        s3.delete_object()
            .bucket(&rig.bucket)
            .key(rel)
            .send()
            .await
            .unwrap();
    }

    // A slow sweep (every HEAD waits), new files arriving meanwhile.
    rig.proxy.latency(Duration::from_millis(50));
    let writer = stream(&rig.store.root, 30, Duration::from_millis(100), 100);
    let state_dir = rig.store.state.clone();
    let sweep = tokio::spawn(async move {
        control::request(&state_dir, &Request::Sweep { dry_run: false }).await
    });
    let root = rig.store.root.clone();
    wait_until("the first deletions", Duration::from_secs(30), || {
        aged.iter().any(|(rel, _)| !root.join(rel).exists())
    })
    .await;
    tokio::task::block_in_place(|| pg.restart());
    // A precondition, not a timing claim: 320 HEADs one at a time, 50 ms each, outlast a restart.
    assert!(
        !sweep.is_finished(),
        "the restart happened during the sweep"
    );
    rig.proxy.latency(Duration::ZERO);
    let first = match sweep.await.unwrap() {
        Ok(Some(Response::Sweep(r))) => r,
        other => panic!("sweep: {other:?}"),
    };
    // The restart ended the session holding the sweep lock: another instance could have taken
    // it, so the sweep must notice and stop (its one page of media was read before the restart;
    // without the check it ran on to the end).
    let why = first.stopped.as_deref().unwrap_or_default();
    assert!(
        why.contains("lost the sweep lock") && why.contains("PostgreSQL"),
        "{first}"
    );
    assert!(first.deleted.len() < aged.len(), "stopped early: {first}");
    let deleted_ok = |r: &synapse_s3_offload::sweep::Report| {
        for p in &r.deleted {
            assert!(
                aged.iter()
                    .chain(&gone_from_bucket)
                    .any(|(rel, _)| rel == p),
                "{p} is not an aged media: {r}"
            );
        }
    };
    deleted_ok(&first);
    assert!(!first.deleted.is_empty(), "{first}");
    for (rel, _) in &gone_from_bucket {
        assert!(root.join(rel).exists(), "{rel} deleted without its object");
    }
    let in_bucket = |files: &Files, objects: &std::collections::BTreeMap<String, Vec<u8>>| {
        for (rel, data) in files {
            if !root.join(rel).exists() {
                assert!(
                    objects.get(rel) == Some(data),
                    "{rel} deleted but not in the bucket, identical"
                );
            }
        }
    };
    in_bucket(&aged, &objects(&rig.env, &rig.bucket).await);

    // The first sweep queued the files whose objects were gone: the daemon uploads them again.
    rig.nothing_lost(&gone_from_bucket).await;
    // The next sweep completes and deletes every aged file, each confirmed in the bucket.
    let second = match control::request(&rig.store.state, &Request::Sweep { dry_run: false }).await
    {
        Ok(Some(Response::Sweep(r))) => r,
        other => panic!("sweep: {other:?}"),
    };
    assert!(second.stopped.is_none(), "{second}");
    deleted_ok(&second);
    assert_eq!(second.kept_not_in_bucket, 0, "{second}");
    let swept: Files = aged.iter().chain(&gone_from_bucket).cloned().collect();
    for (rel, _) in &swept {
        assert!(!root.join(rel).exists(), "{rel} should be swept by now");
    }
    in_bucket(&swept, &objects(&rig.env, &rig.bucket).await);
    let files = join(writer);
    rig.nothing_lost(&fresh).await;
    rig.nothing_lost(&files).await;
    d.stop_drained().await;
}
