//! Crash-recovery model of the queue: random enqueue / claim / finish / retry / defer sequences,
//! with crashes at random points, checked against a model after every restart.
//!
//! A crash is simulated for what matters, the durable tables: the commit thread is held off (a
//! test hook keeps redb's write lock, so no commit is half done), more ops may be submitted
//! meanwhile (they are not durable yet, and any that return anyway were acknowledged without being
//! durable), and `state.redb` is copied as it is on disk at that instant — what a `kill -9` would
//! leave. Everything is then dropped without a clean shutdown and the next epoch opens the copy
//! (redb recovers an uncleanly closed file) with `State::open` + `Queue::load`.
//!
//! Invariants checked after every restart (the model keeps, per path, a generation per enqueue and
//! the generation each claim saw; an upload covers what was enqueued before its claim):
//! - nothing lost: a path whose latest *acknowledged* enqueue is not covered by a finished upload
//!   (its record is on disk) or by its file's disappearance is still queued;
//! - nothing falsely uploaded: a record exists only if an upload of that path was finished with
//!   exactly that record; an acknowledged record is never lost; no path is queued that was never
//!   enqueued; nothing is in flight after a restart.
//!
//! The in-process crash cannot lose data inside redb itself (the copy is taken between commits);
//! the `kill -9` tests of the daemon (tests/it/daemon.rs) cover the real process.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;

use super::*;

const PATHS: u8 = 6;

fn path(i: u8) -> MediaPath {
    MediaPath::parse(&format!("local_content/aa/bb/f{i}")).unwrap()
}

/// An op that may be left waiting for its commit: an enqueue, or the n-th in-flight item finished
/// (uploaded with a record, or its file gone).
#[derive(Debug, Clone)]
enum Op2 {
    Enqueue(Vec<u8>),
    Finish(usize, bool),
}

#[derive(Debug, Clone)]
enum Step {
    /// Submit and wait.
    Do(Op2),
    /// Submit and leave it waiting (it completes at the next `Settle`, or is lost in a crash).
    Start(Op2),
    Settle,
    Claim,
    /// The n-th in-flight item failed (permanently or not).
    Retry(usize, bool),
    /// The n-th in-flight item goes back to the queue (not settled yet).
    Defer(usize),
    /// Commits are held off, `late` ops are submitted (and polled once), the file is copied as a
    /// crash would leave it, and the process "dies".
    Crash(Vec<Op2>),
}

