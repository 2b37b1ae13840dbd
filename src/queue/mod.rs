//! The durable upload queue: every file the daemon has heard of stays here until its upload is
//! verified and recorded.
//!
//! Durability and crash ordering:
//! - The `queue` table in `state.redb` is the truth; this module keeps an in-memory mirror (all
//!   items, plus a schedule of the ready ones) because the state is single-process.
//! - `enqueue` returns only after the items are committed. An event is handled once enqueued; a
//!   crash after that point loses nothing, a crash before it is covered by the startup scan.
//! - An item leaves the queue only in the same transaction that records its verified upload
//!   (insert-before-remove, atomically), or when its file is gone. A crash between upload and
//!   commit leaves the item queued: the next attempt finds the object by HEAD (no second PUT).
//! - A file enqueued again while its upload is in flight is marked `dirty`; the finishing upload
//!   then keeps the item queued, so a write that lands after the upload's final stat is uploaded
//!   too (invariant 4).
//! - Memory changes and the submission of their ops happen under one lock, and the committer keeps
//!   submission order, so the durable table always replays the same history as the memory.
//!
//! Retries: this queue is the daemon's only retry layer (the S3 client makes one attempt per
//! request). Transient failures back off exponentially with full jitter up to `max_backoff`;
//! permanent ones wait `failed_retry_interval` and are reported as failed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::layout::MediaPath;
use crate::state::{Committer, Op, Record, State, StateError, now_ms};

mod item;

/// How an attempt failed, as far as the queue's schedule cares: transient failures back off up to
/// `max_backoff`; permanent ones (they need the operator) wait `failed_retry_interval` and are
/// reported as failed. The uploader's errors say which they are; the queue knows nothing of S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Transient,
    Permanent,
}

use item::latest_due;
pub use item::{Item, backoff};

struct Entry {
    item: Item,
    in_flight: bool,
    dirty: bool,
    /// Found by a scan (no close event seen): upload only once its mtime is `settle` old.
    settle: bool,
    /// Key in `ready` while not in flight.
    slot: Option<(u64, u64)>,
}

impl Entry {
    /// A queued item, not in flight, not yet scheduled.
    fn new(item: Item, settle: bool) -> Self {
        Entry {
            item,
            in_flight: false,
            dirty: false,
            settle,
            slot: None,
        }
    }
}

#[derive(Default)]
struct Inner {
    items: HashMap<MediaPath, Entry>,
    /// (due ms, sequence) → path: FIFO among items due at the same time.
    ready: BTreeSet<(u64, u64, MediaPath)>,
    seq: u64,
    /// The wall clock as last seen by `claim`/`next_due`: a later reading below it is a backward
    /// step (see [`Queue::observe_clock`]).
    last_now: u64,
    /// Kept as the items change, so that `depth()` and `failures()` (every metrics scrape, every
    /// `status`) do not walk every item under the lock: with 200k items queued after an outage
    /// that walk held the lock the workers need for milliseconds per scrape. Every change of an
    /// entry's `in_flight`, `attempts` or `failed` goes through [`Inner::edit`], an insertion
    /// through [`Inner::insert`], a removal through [`Inner::remove`].
    in_flight: usize,
    retrying: usize,
    failed: BTreeSet<MediaPath>,
}

/// What an entry counts for in [`Depth`]: in flight, failed, retrying.
fn tally(e: &Entry) -> (bool, bool, bool) {
    (
        e.in_flight,
        e.item.failed,
        e.item.attempts > 0 && !e.item.failed,
    )
}

impl Inner {
    fn count(&mut self, path: &MediaPath, t: (bool, bool, bool), sign: bool) {
        let add = |n: &mut usize, on: bool| {
            if on {
                *n = if sign { *n + 1 } else { *n - 1 };
            }
        };
        add(&mut self.in_flight, t.0);
        add(&mut self.retrying, t.2);
        if t.1 {
            if sign {
                self.failed.insert(path.clone());
            } else {
                self.failed.remove(path);
            }
        }
    }

