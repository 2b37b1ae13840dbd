//! Unit tests of config validation.
use super::load::read_file;
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
        prune: Default::default(),
        synapse_config: None,
        synapse_config_dir: None,
        metrics: Default::default(),
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
    let raw = read_file(&path, &mut Origins::default()).unwrap();
    assert_eq!(raw.s3.max_attempts, Some(3));
    assert_eq!(raw.upload.include_url_cache, Some(false));
    assert_eq!(raw.sweep.max_deletions_per_run, Some(10000));
    assert_eq!(raw.database.unwrap().cp_max, Some(10));
}

#[test]
fn defaults() {
    let dir = tempfile::tempdir().unwrap();
    let c = validate(raw_with(dir.path())).unwrap();
    assert_eq!(c.upload.concurrency, DEFAULT_UPLOAD_CONCURRENCY);
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
            |r| r.upload.max_requests_per_second = Some(0.0),
            "upload.max_requests_per_second",
        ),
        (
            |r| r.upload.multipart_threshold = Some(SizeValue::Text("6GiB".into())),
            "upload.multipart_threshold",
        ),
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

#[test]
fn debug_of_every_config_type_redacts_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = raw_with(dir.path());
    raw.s3.access_key_id = Some("AKIDvisible".into());
    raw.s3.secret_access_key = Some(Secret::new("s3-secret-value"));
    raw.s3.session_token = Some(Secret::new("session-token-value"));
    raw.s3.sse_customer_key = Some(Secret::new("sse-c-key-0123456789abcdefghijkl"));
    raw.database = Some(RawDatabase {
        database: Some("synapse".into()),
        password: Some(Secret::new("db-password-value")),
        ..Default::default()
    });
    let raw_debug = format!("{raw:?}");
    assert!(raw_debug.contains("AKIDvisible"), "Debug prints the rest");
    let c = validate(raw).unwrap();
    for text in [
        raw_debug,
        format!("{c:?}"),
        format!("{c:#?}"),
        format!("{:?}", c.s3),
        format!("{:?}", c.database.as_ref().unwrap()),
    ] {
        for secret in [
            "s3-secret-value",
            "session-token-value",
            "sse-c-key-0123456789abcdefghijkl",
            "db-password-value",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}

#[test]
fn metrics_are_off_by_default_and_the_example_listens_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        validate(raw_with(dir.path()))
            .unwrap()
            .metrics
            .listen
            .is_none()
    );
    let example = include_str!("../../config/example.yaml");
    let listen = example
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("# listen: "))
        .expect("the example shows metrics.listen");
    let addr: std::net::SocketAddr = listen.trim().parse().unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
}

#[test]
fn a_config_file_readable_by_its_group_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "media_store_path: {}\nstate_dir: /tmp/x-state\ns3:\n  bucket: b-ucket\n  endpoint_url: http://127.0.0.1:9\n  sse_customer_key: 0123456789abcdef0123456789abcdef\n",
            dir.path().display()
        ),
    )
    .unwrap();
    for (mode, warned) in [(0o640, true), (0o604, true), (0o600, false), (0o400, false)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let w = load(&path).unwrap().warnings;
        assert_eq!(
            w.iter().any(|w| w.contains("chmod 600")),
            warned,
            "{mode:o}: {w:?}"
        );
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn durations_never_panic_and_read_back_what_humantime_prints(
            s in ".{0,24}",
            secs in 1u64..10_000_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let _ = parse_duration(&s);
            let d = Duration::new(secs, nanos);
            let printed = humantime::format_duration(d).to_string();
            prop_assert_eq!(parse_duration(&printed), Ok(d), "{}", printed);
        }

        #[test]
        fn sizes_never_panic_and_read_back_plain_and_binary_units(
            s in ".{0,24}",
            n in any::<u64>(),
            mib in 0u64..(1 << 40),
        ) {
            let _ = parse_size(&SizeValue::Text(s));
            prop_assert_eq!(parse_size(&SizeValue::Bytes(n)), Ok(n));
            prop_assert_eq!(parse_size(&SizeValue::Text(n.to_string())), Ok(n));
            prop_assert_eq!(parse_size(&SizeValue::Text(format!("{mib}MiB"))), Ok(mib << 20));
            prop_assert_eq!(parse_size(&SizeValue::Text(format!("{mib} KiB"))), Ok(mib << 10));
        }
    }
}

