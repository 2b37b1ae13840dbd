//! The scan stage: full walks of the store at startup, every `scan_interval`
//! (`scan_interval_when_degraded` without full inotify coverage) and whenever events were lost.
//!
//! inotify is a hint, the scan is the truth: every gap the watch cannot close itself (a lost
//! event, a channel overflow, a watch error, the watch limit) is a [`Signals::full_scan`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::intake::{Entry, Intake};
use super::{Item, Problem};

/// Why the watch does not cover the whole store. Each cause is entered and left on its own;
/// the daemon is degraded (full scans every `scan_interval_when_degraded`) while any is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blind {
    /// inotify's watch limit: left only by a restart (the limit is a sysctl).
    WatchLimit = 1,
    /// The watch could not be set up (or re-established).
    WatchFailed = 2,
    /// A scan could not read part of the store (notify skips what it cannot read, so those
    /// directories are unwatched too); left after a clean full scan and a new watch.
    Unreadable = 4,
    /// The media store's root is gone (deleted, moved away, unmounted); left when it is back and
    /// watched again.
    RootGone = 8,
}

impl Blind {
    const ALL: [Blind; 4] = [
        Blind::WatchLimit,
        Blind::WatchFailed,
        Blind::Unreadable,
        Blind::RootGone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Blind::WatchLimit => "inotify watch limit",
            Blind::WatchFailed => "watch failed",
            Blind::Unreadable => "unreadable part of the store",
            Blind::RootGone => "media store gone",
        }
    }
}

/// What the watch (and the intake) tell the scan stage: scan everything now, scan more often
/// from now on, the watch is in place; and what the scan stage tells the watch: watch again.
/// Cheap to clone; every clone is the same signals.
#[derive(Clone)]
pub struct Signals {
    /// Set when events were lost; the scan stage then runs a full scan.
    rescan: Arc<AtomicBool>,
    wake: Arc<Notify>,
    /// The [`Blind`] causes present (bits); degraded mode while not zero.
    degraded: Arc<AtomicU8>,
    /// The watch is in place: a scan that starts now misses nothing written before it started.
    watching: Arc<AtomicBool>,
    /// Setting up the watch is over (in place or failed): the next scan ends the startup.
    settled: Arc<AtomicBool>,
    /// Asks the watch stage to drop its watch and set up a new one (the cause of a gap is gone).
    rewatch: Arc<Notify>,
}

impl Signals {
    /// Signals with the startup scan requested.
    pub fn new() -> Signals {
        Signals {
            rescan: Arc::new(AtomicBool::new(true)),
            wake: Arc::new(Notify::new()),
            degraded: Arc::new(AtomicU8::new(0)),
            watching: Arc::new(AtomicBool::new(false)),
            settled: Arc::new(AtomicBool::new(false)),
            rewatch: Arc::new(Notify::new()),
        }
    }

    /// Events were lost: a full scan, now.
    pub fn full_scan(&self) {
        self.rescan.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// A full scan at the scan stage's next wake-up (not a reason to wake it).
    pub fn full_scan_later(&self) {
        self.rescan.store(true, Ordering::SeqCst);
    }

    /// Wakes the scan stage so that it picks its interval again.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Enters degraded mode for `why`; `true` if that cause is new (the caller logs it, once).
    /// Wakes the scan stage, which picks the shorter interval at once.
    pub fn degrade(&self, why: Blind) -> bool {
        let new = self.degraded.fetch_or(why as u8, Ordering::SeqCst) & why as u8 == 0;
        if new {
            self.update_gauge();
            self.wake.notify_one();
        }
        new
    }

    /// `why` is gone; `true` if it was present (the caller logs it).
    pub fn recover(&self, why: Blind) -> bool {
        let was = self.degraded.fetch_and(!(why as u8), Ordering::SeqCst) & why as u8 != 0;
        if was {
            self.update_gauge();
        }
        was
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst) != 0
    }

    pub fn has(&self, why: Blind) -> bool {
        self.degraded.load(Ordering::SeqCst) & why as u8 != 0
    }

