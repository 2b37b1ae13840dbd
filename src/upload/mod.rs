//! Getting one file into the bucket, verified, and recording it.
//!
//! The rule (DESIGN.md invariant 8, [`verdict`]): until a file's first verified upload the local
//! file is the truth; after it, the verified object is. Synapse media are immutable and Synapse
//! rewrites local copies without atomicity, so a local file that differs from a verified object is
//! a bad local copy: it is healed from the bucket (or reported), never uploaded over the object.
//! Where Synapse's database holds the media's SHA-256, that hash decides which bytes are right.
//!
//! For each file, in this order:
//! 1. open it (no symlink following) and snapshot (size, mtime) from the open descriptor; a
//!    vanished or non-regular file is not an error.
//! 2. a record with the same size and mtime means it is already verified: done, no request.
//! 3. read it once: MD5 and SHA-256, and the body or per-part MD5s.
//!    Steps 1–3 run in one blocking task: one thread hand-off per file instead of three (the
//!    hand-offs' futex wake-ups were the largest system-call count of a backfill).
//! 4. HEAD the key, and decide ([`verdict::decide`]): no object → PUT; the same bytes → record
//!    (uploaded by us before a crash, by `s3_media_upload`, or an identical rewrite by Synapse);
//!    other bytes → Synapse's hash if the database has one, else our record: heal the bad local
//!    copy, replace our own unverified object, or report a conflict and keep both. The HEAD is
//!    skipped only in a backfill into a prefix that was empty when it started, for a file with no
//!    record: every other upload may meet a verified object (a file Synapse wrote back after a
//!    sweep is "new" to the watcher too).
//! 5. PUT with `Content-MD5` (multipart with per-part `Content-MD5` above the threshold, then a HEAD
//!    to confirm size and digest). The provider rejects a body that differs from the digest. The
//!    body is streamed from the descriptor opened in step 1, never from the path opened again.
//! 6. stat again: if size or mtime moved, the file changed during the upload: go back to 1 (the
//!    object is ours and unverified, so the next round may replace it).
//! 7. return the record (size and mtime from step 1, digests); the caller commits it (with its
//!    queue change, in one transaction). Only then does the file count as uploaded.
//!
//! A crash anywhere before the commit leaves no record, so the file is looked at again; step 4 then avoids a
//! second PUT. A heal is crash-safe on its own ([`heal`]). Nothing here retries a failed request:
//! the SDK retries a request (`s3.max_attempts`), and whoever called us decides what to do with the
//! error (`UploadError::kind`).

pub mod digest;
pub mod heal;
pub mod limiter;
pub mod pool;
mod prepare;
pub mod s3;
mod s3_compat;
mod s3_error;
pub mod verdict;
mod withdraw;
pub use withdraw::{FRESH_DELETION, written_lately};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use self::digest::{Content, Stat};
use self::heal::{HealError, Healed};
use self::prepare::{Prepared, prepare, read_error};
use self::s3::{ErrorKind, ObjectInfo, ObjectStore, S3Error};
use self::verdict::{Decision, Expect, Local};
use crate::layout::MediaPath;
use crate::metrics as m;
use crate::state::{Problem, ProblemKind, Record, State, StateError, now_ms};
use crate::synapse_db::{Db, DbError};

/// How many times a file that keeps changing under us is re-read before giving up for now.
const MAX_ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// PUT and verified; `record` is to be committed.
    Uploaded { record: Record },
    /// Already in the bucket with the same size and digest; `record` is to be committed.
    Adopted { record: Record },
    /// The local file was a bad copy of its verified object and now holds the object's bytes;
    /// `record` (of the healed file) is to be committed.
    Healed { record: Record },
    /// Recorded before with the same size and mtime: nothing to do.
    Unchanged,
    /// The file disappeared (e.g. Synapse's spam checker deleted it): nothing to do.
    Vanished,
    /// The file we uploaded a moment ago was deleted and its media has no database row: its
    /// object was deleted, its record is to be forgotten (`withdraw`).
    Withdrawn,
    /// Not a regular file (symlink, FIFO, …): never uploaded.
    NotRegular,
}

