//! The loop thread: waits in `epoll_wait` (woken by requests, exits and its alarm), reads
//! the transport, takes in the rings it announced and drains them, runs a pass, reports it.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::process::Pid;
use rustix::time::Timespec;

use super::alarm::{self, Alarm};
use super::pass::{Clock, Phase};
use super::report::{Event, ReapOutcome};
use super::rings::Rings;
use super::{
    Command, Shared, TAG_ALARM, TAG_RING, TAG_TRANSPORT, TAG_TRANSPORT_WATCH, TAG_WAKE, TAG_WORKER,
};
use crate::codec::Request;
use crate::transport::{Arrival, Transport};
use crate::{learned, reaper};

/// How long the loop waits for its events to be reported before it signals its own process.
const REPORT_GRACE: Duration = Duration::from_secs(1);
/// How often, at most, learned statistics are saved while the server runs.
const SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// Asks `transport` to put its endpoint right (its watch fd said it changed), and says what
/// happened.
fn repair(shared: &Shared, transport: &mut dyn Transport, arrivals: &mut Vec<Arrival>) {
    let mut unwatch = |fd: BorrowedFd<'_>| {
        let _ = epoll::delete(&shared.epoll, fd);
    };
    let repaired = transport.repair(arrivals, &mut unwatch);
    if repaired.new_fds {
        watch(shared, transport);
    }
    if let Some(warning) = repaired.warning {
        shared.lock().emit(Event::Warning(warning));
    }
}

/// Adds the transport's fds to the epoll set; false if the transport itself cannot be watched.
fn watch(shared: &Shared, transport: &dyn Transport) -> bool {
    if let Some(fd) = transport.fd() {
        if let Err(err) =
            epoll::add(&shared.epoll, fd, EventData::new_u64(TAG_TRANSPORT), EventFlags::IN)
        {
            shared.lock().emit(Event::Warning(format!("cannot watch the transport: {err}")));
            return false;
        }
    }
    if let Some(fd) = transport.watch_fd() {
        // Without it, a deleted FIFO is not noticed (clients then get BrokenPipeError).
        let watch = EventData::new_u64(TAG_TRANSPORT_WATCH);
        let _ = epoll::add(&shared.epoll, fd, watch, EventFlags::IN);
    }
    true
}

