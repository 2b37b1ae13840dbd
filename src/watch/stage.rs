//! The watch stage: sets up the inotify watch beside the startup scan, turns events into queue
//! entries and directory scans, turns every gap it notices into a full scan, and sets the watch
//! up again whenever the one it has stopped covering the store.
//!
//! A watch can go blind without an error: after an inotify queue overflow the kernel has dropped
//! the "directory created" events, so notify never added watches for those directories; a media
//! store replaced (`mv media media.old; mkdir media`) or mounted over keeps the old inodes'
//! watches, which see nothing any more. So:
//! - an overflow → a full scan at once, and a new watch (walks the tree again, adding every
//!   directory) followed by a full scan under it;
//! - the root's identity (device, inode) is checked every [`ROOT_CHECK`] and on the root's own
//!   delete/move events: changed → a new watch and a scan; gone → degraded mode until it is back;
//! - the scan stage asks for a new watch once a part it could not read is readable again.
//!
//! A new watch is set up at most every [`REWATCH_MIN_GAP`] (an overflow storm must not turn into
//! back-to-back tree walks); the full scan asked at once covers the wait.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Action, Msg};
use crate::scan::{Blind, Intake, Signals};

/// When a new directory is scanned again after its immediate scan.
const NEW_DIR_RESCANS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

/// How often the root's identity is checked (a `stat`): the longest a remount goes unnoticed.
pub const ROOT_CHECK: Duration = Duration::from_secs(5);

/// The shortest time between two watch setups.
pub const REWATCH_MIN_GAP: Duration = Duration::from_secs(5);

/// The root directory's identity: a new directory, or a file system mounted over it, has another
/// device or inode. The mount id tells a file system unmounted and mounted again between two
/// checks (same device, same root inode; the kernel removed every watch with the unmount, and
/// notify reports neither `IN_UNMOUNT` nor `IN_IGNORED`). It is the unique mount id of Linux ≥ 6.8
/// (`STATX_MNT_ID_UNIQUE`): the older one is reused at once by the next mount (seen: unmount and
/// mount again got the same id). Before 6.8 the old id (a remount in one check can go unseen
/// when it gets the same); 0 where `statx` has none (before 5.8).
type Identity = (u64, u64, u64);

fn identity(root: &Path) -> Option<Identity> {
    let m = std::fs::metadata(root).ok().filter(|m| m.is_dir())?;
    Some((m.dev(), m.ino(), mount_id(root).unwrap_or(0)))
}

fn mount_id(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    for mask in [libc::STATX_MNT_ID_UNIQUE, libc::STATX_MNT_ID] {
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a valid out-pointer for the call's duration.
        let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, mask, &mut st) };
        if r == 0 && st.stx_mask & mask != 0 {
            return Some(st.stx_mnt_id);
        }
    }
    None
}

/// Why the event loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Stop,
    Rewatch(&'static str),
}

pub struct Watcher {
    pub intake: Intake,
    pub signals: Signals,
    /// Capacity of the channel between notify's thread and the event loop; when it is full an
    /// event is dropped and a full scan is asked for instead.
    pub event_buffer: usize,
}

