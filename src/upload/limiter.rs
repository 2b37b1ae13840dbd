//! The one limit on uploads in flight, shared by everything that talks to the bucket through one
//! [`ObjectStore`](super::s3::ObjectStore): the daemon's pool and the `upload` backfill.
//!
//! Three mechanisms, one lock:
//! - **Adaptive concurrency** (a gradient, after Netflix's concurrency-limits "Gradient2"): the
//!   limit grows by about √limit per window of finished uploads while their latency holds (the
//!   short-term mean within `TOLERANCE` × the long-term mean), and shrinks in proportion when it
//!   rises (queueing somewhere: the link, the server, our CPU). It grows only while the limit is
//!   actually used (half of it in flight), so an idle daemon does not drift to the cap.
//!   `upload.concurrency` is the cap; the limit starts at `min(cap, START)`.
//! - **Throttling**: a 429, a 503 (AWS's SlowDown) or a `Retry-After` seen on *any* attempt,
//!   including the SDK's own retries (reported by the client's interceptor, see
//!   `s3::ThrottleInterceptor`), cuts the limit multiplicatively (at most once per latency window,
//!   so one burst of refusals counts once) and pauses new uploads until `Retry-After`.
//! - **Circuit breaker** for "S3 is down": after `TRIP_AFTER` uploads in a row fail to reach S3
//!   (connection refused, timeouts, 5xx), the breaker opens: no new uploads, except one probe at a
//!   growing interval (1 s doubling to 10 s: a probe is one small request, and after a long outage
//!   the backlog waits for the next probe). The first upload that reaches S3 closes it and the
//!   full limit is back at once. One log line when it opens, one when it closes, with counts: an
//!   outage with 200k files queued logs two lines, not one per attempt, and callers put the
//!   files that failed while it was open back without writing their error to the state database.
//!
//! The limiter never retries anything itself (the queue and the SDK's single-request retry are the
//! retry layers); it only decides when the next upload may start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The limit a fresh client starts at (bounded by the cap).
const START: f64 = 16.0;
/// Finished uploads per latency window.
const WINDOW: u32 = 16;
/// Windows the long-term latency mean spans.
const LONG_WINDOWS: f64 = 20.0;
/// Latency may rise this much over its long-term mean before the limit shrinks.
const TOLERANCE: f64 = 1.5;
/// Share of the new estimate taken per window (the rest is the old limit): damps oscillation.
const SMOOTHING: f64 = 0.2;
/// Factor applied to the limit on a throttling answer.
const THROTTLE_FACTOR: f64 = 0.7;
/// Longest pause honoured from a `Retry-After`.
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Uploads in a row that could not reach S3 before the breaker opens.
const TRIP_AFTER: u32 = 5;
const FIRST_PROBE: Duration = Duration::from_secs(1);
const MAX_PROBE: Duration = Duration::from_secs(10);

/// What an upload's outcome says about the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// S3 answered and the upload succeeded.
    Ok,
    /// S3 refused for load: 429, 503 SlowDown.
    Throttled,
    /// S3 could not be reached or failed as a service: connection errors, timeouts, other 5xx.
    Unavailable,
    /// S3 answered, but this file failed (403, a read error, a conflict): nothing about the bucket's
    /// health or load.
    Neutral,
}

/// The breaker's state, for callers deciding how to book a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    Open,
}

pub struct Limiter {
    inner: Mutex<Inner>,
    changed: Notify,
}

struct Inner {
    /// `upload.concurrency`.
    cap: f64,
    limit: f64,
    in_flight: usize,
    /// Most in flight during the current window (the "is the limit used" check).
    window_peak: usize,
    window_n: u32,
    window_sum_s: f64,
    long_s: f64,
    last_decrease: Option<Instant>,
    paused_until: Option<Instant>,
    failures_in_row: u32,
    open: Option<Open>,
    /// `upload.max_requests_per_second` as the interval between request slots, and the next slot.
    pace: Option<Duration>,
    next_slot: Instant,
    /// Successful uploads (the trace's throughput).
    completed: u64,
}

struct Open {
    since: Instant,
    probe_in_flight: bool,
    next_probe: Instant,
    interval: Duration,
    failed: u64,
}

/// A slot for one upload; dropped without [`Permit::finish`] it is released without a verdict
/// (the caller took no upload after all, or was cancelled).
pub struct Permit {
    limiter: Arc<Limiter>,
    started: Instant,
    probe: bool,
    done: bool,
}

impl Permit {
    /// Books the upload's outcome; returns the breaker's state after it.
    pub fn finish(mut self, signal: Signal) -> Breaker {
        self.done = true;
        self.limiter
            .finish(self.started.elapsed(), self.probe, Some(signal))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(Duration::ZERO, self.probe, None);
        }
    }
}

impl Limiter {
    /// A limiter with `cap` (`upload.concurrency`) as its ceiling.
    pub fn new(cap: usize) -> Arc<Limiter> {
        let cap = cap.max(1);
        Arc::new(Limiter {
            inner: Mutex::new(Inner {
                cap: cap as f64,
                limit: START.min(cap as f64),
                in_flight: 0,
                window_peak: 0,
                window_n: 0,
                window_sum_s: 0.0,
                long_s: 0.0,
                last_decrease: None,
                paused_until: None,
                failures_in_row: 0,
                open: None,
                completed: 0,
                pace: None,
                next_slot: Instant::now(),
            }),
            changed: Notify::new(),
        })
    }