    /// The causes present, for `status` and the log.
    pub fn blind_causes(&self) -> Vec<&'static str> {
        let bits = self.degraded.load(Ordering::SeqCst);
        Blind::ALL
            .iter()
            .filter(|b| bits & **b as u8 != 0)
            .map(|b| b.label())
            .collect()
    }

    fn update_gauge(&self) {
        metrics::gauge!(crate::metrics::DEGRADED).set(self.is_degraded() as u8 as f64);
    }

    /// The watch is in place. Files written while the watches were being added have no events:
    /// one more scan, now that the watch is in place, finds them (it costs only stats: recorded
    /// and queued files are skipped).
    pub fn watching(&self) {
        self.watching.store(true, Ordering::SeqCst);
        self.settled.store(true, Ordering::SeqCst);
        self.full_scan();
    }

    /// The watch is being replaced: scans that start now are not under a complete watch.
    pub fn unwatched(&self) {
        self.watching.store(false, Ordering::SeqCst);
    }

    /// The watch could not be set up (the caller reports why and asks for a scan).
    pub fn watch_failed(&self) {
        self.settled.store(true, Ordering::SeqCst);
    }

    /// Asks the watch stage for a new watch (and, through it, a full scan under it).
    pub fn rewatch(&self) {
        self.rewatch.notify_one();
    }

    /// Resolves when a new watch was asked for.
    pub async fn rewatch_asked(&self) {
        self.rewatch.notified().await
    }
}

impl Default for Signals {
    fn default() -> Self {
        Signals::new()
    }
}

/// The end of the startup: the first full scan that started once the watch was set up has
/// finished. From then on a file written into the store reaches the queue by its events (or, in
/// degraded mode, by the next scan). Cheap to clone; every clone is the same signal.
#[derive(Clone, Debug)]
pub struct Ready(Arc<tokio::sync::watch::Sender<Option<bool>>>);

impl Ready {
    pub fn new() -> Ready {
        Ready(Arc::new(tokio::sync::watch::Sender::new(None)))
    }

    /// Resolves once the startup is over: `true` if the watch covers the store, `false` in
    /// degraded mode (files are then found by scans every `scan_interval_when_degraded`).
    pub async fn wait(&self) -> bool {
        let mut rx = self.0.subscribe();
        let watched = *rx
            .wait_for(Option::is_some)
            .await
            .expect("the sender lives in self");
        watched.expect("waited for it")
    }

    /// `Some(watched)` once the startup is over.
    pub fn get(&self) -> Option<bool> {
        *self.0.borrow()
    }

    fn set(&self, watched: bool) {
        self.0.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(watched);
            }
            first
        });
    }
}

impl Default for Ready {
    fn default() -> Self {
        Ready::new()
    }
}

/// The scan stage: owns the periodic and triggered full walks.
pub struct Scanner {
    pub intake: Intake,
    pub signals: Signals,
    pub interval: Duration,
    pub interval_when_degraded: Duration,
    pub ready: Ready,
}

