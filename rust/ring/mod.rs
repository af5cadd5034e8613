//! A shared-memory request ring between one worker process and our server: requests with
//! no system call.
//!
//! The worker (`Writer`) creates a sealed memfd, maps it, and announces it on its transport
//! ([`announcement`]: a FIFO line, or the scope of a queue item; [`Sender`] is the client's
//! side, whatever the transport); the server opens it through `/proc/<pid>/fd/<fd>`, checks it
//! ([`Reader::open`]) and says in the header whether it took it. From then on the worker
//! appends entries and the server drains them when it wakes and while it holds a *lease*: a
//! `CLOCK_MONOTONIC` instant, in the header, until which it promises to look at the ring
//! often (every 20 ms). A worker writing past the lease, or with a deadline
//! nearer than that, or filling the ring past half, wakes the server (an empty FIFO line, a
//! queue item of scope `transport::queue::RING_WAKE`).
//!
//! Everything the worker wrote is untrusted: the server copies the pending bytes out first,
//! then [`parse`] checks each entry (bounded lengths, UTF-8 scope), so a worker that
//! scribbles on its ring costs only its own requests.
//!
//! Layout (little-endian, native atomics), [`RING_BYTES`] in all:
//! - `0`: magic `ETRING01`; `8`: capacity of the data area (u32);
//! - `64`: write position (u64, bytes ever written; the worker's); `72`: abandoned (u32: the
//!   worker sends by FIFO from now on);
//! - `128`: read position (u64, the server's); `136`: state (u32: pending, accepted,
//!   closed); `144`: lease (u64, monotonic nanoseconds);
//! - `256..`: the data, entries of 8-byte words: `u32 scope length | i32 signal |
//!   f64 expiration | scope bytes, padded to 8`. An entry never wraps: a length of
//!   [`SKIP`] says the rest of the area is padding.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Once;

use rustix::fs::{self, MemfdFlags, SealFlags};
use rustix::mm::{self, MapFlags, ProtFlags};
use rustix::time::{clock_gettime, ClockId};

mod sender;
pub use sender::{Channel, Pushed, Sender};

/// Size of a ring, header included.
pub const RING_BYTES: usize = 256 * 1024;
const HEADER: usize = 256;
/// Bytes of the data area.
pub const CAPACITY: usize = RING_BYTES - HEADER;
const MAGIC: u64 = u64::from_le_bytes(*b"ETRING01");
/// A scope longer than this goes by FIFO (where the line's own bound applies).
pub const MAX_SCOPE: usize = 4000;
/// A client whose deadline is nearer than this wakes the server (whose polls, every 20 ms
/// under a lease, could otherwise see the acquire too late).
pub const NEAR: std::time::Duration = std::time::Duration::from_millis(50);
const MEMFD_NAME: &str = "elastic-timer-ring";
/// What `/proc/<pid>/fd/<fd>` of a ring's memfd links to (then " (deleted)").
pub const MEMFD_LINK: &str = "/memfd:elastic-timer-ring";
/// Entry length marking the end of the data area as padding.
const SKIP: u32 = u32::MAX;
const ENTRY_HEAD: usize = 16;

const OFF_MAGIC: usize = 0;
const OFF_CAPACITY: usize = 8;
const OFF_WRITE: usize = 64;
const OFF_ABANDONED: usize = 72;
const OFF_READ: usize = 128;
const OFF_STATE: usize = 136;
const OFF_LEASE: usize = 144;

pub const PENDING: u32 = 0;
pub const ACCEPTED: u32 = 1;
pub const CLOSED: u32 = 2;

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock both processes read for the lease.
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

static FORKS: AtomicU64 = AtomicU64::new(0);
static PID: AtomicI32 = AtomicI32::new(0);
static AT_FORK: Once = Once::new();

