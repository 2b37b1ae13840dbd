//! `forget`: the prompt path of a legal removal. Once the admin has deleted a media through
//! Synapse (its row and local files are gone), its original and thumbnails leave the bucket at
//! once, with no grace period.
//!
//! Refused, for that media, while anything says it is alive: a row in Synapse's database (the
//! media, or a thumbnail of it), or a local file (Synapse deletes them with the row; a file left
//! would be uploaded again). The row is asked twice: before anything is listed, and again right
//! before the DELETEs. Keys come from validated paths under our prefix only; `url_cache` and
//! anything outside the prefix cannot be named.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{AuditError, Auditor};
use crate::layout::{MediaPath, MediaRef};
use crate::state::Op;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForgetItem {
    /// As given on the command line.
    pub target: String,
    /// Relative paths of the objects removed (or that would be).
    pub removed: Vec<String>,
    /// Why nothing was removed for this media.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub items: Vec<ForgetItem>,
}

impl ForgetReport {
    pub fn refused(&self) -> usize {
        self.items.iter().filter(|i| i.refused.is_some()).count()
    }
}

impl fmt::Display for ForgetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for i in &self.items {
            match &i.refused {
                Some(why) => writeln!(f, "{}: refused: {why}", i.target)?,
                None if i.removed.is_empty() => {
                    writeln!(f, "{}: nothing in the bucket (already gone)", i.target)?
                }
                None => {
                    writeln!(f, "{}: {verb} {} objects", i.target, i.removed.len())?;
                    for p in &i.removed {
                        writeln!(f, "    {p}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A target as the media it names: `mxc://server/media_id` (a local media of this homeserver:
/// Synapse's admin API deletes local media), or the path of an original as `audit` prints it
/// (`remote_content/ORIGIN/AB/CD/REST`: a remote media's key is named by a filesystem id only its
/// row knew).
fn parse(target: &str) -> Result<(MediaRef, Option<(String, String)>), String> {
    if let Some(rest) = target.strip_prefix("mxc://") {
        let (server, id) = rest
            .split_once('/')
            .filter(|(s, id)| !s.is_empty() && !id.is_empty())
            .ok_or("not of the form mxc://server/media_id")?;
        let m = MediaRef::Local(id.to_owned());
        m.original()
            .ok_or("the media id cannot name a file in the store")?;
        return Ok((m, Some((server.to_owned(), id.to_owned()))));
    }
    let p = MediaPath::parse(target).map_err(|e| e.to_string())?;
    match p.media() {
        Some(m) if p.is_original() => Ok((m, None)),
        _ => Err(
            "neither mxc://server/media_id nor the path of an original (local_content/AB/CD/REST, remote_content/ORIGIN/AB/CD/REST)"
                .into(),
        ),
    }
}

pub async fn forget(
    a: &Auditor<'_>,
    targets: &[String],
    dry_run: bool,
) -> Result<ForgetReport, AuditError> {
    let mut report = ForgetReport {
        dry_run,
        items: Vec::new(),
    };
    for t in targets {
        let mut item = ForgetItem {
            target: t.clone(),
            ..ForgetItem::default()
        };
        match parse(t) {
            Err(why) => item.refused = Some(why),
            Ok((media, mxc)) => match one(a, &media, mxc, dry_run).await? {
                Ok(removed) => item.removed = removed,
                Err(why) => item.refused = Some(why),
            },
        }
        report.items.push(item);
    }
    Ok(report)
}

/// `forget` without a running daemon: opens the state itself.
pub async fn forget_standalone(
    config: &crate::config::Config,
    targets: &[String],
    dry_run: bool,
) -> Result<ForgetReport, AuditError> {
    let db = crate::synapse_db::Db::new(super::db_config(config)?)?;
    let h = crate::state::StateHandle::open(&config.state_dir)?;
    let queue = crate::queue::Queue::open(&h.state, h.committer.clone(), &config.upload)?;
    let store =
        crate::upload::s3::ObjectStore::new(&config.s3, config.upload.multipart_part_size).await;
    let a = Auditor {
        config,
        db: &db,
        store: &store,
        state: &h.state,
        committer: &h.committer,
        queue: &queue,
    };
    let r = forget(&a, targets, dry_run).await;
    drop(queue);
    h.close().await;
    r
}

/// Whether the database has a row for `media` right now.
async fn has_row(a: &Auditor<'_>, media: &MediaRef) -> Result<bool, AuditError> {
    Ok(match media {
        MediaRef::Local(id) => !a
            .db
            .local_media_present(std::slice::from_ref(id))
            .await?
            .is_empty(),
        MediaRef::Remote { origin, fs_id } => !a
            .db
            .remote_media_present(std::slice::from_ref(origin), std::slice::from_ref(fs_id))
            .await?
            .is_empty(),
    })
}

/// `Ok(Ok(paths removed))`, or `Ok(Err(why refused))`.
async fn one(
    a: &Auditor<'_>,
    media: &MediaRef,
    mxc: Option<(String, String)>,
    dry_run: bool,
) -> Result<Result<Vec<String>, String>, AuditError> {
    if has_row(a, media).await? {
        return Ok(Err(
            "the media still has a row in Synapse's database: delete it through Synapse first (admin API), then forget it".into(),
        ));
    }
    if let Some((server, id)) = &mxc
        && a.db.remote_media_exists(server, id).await?
    {
        return Ok(Err(format!(
            "this is a cached remote media of {server} (it has a row): purge it through Synapse first, then forget it by the path `audit` printed (remote_content/{server}/…)"
        )));
    }
    let original = media.original().expect("checked when parsed");
    let thumbs = media.thumbnail_dir().expect("checked when parsed");
    let root = &a.config.media_store_path;
    let local_thumbs = std::fs::read_dir(thumbs.to_path(root))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if std::fs::symlink_metadata(original.to_path(root)).is_ok() || local_thumbs {
        return Ok(Err(format!(
            "local files of this media are still in the media store ({original} or {thumbs}/): Synapse deletes them with the media; remove them first, or they are uploaded again"
        )));
    }
    let prefix = a.store.prefix().to_owned();
    let original_key = original.key(&prefix);
    let mut paths = Vec::new();
    for o in a.store.list_under(original.as_str()).await? {
        if o.key == original_key {
            paths.push(original.clone());
        }
    }
    for o in a.store.list_under(&format!("{thumbs}/")).await? {
        if let Some(p) = o
            .key
            .strip_prefix(&prefix)
            .and_then(|k| MediaPath::parse(k).ok())
        {
            paths.push(p);
        }
    }
    // Right before the DELETEs: the media may have come back (a re-upload of the same id cannot
    // happen for local media, but a restore of the database can).
    if has_row(a, media).await? {
        return Ok(Err(
            "the media got a row in Synapse's database again; nothing removed".into(),
        ));
    }
    let mut ops = Vec::new();
    for p in &paths {
        if !dry_run {
            a.store.delete_media(p).await?;
            tracing::info!(path = %p, "Removed a forgotten media's object.");
            ops.push(Op::Forget(p.clone()));
            ops.push(Op::OrphanClear(p.clone()));
        }
    }
    a.committer.apply(ops).await?;
    Ok(Ok(paths.iter().map(|p| p.to_string()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_mxc_uris_or_paths_of_originals() {
        let (m, mxc) = parse("mxc://example.com/abcdefgh").unwrap();
        assert_eq!(m, MediaRef::Local("abcdefgh".into()));
        assert_eq!(mxc, Some(("example.com".into(), "abcdefgh".into())));
        let (m, mxc) = parse("remote_content/a.org/ab/cd/efgh").unwrap();
        assert_eq!(
            m,
            MediaRef::Remote {
                origin: "a.org".into(),
                fs_id: "abcdefgh".into()
            }
        );
        assert_eq!(mxc, None);
        for bad in [
            "mxc://example.com/",
            "mxc:///abcdef",
            "mxc://example.com/ab/../cdef",
            "mxc://example.com/a",
            "local_thumbnails/ab/cd/efgh/32-32-image-png-crop",
            "url_cache/ab/cd/efgh",
            "/etc/passwd",
            "../x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
