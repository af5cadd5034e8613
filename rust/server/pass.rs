//! One pass of torch's watchdog rules, done at the deadline, and where each worker stands
//! between the expiry of its timers and its end.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::process::{Pid, Signal};

use super::report::{Event, Expiry, ReapOutcome, Stats};
use super::{Shared, TAG_WORKER};
use crate::codec::Request;
use crate::deadlines::{Cap, Caps, DeadlineMap};
use crate::error_file::{self, Fired};
use crate::learned::{Learned, Learner, Limit, MAX_SCOPE_BYTES};
use crate::reaper::{self, Lineage, Liveness, Outcome, Refusal, Tracked, Workers};
use crate::stacks::{self, Stacks};

/// Distinct refused pids reported (each once); past this, refusals are only counted.
const MAX_REFUSED_REPORTED: usize = 1024;
/// How long a reap handed to Python may go unanswered before it is handed over again.
const DELEGATE_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on the retry interval of a failed reap.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// A wall-clock reading that the monotonic clock does not predict within this much means the
/// wall clock was stepped (Linux slews the two clocks together: only a step moves one against
/// the other). Far above the error of a reading, far below any timeout.
const CLOCK_STEP: Duration = Duration::from_millis(1);
/// A reading whose two monotonic reads are further apart than this was interrupted between
/// them (read again, a few times at most).
const CLOSE_READ: Duration = Duration::from_micros(5);
const READ_TRIES: usize = 4;

/// The wall clock and the monotonic clock read together, to move deadlines onto the latter.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub mono: Instant,
    pub wall: f64,
}

impl Clock {
    /// Both clocks, the wall clock read between two monotonic reads: of a few tries, the
    /// first whose bracket is close, else the closest (a thread interrupted between the two
    /// reads would otherwise put the wall clock off by the interruption).
    pub fn now() -> Self {
        let mut best: Option<(Duration, Self)> = None;
        for _ in 0..READ_TRIES {
            let before = Instant::now();
            let wall = wall_now();
            let gap = before.elapsed();
            let reading = Self { mono: before + gap / 2, wall };
            if gap <= CLOSE_READ {
                return reading;
            }
            if best.is_none_or(|(closest, _)| gap < closest) {
                best = Some((gap, reading));
            }
        }
        best.map(|(_, reading)| reading).expect("read at least once")
    }

    /// Whether this reading's wall clock is not where `base`'s would be by now.
    pub fn stepped_since(self, base: Clock) -> bool {
        let elapsed = self.mono.saturating_duration_since(base.mono).as_secs_f64();
        (self.wall - (base.wall + elapsed)).abs() > CLOCK_STEP.as_secs_f64()
    }

