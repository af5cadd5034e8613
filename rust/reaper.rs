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
mod tests {
    use super::*;
    use crate::test_support::{fill_fd_table, in_own_process, pid_of, shell_once_it_says, sleeper};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    #[test]
    fn refuses_pids_that_are_not_one_process() {
        for pid in [-1, 0, 1, -3, i64::from(i32::MIN)] {
            assert_eq!(validate_pid(pid), Err(Refusal::ReservedPid(pid)));
        }
        assert_eq!(
            validate_pid(i64::from(i32::MAX) + 1),
            Err(Refusal::PidOutOfRange(i64::from(i32::MAX) + 1))
        );
        let own = i64::from(process::getpid().as_raw_nonzero().get());
        assert_eq!(validate_pid(own).map(Pid::as_raw_nonzero).map(|p| i64::from(p.get())), Ok(own));
        assert_eq!(validate_pid(4242).map(Pid::as_raw_nonzero).map(|p| p.get()), Ok(4242));
    }

    #[test]
    fn refuses_signal_numbers_the_kernel_does_not_know() {
        for signal in [-9, 0, libc::SIGRTMAX() + 1, 1000] {
            assert_eq!(validate_signal(signal).err(), Some(Refusal::InvalidSignal(signal)));
        }
        assert_eq!(validate_signal(9).map(Signal::as_raw), Ok(9));
        assert_eq!(validate_signal(libc::SIGRTMAX()).map(Signal::as_raw), Ok(libc::SIGRTMAX()));
    }

