//! The timer server: one native thread that reads requests, keeps deadlines and reaps.
//!
//! The thread sleeps in one `epoll_wait` on the transport, an eventfd (stop, and timers
//! registered from outside), and the pidfds of workers with timers. Its timeout is the
//! earliest deadline, so a deadline fires when it is due and an idle server does not wake.
//! It never needs Python: what it has to report goes, as [`Event`]s, down a bounded channel
//! that the bindings drain from a thread of their own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags};
use rustix::process::Pid;

use crate::codec::{self, Request};
use crate::deadlines::DeadlineMap;
use crate::fifo;
use crate::queue;
use crate::reaper::{self, Lineage, Outcome, Refusal, Tracked, Workers};
use crate::stacks::{self, Stacks};

/// Events waiting for the reporter past this many are dropped (and counted).
const EVENT_CAPACITY: usize = 4096;
/// How long the loop waits for its events to be reported before it signals its own process.
const REPORT_GRACE: Duration = Duration::from_secs(1);
/// Distinct refused pids reported (each once); past this, refusals are only counted.
const MAX_REFUSED_REPORTED: usize = 1024;
/// How long a reap handed to Python may go unanswered before it is handed over again.
const DELEGATE_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on the retry interval of a failed reap.
const MAX_RETRY: Duration = Duration::from_secs(1);

const TAG_WAKE: u64 = 0;
const TAG_SOURCE: u64 = 1;
const TAG_FIFO_WATCH: u64 = 2;
const TAG_WORKER: u64 = 1 << 32;

/// How a server behaves (see the Python classes for the user-facing names).
#[derive(Debug, Clone)]
pub struct Config {
    /// torch's `max_interval`: here only the retry interval of a failed reap (capped at 1 s);
    /// deadlines fire when due.
    pub max_interval: Duration,
    /// Signal this process after a pass that reaped (torch's File server does).
    pub signal_self: bool,
    /// Hand reaps to the caller (a Python `_reap_worker` override) instead of signalling.
    pub delegate_reaps: bool,
    /// File descriptors the server may spend on pidfds.
    pub max_pidfds: usize,
    /// Refuse acquires from processes that do not descend from the server's process (its
    /// children, their children...): under torchrun every worker is the agent's child.
    pub descendants_only: bool,
    /// Report every expiry and signal nothing (to tune timeouts on a live job).
    pub dry_run: bool,
    /// SIGKILL a signalled worker still running this long after; one that outlives the
    /// SIGKILL by as long is reported as unreapable.
    pub escalate_after: Option<Duration>,
    /// Ask an expired worker for its stacks before signalling it.
    pub stack_dump: Option<stacks::Config>,
}

/// Where requests come from.
#[derive(Debug)]
pub enum Transport {
    Fifo(PathBuf),
    Queue(queue::Reader),
    /// Requests arrive only through [`Server::register`] (a queue read from Python).
    Direct,
}

/// A transport opened for the running loop; parked back into its [`Transport`] on stop.
enum Source {
    /// The FIFO, and a watch telling when its path may no longer lead to it (None where
    /// inotify is unavailable, or once another FIFO took the path).
    Fifo(PathBuf, fifo::Reader, Option<fifo::Watch>),
    Queue(queue::Reader),
    Direct,
}

/// What the server reports; the bindings turn these into log records and `log_event` calls.
#[derive(Debug)]
pub enum Event {
    /// A request that could not be decoded, and why.
    Malformed(String),
    /// A request naming a pid or signal that is never acted on.
    Refused { request: Request, reason: Refusal },
    /// Timers of workers that exited before they expired, dropped.
    WorkerExited { pid: i64, dropped: usize },
    /// Something the operator should know that is not about one request.
    Warning(String),
    /// One pass's expired workers. When `ack` is set the loop signals its own process after
    /// the reporter acknowledges (or after a grace period).
    Expired { expiries: Vec<Expiry>, ack: Option<SyncSender<()>> },
    /// A signalled worker still ran `after` its signal, and was sent SIGKILL.
    Escalated { pid: i64, signal: i32, after: Duration },
    /// A worker still ran `after` SIGKILL (reported once): what `/proc` says of it.
    Unreapable { pid: i64, after: Duration, state: String },
}

/// One worker with expired timers, and what was done about it.
#[derive(Debug)]
pub struct Expiry {
    pub pid: i64,
    /// Its expired timers in expiration order (torch reports those up to the first with a
    /// positive signal as expired, and logs all of them).
    pub timers: Vec<Request>,
    /// The chosen signal (0: none of its expired timers has a positive signal).
    pub signal: i32,
    pub outcome: ReapOutcome,
    /// Its stacks, when the server asked for them first.
    pub stacks: Option<Stacks>,
}

#[derive(Debug)]
pub enum ReapOutcome {
    /// No positive signal: the worker is left alone and its timers cleared (as torch).
    NotSignalled,
    Signalled,
    /// It had exited already.
    Gone,
    /// Signalling failed; retried after the retry interval.
    Failed(io::Error),
    /// Handed to the caller, which answers with [`Server::complete_reap`].
    Delegated,
    /// A dry run: would have been signalled; its expired timers are cleared.
    DryRun,
}

/// Counters, readable at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub malformed: u64,
    pub refused: u64,
    /// Expiries reported (a reap retried after a failure counts again).
    pub expired: u64,
    pub reaped: u64,
    pub escalated: u64,
    pub unreapable: u64,
    pub stack_dumps: u64,
    pub live_timers: usize,
    pub events_dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Command {
    Run = 0,
    Stop = 1,
    RunOnce = 2,
}

/// The wall clock and the monotonic clock read together, to move deadlines onto the latter.
#[derive(Debug, Clone, Copy)]
struct Clock {
    mono: Instant,
    wall: f64,
}

impl Clock {
    fn now() -> Self {
        Self { mono: Instant::now(), wall: wall_now() }
    }

    /// The monotonic deadline of a wall-clock expiration (None: never, for inf and NaN).
    fn deadline(self, expiration: f64) -> Option<Instant> {
        if !expiration.is_finite() {
            return None;
        }
        let ahead = expiration - self.wall;
        if ahead >= 0.0 {
            self.mono.checked_add(Duration::try_from_secs_f64(ahead).ok()?)
        } else {
            let behind = Duration::try_from_secs_f64(-ahead).unwrap_or(Duration::MAX);
            Some(self.mono.checked_sub(behind).unwrap_or(self.mono))
        }
    }
}

/// A pid as the kernel takes it (None: out of range; such requests were refused at intake).
fn raw_pid(pid: i64) -> Option<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw)
}

fn wall_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// What the loop still has to do about a worker after its timers expired.
#[derive(Debug)]
enum Followup {
    /// Collecting its stacks; then it is reaped as these timers say.
    Dumping { dump: stacks::Dump, timers: Vec<Request>, signal: i32 },
    /// Sent a catchable `signal` at `since`: SIGKILL if it still runs.
    Escalate { signal: i32, since: Instant },
    /// Sent SIGKILL at `since`: unreapable if it still runs.
    Unreapable { since: Instant },
}

