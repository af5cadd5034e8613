//! The loop's alarm: a timerfd in its epoll set, armed at the next wake-up to the
//! nanosecond (epoll's own timeout counts whole milliseconds, and rounding it up made every
//! signal about a millisecond late). For a timer's deadline it rings [`WAKE_EARLY`] before,
//! and the loop waits out the rest on its CPU ([`spin_until`]).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::time::{
    clock_gettime, timerfd_create, timerfd_settime, ClockId, Itimerspec, TimerfdClockId,
    TimerfdFlags, TimerfdTimerFlags, Timespec,
};

const NANOS_PER_SEC: u128 = 1_000_000_000;

pub(super) struct Alarm {
    fd: OwnedFd,
    /// What it is armed for, so an unchanged deadline costs no system call.
    armed: Option<Instant>,
}

impl Alarm {
    pub fn new() -> io::Result<Self> {
        let flags = TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK;
        Ok(Self { fd: timerfd_create(TimerfdClockId::Monotonic, flags)?, armed: None })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Arms it to ring at `at` (at once if that has passed), or disarms it (None).
    pub fn set(&mut self, at: Option<Instant>) -> io::Result<()> {
        if at == self.armed {
            return Ok(());
        }
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        let it_value = match at {
            Some(at) => absolute_monotonic(at),
            None => zero,
        };
        let spec = Itimerspec { it_interval: zero, it_value };
        timerfd_settime(&self.fd, TimerfdTimerFlags::ABSTIME, &spec)?;
        self.armed = at;
        Ok(())
    }

    /// Clears a ring (the loop woke for it): it rings again only once armed again.
    pub fn acknowledge(&mut self) {
        let mut expirations = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut expirations);
        self.armed = None;
    }
}

/// How long before a timer's deadline the loop wakes. Waking a sleeping thread costs about
/// 0.1-0.3 ms when its CPU is idle (more in a VM, whose idle vCPU is halted), and every
/// signal would be that late; the early wake-up pays it before the deadline instead, for
/// at most this much CPU per expiry (a timer released in time costs nothing).
pub(super) const WAKE_EARLY: Duration = Duration::from_micros(300);

/// When the alarm rings for the loop's next wake-up `next`, given the earliest timer
/// deadline `deadline` (one of the wake-ups `next` is the first of).
pub(super) fn ring_at(next: Option<Instant>, deadline: Option<Instant>) -> Option<Instant> {
    let early = deadline.map(|at| at.checked_sub(WAKE_EARLY).unwrap_or(at));
    next.into_iter().chain(early).min()
}

/// The deadline to wait out on the CPU now, if `deadline` is still ahead but within
/// `WAKE_EARLY`.
pub(super) fn due_soon(deadline: Option<Instant>) -> Option<Instant> {
    let now = Instant::now();
    deadline.filter(|&at| at > now && at - now <= WAKE_EARLY)
}

/// Waits on the CPU until `at` (at most `WAKE_EARLY`; no lock is held).
pub(super) fn spin_until(at: Instant) {
    while Instant::now() < at {
        std::hint::spin_loop();
    }
}

/// The slice the loop thread asks the scheduler for: a thread woken with a short slice runs
/// before one in the middle of a long one (EEVDF, Linux 6.12 on), instead of after up to
/// the default 3 ms.
const SLICE_NS: u64 = 100_000;

/// Asks for short scheduler slices for the calling thread (the loop: it runs for
/// microseconds per wake, and a wake may be a deadline). Its policy and nice value stay as
/// they are, no privilege is needed, and a kernel without custom slices ignores or refuses
/// it: nothing else changes.
pub(super) fn ask_for_short_slices() {
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    // SAFETY: plain queries and a sched_setattr(2) of the calling thread with a valid,
    // fully initialised struct of the size it states.
    unsafe {
        if libc::sched_getscheduler(0) != libc::SCHED_OTHER {
            return;
        }
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return;
        }
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: libc::SCHED_OTHER as u32,
            flags: 0,
            nice,
            priority: 0,
            runtime: SLICE_NS,
            deadline: 0,
            period: 0,
        };
        libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0);
    }
}

/// `at` on `CLOCK_MONOTONIC` (what `Instant` counts on Linux, though it does not say how
/// much): now, read on both, plus what is left. Never zero, which would disarm the timer.
fn absolute_monotonic(at: Instant) -> Timespec {
    let now = clock_gettime(ClockId::Monotonic);
    let left = at.saturating_duration_since(Instant::now()).as_nanos();
    let nanos = (now.tv_sec as u128 * NANOS_PER_SEC + now.tv_nsec as u128 + left).max(1);
    Timespec {
        tv_sec: i64::try_from(nanos / NANOS_PER_SEC).unwrap_or(i64::MAX),
        tv_nsec: (nanos % NANOS_PER_SEC) as _,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rang(alarm: &Alarm, within: Duration) -> bool {
        let mut fds = [rustix::event::PollFd::new(&alarm.fd, rustix::event::PollFlags::IN)];
        let timeout =
            Timespec { tv_sec: within.as_secs() as _, tv_nsec: within.subsec_nanos() as _ };
        rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 1
    }

    #[test]
    fn rings_at_the_deadline_not_before() {
        let mut alarm = Alarm::new().unwrap();
        let at = Instant::now() + Duration::from_millis(30);
        alarm.set(Some(at)).unwrap();
        assert!(rang(&alarm, Duration::from_secs(5)));
        assert!(Instant::now() >= at);
        alarm.acknowledge();
        assert!(!rang(&alarm, Duration::ZERO));
    }

    #[test]
    fn a_deadline_rings_early_and_is_waited_out_to_the_instant() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(1);
        let sweep = now + Duration::from_millis(100);
        assert_eq!(ring_at(Some(deadline), Some(deadline)), Some(deadline - WAKE_EARLY));
        assert_eq!(ring_at(Some(sweep), Some(deadline)), Some(sweep));
        assert_eq!(ring_at(Some(sweep), None), Some(sweep));
        assert_eq!(due_soon(Some(deadline)), None);
        assert_eq!(due_soon(Some(now - Duration::from_millis(1))), None, "past: expire at once");
        let soon = Instant::now() + WAKE_EARLY / 2;
        assert_eq!(due_soon(Some(soon)), Some(soon));
        spin_until(soon);
        assert!(Instant::now() >= soon);
    }

    #[test]
    fn a_past_deadline_rings_at_once_and_none_disarms() {
        let mut alarm = Alarm::new().unwrap();
        alarm.set(Some(Instant::now() - Duration::from_secs(1))).unwrap();
        assert!(rang(&alarm, Duration::from_millis(500)));
        alarm.acknowledge();
        alarm.set(Some(Instant::now() + Duration::from_millis(20))).unwrap();
        alarm.set(None).unwrap();
        assert!(!rang(&alarm, Duration::from_millis(60)));
    }
}