impl Scanner {
    /// Full scans: at startup, on lost events, and periodically, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let s = &self.signals;
        let mut last_took = Duration::ZERO;
        loop {
            if s.rescan.swap(false, Ordering::SeqCst) {
                let started = std::time::Instant::now();
                self.scan(&cancel).await;
                last_took = started.elapsed();
            }
            let every = periodic_wait(
                if s.is_degraded() {
                    self.interval_when_degraded
                } else {
                    self.interval
                },
                last_took,
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = s.wake.notified() => {}
                _ = tokio::time::sleep(every) => s.rescan.store(true, Ordering::SeqCst),
            }
        }
    }

    async fn scan(&self, cancel: &CancellationToken) {
        let started = std::time::Instant::now();
        // Logged with the result: the first scan with `watched=true` ends the startup (what it
        // did not find arrives by events); benchmarks and tests wait for it (and for `ready`).
        let watched = self.signals.watching.load(Ordering::SeqCst);
        let settled = self.signals.settled.load(Ordering::SeqCst);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Entry>>(4);
        let intake = self.intake.clone();
        let stop = cancel.clone();
        let walker = tokio::task::spawn_blocking(move || {
            let mut chunk = Vec::new();
            let mut files = 0u64;
            let mut unreadable = 0u64;
            let mut complete = true;
            super::walk(&intake.root, intake.include_url_cache, |item| {
                files += matches!(item, Item::File(_)) as u64;
                unreadable += matches!(item, Item::Problem(Problem::Unreadable { .. })) as u64;
                if let Some(x) = intake.to_enqueue(item) {
                    chunk.push(x);
                    if chunk.len() >= 1000 && tx.blocking_send(std::mem::take(&mut chunk)).is_err()
                    {
                        complete = false;
                        return false;
                    }
                }
                complete = !stop.is_cancelled();
                complete
            });
            if !chunk.is_empty() {
                let _ = tx.blocking_send(chunk);
            }
            (files, unreadable, complete)
        });
        let mut not_recorded = 0;
        while let Some(chunk) = rx.recv().await {
            not_recorded += chunk.len();
            self.intake.enqueue(chunk).await;
        }
        let (files, unreadable, complete) = walker.await.unwrap_or((0, 0, false));
        metrics::counter!(crate::metrics::SCANS).increment(1);
        metrics::histogram!(crate::metrics::SCAN_DURATION).record(started.elapsed().as_secs_f64());
        tracing::info!(
            files,
            not_recorded,
            watched,
            secs = started.elapsed().as_secs_f64(),
            "Scan finished."
        );
        // A complete walk that could read everything ends the "unreadable" cause (EMFILE, ESTALE,
        // permissions fixed): notify skipped what it could not read, so a new watch is set up
        // (and scanned under), rather than staying degraded until a restart.
        if complete && unreadable == 0 && self.signals.recover(Blind::Unreadable) {
            self.intake.unreadable.lock().expect("not poisoned").clear();
            tracing::info!("The whole media store is readable again; watching it again.");
            self.signals.rewatch();
        }
        // Only after everything it found is durably queued (`enqueue` returned above). A scan
        // stopped by shutdown is not a finished startup.
        if settled && !cancel.is_cancelled() {
            self.ready.set(watched);
        }
    }
}

/// How long the scan stage waits for its next periodic scan: the configured interval, but at
/// least three times what the last scan took, so that on a large store scans (back to back in
/// degraded mode, `scan_interval_when_degraded` being a minute) take at most a quarter of the
/// time. Scans asked for (lost events, a new watch) are not delayed.
pub fn periodic_wait(interval: Duration, last_scan_took: Duration) -> Duration {
    interval.max(last_scan_took.saturating_mul(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_scans_take_at_most_a_quarter_of_the_time() {
        let min = Duration::from_secs(60);
        assert_eq!(periodic_wait(min, Duration::from_secs(1)), min);
        assert_eq!(
            periodic_wait(min, Duration::from_secs(50)),
            Duration::from_secs(150)
        );
    }

    #[tokio::test]
    async fn ready_resolves_once_with_the_first_startup_and_keeps_it() {
        let ready = Ready::new();
        assert_eq!(ready.get(), None);
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "not before the startup is over");
        ready.set(false);
        // A later scan (the watch was set up after all) does not change the startup's answer.
        ready.set(true);
        assert!(!waiter.await.unwrap());
        assert_eq!(ready.get(), Some(false));
        assert!(!ready.wait().await, "resolves at once afterwards");
    }

    #[test]
    fn degraded_mode_is_entered_once_and_the_watch_asks_for_a_scan() {
        let s = Signals::new();
        assert!(s.rescan.swap(false, Ordering::SeqCst), "the startup scan");
        assert!(!s.is_degraded());
        assert!(s.degrade(Blind::Unreadable));
        assert!(!s.degrade(Blind::Unreadable), "said once");
        assert!(s.degrade(Blind::RootGone), "each cause on its own");
        assert_eq!(
            s.blind_causes(),
            ["unreadable part of the store", "media store gone"]
        );
        assert!(s.recover(Blind::Unreadable));
        assert!(!s.recover(Blind::Unreadable), "left once");
        assert!(s.is_degraded(), "another cause remains");
        assert!(s.recover(Blind::RootGone));
        assert!(
            !s.is_degraded(),
            "degraded mode is left once every cause is gone"
        );
        s.watching();
        assert!(s.watching.load(Ordering::SeqCst) && s.settled.load(Ordering::SeqCst));
        assert!(s.rescan.load(Ordering::SeqCst), "a scan under the watch");
    }
}
