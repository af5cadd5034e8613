//! Signals workers, and only workers.
//!
//! torch calls `os.kill(pid, signal)` with whatever pid a request names, so a request naming
//! pid -1 kills every process of the user. Here a pid must name one other process, and where
//! the kernel has pidfds each worker is signalled through a pidfd opened when its first timer
//! was registered: a worker that exited and whose pid was reused is never hit.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::process::{self, Pid, PidfdFlags, Signal};

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
    /// A pidfd: signals go to exactly the process that registered, and it reports the exit.
    Pidfd(OwnedFd),
    /// No pidfd (old kernel, or past the budget): signal by pid, but only while the process
    /// with that pid is still the one that registered (same start time).
    Pid { started: Option<u64> },
}

/// Where a tracked worker stands relative to the server's process (see [`Workers::lineage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lineage {
    Descendant,
    NotDescendant,
    /// The worker has exited (or its pid now names another process).
    Gone,
}

/// Parents followed at most when looking for an ancestor (process trees are far shallower).
const MAX_LINEAGE_DEPTH: usize = 4096;

/// What `Workers::track` found.
#[derive(Debug)]
pub enum Tracked<'a> {
    /// A new pidfd the caller should watch: it becomes readable when the worker exits.
    New(BorrowedFd<'a>),
    /// Already tracked, or tracked without a pidfd.
    Known,
    /// There is no such process: its requests can be dropped.
    Gone,
}

/// The workers the server has seen, each with its pidfd.
#[derive(Debug)]
pub struct Workers {
    handles: HashMap<Pid, Handle>,
    pidfds_available: bool,
    max_pidfds: usize,
    pidfd_count: usize,
    /// Each reason for signalling by pid is reported once, not once per worker.
    warned_unavailable: bool,
    warned_budget: bool,
}

impl Workers {
    /// `max_pidfds` bounds the file descriptors spent on pidfds; workers past it are signalled by pid.
    pub fn new(max_pidfds: usize) -> Self {
        Self {
            handles: HashMap::new(),
            pidfds_available: true,
            max_pidfds,
            pidfd_count: 0,
            warned_unavailable: false,
            warned_budget: false,
        }
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
        let handle = if self.pidfds_available && self.pidfd_count < self.max_pidfds {
            match process::pidfd_open(pid, PidfdFlags::empty()) {
                Ok(fd) => Handle::Pidfd(fd),
                Err(rustix::io::Errno::SRCH) => return (Tracked::Gone, None),
                Err(err) => {
                    // ENOSYS or EPERM (an old kernel, a seccomp filter): none will open. Others
                    // (EMFILE, ENOMEM) may pass: try again for the next worker.
                    if matches!(err, rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) {
                        self.pidfds_available = false;
                    }
                    if !self.warned_unavailable {
                        self.warned_unavailable = true;
                        warning = Some(format!(
                            "pidfds unavailable ({}); signalling workers by pid, checked \
                             against their start time (reported once)",
                            io::Error::from(err)
                        ));
                    }
                    Handle::Pid { started: None }
                }
            }
        } else {
            if !is_alive(pid) {
                return (Tracked::Gone, None);
            }
            if self.pidfds_available && !self.warned_budget {
                self.warned_budget = true;
                warning = Some(format!(
                    "more than {} workers: further workers are signalled by pid, checked \
                     against their start time (reported once)",
                    self.max_pidfds
                ));
            }
            Handle::Pid { started: None }
        };
        let handle = match handle {
            // Record who registered, so a reused pid is told apart at signal time.
            Handle::Pid { started: None } => Handle::Pid { started: start_time(pid) },
            handle => handle,
        };
        if matches!(handle, Handle::Pidfd(_)) {
            self.pidfd_count += 1;
        }
        let handle: &Handle = self.handles.entry(pid).or_insert(handle);
        match handle {
            Handle::Pidfd(fd) => (Tracked::New(fd.as_fd()), warning),
            Handle::Pid { .. } => (Tracked::Known, warning),
        }
    }

    pub fn is_tracked(&self, pid: Pid) -> bool {
        self.handles.contains_key(&pid)
    }

