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
    #[error("pid {0} is the timer server's own process")]
    OwnProcess(i64),
    #[error("signal {0} is not a valid signal number")]
    InvalidSignal(i32),
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

/// Checks that `pid` names one process other than init and this one.
pub fn validate_pid(pid: i64, own_pid: Pid) -> Result<Pid, Refusal> {
    if pid <= 1 {
        return Err(Refusal::ReservedPid(pid));
    }
    let raw = i32::try_from(pid).map_err(|_| Refusal::PidOutOfRange(pid))?;
    let pid_checked = Pid::from_raw(raw).ok_or(Refusal::PidOutOfRange(pid))?;
    if pid_checked == own_pid {
        return Err(Refusal::OwnProcess(pid));
    }
    Ok(pid_checked)
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
}

impl Workers {
    /// `max_pidfds` bounds the file descriptors spent on pidfds; workers past it are signalled by pid.
    pub fn new(max_pidfds: usize) -> Self {
        Self { handles: HashMap::new(), pidfds_available: true, max_pidfds, pidfd_count: 0 }
    }

    /// Starts tracking `pid` when its first timer is registered.
    ///
    /// Returns an error only to report, once, that pidfds are unavailable (the worker is
    /// tracked by pid all the same).
    pub fn track(&mut self, pid: Pid) -> (Tracked<'_>, Option<io::Error>) {
        if self.handles.contains_key(&pid) {
            return (Tracked::Known, None);
        }
        let mut fallback_reason = None;
        let handle = if self.pidfds_available && self.pidfd_count < self.max_pidfds {
            match process::pidfd_open(pid, PidfdFlags::empty()) {
                Ok(fd) => Handle::Pidfd(fd),
                Err(rustix::io::Errno::SRCH) => return (Tracked::Gone, None),
                Err(err @ (rustix::io::Errno::NOSYS | rustix::io::Errno::PERM)) => {
                    self.pidfds_available = false;
                    fallback_reason = Some(err.into());
                    Handle::Pid { started: None }
                }
                Err(err) => {
                    fallback_reason = Some(err.into());
                    Handle::Pid { started: None }
                }
            }
        } else {
            if !is_alive(pid) {
                return (Tracked::Gone, None);
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
            Handle::Pidfd(fd) => (Tracked::New(fd.as_fd()), fallback_reason),
            Handle::Pid { .. } => (Tracked::Known, fallback_reason),
        }
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
    pub fn signal(&self, pid: Pid, signal: Signal) -> Outcome {
        let sent = match self.handles.get(&pid) {
            Some(Handle::Pidfd(fd)) => process::pidfd_send_signal(fd, signal),
            Some(Handle::Pid { started }) => {
                // The worker exited and its pid may have been reused: not the same process.
                if started.is_some() && start_time(pid) != *started {
                    return Outcome::Gone;
                }
                process::kill_process(pid, signal)
            }
            // Never seen alive: whatever has this pid now is not the worker that registered.
            None => return Outcome::Gone,
        };
        match sent {
            Ok(()) => Outcome::Signalled,
            Err(rustix::io::Errno::SRCH) => Outcome::Gone,
            Err(err) => Outcome::Failed(err.into()),
        }
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
fn start_time(pid: Pid) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
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
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().expect("spawn sleep")
    }

    fn pid_of(child: &Child) -> Pid {
        Pid::from_raw(child.id() as i32).expect("child pid")
    }

    #[test]
    fn refuses_pids_that_are_not_one_other_process() {
        let own = process::getpid();
        for pid in [-1, 0, 1, -3, i64::from(i32::MIN)] {
            assert_eq!(validate_pid(pid, own), Err(Refusal::ReservedPid(pid)));
        }
        assert_eq!(
            validate_pid(i64::from(i32::MAX) + 1, own),
            Err(Refusal::PidOutOfRange(i64::from(i32::MAX) + 1))
        );
        let own_raw = i64::from(own.as_raw_nonzero().get());
        assert_eq!(validate_pid(own_raw, own), Err(Refusal::OwnProcess(own_raw)));
        assert_eq!(validate_pid(4242, own).map(Pid::as_raw_nonzero).map(|p| p.get()), Ok(4242));
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
