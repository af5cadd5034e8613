use super::*;

type Pid = i64;
use proptest::prelude::*;
use std::time::Duration;

fn req(pid: Pid, scope: &str, expiration: f64, signal: i32) -> Request {
    Request { pid, scope: scope.to_owned(), expiration, signal }
}

fn acquire(pid: Pid, scope: &str, expiration: f64) -> Request {
    req(pid, scope, expiration, 9)
}

fn release(pid: Pid, scope: &str) -> Request {
    req(pid, scope, -1.0, 0)
}

fn at(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

/// Nothing left behind in either structure.
fn assert_drained(map: &DeadlineMap<Pid>) {
    assert!(map.is_empty());
    assert!(map.workers.is_empty());
    assert!(map.index.is_empty());
    assert_eq!(map.next_deadline(), None);
}

#[test]
fn is_send_to_live_behind_a_mutex() {
    fn assert_send<T: Send>() {}
    assert_send::<DeadlineMap<Pid>>();
}

#[test]
fn registering_again_replaces() {
    let base = Instant::now();
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    assert_eq!(map.apply(1, acquire(1, "a", 5.0), Some(at(base, 5))), Change::Added);
    assert_eq!(map.apply(1, req(1, "a", 7.0, 15), Some(at(base, 7))), Change::Replaced);
    assert_eq!(map.len(), 1);
    let timer = map.get(1, "a").expect("registered above");
    assert_eq!(timer.request, req(1, "a", 7.0, 15));
    assert_eq!(timer.deadline, Some(at(base, 7)));
    assert_eq!(map.next_deadline(), Some(at(base, 7)));
    assert!(map.due_workers(at(base, 6)).is_empty());
}

#[test]
fn negative_expiration_releases() {
    let base = Instant::now();
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    map.apply(1, acquire(1, "a", 5.0), Some(at(base, 5)));
    map.apply(1, acquire(1, "b", 6.0), Some(at(base, 6)));
    assert_eq!(map.apply(1, release(1, "a"), None), Change::Released);
    assert_eq!(map.get(1, "a"), None);
    assert_eq!(map.next_deadline(), Some(at(base, 6)));
    assert_eq!(map.apply(1, req(1, "b", f64::NEG_INFINITY, 0), None), Change::Released);
    assert_drained(&map);
}

#[test]
fn releasing_a_missing_key_is_a_no_op() {
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    assert_eq!(map.apply(1, release(1, "a"), None), Change::NoOp);
    assert!(!map.contains_worker(1));
    map.apply(1, acquire(1, "a", 5.0), None);
    assert_eq!(map.apply(1, release(1, "b"), None), Change::NoOp);
    assert_eq!(map.apply(2, release(2, "a"), None), Change::NoOp);
    assert_eq!(map.len(), 1);
    assert!(!map.contains_worker(2));
}

#[test]
fn timers_without_deadline_never_fall_due_but_are_ordinary_otherwise() {
    let base = Instant::now();
    let far = at(base, 1 << 40);
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    map.apply(1, acquire(1, "nan", f64::NAN), None);
    map.apply(1, acquire(1, "inf", f64::INFINITY), None);
    assert_eq!(map.len(), 2);
    assert_eq!(map.iter().count(), 2);
    assert_eq!(map.next_deadline(), None);
    assert!(map.due_workers(far).is_empty());
    assert!(map.due_timers(1, far).is_empty());
    map.postpone_worker(1, far);
    assert_eq!(map.get(1, "inf").expect("registered above").deadline, None);

    assert_eq!(map.apply(1, acquire(1, "nan", 3.0), Some(at(base, 3))), Change::Replaced);
    assert_eq!(map.due_workers(far), vec![1]);
    assert_eq!(map.apply(1, release(1, "inf"), None), Change::Released);
    assert_eq!(map.apply(1, acquire(1, "inf", f64::INFINITY), None), Change::Added);
    assert_eq!(map.remove_worker(1), 2);
    assert_drained(&map);
}

#[test]
fn remove_worker_drops_only_that_worker() {
    let base = Instant::now();
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    map.apply(1, acquire(1, "a", 1.0), Some(at(base, 1)));
    map.apply(1, acquire(1, "b", 2.0), None);
    map.apply(2, acquire(2, "a", 3.0), Some(at(base, 3)));
    assert_eq!(map.remove_worker(1), 2);
    assert_eq!(map.remove_worker(1), 0);
    assert!(!map.contains_worker(1));
    assert_eq!(map.len(), 1);
    assert_eq!(map.next_deadline(), Some(at(base, 3)));
    assert_eq!(map.due_workers(at(base, 10)), vec![2]);
}

#[test]
fn due_workers_come_once_by_earliest_due_deadline() {
    let base = Instant::now();
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    map.apply(3, acquire(3, "a", 0.0), Some(at(base, 5)));
    map.apply(1, acquire(1, "a", 0.0), Some(at(base, 9)));
    map.apply(1, acquire(1, "b", 0.0), Some(at(base, 2)));
    map.apply(2, acquire(2, "a", 0.0), Some(at(base, 20)));
    map.apply(4, acquire(4, "a", 0.0), Some(at(base, 10)));
    assert_eq!(map.due_workers(at(base, 10)), vec![1, 3, 4]);
    assert_eq!(map.due_workers(at(base, 4)), vec![1]);
    assert!(map.due_workers(at(base, 1)).is_empty());
}

#[test]
fn due_timers_sort_by_expiration_then_arrival() {
    let base = Instant::now();
    let due = Some(at(base, 1));
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    map.apply(1, acquire(1, "late", 30.0), due);
    map.apply(1, acquire(1, "nan", f64::NAN), due);
    map.apply(1, acquire(1, "first", 10.0), due);
    map.apply(1, acquire(1, "second", 10.0), due);
    map.apply(1, acquire(1, "mid", 20.0), due);
    map.apply(1, acquire(1, "pending", 0.0), Some(at(base, 100)));
    map.apply(2, acquire(2, "other", 0.0), due);
    // Replacing keeps the key's place among ties, as a dict assignment does in torch.
    map.apply(1, acquire(1, "first", 10.0), due);
    let due = map.due_timers(1, at(base, 1));
    let scopes: Vec<&str> = due.iter().map(|t| t.request.scope.as_str()).collect();
    assert_eq!(scopes, ["first", "second", "mid", "late", "nan"]);
    assert!(map.due_timers(3, at(base, 1)).is_empty());
}

#[test]
fn postpone_moves_only_earlier_deadlines_and_keeps_requests() {
    let base = Instant::now();
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    map.apply(1, acquire(1, "a", 1.0), Some(at(base, 1)));
    map.apply(1, acquire(1, "b", 5.0), Some(at(base, 5)));
    map.apply(1, acquire(1, "c", 20.0), Some(at(base, 20)));
    map.apply(1, acquire(1, "d", f64::INFINITY), None);
    map.apply(2, acquire(2, "a", 2.0), Some(at(base, 2)));
    let before: Vec<Request> = ["a", "b", "c", "d"]
        .iter()
        .map(|s| map.get(1, s).expect("registered above").request.clone())
        .collect();

    map.postpone_worker(1, at(base, 10));
    map.postpone_worker(7, at(base, 10));

    let deadline = |s| map.get(1, s).expect("registered above").deadline;
    assert_eq!(deadline("a"), Some(at(base, 10)));
    assert_eq!(deadline("b"), Some(at(base, 10)));
    assert_eq!(deadline("c"), Some(at(base, 20)));
    assert_eq!(deadline("d"), None);
    for request in before {
        let timer = map.get(1, &request.scope).expect("registered above");
        assert_eq!(timer.request, request);
    }
    assert_eq!(map.due_workers(at(base, 9)), vec![2]);
    assert_eq!(map.due_workers(at(base, 10)), vec![2, 1]);
    assert_eq!(map.due_timers(1, at(base, 10)).len(), 2);
    assert_eq!(map.len(), 5);
}

#[test]
fn caps_refuse_only_new_timers_and_lose_nothing() {
    let base = Instant::now();
    let due = Some(at(base, 1));
    let mut map: DeadlineMap<Pid> = DeadlineMap::with_caps(Caps { per_worker: 2, total: 3 });
    assert_eq!(map.apply(1, acquire(1, "a", 1.0), due), Change::Added);
    assert_eq!(map.apply(1, acquire(1, "b", 1.0), due), Change::Added);
    assert_eq!(map.admits(1, "c"), Err(Cap::Worker));
    assert_eq!(map.apply(1, acquire(1, "c", 1.0), due), Change::Refused(Cap::Worker));
    // At its cap, a worker still replaces and releases its timers.
    assert_eq!(map.admits(1, "a"), Ok(()));
    assert_eq!(map.apply(1, acquire(1, "a", 2.0), Some(at(base, 2))), Change::Replaced);
    assert_eq!(map.apply(1, release(1, "c"), None), Change::NoOp);
    assert_eq!(map.apply(2, acquire(2, "a", 1.0), due), Change::Added);
    assert_eq!(map.apply(3, acquire(3, "a", 1.0), due), Change::Refused(Cap::Total));
    assert!(!map.contains_worker(3), "a refused worker leaves nothing behind");
    assert_eq!(map.apply(2, acquire(2, "b", 1.0), due), Change::Refused(Cap::Total));
    // Nothing registered was lost; what fell due still does.
    assert_eq!(map.len(), 3);
    assert_eq!(map.get(1, "a").expect("kept").request.expiration, 2.0);
    assert_eq!(map.due_workers(at(base, 1)), vec![1, 2]);
    assert_eq!(map.due_timers(1, at(base, 2)).len(), 2);
    // Room again once a timer goes.
    assert_eq!(map.apply(1, release(1, "b"), None), Change::Released);
    assert_eq!(map.apply(3, acquire(3, "a", 1.0), due), Change::Added);
    assert_eq!(map.apply(1, acquire(1, "c", 1.0), due), Change::Refused(Cap::Total));
    assert_eq!(map.remove_worker(2), 1);
    assert_eq!(map.apply(1, acquire(1, "c", 1.0), due), Change::Added);
    assert_eq!(map.admits(1, "d"), Err(Cap::Worker), "the worker's cap comes first");
}

#[test]
fn acquire_release_pairs_leave_nothing_behind() {
    let base = Instant::now();
    let mut map: DeadlineMap<Pid> = DeadlineMap::new();
    for round in 0..3 {
        for pid in 0..100 {
            map.apply(pid, acquire(pid, "s", 1.0), Some(at(base, pid as u64)));
            map.apply(pid, acquire(pid, "t", 1.0), None);
            map.postpone_worker(pid, at(base, round));
            map.apply(pid, release(pid, "t"), None);
            map.apply(pid, release(pid, "s"), None);
        }
    }
    assert_drained(&map);
}

/// The obvious implementation: a list in registration order, replaced in place, like the
/// `_timers` dict in torch.
#[derive(Default)]
struct Model(Vec<Timer>);

impl Model {
    fn apply(&mut self, request: Request, deadline: Option<Instant>) -> Change {
        let found = self
            .0
            .iter()
            .position(|t| t.request.pid == request.pid && t.request.scope == request.scope);
        match (found, request.expiration < 0.0) {
            (None, true) => Change::NoOp,
            (Some(i), true) => {
                self.0.remove(i);
                Change::Released
            }
            (Some(i), false) => {
                self.0[i] = Timer { request, deadline, note: () };
                Change::Replaced
            }
            (None, false) => {
                self.0.push(Timer { request, deadline, note: () });
                Change::Added
            }
        }
    }

    fn remove_worker(&mut self, pid: Pid) -> usize {
        let before = self.0.len();
        self.0.retain(|t| t.request.pid != pid);
        before - self.0.len()
    }

    fn postpone_worker(&mut self, pid: Pid, until: Instant) {
        for t in self.0.iter_mut().filter(|t| t.request.pid == pid) {
            if let Some(deadline) = &mut t.deadline {
                *deadline = (*deadline).max(until);
            }
        }
    }

    /// Due timers in registration order.
    fn due(&self, now: Instant) -> impl Iterator<Item = &Timer> {
        self.0.iter().filter(move |t| t.deadline.is_some_and(|d| d <= now))
    }

    fn due_workers(&self, now: Instant) -> Vec<Pid> {
        let mut due: Vec<&Timer> = self.due(now).collect();
        due.sort_by_key(|t| t.deadline); // stable: registration order among ties
        let mut pids: Vec<Pid> = Vec::new();
        for t in due {
            if !pids.contains(&t.request.pid) {
                pids.push(t.request.pid);
            }
        }
        pids
    }

    fn due_timers(&self, pid: Pid, now: Instant) -> Vec<&Timer> {
        let mut due: Vec<&Timer> = self.due(now).filter(|t| t.request.pid == pid).collect();
        // Stable, keyed on (is NaN, value): numbers ascending, then every NaN.
        due.sort_by(|a, b| {
            let (x, y) = (a.request.expiration, b.request.expiration);
            (x.is_nan(), if x.is_nan() { 0.0 } else { x })
                .partial_cmp(&(y.is_nan(), if y.is_nan() { 0.0 } else { y }))
                .expect("no NaN left in the key")
        });
        due
    }
}

/// A comparable view of a timer (`Request`'s `PartialEq` says NaN != NaN).
type View = (Pid, String, u64, i32, Option<Instant>);

fn view(t: &Timer) -> View {
    let r = &t.request;
    (r.pid, r.scope.clone(), r.expiration.to_bits(), r.signal, t.deadline)
}

fn views<'a>(timers: impl IntoIterator<Item = &'a Timer>) -> Vec<View> {
    timers.into_iter().map(view).collect()
}

