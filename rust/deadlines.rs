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
mod tests;
