//! A queue item as stored in the `queue` table, and the retry schedule's arithmetic.

use std::time::Duration;

use crate::state::now_ms;

/// A queue item as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub enqueued_ms: u64,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    /// Set while the last failure was permanent (needs the operator).
    pub failed: bool,
    pub last_error: String,
}

const ITEM_V1: u8 = 1;

impl Item {
    pub(super) fn new(due_ms: u64) -> Self {
        Item {
            enqueued_ms: now_ms(),
            attempts: 0,
            next_attempt_ms: due_ms,
            failed: false,
            last_error: String::new(),
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(30 + self.last_error.len());
        b.push(ITEM_V1);
        b.extend_from_slice(&self.enqueued_ms.to_le_bytes());
        b.extend_from_slice(&self.attempts.to_le_bytes());
        b.extend_from_slice(&self.next_attempt_ms.to_le_bytes());
        b.push(self.failed as u8);
        b.extend_from_slice(self.last_error.as_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 22 || b[0] != ITEM_V1 {
            return None;
        }
        Some(Item {
            enqueued_ms: u64::from_le_bytes(b[1..9].try_into().ok()?),
            attempts: u32::from_le_bytes(b[9..13].try_into().ok()?),
            next_attempt_ms: u64::from_le_bytes(b[13..21].try_into().ok()?),
            failed: b[21] != 0,
            last_error: String::from_utf8_lossy(&b[22..]).into_owned(),
        })
    }
}

/// Delay before attempt `attempts + 1` after a transient failure: capped exponential backoff
/// (1 s, 2 s, 4 s, … up to `max`) with full jitter, so a fleet of items retrying after an outage
/// spreads out instead of stampeding. `unit` is a uniform random number in [0, 1).
pub fn backoff(attempts: u32, max: Duration, unit: f64) -> Duration {
    let exp = Duration::from_secs(1).saturating_mul(1u32 << attempts.min(20));
    exp.min(max).mul_f64(unit.clamp(0.0, 1.0))
}

/// The latest an item may be due, `now` being the wall clock: its retry interval from now
/// (`failed_retry` after a permanent failure, else `max_backoff`). No stored due time may exceed it.
pub(super) fn latest_due(
    item: &Item,
    now: u64,
    max_backoff: Duration,
    failed_retry: Duration,
) -> u64 {
    let interval = if item.failed {
        failed_retry
    } else {
        max_backoff
    };
    now.saturating_add(interval.as_millis() as u64)
}
