//! `audit --delete-orphans`: deletes orphaned objects once they qualify.
//!
//! An object is deleted only if all of these hold, the last two checked right before the DELETE:
//! an earlier audit recorded it orphaned at least `--older-than` ago and this audit, which
//! completed without error, still found no database row for its media; the object itself is at
//! least that old; no local file exists at its path; and a fresh query finds no row for its media
//! (it may have been re-fetched or re-uploaded meanwhile). Keys come from validated paths, so only
//! keys under our prefix are ever deleted.

use std::collections::HashSet;

use tokio_util::sync::CancellationToken;

use super::{AuditError, Auditor, Report};
use crate::layout::{MediaPath, MediaRef};
use crate::state::Op;

pub(super) async fn prune(
    a: &Auditor<'_>,
    report: &mut Report,
    candidates: Vec<(MediaPath, u64)>,
    dry_run: bool,
    examples: usize,
    cancel: &CancellationToken,
) -> Result<(), AuditError> {
    // Chunks of 100: the database re-check of a chunk is at most 100 DELETEs old at its last one
    // (at 1000, over a slow link, it was minutes old).
    for chunk in candidates.chunks(100) {
        if cancel.is_cancelled() {
            return Err(AuditError::Cancelled);
        }
        let media: Vec<Option<MediaRef>> = chunk.iter().map(|(p, _)| p.media()).collect();
        let (mut local, mut origins, mut fs_ids) = (Vec::new(), Vec::new(), Vec::new());
        for m in media.iter().flatten() {
            match m {
                MediaRef::Local(id) => local.push(id.clone()),
                MediaRef::Remote { origin, fs_id } => {
                    origins.push(origin.clone());
                    fs_ids.push(fs_id.clone());
                }
            }
        }
        let present_local = if local.is_empty() {
            HashSet::new()
        } else {
            a.db.local_media_present(&local).await?
        };
        let present_remote = if origins.is_empty() {
            HashSet::new()
        } else {
            a.db.remote_media_present(&origins, &fs_ids).await?
        };
        let mut ops = Vec::new();
        for ((path, size), m) in chunk.iter().zip(media) {
            let present = match &m {
                None => {
                    report.orphans_waiting += 1;
                    continue;
                }
                Some(MediaRef::Local(id)) => present_local.contains(id),
                Some(MediaRef::Remote { origin, fs_id }) => {
                    present_remote.contains(&(origin.clone(), fs_id.clone()))
                }
            };
            if present {
                report.orphans_reappeared += 1;
                ops.push(Op::OrphanClear(path.clone()));
                continue;
            }
            if std::fs::symlink_metadata(path.to_path(&a.config.media_store_path)).is_ok() {
                report.orphans_waiting += 1;
                continue;
            }
            // Before each DELETE, not only each chunk: a lost lock (another instance may hold it
            // by now) or a shutdown stops the deletions at once. What was deleted is committed.
            if cancel.is_cancelled() {
                a.committer.apply(ops).await?;
                return Err(AuditError::Cancelled);
            }
            if !dry_run {
                a.store.delete_media(path).await?;
                tracing::info!(path = %path, bytes = size, "Deleted an orphaned object.");
                // The record would claim an object that no longer exists.
                ops.push(Op::Forget(path.clone()));
                ops.push(Op::OrphanClear(path.clone()));
            }
            report
                .orphans_deleted
                .add(path.as_str(), *size, "", examples);
        }
        a.committer.apply(ops).await?;
    }
    Ok(())
}