impl Outcome {
    /// The record to commit, if any.
    pub fn record(&self) -> Option<Record> {
        match self {
            Outcome::Uploaded { record }
            | Outcome::Adopted { record }
            | Outcome::Healed { record } => Some(*record),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(
        "{path} kept changing during {MAX_ROUNDS} upload attempts; it will be uploaded once it settles"
    )]
    Unstable { path: MediaPath },
    #[error("the upload of {path} could not be verified: {detail}")]
    Unverified { path: MediaPath, detail: String },
    #[error(
        "bad local copy {path}: {detail}; the verified object is kept (healing is off: upload.heal_bad_local_copies)"
    )]
    BadCopy { path: MediaPath, detail: String },
    #[error(
        "conflict at {path}: {detail}; both are kept (see the README, \"When the local file and the object differ\")"
    )]
    Conflict { path: MediaPath, detail: String },
    #[error("cannot heal the bad local copy {path} yet: {detail}")]
    Healing { path: MediaPath, detail: String },
    #[error("cannot ask Synapse's database which copy of {path} is right")]
    Arbiter {
        path: MediaPath,
        #[source]
        source: DbError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the blocking reader task failed")]
    Join(#[from] tokio::task::JoinError),
    /// Stopped by [`Uploader::abandon`] (the shutdown's grace is over): not a failure; the file
    /// stays queued and is looked at again at the next start.
    #[error("cancelled: shutting down; the file stays queued")]
    Cancelled,
}

impl UploadError {
    /// Transient errors are worth retrying soon; permanent ones need the operator.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UploadError::S3(e) => e.kind,
            UploadError::Unstable { .. }
            | UploadError::Unverified { .. }
            | UploadError::Healing { .. }
            | UploadError::Arbiter { .. }
            | UploadError::Join(_)
            | UploadError::Cancelled => ErrorKind::Transient,
            // Out of file descriptors (ours or the system's) passes: not the file's fault.
            UploadError::Read { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
            {
                ErrorKind::Transient
            }
            // EACCES and friends need an operator; the state database failing is serious too;
            // a conflict or an unhealed bad copy waits for the operator (retried now and then,
            // so a resolved one clears by itself).
            UploadError::Read { .. }
            | UploadError::State(_)
            | UploadError::BadCopy { .. }
            | UploadError::Conflict { .. } => ErrorKind::Permanent,
        }
    }

    /// The copy problem this error is, for `status` and `audit`.
    pub fn problem(&self) -> Option<Problem> {
        let (kind, detail) = match self {
            UploadError::BadCopy { detail, .. } => (ProblemKind::BadLocalCopy, detail),
            UploadError::Conflict { detail, .. } => (ProblemKind::Conflict, detail),
            _ => return None,
        };
        Some(Problem {
            kind,
            detail: detail.clone(),
            seen_at_ms: now_ms(),
        })
    }

    /// Errors that will fail every other file the same way (credentials, bucket, storage class).
    pub fn is_fatal_for_run(&self) -> bool {
        match self {
            UploadError::S3(e) => {
                e.status == Some(403)
                    || matches!(
                        e.code.as_deref(),
                        Some(
                            "NoSuchBucket"
                                | "InvalidAccessKeyId"
                                | "SignatureDoesNotMatch"
                                | "InvalidStorageClass"
                        )
                    )
            }
            UploadError::State(_) => true,
            _ => false,
        }
    }
}

pub struct Uploader {
    root: PathBuf,
    store: Arc<ObjectStore>,
    state: State,
    multipart_threshold: u64,
    part_size: u64,
    /// The prefix was empty when the run started: nothing can be adopted, so the HEAD before each
    /// PUT of a file we never verified is skipped (a concurrent writer at worst causes a duplicate
    /// PUT of the same bytes).
    assume_absent: bool,
    /// Synapse's database, the arbiter of which bytes are right where it holds a media's hash.
    arbiter: Option<Arc<Db>>,
    /// Heal bad local copies (`Some(settle)`: not while open for writing, or younger than
    /// `settle` where leases are unavailable), or only report them (`None`).
    heal: Option<Duration>,
    /// The blocking tasks (open, read, hash, stat) of the uploads, cancellable and tracked.
    reads: digest::Reads,
}

