//! Signals workers, and only workers.
//!
//! torch calls `os.kill(pid, signal)` with whatever pid a request names, so a request naming
//! pid -1 kills every process of the user. Here a pid must name one other process, and where
//! the kernel has pidfds each worker is signalled through a pidfd opened when its first timer
//! was registered: a worker that exited and whose pid was reused is never hit.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::process::{self, Pid, PidfdFlags, Signal};

use crate::procfs::{Proc, Stat};

/// Why a request's pid or signal is never acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pid {0} does not name a single worker process (0 is a process group, negative pids are groups or every process, 1 is init)")]
    ReservedPid(i64),
    #[error("pid {0} is out of range")]
    PidOutOfRange(i64),
    #[error("signal {0} is not a valid signal number")]
    InvalidSignal(i32),
    #[error("pid {0} is not a descendant of the timer server's process (descendants_only is set)")]
    NotDescendant(i64),
}

/// What signalling a worker did.
#[derive(Debug)]
pub enum Outcome {
    Signalled,
    /// The worker had already exited: nothing left to reap.
    Gone,
    /// The signal could not be sent (for example EPERM); the reap is retried later.
    Failed(io::Error),
}

/// Checks that `pid` names one process other than init. The server's own process is one: a
/// process may time itself (torch's tests do), and is then signalled as it asked.
pub fn validate_pid(pid: i64) -> Result<Pid, Refusal> {
    if pid <= 1 {
        return Err(Refusal::ReservedPid(pid));
    }
    let raw = i32::try_from(pid).map_err(|_| Refusal::PidOutOfRange(pid))?;
    Pid::from_raw(raw).ok_or(Refusal::PidOutOfRange(pid))
}

/// Checks that `signal` is a signal number the kernel accepts (1..=SIGRTMAX).
pub fn validate_signal(signal: i32) -> Result<Signal, Refusal> {
    if !(1..=libc::SIGRTMAX()).contains(&signal) {
        return Err(Refusal::InvalidSignal(signal));
    }
    // SAFETY: the number is a valid signal; rustix only warns that real-time signals may be
    // reserved by libc *in this process*, and we send them to another one.
    Ok(unsafe { Signal::from_raw_unchecked(signal) })
}

/// How the server holds on to a worker it has seen.
#[derive(Debug)]
enum Handle {
    /// A pidfd: signals go to exactly the process that registered, and it reports the exit
    /// once the loop watches it (`watched`).
    Pidfd { fd: OwnedFd, watched: bool },
    /// No pidfd (old kernel, past the budget, or none could be opened then: `retry_pidfd`):
    /// signal by pid, but only while the process with that pid is still the one that
    /// registered (same start time). `started` is None while `/proc` could not be read.
    Pid { started: Option<u64>, retry_pidfd: bool },
}

/// Whether a tracked worker still runs, as far as the server can tell.
#[derive(Debug)]
pub enum Liveness {
    Running,
    /// Exited, a zombie, or its pid now names a later process (or it is not tracked).
    Gone,
    /// No answer (`/proc` unreadable: EMFILE, ENOMEM...): it is kept, and asked about again.
    Unknown(io::Error),
}

/// Where a tracked worker stands relative to the server's process (see [`Workers::lineage`]).
#[derive(Debug)]
pub enum Lineage {
    Descendant,
    NotDescendant,
    /// The worker has exited (or its pid now names another process).
    Gone,
    /// Its parents could not be read (`/proc` unreadable).
    Unknown(io::Error),
}

/// Parents followed at most when looking for an ancestor (process trees are far shallower).
const MAX_LINEAGE_DEPTH: usize = 4096;

/// What `Workers::track` found.
#[derive(Debug)]
pub enum Tracked<'a> {
    /// A new pidfd the caller should watch (then say so with [`Workers::watching`]): it
    /// becomes readable when the worker exits.
    New(BorrowedFd<'a>),
    /// Already tracked, or tracked without a pidfd.
    Known,
    /// There is no such process: its requests can be dropped.
    Gone,
}

/// What one look at the workers whose exit no fd reports found (see [`Workers::sweep`]).
#[derive(Debug, Default)]
pub struct Sweep {
    /// Those that are definitely gone.
    pub exited: Vec<Pid>,
    /// Those that got a pidfd since (or whose pidfd is not watched yet): the caller watches
    /// them and says so with [`Workers::watching`].
    pub to_watch: Vec<Pid>,
    /// The first error that left a worker's state unknown, if any.
    pub unknown: Option<io::Error>,
}

