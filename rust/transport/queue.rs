//! The `multiprocessing.Queue` transport, read natively.
//!
//! A queue is a pipe plus two POSIX semaphores: `_rlock`, held by whoever reads, and `_sem`,
//! which `put` takes and `get` gives back (so `qsize()` is `maxsize - _sem`). On the pipe
//! each item is a frame: a 4-byte big-endian length (or -1 and an 8-byte length) then a
//! pickle. We read frames ourselves, under `_rlock`, and post `_sem` once per frame, exactly
//! as `Queue.get` does, so Python readers stay correct and `put` never blocks on us.
//!
//! While our server reads a queue it marks it ([`Mark`]); our client, finding the mark,
//! offers the server a shared-memory ring (`crate::ring`) as it does on a marked FIFO. The
//! ring's announcement and wake-ups are queue items a torch server would take for releases
//! of timers that do not exist.
//!
//! The server's [`Reader`] is the [`Transport`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use super::{Arrival, Transport};
use crate::codec::{self, Number};
use crate::{fork, ring};

/// Frames above this size cannot be timer requests; they are skipped, not buffered.
pub const MAX_FRAME: usize = 64 * 1024;

/// A header claiming more than this is corruption, not a frame: 16 times the largest request
/// we decode, far beyond any `TimerRequest` (whose scope is a name). Skipping that many bytes
/// would swallow every request written after it.
pub const MAX_CLAIMED: u64 = 16 * MAX_FRAME as u64;

/// How long we wait for `_rlock` (another reader holds it) before trying again later.
const LOCK_WAIT: Duration = Duration::from_millis(10);

/// A POSIX semaphore owned by a Python `multiprocessing` object.
#[derive(Debug)]
pub struct Semaphore(*mut libc::sem_t);

// SAFETY: POSIX semaphores are made to be used from any thread, concurrently.
unsafe impl Send for Semaphore {}
// SAFETY: as above; every operation is a thread-safe libc call on the shared handle.
unsafe impl Sync for Semaphore {}

impl Semaphore {
    /// # Safety
    /// `handle` must point to an initialised `sem_t` that outlives this value (the bindings
    /// keep the Python queue that owns it alive for as long as the reader exists).
    pub unsafe fn from_raw(handle: *mut libc::sem_t) -> Self {
        Self(handle)
    }

