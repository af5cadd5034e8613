//! The workers' request rings, as the loop holds them (see [`crate::ring`]).
//!
//! A ring is taken when the transport brings its announcement
//! ([`crate::transport::Arrival::Ring`], on any transport), and drained into the requests the
//! pass registers: before any request of the same worker that came by the transport (a worker
//! sends there only once it has left its ring, so its order is kept), and then all of them, on
//! every wake.
//! While some ring saw a request in the last [`IDLE_AFTER`], the server holds a lease on all
//! of them and wakes every [`POLL_INTERVAL`] to drain them; then it lets the lease run out
//! and looks once more, and an idle server does not wake at all.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::fs::{self, Mode, OFlags};
use rustix::process::{pidfd_open, Pid, PidfdFlags};

use super::TAG_RING;
use crate::codec::Request;
use crate::reaper;
use crate::ring::{self, Reader};

/// How often the server drains the rings while it holds a lease. A client whose deadline is
/// nearer than [`ring::NEAR`] wakes it instead.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The lease given at each poll: a worker writing later wakes the server.
const LEASE: Duration = Duration::from_millis(60);
/// How long the server keeps polling after the last request a ring brought.
const IDLE_AFTER: Duration = Duration::from_secs(1);

struct Held {
    reader: Reader,
    /// Tells the loop when the worker is gone, so its ring is drained one last time and let go.
    pidfd: OwnedFd,
}

pub(super) struct Rings {
    held: HashMap<Pid, Held>,
    max: usize,
    /// Until when the rings are leased (None: the server is idle).
    leased_until: Option<Instant>,
    last_poll: Instant,
    last_request: Instant,
}

impl Rings {
    pub fn new(max: usize) -> Self {
        let now = Instant::now();
        Self { held: HashMap::new(), max, leased_until: None, last_poll: now, last_request: now }
    }

    /// Takes the ring a worker announced, after draining the one it had; says why not otherwise.
    pub fn announced(
        &mut self,
        epoll: &OwnedFd,
        announcement: ring::Announcement,
        out: &mut Vec<Result<Request, String>>,
    ) -> Result<(), String> {
        announcement.and_then(|(pid, fd)| {
            self.drain_worker(epoll, pid, out);
            self.take(epoll, pid, fd).map_err(|why| format!("ring of pid {pid} refused: {why}"))
        })
    }

    /// Takes the ring `pid` announced (its file descriptor `fd`); says why not otherwise.
    fn take(&mut self, epoll: &OwnedFd, pid: i64, fd: i32) -> Result<(), String> {
        let pid = reaper::validate_pid(pid).map_err(|err| err.to_string())?;
        let raw = pid.as_raw_nonzero().get();
        let path = format!("/proc/{raw}/fd/{fd}");
        // Opening is not harmless for every file (a device may act on it): only a memfd
        // named as ours is opened, and then checked.
        let target = fs::readlink(&path, Vec::new()).map_err(|err| format!("{path}: {err}"))?;
        if !target.as_bytes().starts_with(ring::MEMFD_LINK.as_bytes()) {
            return Err(format!("{path} is {target:?}, not a ring's memfd"));
        }
        let flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let memfd = fs::open(&path, flags, Mode::empty())
            .map_err(|err| format!("cannot open {path}: {err}"))?;
        let reader = Reader::open(memfd).map_err(|why| format!("{path} is not a ring: {why}"))?;
        if let Some(old) = self.held.get_mut(&pid) {
            // The worker exec'd, or made a new ring: the old one, drained before this
            // announcement, is let go.
            old.reader.set_state(ring::CLOSED);
        } else if self.held.len() >= self.max {
            reader.set_state(ring::CLOSED);
            return Err(format!("{} rings are held already (it sends by FIFO)", self.max));
        }
        let pidfd = match self.held.remove(&pid) {
            Some(old) => old.pidfd,
            None => {
                let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(|err| {
                    reader.set_state(ring::CLOSED);
                    format!("pidfd_open({raw}): {err}")
                })?;
                let tag = EventData::new_u64(TAG_RING + raw as u64);
                epoll::add(epoll, &pidfd, tag, EventFlags::IN).map_err(|err| {
                    reader.set_state(ring::CLOSED);
                    format!("cannot watch pid {raw}: {err}")
                })?;
                pidfd
            }
        };
        if let Some(until) = self.leased_until {
            reader.set_lease(lease_ns(until));
        }
        reader.set_state(ring::ACCEPTED);
        self.held.insert(pid, Held { reader, pidfd });
        Ok(())
    }

