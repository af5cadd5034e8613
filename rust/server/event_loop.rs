//! The loop thread: waits in `epoll_wait` (woken by requests, exits and its alarm), reads
//! the transport, runs a pass, reports it.

use std::io;
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
use super::rings::{Arrivals, Rings};
use super::{
    Command, Shared, TAG_ALARM, TAG_FIFO_WATCH, TAG_RING, TAG_SOURCE, TAG_WAKE, TAG_WORKER,
};
use crate::codec::{self, Request};
use crate::learned;
use crate::{fifo, queue, reaper, ring};

/// How long the loop waits for its events to be reported before it signals its own process.
const REPORT_GRACE: Duration = Duration::from_secs(1);
/// How often, at most, learned statistics are saved while the server runs.
const SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// Where requests come from, as the server holds it (opened while the loop runs).
pub(super) enum Source {
    Fifo(fifo::Endpoint),
    Queue(queue::Reader),
    Direct,
}

impl Source {
    /// Makes the transport ready for the loop (the FIFO is opened, and created again if
    /// stop removed it; the queue is marked). Returns a warning if it works without rings.
    pub fn open(&mut self) -> io::Result<Option<String>> {
        match self {
            Source::Fifo(endpoint) => endpoint.open().map(|()| None),
            Source::Queue(reader) => Ok(reader.mark().err().map(|err| {
                format!("cannot mark the queue for our clients ({err}): they send no rings")
            })),
            Source::Direct => Ok(None),
        }
    }

    /// Reads the last requests; the FIFO is closed right after its last read, so a client
    /// writing later gets `EPIPE` (and opens the path again) instead of writing into a pipe
    /// about to be closed unread.
    fn close(&mut self, decoded: &mut Arrivals) {
        match self {
            Source::Fifo(endpoint) => endpoint.close(|line| decode_line(line, decoded)),
            source => {
                while matches!(source.read(decoded), Ok(n) if n > 0) {}
                if let Source::Queue(reader) = source {
                    reader.unmark();
                }
            }
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Source::Fifo(endpoint) => endpoint.fd(),
            Source::Queue(reader) => Some(reader.fd()),
            Source::Direct => None,
        }
    }

    fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Source::Fifo(endpoint) => endpoint.watch_fd(),
            _ => None,
        }
    }

    /// Reads and decodes what is available; returns how many bytes or frames were read.
    fn read(&mut self, arrivals: &mut Arrivals) -> io::Result<usize> {
        match self {
            Source::Fifo(endpoint) => endpoint.read_lines(|line| decode_line(line, arrivals)),
            Source::Queue(reader) => reader.read_frames(|frame| decode_frame(frame, arrivals)),
            Source::Direct => Ok(0),
        }
    }

    /// After the watch said the FIFO's path changed: repairs it, and says what happened.
    fn repair_fifo(&mut self, shared: &Shared, decoded: &mut Arrivals) {
        let Source::Fifo(endpoint) = self else { return };
        let unwatch = |fd: BorrowedFd<'_>| {
            let _ = epoll::delete(&shared.epoll, fd);
        };
        let path = endpoint.path().display().to_string();
        let warning = match endpoint.repair(|line| decode_line(line, decoded), unwatch) {
            fifo::Repair::Ours => return,
            fifo::Repair::TakenOver => format!(
                "{path} is now another FIFO (another timer server?): new requests go to that \
                 one, and this server no longer removes it on stop"
            ),
            fifo::Repair::Recreated(what) => {
                watch(shared, self);
                format!("{path} {what}; created it again")
            }
            fifo::Repair::Failed(what, err) => format!(
                "{path} {what}, and creating it again failed: {err}; clients cannot reach this \
                 server"
            ),
        };
        shared.lock().emit(Event::Warning(warning));
    }
}

