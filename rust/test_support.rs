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
    let mut shell =
        Command::new("sh").args(["-c", script]).stdout(Stdio::piped()).spawn().expect("spawn sh");
    let mut line = String::new();
    let stdout = shell.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("read");
    (shell, line)
}
