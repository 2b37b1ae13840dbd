//! The files of one aged media, their confirmation against the bucket, and their deletion.

use std::path::Path;

use super::Report;
use super::Sweeper;
use super::dense::Seen;
use crate::layout::MediaPath;
use crate::state::Record;
use crate::synapse_db::AgedMedia;
use crate::upload::digest::{self, ReadOutcome, Snapshot, Stat};
use crate::upload::s3::ObjectInfo;
use tokio_util::sync::CancellationToken;

/// Errors kept in a report, at most.
const MAX_ERRORS: usize = 20;

#[derive(Debug, Default)]
pub struct MediaOutcome {
    pub deleted: Vec<(String, u64)>,
    pub kept_not_in_bucket: u64,
    pub kept_different: u64,
    pub kept_error: u64,
    pub kept_changed: u64,
    /// Kept because the local file does not match Synapse's sha256 (a bad local copy: queued,
    /// so the upload heals it from the bucket).
    pub kept_bad_copy: u64,
    /// HEAD requests made, and files confirmed from a listing instead.
    pub heads: u64,
    pub confirmed_by_listing: u64,
    pub errors: Vec<String>,
}

impl MediaOutcome {
    /// Logged (WARN) when it is among the sweep's first [`MAX_ERRORS`] (see [`Self::add_to`]).
    pub fn error(&mut self, e: String) {
        self.errors.push(e);
    }

