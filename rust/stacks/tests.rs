use super::*;

fn config(dir: &Path, py_spy: Option<PathBuf>) -> Config {
    Config {
        grace: Duration::from_secs(2),
        signal: Signal::USR2,
        dir: dir.into(),
        py_spy,
        hold: Duration::ZERO,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("et-stacks-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// This test process stands in for the worker: its uids own the files the test writes.
fn worker() -> (i32, u64) {
    let pid = rustix::process::getpid();
    (
        pid.as_raw_nonzero().get(),
        crate::procfs::Proc::open()
            .expect("/proc")
            .start_time(pid)
            .expect("an answer")
            .expect("there"),
    )
}

fn append(path: &Path, bytes: &[u8]) {
    let mut file = fs::OpenOptions::new().append(true).open(path).expect("open");
    std::io::Write::write_all(&mut file, bytes).expect("write");
}

#[test]
fn a_worker_arms_the_file_the_server_looks_for() {
    let (pid, start_time) = worker();
    let dir = Path::new("/run/stacks");
    assert_eq!(own_armed_path(dir).expect("named"), armed_path(dir, pid, start_time));
}

#[test]
fn an_armed_worker_is_signalled_and_its_new_output_read() {
    let dir = temp_dir("armed");
    let (pid, start_time) = worker();
    let path = armed_path(&dir, pid, start_time);
    fs::write(&path, "an earlier dump\n").expect("write");
    let mut sent = None;
    let now = Instant::now();
    let send = |s| sent.replace(s).is_none();
    let (dump, refused) = Dump::start(&config(&dir, None), pid, start_time, send, now);
    let mut dump = dump.expect("started");
    assert!(refused.is_none());
    assert_eq!(sent, Some(Signal::USR2));
    assert!(!dump.poll(now), "nothing written yet");
    append(&path, b"Thread 0x1 (most recent call first):\n");
    assert!(!dump.poll(now), "grew: wait one more poll");
    assert!(dump.poll(now), "settled");
    let stacks = dump.finish();
    assert_eq!(stacks.source, Dumper::Faulthandler);
    assert_eq!(stacks.text, "Thread 0x1 (most recent call first):\n");
    assert!(stacks.complete);
    assert!(path.exists(), "the worker's file stays (a dry run may dump it again)");
    fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_held_dump_waits_for_its_hold_and_a_follower_reads_the_same_stacks() {
    let dir = temp_dir("held");
    let (pid, start_time) = worker();
    let path = armed_path(&dir, pid, start_time);
    fs::write(&path, "").expect("write");
    let now = Instant::now();
    let mut signals = 0;
    let send = |_| {
        signals += 1;
        true
    };
    let (dump, _) = Dump::start(&config(&dir, None), pid, start_time, send, now);
    let mut dump = dump.expect("started");
    dump.hold(now, Duration::from_secs(1));
    let mut follower = dump.follow().expect("a faulthandler dump can be followed");
    append(&path, b"Thread 0x1 (most recent call first):\n");
    assert!(!dump.poll(now));
    assert!(!dump.poll(now), "complete, but held");
    assert!(dump.poll(now + Duration::from_secs(1)), "the hold is over");
    assert!(!follower.poll(now));
    assert!(follower.poll(now), "the follower is not held");
    assert_eq!(follower.finish().text, dump.finish().text);
    assert_eq!(signals, 1, "the worker was asked once");
    fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_dump_past_the_bound_is_cut_and_says_so() {
    let dir = temp_dir("big");
    let (pid, start_time) = worker();
    let path = armed_path(&dir, pid, start_time);
    fs::write(&path, "").expect("write");
    let now = Instant::now();
    let (dump, _) = Dump::start(&config(&dir, None), pid, start_time, |_| true, now);
    let mut dump = dump.expect("started");
    append(&path, &vec![b'x'; 3 * MAX_TEXT]);
    assert!(!dump.poll(now) && dump.poll(now), "settled");
    let stacks = dump.finish();
    let note = format!("\n[cut: only the first {MAX_TEXT} bytes are shown]\n");
    assert_eq!(stacks.text.len(), MAX_TEXT + note.len());
    assert!(stacks.text.starts_with("xxx") && stacks.text.ends_with(&note), "{note}");
    fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_stacks_file_that_is_not_the_workers_own_is_not_read() {
    let dir = temp_dir("untrusted");
    let (pid, start_time) = worker();
    let path = armed_path(&dir, pid, start_time);
    let secret = dir.join("secret");
    fs::write(&secret, "a file the server must not show\n").expect("write");
    let refused = |setup: &dyn Fn()| {
        let _ = fs::remove_file(&path);
        setup();
        let now = Instant::now();
        let signalled = std::cell::Cell::new(false);
        let (dump, refused) = Dump::start(
            &config(&dir, None),
            pid,
            start_time,
            |_| {
                signalled.set(true);
                true
            },
            now,
        );
        assert!(dump.is_none() && !signalled.get(), "neither read nor signalled");
        refused.expect("a reason")
    };
    let reason = refused(&|| std::os::unix::fs::symlink(&secret, &path).expect("symlink"));
    let expected = format!("Not reading {}, the stacks file of worker pid={pid}", path.display());
    assert_eq!(reason, format!("{expected}: it is a symbolic link"));
    let reason = refused(&|| fs::hard_link(&secret, &path).expect("link"));
    assert!(reason.ends_with("it has 2 hard links (a link to another file)"), "{reason}");
    let reason = refused(&|| fs::create_dir(&path).expect("mkdir"));
    assert!(reason.ends_with("it is not a regular file"), "{reason}");
    fs::remove_dir(&path).expect("rmdir");
    // A file of another user (chown needs root, as the suite runs).
    let reason = refused(&|| {
        fs::write(&path, "planted\n").expect("write");
        std::os::unix::fs::chown(&path, Some(54321), None).expect("chown (needs root)");
    });
    assert!(reason.contains("it belongs to uid 54321, not to "), "{reason}");
    // With py-spy, a refused file still leaves it to take the stacks.
    let (dump, refused) =
        Dump::start(&config(&dir, Some("echo".into())), pid, start_time, |_| false, Instant::now());
    assert!(refused.is_some());
    assert_eq!(dump.expect("py-spy started").source, Dumper::PySpy);
    fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_worker_not_armed_needs_py_spy_and_a_dump_ends_with_its_grace() {
    let dir = temp_dir("py-spy");
    let now = Instant::now();
    let (pid, start_time) = worker();
    // Another process with the same pid armed (another start time): not this worker.
    fs::write(armed_path(&dir, pid, start_time + 1), "").expect("write");
    let (dump, refused) =
        Dump::start(&config(&dir, None), pid, start_time, |_| panic!("signalled"), now);
    assert!(dump.is_none() && refused.is_none());
    // A stand-in for py-spy that prints its arguments, and one that never ends.
    let echo = Some(PathBuf::from("echo"));
    let (dump, _) = Dump::start(&config(&dir, echo), pid, start_time, |_| unreachable!(), now);
    let mut dump = dump.expect("started");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dump.poll(Instant::now()) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    let stacks = dump.finish();
    assert_eq!((stacks.source, stacks.text), (Dumper::PySpy, format!("dump --pid {pid}\n")));
    assert!(stacks.complete);
    // A link left where py-spy's output goes is replaced, not followed.
    let victim = dir.join("victim");
    fs::write(&victim, "kept\n").expect("write");
    let output = dir.join(format!("{pid}-{start_time}.py-spy"));
    std::os::unix::fs::symlink(&victim, &output).expect("symlink");
    let hang = dir.join("hang");
    fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").expect("write");
    fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let (dump, _) =
        Dump::start(&config(&dir, Some(hang)), pid, start_time, |_| unreachable!(), now);
    let mut dump = dump.expect("started");
    assert!(dump.poll(now + Duration::from_secs(2)), "out of time");
    let stacks = dump.finish();
    assert!(!stacks.complete);
    assert_eq!(fs::read_to_string(&victim).expect("read"), "kept\n");
    assert!(fs::symlink_metadata(&output).is_err(), "py-spy's output leaves no file behind");
    assert_eq!(fs::read_dir(&dir).expect("ls").count(), 3, "the armed file, victim, hang");
    fs::remove_dir_all(&dir).expect("rm");
}
