//! The named-FIFO transport: one JSON line per request.
//!
//! Server side, the FIFO is opened non-blocking together with a write end of our own, so the
//! reader never sees end-of-file when the last client closes and opening never waits for a
//! client. Client side, a request is one `write` of at most `PIPE_BUF` bytes (atomic, so lines
//! of concurrent clients never interleave); a full pipe is waited on, bounded, instead of
//! failing with `BlockingIOError` as torch's client does.
//!
//! The server's [`Endpoint`] is the [`Transport`]: each line it reads is a request, a line
//! that is not one (kept as much as can be: see `decode_line`), or a worker's ring
//! announcement; an empty line only wakes the loop for the rings.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{self, inotify, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use rustix::time::{clock_gettime, ClockId};

use super::{Arrival, Repaired, Transport};
use crate::{codec, fork, ring, untrusted};

/// The longest request line (without its newline): writes up to `PIPE_BUF` bytes are atomic.
pub const MAX_LINE: usize = libc::PIPE_BUF;

/// How much one `read_lines` call takes before it lets the loop look at its deadlines again.
const READ_BUDGET: usize = 1 << 20;

/// Which file a path named: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(stat: &fs::Stat) -> Self {
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
        Self { dev: stat.st_dev as u64, ino: stat.st_ino as u64 }
    }
}

/// Creates the FIFO at `path`, replacing whatever is there (as torch's server does), with
/// the permissions `mode` (None: 0666 less the umask) and our mark.
///
/// The directory may be writable by others (`/tmp`), who may swap a link in after `mkfifo`:
/// the mode is set on the open FIFO, never by path, and the open follows no link. The FIFO
/// must be one of this process's euid; its identity is that of the file opened.
pub fn create(path: &Path, mode: Option<Mode>) -> io::Result<Identity> {
    match fs::unlink(path) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(err) => return Err(err.into()),
    }
    fs::mkfifoat(CWD, path, mode.unwrap_or(Mode::from_raw_mode(0o666)))?;
    // Non-blocking, a FIFO's read end opens at once, writer or not.
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fifo = match fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::LOOP) => return Err(replaced(path, "a symbolic link")),
        Err(err) => return Err(err.into()),
    };
    let created = fs::fstat(&fifo)?;
    if FileType::from_raw_mode(created.st_mode) != FileType::Fifo {
        return Err(replaced(path, "a file that is not a FIFO"));
    }
    if !is_own(&created) {
        return Err(replaced(path, &format!("a FIFO of uid {}", created.st_uid)));
    }
    // The sticky bit means nothing on a FIFO: it tells our clients that this server never
    // needs them to close it, so they may keep it open (see `Client`). An explicit mode is
    // set whole, whatever the umask.
    let mode = mode.unwrap_or(Mode::from_raw_mode(created.st_mode & 0o777));
    fs::fchmod(&fifo, mode | Mode::SVTX)?;
    Ok(Identity::of(&created))
}

/// Whether a file belongs to this process's euid.
fn is_own(stat: &fs::Stat) -> bool {
    stat.st_uid == rustix::process::geteuid().as_raw()
}

/// The error of a FIFO whose path someone else took between its `mkfifo` and its open.
fn replaced(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} was replaced by {what} right after it was created", path.display()),
    )
}

/// What a client found when it opened a FIFO's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Not a FIFO: no server.
    NotAFifo,
    /// torch's server's FIFO, or one of another user's: opened and closed for each request,
    /// as torch's client does. Another user may have made it while our server restarted: a
    /// client keeping it open would go on writing to it once our server is back.
    PerRequest,
    /// One our server made (its mark), of this process's user or root: kept open.
    Trusted(Identity),
}

