//! The queue under backward steps of the wall clock: no stored due time may keep an item waiting
//! longer than its retry interval from now.

use std::time::Duration;

use super::*;

fn p(s: &str) -> MediaPath {
    MediaPath::parse(s).unwrap()
}

fn open(dir: &std::path::Path) -> Queue {
    let state = State::open(dir).unwrap();
    let (committer, _thread) = Committer::start(state.clone());
    Queue::load(
        &state,
        committer,
        Duration::from_secs(300),
        Duration::from_secs(600),
    )
    .unwrap()
}

/// Writes queue items as a run before a clock step would have left them, then loads the queue.
async fn with_items(dir: &std::path::Path, items: &[(&str, Item)]) -> Queue {
    {
        let state = State::open(dir).unwrap();
        let (committer, thread) = Committer::start(state.clone());
        let ops = items
            .iter()
            .map(|(path, item)| Op::QueuePut(p(path), item.encode()))
            .collect();
        committer.apply(ops).await.unwrap();
        drop((state, committer));
        thread.join().unwrap();
    }
    open(dir)
}

fn retrying(due_ms: u64, failed: bool) -> Item {
    Item {
        enqueued_ms: 1,
        attempts: 3,
        next_attempt_ms: due_ms,
        failed,
        last_error: "503".into(),
    }
}

/// Due times stored before the clock stepped back by hours are pulled in to at most
/// `max_backoff` (transient) or `failed_retry_interval` (permanent) from now, on load.
#[tokio::test]
async fn a_clock_stepped_back_while_down_delays_no_item_beyond_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let hours = 5 * 3_600_000;
    let q = with_items(
        dir.path(),
        &[
            ("local_content/a/a/transient", retrying(now + hours, false)),
            ("local_content/a/a/permanent", retrying(now + hours, true)),
            ("local_content/a/a/soon", retrying(now + 100_000, false)),
        ],
    )
    .await;
    let due = |path: &str| {
        q.inner.lock().unwrap().items[&p(path)]
            .slot
            .map(|s| s.0)
            .unwrap()
    };
    let later = now_ms();
    assert!(due("local_content/a/a/transient") <= later + 300_000);
    assert!(due("local_content/a/a/permanent") <= later + 600_000);
    assert!(due("local_content/a/a/permanent") > later + 300_000);
    assert_eq!(due("local_content/a/a/soon"), now + 100_000, "untouched");
    assert!(q.next_due().unwrap() <= later + 300_000);
}

/// The clock steps back by three hours while the daemon runs: the item scheduled 200 s ahead
/// must not wait three hours more; it is due at most `max_backoff` after the new now.
#[tokio::test]
async fn a_clock_stepped_back_while_running_delays_no_item_beyond_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let q = with_items(
        dir.path(),
        &[("local_content/b/b/x", retrying(now + 200_000, false))],
    )
    .await;
    let stepped = now - 3 * 3_600_000;
    assert!(q.claim_at(stepped).is_none(), "not due yet");
    assert!(q.claim_at(stepped + 299_000).is_none());
    assert_eq!(
        q.claim_at(stepped + 300_000).map(|c| c.0),
        Some(p("local_content/b/b/x"))
    );
}