    /// The monotonic deadline of a wall-clock expiration (None: never, for inf and NaN).
    pub fn deadline(self, expiration: f64) -> Option<Instant> {
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

pub(super) fn wall_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Where a worker stands once a timer of its expired; a worker with none is only timed.
#[derive(Debug)]
pub(super) enum Phase {
    /// Its stacks are being taken (looked at again `at`); then it is reaped as `expired`
    /// says.
    Dumping { at: Instant, dump: stacks::Dump, expired: Expired },
    /// Its reap is to be tried again: it failed, or the caller has not answered it since
    /// `delegated`. `dumped`: its stacks were taken already, and are not asked for twice.
    Retrying { dumped: bool, delegated: Option<Instant> },
    /// Sent a catchable `signal` at `since`: SIGKILL `at` if it still runs. `failed`: a
    /// SIGKILL failed already (said once; it is tried again).
    Escalate { at: Instant, signal: Signal, since: Instant, failed: bool },
    /// Sent SIGKILL at `since`: reported as unreapable `at` if it still runs.
    Unreapable { at: Instant, since: Instant },
}

/// What expired for one worker in a pass.
#[derive(Debug)]
pub(super) struct Expired {
    /// Its due timers, in expiration order.
    timers: Vec<Request>,
    /// The signal they chose (torch: the first positive one), if any.
    signal: Option<Signal>,
    /// The learned bound that fired, if one did.
    learned: Option<Learned>,
}

/// What the server keeps beside each timer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Note {
    /// When the acquire arrived (wall clock), if it came through `intake`: the `after` that
    /// ran out is its expiration minus this.
    pub acquired: Option<f64>,
    /// The learned bound that set its deadline, if one did.
    pub learned: Option<Learned>,
}

impl Phase {
    /// When the loop must look at this worker again, whatever its timers say.
    fn follow_up_at(&self) -> Option<Instant> {
        match self {
            Self::Dumping { at, .. } | Self::Escalate { at, .. } | Self::Unreapable { at, .. } => {
                Some(*at)
            }
            Self::Retrying { .. } => None,
        }
    }
}

pub(super) struct State {
    /// The one reading every expiration is moved onto the monotonic clock with, taken again
    /// only when the wall clock is stepped. Equal wall-clock expirations so become equal
    /// instants and fall due in the same pass (torch's example gives every worker one
    /// deadline, and the File server's `signal_self` ends the process after that pass). A
    /// reading per request would give each the error of its reading: instants some
    /// microseconds apart, due in separate passes, the later ones never reaped.
    pub clock_base: Clock,
    /// Each timer notes when its acquire arrived and the learned bound that set its
    /// deadline, if one did.
    pub timers: DeadlineMap<Pid, Note>,
    /// Each scope's durations, when adaptive.
    pub learner: Option<Learner<Pid>>,
    /// Whether the learner changed since it was last saved, and when to save it next.
    pub learned_dirty: bool,
    pub next_save: Instant,
    /// Events while no loop runs (a bad state file, a refusal before `start`): the caller
    /// takes them to report at once (`Server::take_undelivered`), or the loop, when it starts.
    pub undelivered: Vec<Event>,
    pub workers: Workers,
    /// The workers past an expiry, and what is left to do about each.
    pub phases: HashMap<Pid, Phase>,
    /// Pids already reported as refused: a misbehaving client is logged once, not flooded.
    pub refused_pids: HashSet<i64>,
    /// Workers already warned that a cap refused their timers (each once).
    pub over_cap_pids: HashSet<Pid>,
    /// Workers whose next reap is spared (see `Server::spare`).
    pub spared: HashSet<Pid>,
    pub stats: Stats,
    /// When the running pass started; None while the loop waits (it is then making progress).
    pub busy_since: Option<f64>,
    /// When to look next for the exits of workers tracked without a pidfd.
    pub next_sweep: Instant,
    /// Whether a sweep could not tell if a worker still runs, since one last could (the
    /// warning is given once per such stretch, not once per sweep).
    pub sweep_blind: bool,
    pub events: Option<SyncSender<Event>>,
    /// `signal_self`'s signal, held until no worker that fell due is having its stacks taken.
    pub held_self_signal: Option<Signal>,
}

impl State {
    pub fn new(max_pidfds: usize, caps: Caps) -> std::io::Result<Self> {
        Ok(Self {
            clock_base: Clock::now(),
            timers: DeadlineMap::with_caps(caps),
            learner: None,
            learned_dirty: false,
            next_save: Instant::now(),
            undelivered: Vec::new(),
            workers: Workers::new(max_pidfds)?,
            phases: HashMap::new(),
            refused_pids: HashSet::new(),
            over_cap_pids: HashSet::new(),
            spared: HashSet::new(),
            stats: Stats::default(),
            busy_since: None,
            next_sweep: Instant::now(),
            sweep_blind: false,
            events: None,
            held_self_signal: None,
        })
    }

    /// Queues an event for the reporter (kept for later if no loop runs); false (and
    /// counted) if it had to be dropped.
    pub fn emit(&mut self, event: Event) -> bool {
        let Some(events) = &self.events else {
            if self.undelivered.len() < super::EVENT_CAPACITY {
                self.undelivered.push(event);
                return true;
            }
            self.stats.events_dropped += 1;
            return false;
        };
        match events.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.events_dropped += 1;
                false
            }
        }
    }

    /// Where a wall-clock expiration falls on the monotonic clock, given a reading taken now.
    pub(super) fn deadline(&mut self, now: Clock, expiration: f64) -> Option<Instant> {
        if now.stepped_since(self.clock_base) {
            self.clock_base = now;
        }
        self.clock_base.deadline(expiration)
    }

    /// The stats as readers see them, with the gauge filled in.
    pub fn stats(&self) -> Stats {
        Stats {
            live_timers: self.timers.len() as u64,
            learned_scopes: self.learner.as_ref().map_or(0, |learner| learner.len() as u64),
            ..self.stats
        }
    }
}

