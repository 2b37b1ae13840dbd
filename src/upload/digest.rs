//! Reading a media file once: a snapshot of its identity (size, mtime) and its MD5, plus either the
//! whole body (small files, sent from memory: what we hashed is exactly what we send) or the MD5 of
//! each multipart part (large files, streamed from disk afterwards; `Content-MD5` on every part makes
//! the server reject a part that changed between hashing and sending).
//!
//! Blocking: call from `spawn_blocking`. The long reads (a file of several GB takes seconds to
//! hash) look at a cancellation token between chunks of [`READ_BUF`] bytes and end with
//! [`cancelled`] once it fires: a shutdown is not held up by a hash, and the file it was reading
//! stays queued (see [`is_cancelled`]).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::md5::Md5;
use crate::sha256::Sha256;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Files up to this size are read into memory and sent from there.
pub const INLINE_MAX: u64 = 1 << 20;
const READ_BUF: usize = 256 * 1024;

/// The marker inside the error a cancelled read ends with.
#[derive(Debug, thiserror::Error)]
#[error("cancelled: shutting down")]
struct Cancelled;

/// The error a read stopped by its cancellation token returns (`ErrorKind::Interrupted`, with a
/// marker no system call produces).
pub fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, Cancelled)
}

/// Whether `e` is [`cancelled`]: not the file's fault and not a failure; the file stays queued.
pub fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

/// The blocking tasks of uploads (open, read, hash, stat), tracked, with the token their reads
/// look at. An upload future dropped at shutdown leaves its blocking task running, holding the
/// file and the state database open: [`Reads::abandon`] stops their reads within a chunk, and
/// [`Reads::ended`] says when they are over.
#[derive(Default)]
pub struct Reads {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Reads {
    /// The token to hand to the reads run by [`Reads::run`].
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Every read stops at its next chunk with [`cancelled`]; later ones stop at their first.
    pub fn abandon(&self) {
        self.cancel.cancel();
    }

    /// Waits up to `within` for every task to end; returns how many still run.
    pub async fn ended(&self, within: std::time::Duration) -> usize {
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
        self.tasks.len()
    }

    /// Runs `f` on a blocking thread, tracked.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        self.tasks.spawn_blocking(f).await
    }
}

/// The identity of a file's content as far as the filesystem tells: size and mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub size: u64,
    pub mtime_ns: i64,
}

impl Snapshot {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Snapshot {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        }
    }
}

/// What a file looks like right now, without following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    File(Snapshot),
    /// Gone (deleted or renamed away).
    Vanished,
    /// A symlink, FIFO, socket, device or directory: never uploaded.
    NotRegular,
}

pub fn stat(path: &Path) -> io::Result<Stat> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(Stat::File(Snapshot::of(&m))),
        Ok(_) => Ok(Stat::NotRegular),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Stat::Vanished),
        Err(e) => Err(e),
    }
}

