//! inotify (through `notify`'s raw watcher) turned into hints for the queue.
//!
//! inotify is a hint, the scan is the truth: events can be lost (queue overflow, a file written into
//! a directory before its watch was added, the watch limit). Each gap turns into a scan:
//! - `Create(Folder)` / a directory moved in → that directory is scanned right away (measured: 2–10 %
//!   of files written straight into a brand-new directory produce no event at all);
//! - a `Rescan` event (kernel queue overflow), our own bridge channel being full, or a watch error
//!   → a full scan;
//! - `MaxFilesWatch` → degraded mode: logged once with the sysctl to raise, full scans every
//!   `scan_interval_when_degraded`;
//! - a kernel queue overflow, the root replaced, remounted or gone: see [`stage`] (a new watch).
//!
//! A file is ready on `Access(Close(Write))` or when moved in (`Modify(Name(To|Both))`). `Create`,
//! `Modify(Data)` and `Access(Open)` are ignored: they come before the file is complete, and every
//! download Synapse serves opens files.
//!
//! The watch stage ([`Watcher`]) owns the watch and its event loop.

mod stage;

pub use stage::Watcher;

use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};

/// What an event asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A file was closed after writing, or moved in: enqueue it.
    File(PathBuf),
    /// A directory appeared (created or moved in): scan it, its files may have no events.
    Dir(PathBuf),
    /// A file was deleted: if we uploaded it a moment ago, Synapse's spam checker may have
    /// rejected it (see `upload::withdraw`).
    Removed(PathBuf),
    /// Events were lost: scan everything.
    Rescan,
}

/// Maps one event to actions (a table-driven unit test pins this down).
pub fn classify(event: &Event) -> Vec<Action> {
    if event.need_rescan() {
        return vec![Action::Rescan];
    }
    match &event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            event.paths.iter().cloned().map(Action::File).collect()
        }
        EventKind::Create(CreateKind::Folder) => {
            event.paths.iter().cloned().map(Action::Dir).collect()
        }
        EventKind::Remove(RemoveKind::File) => {
            event.paths.iter().cloned().map(Action::Removed).collect()
        }
        // Moved in: may be a file or a whole directory; the handler checks which.
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            event.paths.iter().cloned().map(Action::File).collect()
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => event
            .paths
            .get(1)
            .cloned()
            .map(Action::File)
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// What reaches the daemon from the watcher thread.
pub enum Msg {
    Event(Event),
    Error(notify::Error),
}

/// The live watcher: one non-recursive inotify watch per directory, added by
/// [`Watch::add_tree`] (the whole store at setup, each new directory as it appears). Dropping it
/// stops the watch.
///
/// Why not notify's recursive mode: it adds all the watches in notify's own thread, which reads
/// no event meanwhile, while its walk's opendirs are events on the watches already added (notify
/// watches opens). Any store of more than ~16,000 directories (a year of Synapse media has far
/// more) overflowed the kernel queue during every setup: each overflow asked for a new watch,
/// whose setup overflowed again — a full scan and a new watch every 5 s, for ever (seen on 24,000
/// directories). One `watch` call per directory lets notify's thread read between two.
pub struct Watch {
    watcher: std::sync::Mutex<notify::RecommendedWatcher>,
}

impl Watch {
    /// Watches `dir` and every directory below it (symlinks are not followed). Returns how many
    /// were watched. A directory removed meanwhile is skipped; the watch limit
    /// (`fs.inotify.max_user_watches`) anywhere, or any error on `dir` itself, is the error.
    /// Blocking: walks the tree.
    pub fn add_tree(&self, dir: &Path) -> Result<u64, notify::Error> {
        let mut n = 0;
        let dirs = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_dir());
        for entry in dirs {
            let r = self
                .watcher
                .lock()
                .expect("not poisoned")
                .watch(entry.path(), RecursiveMode::NonRecursive);
            match r {
                Ok(()) => n += 1,
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {}
                Err(e) if is_watch_limit(&e) || entry.depth() == 0 => return Err(e),
                // An unreadable subdirectory: the scans report it (degraded until readable).
                Err(e) => {
                    tracing::debug!(dir = %entry.path().display(), error = %e, "Cannot watch a directory.")
                }
            }
        }
        Ok(n)
    }
}

/// A watcher with no watch yet (see [`Watch::add_tree`]); events go to `tx`. When `tx` is full the
/// event is dropped and `overflowed(kernel_overflow)` is called instead (`true` when the event
/// dropped was the kernel's own queue overflow): the daemon then rescans (never blocks notify's
/// thread, never loses a file silently).
pub fn watcher(
    root: &Path,
    tx: tokio::sync::mpsc::Sender<Msg>,
    overflowed: impl Fn(bool) + Send + 'static,
) -> Result<Watch, notify::Error> {
    let own_root = root.to_path_buf();
    let handler = move |res: notify::Result<Event>| {
        let msg = match res {
            // notify 8.2 watches opens and writes too (no way to leave them out): every read of
            // a media (ours when uploading, a scan's opendir, Synapse serving it) is an event.
            // Dropped here, they never fill the channel: a full channel means a full scan, and
            // the scan's own opendirs of a large store filled it again (a soak saw 54 "overflows"
            // in a row after one real one, each a full scan of 20,000 directories).
            Ok(ev) if !matters(&ev, &own_root) => return,
            Ok(ev) => Msg::Event(ev),
            Err(e) => Msg::Error(e),
        };
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
            overflowed(matches!(&msg, Msg::Event(ev) if ev.need_rescan()));
        }
    };
    // notify follows symlinked directories by default: their events would then name files outside
    // the store under store paths. Never follow them (invariant 5); scans do not either.
    let config = notify::Config::default().with_follow_symlinks(false);
    let watcher = notify::RecommendedWatcher::new(handler, config)?;
    Ok(Watch {
        watcher: std::sync::Mutex::new(watcher),
    })
}