    /// The ceiling (`upload.concurrency`).
    pub fn cap(&self) -> usize {
        self.inner.lock().expect("limiter lock").cap as usize
    }

    /// The current limit (for metrics and the trace).
    pub fn limit(&self) -> usize {
        self.inner.lock().expect("limiter lock").limit as usize
    }

    pub fn breaker(&self) -> Breaker {
        match self.inner.lock().expect("limiter lock").open {
            Some(_) => Breaker::Open,
            None => Breaker::Closed,
        }
    }

    /// A permit if one may start now.
    pub fn try_start(self: &Arc<Self>) -> Option<Permit> {
        self.try_start_at(Instant::now())
    }

    fn try_start_at(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let mut g = self.inner.lock().expect("limiter lock");
        let mut probe = false;
        if let Some(open) = &mut g.open {
            if open.probe_in_flight || now < open.next_probe {
                return None;
            }
            open.probe_in_flight = true;
            probe = true;
        } else {
            if g.paused_until.is_some_and(|t| now < t) {
                return None;
            }
            if g.in_flight >= (g.limit as usize).max(1) {
                return None;
            }
        }
        g.in_flight += 1;
        g.window_peak = g.window_peak.max(g.in_flight);
        Some(Permit {
            limiter: self.clone(),
            started: now,
            probe,
            done: false,
        })
    }