    #[test]
    fn signals_a_tracked_child_through_its_pidfd() {
        let mut child = sleeper();
        let pid = pid_of(&child);
        let mut workers = workers(16);
        assert!(matches!(workers.track(pid).0, Tracked::New(_)));
        assert!(matches!(workers.track(pid).0, Tracked::Known));
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Signalled));
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped and gone: a second signal reaches nobody, even if the pid is reused.
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Gone));
        assert!(workers.forget(pid).is_some());
        assert!(workers.is_empty());
    }

    #[test]
    fn falls_back_to_kill_past_the_pidfd_budget() {
        let mut first = sleeper();
        let mut second = sleeper();
        let mut workers = workers(1);
        assert!(matches!(workers.track(pid_of(&first)).0, Tracked::New(_)));
        assert!(matches!(workers.track(pid_of(&second)).0, Tracked::Known));
        assert!(matches!(workers.signal(pid_of(&second), Signal::TERM), Outcome::Signalled));
        assert_eq!(second.wait().expect("wait").signal(), Some(libc::SIGTERM));
        assert!(workers.forget(pid_of(&second)).is_none());
        assert_eq!(workers.len(), 1);
        first.kill().expect("kill");
        first.wait().expect("wait");
    }

    #[test]
    fn an_exited_worker_is_gone_and_never_signalled() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = pid_of(&child);
        child.wait().expect("wait");
        let mut workers = workers(16);
        assert!(matches!(workers.track(pid).0, Tracked::Gone));
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Gone));
    }

    #[test]
    fn pidfd_reports_the_exit() {
        let mut child = sleeper();
        let pid = pid_of(&child);
        let mut workers = workers(16);
        let (tracked, _) = workers.track(pid);
        let Tracked::New(fd) = tracked else { panic!("expected a pidfd") };
        let fd = fd.try_clone_to_owned().expect("dup");
        child.kill().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        while Instant::now() < deadline {
            if rustix::event::poll(&mut fds, None).expect("poll") == 1 {
                break;
            }
        }
        assert!(fds[0].revents().contains(rustix::event::PollFlags::IN));
        child.wait().expect("wait");
    }

    fn workers(max_pidfds: usize) -> Workers {
        Workers::new(max_pidfds).expect("/proc")
    }

    fn state_of(pid: Pid) -> Option<char> {
        Proc::open().expect("/proc").stat(pid).expect("an answer").map(|stat| stat.state)
    }

    fn stopped_sleeper() -> Child {
        let child = sleeper();
        process::kill_process(pid_of(&child), Signal::STOP).expect("SIGSTOP");
        let deadline = Instant::now() + Duration::from_secs(5);
        while state_of(pid_of(&child)) != Some('T') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(state_of(pid_of(&child)), Some('T'));
        child
    }

    #[test]
    fn a_stopped_worker_is_continued_so_it_acts_on_a_catchable_signal() {
        // Through a pidfd, and by pid (no pidfds at all).
        for max_pidfds in [16, 0] {
            let mut child = stopped_sleeper();
            let pid = pid_of(&child);
            let mut workers = Workers::new(max_pidfds).expect("/proc");
            let _ = workers.track(pid);
            assert!(matches!(workers.signal(pid, Signal::TERM), Outcome::Signalled));
            // Without the SIGCONT it would stay stopped, SIGTERM pending, for good.
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = child.kill();
            assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGTERM), "{max_pidfds}");
        }
        // A stop signal is not undone by a SIGCONT. (The child gets a process group of its
        // own, whose parent is in another: the kernel drops SIGTSTP sent to an orphaned group,
        // as ours may be when the tests run from a background job.)
        let mut child =
            std::os::unix::process::CommandExt::process_group(&mut Command::new("sleep"), 0)
                .arg("30")
                .spawn()
                .expect("spawn sleep");
        let pid = pid_of(&child);
        let mut workers = workers(16);
        let _ = workers.track(pid);
        assert!(matches!(workers.signal(pid, Signal::TSTP), Outcome::Signalled));
        let deadline = Instant::now() + Duration::from_secs(5);
        while state_of(pid) != Some('T') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(state_of(pid), Some('T'));
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[test]
    fn lineage_follows_the_parent_chain() {
        let own = process::getpid();
        let mut workers = workers(16);
        // A child, and a grandchild (the shell's child).
        let mut child = sleeper();
        let (mut shell, line) = shell_once_it_says("sleep 30 & echo $!; wait");
        let grandchild = Pid::from_raw(line.trim().parse().expect("pid")).expect("pid");
        for pid in [pid_of(&child), grandchild] {
            let _ = workers.track(pid);
            assert!(matches!(workers.lineage(pid, own), Lineage::Descendant));
        }
        // Our own parent is not our descendant (it is tracked, never signalled).
        let parent = process::getppid().expect("a parent");
        let _ = workers.track(parent);
        assert!(matches!(workers.lineage(parent, own), Lineage::NotDescendant));
        // Nor is the server's own process (it may time itself, but not as a descendant).
        let _ = workers.track(own);
        assert!(matches!(workers.lineage(own, own), Lineage::NotDescendant));
        // Untracked, or exited: gone.
        assert!(matches!(
            Workers::new(16).expect("/proc").lineage(pid_of(&child), own),
            Lineage::Gone
        ));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(matches!(workers.lineage(pid_of(&child), own), Lineage::Gone));
        process::kill_process(grandchild, Signal::KILL).expect("kill grandchild");
        shell.wait().expect("wait");
    }

    #[test]
    fn falling_back_to_signalling_by_pid_is_reported_once() {
        let mut children: Vec<Child> = (0..3).map(|_| sleeper()).collect();
        let mut workers = workers(1);
        let warnings: Vec<Option<String>> =
            children.iter().map(|child| workers.track(pid_of(child)).1).collect();
        assert!(warnings[0].is_none(), "the first worker has a pidfd");
        assert!(warnings[1].as_deref().is_some_and(|w| w.contains("more than 1 workers")));
        assert!(warnings[2].is_none(), "reported once");
        for child in &mut children {
            child.kill().expect("kill");
            child.wait().expect("wait");
        }
    }

    #[test]
    fn a_worker_tracked_by_pid_is_known_by_its_start_time() {
        let mut child = sleeper();
        let pid = pid_of(&child);
        let mut workers = workers(0); // no pidfds: by pid only
        assert!(matches!(workers.track(pid).0, Tracked::Known));
        let started = workers.start_time(pid).expect("an answer").expect("a start time");
        // Pretend the worker exited and another process took its pid.
        let other = Handle::Pid { started: Some(started + 1), retry_pidfd: false };
        workers.handles.insert(pid, other);
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Gone));
        assert!(child.try_wait().expect("try_wait").is_none(), "the other process was not hit");
        workers.handles.insert(pid, Handle::Pid { started: Some(started), retry_pidfd: false });
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Signalled));
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
        assert!((64..=16_384).contains(&pidfd_budget()));
    }

    #[test]
    fn with_the_fd_table_full_a_worker_is_reaped_and_never_taken_for_gone() {
        let name =
            "reaper::tests::with_the_fd_table_full_a_worker_is_reaped_and_never_taken_for_gone";
        if !in_own_process(name) {
            return;
        }
        let mut child = sleeper();
        let mut later = sleeper();
        let pid = pid_of(&child);
        let mut workers = workers(16);
        let mut held = fill_fd_table(64);
        // No pidfd opens: tracked by pid, its start time read through the reserved slot.
        let (tracked, warning) = workers.track(pid);
        assert!(matches!(tracked, Tracked::Known));
        assert!(warning.is_some_and(|w| w.contains("cannot open a pidfd")));
        assert!(matches!(workers.track(pid_of(&later)).0, Tracked::Known));
        assert!(matches!(workers.liveness(pid), Liveness::Running));
        // Once another fd takes the reserved slot there is no answer: unknown, not gone.
        drop(workers.proc.spare.borrow_mut().take());
        held.push(rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 0).expect("the freed slot"));
        let Liveness::Unknown(err) = workers.liveness(pid) else { panic!("not unknown") };
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
        let sweep = workers.sweep();
        assert!(sweep.exited.is_empty(), "an unreadable worker is kept");
        assert!(sweep.unknown.is_some());
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Failed(_)));
        assert!(child.try_wait().expect("try_wait").is_none(), "not signalled blind");
        // One slot free: read, and the slot is held in reserve again; the reap goes through
        // with the table full once more.
        drop(held.pop());
        assert!(matches!(workers.liveness(pid), Liveness::Running));
        assert!(workers.proc.spare.borrow().is_some(), "the reserve is taken again");
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Signalled));
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
        assert!(matches!(workers.liveness(pid), Liveness::Gone));
        let sweep = workers.sweep();
        assert_eq!(sweep.exited, [pid]);
        assert!(sweep.to_watch.is_empty(), "no slot for a pidfd yet");
        // Once fds are free, the other worker gets its pidfd (for the caller to watch).
        held.truncate(held.len() - 2);
        workers.forget(pid);
        assert_eq!(workers.sweep().to_watch, [pid_of(&later)]);
        assert!(workers.pidfd(pid_of(&later)).is_some());
        assert!(matches!(workers.signal(pid_of(&later), Signal::TERM), Outcome::Signalled));
        assert_eq!(later.wait().expect("wait").signal(), Some(libc::SIGTERM));
    }
}
