//! What the crate's tests share: real child processes to time, signal and reap.

use std::io::BufRead;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};

use rustix::process::Pid;

/// A `sleep 30`: a real process that is ours to signal.
pub fn sleeper() -> Child {
    Command::new("sleep").arg("30").spawn().expect("spawn sleep")
}

pub fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32).expect("a child's pid")
}

/// `sh -c script`, once it has printed its first line (a handshake), and that line.
pub fn shell_once_it_says(script: &str) -> (Child, String) {
    said_its_first_line(Command::new("sh").args(["-c", script]))
}

/// A shell with `name=value` in its environment, stopped (SIGSTOP) by itself once it has
/// said so: after its own exec, so its `/proc/<pid>/environ` is final. (A shell that execs
/// another program shows its own until the kernel has set up the new one's, which may be
/// after the new name shows and after `vfork` lets the parent go on.) SIGKILL ends it.
pub fn shell_with_env(name: &str, value: &str) -> Child {
    let mut shell = Command::new("sh");
    shell.args(["-c", "echo ready; kill -STOP $$"]).env(name, value);
    let (shell, line) = said_its_first_line(&mut shell);
    assert_eq!(line, "ready\n");
    shell
}

fn said_its_first_line(command: &mut Command) -> (Child, String) {
    let mut shell = command.stdout(Stdio::piped()).spawn().expect("spawn sh");
    let mut line = String::new();
    let stdout = shell.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("read");
    (shell, line)
}

/// Set in the copy of the test binary that runs one test in a process of its own.
const OWN_PROCESS: &str = "ELASTIC_TIMER_TEST_OWN_PROCESS";

/// Whether this is the copy of the test binary that runs `test` (its full name) alone; if not,
/// runs that copy, asserts it passed, and returns false. For tests that change what is
/// per process (the fd limit): the caller goes on only when this returns true.
pub fn in_own_process(test: &str) -> bool {
    if std::env::var_os(OWN_PROCESS).is_some() {
        return true;
    }
    let status = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS, "1")
        .status()
        .expect("run the test binary");
    assert!(status.success(), "{test} in a process of its own: {status}");
    false
}

/// Lowers this process's soft fd limit to `limit` and takes every fd left; returns them.
pub fn fill_fd_table(limit: u64) -> Vec<OwnedFd> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let maximum = getrlimit(Resource::Nofile).maximum;
    setrlimit(Resource::Nofile, Rlimit { current: Some(limit), maximum }).expect("setrlimit");
    let mut held = Vec::new();
    loop {
        match rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 0) {
            Ok(fd) => held.push(fd),
            Err(rustix::io::Errno::MFILE) => return held,
            Err(err) => panic!("dup: {err}"),
        }
    }
}
