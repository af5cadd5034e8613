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
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stacks::Dumper;

    #[test]
    fn the_message_names_each_scope_its_bound_and_the_stacks() {
        let learned = Learned {
            bound: Duration::from_secs(5),
            samples: 20,
            max: Duration::from_secs(1),
            after: Duration::from_secs(300),
        };
        let fired = [
            Fired { scope: "train.py#31", after: Some(3.0), learned: None, held: Some(3.5) },
            Fired { scope: "x", after: None, learned: None, held: None },
            Fired { scope: "y", after: Some(300.0), learned: Some(learned), held: Some(7.0) },
        ];
        let stacks = Stacks {
            source: Dumper::Faulthandler,
            text: "  File \"t.py\", line 3 in hang\n".into(),
            complete: true,
        };
        let text = message(42, &fired, 9, Some(&stacks));
        assert!(text.starts_with(
            "elastic-timer: a timer of worker pid 42 expired; the worker was sent signal 9"
        ));
        assert!(text.contains("\n  scope \"train.py#31\": its bound of 3.00 s ran out"), "{text}");
        assert!(text.contains("\n  scope \"x\": its deadline passed"), "{text}");
        let y = "\n  scope \"y\": its learned bound of 5.00 s ran out (the longest of 20 blocks \
                 took 1.00 s; its client asked for 300.00 s)";
        assert!(text.contains(y), "{text}");
        assert!(text.ends_with("(from faulthandler):\n  File \"t.py\", line 3 in hang"), "{text}");
    }

    #[test]
    fn a_watched_workers_message_says_how_long_it_made_no_progress_and_after_what() {
        let learned = Learned {
            bound: Duration::from_secs(5),
            samples: 56,
            max: Duration::from_millis(80),
            after: Duration::from_secs(1800),
        };
        let scope = "watch: inside DataLoader next";
        let fired =
            [Fired { scope, after: Some(1800.0), learned: Some(learned), held: Some(8.04) }];
        let text = message(42, &fired, 9, None);
        assert!(
            text.starts_with(
                "elastic-timer: worker pid 42 made no progress for 8.0 s after its last progress \
             event (inside DataLoader next); the worker was sent signal 9\n  scope \"watch: \
             inside DataLoader next\": its learned bound of 5.00 s ran out (the longest of 56 \
             blocks took 0.08 s"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_content_is_what_torchs_error_handler_writes() {
        let value: serde_json::Value = serde_json::from_str(&content("all", "first", 17)).unwrap();
        assert_eq!(value["message"]["message"], "first");
        assert_eq!(value["message"]["extraInfo"]["py_callstack"], "all");
        assert_eq!(value["message"]["extraInfo"]["timestamp"], "17");
    }

    #[test]
    fn an_existing_file_is_kept_and_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.json");
        assert!(write_new(&path, "ours").unwrap());
        assert!(!write_new(&path, "again").unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "ours");
        let target = dir.path().join("target");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(!write_new(&link, "x").unwrap());
        assert!(!target.exists());
    }

    #[test]
    fn the_path_comes_from_the_environment_of_the_process() {
        for (value, expected) in
            [("/tmp/somewhere/error.json", Some("/tmp/somewhere/error.json")), ("", None)]
        {
            let mut child = crate::test_support::shell_with_env(VARIABLE, value);
            let pid = i32::try_from(child.id()).unwrap();
            assert_eq!(path_of(pid), expected.map(PathBuf::from));
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}
