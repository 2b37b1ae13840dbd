//! The files of one aged media, their confirmation against the bucket, and their deletion.

use std::path::Path;

use super::Report;
use super::Sweeper;
use super::db::AgedMedia;
use crate::layout::{self, MediaPath};
use crate::state::Record;
use crate::upload::digest::{self, ReadOutcome, Snapshot, Stat};

/// Errors kept in a report, at most.
const MAX_ERRORS: usize = 20;

#[derive(Debug, Default)]
pub struct MediaOutcome {
    pub deleted: Vec<(String, u64)>,
    pub kept_not_in_bucket: u64,
    pub kept_different: u64,
    pub kept_error: u64,
    pub kept_changed: u64,
    pub errors: Vec<String>,
}

impl MediaOutcome {
    pub fn error(&mut self, e: String) {
        tracing::warn!(error = %e, "Sweep kept a media: could not confirm it.");
        self.errors.push(e);
    }

    pub fn add_to(self, r: &mut Report) {
        r.files_deleted += self.deleted.len() as u64;
        r.bytes_freed += self.deleted.iter().map(|d| d.1).sum::<u64>();
        r.deleted.extend(self.deleted.into_iter().map(|d| d.0));
        r.kept_not_in_bucket += self.kept_not_in_bucket;
        r.kept_different += self.kept_different;
        r.kept_error += self.kept_error;
        r.kept_changed += self.kept_changed;
        let room = MAX_ERRORS.saturating_sub(r.errors.len());
        r.errors.extend(self.errors.into_iter().take(room));
    }
}

/// What the bucket says about one local file.
#[derive(Debug)]
pub enum Verdict {
    /// Same size and digest in the bucket. `record` is set when it was not recorded yet.
    Confirmed {
        snapshot: Snapshot,
        record: Option<Record>,
    },
    Missing,
    Different,
    /// No longer a regular file here.
    Gone,
    Error(String),
}

/// Synapse's ids become path components: refuse anything that could step out of its folder.
fn safe_component(s: &str) -> Result<&str, String> {
    let ok = !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(char::is_control);
    if ok {
        Ok(s)
    } else {
        Err(format!("refusing the unsafe id {s:?} from the database"))
    }
}

/// `AB/CD/REST` of an id, split by characters as Synapse does ([`layout::split_id`]).
fn split(id: &str) -> Result<String, String> {
    let (a, b, c) = layout::split_id(id)
        .ok_or_else(|| format!("refusing the unsafe id {id:?} from the database"))?;
    Ok(format!("{a}/{b}/{c}"))
}

/// (original, thumbnail directory) of a media, relative to the store.
pub fn media_paths(media: &AgedMedia) -> Result<(String, String), String> {
    match media {
        AgedMedia::Local { media_id } => {
            let dirs = split(media_id)?;
            Ok((
                format!("local_content/{dirs}"),
                format!("local_thumbnails/{dirs}"),
            ))
        }
        AgedMedia::Remote {
            origin,
            filesystem_id,
            ..
        } => {
            let origin = safe_component(origin)?;
            let dirs = split(filesystem_id)?;
            Ok((
                format!("remote_content/{origin}/{dirs}"),
                format!("remote_thumbnail/{origin}/{dirs}"),
            ))
        }
    }
}