struct State {
    timers: DeadlineMap,
    /// Workers past their expiry, by pid, with when to look at them again.
    followups: HashMap<i64, (Instant, Followup)>,
    /// Workers whose stacks were taken for an expiry that is still being retried.
    dumped: HashSet<i64>,
    workers: Workers,
    stats: Stats,
    /// Workers whose reap was handed to Python and not yet answered, and since when.
    delegated: HashMap<i64, Instant>,
    /// Pids already reported as refused: a misbehaving client is logged once, not flooded.
    refused_pids: HashSet<i64>,
    /// When the running pass started; None while the loop waits (it is then making progress).
    busy_since: Option<f64>,
    /// When to look next for the exits of workers tracked without a pidfd.
    next_sweep: Instant,
    events: Option<SyncSender<Event>>,
    /// The FIFO this server created last (stop removes it only if it is still at the path).
    fifo: Option<fifo::Identity>,
}

impl State {
    /// Queues an event for the reporter; false (and counted) if it had to be dropped.
    fn emit(&mut self, event: Event) -> bool {
        let Some(events) = &self.events else { return false };
        match events.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.events_dropped += 1;
                false
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
    epoll: OwnedFd,
    wake: OwnedFd,
    command: AtomicU8,
    own_pid: Pid,
    config: Config,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (no invariant spans a panic
        // point), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake(&self) {
        // An eventfd counter cannot overflow in practice; a failed write only delays a pass.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Registers one request, from the transport or from Python.
    fn intake(&self, state: &mut State, request: Request, clock: Clock) {
        state.stats.requests += 1;
        if request.is_release() {
            state.timers.apply(request, None);
            return;
        }
        let checked = reaper::validate_pid(request.pid).and_then(|pid| {
            if request.signal > 0 {
                reaper::validate_signal(request.signal)?;
            }
            Ok(pid)
        });
        let pid = match checked {
            Ok(pid) => pid,
            Err(reason) => return Self::refuse(state, request, reason),
        };
        let fresh = !state.workers.is_tracked(pid);
        let (tracked, warning) = state.workers.track(pid);
        let (new, gone) = (matches!(tracked, Tracked::New(_)), matches!(tracked, Tracked::Gone));
        if let Some(warning) = warning {
            state.emit(Event::Warning(warning));
        }
        if gone {
            // The worker exited before its request was read: nothing to guard.
            return;
        }
        if self.config.descendants_only {
            // Checked once the worker is tracked, so the check is about the process tracked.
            let lineage = state.workers.lineage(pid, self.own_pid);
            if lineage != Lineage::Descendant {
                if fresh {
                    state.workers.forget(pid);
                }
                if lineage == Lineage::NotDescendant {
                    Self::refuse(
                        state,
                        request,
                        Refusal::NotDescendant(i64::from(pid.as_raw_nonzero().get())),
                    );
                }
                return;
            }
        }
        if new {
            let tag = TAG_WORKER + u64::from(pid.as_raw_nonzero().get().unsigned_abs());
            let watched = state.workers.pidfd(pid).is_some_and(|pidfd| {
                epoll::add(&self.epoll, pidfd, EventData::new_u64(tag), EventFlags::IN).is_ok()
            });
            if !watched {
                // Its exit could not be noticed: forget it, a later request tries again.
                state.workers.forget(pid);
                return;
            }
        }
        let deadline = clock.deadline(request.expiration);
        state.timers.apply(request, deadline);
    }

    /// Registers what the transport decoded; counts and reports what it could not.
    fn intake_decoded(
        &self,
        state: &mut State,
        decoded: &mut Vec<Result<Request, String>>,
        clock: Clock,
    ) {
        for result in decoded.drain(..) {
            match result {
                Ok(request) => self.intake(state, request, clock),
                Err(reason) => {
                    state.stats.malformed += 1;
                    state.emit(Event::Malformed(reason));
                }
            }
        }
    }

    /// Counts a refused request, and reports it if it is the first for its pid.
    fn refuse(state: &mut State, request: Request, reason: Refusal) {
        state.stats.refused += 1;
        let first = state.refused_pids.len() < MAX_REFUSED_REPORTED
            && state.refused_pids.insert(request.pid);
        if first {
            state.emit(Event::Refused { request, reason });
        }
    }

    fn worker_exited(&self, state: &mut State, pid: i64) {
        let dropped = state.timers.worker_len(pid);
        let followup = state.followups.remove(&pid);
        self.forget_worker(state, pid);
        if let Some((_, Followup::Dumping { dump, timers, signal })) = followup {
            // It exited while its stacks were taken: report the expiry with what came.
            let stacks = Some(dump.finish());
            let expiry = Expiry { pid, timers, signal, outcome: ReapOutcome::Gone, stacks };
            state.stats.expired += 1;
            state.emit(Event::Expired { expiries: vec![expiry], ack: None });
        } else if dropped > 0 {
            state.emit(Event::WorkerExited { pid, dropped });
        }
    }

    /// Drops the timers of workers tracked without a pidfd that have exited, as a pidfd's
    /// readiness does for the others; at most once per retry interval (torch's File server
    /// probes its workers once per pass).
    fn sweep_exited(&self, state: &mut State, now: Instant) {
        if state.workers.without_pidfd() == 0 || now < state.next_sweep {
            return;
        }
        state.next_sweep = now + self.retry_interval();
        for pid in state.workers.exited_without_pidfd() {
            self.worker_exited(state, i64::from(pid.as_raw_nonzero().get()));
        }
    }

    fn retry_interval(&self) -> Duration {
        self.config.max_interval.min(MAX_RETRY)
    }

    /// Expires what is due: one torch watchdog pass, done at the deadline. Returns the
    /// pass's expiries and the signals to send this process once they are reported.
    fn expire(&self, state: &mut State, now: Instant) -> (Vec<Expiry>, Vec<i32>) {
        let mut expiries = Vec::new();
        self.follow_up(state, now, &mut expiries);
        let retry = now + self.retry_interval();
        for pid in state.timers.due_workers(now) {
            if let Some((at, _)) = state.followups.get(&pid) {
                // Its stacks are being taken (or it is being killed): the followup decides.
                let at = *at;
                state.timers.postpone_worker(pid, at.max(retry));
                continue;
            }
            if let Some(&asked) = state.delegated.get(&pid) {
                if now.saturating_duration_since(asked) < DELEGATE_GRACE {
                    // Python has not answered yet: look again later, without asking twice.
                    state.timers.postpone_worker(pid, retry);
                    continue;
                }
            }
            let expired = state.timers.due_timers(pid, now);
            // torch: in expiration order, the first timer with a positive signal decides.
            let signal = expired.iter().map(|t| t.request.signal).find(|&s| s > 0).unwrap_or(0);
            let timers: Vec<Request> = expired.iter().map(|t| t.request.clone()).collect();
            if signal > 0 {
                if let Some(dump) = self.start_dump(state, pid, now) {
                    let at = dump.next_poll(now);
                    state.timers.postpone_worker(pid, at);
                    state.followups.insert(pid, (at, Followup::Dumping { dump, timers, signal }));
                    continue;
                }
            }
            expiries.push(self.reap(state, pid, timers, signal, None, now));
        }
        let self_signals = self.self_signals(&expiries);
        (expiries, self_signals)
    }

    /// The signals this process gets after the pass is reported: those its own timers asked
    /// for (a process may time itself), then, for torch's File server (`signal_self`), the
    /// signal of the pass's last reap (once, if that reap was this process's own).
    fn self_signals(&self, expiries: &[Expiry]) -> Vec<i32> {
        let signalled = || expiries.iter().filter(|e| matches!(e.outcome, ReapOutcome::Signalled));
        let mut signals: Vec<i32> =
            signalled().filter(|e| self.is_own(e.pid)).map(|e| e.signal).collect();
        if self.config.signal_self {
            if let Some(last) = signalled().map(|e| e.signal).next_back() {
                if signals.last() != Some(&last) {
                    signals.push(last);
                }
            }
        }
        signals
    }

    fn is_own(&self, pid: i64) -> bool {
        pid == i64::from(self.own_pid.as_raw_nonzero().get())
    }

    /// Acts on the followups that are due: finished dumps are reaped, escalations sent.
    fn follow_up(&self, state: &mut State, now: Instant, expiries: &mut Vec<Expiry>) {
        let due: Vec<i64> =
            state.followups.iter().filter(|(_, (at, _))| *at <= now).map(|(&pid, _)| pid).collect();
        for pid in due {
            let Some((_, followup)) = state.followups.remove(&pid) else { continue };
            let Some(target) = raw_pid(pid) else { continue };
            match followup {
                Followup::Dumping { mut dump, timers, signal } => {
                    if !dump.poll(now) {
                        let at = dump.next_poll(now);
                        state
                            .followups
                            .insert(pid, (at, Followup::Dumping { dump, timers, signal }));
                        continue;
                    }
                    let stacks = dump.finish();
                    if !stacks.text.is_empty() {
                        state.stats.stack_dumps += 1;
                    }
                    state.dumped.insert(pid);
                    expiries.push(self.reap(state, pid, timers, signal, Some(stacks), now));
                }
                _ if !state.workers.is_running(target) => self.forget_worker(state, pid),
                Followup::Escalate { signal, since } => {
                    match state.workers.signal(target, rustix::process::Signal::KILL) {
                        Outcome::Signalled => {
                            state.stats.escalated += 1;
                            let after = now.saturating_duration_since(since);
                            state.emit(Event::Escalated { pid, signal, after });
                            let at = now + self.config.escalate_after.unwrap_or_default();
                            state.followups.insert(pid, (at, Followup::Unreapable { since: now }));
                        }
                        Outcome::Gone => self.forget_worker(state, pid),
                        Outcome::Failed(err) => {
                            state.emit(Event::Warning(format!(
                                "sending SIGKILL to worker pid={pid}, still running after signal \
                             {signal}, failed: {err}"
                            )));
                        }
                    }
                }
                Followup::Unreapable { since } => {
                    // Reported once; its exit is still noticed (its pidfd stays watched).
                    state.stats.unreapable += 1;
                    let after = now.saturating_duration_since(since);
                    state.emit(Event::Unreapable { pid, after, state: reaper::describe(target) });
                }
            }
        }
    }

    /// Starts taking the stacks of an expired worker, if the server is asked to and can.
    fn start_dump(&self, state: &mut State, pid: i64, now: Instant) -> Option<stacks::Dump> {
        let config = self.config.stack_dump.as_ref()?;
        let target = raw_pid(pid)?;
        if state.dumped.contains(&pid) || !state.workers.is_running(target) {
            return None;
        }
        let start_time = reaper::start_time(target)?;
        let send = |signal| matches!(state.workers.signal(target, signal), Outcome::Signalled);
        let (dump, refused) =
            stacks::Dump::start(config, target.as_raw_nonzero().get(), start_time, send, now);
        if let Some(reason) = refused {
            state.emit(Event::Warning(reason));
        }
        dump
    }

    /// Does what an expiry calls for (signal, hand over, or only report) and keeps the books.
    fn reap(
        &self,
        state: &mut State,
        pid: i64,
        timers: Vec<Request>,
        signal: i32,
        stacks: Option<Stacks>,
        now: Instant,
    ) -> Expiry {
        let retry = now + self.retry_interval();
        let outcome = if signal <= 0 {
            ReapOutcome::NotSignalled
        } else if self.config.dry_run {
            ReapOutcome::DryRun
        } else if self.config.delegate_reaps {
            ReapOutcome::Delegated
        } else {
            self.signal_worker(state, pid, signal)
        };
        match &outcome {
            ReapOutcome::NotSignalled | ReapOutcome::DryRun => {
                // Only the expired timers go: a later timer with a signal stays armed.
                for timer in &timers {
                    let release = Request { expiration: -1.0, ..timer.clone() };
                    state.timers.apply(release, None);
                }
                state.dumped.remove(&pid);
            }
            ReapOutcome::Gone => self.forget_worker(state, pid),
            ReapOutcome::Signalled => {
                state.stats.reaped += 1;
                match self.config.escalate_after {
                    Some(grace) => {
                        // Keep watching it (its pidfd tells when it is gone).
                        state.timers.remove_worker(pid);
                        state.dumped.remove(&pid);
                        let followup = if signal == libc::SIGKILL {
                            Followup::Unreapable { since: now }
                        } else {
                            Followup::Escalate { signal, since: now }
                        };
                        state.followups.insert(pid, (now + grace, followup));
                    }
                    None => self.forget_worker(state, pid),
                }
            }
            ReapOutcome::Failed(_) => state.timers.postpone_worker(pid, retry),
            ReapOutcome::Delegated => {
                state.delegated.insert(pid, now);
                state.timers.postpone_worker(pid, retry);
            }
        }
        state.stats.expired += 1;
        Expiry { pid, timers, signal, outcome, stacks }
    }

    /// Drops a worker and its timers (it was reaped, or it is gone).
    fn forget_worker(&self, state: &mut State, pid: i64) {
        if let Some(raw) = raw_pid(pid) {
            if let Some(pidfd) = state.workers.forget(raw) {
                let _ = epoll::delete(&self.epoll, &pidfd);
            }
        }
        state.timers.remove_worker(pid);
        state.followups.remove(&pid);
        state.dumped.remove(&pid);
    }

    fn signal_worker(&self, state: &State, pid: i64, signal: i32) -> ReapOutcome {
        // Both were validated at intake.
        let (Ok(target), Ok(signal)) = (reaper::validate_pid(pid), reaper::validate_signal(signal))
        else {
            return ReapOutcome::Gone;
        };
        if target == self.own_pid {
            // Signalled once the pass is reported (see `self_signals`): signalling now could
            // end this process before anyone hears why.
            return ReapOutcome::Signalled;
        }
        match state.workers.signal(target, signal) {
            Outcome::Signalled => ReapOutcome::Signalled,
            Outcome::Gone => ReapOutcome::Gone,
            Outcome::Failed(err) => ReapOutcome::Failed(err),
        }
    }

    /// When the loop must next look at its deadlines.
    fn next_timeout(&self, state: &State) -> Option<rustix::time::Timespec> {
        let followup = state.followups.values().map(|&(at, _)| at).min();
        let sweep = (state.workers.without_pidfd() > 0).then_some(state.next_sweep);
        let next = [state.timers.next_deadline(), followup, sweep].into_iter().flatten().min()?;
        let wait = next.saturating_duration_since(Instant::now());
        // epoll waits in whole milliseconds: round up so the deadline has passed on waking.
        let millis = wait.as_nanos().div_ceil(1_000_000);
        Some(rustix::time::Timespec {
            tv_sec: i64::try_from(millis / 1000).unwrap_or(i64::MAX),
            tv_nsec: ((millis % 1000) * 1_000_000) as _,
        })
    }
}

/// A timer server; `start` runs its loop on a native thread.
pub struct Server {
    shared: Arc<Shared>,
    /// The transport while the loop is not running.
    parked: Option<Transport>,
    thread: Option<JoinHandle<Transport>>,
}

impl Server {
    /// Builds a server. A FIFO transport's FIFO is created now (replacing what is at its path).
    pub fn new(transport: Transport, config: Config) -> io::Result<Self> {
        let fifo = match &transport {
            Transport::Fifo(path) => Some(fifo::create(path)?),
            _ => None,
        };
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &wake, EventData::new_u64(TAG_WAKE), EventFlags::IN)?;
        let state = State {
            timers: DeadlineMap::new(),
            followups: HashMap::new(),
            dumped: HashSet::new(),
            workers: Workers::new(config.max_pidfds),
            stats: Stats::default(),
            delegated: HashMap::new(),
            refused_pids: HashSet::new(),
            busy_since: None,
            next_sweep: Instant::now(),
            events: None,
            fifo,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                epoll,
                wake,
                command: AtomicU8::new(Command::Run as u8),
                own_pid: rustix::process::getpid(),
                config,
            }),
            parked: Some(transport),
            thread: None,
        })
    }

    pub fn is_running(&self) -> bool {
        self.thread.is_some()
    }

    /// Whether this is a copy of the server in a process forked from the one that built it.
    /// The copy has no loop thread (fork copies only the forking thread), shares the epoll
    /// instance, the eventfd and the FIFO with the original, and must touch none of them.
    pub fn is_forked_copy(&self) -> bool {
        rustix::process::getpid() != self.shared.own_pid
    }

    /// Starts the loop; returns the events it will report. A FIFO removed since (by `stop`)
    /// is created again.
    pub fn start(&mut self) -> io::Result<Receiver<Event>> {
        if self.is_forked_copy() {
            return Err(io::Error::other(format!(
                "this timer server belongs to process {} (this process is a fork of it)",
                self.shared.own_pid.as_raw_nonzero()
            )));
        }
        if self.thread.is_some() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "server already started"));
        }
        let transport = self.parked.take().expect("a stopped server holds its transport");
        let source = match Source::open(transport) {
            Ok(source) => source,
            Err((err, transport)) => {
                self.parked = Some(transport);
                return Err(err);
            }
        };
        let (sender, receiver) = mpsc::sync_channel(EVENT_CAPACITY);
        self.shared.lock().events = Some(sender);
        self.shared.command.store(Command::Run as u8, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        let thread = thread::Builder::new().name("elastic-timer".into()).spawn(move || {
            let transport = run_loop(&shared, source);
            // Dropping the sender ends the reporter once it has drained the events.
            shared.lock().events = None;
            transport
        })?;
        self.thread = Some(thread);
        Ok(receiver)
    }

    /// Stops the loop and waits for it (it exits at once). Idempotent.
    pub fn stop(&mut self) {
        self.finish(Command::Stop);
    }

    /// Reads every request already sent, runs one pass, then stops (torch's `run_once`).
    pub fn run_once(&mut self) {
        self.finish(Command::RunOnce);
    }

    fn finish(&mut self, command: Command) {
        if self.is_forked_copy() {
            // Stopping here would stop nothing (there is no loop thread in this process) and
            // would remove the original's FIFO.
            return;
        }
        if let Some(thread) = self.thread.take() {
            self.shared.command.store(command as u8, Ordering::SeqCst);
            self.shared.wake();
            // The loop catches nothing that could panic on purpose; if it did, the transport
            // is lost and `start` will refuse, which is the honest outcome.
            if let Ok(transport) = thread.join() {
                self.parked = Some(transport);
            }
        }
        if let Some(Transport::Fifo(path)) = &self.parked {
            // torch removes the FIFO on stop; clients then get BrokenPipeError. Not if another
            // FIFO has taken the path since (another server's).
            if let Some(identity) = self.shared.lock().fifo.take() {
                let _ = fifo::remove_if(path, identity);
            }
        }
    }

    /// Registers requests (acquires and releases) as if they came from the transport.
    pub fn register(&self, requests: impl IntoIterator<Item = Request>) {
        let clock = Clock::now();
        {
            let mut state = self.shared.lock();
            for request in requests {
                self.shared.intake(&mut state, request, clock);
            }
        }
        self.shared.wake();
    }

    /// Drops every timer of these workers.
    pub fn clear(&self, pids: impl IntoIterator<Item = i64>) {
        let mut state = self.shared.lock();
        for pid in pids {
            state.timers.remove_worker(pid);
        }
    }

    /// Timers whose expiration (wall clock, as sent) is at or before `deadline`, by worker.
    pub fn expired(&self, deadline: f64) -> BTreeMap<i64, Vec<Request>> {
        let state = self.shared.lock();
        let mut by_worker: BTreeMap<i64, Vec<Request>> = BTreeMap::new();
        for timer in state.timers.iter().filter(|t| t.request.expiration <= deadline) {
            by_worker.entry(timer.request.pid).or_default().push(timer.request.clone());
        }
        by_worker
    }

    /// Every live timer's request.
    pub fn timers(&self) -> Vec<Request> {
        self.shared.lock().timers.iter().map(|t| t.request.clone()).collect()
    }

    /// Counts and reports a request that could not be decoded outside the loop.
    pub fn reject(&self, reason: String) {
        let mut state = self.shared.lock();
        state.stats.malformed += 1;
        state.emit(Event::Malformed(reason));
    }

    /// The answer to a [`ReapOutcome::Delegated`] reap.
    pub fn complete_reap(&self, pid: i64, reaped: bool) {
        let mut state = self.shared.lock();
        state.delegated.remove(&pid);
        if reaped {
            self.shared.forget_worker(&mut state, pid);
            state.stats.reaped += 1;
        } else {
            let retry = Instant::now() + self.shared.retry_interval();
            state.timers.postpone_worker(pid, retry);
        }
        drop(state);
        self.shared.wake();
    }

    pub fn stats(&self) -> Stats {
        let state = self.shared.lock();
        Stats { live_timers: state.timers.len(), ..state.stats }
    }

    /// Wall-clock seconds of the loop's last progress: now while it waits, else when its
    /// running pass began (torch's agent checks this to tell a stuck watchdog).
    pub fn last_progress(&self) -> f64 {
        self.shared.lock().busy_since.unwrap_or_else(wall_now)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.is_forked_copy() {
            // The thread is the original's: joining or detaching it here is undefined.
            std::mem::forget(self.thread.take());
            return;
        }
        self.stop();
    }
}