fn op2() -> impl Strategy<Value = Op2> {
    prop_oneof![
        proptest::collection::vec(0..PATHS, 1..4).prop_map(Op2::Enqueue),
        (0usize..4, any::<bool>()).prop_map(|(i, up)| Op2::Finish(i, up)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => op2().prop_map(Step::Do),
        2 => op2().prop_map(Step::Start),
        1 => Just(Step::Settle),
        4 => Just(Step::Claim),
        1 => (0usize..4, any::<bool>()).prop_map(|(i, p)| Step::Retry(i, p)),
        1 => (0usize..4).prop_map(Step::Defer),
        1 => proptest::collection::vec(op2(), 0..4).prop_map(Step::Crash),
    ]
}

#[derive(Debug, Default)]
struct PathModel {
    /// Bumped when an enqueue of the path is submitted (the file was written again).
    generation: u64,
    /// The highest generation whose enqueue returned Ok.
    acked: u64,
    /// The highest claim generation of a finish that found the file gone.
    gone: u64,
    /// Record id → the generation its upload covers (the generation when it was claimed).
    records: BTreeMap<u64, u64>,
    /// Some finish with a record returned Ok.
    record_acked: bool,
}

#[derive(Debug, Default)]
struct Model {
    paths: BTreeMap<MediaPath, PathModel>,
    /// Claimed items: path and the generation seen at claim time.
    in_flight: Vec<(MediaPath, u64)>,
    next_record: u64,
}

/// What an op's completion means for the model.
enum Ack {
    Enqueued(Vec<(MediaPath, u64)>),
    Recorded(MediaPath),
    Gone,
}

impl Model {
    fn ack(&mut self, ack: Ack) {
        match ack {
            Ack::Enqueued(gens) => {
                for (p, g) in gens {
                    let m = self.paths.get_mut(&p).expect("enqueued");
                    m.acked = m.acked.max(g);
                }
            }
            Ack::Recorded(p) => self.paths.get_mut(&p).expect("known").record_acked = true,
            Ack::Gone => {}
        }
    }

    fn take_in_flight(&mut self, n: usize) -> Option<(MediaPath, u64)> {
        (!self.in_flight.is_empty()).then(|| self.in_flight.remove(n % self.in_flight.len()))
    }
}

type Fut<'a> = Pin<Box<dyn Future<Output = Result<(), StateError>> + 'a>>;

/// Submits `op` (the queue's memory changes and the op's submission happen at the first poll).
fn start<'a>(q: &'a Queue, model: &mut Model, op: &Op2) -> Option<(Fut<'a>, Ack)> {
    match op {
        Op2::Enqueue(ids) => {
            let mut gens = Vec::new();
            let mut items = Vec::new();
            for &i in ids {
                let m = model.paths.entry(path(i)).or_default();
                m.generation += 1;
                gens.push((path(i), m.generation));
                items.push((path(i), 0, false));
            }
            Some((Box::pin(q.enqueue(items)), Ack::Enqueued(gens)))
        }
        Op2::Finish(n, uploaded) => {
            let (p, claim_gen) = model.take_in_flight(*n)?;
            let m = model.paths.get_mut(&p).expect("claimed");
            if *uploaded {
                model.next_record += 1;
                let id = model.next_record;
                m.records.insert(id, claim_gen);
                let record = Record::new(id, id as i64, [0; 16]);
                let ack = Ack::Recorded(p.clone());
                Some((
                    Box::pin(async move { q.finish(&p, Some(record)).await }),
                    ack,
                ))
            } else {
                m.gone = m.gone.max(claim_gen);
                Some((Box::pin(async move { q.finish(&p, None).await }), Ack::Gone))
            }
        }
    }
}