impl Watcher {
    /// Watches the store and handles its events until `cancel`; the watch ends with it.
    pub async fn run(self, cancel: CancellationToken) {
        let mut first = true;
        let mut last_setup: Option<Instant> = None;
        loop {
            if let Some(t) = last_setup {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(t + REWATCH_MIN_GAP) => {}
                }
            }
            last_setup = Some(Instant::now());
            // Taken before the walk that adds the watches: a root replaced during it shows as a
            // change at the next check (one more setup), never as a missed one.
            let id = identity(&self.intake.root);
            let (tx, rx) = tokio::sync::mpsc::channel(self.event_buffer);
            let watch = self.watcher(tx, id.is_some());
            let setup = self.setup(watch.clone(), first);
            first = false;
            let end = self.events(rx, id, watch.as_ref(), &cancel).await;
            // Waits for the watches to be added (or failed), then drops them.
            let _ = setup.await;
            drop(watch);
            match end {
                End::Stop => return,
                End::Rewatch(why) => {
                    metrics::counter!(crate::metrics::REWATCHES, "reason" => why).increment(1);
                    self.signals.unwatched();
                }
            }
        }
    }

    /// A new watcher (no watch yet), or `None` when the root is missing or notify cannot start.
    fn watcher(
        &self,
        tx: tokio::sync::mpsc::Sender<Msg>,
        root_present: bool,
    ) -> Option<Arc<super::Watch>> {
        if !root_present {
            // The event loop reports it (RootGone) and asks again once it is back.
            self.signals.watch_failed();
            return None;
        }
        let overflowed = self.signals.clone();
        // Our channel being full loses only our copies of events: a full scan closes that gap.
        // A kernel overflow: the new watch's setup asks for the full scan once its watches are in
        // place (see the event loop's `Action::Rescan`).
        let w = super::watcher(&self.intake.root, tx, move |kernel_overflow| {
            if kernel_overflow {
                tracing::warn!(
                    "inotify queue overflowed; scanning the store and watching it again."
                );
                overflowed.rewatch();
            } else {
                overflowed.full_scan();
            }
        });
        match w {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                self.signals.watch_failed();
                watch_failed(&self.signals, &e);
                None
            }
        }
    }

    /// Adds the watches on a blocking thread (it walks the whole tree). Runs beside the startup
    /// scan, not before it, and while events are handled (the channel would overflow otherwise).
    fn setup(&self, watch: Option<Arc<super::Watch>>, first: bool) -> tokio::task::JoinHandle<()> {
        let root = self.intake.root.clone();
        let signals = self.signals.clone();
        tokio::task::spawn_blocking(move || {
            let Some(watch) = watch else { return };
            match watch.add_tree(&root) {
                Ok(dirs) => {
                    metrics::gauge!(crate::metrics::WATCHED_DIRS).set(dirs as f64);
                    if first {
                        tracing::info!(dirs, "Watching the media store.");
                    } else {
                        tracing::info!(dirs, "Watching the media store again.");
                    }
                    let failed = signals.recover(Blind::WatchFailed);
                    if signals.recover(Blind::RootGone) | failed {
                        tracing::info!("The media store is watched again.");
                    }
                    signals.watching();
                }
                Err(e) => {
                    signals.watch_failed();
                    watch_failed(&signals, &e);
                }
            }
        })
    }

    /// Turns notify's events into queue entries and directory scans. Returns on `cancel`, or
    /// when the watch must be set up again. `id` is the root's identity when the watch was set
    /// up (`None`: the root was missing).
    async fn events(
        &self,
        mut rx: Receiver<Msg>,
        id: Option<Identity>,
        watch: Option<&Arc<super::Watch>>,
        cancel: &CancellationToken,
    ) -> End {
        let s = &self.signals;
        let root = &self.intake.root;
        if id.is_none() {
            root_gone(s, root);
        }
        // New directories are scanned again a little later: notify adds the watch of a new
        // directory only after delivering its Create event, so a file written and closed in
        // between has no event, and an immediate scan may run before it exists. A scan after the
        // watch is in place closes that gap (the file is then either seen by the scan or has its
        // own events).
        let mut rescans: BTreeMap<Instant, Vec<PathBuf>> = Default::default();
        let mut check = tokio::time::interval(ROOT_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The channel closes when the watch could not be set up: the root checks go on.
        let mut open = true;
        loop {
            let next_rescan = rescans.keys().next().copied();
            let first = tokio::select! {
                _ = cancel.cancelled() => return End::Stop,
                _ = s.rewatch_asked() => return End::Rewatch("asked"),
                _ = check.tick() => {
                    if let Some(end) = self.check_root(id) {
                        return end;
                    }
                    continue;
                }
                _ = async { tokio::time::sleep_until(next_rescan.expect("guarded")).await }, if next_rescan.is_some() => {
                    let (_, dirs) = rescans.pop_first().expect("guarded");
                    let found = self.intake.scan_dirs(dirs).await;
                    if !found.is_empty() {
                        self.intake.enqueue(found).await;
                    }
                    continue;
                }
                m = rx.recv(), if open => match m {
                    Some(m) => m,
                    None => { open = false; continue }
                },
            };
            // Batch what is already waiting: one transaction for a burst of events.
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut files = Vec::new();
            let mut new_dirs = Vec::new();
            let mut end = None;
            for msg in batch {
                match msg {
                    Msg::Error(e) if super::is_watch_limit(&e) => watch_failed(s, &e),
                    Msg::Error(e) => {
                        tracing::warn!(error = %crate::Chain(&e), "Watch error; scanning the store and watching it again.");
                        s.full_scan();
                        end = Some(End::Rewatch("watch_error"));
                    }
                    Msg::Event(ev) => {
                        if super::touches_root(&ev, root) {
                            end = end.or(self.check_root(id));
                        }
                        for action in super::classify(&ev) {
                            match action {
                                Action::Rescan => {
                                    // The kernel dropped events, "directory created" ones too:
                                    // those directories have no watch. Watch again, then scan:
                                    // the setup asks for the scan once its watches are added
                                    // (`Signals::watching`). Not both at once: notify's thread
                                    // reads no event while it adds watches, and the scan's
                                    // opendirs (an event each on the new watches) overflowed the
                                    // new queue again; a soak saw 208 overflows in a row after
                                    // one real one, a full scan and a new watch every 5 s.
                                    tracing::warn!(
                                        "inotify queue overflowed; scanning the store and watching it again."
                                    );
                                    end = end.or(Some(End::Rewatch("overflow")));
                                }
                                Action::Dir(dir) => {
                                    let now = Instant::now();
                                    for later in NEW_DIR_RESCANS {
                                        rescans.entry(now + later).or_default().push(dir.clone());
                                    }
                                    new_dirs.push(dir);
                                }
                                Action::Removed(p) => {
                                    if let Some(e) = self.intake.removed(&p) {
                                        files.push(e);
                                    }
                                }
                                Action::File(p) => {
                                    if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                                        new_dirs.push(p);
                                    } else if let Some(mp) = self.intake.media_path(&p) {
                                        files.push(self.intake.closed(mp));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // The batch's new directories are watched (with what they already hold), then scanned
            // together; everything is enqueued in one commit.
            if !new_dirs.is_empty() {
                if let Some(w) = watch {
                    let (w, dirs, s) = (w.clone(), new_dirs.clone(), s.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        for d in dirs {
                            match w.add_tree(&d) {
                                Err(e) if super::is_watch_limit(&e) => watch_failed(&s, &e),
                                _ => {}
                            }
                        }
                    })
                    .await;
                }
                files.extend(self.intake.scan_dirs(new_dirs).await);
            }
            if !files.is_empty() {
                self.intake.enqueue(files).await;
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Compares the root with the one the watch was set up on.
    fn check_root(&self, id: Option<Identity>) -> Option<End> {
        let root = &self.intake.root;
        match (id, identity(root)) {
            (Some(a), Some(b)) if a == b => None,
            (None, None) => None,
            (Some(_), None) => {
                root_gone(&self.signals, root);
                Some(End::Rewatch("store_gone"))
            }
            (None, Some(_)) => {
                tracing::warn!(root = %root.display(), "The media store is back; watching and scanning it.");
                Some(End::Rewatch("store_back"))
            }
            (Some(a), Some(b)) => {
                tracing::warn!(
                    root = %root.display(),
                    was = %format!("{}:{} mount {}", a.0, a.1, a.2),
                    now = %format!("{}:{} mount {}", b.0, b.1, b.2),
                    "The media store was replaced, remounted or a file system mounted over it (device:inode or mount changed); watching and scanning the new one."
                );
                Some(End::Rewatch("store_replaced"))
            }
        }
    }
}

/// The root is missing: nothing can be watched or uploaded until it is back. Said once per
/// disappearance (the degraded cause is the state).
fn root_gone(s: &Signals, root: &Path) {
    if s.degrade(Blind::RootGone) {
        tracing::error!(
            root = %root.display(),
            "The media store is gone (deleted, moved away or unmounted): no new file can be uploaded until it is back. Check the mount (the systemd unit's RequiresMountsFor= should name it); the daemon watches it again as soon as it reappears."
        );
    }
    s.full_scan_later();
}

/// The watch cannot cover the store (the watch limit, or it could not be set up at all):
/// degraded mode, said once, and a full scan now.
fn watch_failed(s: &Signals, e: &notify::Error) {
    let why = if super::is_watch_limit(e) {
        Blind::WatchLimit
    } else {
        Blind::WatchFailed
    };
    if s.degrade(why) {
        if why == Blind::WatchLimit {
            tracing::error!("{}", super::WATCH_LIMIT_ADVICE);
        } else {
            tracing::error!(error = %crate::Chain(e), "Cannot watch the media store; relying on periodic scans (scan_interval_when_degraded).");
        }
    }
    s.full_scan();
}