    /// Drains `pid`'s ring into `out` (before a request of its that came by the transport);
    /// lets it go if the worker left it.
    pub fn drain_worker(
        &mut self,
        epoll: &OwnedFd,
        pid: i64,
        out: &mut Vec<Result<Request, String>>,
    ) {
        let Ok(pid) = reaper::validate_pid(pid) else { return };
        let Some(held) = self.held.get_mut(&pid) else { return };
        let abandoned = held.reader.abandoned();
        if !drain(pid, held, out) || abandoned {
            self.release(epoll, pid);
        }
    }

    /// Drains every ring into `out`, and renews or gives up the lease.
    pub fn drain_all(&mut self, epoll: &OwnedFd, out: &mut Vec<Result<Request, String>>) {
        let now = Instant::now();
        let before = out.len();
        let mut corrupt = Vec::new();
        for (&pid, held) in &mut self.held {
            if !drain(pid, held, out) {
                corrupt.push(pid);
            }
        }
        for pid in corrupt {
            self.release(epoll, pid);
        }
        if out.len() > before {
            self.last_request = now;
        }
        self.last_poll = now;
        if self.held.is_empty() {
            self.leased_until = None;
        } else if now.saturating_duration_since(self.last_request) < IDLE_AFTER {
            let until = now + LEASE;
            self.leased_until = Some(until);
            for held in self.held.values() {
                held.reader.set_lease(lease_ns(until));
            }
        } else if self.leased_until.is_some_and(|until| now >= until) {
            // This drain came after the lease ran out: a worker writing now wakes us.
            self.leased_until = None;
        }
    }

    /// When the loop must drain the rings next (None: it need not until woken).
    pub fn next_poll(&self) -> Option<Instant> {
        let until = self.leased_until?;
        let renewing = self.last_poll.saturating_duration_since(self.last_request) < IDLE_AFTER;
        Some(if renewing { self.last_poll + POLL_INTERVAL } else { until })
    }

    /// The worker `pid` exited: what it wrote last goes to `out`, and its ring is let go.
    pub fn exited(&mut self, epoll: &OwnedFd, pid: Pid, out: &mut Vec<Result<Request, String>>) {
        if let Some(held) = self.held.get_mut(&pid) {
            drain(pid, held, out);
            self.release(epoll, pid);
        }
    }

    /// The server stops: every ring is closed (its worker sends by FIFO from now on), then
    /// drained a last time.
    pub fn close(&mut self, epoll: &OwnedFd, out: &mut Vec<Result<Request, String>>) {
        for held in self.held.values() {
            held.reader.set_state(ring::CLOSED);
        }
        let pids: Vec<Pid> = self.held.keys().copied().collect();
        for pid in pids {
            self.exited(epoll, pid, out);
        }
        self.leased_until = None;
    }

    fn release(&mut self, epoll: &OwnedFd, pid: Pid) {
        if let Some(held) = self.held.remove(&pid) {
            held.reader.set_state(ring::CLOSED);
            let _ = epoll::delete(epoll, &held.pidfd);
        }
    }
}

/// Moves a ring's entries into `out` as requests of its worker; false if the ring is corrupt
/// (what came before the damage is kept, the damage is reported as malformed).
fn drain(pid: Pid, held: &mut Held, out: &mut Vec<Result<Request, String>>) -> bool {
    let (entries, error) = held.reader.drain();
    let pid = i64::from(pid.as_raw_nonzero().get());
    out.extend(entries.into_iter().map(|entry| {
        Ok(Request { pid, scope: entry.scope, expiration: entry.expiration, signal: entry.signal })
    }));
    match error {
        Some(error) => {
            out.push(Err(format!("{error} (ring of pid {pid}; it sends by FIFO from now on)")));
            false
        }
        None => true,
    }
}

/// `at` as the workers read the lease: nanoseconds on `CLOCK_MONOTONIC`.
fn lease_ns(at: Instant) -> u64 {
    let left = at.saturating_duration_since(Instant::now());
    ring::monotonic_ns() + left.as_nanos() as u64
}
