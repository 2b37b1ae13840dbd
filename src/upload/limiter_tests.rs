use super::*;

fn run(l: &Arc<Limiter>, n: usize, latency: Duration, signal: Signal) {
    // Starts as many as allowed (up to n), then finishes them with `latency` booked.
    let mut permits = Vec::new();
    while permits.len() < n {
        match l.try_start() {
            Some(p) => permits.push(p),
            None => break,
        }
    }
    for mut p in permits {
        p.started = Instant::now() - latency;
        p.finish(signal);
    }
}

#[test]
fn the_limit_grows_to_the_cap_while_latency_holds_and_is_never_exceeded() {
    let l = Limiter::new(64);
    assert_eq!(l.limit(), 16);
    for _ in 0..400 {
        let limit = l.limit();
        let mut permits: Vec<_> = std::iter::from_fn(|| l.try_start()).take(1000).collect();
        assert_eq!(permits.len(), limit.max(1), "exactly the limit may start");
        for p in &mut permits {
            p.started = Instant::now() - Duration::from_millis(30);
        }
        permits.into_iter().for_each(|p| {
            p.finish(Signal::Ok);
        });
    }
    assert_eq!(l.limit(), 64);
}

#[test]
fn rising_latency_shrinks_the_limit() {
    let l = Limiter::new(64);
    for _ in 0..100 {
        run(&l, 64, Duration::from_millis(30), Signal::Ok);
    }
    let before = l.limit();
    // Latency triples (a queue builds up somewhere): the limit shrinks until the long-term mean
    // has caught up (a slow drift is tolerated: TOLERANCE, and the cap bounds it).
    for _ in 0..3 {
        run(&l, 64, Duration::from_millis(100), Signal::Ok);
    }
    assert!(l.limit() * 4 < before * 3, "{} vs {before}", l.limit());
}

#[test]
fn an_unused_limit_does_not_grow() {
    let l = Limiter::new(64);
    for _ in 0..200 {
        run(&l, 1, Duration::from_millis(30), Signal::Ok);
    }
    assert_eq!(l.limit(), 16);
}

#[test]
fn throttling_cuts_once_per_window_and_retry_after_pauses() {
    let l = Limiter::new(64);
    for _ in 0..100 {
        run(&l, 64, Duration::from_millis(30), Signal::Ok);
    }
    let before = l.limit();
    // A burst of refusals from the same window counts once.
    for _ in 0..10 {
        l.throttled(None);
    }
    assert_eq!(l.limit(), (before as f64 * THROTTLE_FACTOR) as usize);
    l.throttled(Some(Duration::from_secs(5)));
    assert!(l.try_start().is_none(), "paused by Retry-After");
    let wake = l.next_wake().expect("a pause has an end");
    assert!(wake > Duration::from_secs(4) && wake <= Duration::from_secs(5));
}

#[test]
fn the_breaker_opens_after_failures_in_a_row_probes_alone_and_closes_on_an_answer() {
    let l = Limiter::new(8);
    // Failures interleaved with answers do not trip it.
    for _ in 0..10 {
        run(&l, 1, Duration::ZERO, Signal::Unavailable);
        run(&l, 1, Duration::ZERO, Signal::Neutral);
    }
    assert_eq!(l.breaker(), Breaker::Closed);
    let permits: Vec<_> = std::iter::from_fn(|| l.try_start()).take(8).collect();
    assert_eq!(permits.len(), 8);
    let states: Vec<_> = permits
        .into_iter()
        .map(|p| p.finish(Signal::Unavailable))
        .collect();
    assert_eq!(states[TRIP_AFTER as usize - 2], Breaker::Closed);
    assert_eq!(states[TRIP_AFTER as usize - 1], Breaker::Open);
    assert!(
        l.try_start().is_none(),
        "no upload until the first probe is due"
    );
    // The probe is due after FIRST_PROBE; then exactly one at a time.
    let later = Instant::now() + FIRST_PROBE;
    let probe = l.try_start_at(later).expect("a probe");
    assert!(l.try_start_at(later).is_none(), "one probe at a time");
    assert_eq!(probe.finish(Signal::Unavailable), Breaker::Open);
    // The interval doubled.
    assert!(l.try_start_at(later + FIRST_PROBE).is_none());
    let probe = l
        .try_start_at(Instant::now() + FIRST_PROBE * 3)
        .expect("a probe");
    assert_eq!(probe.finish(Signal::Neutral), Breaker::Closed);
    let all: Vec<_> = std::iter::from_fn(|| l.try_start()).take(100).collect();
    assert_eq!(all.len(), l.limit(), "the whole limit is back at once");
}

#[test]
fn a_dropped_permit_releases_its_slot_and_its_probe() {
    let l = Limiter::new(2);
    for _ in 0..TRIP_AFTER {
        run(&l, 1, Duration::ZERO, Signal::Unavailable);
    }
    let later = Instant::now() + FIRST_PROBE;
    drop(l.try_start_at(later).expect("a probe"));
    assert!(
        l.try_start_at(later).is_some(),
        "the probe slot is free again"
    );
}

#[tokio::test]
async fn requests_are_spaced_by_max_requests_per_second() {
    let l = Limiter::new(8);
    l.pace().await; // no cap: no wait
    l.set_rate(Some(200.0));
    let t = Instant::now();
    for _ in 0..11 {
        l.pace().await;
    }
    // The first slot is now; ten more are 5 ms apart (sleeps never end early).
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
}
