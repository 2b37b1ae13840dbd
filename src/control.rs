//! The local control socket (`state_dir/control.sock`, owner-only): lets `sweep`, `audit` and `status` reach
//! a running daemon, which owns the state database (redb allows one process).
//!
//! Protocol: one JSON request line, one JSON response line, then the connection closes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::queue::Queue;
use crate::state::{State, StateError, StateHandle};
use crate::sweep::Report;

pub const SOCKET: &str = "control.sock";
/// The longest request line read (requests are a few hundred bytes of JSON): a connection that
/// sends more is answered with an error instead of being buffered (one such connection took the
/// daemon's RSS to 4 GB).
pub const MAX_REQUEST: u64 = 64 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Sweep {
        dry_run: bool,
    },
    Audit {
        options: crate::audit::Options,
    },
    /// One prune run now: `path` forced, or the one due.
    Prune {
        path: Option<crate::audit::PrunePath>,
        dry_run: bool,
    },
    Forget {
        targets: Vec<String>,
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Sweep(Report),
    Audit(Box<crate::audit::Report>),
    Prune(Box<crate::audit::PruneReport>),
    Forget(crate::audit::ForgetReport),
    Error(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailedItem {
    pub path: String,
    pub attempts: u32,
    pub last_error: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub daemon_running: bool,
    pub queued: usize,
    pub in_flight: usize,
    pub retrying: usize,
    pub failed: usize,
    pub recorded: u64,
    pub failures: Vec<FailedItem>,
    pub last_sweep: Option<Box<Report>>,
    #[serde(default)]
    pub last_dry_run: Option<Box<Report>>,
    /// The last run of the prune job (or `prune` command).
    #[serde(default)]
    pub last_prune: Option<Box<crate::audit::PruneReport>>,
    /// Parts of the media store the daemon's scans could not read (their files are not uploaded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
    /// Why inotify does not cover the whole store (degraded mode: new files are found by scans
    /// every `scan_interval_when_degraded`); empty while the watch covers it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
    /// Local files that differ from their verified object and are not healed (healing off, or
    /// it failed), and conflicts (local file and an unverified object differ; both kept).
    #[serde(default)]
    pub bad_local_copies: u64,
    #[serde(default)]
    pub conflicts: u64,
    /// The first of them, with sizes and digests.
    #[serde(default)]
    pub problems: Vec<ProblemItem>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProblemItem {
    pub path: String,
    pub kind: String,
    pub detail: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "daemon:       {}",
            if self.daemon_running {
                "running"
            } else {
                "not running"
            }
        )?;
        writeln!(
            f,
            "queued:       {} ({} in flight, {} retrying, {} failed)",
            self.queued, self.in_flight, self.retrying, self.failed
        )?;
        writeln!(
            f,
            "uploaded:     {} files verified in the bucket",
            self.recorded
        )?;
        let ago = |r: &Report| {
            humantime::format_duration(Duration::from_secs(
                crate::state::now_ms().saturating_sub(r.started_at_ms) / 1000,
            ))
        };
        match &self.last_sweep {
            Some(r) => writeln!(f, "last sweep:   {} ago: {r}", ago(r))?,
            None => writeln!(f, "last sweep:   never")?,
        }
        if let Some(r) = &self.last_dry_run {
            writeln!(f, "last dry run: {} ago: {r}", ago(r))?;
        }
        if let Some(r) = &self.last_prune {
            let ago = humantime::format_duration(Duration::from_secs(
                crate::state::now_ms().saturating_sub(r.started_at_ms) / 1000,
            ));
            writeln!(f, "last prune:   {ago} ago: {r}")?;
        }
        if self.daemon_running && !self.degraded.is_empty() {
            writeln!(
                f,
                "watch:        degraded ({}): new files are found by scans every scan_interval_when_degraded, not at once",
                self.degraded.join(", ")
            )?;
        }
        for u in &self.unreadable {
            writeln!(f, "unreadable:   {u} (its files are not uploaded)")?;
        }
        if self.bad_local_copies + self.conflicts > 0 {
            writeln!(
                f,
                "copies:       {} bad local copies not healed, {} conflicts (the objects are kept; see the README, \"When the local file and the object differ\")",
                self.bad_local_copies, self.conflicts
            )?;
        }
        for p in &self.problems {
            writeln!(f, "{:<14}{}: {}", format!("{}:", p.kind), p.path, p.detail)?;
        }
        for item in &self.failures {
            writeln!(
                f,
                "failed:       {} (attempts {}): {}",
                item.path, item.attempts, item.last_error
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot use the control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon answered something unreadable: {0}")]
    Protocol(String),
    #[error(
        "a daemon is already running with state_dir {0} (its control socket answers): stop it first, or use status, sweep and audit, which talk to it"
    )]
    AlreadyRunning(PathBuf),
}

/// The status, read from `state` and `queue` (shared by the daemon and standalone `status`).
pub fn status(state: &State, queue: &Queue, daemon_running: bool) -> Result<Status, StateError> {
    let d = queue.depth();
    let last = crate::sweep::report::Last::load(state)?;
    Ok(Status {
        daemon_running,
        queued: d.queued,
        in_flight: d.in_flight,
        retrying: d.retrying,
        failed: d.failed,
        recorded: state.record_count()?,
        failures: queue
            .failures(50)
            .into_iter()
            .map(|(p, i)| FailedItem {
                path: p.to_string(),
                attempts: i.attempts,
                last_error: i.last_error,
            })
            .collect(),
        last_sweep: last.sweep,
        last_dry_run: last.dry_run,
        last_prune: crate::audit::job::last(state)?.map(Box::new),
        unreadable: Vec::new(),
        ..problems(state)?
    })
}

/// The copy problems for [`Status`]: counts over the whole table, the first 50 in path order.
fn problems(state: &State) -> Result<Status, StateError> {
    use crate::state::ProblemKind;
    let mut st = Status::default();
    let mut after: Option<String> = None;
    loop {
        let page = state.problems_after(after.as_deref(), 1000)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (path, p) in page {
            let kind = match p.kind {
                ProblemKind::BadLocalCopy => {
                    st.bad_local_copies += 1;
                    "bad copy"
                }
                ProblemKind::Conflict => {
                    st.conflicts += 1;
                    "conflict"
                }
            };
            if st.problems.len() < 50 {
                st.problems.push(ProblemItem {
                    path,
                    kind: kind.into(),
                    detail: p.detail,
                });
            }
        }
    }
    Ok(st)
}

/// `status` without a running daemon: reads the state database itself.
pub fn status_standalone(config: &crate::config::Config) -> Result<Status, StateError> {
    let h = StateHandle::open(&config.state_dir)?;
    let queue = Queue::open(&h.state, h.committer.clone(), &config.upload)?;
    let st = status(&h.state, &queue, false);
    drop(queue);
    h.close_blocking();
    st
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Sends `req` to the running daemon. `Ok(None)`: no daemon listens (no socket, or a stale one).
pub async fn request(state_dir: &Path, req: &Request) -> Result<Option<Response>, ControlError> {
    let path = state_dir.join(SOCKET);
    let stream =
        match tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(&path)).await {
            Err(_) => {
                return Err(ControlError::Io {
                    path,
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Ok(r) => r.map_err(io(&path))?,
        };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(io(&path))?;
    let mut answer = String::new();
    BufReader::new(r)
        .read_line(&mut answer)
        .await
        .map_err(io(&path))?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| ControlError::Protocol(e.to_string()))
}

/// Binds the daemon's socket: removes a stale one left by a crash, refuses if a daemon answers.
pub async fn bind(state_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = state_dir.join(SOCKET);
    if path.exists() {
        match UnixStream::connect(&path).await {
            Ok(_) => return Err(ControlError::AlreadyRunning(state_dir.to_owned())),
            Err(_) => {
                tracing::info!(path = %path.display(), "Removing a stale control socket.");
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
    }
    // Bound in a directory of its own (0700), made owner-only there, then renamed into place:
    // bound at its final path, the socket existed with the umask's mode until the chmod, and
    // another user could connect in between (a test saw 0755 under load) when `state_dir` itself
    // is not private. A rename keeps the listener bound to the socket.
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let private = state_dir.join(format!(".ctl{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io(&private))?;
    let staged = private.join(SOCKET);
    let bound = match UnixListener::bind(&staged) {
        // A long state_dir leaves no room under the socket path limit (108 bytes) for the staging
        // directory: bound in place then, as before (state_dir is 0700 when we created it).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            let _ = std::fs::remove_dir_all(&private);
            let l = UnixListener::bind(&path).map_err(io(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(io(&path))?;
            return Ok(l);
        }
        r => r,
    };
    let bound = bound.map_err(io(&staged)).and_then(|l| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&staged))?;
        std::fs::rename(&staged, &path).map_err(io(&path))?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Reads one request from `stream` and writes `answer(request)`'s response.
pub async fn serve_one<F, Fut>(stream: UnixStream, answer: F)
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    use tokio::io::AsyncReadExt;
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(r.take(MAX_REQUEST + 1)).read_line(&mut line),
    )
    .await;
    let response = match read {
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST => {
            Response::Error(format!("bad request: longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req).await,
            Err(e) => Response::Error(format!("bad request: {e}")),
        },
        _ => return,
    };
    let mut out = serde_json::to_string(&response).expect("responses serialize");
    out.push('\n');
    let _ = w.write_all(out.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The socket appears at its path already owner-only (staged in a private directory, which
    /// is gone after), and answers; a state_dir too long for the staging directory under the
    /// socket path limit still gets one, bound in place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_is_owner_only_from_its_first_moment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // 92 bytes: control.sock fits under the 108-byte limit, .ctlPID/control.sock does not.
        let long = dir
            .path()
            .join("s".repeat(91 - dir.path().as_os_str().len()));
        std::fs::create_dir(&long).unwrap();
        for state_dir in [dir.path(), long.as_path()] {
            let listener = bind(state_dir).await.unwrap();
            let path = state_dir.join(SOCKET);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            let left: Vec<_> = std::fs::read_dir(state_dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(".ctl"))
                .collect();
            assert!(left.is_empty(), "staging directory left: {left:?}");
            let (accepted, connected) = tokio::join!(listener.accept(), UnixStream::connect(&path));
            accepted.unwrap();
            connected.unwrap();
        }
    }

    /// A request longer than MAX_REQUEST is refused after reading MAX_REQUEST + 1 bytes, not
    /// buffered whole (any size used to be).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_request_is_refused_not_buffered() {
        let started = std::time::Instant::now();
        let (client, server) = UnixStream::pair().unwrap();
        let serve = tokio::spawn(serve_one(server, |_| async {
            Response::Error("served".into())
        }));
        let (mut r, mut w) = client.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            // Up to 256 MiB without a newline, and the connection kept open: a server that
            // buffers waits for the rest until its 10 s timeout.
            for _ in 0..4096 {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        // The server answers and closes without reading the rest; the unread bytes may reset
        // the connection before the answer is read, so only a received answer is checked.
        let mut answer = String::new();
        let _ = r.read_to_string(&mut answer).await;
        serve.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the server buffered the request ({:?})",
            started.elapsed()
        );
        writer.abort();
        assert!(
            answer.is_empty() || answer.contains("longer than"),
            "{answer}"
        );
    }
}