/// Polls once: `Some` if the op already completed.
fn poll_once(fut: &mut Fut<'_>) -> Option<Result<(), StateError>> {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

/// Opens the state in `dir`, checks the invariants against `model`, runs `steps` until a crash
/// (or their end, which is a crash too), and returns the directory holding the crash image.
fn epoch(
    dir: &Path,
    steps: &mut std::vec::IntoIter<Step>,
    model: &mut Model,
    image: &Path,
) -> Result<PathBuf, TestCaseError> {
    let state = State::open(dir).unwrap();
    check(&state, model)?;
    let (committer, thread) = Committer::start(state.clone());
    let q = Queue::load(&state, committer, Duration::ZERO, Duration::ZERO).unwrap();
    prop_assert_eq!(q.depth().in_flight, 0);
    model.in_flight.clear();
    let mut pending: Vec<(Fut<'_>, Ack)> = Vec::new();
    let mut late = Vec::new();
    for step in steps.by_ref() {
        match step {
            Step::Do(op) => {
                if let Some((fut, ack)) = start(&q, model, &op) {
                    futures::executor::block_on(fut).unwrap();
                    model.ack(ack);
                }
            }
            Step::Start(op) => {
                if let Some((mut fut, ack)) = start(&q, model, &op) {
                    match poll_once(&mut fut) {
                        Some(r) => {
                            r.unwrap();
                            model.ack(ack);
                        }
                        None => pending.push((fut, ack)),
                    }
                }
            }
            Step::Settle => {
                for (fut, ack) in pending.drain(..) {
                    futures::executor::block_on(fut).unwrap();
                    model.ack(ack);
                }
            }
            Step::Claim => {
                if let Some((p, _)) = q.claim() {
                    let m = model.paths.get(&p);
                    prop_assert!(
                        m.is_some_and(|m| m.generation > 0),
                        "claimed {p}, never enqueued"
                    );
                    prop_assert!(
                        !model.in_flight.iter().any(|(f, _)| f == &p),
                        "claimed {p} twice"
                    );
                    let generation = m.expect("checked").generation;
                    model.in_flight.push((p, generation));
                }
            }
            Step::Retry(n, permanent) => {
                if let Some((p, _)) = model.take_in_flight(n) {
                    let kind = if permanent {
                        Failure::Permanent
                    } else {
                        Failure::Transient
                    };
                    futures::executor::block_on(q.retry_later(&p, kind, "503".into())).unwrap();
                }
            }
            Step::Defer(n) => {
                if let Some((p, _)) = model.take_in_flight(n) {
                    q.defer(&p, 0);
                }
            }
            Step::Crash(ops) => {
                late = ops;
                break;
            }
        }
    }
    // The crash: no commit can happen while `gate` lives, so the copy is exactly what is durable
    // now. Late ops are submitted meanwhile; one that returns Ok was acknowledged undurably.
    let gate = state.block_writes();
    for op in &late {
        if let Some((mut fut, ack)) = start(&q, model, op) {
            match poll_once(&mut fut) {
                Some(r) => {
                    r.unwrap();
                    model.ack(ack);
                }
                None => pending.push((fut, ack)),
            }
        }
    }
    std::fs::create_dir(image).unwrap();
    std::fs::copy(state.path(), image.join(crate::state::STATE_FILE)).unwrap();
    drop(gate);
    // No clean shutdown: waiting ops are abandoned; the committer thread finishes on the original
    // file, which is thrown away.
    drop(pending);
    drop(q);
    drop(state);
    thread.join().unwrap();
    Ok(image.to_owned())
}

/// The invariants, on the state as a restart finds it.
fn check(state: &State, model: &Model) -> Result<(), TestCaseError> {
    let queued: Vec<String> = state
        .queue_items()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for k in &queued {
        let p = MediaPath::parse(k).unwrap();
        prop_assert!(
            model.paths.get(&p).is_some_and(|m| m.generation > 0),
            "{k} is queued but was never enqueued"
        );
    }
    for (p, m) in &model.paths {
        let record = state.record(p).unwrap();
        let covered_by_record = match record {
            None => {
                prop_assert!(
                    !m.record_acked,
                    "{p}: an acknowledged upload record was lost"
                );
                0
            }
            Some(r) => match m.records.get(&r.size) {
                Some(&generation) => generation,
                None => {
                    return Err(TestCaseError::fail(format!(
                        "{p}: record {r:?} was never written by a finished upload"
                    )));
                }
            },
        };
        if m.acked > covered_by_record.max(m.gone) {
            prop_assert!(
                queued.iter().any(|k| k == p.as_str()),
                "{p}: enqueue #{} was acknowledged, is not covered by an upload (record covers #{covered_by_record}, gone #{}), and is not queued: lost",
                m.acked,
                m.gone
            );
        }
    }
    Ok(())
}

fn run_case(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let images = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let mut dir = images.path().join("0");
    let mut steps = steps.into_iter();
    for n in 1.. {
        dir = epoch(
            &dir,
            &mut steps,
            &mut model,
            &images.path().join(n.to_string()),
        )?;
        if steps.as_slice().is_empty() {
            break;
        }
    }
    // The last crash image, as the next start finds it.
    check(&State::open(&dir).unwrap(), &model)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn crashes_at_any_point_lose_no_acknowledged_item_and_invent_no_upload(
        steps in proptest::collection::vec(step(), 1..28)
    ) {
        run_case(steps)?;
    }
}

/// The case the model found, pinned: two enqueues of a new path, the second returning while the
/// first's commit is still held off. The second may only return once the path is durable.
#[test]
fn a_second_enqueue_of_a_new_path_waits_for_the_first_ones_commit() {
    use Op2::*;
    run_case(vec![Step::Crash(vec![Enqueue(vec![1]), Enqueue(vec![1])])]).unwrap();
    run_case(vec![
        Step::Do(Enqueue(vec![0])),
        Step::Claim,
        Step::Crash(vec![Finish(0, true), Enqueue(vec![0]), Enqueue(vec![0])]),
    ])
    .unwrap();
}
