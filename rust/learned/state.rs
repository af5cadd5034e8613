//! The state file of learned timeouts: its format, and its one reader and writer. The server
//! loads and saves it through [`Learner`](super::Learner); `elastic-timer timeouts` reads it
//! through the binding's `read_state_file`.
//!
//! # Version 1
//!
//! One JSON object, replaced atomically by [`write_state`]:
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
//!   [`Learner::load`](super::Learner::load) ignores them and derives them again under its
//!   own settings.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::histogram::{Histogram, BUCKETS};
use super::{micros, ConfigError, ScopeSummary, MAX_SCOPE_BYTES};
use crate::untrusted;

pub const STATE_FORMAT: &str = "elastic-timer learned timeouts";
pub const STATE_VERSION: u64 = 1;
/// A state file is input: anything larger is refused unread. A full table takes about
/// `max_scopes` x 10 KiB at most (a long scope name, escaped, and every bucket).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The learner's settings ([`Learner::load`](super::Learner::load)), not the file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Nothing at the path: the server starts afresh.
    #[error("cannot read the state file {}: there is no such file", path.display())]
    Missing { path: PathBuf },
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

/// One scope as a state file holds it, checked: what the server could have saved.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedScope {
    /// Its figures as saved (`p50`, `p99` and `suggested` under the saving server's settings).
    pub summary: ScopeSummary,
    pub(super) histogram: Histogram,
}

/// Read first, so that another file (or another version) is named as such.
#[derive(Deserialize)]
struct Header {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u64,
    scopes: Vec<ScopeRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(expecting = "a scope's record")]
struct ScopeRecord {
    scope: String,
    samples: u64,
    max: Option<f64>,
    after: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    suggested: Option<f64>,
    histogram: Vec<(usize, u32)>,
}

/// The scopes of the state file at `path`, in the file's order. Whoever can write it chooses
/// the timeouts a server enforces, so it is read only if it is private to this process's
/// user or root ([`untrusted::read_private`]), and only up to [`MAX_STATE_BYTES`].
pub fn read_state(path: &Path) -> Result<Vec<SavedScope>, StateError> {
    let bytes = match untrusted::read_private(path, MAX_STATE_BYTES as usize) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(StateError::Missing { path: path.to_owned() }),
        Err(source) => return Err(StateError::Read { path: path.to_owned(), source }),
    };
    parse(&bytes).map_err(|problem| StateError::Invalid { path: path.to_owned(), problem })
}

fn parse(bytes: &[u8]) -> Result<Vec<SavedScope>, Problem> {
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(Problem::TooLarge);
    }
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
    let state: StateFile =
        serde_json::from_slice(bytes).map_err(|e| Problem::Corrupt(e.to_string()))?;
    let mut names = HashSet::new();
    state
        .scopes
        .into_iter()
        .map(|record| {
            let saved = record.check()?;
            if !names.insert(saved.summary.scope.clone()) {
                let scope = &saved.summary.scope;
                return Err(Problem::Corrupt(format!("scope {scope:?}: listed twice")));
            }
            Ok(saved)
        })
        .collect()
}

impl ScopeRecord {
    /// The scope, if the record is one a server could have written.
    fn check(self) -> Result<SavedScope, Problem> {
        let corrupt = |what: String| Problem::Corrupt(format!("scope {:?}: {what}", self.scope));
        if self.scope.len() > MAX_SCOPE_BYTES {
            return Err(corrupt(format!("longer than {MAX_SCOPE_BYTES} bytes")));
        }
        let duration = |name: &str, seconds: Option<f64>| match seconds {
            Some(s) if !(s.is_finite() && s >= 0.0) => {
                Err(corrupt(format!("{name} is {s}, not a duration in seconds")))
            }
            // Rounded to the microsecond, saturating (`as` from f64).
            seconds => Ok(seconds.map(|s| Duration::from_micros((s * 1e6).round() as u64))),
        };
        let max = duration("max", self.max)?;
        if (self.samples == 0) != max.is_none() {
            return Err(corrupt("max must be null exactly when samples is 0".into()));
        }
        let after = duration("after", self.after)?;
        let p50 = duration("p50", self.p50)?;
        let p99 = duration("p99", self.p99)?;
        let suggested = duration("suggested", self.suggested)?;
        let mut histogram = Histogram::new();
        for &(index, count) in &self.histogram {
            if index >= BUCKETS {
                return Err(corrupt(format!("no histogram bucket {index}")));
            }
            histogram.add(index, count);
        }
        if histogram.total() > self.samples {
            return Err(corrupt("the histogram holds more than samples".into()));
        }
        let (scope, samples) = (self.scope, self.samples);
        let summary = ScopeSummary { scope, samples, p50, p99, max, after, suggested };
        Ok(SavedScope { summary, histogram })
    }
}

/// A state file's content, from each scope's figures and histogram: cheap enough to take
/// under the server's lock, and written elsewhere by [`write_state`].
pub(super) fn encode<'a>(scopes: impl Iterator<Item = (ScopeSummary, &'a Histogram)>) -> Vec<u8> {
    let seconds = |duration: Option<Duration>| duration.map(|d| micros(d) as f64 / 1e6);
    let scopes = scopes
        .map(|(summary, histogram)| ScopeRecord {
            samples: summary.samples,
            max: seconds(summary.max),
            after: seconds(summary.after),
            p50: seconds(summary.p50),
            p99: seconds(summary.p99),
            suggested: seconds(summary.suggested),
            histogram: histogram.non_empty().collect(),
            scope: summary.scope,
        })
        .collect();
    let state = StateFile { format: STATE_FORMAT.into(), version: STATE_VERSION, scopes };
    // Plain data: serialising it cannot fail.
    let mut json = serde_json::to_vec(&state).unwrap_or_default();
    json.push(b'\n');
    json
}

/// Writes a state file's `content` (from [`Learner::state_bytes`](super::Learner::state_bytes))
/// to `path` atomically: a temporary file in the same directory, flushed to disk, then renamed
/// over `path`.
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