extern "C" fn forked() {
    // In the child right after fork: atomics and getpid(2) only (async-signal-safe).
    FORKS.fetch_add(1, Ordering::SeqCst);
    PID.store(rustix::process::getpid().as_raw_nonzero().get(), Ordering::SeqCst);
}

/// This process: its pid, and how many forks separate it from the one that first asked
/// (a ring made before a fork belongs to the parent). No system call after the first.
pub fn this_process() -> (i32, u64) {
    AT_FORK.call_once(|| {
        PID.store(rustix::process::getpid().as_raw_nonzero().get(), Ordering::SeqCst);
        // SAFETY: registers a handler that only does async-signal-safe work.
        unsafe { libc::pthread_atfork(None, None, Some(forked)) };
    });
    (PID.load(Ordering::Relaxed), FORKS.load(Ordering::Relaxed))
}

/// Seconds on the wall clock (what request expirations count).
pub fn wall_now() -> f64 {
    let now = clock_gettime(ClockId::Realtime);
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// The FIFO line that announces a ring: `pid`'s file descriptor `fd`.
pub fn announcement(pid: i32, fd: i32) -> Vec<u8> {
    format!("{{\"elastic_timer_ring\": 1, \"pid\": {pid}, \"fd\": {fd}}}\n").into_bytes()
}

/// What an announcement line says: the pid and fd of a ring, or why it makes no sense.
pub type Announcement = Result<(i64, i32), String>;

/// The pid and fd of an announcement line (without its newline); None if it is not one.
pub fn parse_announcement(line: &[u8]) -> Option<Announcement> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        elastic_timer_ring: u32,
        pid: i64,
        fd: i32,
    }
    if !line.starts_with(b"{\"elastic_timer_ring\"") {
        return None;
    }
    Some(match serde_json::from_slice::<Line>(line) {
        Ok(a) if a.elastic_timer_ring == 1 && a.fd >= 0 => Ok((a.pid, a.fd)),
        Ok(a) => {
            Err(format!("ring announcement of version {} or fd {}", a.elastic_timer_ring, a.fd))
        }
        Err(err) => Err(format!("malformed ring announcement: {err}")),
    })
}

/// One request as the ring carries it (the pid is the ring's).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub scope: String,
    pub expiration: f64,
    pub signal: i32,
}

fn entry_len(scope_len: usize) -> usize {
    ENTRY_HEAD + scope_len.div_ceil(8) * 8
}

/// Parses the pending bytes `pending` (copied out of the ring in order, starting at offset
/// `start` of a data area of `capacity` bytes). Returns the entries, then an error if the
/// bytes stop making sense (the rest is then not to be trusted).
pub fn parse(pending: &[u8], start: usize, capacity: usize) -> (Vec<Entry>, Option<String>) {
    let mut entries = Vec::new();
    let mut at = 0;
    while at < pending.len() {
        let offset = (start + at) % capacity;
        let to_end = capacity - offset;
        let word = |i: usize| pending.get(at + i..at + i + 4).map(|b| b.try_into().unwrap());
        let Some(len) = word(0).map(u32::from_le_bytes) else {
            return (entries, Some(format!("ring entry cut short at byte {at}")));
        };
        if len == SKIP {
            at += to_end;
            continue;
        }
        let len = len as usize;
        let size = entry_len(len.min(MAX_SCOPE + 1));
        if len > MAX_SCOPE || size > to_end || at + size > pending.len() {
            return (entries, Some(format!("ring entry of {len} bytes does not fit")));
        }
        let signal = i32::from_le_bytes(word(4).unwrap_or_default());
        let expiration = f64::from_le_bytes(pending[at + 8..at + 16].try_into().unwrap());
        let scope = match std::str::from_utf8(&pending[at + ENTRY_HEAD..at + ENTRY_HEAD + len]) {
            Ok(scope) => scope.to_owned(),
            Err(err) => return (entries, Some(format!("ring entry's scope is not UTF-8: {err}"))),
        };
        entries.push(Entry { scope, expiration, signal });
        at += size;
    }
    (entries, None)
}

