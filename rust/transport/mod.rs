//! Where requests come from: one [`Transport`] trait, one file per transport.
//!
//! * [`fifo`]: torch's `FileTimerServer` transport, a named FIFO of JSON lines (the server's
//!   [`fifo::Endpoint`] and the workers' [`fifo::Client`]);
//! * [`queue`]: torch's `LocalTimerServer` transport, a `multiprocessing.Queue` of pickles read
//!   from its pipe (the server's [`queue::Reader`] and the workers' [`queue::Writer`]);
//! * [`direct`]: no transport of our own: requests come from Python ([`direct::Direct`]).
//!
//! The server's loop ([`crate::server`]) waits on a transport's [`Transport::fd`] and, when it
//! is readable, calls [`Transport::read`], which decodes what came into [`Arrival`]s: requests,
//! what is not one, and the shared-memory rings workers offer ([`crate::ring`]). The loop
//! takes the rings itself, so they work on every transport that can carry an announcement.
//! The design follows mio's `event::Source`: the transport owns its fds and says which to
//! wait on; the loop owns the waiting.
//!
//! # Adding a transport
//!
//! 1. A file here, `transport/<name>.rs`, with the server's end implementing [`Transport`]
//!    (decoding into [`Arrival`]s, with [`crate::codec`]) and, if our clients use it, the
//!    client's end; its tests in `transport/<name>/tests.rs`.
//! 2. Fds a forked worker must not keep (a FIFO's ends, a queue's mark): [`crate::fork`].
//! 3. Rings: the client's end implements [`crate::ring::Channel`] (how to announce a ring,
//!    how to wake the server), and [`Transport::read`] yields [`Arrival::Ring`] for an
//!    announcement and nothing for a wake-up.
//! 4. The binding: a constructor on `_native.Server` (`bindings.rs`, as `Server.fifo`), and
//!    the client's class if there is one; both declared in `python/elastic_timer/_native.pyi`.
//! 5. The Python server class that builds it (`elastic_timer.local_timer` and
//!    `elastic_timer.file_based_local_timer` are the two there are), and its tests
//!    (`tests/test_interop.py` checks the wire against torch's own clients and servers).
//! 6. The module lists: this one and `lib.rs`'s (which the documentation site renders), and
//!    `ARCHITECTURE.md`'s path of a request.

pub mod direct;
pub mod fifo;
pub mod queue;

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use crate::codec::Request;
use crate::ring;

/// One thing a transport read, in the order it came.
///
/// A ring's wake-up (an empty FIFO line, a queue item of scope [`queue::RING_WAKE`]) is not
/// an arrival: waking the loop, which then drains every ring, is all it is for.
#[derive(Debug)]
pub enum Arrival {
    /// A timer request (an acquire, or a release: a negative expiration).
    Request(Request),
    /// Bytes that are not a request, and why (counted and reported as malformed).
    Malformed(String),
    /// A worker offers its shared-memory ring (or said so in a way that is refused, and why).
    Ring(ring::Announcement),
}

/// What the loop must do after [`Transport::repair`].
#[derive(Debug, Default)]
pub struct Repaired {
    /// What to report.
    pub warning: Option<String>,
    /// The transport's fds were replaced: watch the new ones.
    pub new_fds: bool,
}

/// The server's end of a transport, as the loop drives it.
///
/// Built (and, for a FIFO, created) before the server, opened when the loop starts, read
/// while it runs, closed when it stops; a stopped server keeps it, to open again on `start`.
pub trait Transport: Send + fmt::Debug {
    /// Makes it ready for the loop. Returns a warning if it works, but without rings.
    fn open(&mut self) -> io::Result<Option<String>>;

    /// Readable when requests came (None: nothing to wait on).
    fn fd(&self) -> Option<BorrowedFd<'_>>;

    /// Readable when the endpoint itself changed, and [`Transport::repair`] should look.
    fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Reads and decodes what is there now into `out`. Returns how much was read (bytes or
    /// frames; 0: nothing more for now).
    fn read(&mut self, out: &mut Vec<Arrival>) -> io::Result<usize>;

    /// After [`Transport::watch_fd`] was readable: puts the endpoint right, reading what the
    /// old one held into `out`. `unwatch` is given each fd about to be closed.
    fn repair(
        &mut self,
        _out: &mut Vec<Arrival>,
        _unwatch: &mut dyn FnMut(BorrowedFd<'_>),
    ) -> Repaired {
        Repaired::default()
    }

    /// Stops new clients from finding it (the server stops, or was never started): the
    /// FIFO's path is removed if it is still this server's.
    fn withdraw(&mut self) {}

    /// Reads the last requests into `out`, then closes: a client writing later gets an error
    /// (and tries again) instead of writing into an end about to be closed unread.
    fn close(&mut self, out: &mut Vec<Arrival>);
}