/// What the FIFO `fd` is, to a client (see [`Found`]).
fn found(fd: &OwnedFd) -> io::Result<Found> {
    let stat = fs::fstat(fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Fifo {
        return Ok(Found::NotAFifo);
    }
    let marked = Mode::from_raw_mode(stat.st_mode).contains(Mode::SVTX);
    Ok(if marked && untrusted::us_or_root().contains(&stat.st_uid) {
        Found::Trusted(Identity::of(&stat))
    } else {
        Found::PerRequest
    })
}

/// Where our server names its stacks directory for its clients, when it takes stacks: the
/// file `<fifo>.stacks` beside the FIFO, holding the directory's path. (The Python server
/// writes it at start and removes it at stop; `Client` reads it when it connects.)
pub fn stacks_sidecar(fifo: &Path) -> PathBuf {
    let mut path = fifo.as_os_str().to_owned();
    path.push(".stacks");
    path.into()
}

/// What a client learned from the stacks sidecar of the server it connected to.
#[derive(Debug, PartialEq, Eq)]
pub enum Announced {
    /// The stacks directory the server named.
    StacksDir(PathBuf),
    /// A sidecar that is not fit to use, and why (never its content: the file may be
    /// anything, a secret included).
    Refused(String),
}

/// The stacks directory named beside the FIFO `fifo` (a trusted one, see [`Found`]), opened at
/// `path`. None if there is no sidecar.
fn announced_stacks_dir(path: &Path, fifo: &OwnedFd) -> Option<Announced> {
    let sidecar = stacks_sidecar(path);
    let refused = |reason: &dyn std::fmt::Display| {
        let path = sidecar.display();
        Some(Announced::Refused(format!("the stacks sidecar {path} is refused: {reason}")))
    };
    let mut read = match read_sidecar(&sidecar, fifo) {
        Ok(Some(read)) => read,
        Ok(None) => return None,
        Err(err) => return refused(&err),
    };
    if read.bytes.last() == Some(&b'\n') {
        read.bytes.pop();
    }
    let dir = PathBuf::from(OsString::from_vec(read.bytes));
    if read.cut || !dir.is_absolute() {
        return refused(&"it does not hold an absolute path of at most PATH_MAX bytes");
    }
    Some(Announced::StacksDir(dir))
}

/// The sidecar's first `PATH_MAX` bytes, if it is a regular file of the FIFO's owner (no other
/// user can send the workers elsewhere): not a link, not a FIFO, no other hard link.
fn read_sidecar(
    sidecar: &Path,
    fifo: &OwnedFd,
) -> Result<Option<untrusted::Bounded>, untrusted::Refused> {
    let owner = fs::fstat(fifo).map_err(io::Error::from)?.st_uid;
    let Some(file) = untrusted::open(sidecar, &[owner])? else { return Ok(None) };
    Ok(Some(untrusted::read_bounded(&file, 0, libc::PATH_MAX as usize)?))
}

/// Removes the FIFO at `path` if it is still there.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::unlink(path) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Removes the FIFO at `path` if it is still the one created (not another server's since).
pub fn remove_if(path: &Path, identity: Identity) -> io::Result<()> {
    match path_state(path, identity) {
        PathState::Ours => remove(path),
        _ => Ok(()),
    }
}

/// What is at a FIFO's path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// The FIFO with the identity given.
    Ours,
    /// Nothing (deleted, or renamed away).
    Missing,
    /// Something that is not a FIFO: no client can reach a server through it.
    NotAFifo,
    /// Another FIFO (another server started on the same path, say).
    OtherFifo,
}

/// What is at `path` now, compared with the FIFO `identity`.
pub fn path_state(path: &Path, identity: Identity) -> PathState {
    // A link is never followed: one at the path is not the FIFO, whatever it points to.
    match fs::lstat(path) {
        Ok(stat) if Identity::of(&stat) == identity => PathState::Ours,
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Fifo => PathState::OtherFifo,
        Ok(_) => PathState::NotAFifo,
        Err(_) => PathState::Missing,
    }
}

