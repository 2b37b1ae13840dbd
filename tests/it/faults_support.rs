//! Support of the fault matrix: a rig of a bucket behind a [`FaultProxy`] and a store, a steady
//! stream of files, the final "nothing lost" check, a private PostgreSQL server that a test may restart, and
//! a small tmpfs that a test may fill.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rand::SeedableRng;
use synapse_s3_offload::config::{Config, RawConfig};

use crate::faults_proxy::FaultProxy;
use crate::support::*;

pub type Files = Vec<(String, Vec<u8>)>;

/// A bucket on the shared S3 server, reached through a fault proxy, and a media store.
pub struct Rig {
    pub env: S3Env,
    pub proxy: FaultProxy,
    pub bucket: String,
    pub store: Store,
}

impl Rig {
    pub async fn new(hint: &str, seed: u64) -> Rig {
        let env = s3_env();
        let proxy = FaultProxy::start(env.addr, seed).await;
        let bucket = create_bucket(&env, hint).await;
        Rig {
            env,
            proxy,
            bucket,
            store: Store::new(),
        }
    }

    /// A config through the proxy with short timeouts and retry delays (the whole matrix must run
    /// in well under two minutes), then `tweak`. Permanent failures wait an hour: a transient fault
    /// taken for a permanent one would hold its file past every test's deadline.
    pub fn config(&self, tweak: impl FnOnce(&mut RawConfig)) -> Config {
        let mut raw = raw_config(&self.env, &self.proxy.endpoint(), &self.bucket, &self.store);
        raw.upload.settle = Some("300ms".into());
        raw.upload.max_backoff = Some("1s".into());
        raw.upload.failed_retry_interval = Some("1h".into());
        raw.s3.connect_timeout = Some("1s".into());
        raw.s3.request_timeout = Some("2s".into());
        raw.shutdown_grace = Some("3s".into());
        tweak(&mut raw);
        validated(raw)
    }

    /// Every file is in the bucket, byte-identical, and still on disk, unchanged (the daemon
    /// deletes nothing; the sweep only what it confirmed, checked by its tests).
    pub async fn nothing_lost(&self, files: &Files) {
        eventually("every file in the bucket", Duration::from_secs(60), || {
            listed(&self.env, &self.bucket, files)
        })
        .await;
        all_uploaded(&self.env, &self.bucket, files).await.unwrap();
        for (rel, data) in files {
            let on_disk = std::fs::read(self.store.root.join(rel))
                .unwrap_or_else(|e| panic!("{rel} is gone from the disk: {e}"));
            assert!(&on_disk == data, "{rel} changed on disk");
        }
    }
}

/// Writes `n` small files into `root`, one every `every` (a writer thread, like Synapse's media
/// repository: makedirs, then open/write/close). Join it for the (path, content) list.
pub fn stream(root: &Path, n: usize, every: Duration, seed: u64) -> std::thread::JoinHandle<Files> {
    let root = root.to_owned();
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let rel = media_name(&mut rng);
                let data = bytes(seed * 100_000 + i as u64, 200 + (i * 397) % 8_000);
                let p = root.join(&rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, &data).unwrap();
                std::thread::sleep(every);
                (rel, data)
            })
            .collect()
    })
}

/// Joins a [`stream`] without blocking the runtime's other tasks.
pub fn join(h: std::thread::JoinHandle<Files>) -> Files {
    tokio::task::block_in_place(|| h.join().unwrap())
}

/// Runs a command (as root, or as `user`), panicking with its output if it fails.
pub fn sh(user: Option<&str>, args: &[&str]) -> String {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails (never skips) unless the tests run as root: mounts and capability tricks need it.
pub fn require_root(what: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        unsafe { libc::geteuid() } == 0,
        "{what} needs root (mount, runuser){}",
        if ci {
            " (CI=true: a missing capability is a failure)"
        } else {
            ""
        }
    );
}

/// A tmpfs of `size` mounted on `dir` (created), unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        require_root("a full state_dir (tmpfs)");
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("size={size},mode=0700");
        sh(
            None,
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &opts,
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }

    /// Writes `path` until the filesystem is full.
    pub fn fill(path: &Path) {
        use std::io::Write;
        let mut f = std::fs::File::create(path).unwrap();
        let chunk = vec![0x5a; 4096];
        while f.write_all(&chunk).and_then(|_| f.sync_data()).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon that still holds a file there must not keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A PostgreSQL server of our own (initdb in a temp dir, its own port), so that a test may
/// restart it without disturbing the tests that use the machine's server.
pub struct PrivatePg {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl PrivatePg {
    pub fn start() -> PrivatePg {
        require_root("a private PostgreSQL (initdb as the postgres user)");
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let pg_uid: u32 = sh(None, &["id", "-u", "postgres"]).trim().parse().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(pg_uid), None).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePg { port, dir, bin };
        let initdb = pg.bin.join("initdb");
        sh(
            Some("postgres"),
            &[
                initdb.to_str().unwrap(),
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        pg.ctl(&["start"]);
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ctl(&self, action: &[&str]) {
        let ctl = self.bin.join("pg_ctl");
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off -c max_connections=20 -c shared_buffers=16MB",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log");
        let mut args = vec![ctl.to_str().unwrap(), "-D"];
        let data = self.data();
        args.push(data.to_str().unwrap());
        args.extend(["-w", "-t", "60", "-m", "fast", "-o", &opts, "-l"]);
        args.push(log.to_str().unwrap());
        args.extend(action);
        sh(Some("postgres"), &args);
    }

    /// Stops the server (fast: sessions are terminated) and starts it again.
    pub fn restart(&self) {
        self.ctl(&["restart"]);
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(ctl)
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Where initdb and pg_ctl are: `SSO_TEST_PG_BIN`, the PATH, or Debian's versioned directories.
fn pg_bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SSO_TEST_PG_BIN") {
        return d.into();
    }
    let in_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(PathBuf::from)
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    if let Some(d) = in_path {
        return d;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("initdb not found: install PostgreSQL's server binaries or set SSO_TEST_PG_BIN")
}