/// A ring mapped into this process.
#[derive(Debug)]
struct Mapping(NonNull<u8>);

// SAFETY: the mapping is only reached through atomics, from any thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(fd: impl AsFd) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of the whole file, which is sealed against shrinking
        // (so no access past its end can fault); unmapped on drop.
        let ptr = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                RING_BYTES,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        Ok(Self(NonNull::new(ptr.cast()).expect("mmap returns a mapping")))
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= RING_BYTES);
        // SAFETY: in bounds and aligned (the mapping is page-aligned); shared memory is only
        // accessed atomically.
        unsafe { &*self.0.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= RING_BYTES);
        // SAFETY: as for `u64_at`.
        unsafe { &*self.0.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// The data word at `offset` of the data area.
    fn data(&self, offset: usize) -> &AtomicU64 {
        self.u64_at(HEADER + offset)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer referenced.
        let _ = unsafe { mm::munmap(self.0.as_ptr().cast(), RING_BYTES) };
    }
}

/// What became of a request offered to the ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// In the ring; `wake`: the server must be woken for it (an empty FIFO line).
    Written { wake: bool },
    /// No room: wake the server and wait, or send by FIFO.
    Full,
    /// The server closed the ring (it stopped) or never took it: send by FIFO.
    Closed,
    /// Too long for the ring: send this one by FIFO (after abandoning the ring).
    TooLong,
}

/// The worker's end.
#[derive(Debug)]
pub struct Writer {
    map: Mapping,
    memfd: OwnedFd,
    write: u64,
    /// The process that made it (`this_process`): a forked child must not write to it.
    owner: (i32, u64),
}

