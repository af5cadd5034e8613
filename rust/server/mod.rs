//! The timer server: one native thread that reads requests, keeps deadlines and reaps.
//!
//! The thread sleeps in one `epoll_wait` on the transport ([`crate::transport`]), an eventfd (stop, and timers
//! registered from outside), the pidfds of workers with timers, and a timerfd armed at the
//! earliest deadline, so a deadline fires when it is due and an idle server does not wake.
//! It never needs Python: what it has to report goes, as [`Event`]s, down a bounded channel
//! that the bindings drain from a thread of their own.
//!
//! * this module: the handle ([`Server`]) and what the loop and its callers share;
//! * [`pass`]: torch's reap rules, one pass at a time, and where each worker stands;
//! * `event_loop`: the thread: what woke it, what the transport brought, the self-signal
//!   handshake;
//! * `alarm`: the timerfd the thread sleeps on, and its scheduler slice;
//! * `rings`: the workers' shared-memory request rings (`crate::ring`);
//! * [`report`]: what comes out (events, stats).

mod alarm;
mod event_loop;
mod pass;
mod report;
mod rings;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags};
use rustix::process::Pid;

use crate::codec::Request;
use crate::deadlines::Caps;
use crate::learned::{LearnConfig, Learner, ScopeSummary, StateError};
use crate::reaper;
use crate::stacks;
use crate::transport::Transport;
use pass::{Clock, State};

pub use report::{Event, Expiry, Field, Kind, ReapOutcome, Stats};

/// Events waiting for the reporter past this many are dropped (and counted).
const EVENT_CAPACITY: usize = 4096;

const TAG_WAKE: u64 = 0;
const TAG_TRANSPORT: u64 = 1;
const TAG_TRANSPORT_WATCH: u64 = 2;
const TAG_ALARM: u64 = 3;
const TAG_WORKER: u64 = 1 << 32;
const TAG_RING: u64 = 2 << 32;

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
    /// Learn each scope's durations and fire at the learned bound (`adaptive=True`).
    pub adaptive: Option<Adaptive>,
    /// Before signalling a torchrun worker, write its `TORCHELASTIC_ERROR_FILE` (if it did
    /// not) so the agent's failure summary says which timer fired.
    pub error_files: bool,
    /// The most live timers per worker and in all; past either an acquire is refused.
    pub caps: Caps,
    /// The permissions of a FIFO transport's FIFO (None: 0666 less the umask), plus our mark:
    /// what the caller gives `transport::fifo::Endpoint::create`.
    pub fifo_mode: Option<rustix::fs::Mode>,
}

/// Timeouts learned from the job.
#[derive(Debug, Clone)]
pub struct Adaptive {
    pub learn: LearnConfig,
    /// Where the statistics live between servers: loaded when the server is built, saved
    /// when it stops and now and then while it runs.
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Command {
    Run = 0,
    Stop = 1,
    RunOnce = 2,
}

/// The process a server belongs to. fork copies a server into the child (its fds, its
/// locks as they were), but not its loop thread: there the copy must touch nothing.
#[derive(Debug, Clone, Copy)]
pub struct Owner(Pid);

impl Owner {
    fn current() -> Self {
        Self(rustix::process::getpid())
    }

    /// Whether this process is a fork of the owner (the server here is a copy).
    pub fn is_forked_copy(self) -> bool {
        rustix::process::getpid() != self.0
    }

    /// The owner's pid.
    pub fn pid(self) -> i32 {
        self.0.as_raw_nonzero().get()
    }