/// Whether some process has `path` open for writing, asked the kernel through a read lease
/// (`F_SETLEASE` fails with `EAGAIN` while the file is open for writing anywhere). The lease is
/// dropped at once. `None` when the filesystem or our privileges do not allow leases (we must own
/// the file or have `CAP_LEASE`): then only the settle time tells.
pub fn open_for_writing(path: &Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above; releases the lease we just took.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

#[derive(Debug)]
pub enum Content {
    /// The whole body, for files up to `inline_max`.
    Inline(Bytes),
    /// Too large to keep in memory: sent in one PUT streamed from this descriptor (the file that
    /// was opened without following symlinks and hashed, never the path opened again).
    File(File),
    /// MD5 of each part of `part_size` bytes (the last one shorter), and the descriptor to stream
    /// the parts from.
    Parts(Vec<[u8; 16]>, File),
}

#[derive(Debug)]
pub struct Hashed {
    pub snapshot: Snapshot,
    pub md5: [u8; 16],
    /// Synapse's content hash of the same bytes (`sha256` column).
    pub sha256: [u8; 32],
    pub content: Content,
}

#[derive(Debug)]
pub enum ReadOutcome {
    Hashed(Hashed),
    Vanished,
    NotRegular,
    /// The file's size changed while we read it: still being written.
    Changed,
}

/// A regular file opened for reading (without following a symlink), with its snapshot taken from
/// the open descriptor: what is read afterwards is the file that was snapshotted.
pub struct Opened {
    file: File,
    pub snapshot: Snapshot,
}

#[derive(Debug)]
pub enum Open {
    File(Opened),
    Vanished,
    NotRegular,
}

/// Opens `path` for reading without following a symlink, and snapshots it (fstat).
pub fn open(path: &Path) -> io::Result<Open> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        // O_NOFOLLOW: a symlink swapped in after the scan is refused, never followed out of the
        // store. O_NONBLOCK: opening a FIFO must not hang (it is rejected just below).
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Open::Vanished),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Open::NotRegular),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(Open::NotRegular);
    }
    Ok(Open::File(Opened {
        snapshot: Snapshot::of(&meta),
        file,
    }))
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

impl Opened {
    /// Reads the file once and hashes it. With a `part_size` (multipart upload) the MD5 of every
    /// part is computed too; otherwise files up to `inline_max` are kept in memory. Ends with
    /// [`cancelled`] at the next chunk once `cancel` fires.
    pub fn read_and_hash(
        self,
        inline_max: u64,
        part_size: Option<u64>,
        cancel: &CancellationToken,
    ) -> io::Result<ReadOutcome> {
        let Opened { file, snapshot } = self;
        if part_size.is_none() && snapshot.size <= inline_max {
            let mut body = Vec::with_capacity(snapshot.size as usize + 1);
            // Read one byte past the expected size so a file that grew is noticed.
            (&file).take(snapshot.size + 1).read_to_end(&mut body)?;
            if body.len() as u64 != snapshot.size {
                return Ok(ReadOutcome::Changed);
            }
            let md5 = Md5::digest(&body);
            let sha256 = Sha256::digest(&body);
            return Ok(ReadOutcome::Hashed(Hashed {
                snapshot,
                md5,
                sha256,
                content: Content::Inline(Bytes::from(body)),
            }));
        }
        hash_parts(file, snapshot, part_size, cancel)
    }
}

/// Opens `path` without following a symlink, snapshots it, and hashes it in one pass (see
/// [`open`] and [`Opened::read_and_hash`]).
pub fn read_and_hash(
    path: &Path,
    inline_max: u64,
    part_size: Option<u64>,
    cancel: &CancellationToken,
) -> io::Result<ReadOutcome> {
    match open(path)? {
        Open::File(f) => f.read_and_hash(inline_max, part_size, cancel),
        Open::Vanished => Ok(ReadOutcome::Vanished),
        Open::NotRegular => Ok(ReadOutcome::NotRegular),
    }
}

fn hash_parts(
    mut file: File,
    snapshot: Snapshot,
    part_size: Option<u64>,
    cancel: &CancellationToken,
) -> io::Result<ReadOutcome> {
    let multipart = part_size.is_some();
    let part_size = part_size.unwrap_or(u64::MAX);
    let mut whole = Md5::new();
    let mut sha = Sha256::new();
    let mut part = Md5::new();
    let mut in_part = 0u64;
    let mut total = 0u64;
    let mut parts = Vec::with_capacity(snapshot.size.div_ceil(part_size) as usize);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        // An atomic load per 256 KiB: a 3 GB file being hashed when the shutdown's grace ends
        // stops within one chunk instead of holding the process for its whole read.
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        // Never read across a part boundary, so each chunk belongs to exactly one part.
        let want = (part_size - in_part).min(READ_BUF as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        whole.update(&buf[..n]);
        sha.update(&buf[..n]);
        // Without parts this would be a second MD5 of every byte, thrown away.
        if multipart {
            part.update(&buf[..n]);
        }
        in_part += n as u64;
        total += n as u64;
        if total > snapshot.size {
            return Ok(ReadOutcome::Changed);
        }
        if in_part == part_size {
            parts.push(std::mem::take(&mut part).finalize());
            in_part = 0;
        }
    }
    if multipart && in_part > 0 {
        parts.push(part.finalize());
    }
    if total != snapshot.size {
        return Ok(ReadOutcome::Changed);
    }
    Ok(ReadOutcome::Hashed(Hashed {
        snapshot,
        md5: whole.finalize(),
        sha256: sha.finalize(),
        content: if multipart {
            Content::Parts(parts, file)
        } else {
            Content::File(file)
        },
    }))
}

