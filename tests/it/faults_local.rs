//! The fault matrix, local side: the state directory's filesystem fills up, the media store
//! becomes unreadable for a while, PostgreSQL restarts in the middle of a sweep.

use std::time::Duration;

use synapse_s3_offload::state::State;

use crate::faults_support::*;

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
    d.stop().await;
    let state = State::open(&config.state_dir).unwrap();
    assert_eq!(state.record_count().unwrap(), files.len() as u64);
    drop(mount);
}
