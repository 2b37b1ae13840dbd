//! Running under systemd: the unit file verifies, and the daemon speaks the notify protocol.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn the_unit_file_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/synapse-s3-offload.service"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synapse-s3-offload.service");
    // verify checks that ExecStart exists: point it at the binary under test.
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/synapse-s3-offload",
            env!("CARGO_BIN_EXE_synapse-s3-offload"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("synapse-s3-offload.service:"),
        "warnings about our unit: {stderr}"
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    unsafe { libc_kill(child.id() as i32, 15) };
    let until = Instant::now() + Duration::from_secs(20);
    while !seen.contains("STOPPING=1") {
        assert!(Instant::now() < until, "no STOPPING=1: {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(child.wait().unwrap().success());
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