#[test]
fn the_shipped_example_loads_as_is_and_empty_sections_mean_defaults() {
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.yaml"));
    let raw = read_file(example, &mut Origins::default()).unwrap();
    // As shipped it takes everything else from Synapse: no placeholder of ours overrides it.
    assert_eq!(
        raw.synapse_config.as_deref(),
        Some(Path::new("/etc/matrix-synapse/homeserver.yaml"))
    );
    assert!(raw.media_store_path.is_none() && raw.s3.bucket.is_none());
    assert!(
        raw.database.is_none(),
        "an empty database: section is no database of ours"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "media_store_path: {}\ns3:\n  bucket: b-ucket\nupload:\nsweep:\nmetrics:\ndatabase:\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let c = load_with_env(&path, &[]).unwrap();
    assert_eq!(c.upload.concurrency, DEFAULT_UPLOAD_CONCURRENCY);
    assert!(c.sweep.enabled && c.database.is_none());
}

#[test]
fn duplicate_keys_last_wins_and_errors_never_quote_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let text = format!(
        "media_store_path: {}\ns3:\n  bucket: b-ucket\n  access_key_id: a\n  secret_access_key: first-secret-value\n  secret_access_key: second-secret-value\n",
        dir.path().display()
    );
    std::fs::write(&path, &text).unwrap();
    let c = load_with_env(&path, &[]).unwrap();
    assert_eq!(
        c.s3.secret_access_key.unwrap().expose(),
        "second-secret-value",
        "the last one wins, as in PyYAML"
    );
    // A value of the wrong kind below a secret: the error names file, line and key, no text.
    std::fs::write(
        &path,
        format!("{text}upload:\n  concurrency: many-secret-value\n"),
    )
    .unwrap();
    let err = load_with_env(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("line 8") && err.contains("upload.concurrency"),
        "{err}"
    );
    assert!(err.contains("whole number"), "{err}");
    assert!(!err.contains("secret-value"), "{err}");
    // Broken syntax after a secret.
    std::fs::write(&path, format!("{text}  - [unclosed\n")).unwrap();
    let err = load_with_env(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("not valid YAML") && err.contains("line"),
        "{err}"
    );
    assert!(!err.contains("secret-value"), "{err}");
    // An unknown key.
    std::fs::write(&path, format!("{text}  buket: x\n")).unwrap();
    let err = load_with_env(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("unknown key `buket`") && err.contains("line 7"),
        "{err}"
    );
    assert!(!err.contains("secret-value"), "{err}");
}

#[test]
fn env_overrides_keep_strings_and_name_their_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "media_store_path: {}\ns3:\n  bucket: b-ucket\n",
            dir.path().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = load_with_env(
        &path,
        &[
            ("SYNAPSE_S3_OFFLOAD__S3__SECRET_ACCESS_KEY", "00123"),
            ("SYNAPSE_S3_OFFLOAD__S3__ACCESS_KEY_ID", "0042"),
            ("SYNAPSE_S3_OFFLOAD__UPLOAD__CONCURRENCY", "16"),
        ],
    )
    .unwrap();
    assert_eq!(c.s3.secret_access_key.unwrap().expose(), "00123");
    assert_eq!(c.s3.access_key_id.as_deref(), Some("0042"));
    assert_eq!(c.upload.concurrency, 16);
    assert!(
        c.warnings.is_empty(),
        "a secret from the environment alone does not make the file's mode matter: {:?}",
        c.warnings
    );
    let err = load_with_env(&path, &[("SYNAPSE_S3_OFFLOAD__S3__BUKET", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("environment variable SYNAPSE_S3_OFFLOAD__S3__BUKET") && err.contains("buket"),
        "{err}"
    );
    let err = load_with_env(&path, &[("SYNAPSE_S3_OFFLOAD__S3__BUCKET", "no/slash")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`s3.bucket` (from environment variable SYNAPSE_S3_OFFLOAD__S3__BUCKET)"),
        "{err}"
    );
    let err = load_with_env(&path, &[("SYNAPSE_S3_OFFLOAD__UPLOAD__CONCURRENCY", "0")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SYNAPSE_S3_OFFLOAD__UPLOAD__CONCURRENCY"),
        "{err}"
    );
}

#[test]
fn an_invalid_value_names_its_file_and_line_and_a_permission_problem_is_not_invalid() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "s3:\n  bucket: b-ucket\n  endpoint_url: s3.example.com\n",
    )
    .unwrap();
    let err = load_with_env(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains("config key `media_store_path` is required"),
        "{err}"
    );
    let media = dir.path().join("media");
    std::fs::create_dir(&media).unwrap();
    std::fs::write(
        &path,
        format!(
            "media_store_path: {}\ns3:\n  bucket: b-ucket\n  endpoint_url: s3.example.com\n",
            media.display()
        ),
    )
    .unwrap();
    let err = load_with_env(&path, &[]).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "`s3.endpoint_url` (from {} line 4) is invalid",
            path.display()
        )),
        "{err}"
    );
    // Root ignores permissions: only meaningful for other users.
    if unsafe { libc::geteuid() } != 0 {
        std::fs::set_permissions(&media, std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::write(
            &path,
            format!(
                "media_store_path: {}/sub\ns3:\n  bucket: b-ucket\n",
                media.display()
            ),
        )
        .unwrap();
        let err = load_with_env(&path, &[]).unwrap_err().to_string();
        std::fs::set_permissions(&media, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            !err.contains("invalid") && err.contains("ermission denied"),
            "{err}"
        );
    }
}

