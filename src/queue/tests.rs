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