impl Uploader {
    pub fn new(
        root: PathBuf,
        store: Arc<ObjectStore>,
        state: State,
        multipart_threshold: u64,
        part_size: u64,
    ) -> Self {
        Uploader {
            root,
            store,
            state,
            multipart_threshold,
            part_size,
            assume_absent: false,
            arbiter: None,
            heal: Some(Duration::from_secs(2)),
            reads: digest::Reads::default(),
        }
    }

    /// The end of a shutdown's grace: every read in flight stops at its next chunk (with
    /// [`UploadError::Cancelled`], which is no failure), and no new one starts. The caller then
    /// drops the uploads and waits for [`Uploader::blocking_ended`].
    pub fn abandon(&self) {
        self.reads.abandon();
    }

    /// Waits up to `within` for the blocking tasks of this uploader's uploads to end (after
    /// [`Uploader::abandon`] they end within one chunk of reading, unless a read itself hangs,
    /// e.g. on a dead NFS server). Returns how many are still running: abandoned to the process's
    /// exit.
    pub async fn blocking_ended(&self, within: Duration) -> usize {
        self.reads.ended(within).await
    }

    /// See [`Uploader::assume_absent`]: for a backfill into an empty prefix.
    pub fn assume_absent(mut self, yes: bool) -> Self {
        self.assume_absent = yes;
        self
    }

    /// Asks Synapse's database for a media's SHA-256 when a local file and its object differ.
    pub fn arbiter(mut self, db: Option<Arc<Db>>) -> Self {
        self.arbiter = db;
        self
    }

