//! Getting one file into the bucket, verified, and recording it.
//!
//! For each file, in this order:
//! 1. open it (no symlink following) and snapshot (size, mtime) from the open descriptor; a
//!    vanished or non-regular file is not an error.
//! 2. a record with the same size and mtime means it is already verified: done, no request.
//! 3. read it once: MD5, and the body or per-part MD5s.
//!    Steps 1–3 run in one blocking task: one thread hand-off per file instead of three (the
//!    hand-offs' futex wake-ups were the largest system-call count of a backfill).
//! 4. HEAD the key: an object with the same size and digest (uploaded by us before a crash, by
//!    `s3_media_upload`, or an identical rewrite by Synapse) is recorded without a PUT. Skipped
//!    where an object is not expected: a backfill into an empty prefix, and a file the daemon
//!    saw just written ([`Uploader::upload_new`]). At worst the same bytes are
//!    PUT once more, which is harmless; the HEAD would cost a request per file every time.
//! 5. PUT with `Content-MD5` (multipart with per-part `Content-MD5` above the threshold, then a HEAD
//!    to confirm size and digest). The provider rejects a body that differs from the digest.
//! 6. stat again: if size or mtime moved, the file changed during the upload: go back to 1.
//! 7. return the record (size and mtime from step 3, digest); the caller commits it (with its queue
//!    change, in one transaction). Only then does the file count as uploaded.
//!
//! A crash anywhere before the commit leaves no record, so the file is looked at again; step 4 then avoids a
//! second PUT. Nothing here retries a failed request: the SDK retries a request (`s3.max_attempts`),
//! and whoever called us decides what to do with the error (`UploadError::kind`).

pub mod digest;
pub mod s3;
mod s3_error;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use self::digest::{Content, Open, ReadOutcome, Stat};
use self::s3::{ErrorKind, ObjectStore, S3Error};
use crate::layout::MediaPath;
use crate::state::{Record, State, StateError};