impl Writer {
    /// Creates a ring (a sealed memfd of [`RING_BYTES`], closed on exec).
    pub fn create() -> io::Result<Self> {
        let memfd = fs::memfd_create(MEMFD_NAME, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        fs::ftruncate(&memfd, RING_BYTES as u64)?;
        fs::fcntl_add_seals(&memfd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let map = Mapping::map(&memfd)?;
        map.u32_at(OFF_CAPACITY).store(CAPACITY as u32, Ordering::Relaxed);
        map.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);
        Ok(Self { map, memfd, write: 0, owner: this_process() })
    }

    /// Whether this process made it (it was not inherited through a fork).
    pub fn is_own(&self) -> bool {
        this_process() == self.owner
    }

    /// The descriptor the server opens (`/proc/<pid>/fd/<this>`).
    pub fn fd(&self) -> i32 {
        self.memfd.as_raw_fd()
    }

    pub fn state(&self) -> u32 {
        self.map.u32_at(OFF_STATE).load(Ordering::Acquire)
    }

    /// From now on this worker sends by FIFO; the server drains what is here first.
    pub fn abandon(&self) {
        self.map.u32_at(OFF_ABANDONED).store(1, Ordering::SeqCst);
    }

    /// Appends one request. `near`: its deadline is too close for the lease's polling, so
    /// the server is woken for it.
    pub fn push(&mut self, scope: &[u8], expiration: f64, signal: i32, near: bool) -> Push {
        if self.state() != ACCEPTED {
            return Push::Closed;
        }
        if scope.len() > MAX_SCOPE {
            return Push::TooLong;
        }
        let read = self.map.u64_at(OFF_READ).load(Ordering::Acquire);
        let used = self.write.wrapping_sub(read) as usize;
        let offset = (self.write % CAPACITY as u64) as usize;
        let size = entry_len(scope.len());
        let skip = if size > CAPACITY - offset { CAPACITY - offset } else { 0 };
        if used > CAPACITY || CAPACITY - used < skip + size {
            return Push::Full;
        }
        if skip > 0 {
            self.map.data(offset).store(u64::from(SKIP), Ordering::Relaxed);
        }
        let start = (offset + skip) % CAPACITY;
        let head = u64::from(scope.len() as u32) | (u64::from(signal as u32) << 32);
        self.map.data(start).store(head, Ordering::Relaxed);
        self.map.data(start + 8).store(expiration.to_bits(), Ordering::Relaxed);
        for (i, chunk) in scope.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.map
                .data(start + ENTRY_HEAD + i * 8)
                .store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
        let half = CAPACITY / 2;
        let crossed_half = used < half && used + skip + size >= half;
        self.write += (skip + size) as u64;
        self.map.u64_at(OFF_WRITE).store(self.write, Ordering::Release);
        // Paired with the server's fence between giving up its lease and its last look: one
        // of the two sees the other.
        fence(Ordering::SeqCst);
        let lease = self.map.u64_at(OFF_LEASE).load(Ordering::Relaxed);
        Push::Written { wake: near || crossed_half || monotonic_ns() >= lease }
    }
}

/// The server's end of one worker's ring.
#[derive(Debug)]
pub struct Reader {
    map: Mapping,
    /// The server's own read position (the header's copy is only for the worker).
    read: u64,
}

impl Reader {
    /// Takes the ring in `memfd` (opened from `/proc/<pid>/fd/<fd>`): it must be a sealed
    /// memfd of exactly [`RING_BYTES`] with a ring's header.
    pub fn open(memfd: OwnedFd) -> Result<Self, String> {
        let stat = fs::fstat(&memfd).map_err(|err| format!("fstat: {err}"))?;
        if stat.st_size != RING_BYTES as i64 {
            return Err(format!("it has {} bytes, not {RING_BYTES}", stat.st_size));
        }
        let seals = fs::fcntl_get_seals(&memfd).map_err(|_| "it is not a memfd".to_owned())?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::SEAL) {
            return Err("it is not sealed against shrinking".to_owned());
        }
        let map = Mapping::map(&memfd).map_err(|err| format!("mmap: {err}"))?;
        if map.u64_at(OFF_MAGIC).load(Ordering::Acquire) != MAGIC
            || map.u32_at(OFF_CAPACITY).load(Ordering::Relaxed) != CAPACITY as u32
        {
            return Err("it has no ring header".to_owned());
        }
        if map.u32_at(OFF_STATE).load(Ordering::Acquire) != PENDING {
            return Err("it was taken already".to_owned());
        }
        let read = map.u64_at(OFF_WRITE).load(Ordering::Acquire);
        if read != 0 {
            return Err("it was written to before it was taken".to_owned());
        }
        Ok(Self { map, read })
    }

    pub fn set_state(&self, state: u32) {
        self.map.u32_at(OFF_STATE).store(state, Ordering::SeqCst);
    }

    pub fn set_lease(&self, until_ns: u64) {
        self.map.u64_at(OFF_LEASE).store(until_ns, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub fn abandoned(&self) -> bool {
        self.map.u32_at(OFF_ABANDONED).load(Ordering::Acquire) != 0
    }

    /// Takes what the worker wrote since the last drain; the error (if any) says why the
    /// rest of the ring cannot be trusted.
    pub fn drain(&mut self) -> (Vec<Entry>, Option<String>) {
        let write = self.map.u64_at(OFF_WRITE).load(Ordering::Acquire);
        let pending = write.wrapping_sub(self.read);
        if pending == 0 {
            return (Vec::new(), None);
        }
        if pending > CAPACITY as u64 || !pending.is_multiple_of(8) {
            return (Vec::new(), Some(format!("ring write position {write} is impossible")));
        }
        let start = (self.read % CAPACITY as u64) as usize;
        let mut bytes = Vec::with_capacity(pending as usize);
        for i in 0..pending as usize / 8 {
            let word = self.map.data((start + i * 8) % CAPACITY).load(Ordering::Relaxed);
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        self.read = write;
        self.map.u64_at(OFF_READ).store(write, Ordering::Release);
        parse(&bytes, start, CAPACITY)
    }
}

#[cfg(test)]
mod tests;
