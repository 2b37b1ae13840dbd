//! The watch stage: sets up the inotify watch beside the startup scan, turns events into queue
//! entries and directory scans, and turns every gap it notices into a full scan.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Action, Msg};
use crate::scan::{Intake, Signals};
use crate::state::now_ms;

/// When a new directory is scanned again after its immediate scan.
const NEW_DIR_RESCANS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

pub struct Watcher {
    pub intake: Intake,
    pub signals: Signals,
    /// Capacity of the channel between notify's thread and the event loop; when it is full an
    /// event is dropped and a full scan is asked for instead.
    pub event_buffer: usize,
}

impl Watcher {
    /// Watches the store and handles its events until `cancel`; the watch ends with it.
    pub async fn run(self, cancel: CancellationToken) {
        let (tx, rx) = tokio::sync::mpsc::channel(self.event_buffer);
        // Adding the watches walks the whole tree: do it beside the startup scan, not before it,
        // and handle events while it runs (the channel would overflow otherwise). The live watch
        // is this task's output: it lives in the join handle until awaited below.
        let setup = {
            let root = self.intake.root.clone();
            let signals = self.signals.clone();
            tokio::task::spawn_blocking(move || {
                let overflowed = signals.clone();
                let w = super::start(&root, tx, move || overflowed.full_scan());
                match &w {
                    Ok(_) => {
                        let dirs = crate::scan::count_dirs(&root);
                        metrics::gauge!(crate::metrics::WATCHED_DIRS).set(dirs as f64);
                        tracing::info!(dirs, "Watching the media store.");
                        signals.watching();
                    }
                    Err(e) => {
                        signals.watch_failed();
                        watch_failed(&signals, e);
                    }
                }
                w.ok()
            })
        };
        self.events(rx, &cancel).await;
        // Shutdown (or the watch is gone): waits for the watches to be added, then drops them.
        drop(setup.await.ok().flatten());
    }

    /// Turns notify's events into queue entries and directory scans. Returns on `cancel`, or
    /// when the watcher is gone (it could not be set up: the scans cover the store alone).
    async fn events(&self, mut rx: Receiver<Msg>, cancel: &CancellationToken) {
        let s = &self.signals;
        // New directories are scanned again a little later: notify adds the watch of a new
        // directory only after delivering its Create event, so a file written and closed in
        // between has no event, and an immediate scan may run before it exists. A scan after the
        // watch is in place closes that gap (the file is then either seen by the scan or has its
        // own events).
        let mut rescans: BTreeMap<Instant, Vec<PathBuf>> = Default::default();
        loop {
            let next_rescan = rescans.keys().next().copied();
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = async { tokio::time::sleep_until(next_rescan.expect("guarded")).await }, if next_rescan.is_some() => {
                    let (_, dirs) = rescans.pop_first().expect("guarded");
                    let found = self.intake.scan_dirs(dirs).await;
                    if !found.is_empty() {
                        self.intake.enqueue(found).await;
                    }
                    continue;
                }
                m = rx.recv() => match m { Some(m) => m, None => return },
            };
            // Batch what is already waiting: one transaction for a burst of events.
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut files = Vec::new();
            let mut new_dirs = Vec::new();
            for msg in batch {
                match msg {
                    Msg::Error(e) if super::is_watch_limit(&e) => watch_failed(s, &e),
                    Msg::Error(e) => {
                        tracing::warn!(error = %crate::Chain(&e), "Watch error; scanning the store.");
                        s.full_scan();
                    }
                    Msg::Event(ev) => {
                        for action in super::classify(&ev) {
                            match action {
                                Action::Rescan => {
                                    tracing::warn!("inotify queue overflowed; scanning the store.");
                                    s.full_scan();
                                }
                                Action::Dir(dir) => {
                                    let now = Instant::now();
                                    for later in NEW_DIR_RESCANS {
                                        rescans.entry(now + later).or_default().push(dir.clone());
                                    }
                                    new_dirs.push(dir);
                                }
                                Action::File(p) => {
                                    if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                                        new_dirs.push(p);
                                    } else if let Some(mp) = self.intake.media_path(&p) {
                                        files.push((mp, now_ms(), false));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // The batch's new directories are scanned together; everything is enqueued in one
            // commit.
            if !new_dirs.is_empty() {
                files.extend(self.intake.scan_dirs(new_dirs).await);
            }
            if !files.is_empty() {
                self.intake.enqueue(files).await;
            }
        }
    }
}

/// The watch cannot cover the store (the watch limit, or it could not be set up at all):
/// degraded mode, said once, and a full scan now.
fn watch_failed(s: &Signals, e: &notify::Error) {
    if s.degrade() {
        if super::is_watch_limit(e) {
            tracing::error!("{}", super::WATCH_LIMIT_ADVICE);
        } else {
            tracing::error!(error = %crate::Chain(e), "Cannot watch the media store; relying on periodic scans (scan_interval_when_degraded).");
        }
    }
    s.full_scan();
}