/// Decodes one FIFO line: a request, or a worker's ring announcement. A line that does not
/// decode but ends with a client's request (written after someone left garbage without a
/// newline) costs only the garbage.
fn decode_line(line: fifo::Line<'_>, arrivals: &mut Arrivals) {
    if let fifo::Line::Complete(bytes) = line {
        if let Some(announcement) = ring::parse_announcement(bytes) {
            return arrivals.rings.push((arrivals.requests.len(), announcement));
        }
    }
    let requests = &mut arrivals.requests;
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

/// Decodes one queue item: a request, a worker's ring announcement (in the scope of a
/// release), or a wake-up for the rings (nothing to register).
fn decode_frame(frame: queue::Frame<'_>, arrivals: &mut Arrivals) {
    let request = match frame {
        queue::Frame::Payload(bytes) => codec::decode_pickle(bytes).map_err(|err| err.to_string()),
        queue::Frame::TooLarge(n) => Err(format!("queue item of {n} bytes is not a timer request")),
        queue::Frame::Corrupt { claimed, dropped } => Err(format!(
            "the queue is corrupt: an item header claims {claimed} bytes (more than {} can be \
             a timer request); dropped the {dropped} bytes after it to get back in step",
            queue::MAX_CLAIMED
        )),
    };
    if let Ok(control) = &request {
        if control.scope == queue::RING_WAKE {
            return;
        }
        if let Some(announcement) = ring::parse_announcement(control.scope.as_bytes()) {
            return arrivals.rings.push((arrivals.requests.len(), announcement));
        }
    }
    arrivals.requests.push(request);
}

/// Adds the transport's fds to the epoll set; false if the transport itself cannot be watched.
fn watch(shared: &Shared, source: &Source) -> bool {
    if let Some(fd) = source.fd() {
        if let Err(err) =
            epoll::add(&shared.epoll, fd, EventData::new_u64(TAG_SOURCE), EventFlags::IN)
        {
            shared.lock().emit(Event::Warning(format!("cannot watch the transport: {err}")));
            return false;
        }
    }
    if let Some(fd) = source.watch_fd() {
        // Without it, a deleted FIFO is not noticed (clients then get BrokenPipeError).
        let _ = epoll::add(&shared.epoll, fd, EventData::new_u64(TAG_FIFO_WATCH), EventFlags::IN);
    }
    true
}

/// Runs the loop until `stop` or `run_once`; returns the transport, closed.
pub(super) fn run(shared: &Shared, mut source: Source) -> Source {
    if !watch(shared, &source) {
        source.close(&mut Arrivals::default());
        return source;
    }
    alarm::ask_for_short_slices();
    let mut alarm = match Alarm::new().and_then(|alarm| {
        epoll::add(&shared.epoll, alarm.fd(), EventData::new_u64(TAG_ALARM), EventFlags::IN)?;
        Ok(alarm)
    }) {
        Ok(alarm) => alarm,
        Err(err) => {
            shared.lock().emit(Event::Warning(format!("cannot set the loop's timer: {err}")));
            source.close(&mut Arrivals::default());
            return source;
        }
    };
    let mut ready: Vec<epoll::Event> = Vec::with_capacity(64);
    let mut arrivals = Arrivals::default();
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
        let mut read_source = false;
        let mut fifo_changed = false;
        let mut exited = Vec::new();
        let mut rings_exited = Vec::new();
        for event in &ready {
            match event.data.u64() {
                TAG_WAKE => {
                    let mut counter = [0u8; 8];
                    let _ = rustix::io::read(&shared.wake, &mut counter);
                }
                TAG_ALARM => alarm.acknowledge(),
                TAG_SOURCE => read_source = true,
                TAG_FIFO_WATCH => fifo_changed = true,
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
        if let (true, Source::Fifo(endpoint)) = (last, &mut source) {
            endpoint.unlink();
        }
        read_source |= last;
        if fifo_changed {
            source.repair_fifo(shared, &mut arrivals);
        }
        if read_source {
            loop {
                match source.read(&mut arrivals) {
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
            if let Some(fd) = source.fd() {
                let _ = epoll::delete(&shared.epoll, fd);
            }
            if let Some(fd) = source.watch_fd() {
                let _ = epoll::delete(&shared.epoll, fd);
            }
            let _ = epoll::delete(&shared.epoll, alarm.fd());
            // What was written during this pass, read just before the FIFO closes.
            source.close(&mut arrivals);
            take_in(shared, &mut rings, &mut arrivals, &mut decoded);
            shared.intake_decoded(&mut shared.lock(), &mut decoded, Clock::now());
            return source;
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

/// Moves what the transport brought into `decoded`, with the rings announced and drained
/// in order among it.
fn take_in(
    shared: &Shared,
    rings: &mut Rings,
    arrivals: &mut Arrivals,
    decoded: &mut Vec<Result<Request, String>>,
) {
    let warnings = rings.merge(&shared.epoll, arrivals, decoded);
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
