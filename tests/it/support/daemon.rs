//! The daemon under test: in-process ([`Daemon`], mini-redis style: `run_with(config, shutdown)`
//! on a task, stopped by its token) and as a child process of the binary ([`ChildDaemon`]).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use synapse_s3_offload::config::Config;
use synapse_s3_offload::control::{self, Request, Response, Status};
use synapse_s3_offload::daemon::{self, DaemonError, Options, Ready};
use synapse_s3_offload::state::State;
use tokio_util::sync::CancellationToken;

use super::eventually;

/// The daemon, in-process.
pub struct Daemon {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), DaemonError>>,
    pub state_dir: PathBuf,
    ready: Ready,
}

impl Daemon {
    /// Starts the daemon with default options; it does not wait for the startup (see `ready`).
    pub fn start(config: Config) -> Daemon {
        Daemon::start_with(config, Options::default())
    }

    pub fn start_with(config: Config, opts: Options) -> Daemon {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,synapse_s3_offload=debug",
            ))
            .with_test_writer()
            .try_init();
        let token = CancellationToken::new();
        let state_dir = config.state_dir.clone();
        let ready = opts.ready.clone();
        let handle = tokio::spawn(daemon::run_with(config, token.clone(), opts));
        Daemon {
            token,
            handle,
            state_dir,
            ready,
        }
    }

    /// Waits for the end of the startup: the watch is in place and the scan made under it has
    /// queued what it found, so from now on new files reach the daemon by their events. Returns
    /// whether the watch covers the store (`false`: degraded mode). Panics if the daemon exits
    /// first or takes more than a minute.
    pub async fn ready(&mut self) -> bool {
        let ready = self.ready.clone();
        tokio::select! {
            watched = tokio::time::timeout(Duration::from_secs(60), ready.wait()) => {
                watched.expect("the daemon's startup took more than a minute")
            }
            r = &mut self.handle => panic!("the daemon exited during its startup: {r:?}"),
        }
    }

    /// Panics if the daemon has exited (it must survive every fault of the matrix but a broken
    /// state database).
    pub fn assert_running(&self) {
        assert!(!self.handle.is_finished(), "the daemon exited");
    }

    /// The daemon's status over its control socket.
    pub async fn status(&self) -> Status {
        status(&self.state_dir).await
    }

    /// Waits until nothing is queued (every file uploaded and recorded).
    pub async fn drained(&self) {
        drained(&self.state_dir).await
    }

    /// Stops the daemon; it must exit cleanly.
    pub async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap().expect("daemon ran cleanly");
    }

    /// Waits until nothing is queued, then stops the daemon; it must exit cleanly, with an empty
    /// queue in its state.
    pub async fn stop_drained(self) {
        self.assert_running();
        self.drained().await;
        let state_dir = self.state_dir.clone();
        self.stop().await;
        let state = State::open(&state_dir).unwrap();
        assert!(
            state.queue_items().unwrap().is_empty(),
            "nothing left queued"
        );
    }
}

/// The status of the daemon running with `state_dir`, over its control socket.
pub async fn status(state_dir: &Path) -> Status {
    match control::request(state_dir, &Request::Status).await {
        Ok(Some(Response::Status(s))) => s,
        other => panic!("status: {other:?}"),
    }
}

/// Waits until the daemon running with `state_dir` has nothing queued.
pub async fn drained(state_dir: &Path) {
    eventually("an empty queue", Duration::from_secs(30), || async {
        let s = status(state_dir).await;
        if s.queued == 0 {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
}

/// Waits until a daemon answers on the control socket of `state_dir`.
pub async fn answering(state_dir: &Path) {
    eventually("the daemon answers", Duration::from_secs(20), || async {
        match control::request(state_dir, &Request::Status).await {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The daemon binary as a child process (`run`), logging to `log` (appended: a restarted daemon
/// adds to it); killed if dropped running.
pub struct ChildDaemon {
    child: std::process::Child,
    pub log: PathBuf,
}

impl ChildDaemon {
    /// Starts `wrapper… synapse-s3-offload --config config run`.
    pub fn spawn(config: &Path, log: &Path, wrapper: &[&str]) -> ChildDaemon {
        ChildDaemon::spawn_env(config, log, wrapper, &[])
    }

    /// [`ChildDaemon::spawn`] with more environment variables.
    pub fn spawn_env(
        config: &Path,
        log: &Path,
        wrapper: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> ChildDaemon {
        let bin = env!("CARGO_BIN_EXE_synapse-s3-offload");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        ChildDaemon {
            child,
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log shows the end of the startup: the first scan made with the watch in
    /// place finished (the in-process [`Daemon::ready`], seen from outside).
    pub async fn ready(&self) {
        super::wait_until(
            "the startup scan under the watch",
            Duration::from_secs(60),
            || {
                self.log()
                    .lines()
                    .any(|l| l.contains("Scan finished") && l.contains("watched=true"))
            },
        )
        .await;
    }

    /// SIGKILL (kill -9), and reaps it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to exit (without blocking the runtime's other tasks).
    pub fn wait(&mut self) -> ExitStatus {
        tokio::task::block_in_place(|| self.child.wait().unwrap())
    }

    /// SIGTERM; returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        self.wait()
    }

    /// SIGTERM; it must have been running and exit 0.
    pub fn stop(mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the daemon exited: {}",
            self.log()
        );
        let status = self.terminate();
        assert!(status.success(), "{status:?}: {}", self.log());
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to the process `pid`.
pub fn signal(pid: u32, sig: i32) {
    unsafe { libc::kill(pid as i32, sig) };
}
