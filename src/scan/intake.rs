//! The intake: how files found by the watch and the scans become durable queue entries.
//!
//! Shared by the watch stage (event paths, new-directory scans) and the scan stage (full walks).
//! A file is skipped only when its upload record matches its size and mtime; everything else is
//! enqueued, and an enqueue that cannot be made durable asks for a full scan instead (the scan is
//! the truth: it finds those files again).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Blind, Signals};
use super::{Item, Problem};
use crate::layout::MediaPath;
use crate::queue::Queue;
use crate::state::{State, now_ms};

/// A file to enqueue: its path, when it is due (ms), and whether the upload must first check
/// that it has settled (found by a scan, not reported by a close event).
pub type Entry = (MediaPath, u64, bool);

/// The first parts of the store a scan could not read, kept for `status` (not only the log).
pub type Unreadable = Arc<Mutex<Vec<String>>>;

#[derive(Clone)]
pub struct Intake {
    /// The media store (canonical).
    pub root: PathBuf,
    pub include_url_cache: bool,
    pub queue: Arc<Queue>,
    /// Its upload records decide what a scan may skip.
    pub state: State,
    /// A failed enqueue or an unreadable part of the store asks the scan stage for more.
    pub signals: Signals,
    pub unreadable: Unreadable,
    /// `upload.hold_after_close`: a closed file is due this long after its close event.
    pub hold: std::time::Duration,
}

impl Intake {
    /// The media path of an event's absolute path, if it is a file to upload.
    pub fn media_path(&self, p: &Path) -> Option<MediaPath> {
        MediaPath::from_absolute(&self.root, p)
            .ok()
            .filter(|m| m.is_uploadable(self.include_url_cache))
    }

    /// The entry of a file reported complete by a close (or moved-in) event: no settle check,
    /// due `hold` from now (Synapse's spam checker runs after the close and may delete it).
    pub fn closed(&self, path: MediaPath) -> Entry {
        (path, now_ms() + self.hold.as_millis() as u64, false)
    }

    /// The entry of a deleted file, if it is one we uploaded that Synapse wrote within
    /// [`crate::upload::FRESH_DELETION`]: its upload then looks at the database (a media whose
    /// file Synapse deletes right after writing it was rejected by its spam checker, and its
    /// object goes too; `upload::withdraw`). Any other deletion (the sweep, Synapse's media
    /// retention of old media) is none of the upload's business.
    pub fn removed(&self, p: &Path) -> Option<Entry> {
        let path = self.media_path(p)?;
        let rec = self.state.record(&path).ok()??;
        crate::upload::written_lately(&rec).then(|| (path, now_ms(), false))
    }

    pub async fn enqueue(&self, files: Vec<Entry>) {
        metrics::counter!(crate::metrics::ENQUEUED).increment(files.len() as u64);
        for (p, due, settle) in &files {
            tracing::trace!(path = %p, due, settle, "Enqueue.");
        }
        if let Err(e) = self.queue.enqueue(files).await {
            // Cannot make it durable: the next full scan finds these files again.
            tracing::error!(error = %crate::Chain(&e), "Cannot enqueue; will rescan.");
            self.signals.full_scan_later();
        }
    }

    /// Scans new directories (their files may have produced no events); returns what to enqueue.
    pub async fn scan_dirs(&self, dirs: Vec<PathBuf>) -> Vec<Entry> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let root = &me.root;
            let mut out = Vec::new();
            for dir in dirs {
                if MediaPath::from_absolute(root, &dir).is_err() {
                    continue;
                }
                super::walk_dir(root, &dir, &mut |item| {
                    if let Some(x) = me.to_enqueue(item) {
                        out.push(x);
                    }
                    true
                });
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// A scanned file that needs an upload (unless recorded with the same size and mtime).
    pub fn to_enqueue(&self, item: Item) -> Option<Entry> {
        match item {
            Item::File(f) if f.path.is_uploadable(self.include_url_cache) => {
                if let Ok(Some(rec)) = self.state.record(&f.path)
                    && rec.matches(f.snapshot.size, f.snapshot.mtime_ns)
                {
                    return None;
                }
                // Due now; the upload first checks that the file has settled (see the pool).
                Some((f.path, now_ms(), true))
            }
            Item::File(_) => None,
            Item::Problem(p) => {
                tracing::warn!(problem = %p, "Scan problem.");
                if matches!(p, Problem::Unreadable { .. }) {
                    let mut seen = self.unreadable.lock().expect("not poisoned");
                    let text = p.to_string();
                    if seen.len() < 10 && !seen.contains(&text) {
                        seen.push(text);
                    }
                    drop(seen);
                    self.unreadable();
                }
                None
            }
        }
    }

    /// A directory of the store could not be read. notify silently skips a new directory it
    /// cannot watch and never tries again, so files written there later may have no events at
    /// all: until a full scan reads everything again (then the scan stage sets up a new watch),
    /// scan every `scan_interval_when_degraded`, instead of finding them only at the next
    /// `scan_interval` (hours).
    fn unreadable(&self) {
        if self.signals.degrade(Blind::Unreadable) {
            tracing::error!(
                "Part of the media store cannot be read (see the scan problem above); it may not be watched either: scanning every scan_interval_when_degraded until a scan reads everything again (fix the permissions; a transient error such as EMFILE or ESTALE ends by itself)."
            );
        }
    }
}
