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
    assert!(matches!(Workers::new(16).expect("/proc").lineage(pid_of(&child), own), Lineage::Gone));
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
    let name = "reaper::tests::with_the_fd_table_full_a_worker_is_reaped_and_never_taken_for_gone";
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
