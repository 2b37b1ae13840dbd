//! The fault matrix, S3 side: the daemon runs a steady stream of files while the S3 server (through
//! a [`FaultProxy`]) resets uploads, fails requests, stalls, throttles or refuses the credentials.
//! Each test ends with every file in the bucket byte-identical, still on disk, the daemon still
//! running and its queue empty.

use std::time::Duration;

use crate::faults_proxy::{HeadAnswer, S3Fault};
use crate::faults_support::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_mid_upload_lose_nothing() {
    let rig = Rig::new("resets", 1).await;
    let d = Daemon::start(rig.config(|_| {}));
    rig.proxy.reset_mid_body(Some(3));
    let files = join(stream(&rig.store.root, 40, Duration::from_millis(40), 1));
    wait_until("resets", Duration::from_secs(30), || {
        rig.proxy.stats().resets >= 5
    })
    .await;
    rig.proxy.heal();
    rig.nothing_lost(&files).await;
    d.stop_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_of_requests_failing_with_503_lose_nothing() {
    // The seed makes the proxy's draws the same in every run: with it, the 2nd, 27th and 40th
    // requests fail, and the daemon makes at least 100 (a HEAD and a PUT per file).
    let rig = Rig::new("fivepct", 5).await;
    let d = Daemon::start(rig.config(|_| {}));
    rig.proxy.fail_ratio(0.05, S3Fault::ServiceUnavailable);
    let files = join(stream(&rig.store.root, 50, Duration::from_millis(40), 2));
    // Not lifted: the daemon gets everything through while the failures go on.
    rig.nothing_lost(&files).await;
    let st = rig.proxy.stats();
    assert!(st.answered >= 2, "the fault happened: {st:?}");
    d.stop_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stalling_for_twice_the_request_timeout_loses_nothing() {
    let rig = Rig::new("stall", 3).await;
    let timeout = Duration::from_secs(1);
    let d = Daemon::start(rig.config(|r| {
        r.s3.request_timeout = Some("1s".into());
        // The stall's first half must see requests: no hold between a file's close and its PUT
        // (with the default 1 s the first PUTs came in the stall's second half, under load).
        r.upload.hold_after_close = Some("0s".into());
    }));
    let first = join(stream(&rig.store.root, 5, Duration::ZERO, 30));
    rig.nothing_lost(&first).await;

    // A stall twice as long as the request timeout: the requests held in its first half are
    // given up by the client (its timeout fired); the daemon retries them.
    rig.proxy.stall(Some(timeout * 2));
    let mut files = join(stream(&rig.store.root, 20, Duration::from_millis(50), 3));
    wait_until("timed-out requests", Duration::from_secs(20), || {
        rig.proxy.stats().abandoned >= 1
    })
    .await;

    // A stall that does not end by itself: timeouts fire again and again until it is lifted.
    rig.proxy.stall(None);
    files.extend(join(stream(&rig.store.root, 5, Duration::ZERO, 31)));
    let before = rig.proxy.stats().abandoned;
    wait_until("repeated timeouts", Duration::from_secs(20), || {
        rig.proxy.stats().abandoned >= before + 3
    })
    .await;
    d.assert_running();
    rig.proxy.heal();
    rig.nothing_lost(&files).await;
    d.stop_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowdown_storms_lose_nothing() {
    let rig = Rig::new("slowdown", 4).await;
    let d = Daemon::start(rig.config(|_| {}));
    let writer = stream(&rig.store.root, 40, Duration::from_millis(50), 4);
    // Three storms of 30 SlowDown answers each, one after the other, while files arrive.
    for _ in 0..3 {
        rig.proxy.slowdown_storm(30);
        wait_until("the storm to pass", Duration::from_secs(30), || {
            rig.proxy.storm_left() == 0
        })
        .await;
    }
    let files = join(writer);
    rig.nothing_lost(&files).await;
    assert_eq!(rig.proxy.stats().slowdowns, 90);
    d.stop_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_credentials_fail_loudly_and_recover_when_restored() {
    let rig = Rig::new("revoked", 6).await;
    let d = Daemon::start(rig.config(|r| r.upload.failed_retry_interval = Some("1s".into())));
    let mut files = join(stream(&rig.store.root, 5, Duration::ZERO, 60));
    rig.nothing_lost(&files).await;

    rig.proxy.deny(Some(S3Fault::InvalidAccessKeyId));
    let revoked = join(stream(&rig.store.root, 15, Duration::from_millis(30), 61));
    // Every new file is reported as failed, with the provider's answer, for the operator.
    eventually(
        "the files reported failed",
        Duration::from_secs(30),
        || async {
            let s = d.status().await;
            let named = s
                .failures
                .iter()
                .all(|f| f.last_error.contains("403") && f.last_error.contains("s3.access_key_id"));
            if s.failed == revoked.len() && named {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    d.assert_running();

    rig.proxy.deny(None);
    files.extend(revoked);
    rig.nothing_lost(&files).await;
    let s = d.status().await;
    assert_eq!(s.failed, 0, "{s:?}");
    d.stop_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_lie_never_let_the_sweep_delete() {
    let env = s3_env();
    let proxy = crate::faults_proxy::FaultProxy::start(env.addr, 7).await;
    let f = crate::sweep::fixture(&env, &env.endpoint).await;
    let mut raw = raw_config(&env, &proxy.endpoint(), &f.bucket, &f.store);
    raw.database = Some(f.db.raw());
    raw.sweep.keep_local_for = Some("30d".into());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    raw.s3.max_attempts = Some(1);
    let config = validated(raw);
    let sweep = || async {
        synapse_s3_offload::sweep::run_standalone(
            &config,
            false,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap()
    };
    let answers = [
        HeadAnswer::Error(S3Fault::AccessDenied),
        HeadAnswer::Error(S3Fault::NoSuchBucket),
        HeadAnswer::WrongSize,
    ];
    for answer in answers {
        proxy.head_answer(Some(answer));
        let r = sweep().await;
        assert_eq!(r.files_deleted, 0, "{answer:?}: {r}");
        for p in f.deleted.iter().chain(&f.kept) {
            assert!(f.store.root.join(p).exists(), "{answer:?}: {p} deleted");
        }
        let kept = match answer {
            HeadAnswer::Error(S3Fault::AccessDenied) => r.kept_error,
            HeadAnswer::Error(_) => r.kept_not_in_bucket,
            HeadAnswer::WrongSize => r.kept_different,
        };
        assert!(kept > 0, "{answer:?}: {r}");
    }
    proxy.heal();
    let r = sweep().await;
    assert_eq!(r.files_deleted, 6, "{r}");
}

/// A connection reset in the middle of a PUT is reported as what it is, not as "cannot connect
/// … check s3.endpoint_url" (that sends the operator after a config that is fine); a server that
/// is not there at all still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_upload_is_not_reported_as_a_connection_failure() {
    use synapse_s3_offload::upload::s3::ObjectStore;
    let rig = Rig::new("resetmsg", 11).await;
    let config = rig.config(|r| r.s3.max_attempts = Some(1));
    let store = ObjectStore::new(&config.s3, config.upload.multipart_part_size).await;
    rig.proxy.reset_mid_body(Some(1));
    let body = bytes(5, 200_000);
    let e = store
        .put_bytes("local_content/re/SE/Tmidbody", body.into(), &[0; 16])
        .await
        .expect_err("the connection was reset");
    let msg = synapse_s3_offload::Chain(&e).to_string();
    assert!(e.is_transient(), "{msg}");
    assert!(msg.contains("connection broke"), "{msg}");
    assert!(
        !msg.contains("cannot connect") && !msg.contains("s3.endpoint_url"),
        "{msg}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut down = config.clone();
    down.s3.endpoint_url = Some(format!("http://127.0.0.1:{port}"));
    let store = ObjectStore::new(&down.s3, down.upload.multipart_part_size).await;
    let e = store
        .put_bytes(
            "local_content/re/SE/Tmidbody",
            bytes(6, 10).into(),
            &[0; 16],
        )
        .await
        .expect_err("nothing listens there");
    let msg = synapse_s3_offload::Chain(&e).to_string();
    assert!(
        msg.contains("cannot connect") && msg.contains("s3.endpoint_url"),
        "{msg}"
    );
}
