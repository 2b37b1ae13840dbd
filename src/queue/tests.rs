//! Unit tests of the queue: durability across reopen, dirty items, backoff and failures.

use super::*;

fn p(s: &str) -> MediaPath {
    MediaPath::parse(s).unwrap()
}

fn open(dir: &std::path::Path) -> (State, Queue, std::thread::JoinHandle<()>) {
    let state = State::open(dir).unwrap();
    let (committer, thread) = Committer::start(state.clone());
    let q = Queue::load(
        &state,
        committer,
        Duration::from_secs(300),
        Duration::from_secs(600),
    )
    .unwrap();
    (state, q, thread)
}

#[test]
fn backoff_is_capped_exponential_with_full_jitter() {
    let max = Duration::from_secs(300);
    assert_eq!(backoff(0, max, 0.999_999).as_secs(), 0); // < 1 s
    assert_eq!(backoff(3, max, 0.5), Duration::from_secs(4));
    assert_eq!(backoff(30, max, 0.5), Duration::from_secs(150));
    assert_eq!(backoff(30, max, 0.0), Duration::ZERO);
    assert!(backoff(u32::MAX, max, 0.999) <= max);
}

#[test]
fn item_roundtrip() {
    let item = Item {
        enqueued_ms: 1,
        attempts: 2,
        next_attempt_ms: 3,
        failed: true,
        last_error: "403 é".into(),
    };
    assert_eq!(Item::decode(&item.encode()), Some(item));
    assert_eq!(Item::decode(&[1, 2]), None);
}

#[tokio::test]
async fn items_survive_reopen_until_finished() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, q, t) = open(dir.path());
        q.enqueue(vec![
            (p("local_content/a/b/c"), 0, false),
            (p("local_content/a/b/d"), 0, false),
        ])
        .await
        .unwrap();
        let (claimed, _) = q.claim().unwrap();
        assert_eq!(claimed, p("local_content/a/b/c"));
        // "Crash" with c in flight and d queued: drop everything without finishing.
        drop((s, q));
        t.join().unwrap();
    }
    let (state, q, _t) = open(dir.path());
    assert_eq!(q.depth().queued, 2);
    let (a, _) = q.claim().unwrap();
    let (b, _) = q.claim().unwrap();
    assert!(q.claim().is_none());
    let rec = Record::new(1, 2, [3; 16]);
    q.finish(&a, Some(rec)).await.unwrap();
    q.finish(&b, None).await.unwrap();
    assert_eq!(q.depth().queued, 0);
    assert_eq!(state.record(&a).unwrap(), Some(rec));
    assert!(state.queue_items().unwrap().is_empty());
}

#[tokio::test]
async fn an_item_enqueued_while_in_flight_stays_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (state, q, _t) = open(dir.path());
    let x = p("local_content/x/y/z");
    q.enqueue(vec![(x.clone(), 0, false)]).await.unwrap();
    let (claimed, _) = q.claim().unwrap();
    q.enqueue(vec![(x.clone(), 0, false)]).await.unwrap(); // written again during the upload
    q.finish(&claimed, Some(Record::new(1, 2, [3; 16])))
        .await
        .unwrap();
    assert_eq!(q.depth().queued, 1);
    assert_eq!(state.queue_items().unwrap().len(), 1, "still durable");
    assert_eq!(q.claim().map(|c| c.0), Some(x.clone()));
    // Adopted (or healed): the object is verified whatever the file did meanwhile.
    assert!(!state.record(&x).unwrap().unwrap().provisional);

    // PUT by us from a file written again meanwhile: the object may be replaced next time.
    q.enqueue(vec![(x.clone(), 0, false)]).await.unwrap();
    q.finish_written(&x, Record::new(4, 5, [6; 16]))
        .await
        .unwrap();
    let r = state.record(&x).unwrap().unwrap();
    assert!(r.provisional && !r.matches(4, 5), "{r:?}");
    // Not written again: verified.
    let (claimed, _) = q.claim().unwrap();
    q.finish_written(&claimed, Record::new(4, 5, [6; 16]))
        .await
        .unwrap();
    assert!(state.record(&x).unwrap().unwrap().matches(4, 5));
}