/// Runs the loop until `stop` or `run_once`; returns the transport, closed.
pub(super) fn run(shared: &Shared, mut transport: Box<dyn Transport>) -> Box<dyn Transport> {
    if !watch(shared, transport.as_ref()) {
        transport.close(&mut Vec::new());
        return transport;
    }
    alarm::ask_for_short_slices();
    let mut alarm = match Alarm::new().and_then(|alarm| {
        epoll::add(&shared.epoll, alarm.fd(), EventData::new_u64(TAG_ALARM), EventFlags::IN)?;
        Ok(alarm)
    }) {
        Ok(alarm) => alarm,
        Err(err) => {
            shared.lock().emit(Event::Warning(format!("cannot set the loop's timer: {err}")));
            transport.close(&mut Vec::new());
            return transport;
        }
    };
    let mut ready: Vec<epoll::Event> = Vec::with_capacity(64);
    // What the transport brought, then (rings merged in) what the pass takes in.
    let mut arrivals = Vec::new();
    let mut decoded = Vec::new();
    let mut rings = Rings::new(shared.config.max_pidfds / 2);
    let mut alarm_failed = false;
    loop {
        let (next, deadline) = {
            let mut state = shared.lock();
            state.busy_since = None;
            let next = shared.next_timeout(&state);
            (next.into_iter().chain(rings.next_poll()).min(), state.timers.next_deadline())
        };
        // A deadline within `WAKE_EARLY` is waited out here, then whatever arrived meanwhile
        // (a release just in time) is read before the pass. A timer that cannot be set
        // (reported once) is replaced by a 1 ms timeout.
        let timeout = if let Some(at) = alarm::due_soon(deadline) {
            alarm::spin_until(at);
            Some(Timespec { tv_sec: 0, tv_nsec: 0 })
        } else {
            match alarm.set(alarm::ring_at(next, deadline)) {
                Ok(()) => None,
                Err(err) => {
                    if !alarm_failed {
                        alarm_failed = true;
                        let warning = format!("setting the loop's timer failed: {err}");
                        shared.lock().emit(Event::Warning(warning));
                    }
                    Some(Timespec { tv_sec: 0, tv_nsec: 1_000_000 })
                }
            }
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
        let mut readable = false;
        let mut transport_changed = false;
        let mut exited = Vec::new();
        let mut rings_exited = Vec::new();
        for event in &ready {
            match event.data.u64() {
                TAG_WAKE => {
                    let mut counter = [0u8; 8];
                    let _ = rustix::io::read(&shared.wake, &mut counter);
                }
                TAG_ALARM => alarm.acknowledge(),
                TAG_TRANSPORT => readable = true,
                TAG_TRANSPORT_WATCH => transport_changed = true,
                tag if tag >= TAG_RING => {
                    rings_exited.extend(Pid::from_raw((tag - TAG_RING) as i32))
                }
                tag => exited.extend(Pid::from_raw((tag - TAG_WORKER) as i32)),
            }
        }
        // Only after the wake counter is read: a stop asked for before that read is seen
        // now, and one asked for after it leaves the counter set for the next wait. (Read
        // before, a stop's wake could be taken with an earlier one, and the loop slept on.)
        let command = shared.command.load(Ordering::SeqCst);
        // Stopping, or a last pass: every request already written is read first, so a
        // client whose write succeeded is never lost. The FIFO goes first (if it is still
        // ours), so no new client can open it meanwhile.
        let last = command != Command::Run as u8;
        if last {
            transport.withdraw();
        }
        readable |= last;
        if transport_changed {
            repair(shared, transport.as_mut(), &mut arrivals);
        }
        if readable {
            loop {
                match transport.read(&mut arrivals) {
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
        take_in(shared, &mut rings, &mut arrivals, &mut decoded);
        for pid in rings_exited {
            rings.exited(&shared.epoll, pid, &mut decoded);
        }
        if last {
            rings.close(&shared.epoll, &mut decoded);
        } else {
            rings.drain_all(&shared.epoll, &mut decoded);
        }
        pass(shared, &mut decoded, exited);
        save_learned(shared, last);
        if last {
            if let Some(fd) = transport.fd() {
                let _ = epoll::delete(&shared.epoll, fd);
            }
            if let Some(fd) = transport.watch_fd() {
                let _ = epoll::delete(&shared.epoll, fd);
            }
            let _ = epoll::delete(&shared.epoll, alarm.fd());
            // What was written during this pass, read just before the FIFO closes.
            transport.close(&mut arrivals);
            take_in(shared, &mut rings, &mut arrivals, &mut decoded);
            shared.intake_decoded(&mut shared.lock(), &mut decoded, Clock::now());
            return transport;
        }
    }
}

/// Saves what was learned, if it changed: at most every `SAVE_INTERVAL`, and on stop. The
/// file is written outside the lock (a pass never waits for the disk).
fn save_learned(shared: &Shared, last: bool) {
    let Some(path) = shared.config.adaptive.as_ref().and_then(|a| a.state_file.as_ref()) else {
        return;
    };
    let content = {
        let mut state = shared.lock();
        let now = Instant::now();
        if !state.learned_dirty || !(last || now >= state.next_save) {
            return;
        }
        state.learned_dirty = false;
        state.next_save = now + SAVE_INTERVAL;
        match &state.learner {
            Some(learner) => learner.state_bytes(),
            None => return,
        }
    };
    if let Err(err) = learned::write_state(path, &content) {
        shared.lock().emit(Event::Warning(err.to_string()));
    }
}

/// Moves what the transport brought into `decoded`, in order: a ring announced is taken
/// (the worker's previous ring drained first), and a worker's ring is drained before each
/// request it sent by the transport (it does so only once it left its ring, so its order is
/// kept).
fn take_in(
    shared: &Shared,
    rings: &mut Rings,
    arrivals: &mut Vec<Arrival>,
    decoded: &mut Vec<Result<Request, String>>,
) {
    let mut warnings = Vec::new();
    for arrival in arrivals.drain(..) {
        match arrival {
            Arrival::Request(request) => {
                rings.drain_worker(&shared.epoll, request.pid, decoded);
                decoded.push(Ok(request));
            }
            Arrival::Malformed(reason) => decoded.push(Err(reason)),
            Arrival::Ring(announcement) => {
                warnings.extend(rings.announced(&shared.epoll, announcement, decoded).err());
            }
        }
    }
    if !warnings.is_empty() {
        let mut state = shared.lock();
        for warning in warnings {
            state.emit(Event::Warning(warning));
        }
    }
}

/// One pass under the lock (released at the end, or early to signal this process), and its
/// report.
fn pass(shared: &Shared, decoded: &mut Vec<Result<Request, String>>, exited: Vec<Pid>) {
    let clock = Clock::now();
    let mut state = shared.lock();
    state.busy_since = Some(clock.wall);
    shared.intake_decoded(&mut state, decoded, clock);
    for pid in exited {
        shared.worker_exited(&mut state, pid);
    }
    shared.sweep_exited(&mut state, clock.mono);
    let (expiries, self_signals) = shared.expire(&mut state, clock.mono);
    if !self_signals.is_empty() {
        // (A held `signal_self` may come with no reap of its own: its dumping worker exited.)
        let acked = (!expiries.is_empty()).then(|| {
            let (ack, acked) = mpsc::sync_channel(1);
            state.emit(Event::Expired { expiries, ack: Some(ack) });
            acked
        });
        drop(state);
        if let Some(acked) = acked {
            // Let the reporter log the reap first (bounded: Python may be wedged).
            let _ = acked.recv_timeout(REPORT_GRACE);
        }
        for signal in self_signals {
            let _ = reaper::signal_self(signal);
        }
        return;
    }
    if expiries.is_empty() {
        return;
    }
    let delegated: Vec<Pid> = expiries
        .iter()
        .filter(|e| matches!(e.outcome, ReapOutcome::Delegated))
        .map(|e| e.pid)
        .collect();
    if !state.emit(Event::Expired { expiries, ack: None }) {
        // Nobody will answer these: ask again at the next retry.
        for pid in delegated {
            if let Some(Phase::Retrying { delegated, .. }) = state.phases.get_mut(&pid) {
                *delegated = None;
            }
        }
    }
}