    /// Heals bad local copies (once settled for `settle`), or with `None` only reports them.
    pub fn heal(mut self, settle: Option<Duration>) -> Self {
        self.heal = settle;
        self
    }

    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Uploads `path` if it is not verified in the bucket yet (see the module docs for the steps).
    pub async fn upload(&self, path: &MediaPath) -> Result<Outcome, UploadError> {
        let abs = path.to_path(&self.root);
        let key = path.key(self.store.prefix());
        let read_err = |source| UploadError::Read {
            path: abs.clone(),
            source,
        };
        // An object this upload wrote in an earlier round, from a file that then changed.
        let mut ours: Option<(u64, [u8; 16])> = None;
        for _round in 0..MAX_ROUNDS {
            let prepared = self
                .reads
                .run({
                    let (abs, state, p) = (abs.clone(), self.state.clone(), path.clone());
                    let (threshold, part_size) = (self.multipart_threshold, self.part_size);
                    let (root, cancel) = (self.root.clone(), self.reads.token());
                    move || prepare(&root, &abs, &state, &p, threshold, part_size, &cancel)
                })
                .await??;
            let (hashed, record) = match prepared {
                Prepared::Hashed(h, r) => (h, r),
                Prepared::Done(Outcome::Vanished) => return Ok(self.vanished(path).await),
                Prepared::Done(outcome) => return Ok(outcome),
                Prepared::Changed => continue,
            };
            let size = hashed.snapshot.size;
            let local = Local {
                size,
                md5: hashed.md5,
                sha256: hashed.sha256,
            };
            let mut new_record =
                Record::new(size, hashed.snapshot.mtime_ns, hashed.md5).with_sha256(hashed.sha256);

            let object = if self.assume_absent && record.is_none() && ours.is_none() {
                None
            } else {
                self.store.head(&key).await?
            };
            let object = match object {
                Some(o) => Some(
                    self.recognise_multipart(&abs, hashed.snapshot, &local, o)
                        .await?,
                ),
                None => None,
            };
            let decision = self
                .decide(path, &local, record.as_ref(), ours, object.as_ref())
                .await?;
            match decision {
                Decision::Put => {}
                // The object's ETag is kept when it is a multipart one (not the MD5): the sweep
                // then recognises this object by HEAD or listing without reading the file again.
                Decision::Adopt => {
                    let etag = object.as_ref().and_then(|o| o.etag.as_deref());
                    return Ok(Outcome::Adopted {
                        record: new_record.with_etag(etag),
                    });
                }
                Decision::Conflict(why) => {
                    metrics::counter!(m::CONFLICTS).increment(1);
                    let detail = describe(&why, &local, object.as_ref());
                    tracing::error!(path = %path, detail = %detail, "Conflict: the local file differs from an object we never verified; both kept.");
                    return Err(UploadError::Conflict {
                        path: path.clone(),
                        detail,
                    });
                }
                Decision::BadCopy(expect) => {
                    match self
                        .bad_copy(path, &key, hashed.snapshot, &local, object.as_ref(), expect)
                        .await?
                    {
                        Some(outcome) => return Ok(outcome),
                        // Changed, or the object vanished meanwhile: look again.
                        None => continue,
                    }
                }
            }
            match hashed.content {
                Content::Inline(body) => self.store.put_bytes(&key, body, &hashed.md5).await?,
                Content::File(file) => self.store.put_file(&key, &file, size, &hashed.md5).await?,
                Content::Parts(parts, file) => {
                    self.store
                        .put_multipart(&key, &file, size, &hashed.md5, &parts)
                        .await?;
                    // A multipart object's ETag is not its MD5 and Complete does not check the whole:
                    // confirm size and our digest metadata before trusting it.
                    match self.store.head(&key).await? {
                        Some(info) if info.confirms(size, &hashed.md5) => {
                            new_record = new_record.with_etag(info.etag.as_deref());
                        }
                        other => {
                            return Err(UploadError::Unverified {
                                path: path.clone(),
                                detail: format!(
                                    "after CompleteMultipartUpload, HEAD shows {other:?}"
                                ),
                            });
                        }
                    }
                }
            }
            ours = Some((size, hashed.md5));
            let after = self
                .reads
                .run({
                    let abs = abs.clone();
                    move || digest::stat(&abs)
                })
                .await?
                .map_err(read_err)?;
            match after {
                Stat::File(s) if s == hashed.snapshot => {
                    return Ok(Outcome::Uploaded { record: new_record });
                }
                // Deleted right after its upload: nothing left to record against. Synapse's
                // spam checker may have rejected it: then its object goes too (`withdraw`).
                Stat::Vanished => {
                    self.withdraw_vanished(path).await;
                    return Ok(Outcome::Vanished);
                }
                Stat::NotRegular => return Ok(Outcome::Vanished),
                Stat::File(_) => {
                    tracing::debug!(path = %path, "File changed during upload; uploading again.");
                    continue;
                }
            }
        }
        Err(UploadError::Unstable { path: path.clone() })
    }

    /// An object without our digest metadata whose ETag is a multipart ETag (another tool's
    /// multipart upload, e.g. `s3_media_upload`'s above 8 MiB) that matches the file: it holds the
    /// file's bytes, so it is given the file's MD5 and adopted instead of being taken for other
    /// bytes (a conflict) or uploaded again.
    async fn recognise_multipart(
        &self,
        abs: &Path,
        snapshot: digest::Snapshot,
        local: &Local,
        mut o: ObjectInfo,
    ) -> Result<ObjectInfo, UploadError> {
        let candidate = o.meta_md5.is_none()
            && o.size == local.size
            && o.etag.as_deref().is_some_and(|e| e.contains('-'));
        if !candidate {
            return Ok(o);
        }
        let etag = o.etag.clone().unwrap_or_default();
        let (path, cancel) = (abs.to_owned(), self.reads.token());
        let same = self
            .reads
            .run(move || digest::multipart_etag_matches(&path, snapshot, &etag, &cancel))
            .await?
            .map_err(|source| read_error(abs, source))?;
        if same {
            o.meta_md5 = Some(local.md5);
        }
        Ok(o)
    }

