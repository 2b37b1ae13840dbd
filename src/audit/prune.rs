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
use crate::layout::MediaPath;
use crate::state::Op;

/// Whose file a path is, as the database names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Media {
    Local(String),
    Remote { origin: String, fs_id: String },
}

/// Inverts Synapse's layout (`AB/CD/REST` of an id). `None` for anything not laid out exactly so:
/// such an object is never deleted.
fn media_of(path: &MediaPath) -> Option<Media> {
    let parts: Vec<&str> = path.as_str().split('/').collect();
    let id = |ab: &str, cd: &str, rest: &str| {
        (ab.chars().count() == 2 && cd.chars().count() == 2).then(|| format!("{ab}{cd}{rest}"))
    };
    match (parts[0], parts.len()) {
        ("local_content", 4) | ("local_thumbnails", 5) => {
            id(parts[1], parts[2], parts[3]).map(Media::Local)
        }
        ("remote_content", 5) | ("remote_thumbnail", 6) => {
            id(parts[2], parts[3], parts[4]).map(|fs_id| Media::Remote {
                origin: parts[1].to_owned(),
                fs_id,
            })
        }
        _ => None,
    }
}

pub(super) async fn prune(
    a: &Auditor<'_>,
    report: &mut Report,
    candidates: Vec<(MediaPath, u64)>,
    dry_run: bool,
    examples: usize,
    cancel: &CancellationToken,
) -> Result<(), AuditError> {
    for chunk in candidates.chunks(1000) {
        if cancel.is_cancelled() {
            return Err(AuditError::Cancelled);
        }
        let media: Vec<Option<Media>> = chunk.iter().map(|(p, _)| media_of(p)).collect();
        let (mut local, mut origins, mut fs_ids) = (Vec::new(), Vec::new(), Vec::new());
        for m in media.iter().flatten() {
            match m {
                Media::Local(id) => local.push(id.clone()),
                Media::Remote { origin, fs_id } => {
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
                Some(Media::Local(id)) => present_local.contains(id),
                Some(Media::Remote { origin, fs_id }) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn of(p: &str) -> Option<Media> {
        media_of(&MediaPath::parse(p).unwrap())
    }

    #[test]
    fn inverts_synapse_layout() {
        assert_eq!(
            of("local_content/ab/cd/efgh"),
            Some(Media::Local("abcdefgh".into()))
        );
        assert_eq!(
            of("local_thumbnails/ab/cd/efgh/32-32-image-png-crop"),
            Some(Media::Local("abcdefgh".into()))
        );
        assert_eq!(
            of("remote_thumbnail/example.org/ab/cd/ef/1-1-image-png-scale"),
            Some(Media::Remote {
                origin: "example.org".into(),
                fs_id: "abcdef".into()
            })
        );
        assert_eq!(of("local_content/abc/d/efgh"), None);
        assert_eq!(of("local_content/ab/cd/ef/gh"), None);
        assert_eq!(of("remote_content/x/ab/cd"), None);
    }
}