/// How many times a file that keeps changing under us is re-read before giving up for now.
const MAX_ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// PUT and verified; `record` is to be committed.
    Uploaded { record: Record },
    /// Already in the bucket with the same size and digest; `record` is to be committed.
    Adopted { record: Record },
    /// Recorded before with the same size and mtime: nothing to do.
    Unchanged,
    /// The file disappeared (e.g. Synapse's spam checker deleted it): nothing to do.
    Vanished,
    /// Not a regular file (symlink, FIFO, …): never uploaded.
    NotRegular,
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
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the blocking reader task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl UploadError {
    /// Transient errors are worth retrying soon; permanent ones need the operator.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UploadError::S3(e) => e.kind,
            UploadError::Unstable { .. } | UploadError::Unverified { .. } => ErrorKind::Transient,
            UploadError::Join(_) => ErrorKind::Transient,
            // EACCES and friends need an operator; the state database failing is serious too.
            UploadError::Read { .. } | UploadError::State(_) => ErrorKind::Permanent,
        }
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
    /// PUT is skipped (a concurrent writer at worst causes a duplicate PUT of the same bytes).
    assume_absent: bool,
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
        }
    }

    /// See [`Uploader::assume_absent`]: for a backfill into an empty prefix.
    pub fn assume_absent(mut self, yes: bool) -> Self {
        self.assume_absent = yes;
        self
    }

    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    /// Uploads `path` if it is not verified in the bucket yet (see the module docs for the steps).
    pub async fn upload(&self, path: &MediaPath) -> Result<Outcome, UploadError> {
        self.upload_with(path, !self.assume_absent).await
    }

    /// Like [`Uploader::upload`], for a file that was just written (the daemon saw it closed, or
    /// found it younger than `upload.settle`): its object is almost never in the bucket yet, so
    /// the HEAD that would look for it first is skipped (step 4). Older files go through
    /// [`Uploader::upload`]: those may well be in the bucket already.
    pub async fn upload_new(&self, path: &MediaPath) -> Result<Outcome, UploadError> {
        self.upload_with(path, false).await
    }

    async fn upload_with(
        &self,
        path: &MediaPath,
        look_first: bool,
    ) -> Result<Outcome, UploadError> {
        let abs = path.to_path(&self.root);
        let key = path.key(self.store.prefix());
        let read_err = |source| UploadError::Read {
            path: abs.clone(),
            source,
        };
        for _round in 0..MAX_ROUNDS {
            let prepared = blocking({
                let (abs, state, p) = (abs.clone(), self.state.clone(), path.clone());
                let (threshold, part_size) = (self.multipart_threshold, self.part_size);
                let root = self.root.clone();
                move || prepare(&root, &abs, &state, &p, threshold, part_size)
            })
            .await??;
            let hashed = match prepared {
                Prepared::Hashed(h) => h,
                Prepared::Done(outcome) => return Ok(outcome),
                Prepared::Changed => continue,
            };
            let size = hashed.snapshot.size;
            let record = Record::new(size, hashed.snapshot.mtime_ns, hashed.md5);

            if look_first
                && let Some(info) = self.store.head(&key).await?
                && info.confirms(size, &hashed.md5)
            {
                return Ok(Outcome::Adopted { record });
            }
            match hashed.content {
                Content::Inline(body) => self.store.put_bytes(&key, body, &hashed.md5).await?,
                Content::File => self.store.put_file(&key, &abs, size, &hashed.md5).await?,
                Content::Parts(parts) => {
                    self.store
                        .put_multipart(&key, &abs, size, &hashed.md5, &parts)
                        .await?;
                    // A multipart object's ETag is not its MD5 and Complete does not check the whole:
                    // confirm size and our digest metadata before trusting it.
                    match self.store.head(&key).await? {
                        Some(info) if info.confirms(size, &hashed.md5) => {}
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
            let after = blocking({
                let abs = abs.clone();
                move || digest::stat(&abs)
            })
            .await?
            .map_err(read_err)?;
            match after {
                Stat::File(s) if s == hashed.snapshot => {
                    return Ok(Outcome::Uploaded { record });
                }
                // Deleted right after its upload: the object is harmless, and there is nothing
                // left to record against.
                Stat::Vanished | Stat::NotRegular => return Ok(Outcome::Vanished),
                Stat::File(_) => {
                    tracing::debug!(path = %path, "File changed during upload; uploading again.");
                    continue;
                }
            }
        }
        Err(UploadError::Unstable { path: path.clone() })
    }
}

/// What steps 1–3 found.
enum Prepared {
    Hashed(digest::Hashed),
    /// Nothing to upload (unchanged, vanished, not a regular file).
    Done(Outcome),
    /// Changed while being read: look again.
    Changed,
}

/// Steps 1–3: open, compare with the record, read and hash. Blocking.
fn prepare(
    root: &Path,
    abs: &Path,
    state: &State,
    path: &MediaPath,
    multipart_threshold: u64,
    part_size: u64,
) -> Result<Prepared, UploadError> {
    let read_err = |source| UploadError::Read {
        path: abs.to_owned(),
        source,
    };
    // A symlinked directory on the way would make us read a file outside the store.
    if !path.parents_are_dirs(root).map_err(read_err)? {
        return Ok(Prepared::Done(
            match digest::stat(abs).map_err(read_err)? {
                Stat::Vanished => Outcome::Vanished,
                _ => Outcome::NotRegular,
            },
        ));
    }
    let opened = match digest::open(abs).map_err(read_err)? {
        Open::File(f) => f,
        Open::Vanished => return Ok(Prepared::Done(Outcome::Vanished)),
        Open::NotRegular => return Ok(Prepared::Done(Outcome::NotRegular)),
    };
    let snap = opened.snapshot;
    if let Some(rec) = state.record(path)?
        && rec.matches(snap.size, snap.mtime_ns)
    {
        return Ok(Prepared::Done(Outcome::Unchanged));
    }
    // Files below the multipart threshold are sent in one PUT; the smaller ones from memory.
    let part_size =
        (snap.size >= multipart_threshold).then(|| s3::part_size_for(snap.size, part_size));
    Ok(
        match opened
            .read_and_hash(digest::INLINE_MAX, part_size)
            .map_err(read_err)?
        {
            ReadOutcome::Hashed(h) => Prepared::Hashed(h),
            ReadOutcome::Vanished => Prepared::Done(Outcome::Vanished),
            ReadOutcome::NotRegular => Prepared::Done(Outcome::NotRegular),
            ReadOutcome::Changed => Prepared::Changed,
        },
    )
}

/// Caps glibc's malloc at two arenas. By default every thread that allocates may get an arena of
/// its own (up to 8 per core), and the 1 MiB bodies freed on one thread's arena are not reused by
/// another: with `upload.concurrency` files in flight on many blocking threads, peak RSS was 47 MB
/// instead of 30 MB on the same store (measured with `MALLOC_ARENA_MAX=2`; same CPU).
/// Call before the busy threads first allocate (it only limits arenas created afterwards).
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tunable; any value is valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}
