//! Stack dumps: asking an expired worker where it is stuck, before it is signalled.
//!
//! A worker whose client elastic-timer built has armed `faulthandler` on a signal, to write
//! every thread's Python stack to `<dir>/<pid>-<start time>.stacks` (the start time tells the
//! worker from a later process given the same pid). Such a worker is sent that signal; for
//! others the server runs `py-spy dump` when it has one. Nothing here blocks: the loop polls
//! a dump until it is complete or its grace period ends, then reaps as usual.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

/// How often a dump in progress is looked at.
const POLL: Duration = Duration::from_millis(10);
/// The most of a dump kept (a process with thousands of threads writes megabytes).
const MAX_TEXT: u64 = 256 * 1024;

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
}

/// Where a dump came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Faulthandler,
    PySpy,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Faulthandler => "faulthandler",
            Source::PySpy => "py-spy",
        }
    }
}

/// A collected dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stacks {
    pub source: Source,
    /// What the worker (or py-spy) wrote, up to [`MAX_TEXT`] bytes; empty if nothing came
    /// within the grace period.
    pub text: String,
    /// False if the grace period ended first (the text may be cut short).
    pub complete: bool,
}

/// The file a worker armed for its stacks, named by its pid and start time.
pub fn armed_path(dir: &Path, pid: i32, start_time: u64) -> PathBuf {
    dir.join(format!("{pid}-{start_time}.stacks"))
}

/// A dump in progress.
#[derive(Debug)]
pub struct Dump {
    source: Source,
    path: PathBuf,
    /// Where this dump starts in the file (a worker left running by a dry run is dumped
    /// again into the same file).
    offset: u64,
    last_len: u64,
    py_spy: Option<Child>,
    until: Instant,
    complete: bool,
}

impl Dump {
    /// Asks worker `pid` for its stacks: `send` delivers the dump signal to it (and says
    /// whether it did). None if there is no way to get them.
    pub fn start(
        config: &Config,
        pid: i32,
        start_time: u64,
        send: impl FnOnce(Signal) -> bool,
        now: Instant,
    ) -> Option<Self> {
        let until = now + config.grace;
        let armed = armed_path(&config.dir, pid, start_time);
        if let Ok(metadata) = fs::metadata(&armed) {
            if send(config.signal) {
                let offset = metadata.len();
                let source = Source::Faulthandler;
                return Some(Self {
                    source,
                    path: armed,
                    offset,
                    last_len: offset,
                    py_spy: None,
                    until,
                    complete: false,
                });
            }
            return None;
        }
        let py_spy = config.py_spy.as_ref()?;
        let path = config.dir.join(format!("{pid}-{start_time}.py-spy"));
        let output = File::create(&path).ok()?;
        let errors = output.try_clone().ok()?;
        let child = Command::new(py_spy)
            .args(["dump", "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .ok()?;
        let py_spy = Some(child);
        Some(Self {
            source: Source::PySpy,
            path,
            offset: 0,
            last_len: 0,
            py_spy,
            until,
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
                let len = fs::metadata(&self.path).map_or(self.last_len, |m| m.len());
                let settled = len > self.offset && len == self.last_len;
                self.last_len = len;
                settled
            }
        };
        self.complete || now >= self.until
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
        let complete = self.complete;
        let text = read_from(&self.path, self.offset).unwrap_or_default();
        if self.source == Source::PySpy {
            let _ = fs::remove_file(&self.path);
        }
        Stacks { source: self.source, text, complete }
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

/// Up to [`MAX_TEXT`] bytes of `path` from `offset`, as text.
fn read_from(path: &Path, offset: u64) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.take(MAX_TEXT).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, py_spy: Option<PathBuf>) -> Config {
        Config { grace: Duration::from_secs(2), signal: Signal::USR2, dir: dir.into(), py_spy }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("et-stacks-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn an_armed_worker_is_signalled_and_its_new_output_read() {
        let dir = temp_dir("armed");
        let path = armed_path(&dir, 4242, 77);
        fs::write(&path, "an earlier dump\n").expect("write");
        let mut sent = None;
        let now = Instant::now();
        let mut dump =
            Dump::start(&config(&dir, None), 4242, 77, |s| sent.replace(s).is_none(), now)
                .expect("started");
        assert_eq!(sent, Some(Signal::USR2));
        assert!(!dump.poll(now), "nothing written yet");
        let mut file = fs::OpenOptions::new().append(true).open(&path).expect("open");
        std::io::Write::write_all(&mut file, b"Thread 0x1 (most recent call first):\n")
            .expect("write");
        assert!(!dump.poll(now), "grew: wait one more poll");
        assert!(dump.poll(now), "settled");
        let stacks = dump.finish();
        assert_eq!(stacks.source, Source::Faulthandler);
        assert_eq!(stacks.text, "Thread 0x1 (most recent call first):\n");
        assert!(stacks.complete);
        assert!(path.exists(), "the worker's file stays (a dry run may dump it again)");
        fs::remove_dir_all(&dir).expect("rm");
    }

    #[test]
    fn a_worker_not_armed_needs_py_spy_and_a_dump_ends_with_its_grace() {
        let dir = temp_dir("py-spy");
        let now = Instant::now();
        // Another process with the same pid armed (another start time): not this worker.
        fs::write(armed_path(&dir, 4242, 1), "").expect("write");
        assert!(Dump::start(&config(&dir, None), 4242, 2, |_| panic!("signalled"), now).is_none());
        // A stand-in for py-spy that prints its arguments, and one that never ends.
        let echo = Some(PathBuf::from("echo"));
        let mut dump =
            Dump::start(&config(&dir, echo), 4242, 2, |_| unreachable!(), now).expect("started");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dump.poll(Instant::now()) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let stacks = dump.finish();
        assert_eq!((stacks.source, stacks.text.as_str()), (Source::PySpy, "dump --pid 4242\n"));
        assert!(stacks.complete);
        let hang = dir.join("hang");
        fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").expect("write");
        fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let mut dump = Dump::start(&config(&dir, Some(hang)), 60, 2, |_| unreachable!(), now)
            .expect("started");
        assert!(dump.poll(now + Duration::from_secs(2)), "out of time");
        let stacks = dump.finish();
        assert!(!stacks.complete);
        assert_eq!(fs::read_dir(&dir).expect("ls").count(), 2, "py-spy output removed");
        fs::remove_dir_all(&dir).expect("rm");
    }
}
