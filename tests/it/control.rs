//! `sweep` and `status` from the command line, with and without a running daemon: same output,
//! and a stale control socket left by a crash does not get in the way.

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use crate::sweep::{Fixture, fixture};

fn yaml(env: &S3Env, f: &Fixture) -> std::path::PathBuf {
    let path = f.store.dir.path().join("config.yaml");
    let text = config_yaml(
        &f.store,
        &env.endpoint,
        &f.bucket,
        (&env.access_key, &env.secret_key),
        "",
        &format!(
            "{}sweep:\n  keep_local_for: 30d\n  confirm_synapse_reads_from_bucket: true\n",
            f.db.yaml()
        ),
    );
    write_yaml(&path, &text);
    path
}

fn cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_synapse-s3-offload"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sorted_lines(s: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<_> = s
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_and_status_work_with_and_without_a_daemon() {
    let env = s3_env();
    let f = fixture(&env, &env.endpoint).await;
    let cfg = yaml(&env, &f);

    // No daemon: the commands open the state themselves.
    let (code, out, err) = cli(&cfg, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("daemon:       not running") && out.contains("last sweep:   never"),
        "{out}"
    );
    let (code, standalone, err) = cli(&cfg, &["sweep", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let would = sorted_lines(&standalone, "would delete ");
    assert_eq!(would.len(), f.deleted.len(), "{standalone}");

    // With a daemon: the same commands go through its control socket.
    let log = f.store.dir.path().join("daemon.log");
    let mut daemon = ChildDaemon::spawn(&cfg, &log, &[]);
    let sock = f.store.state.join("control.sock");
    wait_until("the control socket", Duration::from_secs(20), || {
        sock.exists()
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "owner-only socket"
    );
    let (code, out, err) = tokio::task::block_in_place(|| cli(&cfg, &["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("daemon:       running"), "{out}");
    let (code, via_daemon, err) =
        tokio::task::block_in_place(|| cli(&cfg, &["sweep", "--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        sorted_lines(&via_daemon, "would delete "),
        would,
        "same report either way"
    );
    let (code, out, err) = tokio::task::block_in_place(|| cli(&cfg, &["sweep"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        sorted_lines(&out, "deleted ").len(),
        f.deleted.len(),
        "{out}"
    );
    for p in &f.deleted {
        assert!(!f.store.root.join(p).exists(), "{p}");
    }
    let (_, out, _) = tokio::task::block_in_place(|| cli(&cfg, &["status", "--json"]));
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["last_sweep"]["files_deleted"], 6, "{out}");

    // A crash leaves the socket behind: the commands still work, and a new daemon replaces it.
    daemon.kill9();
    assert!(sock.exists(), "a stale socket is left by kill -9");
    let (code, out, err) = tokio::task::block_in_place(|| cli(&cfg, &["status"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not running"), "{out}");
    assert!(
        out.contains("last sweep:") && !out.contains("never"),
        "the last sweep is remembered: {out}"
    );
    let mut daemon = ChildDaemon::spawn(&cfg, &log, &[]);
    wait_until(
        "the new daemon took over the stale socket",
        Duration::from_secs(20),
        || {
            let (_, out, _) = tokio::task::block_in_place(|| cli(&cfg, &["status"]));
            out.contains("daemon:       running")
        },
    )
    .await;
    assert!(daemon.terminate().success());
    assert!(!sock.exists(), "a clean shutdown removes the socket");
}