/// The workers the server has seen, each with its pidfd.
#[derive(Debug)]
pub struct Workers {
    handles: HashMap<Pid, Handle>,
    proc: Proc,
    pidfds_available: bool,
    max_pidfds: usize,
    pidfd_count: usize,
    /// Each reason for signalling by pid is reported once, not once per worker.
    warned_budget: bool,
    warned_open: bool,
}

impl Workers {
    /// `max_pidfds` bounds the file descriptors spent on pidfds; workers past it are signalled
    /// by pid. `/proc` is opened now: the reap path reads it with the fd table full.
    pub fn new(max_pidfds: usize) -> io::Result<Self> {
        Ok(Self {
            handles: HashMap::new(),
            proc: Proc::open()?,
            pidfds_available: true,
            max_pidfds,
            pidfd_count: 0,
            warned_budget: false,
            warned_open: false,
        })
    }

    /// `/proc`, as the reaper reads it.
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Starts tracking `pid` when its first timer is registered.
    ///
    /// The message, when there is one, says why this worker (and others after it) will be
    /// signalled by pid instead of through a pidfd; each reason is given once.
    pub fn track(&mut self, pid: Pid) -> (Tracked<'_>, Option<String>) {
        if self.handles.contains_key(&pid) {
            return (Tracked::Known, None);
        }
        let mut warning = None;
        let mut retry_pidfd = false;
        if self.pidfds_available && self.pidfd_count < self.max_pidfds {
            match process::pidfd_open(pid, PidfdFlags::empty()) {
                Ok(fd) => {
                    self.pidfd_count += 1;
                    let handle =
                        self.handles.entry(pid).or_insert(Handle::Pidfd { fd, watched: false });
                    let Handle::Pidfd { fd, .. } = &*handle else { unreachable!("just inserted") };
                    return (Tracked::New(fd.as_fd()), None);
                }
                Err(Errno::SRCH) => return (Tracked::Gone, None),
                // ENOSYS or EPERM (an old kernel, a seccomp filter): none will open.
                Err(err @ (Errno::NOSYS | Errno::PERM)) => {
                    self.pidfds_available = false;
                    warning = Some(format!(
                        "pidfds unavailable ({}); signalling workers by pid, checked against \
                         their start time (reported once)",
                        io::Error::from(err)
                    ));
                }
                // EMFILE, ENFILE, ENOMEM: this one may open later (see `sweep`).
                Err(err) => {
                    retry_pidfd = true;
                    if !self.warned_open {
                        self.warned_open = true;
                        warning = Some(format!(
                            "cannot open a pidfd for worker pid={} ({}); it is signalled by \
                             pid, checked against its start time, until one opens (reported \
                             once)",
                            pid.as_raw_nonzero(),
                            io::Error::from(err)
                        ));
                    }
                }
            }
        } else if self.pidfds_available && !self.warned_budget {
            self.warned_budget = true;
            warning = Some(format!(
                "more than {} workers: further workers are signalled by pid, checked \
                 against their start time (reported once)",
                self.max_pidfds
            ));
        }
        // Record who registered, so a reused pid is told apart at signal time. Unreadable
        // now, it is read at the next sweep: the worker is kept either way.
        let started = match self.proc.start_time(pid) {
            Ok(Some(started)) => Some(started),
            Ok(None) => return (Tracked::Gone, warning),
            Err(_) => None,
        };
        self.handles.insert(pid, Handle::Pid { started, retry_pidfd });
        (Tracked::Known, warning)
    }

    pub fn is_tracked(&self, pid: Pid) -> bool {
        self.handles.contains_key(&pid)
    }