/// Part sizes other tools use for multipart uploads, to recognise their objects by ETag: boto3's
/// and the aws CLI's 8 MiB (`s3_media_upload`), rclone's and s5cmd's 5 MiB, our 16 MiB default,
/// and a few common settings.
pub const COMMON_PART_SIZES: &[u64] = &[
    8 << 20,
    5 << 20,
    16 << 20,
    15 << 20,
    10 << 20,
    32 << 20,
    64 << 20,
    100 << 20,
];

/// Whether `etag` is the multipart ETag (`md5(md5(part 1) ‖ … ‖ md5(part N))-N`) of the file at
/// `path` cut into parts of one of [`COMMON_PART_SIZES`], the file still being `snapshot`: a
/// multipart object of another tool holds the same bytes as the file. Reads the file once per
/// candidate part size that gives N parts (usually one). Blocking; ends with [`cancelled`] once
/// `cancel` fires.
pub fn multipart_etag_matches(
    path: &Path,
    snapshot: Snapshot,
    etag: &str,
    cancel: &CancellationToken,
) -> io::Result<bool> {
    let Some((hex_digest, n)) = etag.trim_matches('"').split_once('-') else {
        return Ok(false);
    };
    let (Ok(want), Ok(n)) = (hex::decode(hex_digest), n.parse::<u64>()) else {
        return Ok(false);
    };
    if n == 0 {
        return Ok(false);
    }
    for &part in COMMON_PART_SIZES {
        if snapshot.size.div_ceil(part) != n {
            continue;
        }
        let Open::File(opened) = open(path)? else {
            return Ok(false);
        };
        if opened.snapshot != snapshot {
            return Ok(false);
        }
        let ReadOutcome::Hashed(h) = hash_parts(opened.file, snapshot, Some(part), cancel)? else {
            return Ok(false);
        };
        let Content::Parts(parts, _) = h.content else {
            return Ok(false);
        };
        let mut whole = Md5::new();
        for p in &parts {
            whole.update(p);
        }
        if whole.finalize().as_slice() == want.as_slice() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::md5::Digest as _;
    use std::io::Write;

    fn write(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        p
    }

    #[test]
    fn inline_and_parts_agree_on_the_whole_digest() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(11u32 << 10)).map(|i| (i * 7 % 251) as u8).collect();
        let p = write(dir.path(), "f", &data);
        let ReadOutcome::Hashed(inline) =
            read_and_hash(&p, u64::MAX, None, &CancellationToken::new()).unwrap()
        else {
            panic!()
        };
        let ReadOutcome::Hashed(parts) =
            read_and_hash(&p, 0, Some(4096), &CancellationToken::new()).unwrap()
        else {
            panic!()
        };
        assert_eq!(inline.md5, parts.md5);
        assert_eq!(inline.md5, <[u8; 16]>::from(::md5::Md5::digest(&data)));
        assert_eq!(inline.sha256, parts.sha256);
        assert_eq!(inline.sha256, crate::sha256::Sha256::digest(&data));
        let Content::Parts(p, _) = parts.content else {
            panic!()
        };
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], <[u8; 16]>::from(::md5::Md5::digest(&data[8192..])));
        let ReadOutcome::Hashed(streamed) =
            read_and_hash(&p_path(&dir), 0, None, &CancellationToken::new()).unwrap()
        else {
            panic!()
        };
        assert_eq!(streamed.md5, inline.md5);
        assert_eq!(streamed.sha256, inline.sha256);
        assert!(matches!(streamed.content, Content::File(_)));
    }

    fn p_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("f")
    }

    #[test]
    fn multipart_etags_of_other_tools_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(17u32 << 20)).map(|i| (i * 13 % 251) as u8).collect();
        let p = write(dir.path(), "f", &data);
        let Stat::File(snap) = stat(&p).unwrap() else {
            panic!()
        };
        // As boto3 computes it for 8 MiB parts: three parts.
        let mut whole = ::md5::Md5::new();
        for chunk in data.chunks(8 << 20) {
            whole.update(::md5::Md5::digest(chunk));
        }
        let etag = format!("\"{}-3\"", hex::encode(whole.finalize()));
        let go = CancellationToken::new();
        assert!(multipart_etag_matches(&p, snap, &etag, &go).unwrap());
        assert!(!multipart_etag_matches(&p, snap, &etag.replace("-3", "-4"), &go).unwrap());
        assert!(!multipart_etag_matches(&p, snap, &hex::encode([0u8; 16]), &go).unwrap());
        let other = format!("{}-3", hex::encode([7u8; 16]));
        assert!(!multipart_etag_matches(&p, snap, &other, &go).unwrap());
        go.cancel();
        let e = multipart_etag_matches(&p, snap, &etag, &go).unwrap_err();
        assert!(is_cancelled(&e), "{e}");
    }

    /// A cancelled read ends with the cancellation error (not a read error of the file), and an
    /// ordinary EINTR is not taken for one.
    #[test]
    fn a_cancelled_hash_ends_with_the_cancellation_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "f", &[3u8; 3 << 20]);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let Open::File(f) = open(&p).unwrap() else {
            panic!()
        };
        let e = f.read_and_hash(0, Some(1 << 20), &cancel).unwrap_err();
        assert!(
            is_cancelled(&e) && e.kind() == io::ErrorKind::Interrupted,
            "{e}"
        );
        assert!(!is_cancelled(&io::Error::from(io::ErrorKind::Interrupted)));
        assert!(!is_cancelled(&io::Error::from_raw_os_error(libc::EINTR)));
    }

    #[test]
    fn exact_multiple_of_part_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "f", &[1u8; 8192]);
        let ReadOutcome::Hashed(h) =
            read_and_hash(&p, 0, Some(4096), &CancellationToken::new()).unwrap()
        else {
            panic!()
        };
        let Content::Parts(parts, _) = h.content else {
            panic!()
        };
        assert_eq!(parts.len(), 2);
    }

    #[test]
    fn leases_tell_whether_a_writer_has_the_file_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "f", b"x");
        assert_eq!(open_for_writing(&p), Some(false));
        let writer = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        assert_eq!(open_for_writing(&p), Some(true));
        drop(writer);
        assert_eq!(open_for_writing(&p), Some(false));
    }

    #[test]
    fn symlinks_fifos_and_missing_files_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let target = write(dir.path(), "target", b"secret");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            read_and_hash(&link, 1024, None, &CancellationToken::new()).unwrap(),
            ReadOutcome::NotRegular
        ));
        assert_eq!(stat(&link).unwrap(), Stat::NotRegular);
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_and_hash(&fifo, 1024, None, &CancellationToken::new()).unwrap(),
            ReadOutcome::NotRegular
        ));
        let gone = dir.path().join("gone");
        assert!(matches!(
            read_and_hash(&gone, 1024, None, &CancellationToken::new()).unwrap(),
            ReadOutcome::Vanished
        ));
        assert_eq!(stat(&gone).unwrap(), Stat::Vanished);
    }
}
