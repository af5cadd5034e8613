//! torch's per-worker error file (`TORCHELASTIC_ERROR_FILE`), written for a worker that a
//! timer is about to kill.
//!
//! torchrun's agent gives each worker the path of an error file in its environment. A worker
//! whose entry point is decorated with `@record` writes its uncaught exception there; when the
//! worker dies, the agent reads the file for the failure summary it prints
//! (`ChildFailedError`: the "Root Cause" block). A worker killed by a signal writes nothing,
//! so the summary would only say "Signal 9 (SIGKILL) received by PID ...". Written here,
//! before the signal, the summary says which timer fired and where the worker was stuck,
//! with every torch release (they all read this format).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::environ;
use crate::learned::Learned;
use crate::stacks::Stacks;

/// The variable torchrun's agent sets in each worker's environment.
pub const VARIABLE: &str = "TORCHELASTIC_ERROR_FILE";

/// One expired timer, as the failure summary names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired<'a> {
    pub scope: &'a str,
    /// The `after` its client asked for, in seconds (its expiration minus the acquire's
    /// arrival); None when the server did not see the acquire arrive (registered from Python).
    pub after: Option<f64>,
    /// The learned bound that set its deadline instead, if one did.
    pub learned: Option<Learned>,
    /// Seconds since its acquire arrived, when the server saw it arrive.
    pub held: Option<f64>,
}

/// The scopes of `elastic_timer.watch`: one per place of an unmodified script's progress.
const WATCH_PREFIX: &str = "watch: ";

/// The error file named in the initial environment of process `pid` (readable for a process
/// of the same user), if it names one. A relative path is taken from this process's working
/// directory, as the agent (the server's process) reads it.
pub fn path_of(pid: i32) -> Option<PathBuf> {
    // Empty when the agent logs nowhere (its log directory is /dev/null).
    Some(PathBuf::from(environ::value(pid, VARIABLE).filter(|path| !path.is_empty())?))
}

/// The failure message: which timers fired and the signal, then the stacks when taken.
pub fn message(pid: i32, fired: &[Fired<'_>], signal: i32, stacks: Option<&Stacks>) -> String {
    let watched =
        fired.iter().find_map(|timer| Some((timer.scope.strip_prefix(WATCH_PREFIX)?, timer.held?)));
    let mut text = match watched {
        // A watched worker (its script unchanged) has one timer: the time since its progress.
        Some((place, held)) => format!(
            "elastic-timer: worker pid {pid} made no progress for {held:.1} s after its last \
             progress event ({place}); the worker was sent signal {signal}"
        ),
        None => format!(
            "elastic-timer: a timer of worker pid {pid} expired; the worker was sent signal \
             {signal}"
        ),
    };
    for timer in fired {
        text.push_str(&format!("\n  scope {:?}", timer.scope));
        match (timer.learned, timer.after) {
            (Some(learned), _) => text.push_str(&format!(
                ": its learned bound of {:.2} s ran out (the longest of {} blocks took {:.2} s; \
                 its client asked for {:.2} s)",
                learned.bound.as_secs_f64(),
                learned.samples,
                learned.max.as_secs_f64(),
                learned.after.as_secs_f64()
            )),
            (None, Some(after)) => text.push_str(&format!(": its bound of {after:.2} s ran out")),
            (None, None) => text.push_str(": its deadline passed"),
        }
    }
    match stacks {
        Some(stacks) if !stacks.text.trim().is_empty() => {
            let cut = if stacks.complete { "" } else { ", cut short by the grace period" };
            text.push_str(&format!(
                "\nIts Python stacks, taken before the signal (from {}{cut}):\n{}",
                stacks.source.name(),
                stacks.text.trim_end()
            ));
        }
        Some(stacks) => {
            text.push_str(&format!("\nNo stacks: {} gave none in time", stacks.source.name()));
        }
        None => {}
    }
    text
}

/// The file's content, in the format of torch's `ErrorHandler.record_exception`.
pub fn content(message: &str, first_line: &str, timestamp: u64) -> String {
    json!({
        "message": {
            "message": first_line,
            "extraInfo": {"py_callstack": message, "timestamp": timestamp.to_string()},
        }
    })
    .to_string()
}

/// Writes `content` to `path` if nothing is there: a worker that recorded its own error keeps
/// it. Returns whether the file is this server's. A link at `path` is not followed.
pub fn write_new(path: &Path, content: &str) -> io::Result<bool> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path);
    let mut file = match created {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(err) => return Err(err),
    };
    if let Err(err) = file.write_all(content.as_bytes()) {
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