#[derive(Debug, Clone)]
enum Op {
    Apply { pid: Pid, scope: u8, expiration: f64, signal: i32, deadline: Option<u64> },
    RemoveWorker(Pid),
    Postpone(Pid, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let expiration = prop_oneof![
        Just(-1.0),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(f64::NAN),
        Just(-f64::NAN),
        Just(f64::INFINITY),
        (0..4u8).prop_map(f64::from),
    ];
    prop_oneof![
        6 => (0..4i64, 0..3u8, expiration, 0..3i32, proptest::option::of(0..8u64)).prop_map(
            |(pid, scope, expiration, signal, deadline)| Op::Apply {
                pid,
                scope,
                expiration,
                signal,
                deadline,
            }
        ),
        1 => (0..4i64).prop_map(Op::RemoveWorker),
        1 => (0..4i64, 0..8u64).prop_map(|(pid, ms)| Op::Postpone(pid, ms)),
    ]
}

proptest! {
    #[test]
    fn behaves_like_the_obvious_model(ops in proptest::collection::vec(op(), 1..60)) {
        let base = Instant::now();
        let mut map: DeadlineMap<Pid> = DeadlineMap::new();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Apply { pid, scope, expiration, signal, deadline } => {
                    let request = req(pid, &format!("s{scope}"), expiration, signal);
                    let deadline = deadline.map(|ms| at(base, ms));
                    prop_assert_eq!(
                        map.apply(pid, request.clone(), deadline),
                        model.apply(request, deadline)
                    );
                }
                Op::RemoveWorker(pid) => {
                    prop_assert_eq!(map.remove_worker(pid), model.remove_worker(pid));
                }
                Op::Postpone(pid, ms) => {
                    map.postpone_worker(pid, at(base, ms));
                    model.postpone_worker(pid, at(base, ms));
                }
            }

            prop_assert_eq!(map.len(), model.0.len());
            prop_assert_eq!(map.is_empty(), model.0.is_empty());
            prop_assert_eq!(map.len(), map.iter().count());
            let mut all = views(map.iter());
            all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            let mut expected = views(&model.0);
            expected.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            prop_assert_eq!(all, expected);
            prop_assert_eq!(
                map.next_deadline(),
                model.0.iter().filter_map(|t| t.deadline).min()
            );
            for pid in 0..4 {
                prop_assert_eq!(
                    map.contains_worker(pid),
                    model.0.iter().any(|t| t.request.pid == pid)
                );
                for scope in ["s0", "s1", "s2"] {
                    let expected = model
                        .0
                        .iter()
                        .find(|t| t.request.pid == pid && t.request.scope == scope);
                    prop_assert_eq!(map.get(pid, scope).map(view), expected.map(view));
                }
            }
            for ms in 0..9 {
                let now = at(base, ms);
                prop_assert_eq!(map.due_workers(now), model.due_workers(now));
                for pid in 0..4 {
                    prop_assert_eq!(
                        views(map.due_timers(pid, now)),
                        views(model.due_timers(pid, now))
                    );
                }
            }
        }
        prop_assert_eq!(map.workers.len(), map.workers.values().filter(|w| !w.is_empty()).count());
        prop_assert_eq!(map.index.len(), model.0.iter().filter(|t| t.deadline.is_some()).count());
    }
}