    /// The pidfd of a tracked worker, if it has one.
    pub fn pidfd(&self, pid: Pid) -> Option<BorrowedFd<'_>> {
        match self.handles.get(&pid)? {
            Handle::Pidfd(fd) => Some(fd.as_fd()),
            Handle::Pid { .. } => None,
        }
    }

    /// Whether the tracked worker `pid` descends from `ancestor`: its chain of parents
    /// (`/proc/<pid>/stat` field 4) reaches `ancestor` before init.
    ///
    /// The `/proc` entry read is the worker's and not that of a process that took its pid
    /// since: with a pidfd, the worker is still running after the read; without, the entry
    /// has the start time recorded when it was tracked.
    pub fn lineage(&self, pid: Pid, ancestor: Pid) -> Lineage {
        let Some(stat) = Stat::read(pid.as_raw_nonzero().get()) else { return Lineage::Gone };
        match self.handles.get(&pid) {
            Some(Handle::Pidfd(fd)) if has_exited(fd) => return Lineage::Gone,
            Some(Handle::Pid { started: Some(started) }) if *started != stat.start_time => {
                return Lineage::Gone
            }
            None => return Lineage::Gone,
            Some(_) => {}
        }
        let ancestor = ancestor.as_raw_nonzero().get();
        let mut parent = stat.ppid;
        for _ in 0..MAX_LINEAGE_DEPTH {
            if parent == ancestor {
                return Lineage::Descendant;
            }
            if parent <= 1 {
                return Lineage::NotDescendant;
            }
            // A parent that exits meanwhile leaves its children to init (or a subreaper):
            // the worker is then no longer our descendant.
            match Stat::read(parent) {
                Some(stat) => parent = stat.ppid,
                None => return Lineage::NotDescendant,
            }
        }
        Lineage::NotDescendant
    }

    /// Stops tracking `pid` (it exited); returns its pidfd so the caller can unwatch it.
    pub fn forget(&mut self, pid: Pid) -> Option<OwnedFd> {
        match self.handles.remove(&pid)? {
            Handle::Pidfd(fd) => {
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
    /// the pending signal is delivered. SIGKILL needs no help.
    pub fn signal(&self, pid: Pid, signal: Signal) -> Outcome {
        let stopped = needs_resume(signal)
            && Stat::read(pid.as_raw_nonzero().get()).is_some_and(|stat| stat.state == 'T');
        let send = |signal| match self.handles.get(&pid) {
            Some(Handle::Pidfd(fd)) => Some(process::pidfd_send_signal(fd, signal)),
            Some(Handle::Pid { started }) => {
                // The worker exited and its pid may have been reused: not the same process.
                if started.is_some() && start_time(pid) != *started {
                    return None;
                }
                Some(process::kill_process(pid, signal))
            }
            // Never seen alive: whatever has this pid now is not the worker that registered.
            None => None,
        };
        let sent = match send(signal) {
            Some(sent) => sent,
            None => return Outcome::Gone,
        };
        if sent.is_ok() && stopped {
            // Its failure changes nothing: the signal was sent.
            let _ = send(Signal::CONT);
        }
        match sent {
            Ok(()) => Outcome::Signalled,
            Err(rustix::io::Errno::SRCH) => Outcome::Gone,
            Err(err) => Outcome::Failed(err.into()),
        }
    }

    /// Whether the tracked worker `pid` is still running (not exited, not a zombie).
    pub fn is_running(&self, pid: Pid) -> bool {
        match self.handles.get(&pid) {
            Some(Handle::Pidfd(fd)) => !has_exited(fd),
            Some(Handle::Pid { started }) => Stat::read(pid.as_raw_nonzero().get())
                .is_some_and(|stat| stat.state != 'Z' && Some(stat.start_time) == *started),
            None => false,
        }
    }

    /// How many workers are tracked without a pidfd (their exits announce themselves nowhere).
    pub fn without_pidfd(&self) -> usize {
        self.handles.len() - self.pidfd_count
    }

    /// The workers tracked without a pidfd that no longer run (exited, a zombie, or their pid
    /// now names a later process): the loop asks for them, since no fd reports their exit.
    pub fn exited_without_pidfd(&self) -> Vec<Pid> {
        self.handles
            .iter()
            .filter(|(_, handle)| matches!(handle, Handle::Pid { .. }))
            .map(|(&pid, _)| pid)
            .filter(|&pid| !self.is_running(pid))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// A process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22): with the pid,
/// it names one process for good. None if there is no such process (or no /proc).
pub fn start_time(pid: Pid) -> Option<u64> {
    Some(Stat::read(pid.as_raw_nonzero().get())?.start_time)
}

/// What `/proc` says of a process that will not die: its name, state, where it waits in the
/// kernel and (readable by root) its kernel stack.
pub fn describe(pid: Pid) -> String {
    let proc = format!("/proc/{}", pid.as_raw_nonzero());
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim).unwrap_or("?")
    };
    let mut description =
        format!("{} (pid {}): state {}", field("Name:"), pid.as_raw_nonzero(), field("State:"));
    if let Ok(wchan) = std::fs::read_to_string(format!("{proc}/wchan")) {
        if !wchan.is_empty() && wchan != "0" {
            description.push_str(&format!(", waiting in {wchan}"));
        }
    }
    if let Ok(stack) = std::fs::read_to_string(format!("{proc}/stack")) {
        let frames: Vec<&str> = stack.lines().take(8).map(str::trim).collect();
        if !frames.is_empty() {
            description.push_str(&format!(", kernel stack: {}", frames.join(" < ")));
        }
    }
    description
}

/// The fields of `/proc/<pid>/stat` the reaper reads.
#[derive(Debug)]
struct Stat {
    /// Field 3: `R`, `S`, `D`, `T` (stopped), `t` (traced), `Z`, ...
    state: char,
    /// Field 4: the parent's pid.
    ppid: i32,
    /// Field 22: clock ticks since boot.
    start_time: u64,
}

impl Stat {
    /// None if there is no such process (or no /proc).
    fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count from its end.
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        let start_time = fields.nth(17)?.parse().ok()?;
        Some(Self { state, ppid, start_time })
    }
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

fn is_alive(pid: Pid) -> bool {
    !matches!(process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
}

/// Signals this process (torch's File server does so after it reaps; see `server::Config`).
pub fn signal_self(signal: Signal) -> io::Result<()> {
    Ok(process::kill_process(process::getpid(), signal)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{pid_of, shell_once_it_says, sleeper};
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
        let mut workers = Workers::new(16);
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
        let mut workers = Workers::new(1);
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
        let mut workers = Workers::new(16);
        assert!(matches!(workers.track(pid).0, Tracked::Gone));
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Gone));
    }

    #[test]
    fn pidfd_reports_the_exit() {
        let mut child = sleeper();
        let pid = pid_of(&child);
        let mut workers = Workers::new(16);
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

    fn state_of(pid: Pid) -> Option<char> {
        Stat::read(pid.as_raw_nonzero().get()).map(|stat| stat.state)
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
            let mut workers = Workers::new(max_pidfds);
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
        let mut workers = Workers::new(16);
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
        let mut workers = Workers::new(16);
        // A child, and a grandchild (the shell's child).
        let mut child = sleeper();
        let (mut shell, line) = shell_once_it_says("sleep 30 & echo $!; wait");
        let grandchild = Pid::from_raw(line.trim().parse().expect("pid")).expect("pid");
        for pid in [pid_of(&child), grandchild] {
            let _ = workers.track(pid);
            assert_eq!(workers.lineage(pid, own), Lineage::Descendant);
        }
        // Our own parent is not our descendant (it is tracked, never signalled).
        let parent = process::getppid().expect("a parent");
        let _ = workers.track(parent);
        assert_eq!(workers.lineage(parent, own), Lineage::NotDescendant);
        // Nor is the server's own process (it may time itself, but not as a descendant).
        let _ = workers.track(own);
        assert_eq!(workers.lineage(own, own), Lineage::NotDescendant);
        // Untracked, or exited: gone.
        assert_eq!(Workers::new(16).lineage(pid_of(&child), own), Lineage::Gone);
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(workers.lineage(pid_of(&child), own), Lineage::Gone);
        process::kill_process(grandchild, Signal::KILL).expect("kill grandchild");
        shell.wait().expect("wait");
    }

    #[test]
    fn falling_back_to_signalling_by_pid_is_reported_once() {
        let mut children: Vec<Child> = (0..3).map(|_| sleeper()).collect();
        let mut workers = Workers::new(1);
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
        let started = start_time(pid).expect("a live child has a start time");
        assert_eq!(start_time(pid), Some(started), "stable");
        let mut workers = Workers::new(0); // no pidfds: by pid only
        assert!(matches!(workers.track(pid).0, Tracked::Known));
        // Pretend the worker exited and another process took its pid.
        workers.handles.insert(pid, Handle::Pid { started: Some(started + 1) });
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Gone));
        assert!(child.try_wait().expect("try_wait").is_none(), "the other process was not hit");
        workers.handles.insert(pid, Handle::Pid { started: Some(started) });
        assert!(matches!(workers.signal(pid, Signal::KILL), Outcome::Signalled));
        assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
        assert!((64..=16_384).contains(&pidfd_budget()));
    }
}