/// Opens the FIFO, creating it again if `stop` removed it (or something else replaced it).
fn open_fifo(path: &std::path::Path) -> io::Result<fifo::Reader> {
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_fifo()
    });
    if !is_fifo {
        fifo::create(path)?;
    }
    fifo::Reader::open(path)
}

impl Source {
    fn open(transport: Transport) -> Result<Self, (io::Error, Transport)> {
        match transport {
            Transport::Fifo(path) => match open_fifo(&path) {
                Ok(reader) => {
                    let watch = fifo::Watch::new(&path).ok();
                    Ok(Source::Fifo(path, reader, watch))
                }
                Err(err) => Err((err, Transport::Fifo(path))),
            },
            Transport::Queue(reader) => Ok(Source::Queue(reader)),
            Transport::Direct => Ok(Source::Direct),
        }
    }

    fn park(self) -> Transport {
        match self {
            Source::Fifo(path, ..) => Transport::Fifo(path),
            Source::Queue(reader) => Transport::Queue(reader),
            Source::Direct => Transport::Direct,
        }
    }

    /// Parks the transport once the last requests are read: the FIFO is closed right after
    /// its last read, so a client writing later gets `EPIPE` (and opens the path again)
    /// instead of writing into a pipe about to be closed unread.
    fn close(self, decoded: &mut Vec<Result<Request, String>>) -> Transport {
        match self {
            Source::Fifo(path, reader, _) => {
                reader.close(|line| decode_line(line, decoded));
                Transport::Fifo(path)
            }
            mut source => {
                while matches!(source.read(decoded), Ok(n) if n > 0) {}
                source.park()
            }
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Source::Fifo(_, reader, _) => Some(reader.fd()),
            Source::Queue(reader) => Some(reader.fd()),
            Source::Direct => None,
        }
    }