    fn wait_for(&self, timeout: Duration) -> io::Result<bool> {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
        let nanos = now.tv_nsec as u64 + u64::from(timeout.subsec_nanos());
        let until = libc::timespec {
            tv_sec: now.tv_sec
                + timeout.as_secs() as libc::time_t
                + (nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
        };
        loop {
            // SAFETY: the handle is valid (see `from_raw`).
            if unsafe { libc::sem_timedwait(self.0, &until) } == 0 {
                return Ok(true);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ETIMEDOUT) => return Ok(false),
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }

    fn try_wait(&self) -> io::Result<bool> {
        loop {
            // SAFETY: the handle is valid (see `from_raw`).
            if unsafe { libc::sem_trywait(self.0) } == 0 {
                return Ok(true);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(false),
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }

    fn post(&self) -> io::Result<()> {
        // SAFETY: the handle is valid (see `from_raw`).
        if unsafe { libc::sem_post(self.0) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Our server's mark on a queue it reads: an abstract Unix socket named after the queue's
/// pipe, bound while the server reads. The kernel drops the name with the socket, so a mark
/// never outlives its server, whatever the way it ends (children forked meanwhile do not
/// keep it: `crate::fork`).
#[derive(Debug)]
pub struct Mark {
    socket: OwnedFd,
}

impl Mark {
    /// Marks the queue whose pipe end (either one) is `pipe`.
    pub fn claim(pipe: BorrowedFd<'_>) -> io::Result<Self> {
        let socket = unix_socket()?;
        rustix::net::bind(&socket, &mark_name(pipe)?)?;
        fork::close_in_children(socket.as_raw_fd());
        Ok(Self { socket })
    }

    /// Whether one of our servers reads the queue whose pipe end is `pipe`. Never takes the
    /// name (connecting a datagram socket only looks it up), so a server starting meanwhile
    /// can still claim it.
    pub fn is_on(pipe: BorrowedFd<'_>) -> bool {
        let Ok(socket) = unix_socket() else { return false };
        mark_name(pipe).is_ok_and(|name| rustix::net::connect(&socket, &name).is_ok())
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        fork::keep_in_children(self.socket.as_raw_fd());
    }
}

fn unix_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The mark's name: the pipe's device and inode, the same from both ends and in every
/// process that holds the queue, and unique among the pipes alive on the host.
fn mark_name(pipe: BorrowedFd<'_>) -> io::Result<SocketAddrUnix> {
    let stat = rustix::fs::fstat(pipe)?;
    let name = format!("elastic-timer/queue/{}:{}", stat.st_dev, stat.st_ino);
    Ok(SocketAddrUnix::new_abstract_name(name.as_bytes())?)
}

/// The scope of the queue item that wakes our server for a ring (a release to torch's).
pub const RING_WAKE: &str = "{\"elastic_timer_ring_wake\": 1}";

/// How long a wake-up waits for the queue's write lock. Another writer holds it for one
/// write, or longer only while the pipe is full, and a full pipe wakes the server anyway.
const WAKE_LOCK_WAIT: Duration = Duration::from_millis(10);

/// How many requests an unmarked writer sends before it looks for the mark again (a server
/// may start reading after the writer's first request, or again after a restart).
const MARK_RECHECK: u32 = 1000;

/// One frame read from the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Payload(&'a [u8]),
    /// A frame over `MAX_FRAME`, skipped; its length.
    TooLarge(u64),
    /// A header claiming more than `MAX_CLAIMED` bytes: the stream is corrupt. The reader
    /// dropped what followed the header, held or in the pipe (`dropped` bytes), to get back
    /// in step.
    Corrupt {
        claimed: u64,
        dropped: usize,
    },
}

/// What the reader is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames (or inside a header or a small payload held in `pending`).
    Framing,
    /// Skipping the given number of bytes of an oversized frame.
    Skipping(u64),
}

/// The server's reader of one `multiprocessing.Queue`.
#[derive(Debug)]
pub struct Reader {
    fd: OwnedFd,
    read_lock: Semaphore,
    items: Semaphore,
    pending: Vec<u8>,
    state: State,
    /// The process holding `_rlock` across a frame not yet complete (see `read_frames`).
    holding_lock: Option<rustix::process::Pid>,
    mark: Option<Mark>,
}

impl Reader {
    /// `fd` is the queue's `_reader` end (it is duplicated; its flags are left alone, so Python
    /// readers of the same queue are unaffected).
    pub fn new(fd: BorrowedFd<'_>, read_lock: Semaphore, items: Semaphore) -> io::Result<Self> {
        Ok(Self {
            fd: fd.try_clone_to_owned()?,
            read_lock,
            items,
            pending: Vec::new(),
            state: State::Framing,
            holding_lock: None,
            mark: None,
        })
    }

    /// Marks the queue as read by our server (see [`Mark`]), until `unmark`.
    pub fn mark(&mut self) -> io::Result<()> {
        if self.mark.is_none() {
            self.mark = Some(Mark::claim(self.fd.as_fd())?);
        }
        Ok(())
    }

    pub fn unmark(&mut self) {
        self.mark = None;
    }

    /// Reads every frame the pipe holds and hands each to `sink`. Returns the number of frames
    /// (0 when another reader holds the lock or the pipe is empty). Never waits for the rest
    /// of a frame: what came is kept, and the loop's epoll says when more comes.
    pub fn read_frames(&mut self, mut sink: impl FnMut(Frame<'_>)) -> io::Result<usize> {
        if self.holding_lock.is_none() && !self.read_lock.wait_for(LOCK_WAIT)? {
            return Ok(0);
        }
        let result = self.read_locked(&mut sink);
        // Mid-frame, `_rlock` stays ours until the frame is complete, as it stays with a
        // `Queue.get` blocked in the middle of one. Given back, it would let a Python reader
        // take the rest of our frame for a header and the pickle after it: that reader would
        // wait for bytes never written, or hand out garbage, and the queue would stay out of
        // step for everyone. Only other readers wait; writers and our loop do not.
        if result.is_ok() && self.mid_frame() {
            self.holding_lock = Some(rustix::process::getpid());
        } else {
            self.holding_lock = None;
            self.read_lock.post()?;
        }
        result
    }

    fn read_locked(&mut self, sink: &mut impl FnMut(Frame<'_>)) -> io::Result<usize> {
        let mut frames = 0;
        loop {
            // Never block: read only what the pipe says it holds (the fd is a blocking one we
            // share with Python and must not switch to non-blocking).
            let available = self.available()?;
            if available == 0 {
                return Ok(frames);
            }
            let start = self.pending.len();
            self.pending.resize(start + available, 0);
            let n = match rustix::io::read(&self.fd, &mut self.pending[start..]) {
                Ok(n) => n,
                Err(Errno::INTR) => 0,
                Err(err) => {
                    self.pending.truncate(start);
                    return Err(err.into());
                }
            };
            self.pending.truncate(start + n);
            frames += self.drain_frames(sink)?;
        }
    }

    fn available(&self) -> io::Result<usize> {
        Ok(rustix::io::ioctl_fionread(&self.fd)? as usize)
    }

    fn mid_frame(&self) -> bool {
        !self.pending.is_empty() || matches!(self.state, State::Skipping(_))
    }

    /// Reads and drops what the pipe holds now; returns how many bytes.
    fn discard_available(&self) -> io::Result<usize> {
        let mut left = self.available()?;
        let mut scratch = [0u8; 4096];
        let mut dropped = 0;
        while left > 0 {
            let want = left.min(scratch.len());
            match rustix::io::read(&self.fd, &mut scratch[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    dropped += n;
                    left -= n;
                }
                Err(Errno::INTR) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(dropped)
    }

    /// Cuts complete frames off the front of `pending`.
    fn drain_frames(&mut self, sink: &mut impl FnMut(Frame<'_>)) -> io::Result<usize> {
        let mut frames = 0;
        let mut offset = 0;
        loop {
            let rest = &self.pending[offset..];
            if let State::Skipping(left) = self.state {
                let take = (rest.len() as u64).min(left);
                offset += take as usize;
                if take < left {
                    self.state = State::Skipping(left - take);
                    break;
                }
                self.state = State::Framing;
                continue;
            }
            let Some((header, size)) = parse_header(rest) else {
                break;
            };
            if size > MAX_CLAIMED {
                // No writer frames that much for us: the stream is out of step (or was never
                // in it). Where the next frame starts cannot be known, so everything held now
                // goes; what is written from here on is read in step again.
                let dropped = rest.len() - header + self.discard_available()?;
                sink(Frame::Corrupt { claimed: size, dropped });
                self.items.post()?;
                frames += 1;
                offset = self.pending.len();
                break;
            }
            if size > MAX_FRAME as u64 {
                sink(Frame::TooLarge(size));
                self.items.post()?;
                frames += 1;
                offset += header;
                self.state = State::Skipping(size);
                continue;
            }
            let size = size as usize;
            if rest.len() < header + size {
                break;
            }
            sink(Frame::Payload(&rest[header..header + size]));
            self.items.post()?;
            frames += 1;
            offset += header + size;
        }
        self.pending.drain(..offset);
        Ok(frames)
    }
}

impl Drop for Reader {
    /// Gives back `_rlock` held across a frame, in the process that took it (a forked
    /// copy of the reader must not release its parent's lock).
    fn drop(&mut self) {
        if self.holding_lock == Some(rustix::process::getpid()) {
            let _ = self.read_lock.post();
        }
    }
}

impl Transport for Reader {
    /// Marks the queue, so our clients offer rings; a queue that cannot be marked is still read.
    fn open(&mut self) -> io::Result<Option<String>> {
        Ok(self.mark().err().map(|err| {
            format!("cannot mark the queue for our clients ({err}): they send no rings")
        }))
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn read(&mut self, out: &mut Vec<Arrival>) -> io::Result<usize> {
        self.read_frames(|frame| decode_frame(frame, out))
    }

    /// Reads every frame left, then unmarks the queue (the pipe is Python's to close).
    fn close(&mut self, out: &mut Vec<Arrival>) {
        while matches!(self.read(out), Ok(n) if n > 0) {}
        self.unmark();
    }
}

/// Decodes one item: a request, a worker's ring announcement (in the scope of a release), or
/// a wake-up for the rings (nothing).
fn decode_frame(frame: Frame<'_>, out: &mut Vec<Arrival>) {
    let request = match frame {
        Frame::Payload(bytes) => match codec::decode_pickle(bytes) {
            Ok(request) => request,
            Err(err) => return out.push(Arrival::Malformed(err.to_string())),
        },
        Frame::TooLarge(n) => {
            return out.push(Arrival::Malformed(format!(
                "queue item of {n} bytes is not a timer request"
            )))
        }
        Frame::Corrupt { claimed, dropped } => {
            return out.push(Arrival::Malformed(format!(
                "the queue is corrupt: an item header claims {claimed} bytes (more than \
                 {MAX_CLAIMED} can be a timer request); dropped the {dropped} bytes after it to \
                 get back in step"
            )))
        }
    };
    if request.scope == RING_WAKE {
        return;
    }
    out.push(match ring::parse_announcement(request.scope.as_bytes()) {
        Some(announcement) => Arrival::Ring(announcement),
        None => Arrival::Request(request),
    });
}

/// Why a client could not put a frame on the queue.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("frame of {0} bytes is larger than PIPE_BUF and cannot be written atomically")]
    TooLarge(usize),
    #[error("the queue had no room within {0:?} (is its server reading?)")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A client's writer to one `multiprocessing.Queue`: what `put` and its feeder thread do,
/// done at once on the caller's thread (take `_sem`, then write one frame under `_wlock`).
///
/// To a queue our server marks, after the third request the writer offers a ring, as the
/// FIFO client does (`ring::Channel` is this queue).
#[derive(Debug)]
pub struct Writer {
    fd: OwnedFd,
    write_lock: Semaphore,
    items: Semaphore,
    pub ring: ring::Sender,
    /// Requests sent without a ring since the mark was last looked for.
    unmarked: AtomicU32,
}

impl Writer {
    /// `fd` is the queue's `_writer` end (duplicated, flags left alone).
    pub fn new(fd: BorrowedFd<'_>, write_lock: Semaphore, items: Semaphore) -> io::Result<Self> {
        let writer = Self {
            fd: fd.try_clone_to_owned()?,
            write_lock,
            items,
            ring: ring::Sender::default(),
            unmarked: AtomicU32::new(0),
        };
        writer.look_for_mark();
        Ok(writer)
    }

    fn look_for_mark(&self) {
        if Mark::is_on(self.fd.as_fd()) {
            self.ring.arm();
        }
    }

    /// After a request sent on the queue: whether it is time to offer a ring
    /// (`ring.offer(self)`). Without a ring the mark is looked for every `MARK_RECHECK`
    /// requests.
    pub fn ring_due(&self) -> bool {
        if !self.ring.is_armed() && self.unmarked.fetch_add(1, Ordering::Relaxed) >= MARK_RECHECK {
            self.unmarked.store(0, Ordering::Relaxed);
            self.look_for_mark();
        }
        self.ring.due()
    }

    /// Puts a frame of worker `pid` with the given scope, for the server only.
    fn send_control(&self, pid: i32, scope: &str, lock_wait: Duration) -> bool {
        let mut frame = Vec::with_capacity(160 + scope.len());
        codec::encode_pickle_frame(i64::from(pid), scope, Number::Int(-1), &mut frame);
        matches!(self.send_at_once(&frame, lock_wait), Ok(true))
    }

    /// Writes the frame if that needs no waiting (a free slot, the write lock, room in the
    /// pipe). Returns false, having changed nothing, when `send` must do it.
    pub fn try_send(&self, frame: &[u8]) -> Result<bool, SendError> {
        self.send_at_once(frame, Duration::ZERO)
    }

    /// `try_send`, but waiting up to `lock_wait` for the write lock.
    fn send_at_once(&self, frame: &[u8], lock_wait: Duration) -> Result<bool, SendError> {
        if frame.len() > libc::PIPE_BUF {
            return Err(SendError::TooLarge(frame.len()));
        }
        if !self.items.try_wait()? {
            return Ok(false);
        }
        let locked = if lock_wait.is_zero() {
            self.write_lock.try_wait()?
        } else {
            self.write_lock.wait_for(lock_wait)?
        };
        if !locked {
            self.items.post()?;
            return Ok(false);
        }
        let result = self.write_frame(frame, Duration::ZERO, Duration::ZERO);
        self.write_lock.post()?;
        match result {
            Ok(()) => Ok(true),
            Err(SendError::Timeout(_)) => {
                self.items.post()?;
                Ok(false)
            }
            Err(err) => {
                self.items.post()?;
                Err(err)
            }
        }
    }

    /// Writes one frame, waiting at most `timeout` for a slot and for room in the pipe.
    pub fn send(&self, frame: &[u8], timeout: Duration) -> Result<(), SendError> {
        if frame.len() > libc::PIPE_BUF {
            return Err(SendError::TooLarge(frame.len()));
        }
        let deadline = std::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        // A bounded queue's slot, as `put` takes it.
        if !self.items.wait_for(timeout)? {
            return Err(SendError::Timeout(timeout));
        }
        let written = self.write_locked(frame, left, timeout);
        if written.is_err() {
            self.items.post()?;
        }
        written
    }

    fn write_locked(
        &self,
        frame: &[u8],
        left: impl Fn() -> Duration,
        timeout: Duration,
    ) -> Result<(), SendError> {
        if !self.write_lock.wait_for(left())? {
            return Err(SendError::Timeout(timeout));
        }
        let result = self.write_frame(frame, left(), timeout);
        self.write_lock.post()?;
        result
    }

    fn write_frame(
        &self,
        frame: &[u8],
        wait: Duration,
        timeout: Duration,
    ) -> Result<(), SendError> {
        // The fd is blocking and shared with Python: write only once the pipe has room, so
        // the caller (a training step) never hangs on a server that stopped reading. With
        // the write lock held nobody else fills that room, and a write of at most PIPE_BUF
        // bytes is atomic.
        let mut fds = [PollFd::new(&self.fd, PollFlags::OUT)];
        let wait = rustix::time::Timespec::try_from(wait)
            .unwrap_or(rustix::time::Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
        loop {
            match poll(&mut fds, Some(&wait)) {
                Ok(0) => return Err(SendError::Timeout(timeout)),
                Ok(_) => break,
                Err(Errno::INTR) => continue,
                Err(err) => return Err(SendError::Io(err.into())),
            }
        }
        let mut rest = frame;
        while !rest.is_empty() {
            match rustix::io::write(&self.fd, rest) {
                Ok(n) => rest = &rest[n..],
                Err(Errno::INTR) => {}
                Err(err) => return Err(SendError::Io(err.into())),
            }
        }
        Ok(())
    }
}

impl ring::Channel for Writer {
    /// A `TimerRequest` whose scope is the announcement line.
    fn announce(&self, pid: i32, fd: i32) -> bool {
        let line = ring::announcement(pid, fd);
        let scope = std::str::from_utf8(&line[..line.len() - 1]).expect("an ASCII line");
        self.send_control(pid, scope, Duration::ZERO)
    }

    /// A `TimerRequest` of scope `RING_WAKE`. It may be skipped only when the server has
    /// unread items anyway (a full queue or pipe); another writer's frame is no such proof
    /// (the server may have read it before our entry was in the ring), so the write lock is
    /// waited for. A queue has no way to tell whether its server is gone: always true.
    fn wake(&self) -> bool {
        self.send_control(ring::this_process().0, RING_WAKE, WAKE_LOCK_WAIT);
        true
    }
}

/// Parses a frame header: returns its length and the payload size, or None if incomplete.
fn parse_header(bytes: &[u8]) -> Option<(usize, u64)> {
    let short = i32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    if short == -1 {
        let long = u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
        Some((12, long))
    } else {
        // Negative sizes other than -1 are never written; treat them as empty frames.
        Some((4, u64::try_from(short).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests;