#[test]
fn the_setup_summary_names_bucket_endpoint_metrics_and_sweep_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = raw_with(dir.path());
    raw.s3.endpoint_url = Some("http://127.0.0.1:9000".into());
    raw.s3.access_key_id = Some("AKIDsummary".into());
    raw.s3.secret_access_key = Some(Secret::new("summary-secret"));
    raw.metrics.listen = Some("127.0.0.1:9187".into());
    raw.database = Some(RawDatabase {
        database: Some("synapse".into()),
        password: Some(Secret::new("summary-db-password")),
        ..Default::default()
    });
    let s = validate(raw).unwrap().summary();
    for want in [
        "bucket media",
        "http://127.0.0.1:9000",
        "metrics on http://127.0.0.1:9187/metrics",
        "sweep every 1h, keeping media accessed in the last 30days",
    ] {
        assert!(s.contains(want), "{want}: {s}");
    }
    assert!(
        !s.contains("secret") && !s.contains("password") && !s.contains("AKID"),
        "{s}"
    );
}

#[test]
fn database_name_sqlite3_selects_the_file_in_synapses_block_or_flat() {
    let dir = tempfile::tempdir().unwrap();
    let with = |yaml: &str| {
        let mut raw = raw_with(dir.path());
        raw.database = Some(serde_saphyr::from_str::<RawDatabase>(yaml).unwrap());
        validate(raw)
    };
    // Synapse's whole block pasted, or the flat form; the lock file goes to state_dir.
    for yaml in [
        "name: sqlite3\nargs:\n  database: /var/lib/matrix-synapse/homeserver.db\n  cp_min: 1\n",
        "name: sqlite3\ndatabase: /var/lib/matrix-synapse/homeserver.db\n",
    ] {
        match with(yaml).unwrap().database {
            Some(DatabaseConfig::Sqlite(s)) => {
                assert_eq!(s.path, Path::new("/var/lib/matrix-synapse/homeserver.db"));
                assert_eq!(s.lock_dir.as_deref(), Some(Path::new("/var/lib/x")));
            }
            other => panic!("{yaml}: {other:?}"),
        }
    }
    // PostgreSQL by Synapse's names, in the block form too.
    let c = with("name: psycopg2\nargs:\n  database: synapse\n  host: db\n").unwrap();
    assert!(matches!(c.database, Some(DatabaseConfig::Postgres(p)) if p.host == "db"));
    for (yaml, key, needle) in [
        (
            "name: sqlite3\ndatabase: homeserver.db\n",
            "database.database",
            "absolute",
        ),
        ("name: sqlite3\n", "database.database", "SQLite file"),
        (
            "name: sqlite3\ndatabase: /x.db\nhost: db\n",
            "database.host",
            "PostgreSQL key",
        ),
        ("name: mysql\ndatabase: x\n", "database.name", "sqlite3"),
    ] {
        let e = with(yaml).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(needle), "{yaml}: {e}");
    }
}
