//! Timeouts learned from the job: how long each scope's blocks take, and the bound that
//! catches a hang at a few times the longest.
//!
//! The server tells a [`Learner`] when a block begins (an acquire) and ends (its release), by
//! worker and scope, with instants on the monotonic clock. Once a scope has `min_samples`
//! completed blocks, an acquire of it gets [`Learned`]: the bound
//! `max(floor, factor x the longest block seen)`, when that undercuts the `after` the client
//! asked for. The first `warmup` completions of each worker in each scope are not counted.
//! Pure bookkeeping: no clock reads, and no I/O except the state file.
//!
//! Each request is O(1) and allocates nothing unless its scope is new: a scope's name is
//! interned once (with a fixed-size histogram), and blocks are keyed by (pid, scope id).
//! Memory is bounded whatever the scope ids are: at most `max_scopes` scopes of at most
//! [`MAX_SCOPE_BYTES`] each, and at most `max_worker_scopes` (worker, scope) pairs followed.
//! Beyond a limit nothing more is learned, and [`Acquired::limit_reached`] says so once.
//!
//! The statistics outlive the server in a state file ([`state`], which defines its format):
//! [`Learner::load`] and [`Learner::save`].

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::Hash;
use std::mem;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod histogram;
pub mod state;

use histogram::{bucket, Histogram};
pub use state::{read_state, write_state, SavedScope, StateError};

/// Scopes longer than this are not learned (a `with` line's scope is `file:line`).
pub const MAX_SCOPE_BYTES: usize = 1024;
/// The most `min_samples` may ask for.
pub const MAX_MIN_SAMPLES: u32 = 20;

type ScopeId = u32;

/// How the learned bound is derived, and the limits on what is tracked.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnConfig {
    /// The bound is this many times the longest block seen (at least 1).
    pub factor: f64,
    /// The bound is never below this.
    pub floor: Duration,
    /// Completions skipped per worker and scope before samples count.
    pub warmup: u32,
    /// Samples a scope needs before its bound applies (1 to [`MAX_MIN_SAMPLES`]).
    pub min_samples: u32,
    /// Scopes tracked at most; later ones are not learned.
    pub max_scopes: usize,
    /// (worker, scope) pairs followed at most (their open block and warm-up count).
    pub max_worker_scopes: usize,
}

impl Default for LearnConfig {
    fn default() -> Self {
        Self {
            factor: 5.0,
            floor: Duration::from_secs(5),
            warmup: 2,
            min_samples: 10,
            max_scopes: 4096,
            max_worker_scopes: 1 << 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("the factor must be a finite number of at least 1, not {0}")]
    Factor(f64),
    #[error("min_samples must be 1 to {MAX_MIN_SAMPLES}, not {0}")]
    MinSamples(u32),
    #[error("max_scopes must be 1 to {max}, not {0}", max = ScopeId::MAX)]
    MaxScopes(usize),
    #[error("max_worker_scopes must be at least 1")]
    MaxWorkerScopes,
}

impl LearnConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(ConfigError::Factor(self.factor));
        }
        if !(1..=MAX_MIN_SAMPLES).contains(&self.min_samples) {
            return Err(ConfigError::MinSamples(self.min_samples));
        }
        if self.max_scopes == 0 || self.max_scopes > ScopeId::MAX as usize {
            return Err(ConfigError::MaxScopes(self.max_scopes));
        }
        if self.max_worker_scopes == 0 {
            return Err(ConfigError::MaxWorkerScopes);
        }
        Ok(())
    }

    /// `max(floor, factor x longest)`, rounded up to the microsecond; None until learned.
    fn limit(&self, scope: &Scope) -> Option<Duration> {
        if scope.samples < u64::from(self.min_samples) {
            return None;
        }
        // Rounded up and saturating (`as` from f64): never below factor x longest.
        let scaled = (scope.max_us as f64 * self.factor).ceil() as u64;
        Some(Duration::from_micros(scaled).max(self.floor))
    }
}

/// A learned bound that undercuts the `after` an acquire asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// When the block is to expire, from its acquire: `max(floor, factor x max) < after`.
    pub bound: Duration,
    /// The samples behind it.
    pub samples: u64,
    /// The longest block seen.
    pub max: Duration,
    /// What the client asked for.
    pub after: Duration,
}

