//! `/metrics` and `/health` of a running daemon.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A free loopback `host:port` for the metrics server.
fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

pub(crate) async fn get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_health_follows_s3() {
    let env = s3_env();
    let mut s3 = PrivateS3::start(&env);
    let penv = s3.env(&env);
    let bucket = create_bucket(&penv, "metrics").await;
    let store = Store::new();
    let addr = free_addr();
    let mut raw = raw_config(&env, &s3.endpoint(), &bucket, &store);
    raw.metrics.listen = Some(addr.clone());
    raw.metrics.s3_probe_interval = Some("300ms".into());
    raw.s3.connect_timeout = Some("1s".into());
    raw.upload.max_backoff = Some("1s".into());
    let d = Daemon::start(validated(raw));

    let files: Vec<_> = (0..5)
        .map(|i| {
            let rel = format!("local_content/me/tr/ics{i}");
            let data = bytes(700 + i, 2_000);
            store.write(&rel, &data);
            (rel, data)
        })
        .collect();
    eventually("uploads", Duration::from_secs(30), || {
        listed(&penv, &bucket, &files)
    })
    .await;
    // An object is visible a moment before its record is committed and counted.
    eventually("uploads counted", Duration::from_secs(10), || async {
        let (status, m) = get(&addr, "/metrics").await;
        assert_eq!(status, 200, "{m}");
        // The file count and its bytes are two counters, bumped one after the other: a scrape
        // can fall between them.
        if value(&m, "synapse_s3_offload_uploaded_total") >= 5.0
            && value(&m, "synapse_s3_offload_uploaded_bytes_total") >= 10_000.0
        {
            Ok(())
        } else {
            Err(format!("uploads not counted: {m}"))
        }
    })
    .await;
    let (status, m) = get(&addr, "/metrics").await;
    assert_eq!(status, 200, "{m}");
    assert!(
        value(&m, "synapse_s3_offload_uploaded_bytes_total") >= 10_000.0,
        "{m}"
    );
    for name in [
        "synapse_s3_offload_queue_depth",
        "synapse_s3_offload_build_info",
        "synapse_s3_offload_scans_total",
        "synapse_s3_offload_upload_duration_seconds",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    assert!(!m.contains("local_content"), "no paths in labels");
    let (status, body) = get(&addr, "/health").await;
    assert_eq!(status, 200, "{body}");

    s3.stop();
    eventually(
        "/health 503 while S3 is down",
        Duration::from_secs(20),
        || async {
            let (status, body) = get(&addr, "/health").await;
            if status == 503 && body.contains("S3 failing") {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        },
    )
    .await;
    s3.resume(&env);
    eventually(
        "/health 200 after S3 returns",
        Duration::from_secs(20),
        || async {
            let (status, body) = get(&addr, "/health").await;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        },
    )
    .await;
    d.stop().await;
}

/// `name{labels} value` of one series, if the exporter shows it.
fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histograms_sweep_series_from_startup_and_a_dry_run_is_not_a_sweep() {
    let env = s3_env();
    let bucket = create_bucket(&env, "msweep").await;
    let store = Store::new();
    let db = TestDb::create().await;
    let addr = free_addr();
    let mut raw = raw_config(&env, &env.endpoint, &bucket, &store);
    raw.metrics.listen = Some(addr.clone());
    raw.database = Some(db.raw());
    raw.sweep.confirm_synapse_reads_from_bucket = Some(true);
    let config = validated(raw);
    let state_dir = config.state_dir.clone();
    let d = Daemon::start(config);
    let rel = "local_content/sw/ee/pmetrics";
    store.write(rel, &bytes(5, 1_000));
    eventually("the upload counted", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move {
            let (_, body) = get(&addr, "/metrics").await;
            match value(&body, "synapse_s3_offload_upload_duration_seconds_count") {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("{n}")),
            }
        }
    })
    .await;
    let (_, m) = get(&addr, "/metrics").await;
    // Buckets, not quantiles: histograms aggregate across instances.
    assert!(
        m.contains("# TYPE synapse_s3_offload_upload_duration_seconds histogram")
            && m.contains("synapse_s3_offload_upload_duration_seconds_bucket{le=\"0.5\"}"),
        "{m}"
    );
    assert!(!m.contains("quantile="), "{m}");
    // Before any sweep, the sweep's series are there at 0.
    for s in [
        "synapse_s3_offload_sweeps_total{outcome=\"done\"}",
        "synapse_s3_offload_sweep_deleted_files_total",
        "synapse_s3_offload_last_successful_sweep_timestamp_seconds",
    ] {
        assert!(series(&m, s).is_some(), "{s} missing:\n{m}");
    }
    let done_before = series(&m, "synapse_s3_offload_sweeps_total{outcome=\"done\"}").unwrap();
    let last_before = series(
        &m,
        "synapse_s3_offload_last_successful_sweep_timestamp_seconds",
    )
    .unwrap();

    use synapse_s3_offload::control::{self, Request, Response};
    let answer = control::request(&state_dir, &Request::Sweep { dry_run: true })
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(answer, Response::Sweep(_)), "{answer:?}");
    let (_, m) = get(&addr, "/metrics").await;
    assert_eq!(
        series(&m, "synapse_s3_offload_sweeps_total{outcome=\"done\"}"),
        Some(done_before),
        "a dry run is not a successful sweep:\n{m}"
    );
    assert!(series(&m, "synapse_s3_offload_sweeps_total{outcome=\"dry_run\"}").unwrap() >= 1.0);
    assert_eq!(
        series(
            &m,
            "synapse_s3_offload_last_successful_sweep_timestamp_seconds"
        ),
        Some(last_before)
    );
    let Some(Response::Status(st)) = control::request(&state_dir, &Request::Status)
        .await
        .unwrap()
    else {
        panic!("no status")
    };
    assert!(st.last_sweep.is_none(), "{st:?}");
    assert!(st.last_dry_run.is_some(), "{st:?}");
    assert!(st.to_string().contains("last sweep:   never"), "{st}");
    let json = serde_json::to_string(&st).unwrap();
    assert!(!json.contains("\"deleted\":[]"), "{json}");
    d.stop().await;
}