impl Shared {
    /// Registers one request, from the transport or from Python.
    pub(super) fn intake(&self, state: &mut State, request: Request, clock: Clock) {
        state.stats.requests += 1;
        let checked = reaper::validate_pid(request.pid).and_then(|pid| {
            if request.signal > 0 && !request.is_release() {
                reaper::validate_signal(request.signal)?;
            }
            Ok(pid)
        });
        let pid = match checked {
            Ok(pid) => pid,
            // Nothing is ever registered under such a pid: its release has nothing to do.
            Err(_) if request.is_release() => return,
            Err(reason) => return Self::refuse(state, request, reason),
        };
        if request.is_release() {
            if let Some(learner) = &mut state.learner {
                learner.released(pid, &request.scope, clock.mono);
                state.learned_dirty = true;
            }
            state.timers.apply(pid, request, None);
            return;
        }
        // Before anything is done for it (tracking, learning): a refused acquire leaves no trace.
        if let Err(cap) = state.timers.admits(pid, &request.scope) {
            return Self::over_cap(state, pid, cap);
        }
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
            if !matches!(lineage, Lineage::Descendant) {
                if fresh {
                    state.workers.forget(pid);
                }
                match lineage {
                    Lineage::NotDescendant => {
                        Self::refuse(state, request, Refusal::NotDescendant(raw(pid)));
                    }
                    Lineage::Unknown(err) => {
                        state.emit(Event::Warning(format!(
                            "cannot tell whether worker pid={} descends from this server \
                             (descendants_only): {err}; its timer {:?} is not registered",
                            raw(pid),
                            request.scope
                        )));
                    }
                    Lineage::Gone | Lineage::Descendant => {}
                }
                return;
            }
        }
        if new {
            // Unwatched (epoll full, say), its exit is looked for by the sweep instead.
            self.watch_worker(state, pid);
        }
        let (deadline, learned) = Self::learn(state, pid, &request, clock);
        let note = Note { acquired: Some(clock.wall), learned };
        state.timers.apply_noted(pid, request, deadline, note);
    }

    /// An acquire's deadline: the one it asked for, or the learned bound of its scope when
    /// that comes sooner (and then the bound, noted beside the timer).
    fn learn(
        state: &mut State,
        pid: Pid,
        request: &Request,
        clock: Clock,
    ) -> (Option<Instant>, Option<Learned>) {
        let deadline = state.deadline(clock, request.expiration);
        let (Some(learner), Some(_)) = (&mut state.learner, deadline) else {
            return (deadline, None);
        };
        let after = Duration::try_from_secs_f64((request.expiration - clock.wall).max(0.0))
            .unwrap_or(Duration::MAX);
        let acquired = learner.acquired(pid, &request.scope, clock.mono, after);
        let limits = learner.config();
        let warning = acquired.limit_reached.map(|limit| match limit {
            Limit::Scopes => format!(
                "learned timeouts: {} scopes are tracked; new scopes are not learned (reported \
                 once; a scope id with a step counter in it makes a new scope per step)",
                limits.max_scopes
            ),
            Limit::ScopeBytes => format!(
                "learned timeouts: scopes longer than {MAX_SCOPE_BYTES} bytes are not learned \
                 (reported once)"
            ),
            Limit::WorkerScopes => format!(
                "learned timeouts: {} (worker, scope) pairs are followed; new ones are not \
                 learned (reported once)",
                limits.max_worker_scopes
            ),
        });
        state.learned_dirty = true;
        if let Some(warning) = warning {
            state.emit(Event::Warning(warning));
        }
        match acquired.learned {
            Some(learned) => (clock.mono.checked_add(learned.bound).or(deadline), Some(learned)),
            None => (deadline, None),
        }
    }

    /// Registers what the transport decoded; counts and reports what it could not.
    pub(super) fn intake_decoded(
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

    /// Watches the pidfd of `pid`, if it has one, for its exit.
    fn watch_worker(&self, state: &mut State, pid: Pid) {
        let tag = TAG_WORKER + raw(pid).unsigned_abs();
        let watched = state.workers.pidfd(pid).is_some_and(|pidfd| {
            epoll::add(&self.epoll, pidfd, EventData::new_u64(tag), EventFlags::IN).is_ok()
        });
        if watched {
            state.workers.watching(pid);
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

    /// Counts an acquire a cap refused, and warns the first time for its worker.
    fn over_cap(state: &mut State, pid: Pid, cap: Cap) {
        state.stats.over_cap += 1;
        if state.over_cap_pids.len() >= MAX_REFUSED_REPORTED || !state.over_cap_pids.insert(pid) {
            return;
        }
        let caps = state.timers.caps();
        let full = match cap {
            Cap::Worker => format!(
                "worker pid={} holds {} timers, the most a worker may (max_worker_timers)",
                raw(pid),
                caps.per_worker
            ),
            Cap::Total => {
                format!("the server holds {} timers, the most it may (max_timers)", caps.total)
            }
        };
        state.emit(Event::Warning(format!(
            "{full}: new timers of worker pid={} are refused, and it is not guarded by them \
             (reported once per worker; stats()['over_cap'] counts them)",
            raw(pid)
        )));
    }

    /// A worker exited (its pidfd said so, or the sweep found it gone).
    pub(super) fn worker_exited(&self, state: &mut State, pid: Pid) {
        let dropped = state.timers.worker_len(pid);
        let phase = self.forget_worker(state, pid);
        if let Some(Phase::Dumping { dump, expired, .. }) = phase {
            // It exited while its stacks were taken: report the expiry with what came.
            let stacks = Some(dump.finish());
            let expiry = expired.report(pid, ReapOutcome::Gone, stacks);
            state.stats.expired += 1;
            state.emit(Event::Expired { expiries: vec![expiry], ack: None });
        } else if dropped > 0 {
            state.emit(Event::WorkerExited { pid, dropped });
        }
    }

    /// Drops the timers of workers tracked without a watched pidfd that have exited, as a
    /// pidfd's readiness does for the others, and watches those that got a pidfd since; at
    /// most once per retry interval (torch's File server probes its workers once per pass).
    /// Only a definite answer drops a worker: one whose state cannot be read is kept (and
    /// that is reported once, until the sweep can read again).
    pub(super) fn sweep_exited(&self, state: &mut State, now: Instant) {
        if state.workers.unwatched() == 0 || now < state.next_sweep {
            return;
        }
        state.next_sweep = now + self.retry_interval();
        let sweep = state.workers.sweep();
        for pid in sweep.exited {
            self.worker_exited(state, pid);
        }
        for pid in sweep.to_watch {
            self.watch_worker(state, pid);
        }
        match sweep.unknown {
            Some(err) if !state.sweep_blind => {
                state.sweep_blind = true;
                state.emit(Event::Warning(format!(
                    "cannot tell whether some workers still run ({err}): their timers are \
                     kept, and they are looked at again (reported once)"
                )));
            }
            Some(_) => {}
            None => state.sweep_blind = false,
        }
    }

    pub(super) fn retry_interval(&self) -> Duration {
        self.config.max_interval.min(MAX_RETRY)
    }

    /// Expires what is due: one torch watchdog pass, done at the deadline. Returns the
    /// pass's expiries and the signals to send this process once they are reported.
    pub(super) fn expire(&self, state: &mut State, now: Instant) -> (Vec<Expiry>, Vec<Signal>) {
        let mut expiries = Vec::new();
        self.follow_up(state, now, &mut expiries);
        let retry = now + self.retry_interval();
        for pid in state.timers.due_workers(now) {
            let dumped = match state.phases.get(&pid) {
                Some(phase) if phase.follow_up_at().is_some() => {
                    // Its stacks are being taken (or it is being killed): the followup decides.
                    let at = phase.follow_up_at().unwrap_or(retry);
                    state.timers.postpone_worker(pid, at.max(retry));
                    continue;
                }
                Some(Phase::Retrying { delegated: Some(asked), .. })
                    if now.saturating_duration_since(*asked) < DELEGATE_GRACE =>
                {
                    // The caller has not answered yet: look again later, without asking twice.
                    state.timers.postpone_worker(pid, retry);
                    continue;
                }
                Some(Phase::Retrying { dumped, .. }) => *dumped,
                _ => false,
            };
            let expired = state.timers.due_timers(pid, now);
            // torch: in expiration order, the first timer with a positive signal decides.
            // Signals were validated at intake; a refused one was never registered.
            let signal = expired
                .iter()
                .map(|t| t.request.signal)
                .find(|&s| s > 0)
                .and_then(|s| reaper::validate_signal(s).ok());
            // The bound that fired: the deciding timer's (else the first's).
            let deciding = expired.iter().find(|t| t.request.signal > 0).or(expired.first());
            let learned = deciding.and_then(|t| t.note.learned);
            let timers: Vec<Request> = expired.iter().map(|t| t.request.clone()).collect();
            let expired = Expired { timers, signal, learned };
            if expired.signal.is_some() && !dumped {
                if let Some(mut dump) = self.start_dump(state, pid, now) {
                    if let Some(config) = &self.config.stack_dump {
                        dump.hold(now, config.hold);
                    }
                    let at = dump.next_poll(now);
                    state.timers.postpone_worker(pid, at);
                    let scopes = expired.timers.iter().map(|t| t.scope.clone()).collect();
                    state.phases.insert(pid, Phase::Dumping { at, dump, expired });
                    state.emit(Event::Dumping { pid, scopes });
                    continue;
                }
            }
            expiries.push(self.reap(state, pid, expired, None, dumped, now));
        }
        let self_signals = self.self_signals(state, &expiries);
        (expiries, self_signals)
    }

    /// The signals this process gets after the pass is reported: those its own timers asked
    /// for (a process may time itself), then, for torch's File server (`signal_self`), the
    /// signal of the last reap (once, if that reap was this process's own). That one waits
    /// while a worker that fell due is still having its stacks taken: ending the process
    /// first would leave that worker unreaped.
    fn self_signals(&self, state: &mut State, expiries: &[Expiry]) -> Vec<Signal> {
        let signalled = || {
            expiries
                .iter()
                .filter(|e| matches!(e.outcome, ReapOutcome::Signalled))
                .filter_map(|e| Some((e.pid, reaper::validate_signal(e.signal).ok()?)))
        };
        let mut signals: Vec<Signal> =
            signalled().filter(|&(pid, _)| pid == self.own_pid).map(|(_, s)| s).collect();
        if self.config.signal_self {
            let last = signalled().next_back().map(|(_, s)| s).or(state.held_self_signal);
            let dumping = state.phases.values().any(|p| matches!(p, Phase::Dumping { .. }));
            state.held_self_signal = if dumping { last } else { None };
            if let Some(last) = last.filter(|_| !dumping) {
                if signals.last() != Some(&last) {
                    signals.push(last);
                }
            }
        }
        signals
    }

    /// Acts on the phases that are due: finished dumps are reaped, escalations sent.
    fn follow_up(&self, state: &mut State, now: Instant, expiries: &mut Vec<Expiry>) {
        let due: Vec<Pid> = state
            .phases
            .iter()
            .filter(|(_, phase)| phase.follow_up_at().is_some_and(|at| at <= now))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in due {
            let Some(phase) = state.phases.remove(&pid) else { continue };
            match phase {
                Phase::Dumping { mut dump, expired, .. } => {
                    if !dump.poll(now) {
                        let at = dump.next_poll(now);
                        state.phases.insert(pid, Phase::Dumping { at, dump, expired });
                        continue;
                    }
                    let stacks = dump.finish();
                    if !stacks.text.is_empty() {
                        state.stats.stack_dumps += 1;
                    }
                    expiries.push(self.reap(state, pid, expired, Some(stacks), true, now));
                }
                phase @ Phase::Retrying { .. } => {
                    // Never due as a followup (its timers are); kept as it was.
                    state.phases.insert(pid, phase);
                }
                _ if matches!(state.workers.liveness(pid), Liveness::Gone) => {
                    self.forget_worker(state, pid);
                }
                Phase::Escalate { signal, since, failed, .. } => {
                    match state.workers.signal(pid, Signal::KILL) {
                        Outcome::Signalled => {
                            state.stats.escalated += 1;
                            let after = now.saturating_duration_since(since);
                            state.emit(Event::Escalated { pid, signal: signal.as_raw(), after });
                            let at = now + self.config.escalate_after.unwrap_or_default();
                            state.phases.insert(pid, Phase::Unreapable { at, since: now });
                        }
                        Outcome::Gone => {
                            self.forget_worker(state, pid);
                        }
                        Outcome::Failed(err) => {
                            if !failed {
                                state.emit(Event::Warning(format!(
                                    "sending SIGKILL to worker pid={}, still running after \
                                     signal {}, failed: {err}; tried again (reported once)",
                                    raw(pid),
                                    signal.as_raw()
                                )));
                            }
                            let at = now + self.retry_interval();
                            let phase = Phase::Escalate { at, signal, since, failed: true };
                            state.phases.insert(pid, phase);
                        }
                    }
                }
                Phase::Unreapable { since, .. } => {
                    // Reported once; its exit is still noticed (its pidfd stays watched).
                    state.stats.unreapable += 1;
                    let after = now.saturating_duration_since(since);
                    let described = reaper::describe(state.workers.proc(), pid);
                    state.emit(Event::Unreapable { pid, after, state: described });
                }
            }
        }
    }

    /// Starts taking the stacks of a worker (an expired one, or one peeked at), if the
    /// server is asked to and can.
    pub(super) fn start_dump(
        &self,
        state: &mut State,
        pid: Pid,
        now: Instant,
    ) -> Option<stacks::Dump> {
        let config = self.config.stack_dump.as_ref()?;
        // Gone, or unknown: no dump (a due reap goes on without one).
        if !matches!(state.workers.liveness(pid), Liveness::Running) {
            return None;
        }
        let start_time = state.workers.start_time(pid).ok()??;
        let send = |signal| matches!(state.workers.signal(pid, signal), Outcome::Signalled);
        let (dump, refused) =
            stacks::Dump::start(config, pid.as_raw_nonzero().get(), start_time, send, now);
        if let Some(reason) = refused {
            state.emit(Event::Warning(reason));
        }
        dump
    }

    /// Does what an expiry calls for (signal, hand over, or only report) and keeps the books.
    /// `dumped`: its stacks were taken for this expiry (and are not asked for again).
    fn reap(
        &self,
        state: &mut State,
        pid: Pid,
        expired: Expired,
        stacks: Option<Stacks>,
        dumped: bool,
        now: Instant,
    ) -> Expiry {
        let retry = now + self.retry_interval();
        let signal = expired.signal;
        let mut error_file = None;
        let outcome = match signal {
            None => ReapOutcome::NotSignalled,
            Some(_) if state.spared.remove(&pid) => ReapOutcome::Spared,
            Some(_) if self.config.dry_run => ReapOutcome::DryRun,
            Some(_) if self.config.delegate_reaps => ReapOutcome::Delegated,
            // This process is signalled once the pass is reported (see `self_signals`):
            // signalling it now could end it before anyone hears why.
            Some(_) if pid == self.own_pid => ReapOutcome::Signalled,
            Some(signal) => {
                // Before the signal: the agent reads it as soon as it sees the worker die.
                error_file = self.write_error_file(state, pid, &expired, signal, stacks.as_ref());
                match state.workers.signal(pid, signal) {
                    Outcome::Signalled => ReapOutcome::Signalled,
                    Outcome::Gone => ReapOutcome::Gone,
                    Outcome::Failed(err) => ReapOutcome::Failed(err),
                }
            }
        };
        if let (ReapOutcome::Gone, Some(path)) = (&outcome, &error_file) {
            // It exited on its own: what it died of is not this timer.
            let _ = std::fs::remove_file(path);
            error_file = None;
        }
        match (&outcome, signal) {
            (ReapOutcome::NotSignalled | ReapOutcome::DryRun | ReapOutcome::Spared, _) => {
                // Only the expired timers go: a later timer with a signal stays armed.
                for timer in &expired.timers {
                    let release = Request { expiration: -1.0, ..timer.clone() };
                    state.timers.apply(pid, release, None);
                }
                state.phases.remove(&pid);
            }
            (ReapOutcome::Gone, _) => {
                self.forget_worker(state, pid);
            }
            (ReapOutcome::Signalled, Some(signal)) => {
                state.stats.reaped += 1;
                match self.config.escalate_after {
                    Some(grace) => {
                        // Keep watching it (its pidfd tells when it is gone).
                        state.timers.remove_worker(pid);
                        let at = now + grace;
                        let phase = if signal == Signal::KILL {
                            Phase::Unreapable { at, since: now }
                        } else {
                            Phase::Escalate { at, signal, since: now, failed: false }
                        };
                        state.phases.insert(pid, phase);
                    }
                    None => {
                        self.forget_worker(state, pid);
                    }
                }
            }
            (ReapOutcome::Failed(_), _) => {
                state.timers.postpone_worker(pid, retry);
                state.phases.insert(pid, Phase::Retrying { dumped, delegated: None });
            }
            (ReapOutcome::Delegated, _) => {
                state.timers.postpone_worker(pid, retry);
                state.phases.insert(pid, Phase::Retrying { dumped, delegated: Some(now) });
            }
            (ReapOutcome::Signalled, None) => unreachable!("signalled without a signal"),
        }
        state.stats.expired += 1;
        if expired.learned.is_some() {
            state.stats.learned_expiries += 1;
        }
        Expiry { error_file, ..expired.report(pid, outcome, stacks) }
    }

    /// Writes torch's error file of a worker about to be signalled (see [`error_file`]), when
    /// the server is asked to, the worker has one (it is torchrun's), belongs to the server's
    /// user and has not written it itself. Returns its path if this server wrote it.
    fn write_error_file(
        &self,
        state: &mut State,
        pid: Pid,
        expired: &Expired,
        signal: Signal,
        stacks: Option<&Stacks>,
    ) -> Option<PathBuf> {
        if !self.config.error_files {
            return None;
        }
        let number = pid.as_raw_nonzero().get();
        let own_user = rustix::process::geteuid().as_raw();
        if stacks::uids(number)?[0] != own_user {
            return None;
        }
        let path = error_file::path_of(number)?;
        let fired: Vec<Fired<'_>> = expired
            .timers
            .iter()
            .map(|request| {
                let note = state.timers.get(pid, &request.scope).map(|t| t.note);
                let learned = note.and_then(|note| note.learned);
                let acquired = note.and_then(|note| note.acquired);
                let after =
                    acquired.map(|at| request.expiration - at).filter(|after| after.is_finite());
                let held = acquired.map(|at| wall_now() - at).filter(|held| held.is_finite());
                Fired { scope: &request.scope, after, learned, held }
            })
            .collect();
        let message = error_file::message(number, &fired, signal.as_raw(), stacks);
        let summary = message.lines().next().unwrap_or_default();
        let content = error_file::content(&message, summary, wall_now() as u64);
        match error_file::write_new(&path, &content) {
            Ok(written) => written.then_some(path),
            Err(err) => {
                state.emit(Event::Warning(format!(
                    "cannot write the error file {} of worker pid={number}: {err}",
                    path.display()
                )));
                None
            }
        }
    }

    /// The caller's answer to a delegated reap.
    pub(super) fn complete_reap(&self, state: &mut State, pid: Pid, reaped: bool) {
        if let Some(Phase::Retrying { delegated, .. }) = state.phases.get_mut(&pid) {
            *delegated = None;
        }
        if reaped {
            self.forget_worker(state, pid);
            state.stats.reaped += 1;
        } else {
            let retry = Instant::now() + self.retry_interval();
            state.timers.postpone_worker(pid, retry);
        }
    }

    /// Drops a worker, its timers and its phase (it was reaped, or it is gone); returns the
    /// phase it was in.
    pub(super) fn forget_worker(&self, state: &mut State, pid: Pid) -> Option<Phase> {
        if let Some(pidfd) = state.workers.forget(pid) {
            let _ = epoll::delete(&self.epoll, &pidfd);
        }
        if let Some(learner) = &mut state.learner {
            learner.worker_gone(pid);
        }
        state.timers.remove_worker(pid);
        // A later process with its pid is warned anew.
        state.over_cap_pids.remove(&pid);
        state.spared.remove(&pid);
        state.phases.remove(&pid)
    }

    /// When the loop must next look at its deadlines.
    pub(super) fn next_timeout(&self, state: &State) -> Option<Instant> {
        let follow_up = state.phases.values().filter_map(Phase::follow_up_at).min();
        let sweep = (state.workers.unwatched() > 0).then_some(state.next_sweep);
        [state.timers.next_deadline(), follow_up, sweep].into_iter().flatten().min()
    }
}

impl Expired {
    fn report(self, pid: Pid, outcome: ReapOutcome, stacks: Option<Stacks>) -> Expiry {
        let signal = self.signal.map_or(0, Signal::as_raw);
        let (timers, learned) = (self.timers, self.learned);
        Expiry { pid, timers, signal, outcome, stacks, learned, error_file: None }
    }
}

/// A validated pid as a number, for messages and requests.
pub(super) fn raw(pid: Pid) -> i64 {
    i64::from(pid.as_raw_nonzero().get())
}