/// A limit on what is tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_scopes` scopes are tracked: new scopes are not learned.
    Scopes,
    /// The scope is longer than [`MAX_SCOPE_BYTES`]: it is not learned.
    ScopeBytes,
    /// `max_worker_scopes` pairs are followed: new pairs add no samples.
    WorkerScopes,
}

/// What [`Learner::acquired`] found.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Acquired {
    /// The bound to enforce instead of `after`, if the scope has learned one that undercuts it.
    pub learned: Option<Learned>,
    /// Set the first time (in this learner's life) each limit keeps something from being
    /// learned: the caller warns once.
    pub limit_reached: Option<Limit>,
}

/// One scope's figures, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSummary {
    pub scope: String,
    pub samples: u64,
    /// Quantiles: the upper edge of their histogram bucket (at most 1/8 wide), at most `max`.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
    /// The largest `after` asked for.
    pub after: Option<Duration>,
    /// The bound an acquire asking for `after` would get (at most `after`); None until learned.
    pub suggested: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
struct Scope {
    name: Arc<str>,
    samples: u64,
    /// The longest sample (0 while there is none).
    max_us: u64,
    /// The largest `after` asked for.
    after_us: Option<u64>,
    histogram: Histogram,
}

impl Scope {
    fn record(&mut self, us: u64) {
        self.samples = self.samples.saturating_add(1);
        self.max_us = self.max_us.max(us);
        self.histogram.add(bucket(us), 1);
    }

    fn max(&self) -> Option<Duration> {
        (self.samples > 0).then(|| Duration::from_micros(self.max_us))
    }

    fn quantile(&self, q: f64) -> Option<Duration> {
        let end = self.histogram.quantile_end(q)?;
        Some(Duration::from_micros(end.min(self.max_us)))
    }
}

/// One worker in one scope.
#[derive(Debug, Default)]
struct Block {
    /// The acquire of the open block.
    started: Option<Instant>,
    /// Completions so far, counted up to the warm-up only.
    completed: u32,
}

