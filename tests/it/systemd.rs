//! Running under systemd: the unit file verifies, and the daemon speaks the notify protocol.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

const UNITS: [&str; 3] = [
    "synapse-s3-offload.service",
    "synapse-s3-offload-audit.service",
    "synapse-s3-offload-audit.timer",
];

fn unit(name: &str) -> String {
    std::fs::read_to_string(format!("{}/dist/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_unit_files_verify() {
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        // verify checks that ExecStart exists: point it at the binary under test.
        std::fs::write(
            dir.path().join(name),
            unit(name).replace(
                "/usr/bin/synapse-s3-offload",
                env!("CARGO_BIN_EXE_synapse-s3-offload"),
            ),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS.map(|n| dir.path().join(n)))
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("synapse-s3-offload"),
        "warnings about our units: {stderr}"
    );
}

#[test]
fn the_audit_unit_runs_as_the_main_unit_does() {
    let (main, audit) = (
        unit("synapse-s3-offload.service"),
        unit("synapse-s3-offload-audit.service"),
    );
    for key in ["User", "Group"] {
        assert_eq!(setting(&main, key), setting(&audit, key), "{key}");
    }
    let exec = |t: &str| {
        setting(t, "ExecStart")
            .unwrap()
            .split(" run")
            .next()
            .unwrap()
            .split(" audit")
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(exec(&main), exec(&audit), "same binary and config");
    assert!(
        setting(&audit, "ExecStart")
            .unwrap()
            .ends_with("audit --json")
    );
    assert!(
        setting(&main, "ReadWritePaths")
            .unwrap()
            .contains(setting(&audit, "ReadWritePaths").unwrap()),
        "the audit writes only to the state directory"
    );
    assert_eq!(
        setting(&unit("synapse-s3-offload-audit.timer"), "OnCalendar"),
        Some("daily")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_notifies_ready_watchdog_and_stopping() {
    let env = s3_env();
    let bucket = create_bucket(&env, "notify").await;
    let store = Store::new();
    let cfg = store.dir.path().join("config.yaml");
    write_yaml(
        &cfg,
        &format!(
            "media_store_path: {}\nstate_dir: {}\ns3:\n  bucket: {bucket}\n  endpoint_url: {}\n  access_key_id: {}\n  secret_access_key: {}\n",
            store.root.display(),
            store.state.display(),
            env.endpoint,
            env.access_key,
            env.secret_key
        ),
    );
    let sock_path = store.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = ChildDaemon::spawn_env(
        &cfg,
        &store.dir.path().join("daemon.log"),
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.as_os_str()),
            ("WATCHDOG_USEC", "1000000".as_ref()),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(20);
    while !(seen.contains("READY=1")
        && seen.contains("WATCHDOG=1")
        && seen.contains("STATUS=queued"))
    {
        assert!(Instant::now() < until, "got only: {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    signal(child.id(), libc::SIGTERM);
    let until = Instant::now() + Duration::from_secs(20);
    while !seen.contains("STOPPING=1") {
        assert!(Instant::now() < until, "no STOPPING=1: {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(child.wait().success());
}
