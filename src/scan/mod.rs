//! Walking the media store: the source of truth for which files exist (inotify is only a hint).
//!
//! Only Synapse's media folders are walked (see [`crate::layout`]); symlinks are never followed,
//! not even a symlinked top-level folder (safety invariant 5); FIFOs, sockets and devices are
//! ignored; a file whose name is not UTF-8 cannot have an S3 key and is reported and skipped.
//! Blocking: run it on a blocking thread.
//!
//! The scan stage ([`Scanner`]) runs the full walks of the daemon; the [`Intake`] turns what a
//! walk (or the watch) finds into queue entries.

mod intake;
mod stage;

pub use intake::{Entry, Intake, Unreadable};
pub use stage::{Blind, Ready, Scanner, Signals};

use std::path::{Path, PathBuf};

use crate::layout::{self, MediaPath};
use crate::upload::digest::Snapshot;

/// One regular file found by the walk.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: MediaPath,
    pub snapshot: Snapshot,
}

/// Something the walk could not or would not handle; reported, never fatal.
#[derive(Debug)]
pub enum Problem {
    /// A directory or file could not be read (permissions, I/O error, removed mid-walk).
    Unreadable { path: PathBuf, error: String },
    /// A name that is not valid UTF-8 (no S3 key can hold it).
    BadName { path: PathBuf, error: String },
    /// A symlinked top-level folder: not followed.
    SymlinkedDir { path: PathBuf },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Unreadable { path, error } => {
                write!(f, "cannot read {}: {error}", path.display())
            }
            Problem::BadName { path, error } => write!(f, "skipping {}: {error}", path.display()),
            Problem::SymlinkedDir { path } => write!(
                f,
                "{} is a symlink; it is not followed (bind-mount the directory or point media_store_path at the real store)",
                path.display()
            ),
        }
    }
}

pub enum Item {
    File(Found),
    Problem(Problem),
}

/// Walks the uploadable folders of the store at `root` (canonical), calling `visit` for every
/// regular file and every problem. `visit` returns `false` to stop the walk early.
pub fn walk(root: &Path, include_url_cache: bool, mut visit: impl FnMut(Item) -> bool) {
    for top in layout::upload_dirs(include_url_cache) {
        let dir = root.join(top);
        match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                if !visit(Item::Problem(Problem::Unreadable {
                    path: dir,
                    error: e.to_string(),
                })) {
                    return;
                }
                continue;
            }
            Ok(m) if m.file_type().is_symlink() => {
                if !visit(Item::Problem(Problem::SymlinkedDir { path: dir })) {
                    return;
                }
                continue;
            }
            Ok(m) if !m.is_dir() => continue,
            Ok(_) => {}
        }
        if !walk_dir(root, &dir, &mut visit) {
            return;
        }
    }
}

/// Removes a temporary file of ours that a crash left behind (older than a day).
fn remove_if_stale(path: &Path) {
    let stale = std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| {
            t.elapsed()
                .is_ok_and(|age| age > std::time::Duration::from_secs(86_400))
        });
    if stale {
        let _ = std::fs::remove_file(path);
    }
}

/// Directories below `root` (each needs an inotify watch), without following symlinks.
pub fn count_dirs(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_dir())
        .count() as u64
}

/// Walks one directory tree below `root`. Returns `false` if `visit` asked to stop.
pub fn walk_dir(root: &Path, dir: &Path, visit: &mut impl FnMut(Item) -> bool) -> bool {
    // follow_links(false): symlinks are reported as symlinks, never descended into.
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let item = match entry {
            Err(e) => {
                // A directory removed while we walk it (Synapse, or the sweep) is normal.
                if e.io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
                {
                    continue;
                }
                let path = e
                    .path()
                    .map(Path::to_owned)
                    .unwrap_or_else(|| dir.to_owned());
                Item::Problem(Problem::Unreadable {
                    path,
                    error: e.to_string(),
                })
            }
            Ok(entry) if !entry.file_type().is_file() => continue,
            // Our own temporary file (a heal in progress), never media; one left by a crash is
            // removed once it is a day old.
            Ok(entry) if entry.file_name().to_str().is_some_and(layout::is_temp_name) => {
                remove_if_stale(entry.path());
                continue;
            }
            Ok(entry) => match entry.metadata() {
                Err(e)
                    if e.io_error()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(e) => Item::Problem(Problem::Unreadable {
                    path: entry.path().to_owned(),
                    error: e.to_string(),
                }),
                Ok(meta) => match MediaPath::from_absolute(root, entry.path()) {
                    Ok(path) => Item::File(Found {
                        path,
                        snapshot: Snapshot::of(&meta),
                    }),
                    Err(e) => Item::Problem(Problem::BadName {
                        path: entry.path().to_owned(),
                        error: e.to_string(),
                    }),
                },
            },
        };
        if !visit(item) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn walks_media_dirs_only_and_never_follows_links() {
        let store = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = store.path().canonicalize().unwrap();
        let mk = |rel: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, rel).unwrap();
        };
        mk("local_content/ab/cd/efg");
        mk("local_thumbnails/ab/cd/efg/32-32-image-png-crop");
        mk("remote_content/example.org/ab/cd/xyz");
        mk("url_cache/2024-01-01/abc");
        mk("not_media/x");
        std::fs::write(outside.path().join("secret"), "no").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            root.join("local_content/ab/cd/link"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("local_content/ab/linkdir")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("remote_thumbnail")).unwrap();
        std::fs::write(
            root.join(OsStr::from_bytes(b"local_content/ab/cd/\xff")),
            "x",
        )
        .unwrap();

        let mut files = Vec::new();
        let mut problems = Vec::new();
        walk(&root, false, |item| {
            match item {
                Item::File(f) => files.push(f.path.to_string()),
                Item::Problem(p) => problems.push(p),
            }
            true
        });
        files.sort();
        assert_eq!(
            files,
            [
                "local_content/ab/cd/efg",
                "local_thumbnails/ab/cd/efg/32-32-image-png-crop",
                "remote_content/example.org/ab/cd/xyz"
            ]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| matches!(p, Problem::BadName { .. }))
        );
        assert!(
            problems
                .iter()
                .any(|p| matches!(p, Problem::SymlinkedDir { .. }))
        );

        let mut with_url = 0;
        walk(&root, true, |item| {
            with_url += matches!(item, Item::File(_)) as usize;
            true
        });
        assert_eq!(with_url, 4);
    }
}