/// Per-scope duration statistics, learned from acquires and releases; workers are keyed by
/// whatever the caller validated their pid into (the server: a `rustix` `Pid`).
#[derive(Debug)]
pub struct Learner<K> {
    config: LearnConfig,
    ids: HashMap<Arc<str>, ScopeId>,
    scopes: Vec<Scope>,
    workers: HashMap<K, HashMap<ScopeId, Block>>,
    /// Pairs in `workers`, all workers together.
    worker_scopes: usize,
    /// Per [`Limit`]: already reported.
    warned: [bool; 3],
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl<K: Copy + Eq + Hash> Learner<K> {
    pub fn new(config: LearnConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            ids: HashMap::new(),
            scopes: Vec::new(),
            workers: HashMap::new(),
            worker_scopes: 0,
            warned: [false; 3],
        })
    }

    /// A block of `scope` begins in worker `pid`: the client asked for it to expire `after`
    /// from `now`. Acquiring a scope the worker holds begins its block again (the acquire
    /// replaces the timer). Returns the learned bound when it undercuts `after`.
    pub fn acquired(&mut self, pid: K, scope: &str, now: Instant, after: Duration) -> Acquired {
        let id = match self.intern(scope) {
            Ok(id) => id,
            Err(limit) => return Acquired { learned: None, limit_reached: self.first(limit) },
        };
        let limit_reached = match self.block(pid, id) {
            Some(block) => {
                block.started = Some(now);
                None
            }
            None => self.first(Limit::WorkerScopes),
        };
        let scope = &mut self.scopes[id as usize];
        scope.after_us = scope.after_us.max(Some(micros(after)));
        let learned =
            self.config.limit(scope).filter(|&bound| bound < after).map(|bound| Learned {
                bound,
                samples: scope.samples,
                max: Duration::from_micros(scope.max_us),
                after,
            });
        Acquired { learned, limit_reached }
    }

    /// Worker `pid` released `scope`: its open block, if any, took until `now`. The sample
    /// counts unless the worker is still warming up in that scope.
    pub fn released(&mut self, pid: K, scope: &str, now: Instant) {
        let Some(&id) = self.ids.get(scope) else {
            return;
        };
        let Some(block) = self.workers.get_mut(&pid).and_then(|blocks| blocks.get_mut(&id)) else {
            return;
        };
        let Some(started) = block.started.take() else {
            return;
        };
        if block.completed < self.config.warmup {
            block.completed += 1;
            return;
        }
        self.scopes[id as usize].record(micros(now.saturating_duration_since(started)));
    }

    /// Forgets the worker's open blocks and warm-up counts (it exited or was reaped).
    pub fn worker_gone(&mut self, pid: K) {
        if let Some(blocks) = self.workers.remove(&pid) {
            self.worker_scopes -= blocks.len();
        }
    }

    /// How many scopes are tracked.
    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    pub fn config(&self) -> &LearnConfig {
        &self.config
    }

    /// Every tracked scope's figures, in the order the scopes were first seen.
    pub fn summaries(&self) -> impl Iterator<Item = ScopeSummary> + '_ {
        self.scopes.iter().map(|scope| ScopeSummary {
            scope: scope.name.to_string(),
            samples: scope.samples,
            p50: scope.quantile(0.5),
            p99: scope.quantile(0.99),
            max: scope.max(),
            after: scope.after_us.map(Duration::from_micros),
            suggested: self.config.limit(scope).map(|bound| match scope.after_us {
                Some(after) => bound.min(Duration::from_micros(after)),
                None => bound,
            }),
        })
    }

    fn intern(&mut self, scope: &str) -> Result<ScopeId, Limit> {
        if let Some(&id) = self.ids.get(scope) {
            return Ok(id);
        }
        if scope.len() > MAX_SCOPE_BYTES {
            return Err(Limit::ScopeBytes);
        }
        if self.scopes.len() >= self.config.max_scopes {
            return Err(Limit::Scopes);
        }
        Ok(self.insert(Scope {
            name: scope.into(),
            samples: 0,
            max_us: 0,
            after_us: None,
            histogram: Histogram::new(),
        }))
    }

    fn insert(&mut self, scope: Scope) -> ScopeId {
        let id = self.scopes.len() as ScopeId; // below max_scopes, which fits
        self.ids.insert(scope.name.clone(), id);
        self.scopes.push(scope);
        id
    }

    /// The worker's block in the scope; None when it is new and the pairs are at their limit.
    fn block(&mut self, pid: K, id: ScopeId) -> Option<&mut Block> {
        let full = self.worker_scopes >= self.config.max_worker_scopes;
        let blocks = match self.workers.entry(pid) {
            Entry::Occupied(blocks) => blocks.into_mut(),
            Entry::Vacant(_) if full => return None,
            Entry::Vacant(blocks) => blocks.insert(HashMap::new()),
        };
        match blocks.entry(id) {
            Entry::Occupied(block) => Some(block.into_mut()),
            Entry::Vacant(_) if full => None,
            Entry::Vacant(block) => {
                self.worker_scopes += 1;
                Some(block.insert(Block::default()))
            }
        }
    }

    /// `Some(limit)` the first time only.
    fn first(&mut self, limit: Limit) -> Option<Limit> {
        (!mem::replace(&mut self.warned[limit as usize], true)).then_some(limit)
    }
}

impl From<SavedScope> for Scope {
    fn from(SavedScope { summary, histogram }: SavedScope) -> Self {
        Self {
            name: summary.scope.into(),
            samples: summary.samples,
            max_us: summary.max.map_or(0, micros),
            after_us: summary.after.map(micros),
            histogram,
        }
    }
}

impl<K: Copy + Eq + Hash> Learner<K> {
    /// The learner with the statistics of the state file at `path`; a fresh one if there is
    /// no file. Scopes past `max_scopes` are dropped.
    pub fn load(config: LearnConfig, path: &Path) -> Result<Self, StateError> {
        let mut learner = Self::new(config)?;
        let scopes = match read_state(path) {
            Ok(scopes) => scopes,
            Err(StateError::Missing { .. }) => return Ok(learner),
            Err(err) => return Err(err),
        };
        for saved in scopes.into_iter().take(learner.config.max_scopes) {
            learner.insert(saved.into());
        }
        Ok(learner)
    }

    /// Writes the statistics to `path` atomically (see [`write_state`]).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        write_state(path, &self.state_bytes())
    }

    /// The state file's content: cheap enough to take under the server's lock, and written
    /// elsewhere by [`write_state`].
    pub fn state_bytes(&self) -> Vec<u8> {
        state::encode(self.summaries().zip(self.scopes.iter().map(|scope| &scope.histogram)))
    }
}

#[cfg(test)]
mod tests;
