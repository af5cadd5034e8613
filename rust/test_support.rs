//! What the crate's tests share: real child processes to time, signal and reap.

use std::io::BufRead;
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
