//! What the server tells its caller: events for the reporter, and its counters.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use rustix::process::Pid;

use crate::codec::Request;
use crate::learned::Learned;
use crate::reaper::Refusal;
use crate::stacks::Stacks;

/// What the server reports; the bindings turn these into log records and `log_event` calls.
#[derive(Debug)]
pub enum Event {
    /// A request that could not be decoded, and why.
    Malformed(String),
    /// A request naming a pid or signal that is never acted on.
    Refused { request: Request, reason: Refusal },
    /// Timers of workers that exited before they expired, dropped.
    WorkerExited { pid: Pid, dropped: usize },
    /// Something the operator should know that is not about one request.
    Warning(String),
    /// One pass's expired workers. When `ack` is set the loop signals its own process after
    /// the reporter acknowledges (or after a grace period).
    Expired { expiries: Vec<Expiry>, ack: Option<SyncSender<()>> },
    /// Worker `pid`'s timers expired and its stacks are being taken before its reap (the
    /// `Expired` event follows): the moment to look at the other workers too.
    Dumping { pid: Pid, scopes: Vec<String> },
    /// A signalled worker still ran `after` its signal, and was sent SIGKILL.
    Escalated { pid: Pid, signal: i32, after: Duration },
    /// A worker still ran `after` SIGKILL (reported once): what `/proc` says of it.
    Unreapable { pid: Pid, after: Duration, state: String },
}

/// One worker with expired timers, and what was done about it.
#[derive(Debug)]
pub struct Expiry {
    pub pid: Pid,
    /// Its expired timers in expiration order (torch reports those up to the first with a
    /// positive signal as expired, and logs all of them).
    pub timers: Vec<Request>,
    /// The chosen signal (0: none of its expired timers has a positive signal).
    pub signal: i32,
    pub outcome: ReapOutcome,
    /// Its stacks, when the server asked for them first.
    pub stacks: Option<Stacks>,
    /// The learned bound that fired (that of the timer that decided the signal), when one
    /// undercut the `after` its client asked for.
    pub learned: Option<Learned>,
    /// The torchrun error file this server wrote for it before the signal.
    pub error_file: Option<PathBuf>,
}

/// What an expiry came to. The bindings hand Python the [`ReapOutcome::name`] of each.
#[derive(Debug)]
pub enum ReapOutcome {
    /// No positive signal: the worker is left alone and its timers cleared (as torch).
    NotSignalled,
    Signalled,
    /// It had exited already.
    Gone,
    /// Signalling failed; retried after the retry interval.
    Failed(io::Error),
    /// Handed to the caller, which answers with [`super::Server::complete_reap`].
    Delegated,
    /// A dry run: would have been signalled; its expired timers are cleared.
    DryRun,
    /// Spared ([`super::Server::spare`]): the job found it waits for another, stuck worker.
    /// Its expired timers are cleared.
    Spared,
}

impl ReapOutcome {
    /// Every outcome's name, as Python sees it: `str()` of an `elastic_timer._native.Outcome`
    /// member, and an event's `outcome` in the event log.
    pub const NAMES: [&'static str; 7] =
        ["not_signalled", "signalled", "gone", "failed", "delegated", "dry_run", "spared"];

    pub fn name(&self) -> &'static str {
        let index = match self {
            Self::NotSignalled => 0,
            Self::Signalled => 1,
            Self::Gone => 2,
            Self::Failed(_) => 3,
            Self::Delegated => 4,
            Self::DryRun => 5,
            Self::Spared => 6,
        };
        Self::NAMES[index]
    }
}

/// Whether a counter only grows, or goes up and down (Prometheus's counter and gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One field of [`Stats`]: its name (the key of Python's `stats()`), kind and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// Declares [`Stats`] and, from the same lines, the [`Field`] of each of its counters: the one
/// definition of what `stats()` returns and the metrics expose.
macro_rules! stats {
    ($($kind:ident $name:ident: $help:literal,)*) => {
        /// Counters, readable at any time.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Stats {
            $(#[doc = $help] pub $name: u64,)*
        }

        impl Stats {
            /// Every field, in declaration order (that of [`Stats::values`]).
            pub const FIELDS: &'static [Field] =
                &[$(Field { name: stringify!($name), kind: Kind::$kind, help: $help },)*];

            /// The fields' values, in the order of [`Stats::FIELDS`].
            pub fn values(&self) -> impl Iterator<Item = u64> {
                [$(self.$name,)*].into_iter()
            }
        }
    };
}

stats! {
    Counter requests: "Timer requests received (acquires and releases).",
    Counter malformed: "Requests skipped because they could not be decoded.",
    Counter refused: "Requests refused because they named a process the server must not signal.",
    Counter over_cap: "Acquires refused because their worker, or the server, held the most timers allowed (max_worker_timers, max_timers).",
    Counter expired: "Timer expiries the server handled (a reap retried after a failure counts again).",
    Counter reaped: "Workers signalled because a timer of theirs expired.",
    Counter escalated: "Workers sent SIGKILL because they outlived their first signal.",
    Counter unreapable: "Workers still alive after SIGKILL (each counted once).",
    Counter stack_dumps: "Python stack dumps taken of expired workers.",
    Counter events_dropped: "Events dropped because the reporting thread fell behind.",
    Counter learned_expiries: "Expiries whose deadline a learned bound set (adaptive).",
    Gauge live_timers: "Timers currently registered.",
    Gauge learned_scopes: "Scopes whose durations are learned (adaptive).",
}
