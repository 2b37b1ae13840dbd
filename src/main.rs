//! The `synapse-s3-offload` binary: parses the command line, loads the config, sets up logging and
//! runs one command. Errors are printed as one line and mapped to a non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use synapse_s3_offload::control::{self, Request, Response};
use synapse_s3_offload::state::StateError;
use synapse_s3_offload::{audit, backfill, config, daemon, sweep};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Uploads a Matrix Synapse media store to S3-compatible storage"
)]
struct Cli {
    /// Config file (YAML; TOML if it ends in .toml). Env overrides: SYNAPSE_S3_OFFLOAD__S3__BUCKET=…
    #[arg(
        long,
        short,
        global = true,
        env = "SYNAPSE_S3_OFFLOAD_CONFIG",
        default_value = "/etc/synapse-s3-offload/config.yaml"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: watch the media store and upload every finished file, until SIGTERM/SIGINT.
    Run,
    /// Delete local copies of aged media that are confirmed in the bucket (asks the running daemon
    /// if there is one), print what was deleted.
    Sweep {
        /// Delete nothing; list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Queue depth, failed uploads with their errors, last sweep (asks the running daemon if any).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the config, S3 (write/read/delete probe), PostgreSQL, the media store, inotify limits,
    /// state_dir and Synapse's provider config; one line per check, non-zero exit on any failure.
    Check,
    /// Reconcile Synapse's database, the bucket and the media store: lost media, files not yet
    /// uploaded, mismatched objects, orphaned objects, unknown local files (asks the running daemon
    /// if there is one). Exit status 3 when media are lost.
    Audit {
        /// Print JSON (stable field names, for monitoring) instead of text.
        #[arg(long)]
        json: bool,
        /// Queue uploads of the files not yet uploaded and of mismatched objects.
        #[arg(long)]
        fix: bool,
        /// Delete orphaned objects (their media has no database row) that an earlier audit
        /// already found orphaned at least --older-than ago.
        #[arg(long, requires = "older_than")]
        delete_orphans: bool,
        /// Grace period for --delete-orphans, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration, requires = "delete_orphans")]
        older_than: Option<std::time::Duration>,
        /// Delete and queue nothing; report what --delete-orphans/--fix would do.
        #[arg(long)]
        dry_run: bool,
        /// Examples listed per category.
        #[arg(long, default_value_t = 10)]
        examples: usize,
        /// Delete orphans even when the sanity limits refuse (more orphans than
        /// prune.max_orphan_percent, more than prune.max_deletions_per_run); never against a
        /// database without media.
        #[arg(long, requires = "delete_orphans")]
        ignore_prune_limits: bool,
    },
    /// Follow Synapse's deletions now: one run of the prune job (see `prune:` in the config), the
    /// path that is due unless --incremental or --full (asks the running daemon if there is one).
    Prune {
        /// Check only our upload records against the database.
        #[arg(long, conflicts_with = "full")]
        incremental: bool,
        /// List the whole bucket (finds objects we did not upload too).
        #[arg(long)]
        full: bool,
        /// Delete nothing; report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove deleted media from the bucket at once (a legal removal): their original and
    /// thumbnails, once Synapse has deleted the media (refused while its row exists).
    Forget {
        /// mxc://server/media_id of a local media, or the path of a remote media's original
        /// (remote_content/ORIGIN/AB/CD/REST) as `audit` prints it.
        #[arg(required = true)]
        media: Vec<String>,
        /// Remove nothing; list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Upload every file of the media store that is not yet verified in the bucket, then exit.
    Upload {
        /// Plain log lines instead of a progress bar, even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
}

// jemalloc, not glibc's malloc: with glibc, malloc and free were ~17 % of `upload`'s CPU at 0 ms
// RTT (every request allocates ~500 times in the SDK, every body 35 KB–1 MiB, freed on another
// thread; `malloc_consolidate` on each large request). With jemalloc the same 20,001-file upload
// took ~15 % less CPU (BENCHMARKS.md, "After jemalloc and a cap of 96"). mimalloc was tried
// before and dropped: its RSS grew tenfold in this pattern.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them). With its defaults, peak RSS of that upload was 60 MB against glibc's 42 MB:
/// freed pages stay resident for 10 s, each of 4 arenas per core keeps its own, and every thread
/// (the uploads' blocking threads too) caches objects up to 32 KiB. Two arenas, dirty pages given
/// back after 100 ms and thread caches for objects up to 1 KiB: 44 MB, same CPU (measured with
/// `_RJEM_MALLOC_CONF` on the same store); an idle daemon returns memory soon after a burst.
#[unsafe(export_name = "_rjem_malloc_conf")]
#[allow(non_upper_case_globals)]
pub static malloc_conf: &[u8; 62] =
    b"narenas:2,dirty_decay_ms:100,muzzy_decay_ms:0,tcache_max:1024\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One log line instead of a multi-line dump; a library panic we catch (redb on a corrupted
    // file) is followed by our own clear error.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info.to_string().replace('\n', " "), "Internal error.");
    }));
    raise_open_file_limit();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The most verbose level the request signer may log at (see [`init_logging`]).
const SIGV4_CAP: &str = "aws_sigv4=debug";

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")
    });
    // aws_sigv4 logs every request it signs, headers included, at TRACE: the SSE-C key travels in a
    // header (tests/it/security.rs caught it). Capped at DEBUG whatever RUST_LOG says, so that no
    // log filter can print a secret.
    let filter = filter.add_directive(SIGV4_CAP.parse().expect("a valid directive"));
    // notify logs "unable to remove watch descriptor … Invalid argument" at INFO and "Unable to
    // remove the path from the watches: WatchNotFound" at WARN whenever a watched directory is
    // removed (the sweep removes emptied thumbnail directories; the kernel already dropped the
    // watch, and notify removes it twice, for the parent's event and the directory's own; 729
    // lines in a soak): noise, unless asked for by name.
    let filter = if std::env::var("RUST_LOG").is_ok_and(|f| f.contains("notify")) {
        filter
    } else {
        filter.add_directive("notify::inotify=error".parse().expect("a valid directive"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Check = cli.command {
        // Before loading: a bad config is a ✗ line of the table, and the rest is still checked.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let checks = rt.block_on(synapse_s3_offload::check::run_file(&cli.config));
        print!("{checks}");
        return match checks.failed {
            0 => Ok(ExitCode::SUCCESS),
            1 => anyhow::bail!("1 check failed (✗ above)"),
            n => anyhow::bail!("{n} checks failed (✗ above)"),
        };
    }
    let config = match config::load(&cli.config) {
        Ok(c) => c,
        // `status` is what an admin runs when the media store has vanished (unmounted, moved):
        // a running daemon can still say so ("watch: degraded (media store gone)").
        Err(e) => match cli.command {
            Command::Status { json } => return status_without_store(&cli.config, json, e),
            _ => return Err(e.into()),
        },
    };
    if !matches!(cli.command, Command::Status { .. })
        && let Some(problem) = synapse_s3_offload::owner::problem(
            synapse_s3_offload::owner::euid(),
            &config.media_store_path,
            &config.state_dir,
        )
    {
        anyhow::bail!("{problem}");
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let mut config = config;
    fit_concurrency_to_open_files(&mut config.upload.concurrency, open_file_limit());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Check => unreachable!("handled above"),
            Command::Sweep { dry_run } => {
                let cancel = cancel_on_signal(false);
                let answer = daemon_or_local(&config.state_dir, Request::Sweep { dry_run }, async || {
                    match sweep::run_standalone(&config, dry_run, &cancel).await {
                        Err(sweep::SweepError::State(StateError::Locked { .. })) => Ok(None),
                        other => Ok(Some(other?)),
                    }
                })
                .await?;
                let report = match answer {
                    Ok(Response::Sweep(r)) | Err(r) => r,
                    Ok(Response::Error(e)) => anyhow::bail!("{e}"),
                    Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                };
                let verb = if dry_run { "would delete" } else { "deleted" };
                for path in &report.deleted {
                    println!("{verb} {path}");
                }
                let unlisted = report.files_deleted.saturating_sub(report.deleted.len() as u64);
                if unlisted > 0 {
                    println!("… and {unlisted} more files (not listed; RUST_LOG=synapse_s3_offload=debug logs each one)");
                }
                println!("{report}");
                for e in &report.errors {
                    eprintln!("kept: {e}");
                }
                if let Some(why) = &report.stopped {
                    anyhow::bail!("the sweep stopped early: {why}");
                }
                if report.kept_error > 0 {
                    anyhow::bail!("{} files could not be confirmed and were kept (see above); the next sweep retries them", report.kept_error);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Audit {
                json,
                fix,
                delete_orphans,
                older_than,
                dry_run,
                examples,
                ignore_prune_limits,
            } => {
                let cancel = cancel_on_signal(false);
                let options = audit::Options {
                    fix,
                    delete_orphans,
                    older_than,
                    dry_run,
                    examples,
                    ignore_prune_limits,
                };
                let req = Request::Audit { options: options.clone() };
                let answer = daemon_or_local(&config.state_dir, req, async || {
                    match audit::run_standalone(&config, &options, &cancel).await {
                        Err(audit::AuditError::State(StateError::Locked { .. })) => Ok(None),
                        other => Ok(Some(other?)),
                    }
                })
                .await?;
                let report = match answer {
                    Ok(Response::Audit(r)) => *r,
                    Err(r) => r,
                    Ok(Response::Error(e)) => anyhow::bail!("{e}"),
                    Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{report}");
                }
                if report.lost.count > 0 {
                    eprintln!("error: {} files listed by the database are neither local nor in the bucket (lost)", report.lost.count);
                    return Ok(ExitCode::from(3));
                }
                if let Some(why) = &report.prune_refused {
                    eprintln!("error: refusing to delete orphaned objects: {why}");
                    return Ok(ExitCode::FAILURE);
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Prune {
                incremental,
                full,
                dry_run,
                json,
            } => {
                let cancel = cancel_on_signal(false);
                let path = match (incremental, full) {
                    (true, _) => Some(audit::PrunePath::Incremental),
                    (_, true) => Some(audit::PrunePath::Full),
                    _ => None,
                };
                let req = Request::Prune { path, dry_run };
                let answer = daemon_or_local(&config.state_dir, req, async || {
                    match audit::job::run_standalone(&config, path, dry_run, &cancel).await {
                        Err(audit::AuditError::State(StateError::Locked { .. })) => Ok(None),
                        other => Ok(Some(other?)),
                    }
                })
                .await?;
                let report = match answer {
                    Ok(Response::Prune(r)) => *r,
                    Err(r) => r,
                    Ok(Response::Error(e)) => anyhow::bail!("{e}"),
                    Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    let verb = if dry_run { "would delete" } else { "deleted" };
                    for e in &report.deleted.examples {
                        println!("{verb} {}", e.path);
                    }
                    println!("{report}");
                }
                if let Some(why) = &report.refused {
                    eprintln!("error: refusing to delete orphaned objects: {why}");
                    return Ok(ExitCode::FAILURE);
                }
                if report.skipped_locked {
                    anyhow::bail!("another sweep or prune holds the lock; try again later");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Forget { media, dry_run } => {
                let req = Request::Forget { targets: media.clone(), dry_run };
                let answer = daemon_or_local(&config.state_dir, req, async || {
                    match audit::forget_standalone(&config, &media, dry_run).await {
                        Err(audit::AuditError::State(StateError::Locked { .. })) => Ok(None),
                        other => Ok(Some(other?)),
                    }
                })
                .await?;
                let report = match answer {
                    Ok(Response::Forget(r)) | Err(r) => r,
                    Ok(Response::Error(e)) => anyhow::bail!("{e}"),
                    Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                };
                print!("{report}");
                match report.refused() {
                    0 => Ok(ExitCode::SUCCESS),
                    n => anyhow::bail!("{n} of {} media refused (nothing removed for them; see above)", report.items.len()),
                }
            }
            Command::Status { json } => {
                // Not created here: a typo'd path would look like a fresh install.
                if !config.state_dir.exists() {
                    anyhow::bail!(
                        "state_dir {} does not exist: nothing has run with it yet (`run` or `upload` create it), or the path is wrong",
                        config.state_dir.display()
                    );
                }
                let answer = daemon_or_local(&config.state_dir, Request::Status, async || {
                    match control::status_standalone(&config) {
                        Err(StateError::Locked { .. }) => Ok(None),
                        other => Ok(Some(other?)),
                    }
                })
                .await?;
                let status = match answer {
                    Ok(Response::Status(s)) | Err(s) => s,
                    Ok(Response::Error(e)) => anyhow::bail!("{e}"),
                    Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print!("{status}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Run => {
                let shutdown = cancel_on_signal(true);
                daemon::run(config, shutdown).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Upload { no_progress } => {
                let cancel = cancel_on_signal(false);
                let progress = if no_progress {
                    backfill::Progress::Log
                } else {
                    backfill::Progress::Auto
                };
                let summary = backfill::run(&config, progress, cancel.clone()).await?;
                println!("{summary}");
                if summary.failed > 0 {
                    anyhow::bail!(
                        "{} files failed (see the errors above); run `upload` again once fixed",
                        summary.failed
                    );
                }
                if summary.unreadable_count > 0 {
                    anyhow::bail!(
                        "{} part(s) of the media store could not be read (listed above): give the user this runs as read access, then run `upload` again",
                        summary.unreadable_count
                    );
                }
                if cancel.is_cancelled() {
                    anyhow::bail!("interrupted; run `upload` again to finish");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    // The command is done and its state committed and closed: a blocking task still running (a
    // file of several GB being hashed for an upload the shutdown abandoned) must not keep the
    // process, and the state lock with it, long past `shutdown_grace`. What it was doing is
    // redone at the next start.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Asks the running daemon (`Ok`); without one, runs `local` (`Err`). `local` returns `None` when
/// the state is locked: a daemon is starting (or a sweep runs); both are retried for 10 s.
/// `status` when the config is invalid only because `media_store_path` does not exist: asks a
/// running daemon (its `state_dir` is known); without one, the config error stands.
fn status_without_store(
    path: &std::path::Path,
    json: bool,
    error: config::ConfigError,
) -> anyhow::Result<ExitCode> {
    let Ok(layers) = config::load_layers(path) else {
        return Err(error.into());
    };
    let parts = config::validate_parts(layers.raw, &layers.origins);
    // Only media_store_path is wrong: everything else (state_dir in particular) validated.
    let only_the_store = parts.errors().len() == 1 && parts.media_store_path.is_err();
    let (true, Ok(state_dir)) = (only_the_store, &parts.state_dir) else {
        return Err(error.into());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match rt.block_on(control::request(state_dir, &Request::Status)) {
        Ok(Some(Response::Status(status))) => {
            eprintln!("{error}");
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(error.into()),
    }
}

async fn daemon_or_local<T>(
    state_dir: &std::path::Path,
    req: Request,
    mut local: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Result<Response, T>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(r) = control::request(state_dir, &req).await? {
            return Ok(Ok(r));
        }
        if let Some(t) = local().await? {
            return Ok(Err(t));
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the state database in {} is in use by another process, and no daemon answers on its control socket",
                state_dir.display()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Raises the soft limit of open files to the hard one. The default soft limit (1,024 on most
/// systems) is easily reached by a daemon with inotify, `upload.concurrency` files and their
/// multipart parts, S3 and PostgreSQL connections and its sockets open; running out made every
/// accept fail at once and uploads fail as unreadable. The hard limit is the admin's
/// (`LimitNOFILE=` in the unit).
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft open-file limit (after [`raise_open_file_limit`]); `None` when unlimited or unknown.
fn open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a plain struct.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    (ok && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Descriptors one upload may hold: its file, and a reader and a connection per part in flight.
const FDS_PER_UPLOAD: u64 = 1 + 2 * synapse_s3_offload::upload::s3::PART_CONCURRENCY as u64;
/// Descriptors kept for everything else: inotify, the state, PostgreSQL's pool, the control and
/// metrics connections (capped), the log, HEADs and listings of the sweep and the audit.
const FDS_RESERVED: u64 = 256;

/// Lowers `concurrency` (the `upload.concurrency` cap) to what the open-file limit holds, with a
/// warning that says how to raise the limit: running out of descriptors fails accepts, reads
/// (EMFILE is retried, but nothing moves) and connections all at once.
fn fit_concurrency_to_open_files(concurrency: &mut usize, limit: Option<u64>) {
    let Some(limit) = limit else { return };
    let fits = (limit.saturating_sub(FDS_RESERVED) / FDS_PER_UPLOAD).max(1) as usize;
    if fits < *concurrency {
        tracing::warn!(
            open_file_limit = limit,
            from = *concurrency,
            to = fits,
            "The open-file limit holds only {fits} uploads at once ({FDS_PER_UPLOAD} descriptors each with their parts, {FDS_RESERVED} kept for the rest): upload.concurrency lowered. Raise LimitNOFILE= in the unit (or ulimit -n) to use {} .",
            *concurrency
        );
        *concurrency = fits;
    }
}

/// A token cancelled on SIGTERM or SIGINT, for the command run in this runtime to stop on. A
/// second one exits at once: what was not finished stays queued or unrecorded, which the durable
/// state turns into a retry at the next start (the same as a crash, which it is safe against).
///
/// With `hangup_ignored` (the daemon), SIGHUP is logged and ignored. By default it kills the
/// process with status 129, which systemd counts as a clean exit, so `Restart=on-failure` left the
/// daemon down; there is nothing to reload (a changed config needs a restart).
fn cancel_on_signal(hangup_ignored: bool) -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    // Installed before this returns, so a SIGHUP during startup is not fatal either.
    let mut hangup = hangup_ignored
        .then(|| signal(SignalKind::hangup()).expect("installing the SIGHUP handler"));
    tokio::spawn(async move {
        let stop = shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    tracing::warn!("SIGHUP ignored: there is nothing to reload; restart the service to apply a changed config.");
                }
            }
        }
        on_signal.cancel();
        shutdown_signal().await;
        tracing::warn!(
            "Second stop signal: exiting at once; unfinished uploads are retried at the next start."
        );
        std::process::exit(130);
    });
    cancel
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
