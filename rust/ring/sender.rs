//! The client's side of a ring, whatever carries its announcement and its wake-ups (a FIFO
//! line, a queue item): when to offer one, the ring once the server took it, and putting
//! requests in it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use super::{this_process, wall_now, Push, Writer, ACCEPTED, NEAR, PENDING};

/// How a client reaches its server besides the ring.
pub trait Channel {
    /// Sends the announcement of this process's ring (`pid`'s descriptor `fd`); false if it
    /// could not go at once.
    fn announce(&self, pid: i32, fd: i32) -> bool;
    /// Wakes the server for what is in the ring; false if the server is known to be gone.
    fn wake(&self) -> bool;
}

/// What became of a request offered to the ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Sent,
    /// The ring is full: `push_when_room` may wait for the server to drain it.
    Full,
    /// Send it by the channel.
    Channel,
}

/// Requests a new connection to our server carries by its channel before it offers a ring:
/// a client used for one block never makes one.
const OFFER_AFTER: u32 = 3;

/// How long offering a ring waits for the server to take it, and a full ring for room,
/// before the client sends by its channel.
const WAIT: Duration = Duration::from_millis(200);

/// One client's ring, from the offer on.
#[derive(Debug, Default)]
pub struct Sender {
    /// Requests to go by the channel before a ring is offered (0: none to offer).
    countdown: AtomicU32,
    /// The ring the server took (locked before anything of the channel's, never after).
    ring: Mutex<Option<Writer>>,
}

impl Sender {
    /// A new connection to one of our servers: a ring is offered after `OFFER_AFTER` requests.
    pub fn arm(&self) {
        self.countdown.store(OFFER_AFTER, Ordering::Relaxed);
    }

    /// Whether this client holds a ring, is offering one, or will offer one.
    pub fn is_armed(&self) -> bool {
        self.countdown.load(Ordering::Relaxed) != 0
            || self.ring.try_lock().map_or(true, |ring| ring.is_some())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Writer>> {
        self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts a request of worker `pid` in the ring, if this process has one and `pid` is this
    /// process. Never waits.
    pub fn push(
        &self,
        channel: &impl Channel,
        pid: i64,
        scope: &str,
        expiration: f64,
        signal: i32,
    ) -> Pushed {
        // Busy only while another thread offers a ring (up to `WAIT`): this request then goes
        // by the channel rather than hold the GIL that long.
        let mut ring = match self.ring.try_lock() {
            Ok(ring) => ring,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Pushed::Channel,
        };
        let Some(writer) = ring.as_mut() else { return Pushed::Channel };
        if !writer.is_own() {
            // Inherited through fork: the parent's. This process offers its own.
            *ring = None;
            self.countdown.store(1, Ordering::Relaxed);
            return Pushed::Channel;
        }
        if i64::from(this_process().0) != pid {
            return Pushed::Channel;
        }
        let near = expiration >= 0.0 && expiration - wall_now() < NEAR.as_secs_f64();
        match writer.push(scope.as_bytes(), expiration, signal, near) {
            Push::Written { wake: false } => Pushed::Sent,
            Push::Written { wake: true } => {
                if channel.wake() {
                    Pushed::Sent
                } else {
                    // The server is gone (maybe before it read this): send it again.
                    *ring = None;
                    Pushed::Channel
                }
            }
            Push::Full => Pushed::Full,
            Push::Closed => {
                *ring = None;
                Pushed::Channel
            }
            Push::TooLong => {
                writer.abandon();
                *ring = None;
                Pushed::Channel
            }
        }
    }

    /// After `Pushed::Full`: wakes the server and waits (bounded) for room; past that the
    /// ring is left and this returns false (send by the channel).
    pub fn push_when_room(
        &self,
        channel: &impl Channel,
        pid: i64,
        scope: &str,
        expiration: f64,
        signal: i32,
    ) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.push(channel, pid, scope, expiration, signal) {
                Pushed::Sent => return true,
                Pushed::Channel => return false,
                Pushed::Full if Instant::now() < deadline => {
                    channel.wake();
                    thread::sleep(Duration::from_micros(200));
                }
                Pushed::Full => {
                    self.leave();
                    return false;
                }
            }
        }
    }

    /// Gives up the ring, if there is one: requests go by the channel from now on.
    pub fn leave(&self) {
        if let Some(writer) = self.lock().take() {
            writer.abandon();
        }
    }

    /// After a request sent by the channel: whether it is time to offer a ring (`offer`).
    pub fn due(&self) -> bool {
        match self.countdown.load(Ordering::Relaxed) {
            0 => false,
            1 => true,
            n => {
                self.countdown.store(n - 1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Offers the server a ring and waits (bounded) for it to be taken; without an answer,
    /// requests keep going by the channel.
    pub fn offer(&self, channel: &impl Channel) {
        let mut ring = self.lock();
        if self.countdown.swap(0, Ordering::Relaxed) == 0 {
            return;
        }
        *ring = None;
        let Ok(writer) = Writer::create() else { return };
        if !channel.announce(this_process().0, writer.fd()) {
            return;
        }
        let deadline = Instant::now() + WAIT;
        while writer.state() == PENDING && Instant::now() < deadline {
            thread::sleep(Duration::from_micros(100));
        }
        if writer.state() == ACCEPTED {
            *ring = Some(writer);
        } else {
            writer.abandon();
        }
    }
}
