//! The shared limit on uploads in flight (src/upload/limiter.rs), seen from the wire: throttling
//! answers slow the whole client and it recovers; an S3 outage logs state changes, not attempts.

use std::time::Duration;

use crate::faults_proxy::S3Fault;
use crate::faults_support::{Files, Rig};
use crate::proxy::TcpProxy;
use crate::support::*;

/// `n` small files written into `root` at once (a backlog for the daemon's startup scan).
fn backlog(root: &std::path::Path, n: usize, seed: u64) -> Files {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let rel = media_name(&mut rng);
            let data = bytes(seed * 100_000 + i as u64, 300 + (i * 211) % 4_000);
            let p = root.join(&rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &data).unwrap();
            (rel, data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowdown_cuts_the_requests_in_flight_nothing_is_lost_and_they_recover() {
    let rig = Rig::new("throttle", 20).await;
    // A WAN-like round trip: what is in flight decides the rate, not our CPU.
    let rtt = Duration::from_millis(100);
    rig.proxy.latency(rtt);
    let files = tokio::task::block_in_place(|| backlog(&rig.store.root, 2000, 20));
    let d = Daemon::start(rig.config(|_| {}));
    let proxy = &rig.proxy;
    let after = |n: u64| {
        let target = proxy.stats().requests + n;
        move || proxy.stats().requests >= target
    };

    // Unthrottled: the limit grows from its start (16) while latency holds.
    wait_until("the first requests", Duration::from_secs(60), after(200)).await;
    rig.proxy.take_peak();
    wait_until("unthrottled requests", Duration::from_secs(60), after(300)).await;
    let free = rig.proxy.take_peak();

    // A third of the requests answered 503 SlowDown: the whole client slows down.
    rig.proxy.fail_ratio(0.3, S3Fault::SlowDown);
    let slowdowns = rig.proxy.stats().slowdowns;
    wait_until("SlowDown answers", Duration::from_secs(60), || {
        rig.proxy.stats().slowdowns >= slowdowns + 100
    })
    .await;
    rig.proxy.take_peak();
    wait_until("throttled requests", Duration::from_secs(60), after(150)).await;
    let throttled = rig.proxy.take_peak();

    // The throttling ends: the limit grows back.
    rig.proxy.heal();
    rig.proxy.latency(rtt);
    wait_until("recovering requests", Duration::from_secs(60), after(500)).await;
    rig.proxy.take_peak();
    wait_until("recovered requests", Duration::from_secs(60), after(300)).await;
    let recovered = rig.proxy.take_peak();

    eprintln!(
        "requests in flight at most: free {free}, throttled {throttled}, recovered {recovered}"
    );
    assert!(free >= 12, "the limit was used: {free} in flight");
    assert!(
        throttled * 2 <= free,
        "SlowDown did not slow the client: {throttled} in flight vs {free} before"
    );
    assert!(
        recovered >= throttled * 2,
        "no recovery after the throttling: {recovered} in flight vs {throttled} throttled"
    );
    // The rest of the backlog without the added round trip (the check has a deadline).
    rig.proxy.latency(Duration::ZERO);
    rig.nothing_lost(&files).await;
    d.stop_drained().await;
}

/// Lines of `log` at WARN or ERROR.
fn loud_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_logs_its_start_and_end_not_each_attempt_and_the_backlog_drains() {
    let env = s3_env();
    let proxy = TcpProxy::start(env.addr).await;
    let bucket = create_bucket(&env, "outage").await;
    let store = Store::new();
    let cfg = store.dir.path().join("config.yaml");
    let log = store.dir.path().join("daemon.log");
    write_yaml(
        &cfg,
        &config_yaml(
            &store,
            &format!("http://{}", proxy.addr),
            &bucket,
            (&env.access_key, &env.secret_key),
            "  connect_timeout: 1s\n  request_timeout: 2s\n",
            "upload:\n  settle: 300ms\n  max_backoff: 1s\n",
        ),
    );
    let mut child = ChildDaemon::spawn(&cfg, &log, &[]);
    child.ready().await;
    let mut files = tokio::task::block_in_place(|| backlog(&store.root, 5, 21));
    eventually("the first files", Duration::from_secs(30), || {
        listed(&env, &bucket, &files)
    })
    .await;

    // S3 goes away (connections reset) with 300 files arriving.
    proxy.cut();
    let during = tokio::task::block_in_place(|| backlog(&store.root, 300, 22));
    wait_until("the breaker to open", Duration::from_secs(30), || {
        child.log().contains("S3 is unreachable")
    })
    .await;
    // An observation window, not a wait for a condition: what the daemon does while S3 stays down
    // (without the breaker: every file retried about every second, each logged and written).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = status(&store.state).await;
    let text = child.log();
    let loud = loud_lines(&text);
    eprintln!("during the outage: {} loud lines, status {s:?}", loud.len());
    assert!(s.queued >= 290, "the files wait in the queue: {s:?}");
    assert!(
        s.retrying <= 30,
        "files rewritten with their error each attempt: {} of {}",
        s.retrying,
        s.queued
    );
    assert!(
        loud.len() <= 30,
        "{} WARN/ERROR lines in 6 s of outage:\n{}",
        loud.len(),
        loud.join("\n")
    );
    assert_eq!(
        text.matches("S3 is unreachable").count(),
        1,
        "one line when the outage starts"
    );

    // S3 is back: the next probe closes the breaker and the backlog drains.
    proxy.restore();
    files.extend(during);
    eventually(
        "the backlog after the outage",
        Duration::from_secs(60),
        || listed(&env, &bucket, &files),
    )
    .await;
    all_uploaded(&env, &bucket, &files).await.unwrap();
    let text = child.log();
    assert_eq!(text.matches("S3 is reachable again").count(), 1, "{text}");
    assert!(child.terminate().success());
}