    /// Reads and decodes what is available; returns how many bytes or frames were read.
    fn read(&mut self, requests: &mut Vec<Result<Request, String>>) -> io::Result<usize> {
        match self {
            Source::Fifo(_, reader, _) => reader.read_lines(|line| decode_line(line, requests)),
            Source::Queue(reader) => reader.read_frames(|frame| {
                requests.push(match frame {
                    queue::Frame::Payload(bytes) => {
                        codec::decode_pickle(bytes).map_err(|err| err.to_string())
                    }
                    queue::Frame::TooLarge(n) => {
                        Err(format!("queue item of {n} bytes is not a timer request"))
                    }
                })
            }),
            Source::Direct => Ok(0),
        }
    }
}

/// Decodes one FIFO line. A line that does not decode but ends with a client's request
/// (written after someone left garbage without a newline) costs only the garbage.
fn decode_line(line: fifo::Line<'_>, requests: &mut Vec<Result<Request, String>>) {
    let (error, end) = match line {
        fifo::Line::Complete(bytes) => match codec::decode_json_line(bytes) {
            Ok(request) => return requests.push(Ok(request)),
            Err(err) => (err.to_string(), bytes),
        },
        fifo::Line::TooLong { len, tail } => (
            format!("line of {len} bytes is longer than PIPE_BUF ({} bytes)", fifo::MAX_LINE),
            tail,
        ),
    };
    match codec::salvage_json_line(end) {
        Some((_, request)) => {
            requests.push(Err(format!("{error}; the request at its end was kept")));
            requests.push(Ok(request));
        }
        None => requests.push(Err(error)),
    }
}