/// `/health` follows the uploads, not the bucket probe: with HEAD bucket answering 200 and every
/// PUT refused (403), it was 200 about 95 % of the time (each probe cancelled the failure). It
/// must be 503 and stay so, say why without any error text (keys, endpoints), and recover once
/// uploads succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_unhealthy_while_puts_fail_though_the_bucket_answers() {
    use crate::faults_proxy::{FaultProxy, S3Fault};
    let env = s3_env();
    let proxy = FaultProxy::start(env.addr, 7).await;
    let bucket = create_bucket(&env, "healthput").await;
    let store = Store::new();
    let addr = free_addr();
    let mut raw = raw_config(&env, &proxy.endpoint(), &bucket, &store);
    raw.metrics.listen = Some(addr.clone());
    raw.metrics.s3_probe_interval = Some("100ms".into());
    raw.upload.max_backoff = Some("1s".into());
    raw.upload.failed_retry_interval = Some("1s".into());
    proxy.deny_puts(Some(S3Fault::AccessDenied));
    let d = Daemon::start(validated(raw));
    let files = [("local_content/he/al/thput".to_owned(), bytes(41, 3_000))];
    store.write(&files[0].0, &files[0].1);
    eventually(
        "/health 503 while PUTs fail",
        Duration::from_secs(20),
        || async {
            let (status, body) = get(&addr, "/health").await;
            if status == 503 { Ok(()) } else { Err(body) }
        },
    )
    .await;
    // It stays so across many probes of a bucket that answers.
    for _ in 0..20 {
        let (status, body) = get(&addr, "/health").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("uploads failing"), "{body}");
        assert!(
            !body.contains(&env.access_key)
                && !body.contains("127.0.0.1")
                && !body.contains("he/al"),
            "no error text, endpoint or path: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.deny_puts(None);
    eventually("the upload", Duration::from_secs(30), || {
        all_uploaded(&env, &bucket, &files)
    })
    .await;
    eventually("/health 200 again", Duration::from_secs(20), || async {
        let (status, body) = get(&addr, "/health").await;
        if status == 200 { Ok(()) } else { Err(body) }
    })
    .await;
    d.stop().await;
}
