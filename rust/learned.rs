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
//! # State file, version 1
//!
//! One JSON object, replaced atomically by [`Learner::save`]:
//!
//! ```json
//! {"format": "elastic-timer learned timeouts", "version": 1, "scopes": [
//!   {"scope": "train.py:42", "samples": 12, "max": 1.25, "after": 1800.0,
//!    "p50": 1.048576, "p99": 1.25, "suggested": 6.25, "histogram": [[143, 9], [145, 3]]}]}
//! ```
//!
//! Durations are seconds, with microsecond precision, and `null` where there is none. Per scope:
//! - `samples`: the completed blocks counted (warm-up excluded); `max`: the longest of them
//!   (`null` when there are none);
//! - `after`: the largest `after` its clients asked for (`null`: no acquire seen);
//! - `histogram`: `[bucket, count]` for the non-empty buckets of the durations, a count of at
//!   most `samples` in all. A duration of `d` microseconds is in bucket `d` when `d < 8`, else,
//!   with `m = floor(log2 d)`, in `8 (m - 2) + ((d >> (m - 3)) & 7)`: 8 per power of two, and
//!   `d >= 2^42` (51 days) in the last, 319;
//! - `p50`, `p99`, `suggested`: derived when saved, for readers such as `elastic-timer
//!   timeouts`. A quantile is the upper edge of its bucket, at most `max`; `suggested` is the
//!   bound under the saving server's settings, at most `after` (`null`: not learned yet).
//!   [`Learner::load`] ignores them and derives them again under its own settings.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::io::{self, Write};
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::untrusted;

/// Scopes longer than this are not learned (a `with` line's scope is `file:line`).
pub const MAX_SCOPE_BYTES: usize = 1024;
/// The most `min_samples` may ask for.
pub const MAX_MIN_SAMPLES: u32 = 20;
pub const STATE_FORMAT: &str = "elastic-timer learned timeouts";
pub const STATE_VERSION: u64 = 1;
/// A state file is input: anything larger is refused unread. A full table takes about
/// `max_scopes` x 10 KiB at most (a long scope name, escaped, and every bucket).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

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

/// Durations in microseconds, `1 << SUB_BITS` buckets per power of two, so a bucket is at most
/// 1/8 as wide as its lower edge. Durations of `1 << TOP_BIT` us (51 days) and over share the
/// last bucket.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const TOP_BIT: u32 = 42;
const BUCKETS: usize = ((TOP_BIT - SUB_BITS + 1) << SUB_BITS) as usize;

/// The bucket of a duration of `us` microseconds: below `SUB` one per microsecond, then
/// `SUB` per power of two.
fn bucket(us: u64) -> usize {
    let us = us.min((1 << TOP_BIT) - 1);
    if us < SUB {
        return us as usize;
    }
    let shift = 63 - us.leading_zeros() - SUB_BITS;
    ((u64::from(shift + 1) << SUB_BITS) + ((us >> shift) & (SUB - 1))) as usize
}

/// The first duration (us) past bucket `index`.
fn bucket_end(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index + 1;
    }
    let shift = (index >> SUB_BITS) - 1;
    ((SUB + (index & (SUB - 1))) << shift) + (1 << shift)
}

/// A fixed-size log-bucketed histogram.
#[derive(Debug, Clone, PartialEq)]
struct Histogram(Box<[u32; BUCKETS]>);

impl Histogram {
    fn new() -> Self {
        Self(Box::new([0; BUCKETS]))
    }

    fn add(&mut self, index: usize, count: u32) {
        if self.0[index].checked_add(count).is_none() {
            // Halving every bucket keeps the shape, and so the quantiles.
            self.0.iter_mut().for_each(|c| *c /= 2);
        }
        self.0[index] = self.0[index].saturating_add(count);
    }

    /// `(bucket, count)` of the non-empty buckets.
    fn non_empty(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|&(_, &count)| count > 0)
            .map(|(index, &count)| (index, count))
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|&c| u64::from(c)).sum()
    }

    /// The end (us) of the bucket that holds the `q` quantile; None when empty.
    fn quantile_end(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        self.0
            .iter()
            .position(|&c| {
                seen += u64::from(c);
                seen >= rank
            })
            .map(bucket_end)
    }
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

// -- the state file -----------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the state file {}: {source}", path.display())]
    Read { path: PathBuf, source: untrusted::Refused },
    #[error("cannot load the state file {}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: Problem },
    #[error("cannot save the state file {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What is wrong with a state file's content.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("it is larger than {MAX_STATE_BYTES} bytes")]
    TooLarge,
    #[error("it is not valid JSON ({0})")]
    NotJson(serde_json::Error),
    #[error("it is not an elastic-timer state file ({0})")]
    Foreign(String),
    #[error("it has format version {0}, and this elastic-timer reads version {STATE_VERSION}")]
    Version(serde_json::Value),
    #[error("it is corrupt: {0}")]
    Corrupt(String),
}