/// Notices when a FIFO's path may no longer lead to it: an inotify watch on the FIFO itself,
/// which reports its unlinking (link count, `IN_ATTRIB`) and renaming (`IN_MOVE_SELF`) but
/// not the clients' opens and writes.
#[derive(Debug)]
pub struct Watch {
    inotify: OwnedFd,
}

impl Watch {
    pub fn new(path: &Path) -> io::Result<Self> {
        let inotify =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        let flags = inotify::WatchFlags::ATTRIB
            | inotify::WatchFlags::MOVE_SELF
            | inotify::WatchFlags::DELETE_SELF;
        inotify::add_watch(&inotify, path, flags)?;
        Ok(Self { inotify })
    }

    /// Readable when the path should be looked at again.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Discards the notifications read so far.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rustix::io::read(&self.inotify, &mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// The server's FIFO at its path, from creation to removal, the one owner of its lifecycle:
/// created when the server is built (as torch's server does), opened for the loop, created
/// again when something deletes or replaces it, and removed on stop if it is still the one
/// this server made.
#[derive(Debug)]
pub struct Endpoint {
    path: PathBuf,
    /// The permissions it is created with (None: 0666 less the umask).
    mode: Option<Mode>,
    /// The FIFO this server created last (or opened), while it is its to remove.
    ours: Option<Identity>,
    /// While the loop runs: the open FIFO, and the watch on its path (None where inotify is
    /// unavailable, or once another FIFO took the path).
    open: Option<(Reader, Option<Watch>)>,
}

/// How often the endpoint creates the FIFO again, after its path changed, before it gives up
/// on a path that changes faster than it can be repaired.
const MAX_REPAIRS: usize = 8;

/// What [`Endpoint::look_again`] found at the FIFO's path.
#[derive(Debug)]
enum Repair {
    /// Still this server's FIFO.
    Ours,
    /// Another FIFO (another server's) took the path: left alone, and not removed on stop.
    TakenOver,
    /// This server's FIFO `what` (was deleted, ...) and was created again: its new fds need
    /// watching.
    Recreated(&'static str),
    /// This server's FIFO `what`, and creating it again failed.
    Failed(&'static str, io::Error),
}

impl Endpoint {
    /// Creates the FIFO at `path`, replacing whatever is there (see [`create`]).
    pub fn create(path: PathBuf, mode: Option<Mode>) -> io::Result<Self> {
        let ours = Some(create(&path, mode)?);
        Ok(Self { path, mode, ours, open: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what the open FIFO holds (see [`Reader::read_lines`]).
    fn read_lines(&mut self, sink: impl FnMut(Line<'_>)) -> io::Result<usize> {
        match &mut self.open {
            Some((reader, _)) => reader.read_lines(sink),
            None => Ok(0),
        }
    }

    /// Looks at the path after the watch said it changed. This server's FIFO deleted, or
    /// replaced by something that is not a FIFO, is created again, so clients keep reaching
    /// the server; what they wrote into the old one is read first, into `sink`. `unwatch` is
    /// given each fd about to be closed (the old FIFO's, the old watch's).
    fn look_again(
        &mut self,
        mut sink: impl FnMut(Line<'_>),
        unwatch: &mut dyn FnMut(BorrowedFd<'_>),
    ) -> Repair {
        let Some((reader, watch)) = &mut self.open else { return Repair::Ours };
        if let Some(watch) = watch.as_ref() {
            watch.drain();
        }
        let mut recreated = None;
        // The watch on a new FIFO is set up after the FIFO is made: a change in between would
        // never be reported, so the path is looked at again until it settles.
        for _ in 0..MAX_REPAIRS {
            let what = match path_state(&self.path, reader.identity()) {
                PathState::Ours => return recreated.map_or(Repair::Ours, Repair::Recreated),
                PathState::OtherFifo => {
                    if let Some(watch) = watch.take() {
                        unwatch(watch.fd());
                    }
                    self.ours = None;
                    return Repair::TakenOver;
                }
                PathState::Missing => "was deleted",
                PathState::NotAFifo => "was replaced by a file that is not a FIFO",
            };
            let replacement = create(&self.path, self.mode)
                .and_then(|identity| Ok((identity, Reader::open(&self.path)?)));
            let (identity, new_reader) = match replacement {
                Ok(replacement) => replacement,
                Err(err) => return Repair::Failed(what, err),
            };
            while matches!(reader.read_lines(&mut sink), Ok(n) if n > 0) {}
            unwatch(reader.fd());
            if let Some(watch) = watch.as_ref() {
                unwatch(watch.fd());
            }
            *reader = new_reader;
            *watch = Watch::new(&self.path).ok();
            self.ours = Some(identity);
            recreated = Some(what);
        }
        Repair::Failed("keeps changing", io::Error::other("its path changed on every repair"))
    }
}

impl Transport for Endpoint {
    /// Opens the FIFO for the loop, creating it again if `withdraw` removed it (or something
    /// that is not a FIFO of this user took its place).
    fn open(&mut self) -> io::Result<Option<String>> {
        let is_own_fifo = fs::lstat(&self.path).is_ok_and(|stat| {
            FileType::from_raw_mode(stat.st_mode) == FileType::Fifo && is_own(&stat)
        });
        if !is_own_fifo {
            create(&self.path, self.mode)?;
        }
        let reader = Reader::open(&self.path)?;
        self.ours = Some(reader.identity());
        // Without the watch, a deleted FIFO is not noticed (clients then get BrokenPipeError).
        self.open = Some((reader, Watch::new(&self.path).ok()));
        Ok(None)
    }

    /// The open FIFO's fd, readable when clients wrote.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.open.as_ref().map(|(reader, _)| reader.fd())
    }

    /// The inotify watch on the FIFO, readable when it was deleted, renamed or replaced.
    fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        self.open.as_ref()?.1.as_ref().map(Watch::fd)
    }

    fn read(&mut self, out: &mut Vec<Arrival>) -> io::Result<usize> {
        self.read_lines(|line| decode_line(line, out))
    }

    fn repair(
        &mut self,
        out: &mut Vec<Arrival>,
        unwatch: &mut dyn FnMut(BorrowedFd<'_>),
    ) -> Repaired {
        let path = self.path.display().to_string();
        let (warning, new_fds) = match self.look_again(|line| decode_line(line, out), unwatch) {
            Repair::Ours => return Repaired::default(),
            Repair::TakenOver => (
                format!(
                    "{path} is now another FIFO (another timer server?): new requests go to \
                     that one, and this server no longer removes it on stop"
                ),
                false,
            ),
            Repair::Recreated(what) => (format!("{path} {what}; created it again"), true),
            Repair::Failed(what, err) => (
                format!(
                    "{path} {what}, and creating it again failed: {err}; clients cannot reach \
                     this server"
                ),
                false,
            ),
        };
        Repaired { warning: Some(warning), new_fds }
    }

    /// Removes the FIFO if it is still the one this server created (torch removes it on
    /// stop; clients then get BrokenPipeError). Another server's FIFO at the path stays.
    fn withdraw(&mut self) {
        if let Some(identity) = self.ours.take() {
            let _ = remove_if(&self.path, identity);
        }
    }

    /// Reads what is left, then closes the FIFO (see [`Reader::close`]).
    fn close(&mut self, out: &mut Vec<Arrival>) {
        if let Some((reader, _watch)) = self.open.take() {
            reader.close(|line| decode_line(line, out));
        }
    }
}

/// Decodes one line: a request, or a worker's ring announcement. A line that does not decode
/// but ends with a client's request (written after someone left garbage without a newline)
/// costs only the garbage.
fn decode_line(line: Line<'_>, out: &mut Vec<Arrival>) {
    if let Line::Complete(bytes) = line {
        if let Some(announcement) = ring::parse_announcement(bytes) {
            return out.push(Arrival::Ring(announcement));
        }
    }
    let (error, end) = match line {
        Line::Complete(bytes) => match codec::decode_json_line(bytes) {
            Ok(request) => return out.push(Arrival::Request(request)),
            Err(err) => (err.to_string(), bytes),
        },
        Line::TooLong { len, tail } => {
            (format!("line of {len} bytes is longer than PIPE_BUF ({MAX_LINE} bytes)"), tail)
        }
    };
    match codec::salvage_json_line(end) {
        Some((_, request)) => {
            out.push(Arrival::Malformed(format!("{error}; the request at its end was kept")));
            out.push(Arrival::Request(request));
        }
        None => out.push(Arrival::Malformed(error)),
    }
}

/// One item read from the FIFO.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its newline.
    Complete(&'a [u8]),
    /// A line longer than `MAX_LINE`: its length in bytes, and its last `MAX_LINE` bytes (a
    /// client's request written after garbage that had no newline ends up there).
    TooLong { len: usize, tail: &'a [u8] },
}

/// The server's end of the FIFO.
#[derive(Debug)]
pub struct Reader {
    read: OwnedFd,
    /// Held so the FIFO always has a writer: no end-of-file, no busy loop between clients.
    _write: OwnedFd,
    /// The end of the current line, at most `MAX_LINE` bytes: memory stays bounded whatever
    /// is written.
    pending: Vec<u8>,
    /// Bytes of the current line dropped from the front of `pending` to keep it bounded.
    dropped: usize,
    identity: Identity,
    /// The read buffer, allocated once (zeroing 64 KiB per read cost more than the read).
    chunk: Box<[u8]>,
}

impl Reader {
    /// Opens the FIFO at `path` (it must exist, and be this user's).
    pub fn open(path: &Path) -> io::Result<Self> {
        let flags = OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let not_a_fifo = || {
            let message = format!("{} is not a FIFO of this user", path.display());
            io::Error::new(io::ErrorKind::InvalidInput, message)
        };
        let read = fs::open(path, OFlags::RDONLY | flags, Mode::empty())?;
        let stat = fs::fstat(&read)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Fifo || !is_own(&stat) {
            return Err(not_a_fifo());
        }
        let identity = Identity::of(&stat);
        let write = fs::open(path, OFlags::WRONLY | flags, Mode::empty())?;
        // Both ends of the same FIFO, even if the path changed in between.
        if Identity::of(&fs::fstat(&write)?) != identity {
            return Err(not_a_fifo());
        }
        fork::close_in_children(read.as_raw_fd());
        fork::close_in_children(write.as_raw_fd());
        Ok(Self {
            read,
            _write: write,
            pending: Vec::with_capacity(MAX_LINE),
            dropped: 0,
            identity,
            chunk: vec![0; 64 * 1024].into_boxed_slice(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The FIFO this reader has open.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Reads what the FIFO holds (up to a budget) and hands each line to `sink`.
    ///
    /// A partial line is kept for the next call. Returns the number of bytes read; 0 means the
    /// FIFO is empty.
    pub fn read_lines(&mut self, mut sink: impl FnMut(Line<'_>)) -> io::Result<usize> {
        let mut chunk = std::mem::take(&mut self.chunk);
        let mut total = 0;
        let result = loop {
            if total >= READ_BUDGET {
                break Ok(total);
            }
            let n = match rustix::io::read(&self.read, &mut chunk[..]) {
                Ok(0) | Err(Errno::AGAIN) => break Ok(total),
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(err) => break Err(err.into()),
            };
            total += n;
            self.split(&chunk[..n], &mut sink);
            if n < chunk.len() {
                // Drained for now; epoll says when there is more.
                break Ok(total);
            }
        };
        self.chunk = chunk;
        result
    }

    /// Reads what is left, then closes the FIFO at once (its read end first).
    pub fn close(mut self, mut sink: impl FnMut(Line<'_>)) {
        while matches!(self.read_lines(&mut sink), Ok(n) if n > 0) {}
    }

    fn split(&mut self, mut bytes: &[u8], sink: &mut impl FnMut(Line<'_>)) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&bytes[..end], &bytes[end + 1..]);
            if self.pending.is_empty() && self.dropped == 0 {
                emit(line, 0, sink);
            } else {
                self.keep(line);
                emit(&self.pending, self.dropped, sink);
                self.pending.clear();
                self.dropped = 0;
            }
            bytes = rest;
        }
        self.keep(bytes);
    }

    /// Appends to the current line, keeping only its last `MAX_LINE` bytes.
    fn keep(&mut self, bytes: &[u8]) {
        let total = self.pending.len() + bytes.len();
        if total <= MAX_LINE {
            self.pending.extend_from_slice(bytes);
            return;
        }
        let excess = total - MAX_LINE;
        self.dropped += excess;
        if excess >= self.pending.len() {
            let skip = excess - self.pending.len();
            self.pending.clear();
            self.pending.extend_from_slice(&bytes[skip..]);
        } else {
            self.pending.drain(..excess);
            self.pending.extend_from_slice(bytes);
        }
    }
}

/// Hands on a complete line whose first `dropped` bytes were not kept.
fn emit(line: &[u8], dropped: usize, sink: &mut impl FnMut(Line<'_>)) {
    let len = dropped + line.len();
    if len > MAX_LINE {
        sink(Line::TooLong { len, tail: &line[line.len().saturating_sub(MAX_LINE)..] });
    } else if !line.iter().all(u8::is_ascii_whitespace) {
        sink(Line::Complete(line));
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Before the fds close, and their numbers can be reused.
        fork::keep_in_children(self.read.as_raw_fd());
        fork::keep_in_children(self._write.as_raw_fd());
    }
}

/// Why a client could not send a request.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no timer server is reading {path}: {source}")]
    NoServer { path: String, source: io::Error },
    #[error("request of {0} bytes is larger than PIPE_BUF ({MAX_LINE} bytes)")]
    TooLong(usize),
    #[error("the timer server did not make room in the pipe within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How long a client waits for a server that is starting, and for room in a full pipe.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    pub connect_timeout: Duration,
    pub send_timeout: Duration,
}

/// Sends one request line (which must end with a newline) to the server reading `path`.
pub fn send_line(path: &Path, line: &[u8], options: SendOptions) -> Result<(), SendError> {
    Client::new(path.into(), options).send(line)
}

/// A client of one server's FIFO.
///
/// With torch's server each request opens the FIFO, writes one line and closes it, as torch's
/// client does: torch's server reads with a blocking `readline` that only returns at end of
/// file, so a client that kept the FIFO open would stall its watchdog loop. A FIFO our server
/// created carries a mark (see `create`): then, if it belongs to this process's user or root
/// (see [`Found`]), the FIFO is kept open between requests, and opened again when the server
/// has gone or its path leads to another FIFO (looked at every [`PATH_CHECK`]). On each
/// connection to such a FIFO (the first request, and after a restart; not per request), the
/// client reads the stacks directory the server names beside it (`stacks_sidecar`), for
/// `take_announced`.
///
/// To such a server, after the third request of a connection, the client offers a
/// shared-memory ring (`crate::ring`): once the server has taken it, requests of this process
/// go there, with no system call, and by FIFO again once the ring is full, too long for a
/// scope, closed by the server, inherited through a fork, or the FIFO's path leads elsewhere.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    options: SendOptions,
    /// The open FIFO, while it is a trusted one of our servers'.
    kept: Mutex<Option<Kept>>,
    /// When (`coarse_now_ns`) to look again whether the kept FIFO's path leads to it.
    next_path_check: AtomicU64,
    /// What the server named beside its FIFO at the last connection, until taken.
    announced: Mutex<Option<Announced>>,
    /// The ring offered to our server, and taken (`ring::Channel` is this client's FIFO).
    pub ring: ring::Sender,
}

/// A FIFO a client keeps open.
#[derive(Debug)]
struct Kept {
    fd: OwnedFd,
    identity: Identity,
}

/// How often a client keeping a FIFO open looks whether the FIFO's path still leads to it
/// (the server restarted while another process held the old FIFO open, or someone replaced
/// it). A `stat` of the path costs 1.3-2 us, as much as a request (1.3 us here); once per
/// interval it costs nothing.
pub const PATH_CHECK: Duration = Duration::from_millis(50);

impl Client {
    pub fn new(path: PathBuf, options: SendOptions) -> Self {
        Self {
            path,
            options,
            kept: Mutex::new(None),
            next_path_check: AtomicU64::new(0),
            announced: Mutex::new(None),
            ring: ring::Sender::default(),
        }
    }

    fn kept(&self) -> MutexGuard<'_, Option<Kept>> {
        self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the server named beside its FIFO when this client connected to it (once per
    /// connection: None until the next one).
    pub fn take_announced(&self) -> Option<Announced> {
        self.announced.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    /// Lets go of the kept FIFO, and of the ring it carries, if the FIFO's path now leads
    /// elsewhere (looked at every [`PATH_CHECK`]): the next request connects to what is there.
    pub fn check_path(&self) {
        // Most requests stop here: a read of the coarse clock (7 ns; the precise one, 50 ns,
        // would add 2% to a request), no lock.
        let now = coarse_now_ns();
        if now < self.next_path_check.load(Ordering::Relaxed) {
            return;
        }
        let moved = {
            let mut kept = self.kept();
            let Some(open) = kept.as_ref() else { return };
            self.next_path_check.store(now + PATH_CHECK.as_nanos() as u64, Ordering::Relaxed);
            let moved = path_state(&self.path, open.identity) != PathState::Ours;
            if moved {
                *kept = None;
            }
            moved
        };
        // The ring's lock is never taken under the FIFO's.
        if moved {
            self.ring.leave();
        }
    }

    /// A request went through a new connection to `fifo`, a trusted one of our servers'.
    fn connected(&self, fd: OwnedFd, identity: Identity) -> Kept {
        self.ring.arm();
        if let Some(announced) = announced_stacks_dir(&self.path, &fd) {
            *self.announced.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
                Some(announced);
        }
        let next_check = coarse_now_ns() + PATH_CHECK.as_nanos() as u64;
        self.next_path_check.store(next_check, Ordering::Relaxed);
        Kept { fd, identity }
    }

    /// Sends the line if that needs no waiting (a server reading, room in the pipe). Returns
    /// false, having sent nothing, when `send` must do it.
    pub fn try_send(&self, line: &[u8]) -> Result<bool, SendError> {
        // Only atomic writes: a partial write would be sent again by `send`.
        if line.len() > libc::PIPE_BUF {
            return Ok(false);
        }
        self.check_path();
        let mut kept = self.kept();
        let (fd, found) = match kept.take() {
            Some(open) => {
                let written = rustix::io::write(&open.fd, line);
                if written.is_ok() {
                    *kept = Some(open);
                }
                return sent(written);
            }
            None => {
                let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
                let Ok(fd) = fs::open(&self.path, flags, Mode::empty()) else {
                    return Ok(false);
                };
                match found(&fd)? {
                    Found::NotAFifo => return Ok(false),
                    found => (fd, found),
                }
            }
        };
        let written = rustix::io::write(&fd, line);
        if let (Ok(_), Found::Trusted(identity)) = (&written, found) {
            *kept = Some(self.connected(fd, identity));
        }
        sent(written)
    }

    /// Sends one request line (which must end with a newline), waiting as the options allow.
    pub fn send(&self, line: &[u8]) -> Result<(), SendError> {
        if line.len() > MAX_LINE + 1 {
            return Err(SendError::TooLong(line.len() - 1));
        }
        self.check_path();
        let mut kept = self.kept();
        if let Some(open) = kept.take() {
            match write_all(&open.fd, line, self.options.send_timeout) {
                Ok(()) => {
                    *kept = Some(open);
                    return Ok(());
                }
                // Nobody reads this FIFO any more (the server stopped or restarted). A write
                // of at most PIPE_BUF bytes is all or nothing, so sending again is safe.
                Err(SendError::Io(source)) if source.kind() == io::ErrorKind::BrokenPipe => {}
                Err(err) => return Err(err),
            }
        }
        let (fd, found) = connect(&self.path, self.options.connect_timeout)?;
        match write_all(&fd, line, self.options.send_timeout) {
            Ok(()) => {
                if let Found::Trusted(identity) = found {
                    *kept = Some(self.connected(fd, identity));
                }
                Ok(())
            }
            Err(SendError::Io(source)) if source.kind() == io::ErrorKind::BrokenPipe => {
                Err(SendError::NoServer { path: self.path.display().to_string(), source })
            }
            Err(err) => Err(err),
        }
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: a few milliseconds behind, and cheap to read.
fn coarse_now_ns() -> u64 {
    let now = clock_gettime(ClockId::MonotonicCoarse);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// What a non-blocking write of a whole line came to: sent (true), or to be sent again by
/// `send` (false).
fn sent(written: rustix::io::Result<usize>) -> Result<bool, SendError> {
    match written {
        Ok(_) => Ok(true),
        Err(Errno::AGAIN | Errno::PIPE | Errno::INTR) => Ok(false),
        Err(err) => Err(SendError::Io(err.into())),
    }
}

impl ring::Channel for Client {
    fn announce(&self, pid: i32, fd: i32) -> bool {
        let line = ring::announcement(pid, fd);
        match self.kept().as_ref() {
            Some(kept) => matches!(rustix::io::write(&kept.fd, &line), Ok(n) if n == line.len()),
            None => false,
        }
    }

    /// An empty line; false if the FIFO has no reader.
    fn wake(&self) -> bool {
        let kept = self.kept();
        let Some(open) = kept.as_ref() else { return false };
        // A full pipe wakes the server anyway.
        !matches!(rustix::io::write(&open.fd, b"\n"), Err(Errno::PIPE))
    }
}

fn connect(path: &Path, timeout: Duration) -> Result<(OwnedFd, Found), SendError> {
    let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let deadline = Instant::now() + timeout;
    let no_server =
        |source: io::Error| SendError::NoServer { path: path.display().to_string(), source };
    loop {
        match fs::open(path, flags, Mode::empty()) {
            Ok(fd) => {
                return match found(&fd)? {
                    Found::NotAFifo => {
                        let not_a_fifo = io::Error::new(io::ErrorKind::InvalidInput, "not a FIFO");
                        Err(no_server(not_a_fifo))
                    }
                    found => Ok((fd, found)),
                };
            }
            // No FIFO yet, or nobody reading it: the server may be starting.
            Err(err @ (Errno::NOENT | Errno::NXIO)) => {
                if Instant::now() >= deadline {
                    return Err(no_server(err.into()));
                }
                thread::sleep(Duration::from_millis(5).min(timeout));
            }
            Err(Errno::INTR) => {}
            Err(err) => return Err(no_server(err.into())),
        }
    }
}

fn write_all(fd: &OwnedFd, mut line: &[u8], timeout: Duration) -> Result<(), SendError> {
    let deadline = Instant::now() + timeout;
    while !line.is_empty() {
        match rustix::io::write(fd, line) {
            Ok(n) => line = &line[n..],
            Err(Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(SendError::Timeout(timeout));
                }
                let mut fds = [PollFd::new(fd, PollFlags::OUT)];
                let wait = rustix::time::Timespec::try_from(left)
                    .unwrap_or(rustix::time::Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
                match poll(&mut fds, Some(&wait)) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(err) => return Err(SendError::Io(err.into())),
                }
            }
            Err(Errno::INTR) => {}
            Err(err) => return Err(SendError::Io(err.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
