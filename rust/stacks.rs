//! Stack dumps: asking an expired worker where it is stuck, before it is signalled.
//!
//! A worker whose client elastic-timer built has armed `faulthandler` on a signal, to write
//! every thread's Python stack to `<dir>/<pid>-<start time>.stacks` (the start time tells the
//! worker from a later process given the same pid). Such a worker is sent that signal; for
//! others the server runs `py-spy dump` when it has one. Nothing here blocks: the loop polls
//! a dump until it is complete or its grace period ends, then reaps as usual.
//!
//! The stacks directory may be writable by others, and the server may run as root, so the
//! worker's file is read as untrusted input (`untrusted`): it must be the worker's own
//! regular file, and no more than [`MAX_TEXT`] bytes of it are kept.

use std::fs::{self, File};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::untrusted;

/// The signal workers arm `faulthandler` on unless the server names another.
pub const DEFAULT_SIGNAL: Signal = Signal::USR2;
/// How often a dump in progress is looked at.
const POLL: Duration = Duration::from_millis(10);
/// The most of a dump kept (a process with thousands of threads writes megabytes).
const MAX_TEXT: usize = 256 * 1024;

/// How a server collects stacks.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long to wait for a dump before signalling anyway.
    pub grace: Duration,
    /// The signal workers' `faulthandler` is armed on.
    pub signal: Signal,
    /// Where armed workers write their stacks (and py-spy's output goes).
    pub dir: PathBuf,
    /// The `py-spy` executable, for workers that did not arm `faulthandler`.
    pub py_spy: Option<PathBuf>,
    /// How long an expired worker is held at least (within `grace`), even once its own
    /// stacks are in: time for the job's hang report to ask the other workers for theirs.
    pub hold: Duration,
}

/// Which tool wrote a dump (Python sees its name as `Stacks.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dumper {
    Faulthandler,
    PySpy,
}

impl Dumper {
    pub fn name(self) -> &'static str {
        match self {
            Dumper::Faulthandler => "faulthandler",
            Dumper::PySpy => "py-spy",
        }
    }
}

/// A collected dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stacks {
    pub source: Dumper,
    /// What the worker (or py-spy) wrote, up to [`MAX_TEXT`] bytes (then a line says it was
    /// cut); empty if nothing came within the grace period.
    pub text: String,
    /// False if the grace period ended first (the text may be cut short).
    pub complete: bool,
}

/// The file a worker armed for its stacks, named by its pid and start time.
pub fn armed_path(dir: &Path, pid: i32, start_time: u64) -> PathBuf {
    dir.join(format!("{pid}-{start_time}.stacks"))
}

/// The file this process, as a worker, arms for its stacks in `dir` ([`armed_path`]).
pub fn own_armed_path(dir: &Path) -> std::io::Result<PathBuf> {
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    Ok(armed_path(dir, pid, crate::procfs::own_start_time()?))
}

/// A dump in progress.
#[derive(Debug)]
pub struct Dump {
    source: Dumper,
    /// The file the stacks go to, opened once: what is read is the file that was checked,
    /// whatever is at its path by then.
    file: File,
    /// Where this dump starts in the file (a worker left running by a dry run is dumped
    /// again into the same file).
    offset: u64,
    last_len: u64,
    py_spy: Option<Child>,
    until: Instant,
    /// Not over before this, even when complete (see [`Config::hold`]).
    not_before: Option<Instant>,
    complete: bool,
}

impl Dump {
    /// Asks worker `pid` for its stacks: `send` delivers the dump signal to it (and says
    /// whether it did). Returns the dump (None if there is no way to get the stacks), and,
    /// if the worker's stacks file was not fit to read, why (then py-spy is tried).
    pub fn start(
        config: &Config,
        pid: i32,
        start_time: u64,
        send: impl FnOnce(Signal) -> bool,
        now: Instant,
    ) -> (Option<Self>, Option<String>) {
        let until = now + config.grace;
        let armed = armed_path(&config.dir, pid, start_time);
        let refused = match open_armed(&armed, pid) {
            Ok(Some(file)) => {
                // Before the signal: the worker may write at once.
                let offset = file.metadata().map_or(0, |m| m.len());
                if !send(config.signal) {
                    return (None, None);
                }
                let dump = Self {
                    source: Dumper::Faulthandler,
                    file,
                    offset,
                    last_len: offset,
                    py_spy: None,
                    until,
                    not_before: None,
                    complete: false,
                };
                return (Some(dump), None);
            }
            Ok(None) => None,
            Err(reason) => Some(format!(
                "Not reading {}, the stacks file of worker pid={pid}: {reason}",
                armed.display()
            )),
        };
        (Self::start_py_spy(config, pid, start_time, until), refused)
    }