#[tokio::test]
async fn failures_back_off_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, q, _t) = open(dir.path());
    let x = p("local_content/x/y/z");
    q.enqueue(vec![(x.clone(), 0, false)]).await.unwrap();
    q.claim().unwrap();
    let d = q
        .retry_later(&x, Failure::Permanent, "HTTP 403".into())
        .await
        .unwrap();
    assert_eq!(d, Duration::from_secs(600));
    assert!(q.claim().is_none(), "not due yet");
    assert_eq!(
        q.depth(),
        Depth {
            queued: 1,
            in_flight: 0,
            failed: 1,
            retrying: 0
        }
    );
    assert_eq!(q.failures(10)[0].1.last_error, "HTTP 403");
}

#[tokio::test]
async fn a_close_event_ends_a_settle_deferral() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, q, _t) = open(dir.path());
    let x = p("local_content/x/y/z");
    // Found by a scan while young: the settle check puts it back for `settle`.
    q.enqueue(vec![(x.clone(), now_ms(), true)]).await.unwrap();
    let (claimed, settle) = q.claim().unwrap();
    assert!(settle);
    q.defer(&claimed, now_ms() + 3_600_000);
    assert!(q.claim().is_none(), "deferred");
    // Its close event arrives: the file is complete, due now, without the settle check.
    q.enqueue(vec![(x.clone(), now_ms(), false)]).await.unwrap();
    assert_eq!(q.claim(), Some((x.clone(), false)));
}

/// The counts `depth()` and `failures()` keep as items change equal a walk of every item, through
/// random sequences of every queue operation.
#[tokio::test]
async fn kept_counts_equal_a_walk_of_the_items() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let (_s, q, _t) = open(dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let paths: Vec<MediaPath> = (0..12)
        .map(|i| p(&format!("local_content/aa/bb/{i:02}")))
        .collect();
    let mut claimed: Vec<MediaPath> = Vec::new();
    for step in 0..3_000 {
        match rng.random_range(0..7) {
            0 | 1 => {
                let x = paths[rng.random_range(0..paths.len())].clone();
                q.enqueue(vec![(x, 0, rng.random())]).await.unwrap();
            }
            2 => {
                // Everything is due at 0 or at a past retry time (ZERO backoff is not used here:
                // retries are due later, so claim whatever is due).
                if let Some((x, _)) = q.claim_at(u64::MAX / 2) {
                    claimed.push(x);
                }
            }
            n if !claimed.is_empty() => {
                let x = claimed.swap_remove(rng.random_range(0..claimed.len()));
                match n {
                    3 => q.defer(&x, 0),
                    4 => {
                        let kind = if rng.random() {
                            Failure::Permanent
                        } else {
                            Failure::Transient
                        };
                        q.retry_later(&x, kind, "e".into()).await.unwrap();
                    }
                    5 => q.finish(&x, None).await.unwrap(),
                    _ => q
                        .finish(&x, Some(Record::new(1, 2, [3; 16])))
                        .await
                        .unwrap(),
                }
            }
            _ => {}
        }
        assert_eq!(q.depth(), q.depth_walked(), "step {step}");
        let walked: Vec<MediaPath> = {
            let inner = q.inner.lock().unwrap();
            let mut v: Vec<_> = inner
                .items
                .iter()
                .filter(|(_, e)| e.item.failed)
                .map(|(p, _)| p.clone())
                .collect();
            v.sort();
            v
        };
        let kept: Vec<MediaPath> = q.failures(usize::MAX).into_iter().map(|f| f.0).collect();
        assert_eq!(kept, walked, "step {step}");
    }
}
