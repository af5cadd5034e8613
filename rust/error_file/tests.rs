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
    let fired = [Fired { scope, after: Some(1800.0), learned: Some(learned), held: Some(8.04) }];
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