    /// Waits for a permit.
    pub async fn start(self: &Arc<Self>) -> Permit {
        loop {
            let changed = self.changed.notified();
            if let Some(p) = self.try_start() {
                return p;
            }
            let wake = self.next_wake().unwrap_or(Duration::from_secs(1));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// Wakes when a permit may have become available (one finished, the breaker closed).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// How long until a pause ends or the next probe is due, if either is pending.
    pub fn next_wake(&self) -> Option<Duration> {
        let g = self.inner.lock().expect("limiter lock");
        let now = Instant::now();
        let at = match &g.open {
            // The probe's end wakes the caller (`changed`).
            Some(o) if o.probe_in_flight => None,
            Some(o) => Some(o.next_probe),
            None => g.paused_until.filter(|t| *t > now),
        }?;
        Some(at.saturating_duration_since(now))
    }

    /// A throttling answer on some attempt (the interceptor's report), with its `Retry-After`.
    pub fn throttled(&self, retry_after: Option<Duration>) {
        let mut g = self.inner.lock().expect("limiter lock");
        let now = Instant::now();
        // One cut per latency window: the uploads in flight when the server started refusing all
        // see it, and they are one event.
        let window = Duration::from_secs_f64(g.long_s.max(0.05));
        if g.last_decrease
            .is_none_or(|t| now.duration_since(t) >= window)
        {
            g.limit = (g.limit * THROTTLE_FACTOR).max(1.0);
            g.last_decrease = Some(now);
            tracing::debug!(limit = g.limit, "Throttled by S3: fewer uploads in flight.");
        }
        if let Some(d) = retry_after {
            let until = now + d.min(MAX_PAUSE);
            g.paused_until = Some(g.paused_until.map_or(until, |t| t.max(until)));
        }
        metrics::gauge!(crate::metrics::UPLOAD_LIMIT).set(g.limit);
    }

    fn finish(&self, latency: Duration, probe: bool, signal: Option<Signal>) -> Breaker {
        let mut g = self.inner.lock().expect("limiter lock");
        let now = Instant::now();
        g.in_flight = g.in_flight.saturating_sub(1);
        if probe && let Some(open) = &mut g.open {
            open.probe_in_flight = false;
        }
        match signal {
            None => {}
            Some(Signal::Unavailable) => {
                g.failures_in_row += 1;
                if let Some(open) = &mut g.open {
                    open.failed += 1;
                    if probe {
                        open.interval = (open.interval * 2).min(MAX_PROBE);
                        open.next_probe = now + open.interval;
                    }
                } else if g.failures_in_row >= TRIP_AFTER {
                    tracing::warn!(
                        failures_in_row = g.failures_in_row,
                        in_flight = g.in_flight,
                        "S3 is unreachable: holding uploads, probing with one at a time (1 s, doubling to 10 s)."
                    );
                    g.open = Some(Open {
                        since: now,
                        probe_in_flight: false,
                        next_probe: now + FIRST_PROBE,
                        interval: FIRST_PROBE,
                        failed: 0,
                    });
                    metrics::gauge!(crate::metrics::S3_BREAKER_OPEN).set(1.0);
                }
            }
            Some(s) => {
                g.failures_in_row = 0;
                if let Some(open) = g.open.take() {
                    tracing::info!(
                        down_for = ?now.duration_since(open.since),
                        failed_attempts = open.failed,
                        "S3 is reachable again: uploads resume."
                    );
                    metrics::gauge!(crate::metrics::S3_BREAKER_OPEN).set(0.0);
                }
                if s == Signal::Ok {
                    g.completed += 1;
                    g.sample(latency);
                }
            }
        }
        let state = if g.open.is_some() {
            Breaker::Open
        } else {
            Breaker::Closed
        };
        let limit = g.limit;
        drop(g);
        metrics::gauge!(crate::metrics::UPLOAD_LIMIT).set(limit);
        self.changed.notify_waiters();
        state
    }
}

impl Inner {
    /// One successful upload's latency; at the end of a window, the gradient step.
    fn sample(&mut self, latency: Duration) {
        self.window_n += 1;
        self.window_sum_s += latency.as_secs_f64();
        // At a low limit a window of WINDOW uploads would take many round trips: recovery after
        // throttling would crawl. A window is at least 4 uploads and at most WINDOW.
        if self.window_n < (self.limit as u32).clamp(4, WINDOW) {
            return;
        }
        let short = self.window_sum_s / self.window_n as f64;
        let used = self.window_peak as f64 >= self.limit / 2.0;
        self.window_n = 0;
        self.window_sum_s = 0.0;
        self.window_peak = self.in_flight;
        if self.long_s == 0.0 {
            self.long_s = short;
        } else {
            self.long_s += (short - self.long_s) / LONG_WINDOWS;
        }
        // Latency well below the long-term mean (the load went away): let the mean follow down
        // faster, or a past spike would excuse rising latency for a long time.
        if self.long_s / short > 2.0 {
            self.long_s *= 0.95;
        }
        let gradient = (TOLERANCE * self.long_s / short).clamp(0.5, 1.0);
        let growth = if used && gradient >= 1.0 {
            self.limit.sqrt()
        } else {
            0.0
        };
        let estimate = self.limit * gradient + growth;
        // Damped both ways, growth less: latency often holds for a while before it rises.
        let smoothing = if estimate > self.limit {
            2.0 * SMOOTHING
        } else {
            SMOOTHING
        };
        let next = self.limit * (1.0 - smoothing) + estimate * smoothing;
        self.limit = next.clamp(1.0, self.cap);
        tracing::debug!(
            target: "synapse_s3_offload::upload::limiter::trace",
            limit = self.limit,
            short_ms = short * 1e3,
            long_ms = self.long_s * 1e3,
            completed = self.completed,
            "Limit."
        );
    }
}

/// What an upload's result says about the bucket (see [`Signal`]).
pub fn signal<T>(result: &Result<T, super::UploadError>) -> Signal {
    match result {
        Ok(_) => Signal::Ok,
        Err(e) => error_signal(e),
    }
}

/// What a failed upload says about the bucket.
pub fn error_signal(e: &super::UploadError) -> Signal {
    let super::UploadError::S3(e) = e else {
        return Signal::Neutral;
    };
    match (e.status, e.code.as_deref()) {
        (Some(429 | 503), _) | (_, Some("SlowDown")) => Signal::Throttled,
        // No answer at all (connection refused or broken, timeouts) or the service failing.
        (None, _) if e.is_transient() => Signal::Unavailable,
        (Some(s), _) if s >= 500 => Signal::Unavailable,
        _ => Signal::Neutral,
    }
}

impl Limiter {
    /// Caps object requests per second (`upload.max_requests_per_second`; None: no cap).
    pub fn set_rate(&self, per_second: Option<f64>) {
        let mut g = self.inner.lock().expect("limiter lock");
        g.pace = per_second
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(1.0 / r));
    }

    /// Waits for this request's slot under `upload.max_requests_per_second` (evenly spaced, no
    /// burst beyond one): called by the store before each HEAD, PUT and part. Retries by the SDK
    /// do not take a slot (they are already spaced by its backoff).
    pub async fn pace(&self) {
        let wait = {
            let mut g = self.inner.lock().expect("limiter lock");
            let Some(interval) = g.pace else { return };
            let now = Instant::now();
            let slot = g.next_slot.max(now);
            g.next_slot = slot + interval;
            slot - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Sets the ceiling (`upload.concurrency` of whoever runs uploads through this client).
    pub fn set_cap(&self, cap: usize) {
        let mut g = self.inner.lock().expect("limiter lock");
        g.cap = cap.max(1) as f64;
        g.limit = g.limit.min(g.cap);
        if g.last_decrease.is_none() && g.completed == 0 {
            g.limit = START.min(g.cap);
        }
    }
}

/// Reports every throttling answer the client receives — on any attempt, the SDK's own retries
/// included, which the caller would never see when a retry succeeds — to the limiter.
#[derive(Debug)]
pub(super) struct ThrottleInterceptor(pub Arc<Limiter>);

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limit", &self.limit())
            .finish()
    }
}

impl aws_sdk_s3::config::Intercept for ThrottleInterceptor {
    fn name(&self) -> &'static str {
        "ThrottleInterceptor"
    }

    fn read_before_deserialization(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let response = context.response();
        if matches!(response.status().as_u16(), 429 | 503) {
            // Seconds only: the HTTP-date form is rare from S3 providers and not worth a parser.
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            self.0.throttled(retry_after);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "limiter_tests.rs"]
mod tests;
