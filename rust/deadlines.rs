//! The one deadline map that both transports and the Python-visible methods go through.
//!
//! Pure bookkeeping: no I/O and no clock reads; callers pass [`Instant`]s. One timer per
//! `(worker, scope)`, as in torch: registering again replaces it, a negative expiration
//! releases it, and releasing a key that does not exist does nothing. Workers are keyed by
//! whatever the caller validated a request's pid into (the server: a `rustix` `Pid`). The map
//! holds at most as many timers as its [`Caps`] allow.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::mem;
use std::time::Instant;

use crate::codec::Request;

/// A live timer: the request as received (for events and for Python's `_timers` view), its
/// deadline on the monotonic clock (None: never due), and what the caller noted about it
/// (the server: the learned bound that set the deadline, if one did).
#[derive(Debug, Clone, PartialEq)]
pub struct Timer<A = ()> {
    pub request: Request,
    pub deadline: Option<Instant>,
    pub note: A,
}

/// What [`DeadlineMap::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Replaced,
    Released,
    NoOp,
    /// A new timer past a cap: not registered, and nothing else changed.
    Refused(Cap),
}

/// The most live timers the map holds, per worker and in all. Only a new `(worker, scope)`
/// is refused past a cap: replacing or releasing a timer always works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub per_worker: usize,
    pub total: usize,
}

impl Caps {
    pub const NONE: Caps = Caps { per_worker: usize::MAX, total: usize::MAX };

    /// A server's caps unless told otherwise. A worker holds one timer per open `expires`
    /// block (a handful): 10,000 is far beyond any honest use, and bounds a worker flooding
    /// distinct scopes to about 40 MiB (4 KiB scopes, the most a FIFO line carries; a Local
    /// queue's items may be up to 64 KiB). Together: 10 such workers, or 100 workers with
    /// 1,000 timers each; the server then holds at most about 400 MiB (FIFO), 30 MiB with
    /// scopes of ordinary length (measured: 435 and 30 MiB per 100,000 timers of 4,000- and
    /// 40-byte scopes).
    pub const DEFAULT: Caps = Caps { per_worker: 10_000, total: 100_000 };
}

/// Which of the [`Caps`] refused a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Worker,
    Total,
}

/// A timer and its arrival number, hashed and compared by scope alone so that a worker's
/// table can be looked up by `&str` without storing the scope a second time as a key.
#[derive(Debug)]
struct Slot<A> {
    timer: Timer<A>,
    /// When the key was registered; kept on replacement, like the position of a key in
    /// torch's `_timers` dict, so ties among due timers break the way torch's stable sort does.
    seq: u64,
}

impl<A> Slot<A> {
    fn scope(&self) -> &str {
        &self.timer.request.scope
    }

    /// The slot's key in the deadline index, if it can fall due.
    fn index_key(&self) -> Option<IndexKey> {
        Some((self.timer.deadline?, self.seq))
    }
}

impl<A> Borrow<str> for Slot<A> {
    fn borrow(&self) -> &str {
        self.scope()
    }
}

impl<A> Hash for Slot<A> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.scope().hash(state);
    }
}

impl<A> PartialEq for Slot<A> {
    fn eq(&self, other: &Self) -> bool {
        self.scope() == other.scope()
    }
}

impl<A> Eq for Slot<A> {}

/// `(deadline, seq)`: unique because `seq` is, and ordered by deadline first. The index maps
/// it to the worker, whose table holds the timer: that is all the index is for.
type IndexKey = (Instant, u64);

/// Live timers, grouped by worker and indexed by deadline.
#[derive(Debug)]
pub struct DeadlineMap<K, A = ()> {
    workers: HashMap<K, HashSet<Slot<A>>>,
    /// Only timers that can fall due; never-due ones live in `workers` alone.
    index: BTreeMap<IndexKey, K>,
    last_seq: u64,
    len: usize,
    caps: Caps,
}

impl<K, A> Default for DeadlineMap<K, A> {
    fn default() -> Self {
        Self::with_caps(Caps::NONE)
    }
}

impl<K, A> DeadlineMap<K, A> {
    pub fn with_caps(caps: Caps) -> Self {
        Self { workers: HashMap::new(), index: BTreeMap::new(), last_seq: 0, len: 0, caps }
    }
}