impl Source {
    /// Looks at the FIFO's path after the watch said it changed. A FIFO deleted, or replaced
    /// by something that is not a FIFO, is created again, so clients keep reaching this
    /// server. Another FIFO in its place (another server's) is left alone.
    fn check_fifo(&mut self, shared: &Shared, decoded: &mut Vec<Result<Request, String>>) {
        let Source::Fifo(path, reader, watch) = self else { return };
        if let Some(watch) = watch.as_ref() {
            watch.drain();
        }
        let state = fifo::path_state(path, reader.identity());
        let what = match state {
            fifo::PathState::Ours => return,
            fifo::PathState::OtherFifo => {
                if let Some(watch) = watch.take() {
                    let _ = epoll::delete(&shared.epoll, watch.fd());
                }
                shared.lock().emit(Event::Warning(format!(
                    "{} is now another FIFO (another timer server?): new requests go to that \
                     one, and this server no longer removes it on stop",
                    path.display()
                )));
                return;
            }
            fifo::PathState::Missing => "was deleted",
            fifo::PathState::NotAFifo => "was replaced by a file that is not a FIFO",
        };
        let replacement = fifo::create(path).and_then(|identity| {
            let reader = fifo::Reader::open(path)?;
            Ok((identity, reader, fifo::Watch::new(path).ok()))
        });
        let (identity, new_reader, new_watch) = match replacement {
            Ok(replacement) => replacement,
            Err(err) => {
                shared.lock().emit(Event::Warning(format!(
                    "{} {what}, and creating it again failed: {err}; clients cannot reach \
                     this server",
                    path.display()
                )));
                return;
            }
        };
        // What clients wrote into the old FIFO before it went is still read.
        while matches!(reader.read_lines(|line| decode_line(line, decoded)), Ok(n) if n > 0) {}
        let _ = epoll::delete(&shared.epoll, reader.fd());
        if let Some(watch) = watch.take() {
            let _ = epoll::delete(&shared.epoll, watch.fd());
        }
        *reader = new_reader;
        *watch = new_watch;
        let _ =
            epoll::add(&shared.epoll, reader.fd(), EventData::new_u64(TAG_SOURCE), EventFlags::IN);
        if let Some(watch) = watch.as_ref() {
            let _ = epoll::add(
                &shared.epoll,
                watch.fd(),
                EventData::new_u64(TAG_FIFO_WATCH),
                EventFlags::IN,
            );
        }
        let mut state = shared.lock();
        state.fifo = Some(identity);
        state.emit(Event::Warning(format!("{} {what}; created it again", path.display())));
    }

    fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Source::Fifo(_, _, Some(watch)) => Some(watch.fd()),
            _ => None,
        }
    }
}