/// [`watcher`] with the whole tree of `root` watched. Blocking.
pub fn start(
    root: &Path,
    tx: tokio::sync::mpsc::Sender<Msg>,
    overflowed: impl Fn(bool) + Send + 'static,
) -> Result<Watch, notify::Error> {
    let w = watcher(root, tx, overflowed)?;
    w.add_tree(root)?;
    Ok(w)
}

/// Whether the watch stage does anything with `event`: an action, or the root's own removal.
pub fn matters(event: &Event, root: &Path) -> bool {
    event.need_rescan() || !classify(event).is_empty() || touches_root(event, root)
}

/// The event is about the root itself being deleted or moved away (its watch then sees
/// nothing more): the watch stage checks the root at once rather than at its next check.
pub fn touches_root(event: &Event, root: &Path) -> bool {
    matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
    ) && event.paths.iter().any(|p| p == root)
}

pub fn is_watch_limit(e: &notify::Error) -> bool {
    matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
}

/// The advice logged once when inotify's watch limit is reached.
pub const WATCH_LIMIT_ADVICE: &str = "inotify watch limit reached (fs.inotify.max_user_watches): new files are still uploaded, but found by periodic scans (scan_interval_when_degraded) instead of instantly. Raise it: `sysctl fs.inotify.max_user_watches=1048576` and persist it in /etc/sysctl.d/, then restart";

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{DataChange, Flag, RemoveKind};

    #[test]
    fn reads_and_writes_do_not_reach_the_stage() {
        let root = Path::new("/m");
        let ev = |kind| Event::new(kind).add_path(PathBuf::from("/m/a/b"));
        assert!(!matters(
            &ev(EventKind::Access(AccessKind::Open(AccessMode::Any))),
            root
        ));
        assert!(!matters(
            &ev(EventKind::Modify(ModifyKind::Data(DataChange::Any))),
            root
        ));
        assert!(!matters(
            &ev(EventKind::Access(AccessKind::Close(AccessMode::Read))),
            root
        ));
        assert!(matters(
            &ev(EventKind::Access(AccessKind::Close(AccessMode::Write))),
            root
        ));
        assert!(matters(&ev(EventKind::Remove(RemoveKind::File)), root));
        let root_gone =
            Event::new(EventKind::Remove(RemoveKind::Folder)).add_path(PathBuf::from("/m"));
        assert!(matters(&root_gone, root));
        assert!(matters(
            &Event::new(EventKind::Other).set_flag(Flag::Rescan),
            root
        ));
    }

    #[test]
    fn event_table() {
        let p = |s: &str| PathBuf::from(s);
        let ev = |kind, paths: &[&str]| {
            let mut e = Event::new(kind);
            for x in paths {
                e = e.add_path(p(x));
            }
            e
        };
        let cases: Vec<(Event, Vec<Action>)> = vec![
            (
                ev(
                    EventKind::Access(AccessKind::Close(AccessMode::Write)),
                    &["/m/a"],
                ),
                vec![Action::File(p("/m/a"))],
            ),
            (
                ev(
                    EventKind::Access(AccessKind::Close(AccessMode::Read)),
                    &["/m/a"],
                ),
                vec![],
            ),
            (
                ev(
                    EventKind::Access(AccessKind::Open(AccessMode::Any)),
                    &["/m/a"],
                ),
                vec![],
            ),
            (ev(EventKind::Create(CreateKind::File), &["/m/a"]), vec![]),
            (
                ev(EventKind::Create(CreateKind::Folder), &["/m/d"]),
                vec![Action::Dir(p("/m/d"))],
            ),
            (
                ev(
                    EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                    &["/m/a"],
                ),
                vec![],
            ),
            (
                ev(
                    EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                    &["/m/a"],
                ),
                vec![],
            ),
            (
                ev(
                    EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                    &["/m/b"],
                ),
                vec![Action::File(p("/m/b"))],
            ),
            (
                ev(
                    EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                    &["/m/a", "/m/b"],
                ),
                vec![Action::File(p("/m/b"))],
            ),
            (
                ev(EventKind::Remove(RemoveKind::File), &["/m/a"]),
                vec![Action::Removed(p("/m/a"))],
            ),
            (ev(EventKind::Remove(RemoveKind::Folder), &["/m/a"]), vec![]),
            (
                Event::new(EventKind::Other).set_flag(Flag::Rescan),
                vec![Action::Rescan],
            ),
        ];
        for (event, want) in cases {
            assert_eq!(classify(&event), want, "{event:?}");
        }
    }

    #[tokio::test]
    async fn symlinked_directories_are_not_watched() {
        let store = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = store.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("local_content")).unwrap();
        let link = root.join("local_content/li");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let _watch = start(&root, tx, |_| {}).unwrap();
        std::fs::write(outside.path().join("behind"), b"x").unwrap();
        std::fs::write(root.join("local_content/sentinel"), b"x").unwrap();
        // One inotify descriptor delivers in order: an event for the file behind the symlink
        // would come before the sentinel's close.
        loop {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("the sentinel's events")
                .expect("the watcher runs");
            let Msg::Event(ev) = msg else { continue };
            for p in &ev.paths {
                assert!(!p.starts_with(&link), "an event behind the symlink: {ev:?}");
            }
            if classify(&ev) == [Action::File(root.join("local_content/sentinel"))] {
                return;
            }
        }
    }
}
