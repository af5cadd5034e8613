//! What `/proc` says of a process, readable when the server's fd table is full.
//!
//! The reaper tells a worker that exited from one that runs by reading `/proc/<pid>/stat`. A
//! server whose fds are all taken (a flood of connections, a leak) cannot open that file, and
//! an error then must never read as "the worker is gone": only `ENOENT`/`ESRCH` say so. To
//! keep the answer available, `/proc` is opened once, when the server is built, and a spare fd
//! is held in reserve: when an open fails with `EMFILE`, the spare is closed, which frees the
//! one slot that open needs, and taken again once the file is read and closed.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{self, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::Pid;

/// The fields of `/proc/<pid>/stat` the reaper reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `D`, `T` (stopped), `t` (traced), `Z`, ...
    pub state: char,
    /// Field 4: the parent's pid.
    pub ppid: i32,
    /// Field 22: clock ticks since boot; with the pid, it names one process for good.
    pub start_time: u64,
}

impl Stat {
    fn parse(stat: &[u8]) -> Option<Self> {
        let stat = std::str::from_utf8(&stat[stat.iter().rposition(|&b| b == b')')? + 1..]).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count from its end.
        let mut fields = stat.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        let start_time = fields.nth(17)?.parse().ok()?;
        Some(Self { state, ppid, start_time })
    }
}

/// The start time of this process (see [`Stat::start_time`]), as the server reads it of a
/// worker: what a worker names its stacks file by.
pub fn own_start_time() -> io::Result<u64> {
    let stat = std::fs::read("/proc/self/stat")?;
    Stat::parse(&stat)
        .map(|stat| stat.start_time)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat"))
}

/// `/proc`, opened in advance, and one fd slot in reserve (see the module's documentation).
///
/// An answer is `Ok(Some(_))` (the process is there), `Ok(None)` (it is not: `ENOENT` or
/// `ESRCH`), or `Err` (no answer: `EMFILE`, `ENOMEM`, `EACCES`...; ask again later).
#[derive(Debug)]
pub struct Proc {
    dir: OwnedFd,
    /// Closed just before an open that failed with `EMFILE` is tried again, and taken again
    /// after; None while another thread holds the slot it freed (then taken at the next read).
    pub(crate) spare: RefCell<Option<OwnedFd>>,
}

impl Proc {
    pub fn open() -> io::Result<Self> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = fs::open("/proc", flags, Mode::empty())?;
        let spare = rustix::io::fcntl_dupfd_cloexec(&dir, 0)?;
        Ok(Self { dir, spare: RefCell::new(Some(spare)) })
    }

    /// `/proc/<pid>/stat`, parsed.
    pub fn stat(&self, pid: Pid) -> io::Result<Option<Stat>> {
        let Some(bytes) = self.read(pid, "stat")? else { return Ok(None) };
        Stat::parse(&bytes).map(Some).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid:?}/stat"))
        })
    }

    /// The start time of `pid` (see [`Stat::start_time`]).
    pub fn start_time(&self, pid: Pid) -> io::Result<Option<u64>> {
        Ok(self.stat(pid)?.map(|stat| stat.start_time))
    }

    /// The file `/proc/<pid>/<name>` (`name` has no `/`), whole.
    pub fn read(&self, pid: Pid, name: &str) -> io::Result<Option<Vec<u8>>> {
        let path = format!("{}/{name}", pid.as_raw_nonzero());
        let fd = match self.open_at(&path) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::SRCH) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let mut bytes = Vec::with_capacity(1024);
        let read = loop {
            bytes.reserve(1024);
            match rustix::io::read(&fd, rustix::buffer::spare_capacity(&mut bytes)) {
                Ok(0) => break Ok(Some(bytes)),
                Ok(_) | Err(Errno::INTR) => {}
                // The process exited after the open.
                Err(Errno::SRCH) => break Ok(None),
                Err(err) => break Err(err.into()),
            }
        };
        drop(fd);
        self.retake_spare();
        read
    }

    fn open_at(&self, path: &str) -> Result<OwnedFd, Errno> {
        // `<pid>` is never a link in /proc, and nor is the file: follow none.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
        match fs::openat(&self.dir, path, flags, Mode::empty()) {
            Err(Errno::MFILE) => {
                // The fd table is full: this open gets the reserved slot.
                drop(self.spare.borrow_mut().take());
                fs::openat(&self.dir, path, flags, Mode::empty())
            }
            opened => opened,
        }
    }

    /// Takes a slot in reserve again, if it was given up (and nobody took it since).
    fn retake_spare(&self) {
        let mut spare = self.spare.borrow_mut();
        if spare.is_none() {
            *spare = rustix::io::fcntl_dupfd_cloexec(&self.dir, 0).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{pid_of, sleeper};

    #[test]
    fn parses_the_fields_after_a_command_name_with_spaces_and_parentheses() {
        let line = b"42 (a (b) c) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 0 0";
        let stat = Stat::parse(line).expect("parsed");
        assert_eq!(stat, Stat { state: 'S', ppid: 7, start_time: 12345 });
        assert!(Stat::parse(b"42 (cut").is_none());
    }

    #[test]
    fn a_process_is_there_or_definitely_gone() {
        let proc = Proc::open().expect("/proc");
        let mut child = sleeper();
        let pid = pid_of(&child);
        let stat = proc.stat(pid).expect("an answer").expect("there");
        assert_eq!(stat.ppid, rustix::process::getpid().as_raw_nonzero().get());
        assert_eq!(proc.start_time(pid).expect("an answer"), Some(stat.start_time));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(proc.stat(pid).expect("an answer"), None, "reaped: gone");
    }
}