/// Read first, so that another file (or another version) is named as such.
#[derive(Deserialize)]
struct Header {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct StateFile<'a> {
    format: Cow<'a, str>,
    version: u64,
    scopes: Vec<ScopeRecord<'a>>,
}

#[derive(Serialize, Deserialize)]
struct ScopeRecord<'a> {
    scope: Cow<'a, str>,
    samples: u64,
    max: Option<f64>,
    after: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    suggested: Option<f64>,
    histogram: Vec<(usize, u32)>,
}

fn seconds(duration: Duration) -> f64 {
    micros(duration) as f64 / 1e6
}

fn micros_of_seconds(seconds: f64) -> Result<u64, String> {
    if seconds.is_finite() && seconds >= 0.0 {
        Ok((seconds * 1e6).round() as u64)
    } else {
        Err(format!("{seconds} is not a duration in seconds"))
    }
}

impl<K: Copy + Eq + Hash> Learner<K> {
    /// The learner with the statistics of the state file at `path`; a fresh one if there is
    /// no file. Scopes past `max_scopes` are dropped.
    pub fn load(config: LearnConfig, path: &Path) -> Result<Self, StateError> {
        let mut learner = Self::new(config)?;
        let invalid = |problem| StateError::Invalid { path: path.to_owned(), problem };
        let bytes = match read_state(path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(learner),
            Err(source) => return Err(StateError::Read { path: path.to_owned(), source }),
        };
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(invalid(Problem::TooLarge));
        }
        let state = parse(&bytes).map_err(invalid)?;
        for record in state.scopes.into_iter().take(learner.config.max_scopes) {
            learner.restore(record).map_err(invalid)?;
        }
        Ok(learner)
    }

    fn restore(&mut self, record: ScopeRecord<'_>) -> Result<(), Problem> {
        let corrupt = |what: String| Problem::Corrupt(format!("scope {:?}: {what}", record.scope));
        if record.scope.len() > MAX_SCOPE_BYTES {
            return Err(corrupt(format!("longer than {MAX_SCOPE_BYTES} bytes")));
        }
        if self.ids.contains_key(&*record.scope) {
            return Err(corrupt("listed twice".into()));
        }
        let max_us = record.max.map(micros_of_seconds).transpose().map_err(corrupt)?;
        let after_us = record.after.map(micros_of_seconds).transpose().map_err(corrupt)?;
        if (record.samples == 0) != max_us.is_none() {
            return Err(corrupt("max must be null exactly when samples is 0".into()));
        }
        let mut histogram = Histogram::new();
        for &(index, count) in &record.histogram {
            if index >= BUCKETS {
                return Err(corrupt(format!("no histogram bucket {index}")));
            }
            histogram.add(index, count);
        }
        if histogram.total() > record.samples {
            return Err(corrupt("the histogram holds more than samples".into()));
        }
        self.insert(Scope {
            name: record.scope.into(),
            samples: record.samples,
            max_us: max_us.unwrap_or(0),
            after_us,
            histogram,
        });
        Ok(())
    }

    /// Writes the statistics to `path` atomically (see [`write_state`]).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        write_state(path, &self.state_bytes())
    }

    /// The state file's content: cheap enough to take under the server's lock, and written
    /// elsewhere by [`write_state`].
    pub fn state_bytes(&self) -> Vec<u8> {
        // Plain data: serialising it cannot fail.
        let mut json = serde_json::to_vec(&self.state()).unwrap_or_default();
        json.push(b'\n');
        json
    }

    fn state(&self) -> StateFile<'_> {
        let scopes = self
            .summaries()
            .zip(&self.scopes)
            .map(|(summary, scope)| ScopeRecord {
                scope: Cow::Owned(summary.scope),
                samples: summary.samples,
                max: summary.max.map(seconds),
                after: summary.after.map(seconds),
                p50: summary.p50.map(seconds),
                p99: summary.p99.map(seconds),
                suggested: summary.suggested.map(seconds),
                histogram: scope.histogram.non_empty().collect(),
            })
            .collect();
        StateFile { format: STATE_FORMAT.into(), version: STATE_VERSION, scopes }
    }
}

/// Writes a state file's `content` (from [`Learner::state_bytes`]) to `path` atomically: a
/// temporary file in the same directory, flushed to disk, then renamed over `path`.
pub fn write_state(path: &Path, content: &[u8]) -> Result<(), StateError> {
    let write = || -> io::Result<()> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut file = tempfile::Builder::new().prefix(".elastic-timer-state.").tempfile_in(dir)?;
        file.write_all(content)?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|e| e.error)?;
        // The rename is durable once the directory is.
        File::open(dir)?.sync_all()
    };
    write().map_err(|source| StateError::Write { path: path.to_owned(), source })
}

