//! Steps 1–3 of an upload (see `upload/mod.rs`): open the file without following symlinks,
//! compare it with its record, read and hash it once. Blocking.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::digest::{self, Open, ReadOutcome, Stat};
use super::{Outcome, UploadError, s3};
use crate::layout::MediaPath;
use crate::state::{Record, State};

/// What steps 1–3 found.
pub(super) enum Prepared {
    /// Read and hashed, with the file's record (any record: stale or for other bytes too).
    Hashed(digest::Hashed, Option<Record>),
    /// Nothing to upload (unchanged, vanished, not a regular file).
    Done(Outcome),
    /// Changed while being read: look again.
    Changed,
}

/// A read error of `abs`, or [`UploadError::Cancelled`] for a read stopped by the shutdown.
pub(super) fn read_error(abs: &Path, source: std::io::Error) -> UploadError {
    if digest::is_cancelled(&source) {
        return UploadError::Cancelled;
    }
    UploadError::Read {
        path: abs.to_owned(),
        source,
    }
}

/// Steps 1–3: open, compare with the record, read and hash. Blocking; ends with
/// [`UploadError::Cancelled`] once `cancel` fires (checked between chunks of the read).
pub(super) fn prepare(
    root: &Path,
    abs: &Path,
    state: &State,
    path: &MediaPath,
    multipart_threshold: u64,
    part_size: u64,
    cancel: &CancellationToken,
) -> Result<Prepared, UploadError> {
    if cancel.is_cancelled() {
        return Err(UploadError::Cancelled);
    }
    let read_err = |source| read_error(abs, source);
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
    let record = state.record_or_none(path)?;
    if record.is_some_and(|rec| rec.matches(snap.size, snap.mtime_ns)) {
        return Ok(Prepared::Done(Outcome::Unchanged));
    }
    // Files below the multipart threshold are sent in one PUT; the smaller ones from memory.
    let part_size =
        (snap.size >= multipart_threshold).then(|| s3::part_size_for(snap.size, part_size));
    Ok(
        match opened
            .read_and_hash(digest::INLINE_MAX, part_size, cancel)
            .map_err(read_err)?
        {
            ReadOutcome::Hashed(h) => Prepared::Hashed(h, record),
            ReadOutcome::Vanished => Prepared::Done(Outcome::Vanished),
            ReadOutcome::NotRegular => Prepared::Done(Outcome::NotRegular),
            ReadOutcome::Changed => Prepared::Changed,
        },
    )
}