fn run_loop(shared: &Shared, mut source: Source) -> Transport {
    if let Some(fd) = source.fd() {
        if let Err(err) =
            epoll::add(&shared.epoll, fd, EventData::new_u64(TAG_SOURCE), EventFlags::IN)
        {
            shared.lock().emit(Event::Warning(format!("cannot watch the transport: {err}")));
            return source.park();
        }
    }
    if let Source::Fifo(_, reader, _) = &source {
        shared.lock().fifo = Some(reader.identity());
    }
    if let Some(fd) = source.watch_fd() {
        // Without it, a deleted FIFO is not noticed (clients then get BrokenPipeError).
        let _ = epoll::add(&shared.epoll, fd, EventData::new_u64(TAG_FIFO_WATCH), EventFlags::IN);
    }
    let mut ready: Vec<epoll::Event> = Vec::with_capacity(64);
    let mut decoded = Vec::new();
    loop {
        let timeout = {
            let mut state = shared.lock();
            state.busy_since = None;
            shared.next_timeout(&state)
        };
        ready.clear();
        match epoll::wait(
            &shared.epoll,
            rustix::buffer::spare_capacity(&mut ready),
            timeout.as_ref(),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => {
                shared.lock().emit(Event::Warning(format!("epoll_wait failed: {err}")));
                thread::sleep(Duration::from_millis(10));
            }
        }
        let command = shared.command.load(Ordering::SeqCst);
        // Stopping, or a last pass: every request already written is read first, so a
        // client whose write succeeded is never lost. The FIFO goes first (if it is still
        // ours), so no new client can open it meanwhile.
        let last = command != Command::Run as u8;
        if let (true, Source::Fifo(path, ..)) = (last, &source) {
            if let Some(identity) = shared.lock().fifo.take() {
                let _ = fifo::remove_if(path, identity);
            }
        }
        let mut read_source = last;
        let mut fifo_changed = false;
        let mut exited = Vec::new();
        for event in &ready {
            match event.data.u64() {
                TAG_WAKE => {
                    let mut counter = [0u8; 8];
                    let _ = rustix::io::read(&shared.wake, &mut counter);
                }
                TAG_SOURCE => read_source = true,
                TAG_FIFO_WATCH => fifo_changed = true,
                tag => exited.push(i64::from((tag - TAG_WORKER) as u32)),
            }
        }
        if fifo_changed {
            source.check_fifo(shared, &mut decoded);
        }
        if read_source {
            loop {
                match source.read(&mut decoded) {
                    Ok(0) => break,
                    Ok(_) if last => continue,
                    Ok(_) => break,
                    Err(err) => {
                        shared
                            .lock()
                            .emit(Event::Warning(format!("reading requests failed: {err}")));
                        break;
                    }
                }
            }
        }
        // One pass, under the lock (released by the end of the block, or early to signal
        // this process).
        {
            let clock = Clock::now();
            let mut state = shared.lock();
            state.busy_since = Some(clock.wall);
            shared.intake_decoded(&mut state, &mut decoded, clock);
            for pid in exited {
                shared.worker_exited(&mut state, pid);
            }
            shared.sweep_exited(&mut state, clock.mono);
            let (expiries, self_signals) = shared.expire(&mut state, clock.mono);
            if !expiries.is_empty() {
                if !self_signals.is_empty() {
                    let (ack, acked) = mpsc::sync_channel(1);
                    state.emit(Event::Expired { expiries, ack: Some(ack) });
                    drop(state);
                    // Let the reporter log the reap first (bounded: Python may be wedged).
                    let _ = acked.recv_timeout(REPORT_GRACE);
                    for signal in self_signals {
                        if let Ok(signal) = reaper::validate_signal(signal) {
                            let _ = reaper::signal_self(signal);
                        }
                    }
                } else {
                    let delegated: Vec<i64> = expiries
                        .iter()
                        .filter(|e| matches!(e.outcome, ReapOutcome::Delegated))
                        .map(|e| e.pid)
                        .collect();
                    if !state.emit(Event::Expired { expiries, ack: None }) {
                        // Nobody will answer these: ask again at the next retry.
                        for pid in delegated {
                            state.delegated.remove(&pid);
                        }
                    }
                }
            }
        }
        if command != Command::Run as u8 {
            if let Some(fd) = source.fd() {
                let _ = epoll::delete(&shared.epoll, fd);
            }
            if let Some(fd) = source.watch_fd() {
                let _ = epoll::delete(&shared.epoll, fd);
            }
            // What was written during this pass, read just before the FIFO closes.
            let transport = source.close(&mut decoded);
            shared.intake_decoded(&mut shared.lock(), &mut decoded, Clock::now());
            return transport;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command as Process};

    fn config() -> Config {
        Config {
            max_interval: Duration::from_millis(100),
            signal_self: false,
            delegate_reaps: false,
            max_pidfds: 64,
            descendants_only: false,
            dry_run: false,
            escalate_after: None,
            stack_dump: None,
        }
    }

    fn fifo_server(name: &str, config: Config) -> (Server, PathBuf) {
        let path = std::env::temp_dir().join(format!("et-server-{}-{name}", std::process::id()));
        (Server::new(Transport::Fifo(path.clone()), config).expect("server"), path)
    }

    fn sleeper() -> Child {
        Process::new("sleep").arg("30").spawn().expect("spawn")
    }

    fn request(pid: u32, scope: &str, after: f64, signal: i32) -> Request {
        Request { pid: i64::from(pid), scope: scope.into(), expiration: wall_now() + after, signal }
    }

    fn send(path: &std::path::Path, request: &Request) {
        let mut line = Vec::new();
        codec::encode_json_line(
            request.pid,
            &request.scope,
            codec::Number::Float(request.expiration),
            i64::from(request.signal),
            &mut line,
        );
        let options = fifo::SendOptions {
            connect_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
        };
        fifo::send_line(path, &line, options).expect("send");
    }

    #[test]
    fn a_stuck_worker_is_killed_at_its_deadline() {
        let (mut server, path) = fifo_server("stuck", config());
        let events = server.start().expect("start");
        let mut worker = sleeper();
        // Measured from the acquire: the deadline is 0.2 s after the request is made.
        let acquired = Instant::now();
        send(&path, &request(worker.id(), "step", 0.2, libc::SIGKILL));
        let status = worker.wait().expect("wait");
        let waited = acquired.elapsed();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(waited >= Duration::from_millis(195), "fired early: {waited:?}");
        // Generous on 2 loaded cores; the benches measure the real lateness.
        assert!(waited < Duration::from_millis(200 + 1000), "fired late: {waited:?}");
        match events.recv_timeout(Duration::from_secs(1)).expect("event") {
            Event::Expired { expiries, ack: None } => {
                assert_eq!(expiries.len(), 1);
                assert!(matches!(expiries[0].outcome, ReapOutcome::Signalled));
                assert_eq!(expiries[0].timers[0].scope, "step");
            }
            other => panic!("unexpected {other:?}"),
        }
        server.stop();
        assert!(!path.exists(), "stop removes the FIFO");
    }

    #[test]
    fn a_released_timer_never_fires() {
        let (mut server, path) = fifo_server("released", config());
        let _events = server.start().expect("start");
        let mut worker = sleeper();
        send(&path, &request(worker.id(), "step", 0.1, libc::SIGKILL));
        send(&path, &request(worker.id(), "step", -1.0 - wall_now(), 0));
        thread::sleep(Duration::from_millis(300));
        assert!(worker.try_wait().expect("try_wait").is_none(), "worker was killed");
        server.stop();
        assert_eq!(server.stats().requests, 2);
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    #[test]
    fn refused_and_malformed_requests_are_reported_and_nothing_is_lost() {
        let (mut server, path) = fifo_server("bad", config());
        let events = server.start().expect("start");
        let worker = sleeper();
        send(&path, &request(worker.id(), "kept", 60.0, libc::SIGKILL));
        let bad = Request { pid: -1, ..request(1, "minus-one", -1.0, libc::SIGKILL) };
        send(&path, &bad);
        fifo::send_line(
            &path,
            b"not json\n",
            fifo::SendOptions {
                connect_timeout: Duration::from_secs(1),
                send_timeout: Duration::from_secs(1),
            },
        )
        .expect("send");
        let mut seen = Vec::new();
        while seen.len() < 2 {
            seen.push(events.recv_timeout(Duration::from_secs(2)).expect("event"));
        }
        assert!(seen
            .iter()
            .any(|e| matches!(e, Event::Refused { reason: Refusal::ReservedPid(-1), .. })));
        assert!(seen.iter().any(|e| matches!(e, Event::Malformed(_))));
        let timers = server.timers();
        assert!(timers.iter().any(|t| t.scope == "kept"));
        server.stop();
        let mut worker = worker;
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    #[test]
    fn the_timers_of_an_exited_worker_are_dropped_when_it_exits() {
        // With a pidfd (its readiness), and without one (past a budget of 0: the sweep).
        for max_pidfds in [64, 0] {
            let config = Config { max_pidfds, ..config() };
            let (mut server, path) = fifo_server(&format!("exit-{max_pidfds}"), config);
            let events = server.start().expect("start");
            let mut worker = sleeper();
            send(&path, &request(worker.id(), "a", 60.0, libc::SIGKILL));
            let deadline = Instant::now() + Duration::from_secs(2);
            while server.timers().is_empty() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(server.timers().len(), 1);
            worker.kill().expect("kill");
            worker.wait().expect("wait");
            let exited = loop {
                match events.recv_timeout(Duration::from_secs(2)).expect("an exit event") {
                    Event::WorkerExited { pid, dropped } => break (pid, dropped),
                    Event::Warning(_) => continue,
                    other => panic!("unexpected {other:?}"),
                }
            };
            assert_eq!(exited, (i64::from(worker.id()), 1), "max_pidfds={max_pidfds}");
            assert!(server.timers().is_empty());
            server.stop();
        }
    }

    #[test]
    fn the_servers_own_process_may_time_itself_unless_only_descendants_are_served() {
        let own = std::process::id();
        for descendants_only in [false, true] {
            let config = Config { descendants_only, ..config() };
            let server = Server::new(Transport::Direct, config).expect("server");
            server.register([request(own, "self", 60.0, libc::SIGTERM)]);
            let listed = server.timers().iter().any(|t| t.pid == i64::from(own));
            assert_eq!(listed, !descendants_only);
            assert_eq!(server.stats().refused, u64::from(descendants_only));
            server.register([request(own, "self", -1.0 - wall_now(), 0)]);
            assert!(server.timers().is_empty());
        }
    }

    #[test]
    fn stop_returns_at_once_with_far_deadlines_and_no_client() {
        let (mut server, _path) = fifo_server("stop", config());
        let _events = server.start().expect("start");
        let worker = sleeper();
        server.register([request(worker.id(), "far", 3600.0, libc::SIGKILL)]);
        let started = Instant::now();
        server.stop();
        assert!(started.elapsed() < Duration::from_millis(100));
        let mut worker = worker;
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    #[test]
    fn run_once_processes_everything_already_sent() {
        let (mut server, path) = fifo_server("once", config());
        let _events = server.start().expect("start");
        for i in 0..50 {
            send(&path, &request(std::process::id(), &format!("s{i}"), -1.0 - wall_now(), 0));
        }
        server.run_once();
        assert_eq!(server.stats().requests, 50);
        assert!(!server.is_running());
    }

    fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        condition()
    }

    #[test]
    fn deadlines_are_monotonic_instants_fixed_on_receipt() {
        let mono = Instant::now();
        let clock = Clock { mono, wall: 1_000.0 };
        assert_eq!(clock.deadline(1_002.5), Some(mono + Duration::from_millis(2_500)));
        assert_eq!(clock.deadline(999.0), mono.checked_sub(Duration::from_secs(1)).or(Some(mono)));
        assert_eq!(clock.deadline(1_000.0), Some(mono));
        for never in [f64::INFINITY, f64::NAN, 1e300] {
            assert_eq!(clock.deadline(never), None, "{never}");
        }
        assert!(clock.deadline(-1e300).is_some_and(|d| d <= mono), "long past: due at once");
        // The map keeps the Instant: a later wall-clock step changes nothing (nothing reads
        // the wall clock again for this timer).
        let mut map = DeadlineMap::new();
        let request = Request { pid: 7, scope: "s".into(), expiration: 1_002.5, signal: 9 };
        map.apply(request, clock.deadline(1_002.5));
        assert_eq!(map.next_deadline(), Some(mono + Duration::from_millis(2_500)));
    }

    #[test]
    fn descendants_only_refuses_other_processes() {
        let (mut server, _path) =
            fifo_server("descendants", Config { descendants_only: true, ..config() });
        let events = server.start().expect("start");
        let mut child = sleeper();
        // Our parent: alive, not our descendant, and never signalled (its deadline is far).
        let parent = rustix::process::getppid().expect("a parent").as_raw_nonzero().get();
        let parent = parent.unsigned_abs();
        server.register([
            request(child.id(), "child", 3600.0, libc::SIGKILL),
            request(parent, "parent", 3600.0, libc::SIGKILL),
            request(parent, "again", 3600.0, libc::SIGKILL),
        ]);
        let timers = server.timers();
        assert_eq!(timers.len(), 1);
        assert_eq!(timers[0].scope, "child");
        assert_eq!(server.stats().refused, 2);
        match events.recv_timeout(Duration::from_secs(1)).expect("event") {
            Event::Refused { request, reason: Refusal::NotDescendant(pid) } => {
                assert_eq!((request.scope.as_str(), pid), ("parent", i64::from(parent)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(events.try_recv().is_err(), "a refused pid is reported once");
        server.stop();
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[test]
    fn a_request_glued_to_garbage_is_kept() {
        let (mut server, path) = fifo_server("garbage", config());
        let _events = server.start().expect("start");
        let worker = sleeper();
        // A writer leaves bytes without a newline, short and then far past PIPE_BUF; each
        // time, the next client's line is glued to them.
        for garbage in [&b"\x00junk{\"version\""[..], &[b'x'; 3 * fifo::MAX_LINE]] {
            let writer = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
            std::io::Write::write_all(&mut &writer, garbage).expect("write");
            drop(writer);
            let scope = format!("after-{}", garbage.len());
            send(&path, &request(worker.id(), &scope, 3600.0, libc::SIGKILL));
            assert!(wait_until(|| server.timers().iter().any(|t| t.scope == scope)), "{scope}");
        }
        let stats = server.stats();
        assert_eq!((stats.requests, stats.malformed), (2, 2));
        server.stop();
        let mut worker = worker;
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    #[test]
    fn a_deleted_fifo_is_created_again_and_another_servers_is_left_alone() {
        let (mut server, path) = fifo_server("deleted", config());
        let events = server.start().expect("start");
        let worker = sleeper();
        for round in 0..2 {
            std::fs::remove_file(&path).expect("rm");
            assert!(wait_until(|| path.exists()), "created again");
            let scope = format!("after-delete-{round}");
            send(&path, &request(worker.id(), &scope, 3600.0, libc::SIGKILL));
            assert!(wait_until(|| server.timers().iter().any(|t| t.scope == scope)));
        }
        let Event::Warning(warning) = events.recv_timeout(Duration::from_secs(1)).expect("event")
        else {
            panic!("expected a warning")
        };
        assert!(warning.ends_with("was deleted; created it again"), "{warning}");
        // A regular file in its place: no client could reach a server through it.
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, b"").expect("write");
        assert!(wait_until(|| std::fs::metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_fifo()
        })));
        // Another FIFO (another server's) in its place stays, even after our stop.
        let other = path.with_extension("other");
        fifo::create(&other).expect("mkfifo");
        std::fs::rename(&other, &path).expect("rename");
        let identity = fifo::Reader::open(&path).expect("open").identity();
        // The loop has seen it once it says so.
        loop {
            match events.recv_timeout(Duration::from_secs(5)).expect("a warning") {
                Event::Warning(warning) if warning.contains("is now another FIFO") => break,
                Event::Warning(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        server.stop();
        assert_eq!(fifo::path_state(&path, identity), fifo::PathState::Ours, "left alone");
        fifo::remove(&path).expect("rm");
        let mut worker = worker;
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    #[test]
    fn a_delegated_reap_waits_for_its_answer_and_a_failed_one_is_retried() {
        let (mut server, _path) =
            fifo_server("delegate", Config { delegate_reaps: true, ..config() });
        let events = server.start().expect("start");
        let mut worker = sleeper();
        server.register([request(worker.id(), "d", 0.0, libc::SIGTERM)]);
        let Event::Expired { expiries, .. } =
            events.recv_timeout(Duration::from_secs(1)).expect("event")
        else {
            panic!("expected an expiry")
        };
        assert!(matches!(expiries[0].outcome, ReapOutcome::Delegated));
        assert_eq!(expiries[0].signal, libc::SIGTERM);
        server.complete_reap(expiries[0].pid, false);
        let Event::Expired { expiries, .. } =
            events.recv_timeout(Duration::from_secs(1)).expect("retry")
        else {
            panic!("expected the retry")
        };
        server.complete_reap(expiries[0].pid, true);
        assert!(server.timers().is_empty());
        assert!(worker.try_wait().expect("try_wait").is_none(), "delegation never signals");
        server.stop();
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    fn expiry(events: &Receiver<Event>) -> Expiry {
        loop {
            match events.recv_timeout(Duration::from_secs(5)).expect("event") {
                Event::Expired { mut expiries, .. } => return expiries.remove(0),
                Event::WorkerExited { .. } | Event::Warning(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn a_dry_run_reports_each_expiry_and_signals_nothing() {
        let (mut server, _path) = fifo_server("dry", Config { dry_run: true, ..config() });
        let events = server.start().expect("start");
        let mut worker = sleeper();
        server.register([
            request(worker.id(), "first", 0.0, libc::SIGKILL),
            request(worker.id(), "later", 0.2, libc::SIGKILL),
        ]);
        for scope in ["first", "later"] {
            let expiry = expiry(&events);
            assert!(matches!(expiry.outcome, ReapOutcome::DryRun), "{:?}", expiry.outcome);
            assert_eq!((expiry.timers[0].scope.as_str(), expiry.signal), (scope, libc::SIGKILL));
        }
        assert!(worker.try_wait().expect("try_wait").is_none(), "a dry run kills nothing");
        let stats = server.stats();
        assert_eq!((stats.expired, stats.reaped, stats.live_timers), (2, 0, 0));
        server.stop();
        worker.kill().expect("kill");
        worker.wait().expect("wait");
    }

    #[test]
    fn a_worker_that_ignores_its_signal_is_killed_after_the_grace() {
        let grace = Duration::from_millis(300);
        let (mut server, _path) =
            fifo_server("escalate", Config { escalate_after: Some(grace), ..config() });
        let events = server.start().expect("start");
        // A shell that ignores SIGTERM, waiting on a child that would die of it.
        let mut worker = Process::new("sh")
            .args(["-c", "trap '' TERM; echo trapped; sleep 30 & wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        let stdout = worker.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("read");
        assert_eq!(line, "trapped\n", "the trap is set");
        server.register([request(worker.id(), "stuck", 0.0, libc::SIGTERM)]);
        assert!(matches!(expiry(&events).outcome, ReapOutcome::Signalled));
        let started = Instant::now();
        let status = worker.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(started.elapsed() >= grace - Duration::from_millis(50), "{:?}", started.elapsed());
        match events.recv_timeout(Duration::from_secs(1)).expect("event") {
            Event::Escalated { pid, signal, after } => {
                assert_eq!((pid, signal), (i64::from(worker.id()), libc::SIGTERM));
                assert!(after >= grace, "{after:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let stats = server.stats();
        assert_eq!((stats.reaped, stats.escalated, stats.unreapable), (1, 1, 0));
        server.stop();
    }

    #[test]
    fn a_worker_that_dies_of_its_signal_is_not_escalated() {
        let grace = Duration::from_millis(200);
        let (mut server, _path) =
            fifo_server("no-escalate", Config { escalate_after: Some(grace), ..config() });
        let events = server.start().expect("start");
        let mut worker = sleeper();
        server.register([request(worker.id(), "stuck", 0.0, libc::SIGTERM)]);
        assert!(matches!(expiry(&events).outcome, ReapOutcome::Signalled));
        assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGTERM));
        thread::sleep(grace * 2);
        assert!(events.try_recv().is_err(), "nothing more to report");
        assert_eq!(server.stats().escalated, 0);
        server.stop();
    }

    #[test]
    fn stacks_are_taken_before_the_signal() {
        let dir = std::env::temp_dir().join(format!("et-server-stacks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let stack_dump = stacks::Config {
            grace: Duration::from_secs(2),
            signal: rustix::process::Signal::USR2,
            dir: dir.clone(),
            // A stand-in for py-spy (the worker is not armed): prints its arguments.
            py_spy: Some(PathBuf::from("echo")),
        };
        let (mut server, _path) =
            fifo_server("stacks", Config { stack_dump: Some(stack_dump), ..config() });
        let events = server.start().expect("start");
        let mut worker = sleeper();
        server.register([request(worker.id(), "stuck", 0.0, libc::SIGKILL)]);
        let expiry = expiry(&events);
        assert!(matches!(expiry.outcome, ReapOutcome::Signalled));
        let stacks = expiry.stacks.expect("stacks");
        assert_eq!(stacks.source, stacks::Source::PySpy);
        assert_eq!(stacks.text, format!("dump --pid {}\n", worker.id()));
        assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
        assert_eq!(server.stats().stack_dumps, 1);
        server.stop();
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