/// The bytes of the state file at `path`, up to one past [`MAX_STATE_BYTES`]; None if
/// there is none. Whoever can write it chooses the timeouts the server enforces, so it is
/// read only if it is private to this process's user or root (see
/// [`untrusted::read_private`]); `elastic-timer timeouts` reads it with the same rule.
fn read_state(path: &Path) -> Result<Option<Vec<u8>>, untrusted::Refused> {
    untrusted::read_private(path, MAX_STATE_BYTES as usize)
}

fn parse(bytes: &[u8]) -> Result<StateFile<'static>, Problem> {
    let header: Header = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Problem::Foreign(e.to_string()),
        _ => Problem::NotJson(e),
    })?;
    if header.format.as_ref().and_then(|f| f.as_str()) != Some(STATE_FORMAT) {
        return Err(Problem::Foreign(format!("its \"format\" is not {STATE_FORMAT:?}")));
    }
    match header.version {
        Some(version) if version.as_u64() == Some(STATE_VERSION) => {}
        version => return Err(Problem::Version(version.unwrap_or(serde_json::Value::Null))),
    }
    serde_json::from_slice(bytes).map_err(|e| Problem::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pid = i64;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn config() -> LearnConfig {
        LearnConfig { floor: SECOND, warmup: 1, min_samples: 3, ..LearnConfig::default() }
    }

    fn learner(config: LearnConfig) -> Learner<Pid> {
        Learner::new(config).expect("a valid config")
    }

    /// One block of `scope` in `pid` from `start` that takes `took`; what its acquire got.
    fn block(
        learner: &mut Learner<Pid>,
        pid: Pid,
        scope: &str,
        start: Instant,
        took: Duration,
        after: Duration,
    ) -> Acquired {
        let acquired = learner.acquired(pid, scope, start, after);
        learner.released(pid, scope, start + took);
        acquired
    }

    fn summary(learner: &Learner<Pid>, scope: &str) -> ScopeSummary {
        learner.summaries().find(|s| s.scope == scope).expect("the scope is tracked")
    }

    #[test]
    fn is_send_to_live_in_the_server_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Learner<Pid>>();
    }

    #[test]
    fn the_bound_is_factor_times_the_longest_once_learned() {
        let base = Instant::now();
        let after = Duration::from_secs(1800);
        let mut learner = learner(config());
        // Warm-up (1), then 3 samples: 2 s, 4 s, 3 s.
        for (i, secs) in [100, 2, 4, 3].into_iter().enumerate() {
            let got = block(&mut learner, 7, "s", base, Duration::from_secs(secs), after);
            assert_eq!(got, Acquired::default(), "not learned before sample {i}");
        }
        let got = learner.acquired(7, "s", base, after);
        let expected = Learned {
            bound: Duration::from_secs(20),
            samples: 3,
            max: Duration::from_secs(4),
            after,
        };
        assert_eq!(got, Acquired { learned: Some(expected), limit_reached: None });
        // A bound that would not undercut `after` is no bound.
        assert_eq!(learner.acquired(7, "s", base, Duration::from_secs(20)).learned, None);
        assert!(learner.acquired(7, "s", base, Duration::from_secs(21)).learned.is_some());
    }

    #[test]
    fn the_floor_holds_for_fast_blocks() {
        let base = Instant::now();
        let mut learner = learner(config());
        for _ in 0..4 {
            let _ = block(&mut learner, 1, "fast", base, Duration::from_millis(3), 60 * SECOND);
        }
        let learned = learner.acquired(1, "fast", base, 60 * SECOND).learned.expect("learned");
        assert_eq!(learned.bound, SECOND);
        assert_eq!(learned.max, Duration::from_millis(3));
    }

    #[test]
    fn each_worker_warms_up_in_each_scope() {
        let base = Instant::now();
        let long = 100 * SECOND;
        let mut learner = learner(LearnConfig { warmup: 2, ..config() });
        for pid in [1, 2] {
            for scope in ["a", "b"] {
                for _ in 0..2 {
                    let _ = block(&mut learner, pid, scope, base, long, long);
                }
            }
        }
        assert!(learner.summaries().all(|s| s.samples == 0 && s.max.is_none()));
        let _ = block(&mut learner, 1, "a", base, SECOND, long);
        let _ = block(&mut learner, 2, "a", base, SECOND, long);
        assert_eq!(summary(&learner, "a").samples, 2);
        assert_eq!(summary(&learner, "a").max, Some(SECOND));
        assert_eq!(summary(&learner, "b").samples, 0);
    }

    #[test]
    fn acquiring_again_begins_the_block_again() {
        let base = Instant::now();
        let mut learner = learner(LearnConfig { warmup: 0, ..config() });
        let _ = learner.acquired(1, "s", base, 60 * SECOND);
        let _ = learner.acquired(1, "s", base + 10 * SECOND, 60 * SECOND);
        learner.released(1, "s", base + 12 * SECOND);
        // A second release, or one without an acquire, is no sample.
        learner.released(1, "s", base + 20 * SECOND);
        learner.released(2, "s", base + 20 * SECOND);
        let s = summary(&learner, "s");
        assert_eq!((s.samples, s.max), (1, Some(2 * SECOND)));
    }

    #[test]
    fn releasing_an_unknown_scope_tracks_nothing() {
        let mut learner = learner(config());
        learner.released(1, "never acquired", Instant::now());
        assert_eq!(learner.summaries().count(), 0);
        assert!(learner.workers.is_empty());
    }

    #[test]
    fn a_gone_worker_loses_its_open_blocks_and_warms_up_again() {
        let base = Instant::now();
        let mut learner = learner(config());
        let _ = block(&mut learner, 1, "s", base, SECOND, 60 * SECOND); // warm-up
        let _ = learner.acquired(1, "s", base, 60 * SECOND);
        learner.worker_gone(1);
        assert_eq!(learner.worker_scopes, 0);
        learner.released(1, "s", base + SECOND);
        assert_eq!(summary(&learner, "s").samples, 0);
        // A new process with the same pid starts its warm-up afresh.
        let _ = block(&mut learner, 1, "s", base, SECOND, 60 * SECOND);
        assert_eq!(summary(&learner, "s").samples, 0);
        let _ = block(&mut learner, 1, "s", base, SECOND, 60 * SECOND);
        assert_eq!(summary(&learner, "s").samples, 1);
        learner.worker_gone(99);
    }

    #[test]
    fn scopes_past_the_cap_are_not_learned_and_warn_once() {
        let base = Instant::now();
        let mut learner = learner(LearnConfig { max_scopes: 2, ..config() });
        assert_eq!(learner.acquired(1, "a", base, SECOND).limit_reached, None);
        assert_eq!(learner.acquired(1, "b", base, SECOND).limit_reached, None);
        assert_eq!(learner.acquired(1, "c", base, SECOND).limit_reached, Some(Limit::Scopes));
        assert_eq!(learner.acquired(1, "d", base, SECOND).limit_reached, None);
        assert_eq!(learner.acquired(1, "a", base, SECOND).limit_reached, None);
        let scopes: Vec<String> = learner.summaries().map(|s| s.scope).collect();
        assert_eq!(scopes, ["a", "b"]);
        assert_eq!(learner.worker_scopes, 2);
    }

    #[test]
    fn long_scopes_are_not_learned_and_warn_once() {
        let base = Instant::now();
        let mut learner = learner(config());
        let long = "x".repeat(MAX_SCOPE_BYTES + 1);
        assert_eq!(learner.acquired(1, &long, base, SECOND).limit_reached, Some(Limit::ScopeBytes));
        assert_eq!(learner.acquired(2, &long, base, SECOND).limit_reached, None);
        learner.released(1, &long, base);
        assert_eq!(learner.summaries().count(), 0);
        let fits = "x".repeat(MAX_SCOPE_BYTES);
        assert_eq!(learner.acquired(1, &fits, base, SECOND).limit_reached, None);
    }

    #[test]
    fn worker_scope_pairs_are_capped_but_learned_bounds_still_apply() {
        let base = Instant::now();
        let after = 60 * SECOND;
        let mut learner = learner(LearnConfig { warmup: 0, max_worker_scopes: 1, ..config() });
        for _ in 0..3 {
            let _ = block(&mut learner, 1, "s", base, SECOND, after);
        }
        let got = block(&mut learner, 2, "s", base, 30 * SECOND, after);
        assert_eq!(got.limit_reached, Some(Limit::WorkerScopes));
        assert_eq!(got.learned.map(|l| l.bound), Some(5 * SECOND));
        let got = block(&mut learner, 1, "t", base, SECOND, after);
        assert_eq!(got, Acquired::default());
        assert_eq!(summary(&learner, "s").samples, 3);
        assert_eq!(summary(&learner, "t").samples, 0);
        assert_eq!(learner.workers.len(), 1);
        learner.worker_gone(1);
        let _ = block(&mut learner, 2, "s", base, SECOND, after);
        assert_eq!(summary(&learner, "s").samples, 4);
    }

    #[test]
    fn summaries_report_quantiles_after_and_suggestion() {
        let base = Instant::now();
        let mut learner = learner(LearnConfig { warmup: 0, ..config() });
        let _ = learner.acquired(1, "idle", base, 7 * SECOND);
        for ms in 1..=100u64 {
            let after = Duration::from_secs(if ms == 50 { 900 } else { 600 });
            let _ = block(&mut learner, 1, "s", base, Duration::from_millis(ms * 10), after);
        }
        let s = summary(&learner, "s");
        assert_eq!(s.samples, 100);
        assert_eq!(s.max, Some(SECOND));
        assert_eq!(s.after, Some(900 * SECOND));
        assert_eq!(s.suggested, Some(5 * SECOND));
        let p50 = s.p50.expect("samples").as_secs_f64();
        assert!((0.5..=0.5 * 1.125).contains(&p50), "p50 {p50}");
        let p99 = s.p99.expect("samples").as_secs_f64();
        assert!((0.99..=1.0).contains(&p99), "p99 {p99}");
        let idle = summary(&learner, "idle");
        let expected = ScopeSummary {
            scope: "idle".into(),
            samples: 0,
            p50: None,
            p99: None,
            max: None,
            after: Some(7 * SECOND),
            suggested: None,
        };
        assert_eq!(idle, expected);
    }

    #[test]
    fn the_suggestion_is_at_most_after() {
        let base = Instant::now();
        let mut learner = learner(LearnConfig { warmup: 0, ..config() });
        for _ in 0..3 {
            let _ = block(&mut learner, 1, "s", base, 10 * SECOND, 30 * SECOND);
        }
        assert_eq!(summary(&learner, "s").suggested, Some(30 * SECOND));
    }

    #[test]
    fn buckets_are_contiguous_and_at_most_an_eighth_wide() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket_end(BUCKETS - 1), 1 << TOP_BIT);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let mut start = 0;
        for index in 0..BUCKETS {
            let end = bucket_end(index);
            assert_eq!(bucket(start), index);
            assert_eq!(bucket(end - 1), index);
            assert!(end - start == 1 || (end - start) * SUB <= start, "bucket {index}");
            start = end;
        }
    }

    #[test]
    fn a_full_bucket_halves_the_histogram() {
        let mut histogram = Histogram::new();
        histogram.add(3, u32::MAX);
        histogram.add(5, 10);
        histogram.add(3, 1);
        assert_eq!((histogram.0[3], histogram.0[5]), (u32::MAX / 2 + 1, 5));
    }

    #[test]
    fn config_is_validated() {
        let bad = [
            LearnConfig { factor: 0.5, ..config() },
            LearnConfig { factor: f64::NAN, ..config() },
            LearnConfig { factor: f64::INFINITY, ..config() },
            LearnConfig { min_samples: 0, ..config() },
            LearnConfig { min_samples: MAX_MIN_SAMPLES + 1, ..config() },
            LearnConfig { max_scopes: 0, ..config() },
            LearnConfig { max_worker_scopes: 0, ..config() },
        ];
        for config in bad {
            assert!(Learner::<Pid>::new(config.clone()).is_err(), "{config:?}");
        }
        assert_eq!(LearnConfig::default().validate(), Ok(()));
        let message = Learner::<Pid>::new(LearnConfig { factor: 0.5, ..config() }).unwrap_err();
        assert_eq!(
            message.to_string(),
            "the factor must be a finite number of at least 1, not 0.5"
        );
    }

    // -- state file -----------------------------------------------------------------------------

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/learned-state.json")
    }

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temporary directory")
    }

    /// A comparable copy of the summaries.
    fn figures(learner: &Learner<Pid>) -> Vec<(String, u64, [Option<Duration>; 5])> {
        learner
            .summaries()
            .map(|s| (s.scope.to_owned(), s.samples, [s.p50, s.p99, s.max, s.after, s.suggested]))
            .collect()
    }

    fn load(path: &Path) -> Result<Learner<Pid>, StateError> {
        Learner::load(config(), path)
    }

    fn problem(bytes: &[u8]) -> Problem {
        let dir = scratch();
        let path = dir.path().join("state.json");
        std::fs::write(&path, bytes).expect("written");
        match load(&path) {
            Err(StateError::Invalid { path: reported, problem }) => {
                assert_eq!(reported, path);
                problem
            }
            other => panic!("{:?} loaded as {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn a_missing_file_is_a_fresh_start() {
        let dir = scratch();
        let learner = load(&dir.path().join("none.json")).expect("fresh");
        assert_eq!(learner.summaries().count(), 0);
    }

    #[test]
    fn save_then_load_round_trips() {
        let base = Instant::now();
        let mut learner = learner(LearnConfig { warmup: 0, ..config() });
        for ms in [1, 7, 300, 2_000, 2_001, 86_400_000] {
            let _ = block(&mut learner, 1, "s\n\"é\"", base, Duration::from_millis(ms), SECOND);
        }
        let _ = learner.acquired(1, "open", base, Duration::MAX);
        let _ = learner.acquired(1, "no after", base, SECOND);
        learner.scopes[2].after_us = None;
        let dir = scratch();
        let path = dir.path().join("state.json");
        learner.save(&path).expect("saved");
        learner.save(&path).expect("saved over");
        let loaded = load(&path).expect("loaded");
        assert_eq!(figures(&loaded), figures(&learner));
        assert_eq!(loaded.scopes, learner.scopes);
        let names = std::fs::read_dir(dir.path()).expect("listed").count();
        assert_eq!(names, 1, "no temporary file left behind");
    }

    #[test]
    fn saving_over_a_directory_is_a_write_error() {
        let dir = scratch();
        let path = dir.path().join("sub");
        std::fs::create_dir(&path).expect("created");
        let error = learner(config()).save(&path).expect_err("a directory is in the way");
        assert!(matches!(&error, StateError::Write { path: p, .. } if *p == path), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("listed").count(), 1, "no temporary file");
    }

    #[test]
    fn the_fixture_is_what_save_writes() {
        // Both sides read this file: the CLI's tests use it too, so they agree on one format.
        let text = std::fs::read_to_string(fixture()).expect("the fixture");
        let learner = Learner::load(LearnConfig::default(), &fixture()).expect("the fixture loads");
        let s = summary(&learner, "train.py:42");
        assert_eq!((s.samples, s.max), (12, Some(Duration::from_millis(1250))));
        let dir = scratch();
        let path = dir.path().join("state.json");
        learner.save(&path).expect("saved");
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        let expected: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(saved, expected);
    }

    #[test]
    fn other_files_are_named_as_such() {
        assert!(matches!(problem(b""), Problem::NotJson(_)));
        assert!(matches!(problem(b"{\"format\": \"elastic-timer"), Problem::NotJson(_)));
        assert!(matches!(problem(b"\xff\xfe"), Problem::NotJson(_)));
        assert!(matches!(problem(b"[1, 2]"), Problem::Foreign(_)));
        assert!(matches!(problem(b"{\"version\": 1}"), Problem::Foreign(_)));
        assert!(matches!(problem(b"{\"format\": 3, \"version\": 1}"), Problem::Foreign(_)));
        let future = format!("{{\"format\": {STATE_FORMAT:?}, \"version\": 2, \"scopes\": {{}}}}");
        let message = problem(future.as_bytes()).to_string();
        assert_eq!(message, "it has format version 2, and this elastic-timer reads version 1");
        let no_version = format!("{{\"format\": {STATE_FORMAT:?}}}");
        assert!(matches!(problem(no_version.as_bytes()), Problem::Version(_)));
    }

    #[test]
    fn corrupt_content_is_an_error() {
        let record = |fields: &str| {
            let defaults = [
                ("scope", "\"s\""),
                ("samples", "2"),
                ("max", "1.5"),
                ("after", "null"),
                ("p50", "null"),
                ("p99", "null"),
                ("suggested", "null"),
                ("histogram", "[[200, 2]]"),
            ];
            let mut fields: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(fields).expect("test fields");
            for (key, value) in defaults {
                fields.entry(key).or_insert(serde_json::from_str(value).expect("default"));
            }
            let scopes = serde_json::Value::Array(vec![fields.into()]);
            format!("{{\"format\": {STATE_FORMAT:?}, \"version\": 1, \"scopes\": {scopes}}}")
        };
        assert!(load_bytes(record("{}").as_bytes()).is_ok(), "the base record is valid");
        for bad in [
            r#"{"samples": -1}"#,
            r#"{"samples": 0}"#,
            r#"{"max": null}"#,
            r#"{"max": -1.0}"#,
            r#"{"after": "soon"}"#,
            r#"{"histogram": [[320, 1]]}"#,
            r#"{"histogram": [[3, 4294967296]]}"#,
            r#"{"histogram": [[3, 2], [4, 1]]}"#,
            r#"{"histogram": {}}"#,
            r#"{"scope": 5}"#,
        ] {
            assert!(matches!(problem(record(bad).as_bytes()), Problem::Corrupt(_)), "{bad}");
        }
        let long = serde_json::Value::from("x".repeat(MAX_SCOPE_BYTES + 1));
        let long = record(&format!("{{\"scope\": {long}}}"));
        assert!(matches!(problem(long.as_bytes()), Problem::Corrupt(_)));
        let one = serde_json::json!({"scope": "s", "samples": 0, "max": null, "after": null,
            "p50": null, "p99": null, "suggested": null, "histogram": []});
        let twice = serde_json::json!({"format": STATE_FORMAT, "version": 1, "scopes": [one, one]});
        let message = problem(twice.to_string().as_bytes()).to_string();
        assert_eq!(message, "it is corrupt: scope \"s\": listed twice");
    }

    fn load_bytes(bytes: &[u8]) -> Result<Learner<Pid>, StateError> {
        let dir = scratch();
        let path = dir.path().join("state.json");
        std::fs::write(&path, bytes).expect("written");
        load(&path)
    }

    #[test]
    fn a_large_file_is_refused_unread() {
        let dir = scratch();
        let path = dir.path().join("state.json");
        File::create(&path).and_then(|f| f.set_len(MAX_STATE_BYTES + 1)).expect("made");
        assert!(matches!(load(&path), Err(StateError::Invalid { problem: Problem::TooLarge, .. })));
    }

    #[test]
    fn an_unreadable_path_is_a_read_error() {
        let dir = scratch();
        assert!(matches!(load(dir.path()), Err(StateError::Read { .. })));
    }

    #[test]
    fn a_file_someone_else_could_have_written_is_refused_unread() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch();
        let path = dir.path().join("state.json");
        learner(config()).save(&path).expect("saved");
        load(&path).expect("a private file of ours loads");
        let refusal = |path: &Path| match load(path) {
            Err(StateError::Read { source, .. }) => source.to_string(),
            other => panic!("loaded: {other:?}"),
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert_eq!(refusal(&path), "group or others may write it (mode 0666)");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert_eq!(refusal(&link), "it is a symbolic link");
        // A FIFO would block a plain open until someone opened it to write.
        let fifo = dir.path().join("fifo.json");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600))
            .expect("mkfifo");
        assert_eq!(refusal(&fifo), "it is not a regular file");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
            assert_eq!(refusal(&path), "it belongs to uid 65534, not to uid 0");
        }
    }

    #[test]
    fn saving_replaces_what_someone_put_at_the_path_and_writes_nothing_else() {
        let dir = scratch();
        let target = dir.path().join("shell-startup");
        std::fs::write(&target, "kept\n").expect("written");
        for name in ["symlink.json", "hardlink.json"] {
            let path = dir.path().join(name);
            if name == "symlink.json" {
                std::os::unix::fs::symlink(&target, &path).expect("symlink");
            } else {
                std::fs::hard_link(&target, &path).expect("link");
            }
            learner(config()).save(&path).expect("saved");
            // The name now holds a new file of ours; the file it led to is as it was.
            let saved = std::fs::symlink_metadata(&path).expect("stat");
            assert!(saved.file_type().is_file(), "{name}");
            load(&path).expect("ours, private: it loads");
            assert_eq!(std::fs::read_to_string(&target).expect("read"), "kept\n", "{name}");
        }
    }

    #[test]
    fn scopes_past_the_cap_are_dropped_on_load() {
        let dir = scratch();
        let path = dir.path().join("state.json");
        let mut many = learner(config());
        for scope in ["a", "b", "c"] {
            let _ = many.acquired(1, scope, Instant::now(), SECOND);
        }
        many.save(&path).expect("saved");
        let loaded: Learner<Pid> =
            Learner::load(LearnConfig { max_scopes: 2, ..config() }, &path).expect("ok");
        let scopes: Vec<String> = loaded.summaries().map(|s| s.scope).collect();
        assert_eq!(scopes, ["a", "b"]);
    }

    // -- properties -----------------------------------------------------------------------------

    #[derive(Debug, Clone)]
    enum Op {
        Acquire {
            pid: Pid,
            scope: u8,
            after_ms: u64,
        },
        Release {
            pid: Pid,
            scope: u8,
        },
        Gone(Pid),
        /// The clock moves on.
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3i64, 0..3u8, 0..20_000u64)
                .prop_map(|(pid, scope, after_ms)| Op::Acquire { pid, scope, after_ms }),
            4 => (0..3i64, 0..3u8).prop_map(|(pid, scope)| Op::Release { pid, scope }),
            1 => (0..3i64).prop_map(Op::Gone),
            4 => (0..3_000u64).prop_map(Op::Wait),
        ]
    }

    fn settings() -> impl Strategy<Value = LearnConfig> {
        (1.0..10.0f64, 0..2_000u64, 0..3u32, 1..=MAX_MIN_SAMPLES).prop_map(
            |(factor, floor_ms, warmup, min_samples)| LearnConfig {
                factor,
                floor: Duration::from_millis(floor_ms),
                warmup,
                min_samples,
                ..LearnConfig::default()
            },
        )
    }

    /// The obvious bookkeeping: every completed block of every worker, warm-up flagged.
    #[derive(Default)]
    struct Model {
        open: HashMap<(Pid, u8), Instant>,
        completed: HashMap<(Pid, u8), u32>,
        /// Per scope: the durations that count.
        samples: HashMap<u8, Vec<Duration>>,
    }

    proptest! {
        #[test]
        fn the_bound_stays_between_the_longest_block_and_after(
            config in settings(),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let base = Instant::now();
            let mut now = base;
            let mut learner = learner(config.clone());
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Acquire { pid, scope, after_ms } => {
                        let after = Duration::from_millis(after_ms);
                        let got = learner.acquired(pid, &format!("s{scope}"), now, after);
                        model.open.insert((pid, scope), now);
                        prop_assert_eq!(got.limit_reached, None);
                        let samples = model.samples.get(&scope).map_or(&[][..], Vec::as_slice);
                        let longest = samples.iter().max().copied();
                        let learned = samples.len() >= config.min_samples as usize;
                        match got.learned {
                            Some(l) => {
                                prop_assert!(learned);
                                prop_assert!(l.bound < after);
                                prop_assert!(l.bound >= config.floor);
                                prop_assert_eq!(Some(l.max), longest);
                                prop_assert!(l.bound.as_secs_f64() >= config.factor * l.max.as_secs_f64() - 1e-6);
                                prop_assert_eq!(l.samples, samples.len() as u64);
                                prop_assert_eq!(l.after, after);
                            }
                            None => {
                                // Not learned, or factor x longest (or the floor) reaches after.
                                let longest = longest.unwrap_or_default().as_secs_f64();
                                prop_assert!(
                                    !learned
                                        || config.floor >= after
                                        || config.factor * longest >= after.as_secs_f64() - 2e-6
                                );
                            }
                        }
                    }
                    Op::Release { pid, scope } => {
                        learner.released(pid, &format!("s{scope}"), now);
                        if let Some(start) = model.open.remove(&(pid, scope)) {
                            let completed = model.completed.entry((pid, scope)).or_default();
                            if *completed < config.warmup {
                                *completed += 1;
                            } else {
                                model.samples.entry(scope).or_default().push(now - start);
                            }
                        }
                    }
                    Op::Gone(pid) => {
                        learner.worker_gone(pid);
                        model.open.retain(|&(p, _), _| p != pid);
                        model.completed.retain(|&(p, _), _| p != pid);
                    }
                    Op::Wait(ms) => now += Duration::from_millis(ms),
                }
            }
            for s in learner.summaries() {
                let scope: u8 = s.scope[1..].parse().expect("s<n>");
                let samples = model.samples.get(&scope).map_or(&[][..], Vec::as_slice);
                prop_assert_eq!(s.samples, samples.len() as u64);
                prop_assert_eq!(s.max, samples.iter().max().copied());
                prop_assert!(s.p50 <= s.p99 && s.p99 <= s.max);
                if let (Some(suggested), Some(after)) = (s.suggested, s.after) {
                    prop_assert!(suggested <= after);
                }
            }
        }

        #[test]
        fn the_scope_cap_holds_whatever_the_scopes(
            max_scopes in 1..8usize,
            scopes in proptest::collection::vec(any::<u16>(), 1..100),
        ) {
            let mut learner = learner(LearnConfig { max_scopes, ..config() });
            let now = Instant::now();
            let mut warnings = 0;
            for (pid, scope) in scopes.iter().enumerate() {
                let got = learner.acquired(pid as Pid % 4, &format!("step {scope}"), now, SECOND);
                warnings += usize::from(got.limit_reached == Some(Limit::Scopes));
            }
            let distinct: std::collections::HashSet<_> = scopes.iter().collect();
            prop_assert_eq!(learner.summaries().count(), distinct.len().min(max_scopes));
            prop_assert_eq!(warnings, usize::from(distinct.len() > max_scopes));
            prop_assert!(learner.worker_scopes <= 4 * max_scopes);
        }

    }

    proptest! {
        // Each case writes and syncs a file.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn save_and_load_round_trip(
            blocks in proptest::collection::vec((0..4u8, 0..100_000_000u64, 0..4_000_000u64), 0..60),
        ) {
            let base = Instant::now();
            let mut learner = learner(LearnConfig { warmup: 0, ..config() });
            for (scope, took_us, after_ms) in blocks {
                let took = Duration::from_micros(took_us);
                let _ = block(&mut learner, 1, &format!("s{scope}"), base, took, Duration::from_millis(after_ms));
            }
            let dir = scratch();
            let path = dir.path().join("state.json");
            learner.save(&path).expect("saved");
            let loaded = load(&path).expect("loaded");
            prop_assert_eq!(figures(&loaded), figures(&learner));
        }

        #[test]
        fn a_damaged_file_is_an_error_not_a_panic(
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let mut bytes = std::fs::read(fixture()).expect("the fixture");
            for (at, byte) in flips {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            // Loaded or refused, both fine: what must not happen is a panic.
            let _ = load_bytes(&bytes);
        }

        #[test]
        fn arbitrary_bytes_are_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(load_bytes(&bytes).is_err());
        }
    }
}
