//! The scan stage: full walks of the store at startup, every `scan_interval`
//! (`scan_interval_when_degraded` without full inotify coverage) and whenever events were lost.
//!
//! inotify is a hint, the scan is the truth: every gap the watch cannot close itself (a lost
//! event, a channel overflow, a watch error, the watch limit) is a [`Signals::full_scan`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Item;
use super::intake::{Entry, Intake};

/// What the watch (and the intake) tell the scan stage: scan everything now, scan more often
/// from now on, the watch is in place. Cheap to clone; every clone is the same signals.
#[derive(Clone)]
pub struct Signals {
    /// Set when events were lost; the scan stage then runs a full scan.
    rescan: Arc<AtomicBool>,
    wake: Arc<Notify>,
    /// inotify does not cover the whole store (watch limit, watch error, unreadable part).
    degraded: Arc<AtomicBool>,
    /// The watch is in place: a scan that starts now misses nothing written before it started.
    watching: Arc<AtomicBool>,
    /// Setting up the watch is over (in place or failed): the next scan ends the startup.
    settled: Arc<AtomicBool>,
}

impl Signals {
    /// Signals with the startup scan requested.
    pub fn new() -> Signals {
        Signals {
            rescan: Arc::new(AtomicBool::new(true)),
            wake: Arc::new(Notify::new()),
            degraded: Arc::new(AtomicBool::new(false)),
            watching: Arc::new(AtomicBool::new(false)),
            settled: Arc::new(AtomicBool::new(false)),
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

    /// Enters degraded mode; `true` the first time (the caller logs why, once).
    pub fn degrade(&self) -> bool {
        !self.degraded.swap(true, Ordering::SeqCst)
    }

    /// The watch is in place. Files written while the watches were being added have no events:
    /// one more scan, now that the watch is in place, finds them (it costs only stats: recorded
    /// and queued files are skipped).
    pub fn watching(&self) {
        self.watching.store(true, Ordering::SeqCst);
        self.settled.store(true, Ordering::SeqCst);
        self.full_scan();
    }

    /// The watch could not be set up (the caller reports why and asks for a scan).
    pub fn watch_failed(&self) {
        self.settled.store(true, Ordering::SeqCst);
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
        loop {
            if s.rescan.swap(false, Ordering::SeqCst) {
                self.scan(&cancel).await;
            }
            let every = if s.degraded.load(Ordering::SeqCst) {
                self.interval_when_degraded
            } else {
                self.interval
            };
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
            super::walk(&intake.root, intake.include_url_cache, |item| {
                files += matches!(item, Item::File(_)) as u64;
                if let Some(x) = intake.to_enqueue(item) {
                    chunk.push(x);
                    if chunk.len() >= 1000 && tx.blocking_send(std::mem::take(&mut chunk)).is_err()
                    {
                        return false;
                    }
                }
                !stop.is_cancelled()
            });
            if !chunk.is_empty() {
                let _ = tx.blocking_send(chunk);
            }
            files
        });
        let mut not_recorded = 0;
        while let Some(chunk) = rx.recv().await {
            not_recorded += chunk.len();
            self.intake.enqueue(chunk).await;
        }
        let files = walker.await.unwrap_or(0);
        metrics::counter!(crate::metrics::SCANS).increment(1);
        metrics::histogram!(crate::metrics::SCAN_DURATION).record(started.elapsed().as_secs_f64());
        tracing::info!(
            files,
            not_recorded,
            watched,
            secs = started.elapsed().as_secs_f64(),
            "Scan finished."
        );
        // Only after everything it found is durably queued (`enqueue` returned above). A scan
        // stopped by shutdown is not a finished startup.
        if settled && !cancel.is_cancelled() {
            self.ready.set(watched);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(s.degrade());
        assert!(!s.degrade(), "said once");
        s.watching();
        assert!(s.watching.load(Ordering::SeqCst) && s.settled.load(Ordering::SeqCst));
        assert!(s.rescan.load(Ordering::SeqCst), "a scan under the watch");
    }
}