    /// The pidfd of a tracked worker, if it has one.
    pub fn pidfd(&self, pid: Pid) -> Option<BorrowedFd<'_>> {
        match self.handles.get(&pid)? {
            Handle::Pidfd { fd, .. } => Some(fd.as_fd()),
            Handle::Pid { .. } => None,
        }
    }

    /// The loop watches the pidfd of `pid` now (its exit is reported there).
    pub fn watching(&mut self, pid: Pid) {
        if let Some(Handle::Pidfd { watched, .. }) = self.handles.get_mut(&pid) {
            *watched = true;
        }
    }

    /// The `/proc/<pid>/stat` of the tracked worker `pid`, if it is still that worker's: with
    /// a pidfd, the worker is still running after the read; without, the entry has the start
    /// time recorded when it was tracked. `Ok(None)`: it is gone.
    fn own_stat(&self, pid: Pid) -> io::Result<Option<Stat>> {
        let Some(handle) = self.handles.get(&pid) else { return Ok(None) };
        let Some(stat) = self.proc.stat(pid)? else { return Ok(None) };
        let same = match handle {
            Handle::Pidfd { fd, .. } => !has_exited(fd),
            // Never read: the best there is (it is read at the next sweep).
            Handle::Pid { started, .. } => started.is_none_or(|started| started == stat.start_time),
        };
        Ok(same.then_some(stat))
    }

    /// Whether the tracked worker `pid` descends from `ancestor`: its chain of parents
    /// (`/proc/<pid>/stat` field 4) reaches `ancestor` before init.
    pub fn lineage(&self, pid: Pid, ancestor: Pid) -> Lineage {
        let stat = match self.own_stat(pid) {
            Ok(Some(stat)) => stat,
            Ok(None) => return Lineage::Gone,
            Err(err) => return Lineage::Unknown(err),
        };
        let ancestor = ancestor.as_raw_nonzero().get();
        let mut parent = stat.ppid;
        for _ in 0..MAX_LINEAGE_DEPTH {
            if parent == ancestor {
                return Lineage::Descendant;
            }
            let Some(pid) = Pid::from_raw(parent).filter(|_| parent > 1) else {
                return Lineage::NotDescendant;
            };
            // A parent that exits meanwhile leaves its children to init (or a subreaper):
            // the worker is then no longer our descendant.
            match self.proc.stat(pid) {
                Ok(Some(stat)) => parent = stat.ppid,
                Ok(None) => return Lineage::NotDescendant,
                Err(err) => return Lineage::Unknown(err),
            }
        }
        Lineage::NotDescendant
    }

    /// Stops tracking `pid` (it exited); returns its pidfd so the caller can unwatch it.
    pub fn forget(&mut self, pid: Pid) -> Option<OwnedFd> {
        match self.handles.remove(&pid)? {
            Handle::Pidfd { fd, .. } => {
                self.pidfd_count -= 1;
                Some(fd)
            }
            Handle::Pid { .. } => None,
        }
    }

    /// Sends `signal` to the worker, through its pidfd where it has one.
    ///
    /// A stopped worker (SIGSTOP, or a terminal stop) would keep a catchable signal pending
    /// and never act on it, so it is sent SIGCONT right after, the same way: it resumes and
    /// the pending signal is delivered (also when its state cannot be read). SIGKILL needs
    /// no help.
    pub fn signal(&self, pid: Pid, signal: Signal) -> Outcome {
        let stat = self.own_stat(pid);
        let stopped = needs_resume(signal)
            && stat.as_ref().map_or(true, |stat| stat.is_some_and(|stat| stat.state == 'T'));
        let send = |signal| match self.handles.get(&pid) {
            Some(Handle::Pidfd { fd, .. }) => Ok(process::pidfd_send_signal(fd, signal)),
            Some(Handle::Pid { .. }) => match &stat {
                // The worker exited and its pid may have been reused: not the same process.
                Ok(None) => Err(Outcome::Gone),
                // Who has the pid cannot be told now: try again later.
                Err(err) => Err(Outcome::Failed(io::Error::new(
                    err.kind(),
                    format!("cannot read /proc/{}/stat: {err}", pid.as_raw_nonzero()),
                ))),
                Ok(Some(_)) => Ok(process::kill_process(pid, signal)),
            },
            // Never seen alive: whatever has this pid now is not the worker that registered.
            None => Err(Outcome::Gone),
        };
        let sent = match send(signal) {
            Ok(sent) => sent,
            Err(outcome) => return outcome,
        };
        if sent.is_ok() && stopped {
            // Its failure changes nothing: the signal was sent.
            let _ = send(Signal::CONT);
        }
        match sent {
            Ok(()) => Outcome::Signalled,
            Err(Errno::SRCH) => Outcome::Gone,
            Err(err) => Outcome::Failed(err.into()),
        }
    }

    /// Whether the tracked worker `pid` is still running (not exited, not a zombie).
    pub fn liveness(&self, pid: Pid) -> Liveness {
        if let Some(Handle::Pidfd { fd, .. }) = self.handles.get(&pid) {
            // The pidfd answers without /proc.
            return if has_exited(fd) { Liveness::Gone } else { Liveness::Running };
        }
        match self.own_stat(pid) {
            Ok(Some(stat)) if stat.state != 'Z' => Liveness::Running,
            Ok(_) => Liveness::Gone,
            Err(err) => Liveness::Unknown(err),
        }
    }

    /// The start time of the tracked worker `pid` (see [`Stat::start_time`]).
    pub fn start_time(&self, pid: Pid) -> io::Result<Option<u64>> {
        Ok(self.own_stat(pid)?.map(|stat| stat.start_time))
    }

    /// How many workers announce their exit through no watched fd (the loop asks for them).
    pub fn unwatched(&self) -> usize {
        self.handles
            .values()
            .filter(|handle| !matches!(handle, Handle::Pidfd { watched: true, .. }))
            .count()
    }

    /// Looks at the workers whose exit no watched fd reports: which exited (exited, a zombie,
    /// or their pid now names a later process; a worker whose state cannot be read is kept),
    /// and gives each that could not get a pidfd another try, and a start time read late.
    pub fn sweep(&mut self) -> Sweep {
        let mut sweep = Sweep::default();
        let pids: Vec<Pid> = self
            .handles
            .iter()
            .filter(|(_, handle)| !matches!(handle, Handle::Pidfd { watched: true, .. }))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in pids {
            match self.liveness(pid) {
                Liveness::Gone => {
                    sweep.exited.push(pid);
                    continue;
                }
                Liveness::Unknown(err) => {
                    sweep.unknown.get_or_insert(err);
                    continue;
                }
                Liveness::Running => {}
            }
            match self.handles.get_mut(&pid) {
                Some(Handle::Pidfd { .. }) => sweep.to_watch.push(pid),
                Some(Handle::Pid { started, retry_pidfd }) => {
                    if started.is_none() {
                        *started = self.proc.start_time(pid).ok().flatten();
                    }
                    if *retry_pidfd && self.pidfd_count < self.max_pidfds {
                        if let Some(fd) = self.open_pidfd(pid) {
                            self.handles.insert(pid, Handle::Pidfd { fd, watched: false });
                            self.pidfd_count += 1;
                            sweep.to_watch.push(pid);
                        }
                    }
                }
                None => {}
            }
        }
        sweep
    }

    /// A pidfd of the tracked worker `pid`, if one opens and it is that worker's (the start
    /// time read once the pidfd holds the process is the one recorded).
    fn open_pidfd(&self, pid: Pid) -> Option<OwnedFd> {
        let Some(Handle::Pid { started: Some(started), .. }) = self.handles.get(&pid) else {
            return None;
        };
        let fd = process::pidfd_open(pid, PidfdFlags::empty()).ok()?;
        (self.proc.start_time(pid).ok()?? == *started && !has_exited(&fd)).then_some(fd)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// What `/proc` says of a process that will not die: its name, state, where it waits in the
/// kernel and (readable by root) its kernel stack.
pub fn describe(proc: &Proc, pid: Pid) -> String {
    let read = |name| {
        let bytes = proc.read(pid, name).ok().flatten().unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let status = read("status");
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim).unwrap_or("?")
    };
    let mut description =
        format!("{} (pid {}): state {}", field("Name:"), pid.as_raw_nonzero(), field("State:"));
    let wchan = read("wchan");
    if !wchan.is_empty() && wchan != "0" {
        description.push_str(&format!(", waiting in {wchan}"));
    }
    let stack = read("stack");
    let frames: Vec<&str> = stack.lines().take(8).map(str::trim).collect();
    if !frames.is_empty() {
        description.push_str(&format!(", kernel stack: {}", frames.join(" < ")));
    }
    description
}

/// Signals a stopped process only acts on once continued: all but SIGKILL (which ends it
/// anyway), SIGCONT itself, and the stop signals (which a SIGCONT would cancel).
fn needs_resume(signal: Signal) -> bool {
    !matches!(
        signal,
        Signal::KILL | Signal::CONT | Signal::STOP | Signal::TSTP | Signal::TTIN | Signal::TTOU
    )
}

/// Whether the process behind `pidfd` has exited (its pidfd is then readable).
fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// File descriptors to spend on pidfds: a quarter of the soft `RLIMIT_NOFILE`, within reason.
pub fn pidfd_budget() -> usize {
    let limit = process::getrlimit(process::Resource::Nofile).current.unwrap_or(1024);
    usize::try_from(limit / 4).unwrap_or(usize::MAX).clamp(64, 16_384)
}

/// Signals this process (torch's File server does so after it reaps; see `server::Config`).
pub fn signal_self(signal: Signal) -> io::Result<()> {
    Ok(process::kill_process(process::getpid(), signal)?)
}

#[cfg(test)]
mod tests;
