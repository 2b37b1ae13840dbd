//! Healing a bad local copy: replacing a local file that differs from its verified object with the
//! object's bytes, atomically, so Synapse stops serving a truncated or otherwise damaged file.
//!
//! Crash ordering: the object is streamed into a temporary file in the same directory (its name
//! starts with [`crate::layout::TEMP_PREFIX`], which scans and the watcher ignore), checked
//! against what the object must hold (size, MD5, SHA-256 as known), fsync'd, and only then renamed
//! over the bad copy, right after checking that the bad copy is still exactly the file that was
//! judged (same size and mtime); then the directory is fsync'd. A crash at any point leaves either
//! the bad copy or the healed file at the path, never a partial one, plus at worst a temporary file
//! (removed by the next scan once a day old). The object is only read.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::digest::{self, Snapshot, Stat};
use super::s3::ObjectStore;
use super::verdict::Expect;
use crate::layout::{MediaPath, TEMP_PREFIX};
use crate::md5::Md5;
use crate::sha256::Sha256;
use crate::state::{Record, now_ms};

/// How a heal ended.
#[derive(Debug)]
pub enum Healed {
    /// The path now holds the object's bytes; the record describes the new file.
    Done(Record),
    /// Some process has the file open for writing (Synapse writing it back right now): later.
    Busy,
    /// The file changed since it was judged: look again.
    Changed,
    /// The object is gone.
    ObjectGone,
    /// The object's bytes are not what they must be: nothing to heal from.
    Mismatch(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HealError {
    #[error("cannot write the healed copy of {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    S3(#[from] super::s3::S3Error),
}

/// Replaces the bad copy at `path` (judged as `bad`) with the object at `key`.
pub async fn heal(
    root: &Path,
    path: &MediaPath,
    store: &ObjectStore,
    key: &str,
    bad: Snapshot,
    expect: Expect,
    settle: Duration,
) -> Result<Healed, HealError> {
    let abs = path.to_path(root);
    let io_err = |source| HealError::Io {
        path: abs.clone(),
        source,
    };
    // Synapse may be writing the file back right now: its close event brings it here again.
    let busy = blocking({
        let abs = abs.clone();
        move || {
            let young =
                (bad.mtime_ns / 1_000_000).max(0) as u64 + settle.as_millis() as u64 > now_ms();
            match digest::open_for_writing(&abs) {
                Some(open) => open,
                None => young,
            }
        }
    })
    .await;
    if busy {
        return Ok(Healed::Busy);
    }
    let Some(body) = store.get_stream(key).await? else {
        return Ok(Healed::ObjectGone);
    };
    let tmp = temp_path(&abs);
    let result = async {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
            .await
            .map_err(io_err)?;
        let (mut md5, mut sha, mut size) = (Md5::new(), Sha256::new(), 0u64);
        let limit = expect.size.unwrap_or(u64::MAX);
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| io_err(io::Error::other(e)))?;
            size += chunk.len() as u64;
            if size > limit {
                return Ok(Err(format!(
                    "the object is larger than the {limit} bytes verified"
                )));
            }
            md5.update(&chunk);
            sha.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err)?;
        }
        let (md5, sha) = (md5.finalize(), sha.finalize());
        if let Some(why) = mismatch(&expect, size, &md5, &sha) {
            return Ok(Err(why));
        }
        file.sync_all().await.map_err(io_err)?;
        Ok::<_, HealError>(Ok((md5, sha)))
    }
    .await;
    let (md5, sha) = match result {
        Ok(Ok(d)) => d,
        Ok(Err(why)) => {
            let _ = std::fs::remove_file(&tmp);
            return Ok(Healed::Mismatch(why));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let (root, path) = (root.to_owned(), path.clone());
    blocking(move || replace(&root, &path, &tmp, bad, md5, sha))
        .await
        .map_err(io_err)
}

/// The rename, once the bad copy is checked unchanged. Blocking.
fn replace(
    root: &Path,
    path: &MediaPath,
    tmp: &Path,
    bad: Snapshot,
    md5: [u8; 16],
    sha: [u8; 32],
) -> io::Result<Healed> {
    let abs = path.to_path(root);
    let give_up = |h| {
        let _ = std::fs::remove_file(tmp);
        Ok(h)
    };
    // A symlinked directory on the way would make the rename land outside the store.
    if !path.parents_are_dirs(root)? {
        return give_up(Healed::Changed);
    }
    let mode = match std::fs::symlink_metadata(&abs) {
        Ok(m) if m.file_type().is_file() && Snapshot::of(&m) == bad => {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o7777
        }
        Ok(_) => return give_up(Healed::Changed),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return give_up(Healed::Changed),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(tmp, &abs)?;
    if let Some(dir) = abs.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    match digest::stat(&abs)? {
        Stat::File(now) => Ok(Healed::Done(
            Record::new(now.size, now.mtime_ns, md5).with_sha256(sha),
        )),
        _ => Ok(Healed::Changed),
    }
}

/// Why the object's bytes are not the expected ones, if they are not.
fn mismatch(expect: &Expect, size: u64, md5: &[u8; 16], sha: &[u8; 32]) -> Option<String> {
    if expect.size.is_some_and(|s| s != size) {
        return Some(format!(
            "the object has {size} bytes, {} were verified",
            expect.size.unwrap_or_default()
        ));
    }
    if expect.md5.is_some_and(|m| &m != md5) {
        return Some("the object's MD5 differs from the one verified".into());
    }
    if expect.sha256.is_some_and(|s| &s != sha) {
        return Some("the object's SHA-256 differs from Synapse's sha256".into());
    }
    None
}

/// `DIR/.synapse-s3-offload-heal.NAME.PID.RANDOM` beside the file.
fn temp_path(abs: &Path) -> PathBuf {
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    abs.with_file_name(format!(
        "{TEMP_PREFIX}{name}.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking heal step does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_checks_every_known_field() {
        let e = Expect {
            size: Some(3),
            md5: Some([1; 16]),
            sha256: Some([2; 32]),
        };
        assert_eq!(mismatch(&e, 3, &[1; 16], &[2; 32]), None);
        assert!(mismatch(&e, 4, &[1; 16], &[2; 32]).is_some());
        assert!(mismatch(&e, 3, &[0; 16], &[2; 32]).is_some());
        assert!(mismatch(&e, 3, &[1; 16], &[0; 32]).is_some());
        assert_eq!(mismatch(&Expect::default(), 9, &[0; 16], &[0; 32]), None);
    }

    #[test]
    fn temp_files_are_beside_the_file_and_marked() {
        let t = temp_path(Path::new("/s/local_content/ab/cd/efgh"));
        assert_eq!(t.parent(), Some(Path::new("/s/local_content/ab/cd")));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(TEMP_PREFIX) && name.contains("efgh"),
            "{name}"
        );
    }
}