    /// The error every call but `stop` gives in a forked copy.
    pub fn forked_copy_error(self) -> io::Error {
        io::Error::other(format!(
            "this timer server belongs to process {} (this process is a fork of it)",
            self.0.as_raw_nonzero()
        ))
    }
}

/// What the loop thread and the handle share.
struct Shared {
    state: Mutex<State>,
    epoll: OwnedFd,
    wake: OwnedFd,
    command: AtomicU8,
    /// The process that built the server: a worker like any other, signalled last.
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
}

/// A timer server; `start` runs its loop on a native thread.
pub struct Server {
    shared: Arc<Shared>,
    /// The transport while the loop is not running.
    parked: Option<Box<dyn Transport>>,
    thread: Option<JoinHandle<Box<dyn Transport>>>,
}

impl Server {
    /// Builds a server that reads `transport` while it runs.
    pub fn new(transport: impl Transport + 'static, config: Config) -> io::Result<Self> {
        let mut state = State::new(config.max_pidfds, config.caps)?;
        if let Some(adaptive) = &config.adaptive {
            let learner = match &adaptive.state_file {
                Some(path) => Learner::load(adaptive.learn.clone(), path),
                None => Learner::new(adaptive.learn.clone()).map_err(Into::into),
            };
            state.learner = Some(match learner {
                Ok(learner) => learner,
                Err(StateError::Config(err)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, err))
                }
                Err(err) => {
                    // A bad state file costs what it held, not the server.
                    state.emit(Event::Warning(format!("{err}; learning from scratch")));
                    Learner::new(adaptive.learn.clone())
                        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?
                }
            });
        }
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &wake, EventData::new_u64(TAG_WAKE), EventFlags::IN)?;
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                epoll,
                wake,
                command: AtomicU8::new(Command::Run as u8),
                own_pid: Owner::current().0,
                config,
            }),
            parked: Some(Box::new(transport)),
            thread: None,
        })
    }

    pub fn is_running(&self) -> bool {
        self.thread.is_some()
    }

    /// The process this server belongs to. A copy in a forked child shares the epoll
    /// instance, the eventfd and the FIFO with the original, and must touch none of them.
    pub fn owner(&self) -> Owner {
        Owner(self.shared.own_pid)
    }

    /// Starts the loop; returns the events it will report. A FIFO removed since (by `stop`)
    /// is created again.
    pub fn start(&mut self) -> io::Result<Receiver<Event>> {
        if self.owner().is_forked_copy() {
            return Err(self.owner().forked_copy_error());
        }
        if self.thread.is_some() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "server already started"));
        }
        let mut transport = self.parked.take().expect("a stopped server holds its transport");
        let warning = match transport.open() {
            Ok(warning) => warning,
            Err(err) => {
                self.parked = Some(transport);
                return Err(err);
            }
        };
        let (sender, receiver) = mpsc::sync_channel(EVENT_CAPACITY);
        {
            let mut state = self.shared.lock();
            state.events = Some(sender);
            for event in std::mem::take(&mut state.undelivered) {
                state.emit(event);
            }
            if let Some(warning) = warning {
                state.emit(Event::Warning(warning));
            }
        }
        self.shared.command.store(Command::Run as u8, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        let thread = thread::Builder::new().name("elastic-timer".into()).spawn(move || {
            let transport = event_loop::run(&shared, transport);
            // Dropping the sender ends the reporter once it has drained the events.
            shared.lock().events = None;
            transport
        })?;
        self.thread = Some(thread);
        Ok(receiver)
    }

    /// Whether expiries go to the caller (a Python `_reap_worker` override) instead of being
    /// signalled here. Set before each `start`: an override can be put in place (patched)
    /// after the server was built.
    pub fn delegate_reaps(&mut self, delegate: bool) -> io::Result<()> {
        // Only the loop thread shares `shared`: a stopped server holds it alone.
        let shared = Arc::get_mut(&mut self.shared)
            .ok_or_else(|| io::Error::new(io::ErrorKind::AlreadyExists, "server running"))?;
        shared.config.delegate_reaps = delegate;
        Ok(())
    }

    /// Takes the events reported while no loop runs (a refusal by `register` before
    /// `start`), for the caller to report now.
    pub fn take_undelivered(&self) -> Vec<Event> {
        std::mem::take(&mut self.shared.lock().undelivered)
    }

    /// Stops the loop and waits for it (it exits at once), and removes the FIFO if it is
    /// still this server's. Idempotent; does nothing in a forked copy.
    pub fn stop(&mut self) {
        self.finish(Command::Stop);
    }

    /// Reads every request already sent, runs one pass, then stops (torch's `run_once`).
    pub fn run_once(&mut self) {
        self.finish(Command::RunOnce);
    }

    fn finish(&mut self, command: Command) {
        if self.owner().is_forked_copy() {
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
        if let Some(transport) = &mut self.parked {
            // The loop withdrew it already if it ran; a server never started does it now.
            transport.withdraw();
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
        for pid in pids.into_iter().filter_map(|pid| reaper::validate_pid(pid).ok()) {
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

    /// Spares worker `pid`'s next reap, if it comes before the worker is forgotten: its
    /// expired timers are cleared, no signal is sent and no error file written
    /// ([`ReapOutcome::Spared`]). For a caller that found, at the job level, that the worker
    /// only waits for another one (whose own expiry kills it).
    pub fn spare(&self, pid: Pid) {
        let mut state = self.shared.lock();
        if matches!(state.workers.liveness(pid), reaper::Liveness::Running) {
            state.spared.insert(pid);
        }
    }

    /// The answer to a [`ReapOutcome::Delegated`] reap of worker `pid` (an [`Expiry`]'s).
    pub fn complete_reap(&self, pid: Pid, reaped: bool) {
        self.shared.complete_reap(&mut self.shared.lock(), pid, reaped);
        self.shared.wake();
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// Starts taking the stacks of these workers, timers expired or not, as before a reap
    /// (see [`Peek::wait`]); a worker whose stacks the loop is taking already is not asked
    /// twice. A worker the server does not track, or cannot dump, gets none.
    pub fn peek_stacks(&self, pids: &[i64]) -> Peek {
        let now = std::time::Instant::now();
        let mut state = self.shared.lock();
        let dumps = pids
            .iter()
            .map(|&number| {
                let dump = reaper::validate_pid(number).ok().and_then(|pid| {
                    match state.phases.get(&pid) {
                        // Its timers expired and its stacks are being taken: read those.
                        Some(pass::Phase::Dumping { dump, .. }) => dump.follow(),
                        _ => self.shared.start_dump(&mut state, pid, now),
                    }
                });
                (number, dump)
            })
            .collect();
        Peek { dumps }
    }

    /// The learned figures of every scope (none unless adaptive).
    pub fn timeouts(&self) -> Vec<ScopeSummary> {
        let state = self.shared.lock();
        state.learner.as_ref().map(|learner| learner.summaries().collect()).unwrap_or_default()
    }

    /// Wall-clock seconds of the loop's last progress: now while it waits, else when its
    /// running pass began (torch's agent checks this to tell a stuck watchdog).
    pub fn last_progress(&self) -> f64 {
        self.shared.lock().busy_since.unwrap_or_else(pass::wall_now)
    }
}

/// Stack dumps of workers asked for outside the loop, which goes on reaping meanwhile.
#[derive(Debug)]
pub struct Peek {
    dumps: Vec<(i64, Option<stacks::Dump>)>,
}

impl Peek {
    /// Waits (on the caller's thread, at most the stack grace) for every dump; returns each
    /// worker's stacks.
    pub fn wait(mut self) -> Vec<(i64, Option<stacks::Stacks>)> {
        loop {
            let now = std::time::Instant::now();
            let mut next = None;
            for dump in self.dumps.iter_mut().filter_map(|(_, dump)| dump.as_mut()) {
                if !dump.poll(now) {
                    let at = dump.next_poll(now);
                    next = Some(next.map_or(at, |next: std::time::Instant| next.min(at)));
                }
            }
            match next {
                Some(at) => thread::sleep(at.saturating_duration_since(now)),
                None => break,
            }
        }
        self.dumps.into_iter().map(|(pid, dump)| (pid, dump.map(stacks::Dump::finish))).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.owner().is_forked_copy() {
            // The thread is the original's: joining or detaching it here is undefined.
            std::mem::forget(self.thread.take());
            return;
        }
        self.stop();
    }
}

#[cfg(test)]
mod tests;