    pub fn add_to(self, r: &mut Report) {
        r.files_deleted += self.deleted.len() as u64;
        r.bytes_freed += self.deleted.iter().map(|d| d.1).sum::<u64>();
        let room = super::report::DELETED_LISTED.saturating_sub(r.deleted.len());
        r.deleted
            .extend(self.deleted.into_iter().take(room).map(|d| d.0));
        r.kept_not_in_bucket += self.kept_not_in_bucket;
        r.kept_different += self.kept_different;
        r.kept_error += self.kept_error;
        r.kept_changed += self.kept_changed;
        r.kept_bad_copy += self.kept_bad_copy;
        r.head_requests += self.heads;
        r.confirmed_by_listing += self.confirmed_by_listing;
        // The first errors of a sweep are logged, the rest only counted (`kept_error`, the report
        // line): with S3 down for 10 s, a sweep of a few thousand aged media wrote a WARN per media
        // (11,591 lines in a 10-minute soak).
        let room = MAX_ERRORS.saturating_sub(r.errors.len());
        for e in self.errors.into_iter().take(room) {
            tracing::warn!(error = %e, "Sweep kept a media: could not confirm it.");
            if r.errors.len() + 1 == MAX_ERRORS {
                tracing::warn!(
                    "Further media the sweep cannot confirm are counted, not logged (see the report at its end)."
                );
            }
            r.errors.push(e);
        }
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
    /// The local file does not match Synapse's sha256 of the media: never confirmed, whatever the
    /// bucket holds.
    BadCopy,
    /// No longer a regular file here.
    Gone,
    Error(String),
}

/// (original, thumbnail directory) of a media, relative to the store ([`crate::layout::MediaRef`]'s paths).
pub fn media_paths(media: &AgedMedia) -> Result<(MediaPath, MediaPath), String> {
    let m = media.media_ref();
    match (m.original(), m.thumbnail_dir()) {
        (Some(o), Some(t)) => Ok((o, t)),
        _ => Err(format!("refusing the unsafe id {m:?} from the database")),
    }
}

/// One local file of a media as found: its snapshot and digests, our record of it (any: stale
/// or for other bytes too), and whether that record must be (re)written once confirmed.
#[derive(Debug)]
pub struct Local {
    pub snapshot: Snapshot,
    pub md5: [u8; 16],
    /// Known when the record holds it or the file was read.
    pub sha256: Option<[u8; 32]>,
    pub record: Option<Record>,
    pub unrecorded: bool,
    /// Synapse's sha256 of the media, for its original.
    pub synapse: Option<[u8; 32]>,
}

/// The regular files of a media present locally (its original and its thumbnails), each with what
/// [`local`] found: `Ok(None)` when it stopped being a regular file, `Err` when it could not be read.
/// Listing, stat, record lookup and (for a file without a matching record) hashing all run in one
/// blocking task per media: with a task per file and step, thread hand-offs (wakeups and context
/// switches) were the largest share of a sweep's CPU in `perf`.
pub type Examined = Vec<(MediaPath, Result<Option<Local>, String>)>;

pub async fn examine(
    s: &Sweeper,
    media: &AgedMedia,
    cancel: &CancellationToken,
) -> Result<Examined, String> {
    let (original, thumbs) = media_paths(media)?;
    let root = s.config.media_store_path.clone();
    let state = s.state.clone();
    let synapse = media.sha256();
    let cancel = cancel.clone();
    tokio::task::spawn_blocking(move || {
        let paths = media_files(&root, original.clone(), thumbs)?;
        Ok(paths
            .into_iter()
            .map(|p| {
                // Synapse's hash is of the original; thumbnails have none.
                let hash = if p == original { synapse } else { None };
                let l = local(&state, &root, &p, hash, &cancel);
                (p, l)
            })
            .collect())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The media's files that are regular files here. Blocking.
fn media_files(
    root: &Path,
    original: MediaPath,
    thumbs: MediaPath,
) -> Result<Vec<MediaPath>, String> {
    let mut out = Vec::new();
    // A symlinked directory anywhere on the way is not followed (it may lead out of the store).
    let real = |p: &MediaPath| {
        p.parents_are_dirs(root)
            .map_err(|e| format!("cannot check {p}: {e}"))
    };
    if real(&original)? && matches!(digest::stat(&original.to_path(root)), Ok(Stat::File(_))) {
        out.push(original);
    }
    let dir = thumbs.to_path(root);
    let first_thumb = out.len();
    // symlink_metadata: a symlinked thumbnail directory is not followed.
    if real(&thumbs)? && std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
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
        // In key order: the dense sweep walks the listing forward (see `dense`).
        out[first_thumb..].sort_by(|a, b| a.as_str().cmp(b.as_str()));
    }
    Ok(out)
}

/// The file's snapshot and digests: from our record while the file still matches it (and holds
/// the SHA-256 when Synapse's hash is to be compared), else read from the file. Blocking; a
/// read stops within a chunk once `cancel` fires (the shutdown does not wait for a long hash):
/// the file is kept, with that error.
fn local(
    state: &crate::state::State,
    root: &Path,
    p: &MediaPath,
    synapse: Option<[u8; 32]>,
    cancel: &CancellationToken,
) -> Result<Option<Local>, String> {
    let abs = p.to_path(root);
    let snapshot = match digest::stat(&abs).map_err(|e| e.to_string())? {
        Stat::File(s) => s,
        _ => return Ok(None),
    };
    let record = state.record_or_none(p).map_err(|e| e.to_string())?;
    if let Some(r) = record
        && r.matches(snapshot.size, snapshot.mtime_ns)
        && (synapse.is_none() || r.sha256.is_some())
    {
        return Ok(Some(Local {
            snapshot,
            md5: r.md5,
            sha256: r.sha256,
            record,
            unrecorded: false,
            synapse,
        }));
    }
    match digest::read_and_hash(&abs, 0, None, cancel).map_err(|e| e.to_string())? {
        ReadOutcome::Hashed(h) => Ok(Some(Local {
            snapshot: h.snapshot,
            md5: h.md5,
            sha256: Some(h.sha256),
            record,
            unrecorded: true,
            synapse,
        })),
        ReadOutcome::Changed => Err("the file changed while it was read".into()),
        _ => Ok(None),
    }
}

/// A local file that does not match Synapse's hash of its media (never confirmed, whatever the
/// bucket holds: the object would have to hold the same wrong bytes to confirm them).
fn bad_copy(local: &Local) -> bool {
    local.synapse.is_some() && local.sha256 != local.synapse
}

/// The verdict for a file the bucket was seen to hold (showing `etag`): with the record to write
/// when it had none that matched, keeping a multipart ETag so the next look needs no HEAD.
fn confirmed(local: &Local, etag: Option<&str>) -> Verdict {
    let &Local {
        snapshot,
        md5,
        sha256,
        unrecorded,
        record,
        ..
    } = local;
    Verdict::Confirmed {
        snapshot,
        record: unrecorded.then(|| {
            let r = Record::new(snapshot.size, snapshot.mtime_ns, md5).with_etag(etag);
            match sha256 {
                Some(h) => r.with_sha256(h),
                None => r,
            }
        }),
    }
    .keep_etag_of(record)
}

impl Verdict {
    /// A new record of the same bytes keeps the multipart ETag the old one verified.
    fn keep_etag_of(mut self, old: Option<Record>) -> Verdict {
        if let (
            Verdict::Confirmed {
                record: Some(r), ..
            },
            Some(old),
        ) = (&mut self, old)
            && r.multipart_etag.is_none()
            && old.same_bytes(r.size, &r.md5)
        {
            r.multipart_etag = old.multipart_etag;
        }
        self
    }
}

/// The dense sweep's confirmation from a listing entry read during this sweep (see
/// [`super::dense`]): `Some` when the entry (or Synapse's hash) decides, `None` for a HEAD
/// ([`confirm`]) when it cannot: the listing is never taken for missing or different.
pub fn confirm_listed(local: &Local, seen: Option<&Seen>) -> Option<Verdict> {
    if bad_copy(local) {
        return Some(Verdict::BadCopy);
    }
    let s = seen?;
    s.confirms(local.snapshot.size, &local.md5, local.record.as_ref())
        .then(|| confirmed(local, s.object.etag.as_deref()))
}

/// Asks the bucket whether it holds this file, now (one HEAD).
pub async fn confirm(s: &Sweeper, path: &MediaPath, local: Local) -> Verdict {
    if bad_copy(&local) {
        return Verdict::BadCopy;
    }
    // The request runs as a task of its own: the SDK's work per request (signing, endpoint
    // resolution, parsing) then spreads over the runtime's workers instead of queuing on the one
    // task that polls all of the sweep's media at once.
    let (store, key) = (s.store.clone(), path.key(s.store.prefix()));
    let head = match tokio::spawn(async move { store.head(&key).await }).await {
        Ok(h) => h,
        Err(e) => return Verdict::Error(e.to_string()),
    };
    match head {
        Err(e) => Verdict::Error(crate::Chain(&e).to_string()),
        Ok(None) => Verdict::Missing,
        Ok(Some(info)) if head_confirms(&info, &local) => confirmed(&local, info.etag.as_deref()),
        Ok(Some(_)) => Verdict::Different,
    }
}

/// Whether a HEAD's answer confirms the local file: same size and our digest metadata or MD5
/// ETag, or (an object another tool uploaded in parts, adopted by `upload`) the multipart ETag our
/// record verified for these bytes.
fn head_confirms(info: &ObjectInfo, local: &Local) -> bool {
    let (size, md5) = (local.snapshot.size, &local.md5);
    info.confirms(size, md5)
        || (info.meta_md5.is_none()
            && local
                .record
                .as_ref()
                .zip(info.etag.as_deref())
                .is_some_and(|(r, e)| r.vouches_for(size, md5, info.size, e)))
}

/// Deletes each file that is still exactly what was confirmed (same size and mtime), then the
/// media's own thumbnail directory once empty; one blocking task for the whole media. Returns,
/// per file, whether it was deleted.
pub async fn delete_unchanged(
    root: &Path,
    media: &AgedMedia,
    files: Vec<(MediaPath, Snapshot)>,
) -> Vec<(MediaPath, Snapshot, std::io::Result<bool>)> {
    if files.is_empty() {
        return Vec::new();
    }
    let root = root.to_owned();
    let thumbs = media_paths(media).ok().map(|(_, t)| t);
    let asked = files.clone();
    let done = tokio::task::spawn_blocking(move || {
        let out: Vec<_> = files
            .into_iter()
            .map(|(path, snap)| {
                let r = delete_one(&root, &path, snap);
                (path, snap, r)
            })
            .collect();
        if out.iter().any(|d| matches!(d.2, Ok(true)))
            && let Some(t) = thumbs
        {
            remove_empty_dir(&root, &t);
        }
        out
    })
    .await;
    done.unwrap_or_else(|e| {
        // The task panicked: nothing is known to be deleted; report an error for every file.
        asked
            .into_iter()
            .map(|(p, snap)| (p, snap, Err(std::io::Error::other(e.to_string()))))
            .collect()
    })
}

/// Blocking.
fn delete_one(root: &Path, path: &MediaPath, confirmed: Snapshot) -> std::io::Result<bool> {
    // Checked again right before the unlink: a directory swapped for a symlink since the media's
    // files were listed must not lead the unlink out of the store.
    if !path.parents_are_dirs(root)? {
        return Ok(false);
    }
    let abs = path.to_path(root);
    match digest::stat(&abs)? {
        Stat::File(now) if now == confirmed => {
            std::fs::remove_file(&abs)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Removes the media's own thumbnail directory once empty. The shared AB/CD levels are left alone:
/// Synapse may be between its `makedirs` and `open` of another media there, and removing them then
/// would fail that upload. Every level above it must be a real directory: through a symlinked
/// thumbnail level (or top-level folder) the path names a directory outside the store. Blocking.
fn remove_empty_dir(root: &Path, rel: &MediaPath) {
    if !rel.parents_are_dirs(root).unwrap_or(false) {
        return;
    }
    let dir = rel.to_path(root);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        // Fails (and is ignored) when not empty.
        let _ = std::fs::remove_dir(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings((o, t): (MediaPath, MediaPath)) -> (String, String) {
        (o.to_string(), t.to_string())
    }

    #[test]
    fn paths_follow_synapse_layout_and_refuse_escapes() {
        let local = AgedMedia::Local {
            media_id: "abcdefghij".into(),
            sha256: None,
        };
        assert_eq!(
            strings(media_paths(&local).unwrap()),
            (
                "local_content/ab/cd/efghij".into(),
                "local_thumbnails/ab/cd/efghij".into()
            )
        );
        let remote = AgedMedia::Remote {
            origin: "matrix.org".into(),
            media_id: "x".into(),
            filesystem_id: "QWERTYuiop".into(),
            sha256: None,
        };
        assert_eq!(
            strings(media_paths(&remote).unwrap()),
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
                sha256: None,
            };
            assert!(media_paths(&m).is_err(), "{origin} {fid}");
        }
        assert!(
            media_paths(&AgedMedia::Local {
                media_id: "../../../etc/passwd".into(),
                sha256: None,
            })
            .is_err()
        );
        // Multi-byte characters are split where Synapse splits them (by character), not panicked on.
        let local = |id: &str| {
            media_paths(&AgedMedia::Local {
                media_id: id.into(),
                sha256: None,
            })
            .map(strings)
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