    fn start_py_spy(config: &Config, pid: i32, start_time: u64, until: Instant) -> Option<Self> {
        let py_spy = config.py_spy.as_ref()?;
        let file = private_file(&config.dir.join(format!("{pid}-{start_time}.py-spy"))).ok()?;
        let output = file.try_clone().ok()?;
        let errors = file.try_clone().ok()?;
        let child = Command::new(py_spy)
            .args(["dump", "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .ok()?;
        Some(Self {
            source: Dumper::PySpy,
            file,
            offset: 0,
            last_len: 0,
            py_spy: Some(child),
            until,
            not_before: None,
            complete: false,
        })
    }

    /// A second reader of this dump (the same file, from the same point, with the same
    /// deadline), for someone else who wants these stacks: the worker is not signalled again,
    /// so the stacks are written once. None for a py-spy dump (its output is read once).
    pub fn follow(&self) -> Option<Self> {
        if self.py_spy.is_some() {
            return None;
        }
        Some(Self {
            source: self.source,
            file: self.file.try_clone().ok()?,
            offset: self.offset,
            last_len: self.offset,
            py_spy: None,
            until: self.until,
            not_before: None,
            complete: false,
        })
    }

    /// Whether the dump is over: complete, or out of time.
    pub fn poll(&mut self, now: Instant) -> bool {
        self.complete = match &mut self.py_spy {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => {
                // faulthandler writes from its signal handler, in one burst: the dump is
                // complete once the file has grown and then stayed the same for a poll.
                let len = self.file.metadata().map_or(self.last_len, |m| m.len());
                let settled = len > self.offset && len == self.last_len;
                self.last_len = len;
                settled
            }
        };
        (self.complete && self.not_before.is_none_or(|at| now >= at)) || now >= self.until
    }

    /// Holds the dump (its worker) until `now + hold`, within its grace.
    pub fn hold(&mut self, now: Instant, hold: Duration) {
        if !hold.is_zero() {
            self.not_before = Some((now + hold).min(self.until));
        }
    }

    /// When to poll next.
    pub fn next_poll(&self, now: Instant) -> Instant {
        (now + POLL).min(self.until)
    }

    /// The dump as collected by now (a py-spy still running is ended).
    pub fn finish(mut self) -> Stacks {
        if let Some(mut child) = self.py_spy.take() {
            if !self.complete {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let text = match untrusted::read_bounded(&self.file, self.offset, MAX_TEXT) {
            Ok(read) => {
                let mut text = String::from_utf8_lossy(&read.bytes).into_owned();
                if read.cut {
                    text.push_str(&format!("\n[cut: only the first {MAX_TEXT} bytes are shown]\n"));
                }
                text
            }
            Err(_) => String::new(),
        };
        Stacks { source: self.source, text, complete: self.complete }
    }
}

impl Drop for Dump {
    /// A dump dropped unfinished (its worker exited, or the server stopped) ends its py-spy.
    fn drop(&mut self) {
        if let Some(mut child) = self.py_spy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The stacks file worker `pid` armed, if it has one that is fit to read: its own (owned by
/// its real or effective uid), not a link, a regular file. The directory may be writable by
/// others, and the server may be root: what it logs must be what the worker wrote.
fn open_armed(path: &Path, pid: i32) -> Result<Option<File>, untrusted::Refused> {
    let Some(owners) = uids(pid) else {
        return Ok(None);
    };
    untrusted::open(path, &owners)
}

/// The real and effective uids of process `pid` (`/proc/<pid>/status`).
pub(crate) fn uids(pid: i32) -> Option<[u32; 2]> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    let mut fields = line.split_whitespace().map(str::parse);
    Some([fields.next()?.ok()?, fields.next()?.ok()?])
}

/// A new file of the server's own at `path` for py-spy's output, opened for reading too and
/// unlinked at once: nothing at that path (a link someone left there) is followed or read.
fn private_file(path: &Path) -> std::io::Result<File> {
    let create = || {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
    };
    let file = match create() {
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            create()?
        }
        result => result?,
    };
    fs::remove_file(path)?;
    Ok(file)
}

#[cfg(test)]
mod tests;
