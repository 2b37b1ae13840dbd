//! Running as root against a store that belongs to Synapse's user: whatever root creates in
//! `state_dir` (the state database, its directory) is then unusable by the service, which runs as
//! that user and fails with "Permission denied". Said before anything is created.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why running as `euid` against this store and state_dir would break the service, with the fix.
/// Root is fine when the store is root's, or when `state_dir` already is (root is then the user
/// the daemon runs as, e.g. in a container).
pub fn problem(euid: u32, media_store: &Path, state_dir: &Path) -> Option<String> {
    if euid != 0 {
        return None;
    }
    let owner = std::fs::metadata(media_store).ok()?.uid();
    if owner == 0 {
        return None;
    }
    if std::fs::metadata(state_dir).is_ok_and(|m| m.uid() == 0) {
        return None;
    }
    let name = user_name(owner).unwrap_or_else(|| owner.to_string());
    Some(format!(
        "running as root, but the media store {} belongs to {name}: files root creates in state_dir {} would be unusable by the service, which runs as {name}; run as that user (sudo -u {name} synapse-s3-offload …), or, if root already ran, chown -R {name}: {}",
        media_store.display(),
        state_dir.display(),
        state_dir.display()
    ))
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The login name of `uid`, from /etc/passwd (no NSS lookups: this only words a message).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}