impl<K: Copy + Eq + Hash, A: Default> DeadlineMap<K, A> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Whether an acquire of (`pid`, `scope`) would be registered: it replaces a timer, or
    /// both caps leave room for a new one. O(1).
    pub fn admits(&self, pid: K, scope: &str) -> Result<(), Cap> {
        let worker = self.workers.get(&pid);
        if worker.is_some_and(|slots| slots.contains(scope)) {
            Ok(())
        } else if worker.map_or(0, HashSet::len) >= self.caps.per_worker {
            Err(Cap::Worker)
        } else if self.len >= self.caps.total {
            Err(Cap::Total)
        } else {
            Ok(())
        }
    }

    /// Registers, replaces or (negative expiration) releases the timer for
    /// (`pid`, request.scope); `pid` is the request's pid, validated.
    pub fn apply(&mut self, pid: K, request: Request, deadline: Option<Instant>) -> Change {
        self.apply_noted(pid, request, deadline, A::default())
    }

    /// [`DeadlineMap::apply`], with a note kept beside the timer.
    pub fn apply_noted(
        &mut self,
        pid: K,
        request: Request,
        deadline: Option<Instant>,
        note: A,
    ) -> Change {
        if request.is_release() {
            let Entry::Occupied(mut worker) = self.workers.entry(pid) else {
                return Change::NoOp;
            };
            let Some(slot) = worker.get_mut().take(request.scope.as_str()) else {
                return Change::NoOp;
            };
            if worker.get().is_empty() {
                worker.remove();
            }
            if let Some(key) = slot.index_key() {
                self.index.remove(&key);
            }
            self.len -= 1;
            return Change::Released;
        }
        if let Err(cap) = self.admits(pid, &request.scope) {
            return Change::Refused(cap);
        }
        let worker = self.workers.entry(pid).or_default();
        let (seq, change) = match worker.take(request.scope.as_str()) {
            Some(old) => {
                if let Some(key) = old.index_key() {
                    self.index.remove(&key);
                }
                (old.seq, Change::Replaced)
            }
            None => {
                self.len += 1;
                self.last_seq += 1;
                (self.last_seq, Change::Added)
            }
        };
        let slot = Slot { timer: Timer { request, deadline, note }, seq };
        if let Some(key) = slot.index_key() {
            self.index.insert(key, pid);
        }
        worker.insert(slot);
        change
    }

    /// Drops every timer of `pid`; returns how many.
    pub fn remove_worker(&mut self, pid: K) -> usize {
        let Some(slots) = self.workers.remove(&pid) else {
            return 0;
        };
        for key in slots.iter().filter_map(Slot::index_key) {
            self.index.remove(&key);
        }
        self.len -= slots.len();
        slots.len()
    }

    /// How many timers `pid` has.
    pub fn worker_len(&self, pid: K) -> usize {
        self.workers.get(&pid).map_or(0, HashSet::len)
    }

    /// The earliest deadline of any timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.index.first_key_value().map(|(&(deadline, _), _)| deadline)
    }

    /// Workers that have at least one timer due at `now` (deadline <= now), each once, ordered
    /// by their earliest due deadline.
    pub fn due_workers(&self, now: Instant) -> Vec<K> {
        let mut seen = HashSet::new();
        self.index
            .iter()
            .take_while(|(&(deadline, _), _)| deadline <= now)
            .map(|(_, &pid)| pid)
            .filter(|&pid| seen.insert(pid))
            .collect()
    }

    /// That worker's timers due at `now`, sorted by the request's expiration (wall clock,
    /// ascending, NaN last), ties by arrival order.
    pub fn due_timers(&self, pid: K, now: Instant) -> Vec<&Timer<A>> {
        let mut due: Vec<&Slot<A>> = self
            .workers
            .get(&pid)
            .into_iter()
            .flatten()
            .filter(|slot| slot.timer.deadline.is_some_and(|deadline| deadline <= now))
            .collect();
        due.sort_unstable_by(|a, b| {
            nan_last(a.timer.request.expiration, b.timer.request.expiration).then(a.seq.cmp(&b.seq))
        });
        due.into_iter().map(|slot| &slot.timer).collect()
    }

    /// Moves every deadline of `pid` that is earlier than `until` to `until` (a failed reap is
    /// retried then; the requests, and so their reported expiration times, are unchanged).
    pub fn postpone_worker(&mut self, pid: K, until: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        // A set hands out no `&mut` to its elements; rebuilding costs O(k) like the walk itself.
        *worker = mem::take(worker)
            .into_iter()
            .map(|mut slot| {
                if let Some(key) = slot.index_key().filter(|&(deadline, _)| deadline < until) {
                    self.index.remove(&key);
                    slot.timer.deadline = Some(until);
                    self.index.insert((until, slot.seq), pid);
                }
                slot
            })
            .collect();
    }

    pub fn get(&self, pid: K, scope: &str) -> Option<&Timer<A>> {
        self.workers.get(&pid)?.get(scope).map(|slot| &slot.timer)
    }

    pub fn contains_worker(&self, pid: K) -> bool {
        self.workers.contains_key(&pid)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every live timer (any order).
    pub fn iter(&self) -> impl Iterator<Item = &Timer<A>> {
        self.workers.values().flatten().map(|slot| &slot.timer)
    }
}

/// Orders expirations ascending with NaN (of either sign) after every number.
fn nan_last(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

#[cfg(test)]
mod tests {
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
}