    /// [`verdict::decide`], asking Synapse's database for the media's hash when it could change
    /// the decision (an original whose local file and object differ).
    async fn decide(
        &self,
        path: &MediaPath,
        local: &Local,
        record: Option<&Record>,
        ours: Option<(u64, [u8; 16])>,
        object: Option<&ObjectInfo>,
    ) -> Result<Decision, UploadError> {
        let first = verdict::decide(local, record, ours, object, None);
        let (true, Some(db), Some(media)) = (
            first.wants_arbiter() && path.is_original(),
            &self.arbiter,
            path.media(),
        ) else {
            return Ok(first);
        };
        let hash = db
            .content_sha256(&media)
            .await
            .map_err(|source| UploadError::Arbiter {
                path: path.clone(),
                source,
            })?;
        Ok(match hash {
            Some(h) => verdict::decide(local, record, ours, object, Some(h)),
            None => first,
        })
    }

    /// A bad local copy: heal it (or report it). `None` when the file or the object changed
    /// meanwhile and the caller should look again.
    async fn bad_copy(
        &self,
        path: &MediaPath,
        key: &str,
        snapshot: digest::Snapshot,
        local: &Local,
        object: Option<&ObjectInfo>,
        expect: Expect,
    ) -> Result<Option<Outcome>, UploadError> {
        let detail = describe(
            "the local file differs from the verified object",
            local,
            object,
        );
        let Some(settle) = self.heal else {
            metrics::counter!(m::BAD_LOCAL_COPIES, "outcome" => "reported").increment(1);
            tracing::error!(path = %path, detail = %detail, "Bad local copy: it differs from its verified object (healing is off); the object is kept.");
            return Err(UploadError::BadCopy {
                path: path.clone(),
                detail,
            });
        };
        let healed = heal::heal(&self.root, path, &self.store, key, snapshot, expect, settle)
            .await
            .map_err(|e| match e {
                HealError::S3(e) => UploadError::S3(e),
                e @ HealError::Io { .. } => UploadError::Healing {
                    path: path.clone(),
                    detail: crate::Chain(&e).to_string(),
                },
            })?;
        match healed {
            Healed::Done(record) => {
                metrics::counter!(m::BAD_LOCAL_COPIES, "outcome" => "healed").increment(1);
                tracing::error!(path = %path, detail = %detail, "Bad local copy replaced with the verified object from the bucket (Synapse served the bad copy until now).");
                Ok(Some(Outcome::Healed { record }))
            }
            Healed::Busy => Err(UploadError::Healing {
                path: path.clone(),
                detail: "it is open for writing (Synapse may be writing it back)".into(),
            }),
            Healed::Changed | Healed::ObjectGone => Ok(None),
            Healed::Mismatch(why) => {
                metrics::counter!(m::CONFLICTS).increment(1);
                let detail = format!("{detail}; {why}");
                tracing::error!(path = %path, detail = %detail, "Conflict: the local file is a bad copy, but the object does not hold the right bytes either; both kept.");
                Err(UploadError::Conflict {
                    path: path.clone(),
                    detail,
                })
            }
        }
    }
}

/// Sizes and digests of both sides, for the operator.
fn describe(why: &str, local: &Local, object: Option<&ObjectInfo>) -> String {
    let object = match object {
        Some(o) => format!(
            "object {} bytes, md5 {}",
            o.size,
            o.meta_md5
                .map(hex::encode)
                .or_else(|| o.etag.clone())
                .unwrap_or_else(|| "unknown".into())
        ),
        None => "no object".into(),
    };
    format!(
        "{why} (local file {} bytes, md5 {}, sha256 {}; {object})",
        local.size,
        hex::encode(local.md5),
        hex::encode(local.sha256)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running out of file descriptors is retried soon, not parked for the operator as an
    /// unreadable file (10 minutes); permission problems still are.
    #[test]
    fn out_of_descriptors_is_transient_and_permissions_are_not() {
        let read = |errno| UploadError::Read {
            path: "/m/local_content/ab/cd/ef".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert_eq!(read(libc::EMFILE).kind(), ErrorKind::Transient);
        assert_eq!(read(libc::ENFILE).kind(), ErrorKind::Transient);
        assert_eq!(read(libc::EACCES).kind(), ErrorKind::Permanent);
    }
}
