//! Unit tests of config validation.
use super::*;

fn raw_with(dir: &Path) -> RawConfig {
    RawConfig {
        media_store_path: Some(dir.to_owned()),
        state_dir: Some("/var/lib/x".into()),
        scan_interval: None,
        scan_interval_when_degraded: None,
        shutdown_grace: None,
        s3: RawS3 {
            bucket: Some("media".into()),
            ..Default::default()
        },
        upload: RawUpload::default(),
        database: None,
        sweep: RawSweep::default(),
        synapse_config: None,
        synapse_config_dir: None,
        metrics: Default::default(),
        synapse_uses_sqlite: None,
    }
}

#[test]
fn example_config_lists_only_real_keys() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.yaml");
    let text = std::fs::read_to_string(example).unwrap();
    // Uncomment every commented-out `key: value` line: each must still be a known key.
    let all: String = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("# ") {
            Some(rest) if rest.contains(": ") && !rest.starts_with(char::is_uppercase) => {
                let indent = l.len() - l.trim_start().len();
                format!(
                    "{}{}\n",
                    " ".repeat(indent),
                    rest.split(" # ").next().unwrap()
                )
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("example.yaml");
    std::fs::write(&path, &all).unwrap();
    let raw = load_raw(&path).unwrap();
    assert_eq!(raw.s3.max_attempts, Some(3));
    assert_eq!(raw.upload.include_url_cache, Some(false));
    assert_eq!(raw.sweep.max_deletions_per_run, Some(10000));
    assert_eq!(raw.database.unwrap().cp_max, Some(10));
}

#[test]
fn defaults() {
    let dir = tempfile::tempdir().unwrap();
    let c = validate(raw_with(dir.path())).unwrap();
    assert_eq!(c.upload.concurrency, 8);
    assert_eq!(c.upload.multipart_threshold, 16 << 20);
    assert_eq!(
        c.s3.request_checksum_calculation,
        ChecksumMode::WhenRequired
    );
    assert!(!c.s3.force_path_style);
    assert_eq!(c.s3.max_attempts, 3);
}

#[test]
fn durations_and_sizes() {
    assert_eq!(
        parse_duration("30d").unwrap(),
        Duration::from_secs(30 * 86400)
    );
    assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
    assert!(
        parse_duration("0s")
            .unwrap_err()
            .contains("greater than zero")
    );
    assert!(parse_duration("-5m").is_err());
    assert!(parse_duration("soon").is_err());
    assert_eq!(
        parse_size(&SizeValue::Text("16MiB".into())).unwrap(),
        16 << 20
    );
    assert_eq!(
        parse_size(&SizeValue::Text("8 MB".into())).unwrap(),
        8_000_000
    );
    assert_eq!(parse_size(&SizeValue::Bytes(42)).unwrap(), 42);
    assert!(parse_size(&SizeValue::Text("lots".into())).is_err());
}

#[test]
fn secrets_are_redacted() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?} {s}"), "*** ***");
    let dir = tempfile::tempdir().unwrap();
    let mut raw = raw_with(dir.path());
    raw.s3.access_key_id = Some("AK".into());
    raw.s3.secret_access_key = Some(Secret::new("topsecretvalue"));
    let c = validate(raw).unwrap();
    assert!(!format!("{c:?}").contains("topsecretvalue"));
}

#[test]
fn bad_values_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    type Case = (fn(&mut RawConfig), &'static str);
    let cases: Vec<Case> = vec![
        (|r| r.s3.bucket = Some("my bucket/x".into()), "s3.bucket"),
        (
            |r| r.s3.endpoint_url = Some("s3.example.com".into()),
            "s3.endpoint_url",
        ),
        (
            |r| r.s3.endpoint_url = Some("ftp://x".into()),
            "s3.endpoint_url",
        ),
        (
            |r| r.s3.storage_class = Some("GLACIER".into()),
            "s3.storage_class",
        ),
        (
            |r| r.s3.storage_class = Some("FAST".into()),
            "s3.storage_class",
        ),
        (
            |r| r.s3.sse_customer_key = Some(Secret::new("short")),
            "s3.sse_customer_key",
        ),
        (
            |r| r.s3.access_key_id = Some("AK".into()),
            "s3.secret_access_key",
        ),
        (
            |r| r.s3.request_checksum_calculation = Some("always".into()),
            "s3.request_checksum_calculation",
        ),
        (
            |r| r.s3.request_timeout = Some("0s".into()),
            "s3.request_timeout",
        ),
        (|r| r.upload.concurrency = Some(0), "upload.concurrency"),
        (
            |r| r.upload.multipart_part_size = Some(SizeValue::Text("1MiB".into())),
            "upload.multipart_part_size",
        ),
        (|r| r.state_dir = Some("relative".into()), "state_dir"),
        (
            |r| r.media_store_path = Some("/nonexistent/media".into()),
            "media_store_path",
        ),
        (|r| r.s3.bucket = None, "s3.bucket"),
    ];
    for (mutate, key) in cases {
        let mut raw = raw_with(dir.path());
        mutate(&mut raw);
        let err = validate(raw).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}