    /// Changes the entry of `path` (if queued), keeping the counts true.
    fn edit<R>(&mut self, path: &MediaPath, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let e = self.items.get_mut(path)?;
        let before = tally(e);
        let r = f(e);
        let after = tally(e);
        if before != after {
            self.count(path, before, false);
            self.count(path, after, true);
        }
        Some(r)
    }

    fn insert(&mut self, path: MediaPath, e: Entry) {
        let t = tally(&e);
        if let Some(old) = self.items.insert(path.clone(), e) {
            self.count(&path, tally(&old), false);
        }
        self.count(&path, t, true);
    }

    fn remove(&mut self, path: &MediaPath) -> Option<Entry> {
        let e = self.items.remove(path)?;
        self.count(path, tally(&e), false);
        if let Some((d, s)) = e.slot {
            self.ready.remove(&(d, s, path.clone()));
        }
        Some(e)
    }

    fn schedule(&mut self, path: &MediaPath, due_ms: u64) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.items.get_mut(path) {
            if let Some((d, s)) = e.slot.take() {
                self.ready.remove(&(d, s, path.clone()));
            }
            e.slot = Some((due_ms, seq));
            self.ready.insert((due_ms, seq, path.clone()));
        }
    }
}

/// Counts for status and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Depth {
    pub queued: usize,
    pub in_flight: usize,
    pub failed: usize,
    pub retrying: usize,
}

pub struct Queue {
    inner: Mutex<Inner>,
    committer: Committer,
    notify: tokio::sync::Notify,
    max_backoff: Duration,
    failed_retry: Duration,
}

impl Queue {
    /// Loads the durable queue. Items left in flight by a crash are simply queued again.
    pub fn load(
        state: &State,
        committer: Committer,
        max_backoff: Duration,
        failed_retry: Duration,
    ) -> Result<Queue, StateError> {
        let mut inner = Inner::default();
        let now = now_ms();
        for (key, raw) in state.queue_items()? {
            let (Ok(path), Some(item)) = (MediaPath::parse(&key), Item::decode(&raw)) else {
                // Unreadable item: the startup scan finds its file anyway. Leave it for forensics.
                tracing::warn!(key, "Ignoring an unreadable queue item.");
                continue;
            };
            let mut item = item;
            // A clock that stepped back while we were down (VM resume, NTP correcting a clock
            // that ran ahead) would otherwise delay the item by the size of the step.
            item.next_attempt_ms =
                item.next_attempt_ms
                    .min(latest_due(&item, now, max_backoff, failed_retry));
            let due = item.next_attempt_ms;
            // After a restart we cannot tell how an item was found: let young files settle.
            inner.insert(path.clone(), Entry::new(item, true));
            inner.schedule(&path, due);
        }
        inner.last_now = now;
        Ok(Queue {
            inner: Mutex::new(inner),
            committer,
            notify: tokio::sync::Notify::new(),
            max_backoff,
            failed_retry,
        })
    }

    /// Notices a backward step of the wall clock since the last reading and pulls every item that
    /// is now due further ahead than its retry interval allows back to that bound. Due times are
    /// wall-clock times (they are persisted), so without this a clock stepping back by hours
    /// would strand every retrying item for hours, and new events do not pull retries forward.
    fn observe_clock(&self, inner: &mut Inner, now: u64) {
        let stepped_back = now < inner.last_now;
        inner.last_now = now;
        if !stepped_back {
            return;
        }
        let late: Vec<(MediaPath, u64)> = inner
            .items
            .iter()
            .filter(|(_, e)| !e.in_flight)
            .filter_map(|(p, e)| {
                let bound = latest_due(&e.item, now, self.max_backoff, self.failed_retry);
                let due = e.slot.map(|s| s.0)?;
                (due > bound).then(|| (p.clone(), bound))
            })
            .collect();
        if !late.is_empty() {
            tracing::warn!(
                items = late.len(),
                "The wall clock stepped back; retries rescheduled within their retry interval."
            );
        }
        for (p, bound) in late {
            if let Some(e) = inner.items.get_mut(&p) {
                e.item.next_attempt_ms = e.item.next_attempt_ms.min(bound);
            }
            inner.schedule(&p, bound);
        }
    }

