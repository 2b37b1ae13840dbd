//! A file that Synapse removed while we were uploading it (issue 22 item 8).
//!
//! Synapse writes a new media's file, closes it, *then* runs its spam checker and, if the checker
//! rejects the media, deletes the file and never inserts its database row
//! (`MediaStorage.store_into_file`). The pool holds every new file for `upload.hold_after_close`
//! before its PUT, which covers checkers that answer within that time. A slower checker can
//! reject a file while its PUT is in flight: the object then holds media Synapse refused.
//!
//! Right after such a PUT the upload looks at the file again; when it is gone, this asks Synapse's
//! database whether the media has a row (original or thumbnail). No row and no file: nothing of
//! Synapse's can ever read that object (Synapse looks up the row first), so it is deleted and no
//! record is kept. Why this is safe without the prune job's grace period: the grace exists because
//! a new media's file is on disk before its row; here the file is gone, and Synapse inserts the
//! row only after a file it kept (`create_or_update_content`, `_download_remote_file`). An
//! asynchronous upload (`create_media_id`) has its row first: kept. A file gone for any other
//! reason (an admin's `mv` of the store, another tool's cleanup) has its row: kept. Without a
//! database, or when it does not answer, the object is kept and recorded as before; the prune job
//! (`prune.enabled`) or `audit --delete-orphans` removes it later.

use std::path::Path;
use std::time::Duration;

use crate::layout::{MediaPath, MediaRef};
use crate::state::{Record, now_ms};

use super::{Outcome, Uploader};

/// A file we uploaded that is deleted within this time of its writing is looked at again (the
/// watch enqueues its deletion): a spam checker slower than the hold and the PUT rejects it
/// after its record. Later deletions (the sweep, Synapse's retention of old media) are not.
pub const FRESH_DELETION: Duration = Duration::from_secs(600);

/// Whether the file `record` verified was written within [`FRESH_DELETION`] of now.
pub fn written_lately(record: &Record) -> bool {
    let written_ms = (record.mtime_ns / 1_000_000).max(0) as u64;
    now_ms().saturating_sub(written_ms) < FRESH_DELETION.as_millis() as u64
}

/// What became of an object whose file vanished during its upload.
#[derive(Debug, PartialEq, Eq)]
pub enum Vanished {
    /// Its media has no database row: the object was deleted.
    Withdrawn,
    /// Its media has a row (or we cannot tell): the object stays and is recorded.
    Kept,
}

impl Uploader {
    /// The file of `path` is gone when its upload starts. Written within [`FRESH_DELETION`] and
    /// recorded (we uploaded it, then Synapse deleted it): its object is withdrawn when its media
    /// has no row. Otherwise nothing to do.
    pub(super) async fn vanished(&self, path: &MediaPath) -> Outcome {
        let fresh = self
            .state
            .record_or_none(path)
            .ok()
            .flatten()
            .is_some_and(|r| written_lately(&r));
        if fresh && self.withdraw_vanished(path).await == Vanished::Withdrawn {
            Outcome::Withdrawn
        } else {
            Outcome::Vanished
        }
    }

    /// The file of `path` vanished right after its PUT: delete the object if its media has no
    /// row in Synapse's database (see the module comment).
    pub async fn withdraw_vanished(&self, path: &MediaPath) -> Vanished {
        let (Some(db), Some(media)) = (&self.arbiter, path.media()) else {
            return Vanished::Kept;
        };
        // Synapse removes the file, never its directory: a file gone with its directory is the
        // store unmounted, replaced or moved away (the new store may not hold it yet, its row may
        // come later), not a rejection.
        let parent = path.to_path(&self.root);
        if !parent.parent().is_some_and(Path::is_dir) {
            return Vanished::Kept;
        }
        let present = match &media {
            MediaRef::Local(id) => db
                .local_media_present(std::slice::from_ref(id))
                .await
                .map(|s| !s.is_empty()),
            MediaRef::Remote { origin, fs_id } => db
                .remote_media_present(std::slice::from_ref(origin), std::slice::from_ref(fs_id))
                .await
                .map(|s| !s.is_empty()),
        };
        match present {
            Ok(true) => Vanished::Kept,
            Ok(false) => match self.store.delete_media(path).await {
                Ok(()) => {
                    metrics::counter!(crate::metrics::WITHDRAWN).increment(1);
                    tracing::info!(path = %path, "Synapse removed this file during its upload and has no database row for its media (its spam checker rejected it?): deleted the object.");
                    Vanished::Withdrawn
                }
                Err(e) => {
                    tracing::warn!(path = %path, error = %crate::Chain(&e), "Synapse removed this file during its upload and has no row for it, but deleting the object failed; the prune job or `audit --delete-orphans` removes it.");
                    Vanished::Kept
                }
            },
            Err(e) => {
                tracing::warn!(path = %path, error = %crate::Chain(&e), "This file vanished during its upload and Synapse's database did not answer; keeping the object (the prune job or `audit --delete-orphans` removes it if it is an orphan).");
                Vanished::Kept
            }
        }
    }
}