/// The regular files of a media present locally: its original and its thumbnails.
pub async fn media_files(root: &Path, media: &AgedMedia) -> Result<Vec<MediaPath>, String> {
    let (original, thumbs) = media_paths(media)?;
    let original = MediaPath::parse(&original).map_err(|e| e.to_string())?;
    let thumbs = MediaPath::parse(&thumbs).map_err(|e| e.to_string())?;
    let root = root.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        // A symlinked directory anywhere on the way is not followed (it may lead out of the store).
        let real = |p: &MediaPath| {
            p.parents_are_dirs(&root)
                .map_err(|e| format!("cannot check {p}: {e}"))
        };
        if real(&original)? && matches!(digest::stat(&original.to_path(&root)), Ok(Stat::File(_))) {
            out.push(original);
        }
        let dir = thumbs.to_path(&root);
        // symlink_metadata: a symlinked thumbnail directory is not followed.
        if real(&thumbs)? && std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if let Ok(p) = MediaPath::parse(&format!("{thumbs}/{name}")) {
                        out.push(p);
                    }
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Asks the bucket whether it holds this file, now.
pub async fn confirm(s: &Sweeper, path: &MediaPath) -> Verdict {
    let abs = path.to_path(&s.config.media_store_path);
    let state = s.state.clone();
    let p = path.clone();
    // The digest: from our record while the file still matches it, else read from the file.
    let local = tokio::task::spawn_blocking(
        move || -> Result<Option<(Snapshot, [u8; 16], bool)>, String> {
            let snap = match digest::stat(&abs).map_err(|e| e.to_string())? {
                Stat::File(s) => s,
                _ => return Ok(None),
            };
            if let Some(r) = state.record(&p).map_err(|e| e.to_string())?
                && r.matches(snap.size, snap.mtime_ns)
            {
                return Ok(Some((snap, r.md5, false)));
            }
            match digest::read_and_hash(&abs, 0, None).map_err(|e| e.to_string())? {
                ReadOutcome::Hashed(h) => Ok(Some((h.snapshot, h.md5, true))),
                ReadOutcome::Changed => Err("the file changed while it was read".into()),
                _ => Ok(None),
            }
        },
    )
    .await;
    let (snapshot, md5, unrecorded) = match local {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return Verdict::Gone,
        Ok(Err(e)) => return Verdict::Error(e),
        Err(e) => return Verdict::Error(e.to_string()),
    };
    match s.store.head(&path.key(s.store.prefix())).await {
        Err(e) => Verdict::Error(crate::Chain(&e).to_string()),
        Ok(None) => Verdict::Missing,
        Ok(Some(info)) if info.confirms(snapshot.size, &md5) => Verdict::Confirmed {
            snapshot,
            record: unrecorded.then(|| Record::new(snapshot.size, snapshot.mtime_ns, md5)),
        },
        Ok(Some(_)) => Verdict::Different,
    }
}

/// Deletes the file if it is still exactly what was confirmed (same size and mtime).
pub async fn delete_if_unchanged(
    root: &Path,
    path: &MediaPath,
    confirmed: Snapshot,
) -> std::io::Result<bool> {
    let abs = path.to_path(root);
    let (root, path) = (root.to_owned(), path.clone());
    tokio::task::spawn_blocking(move || {
        // Checked again right before the unlink: a directory swapped for a symlink since the media's
        // files were listed must not lead the unlink out of the store.
        if !path.parents_are_dirs(&root)? {
            return Ok(false);
        }
        match digest::stat(&abs)? {
            Stat::File(now) if now == confirmed => {
                std::fs::remove_file(&abs)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Removes the media's own thumbnail directory once empty. The shared AB/CD levels are left alone:
/// Synapse may be between its `makedirs` and `open` of another media there, and removing them then
/// would fail that upload.
pub async fn remove_empty_dirs(root: &Path, media: &AgedMedia) {
    let Ok((_, thumbs)) = media_paths(media) else {
        return;
    };
    let Ok(thumbs) = MediaPath::parse(&thumbs) else {
        return;
    };
    let dir = thumbs.to_path(root);
    let _ = tokio::task::spawn_blocking(move || {
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            // Fails (and is ignored) when not empty.
            let _ = std::fs::remove_dir(&dir);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_synapse_layout_and_refuse_escapes() {
        let local = AgedMedia::Local {
            media_id: "abcdefghij".into(),
        };
        assert_eq!(
            media_paths(&local).unwrap(),
            (
                "local_content/ab/cd/efghij".into(),
                "local_thumbnails/ab/cd/efghij".into()
            )
        );
        let remote = AgedMedia::Remote {
            origin: "matrix.org".into(),
            media_id: "x".into(),
            filesystem_id: "QWERTYuiop".into(),
        };
        assert_eq!(
            media_paths(&remote).unwrap(),
            (
                "remote_content/matrix.org/QW/ER/TYuiop".into(),
                "remote_thumbnail/matrix.org/QW/ER/TYuiop".into()
            )
        );
        for (origin, fid) in [
            ("../../etc", "abcdefgh"),
            ("..", "abcdefgh"),
            ("a/b", "abcdefgh"),
            ("ok.org", "ab/../../x"),
            ("ok.org", "abc"),
        ] {
            let m = AgedMedia::Remote {
                origin: origin.into(),
                media_id: "m".into(),
                filesystem_id: fid.into(),
            };
            assert!(media_paths(&m).is_err(), "{origin} {fid}");
        }
        assert!(
            media_paths(&AgedMedia::Local {
                media_id: "../../../etc/passwd".into()
            })
            .is_err()
        );
        // Multi-byte characters are split where Synapse splits them (by character), not panicked on.
        let local = |id: &str| {
            media_paths(&AgedMedia::Local {
                media_id: id.into(),
            })
        };
        assert_eq!(
            local("éabcdef").unwrap().0,
            "local_content/éa/bc/def".to_owned()
        );
        assert_eq!(
            local("日本語のファイル").unwrap().1,
            "local_thumbnails/日本/語の/ファイル".to_owned()
        );
        assert!(
            local("日本語の").is_err(),
            "too short: the last level would be empty"
        );
    }
}