    /// [`Queue::load`] with the retry settings of the `upload:` section.
    pub fn open(
        state: &State,
        committer: Committer,
        upload: &crate::config::UploadConfig,
    ) -> Result<Queue, StateError> {
        Queue::load(
            state,
            committer,
            upload.max_backoff,
            upload.failed_retry_interval,
        )
    }

    /// Durably adds `paths` (each due at its time; `settle` for files found by a scan rather than
    /// by a close event). Already queued paths keep their schedule (a retrying item is not
    /// hammered), except that an item in flight is marked dirty.
    pub async fn enqueue(&self, paths: Vec<(MediaPath, u64, bool)>) -> Result<(), StateError> {
        let mut fresh = Vec::new();
        let pending = {
            let mut inner = self.inner.lock().expect("queue lock");
            let mut ops = Vec::new();
            for (path, due, settle) in paths {
                match inner.items.get_mut(&path) {
                    Some(e) if e.in_flight => e.dirty = true,
                    Some(e) => {
                        // A close event means the file is complete: no need to wait for it. A
                        // file the settle check put back (its slot later than its item's due
                        // time) is due again at the close event's time, not at the end of the
                        // deferral (which can be `upload.settle` away).
                        let settling = e.settle && !settle;
                        e.settle &= settle;
                        let deferred = e.slot.is_some_and(|(d, _)| d > due);
                        // A fresh event for a never-failed item moves it earlier, never later.
                        // A scan's find never moves a close event's item earlier: its due time
                        // holds the file for `upload.hold_after_close` (Synapse's spam check).
                        let scan_after_close = settle && !e.settle;
                        if e.item.attempts == 0
                            && !scan_after_close
                            && (due < e.item.next_attempt_ms || settling && deferred)
                        {
                            e.item.next_attempt_ms = e.item.next_attempt_ms.min(due);
                            fresh.push((path, due));
                        }
                    }
                    None => {
                        let item = Item::new(due);
                        ops.push(Op::QueuePut(path.clone(), item.encode()));
                        // Visible to claim only once durable (below): slot stays empty until then.
                        inner.insert(path.clone(), Entry::new(item, settle));
                        fresh.push((path, due));
                    }
                }
            }
            // Submitted even when empty: the committer answers in submission order, so once this
            // batch is answered, everything submitted before it is durable too — in particular
            // another caller's still-uncommitted `QueuePut` of a path found in memory above. Without
            // this, the second of two concurrent enqueues of a new path returned before the path
            // was durable, and a crash then lost an acknowledged item (model_tests found it).
            self.committer.submit(ops)
        };
        pending.wait().await?;
        if !fresh.is_empty() {
            let mut inner = self.inner.lock().expect("queue lock");
            for (path, due) in fresh {
                if inner.items.get(&path).is_some_and(|e| !e.in_flight) {
                    inner.schedule(&path, due);
                }
            }
            drop(inner);
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Takes the next due item, if any, marking it in flight. Returns its path and whether it
    /// must be checked for having settled first.
    pub fn claim(&self) -> Option<(MediaPath, bool)> {
        self.claim_at(now_ms())
    }

    /// [`Queue::claim`] with the wall clock reading `now`.
    fn claim_at(&self, now: u64) -> Option<(MediaPath, bool)> {
        let mut inner = self.inner.lock().expect("queue lock");
        self.observe_clock(&mut inner, now);
        let first = inner.ready.first()?.clone();
        if first.0 > now {
            return None;
        }
        inner.ready.remove(&first);
        let settle = inner
            .edit(&first.2, |e| {
                e.slot = None;
                e.in_flight = true;
                e.dirty = false;
                e.settle
            })
            .expect("ready items are queued");
        Some((first.2, settle))
    }

    /// Puts a claimed item back until `due_ms` (a file that has not settled yet); it is checked
    /// again then, unless a close event arrived meanwhile (which clears the settle check).
    pub fn defer(&self, path: &MediaPath, due_ms: u64) {
        let mut inner = self.inner.lock().expect("queue lock");
        let due = inner.edit(path, |e| {
            e.in_flight = false;
            let due = if e.dirty { now_ms() } else { due_ms };
            e.dirty = false;
            due
        });
        if let Some(due) = due {
            inner.schedule(path, due);
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// [`Queue::defer`], and the next claim skips the settle check: for a file whose age cannot
    /// be told (its mtime is in the future), waiting once is all the settle check can do.
    pub fn defer_once(&self, path: &MediaPath, due_ms: u64) {
        if let Some(e) = self.inner.lock().expect("queue lock").items.get_mut(path) {
            e.settle = false;
        }
        self.defer(path, due_ms);
    }

    /// When `path` was first enqueued (ms), if it is queued.
    pub fn enqueued_at(&self, path: &MediaPath) -> Option<u64> {
        self.inner
            .lock()
            .expect("queue lock")
            .items
            .get(path)
            .map(|e| e.item.enqueued_ms)
    }

    /// When the next item becomes due (None: nothing is waiting).
    pub fn next_due(&self) -> Option<u64> {
        let mut inner = self.inner.lock().expect("queue lock");
        self.observe_clock(&mut inner, now_ms());
        inner.ready.first().map(|r| r.0)
    }

    /// Wakes when something was enqueued.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// The upload of `path` is verified (`record`) or its file is gone (`None`): commit the record
    /// and remove the item in one transaction, unless the file was enqueued again meanwhile.
    pub async fn finish(&self, path: &MediaPath, record: Option<Record>) -> Result<(), StateError> {
        self.finish_with(path, record, false).await
    }

    /// Like [`Queue::finish`], for a record of bytes we PUT from the file ourselves: if the file
    /// was written again while the upload was in flight, the object holds bytes that may not have
    /// been its final content, so the record is provisional and the next upload may replace the
    /// object (a verified object never is, DESIGN.md invariant 8). An adopted object or a healed
    /// file is verified whatever happened to the file meanwhile: its record stays verified (a
    /// heal's own rename is such an event).
    pub async fn finish_written(&self, path: &MediaPath, record: Record) -> Result<(), StateError> {
        self.finish_with(path, Some(record), true).await
    }

    async fn finish_with(
        &self,
        path: &MediaPath,
        record: Option<Record>,
        written: bool,
    ) -> Result<(), StateError> {
        let pending = {
            let mut inner = self.inner.lock().expect("queue lock");
            let dirty = inner.items.get(path).is_some_and(|e| e.dirty);
            let record = record.map(|r| if dirty && written { r.provisional() } else { r });
            let mut ops: Vec<Op> = record
                .map(|r| Op::Record(path.clone(), r))
                .into_iter()
                .collect();
            // A verified upload ends any copy problem the path had (status, audit), and so does
            // the file's going away (e.g. an operator resolving a conflict by deleting it).
            if record.is_none_or(|r| !r.provisional) {
                ops.push(Op::ProblemClear(path.clone()));
            }
            if dirty {
                inner.edit(path, |e| {
                    e.in_flight = false;
                    e.dirty = false;
                    e.item.attempts = 0;
                    e.item.failed = false;
                });
                inner.schedule(path, now_ms());
            } else {
                inner.remove(path);
                ops.push(Op::QueueRemove(path.clone()));
            }
            self.committer.submit(ops)
        };
        self.notify.notify_one();
        pending.wait().await
    }

    /// Takes the in-flight item's `dirty` mark (it was enqueued again since its claim), for the
    /// caller to look at the file before [`Queue::finish_written`]. A scan that finds the file
    /// being uploaded (the 0.2/1/5 s rescans of a new directory) or a late close event re-enqueue
    /// a file that did not change: that must not make its record provisional (a second full
    /// upload). Order (see the pool): take the mark, stat the file, put the mark back if it
    /// changed. A write after the stat has its own close event, which marks it dirty again.
    pub fn take_dirty(&self, path: &MediaPath) -> bool {
        let mut inner = self.inner.lock().expect("queue lock");
        match inner.items.get_mut(path) {
            Some(e) if e.in_flight => std::mem::take(&mut e.dirty),
            _ => false,
        }
    }

    /// Marks an in-flight item dirty again (see [`Queue::take_dirty`]).
    pub fn mark_dirty(&self, path: &MediaPath) {
        let mut inner = self.inner.lock().expect("queue lock");
        if let Some(e) = inner.items.get_mut(path)
            && e.in_flight
        {
            e.dirty = true;
        }
    }

    /// The upload failed: schedule the next attempt and keep the error for `status`.
    pub async fn retry_later(
        &self,
        path: &MediaPath,
        kind: Failure,
        error: String,
    ) -> Result<Duration, StateError> {
        let (pending, delay) = {
            let mut inner = self.inner.lock().expect("queue lock");
            let (failed_retry, max_backoff) = (self.failed_retry, self.max_backoff);
            let Some((delay, op, due)) = inner.edit(path, |e| {
                let delay = match kind {
                    Failure::Permanent => failed_retry,
                    _ => backoff(e.item.attempts, max_backoff, rand::random::<f64>()),
                };
                e.in_flight = false;
                e.dirty = false;
                e.item.attempts = e.item.attempts.saturating_add(1);
                e.item.failed = kind == Failure::Permanent;
                e.item.last_error = error;
                e.item.next_attempt_ms = now_ms() + delay.as_millis() as u64;
                let op = Op::QueuePut(path.clone(), e.item.encode());
                (delay, op, e.item.next_attempt_ms)
            }) else {
                return Ok(Duration::ZERO);
            };
            inner.schedule(path, due);
            (self.committer.submit(vec![op]), delay)
        };
        pending.wait().await?;
        Ok(delay)
    }

    pub fn depth(&self) -> Depth {
        let inner = self.inner.lock().expect("queue lock");
        Depth {
            queued: inner.items.len(),
            in_flight: inner.in_flight,
            failed: inner.failed.len(),
            retrying: inner.retrying,
        }
    }

    /// [`Queue::depth`] counted the slow way, item by item (tests check the kept counts with it).
    #[cfg(test)]
    fn depth_walked(&self) -> Depth {
        let inner = self.inner.lock().expect("queue lock");
        let mut d = Depth {
            queued: inner.items.len(),
            ..Depth::default()
        };
        for e in inner.items.values() {
            d.in_flight += e.in_flight as usize;
            d.failed += e.item.failed as usize;
            d.retrying += (e.item.attempts > 0 && !e.item.failed) as usize;
        }
        d
    }

    /// Items whose last attempt failed permanently, with their error (for status and logs).
    pub fn failures(&self, limit: usize) -> Vec<(MediaPath, Item)> {
        let inner = self.inner.lock().expect("queue lock");
        inner
            .failed
            .iter()
            .take(limit)
            .filter_map(|p| Some((p.clone(), inner.items.get(p)?.item.clone())))
            .collect()
    }

    /// How `path` stands in the queue, in words (`audit`): `None` when it is not queued.
    pub fn describe(&self, path: &MediaPath) -> Option<String> {
        let inner = self.inner.lock().expect("queue lock");
        let e = inner.items.get(path)?;
        let mut s = if e.in_flight {
            "uploading".to_owned()
        } else if e.item.failed {
            format!("failed after {} attempts", e.item.attempts)
        } else if e.item.attempts > 0 {
            format!("retrying (attempt {})", e.item.attempts + 1)
        } else {
            "queued".to_owned()
        };
        if !e.item.last_error.is_empty() {
            s.push_str(": ");
            s.push_str(&e.item.last_error);
        }
        Some(s)
    }
}

#[cfg(test)]
mod clock_tests;
#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests;
