use super::*;
use crate::transport::Transport;
use std::path::PathBuf;

fn temp_fifo(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("et-fifo-{}-{name}", std::process::id()));
    create(&path, None).expect("mkfifo");
    path
}

fn collect(reader: &mut Reader) -> Vec<String> {
    let mut lines = Vec::new();
    reader
        .read_lines(|line| {
            lines.push(match line {
                Line::Complete(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Line::TooLong { len, .. } => format!("<too long: {len}>"),
            })
        })
        .expect("read");
    lines
}

const OPTIONS: SendOptions = SendOptions {
    connect_timeout: Duration::from_millis(50),
    send_timeout: Duration::from_millis(200),
};

#[test]
fn an_empty_fifo_reads_nothing_and_never_blocks() {
    let path = temp_fifo("empty");
    let mut reader = Reader::open(&path).expect("open");
    assert!(collect(&mut reader).is_empty());
    remove(&path).expect("rm");
}

#[test]
fn lines_are_split_and_partial_lines_reassembled() {
    let path = temp_fifo("split");
    let mut reader = Reader::open(&path).expect("open");
    let writer = fs::open(&path, OFlags::WRONLY, Mode::empty()).expect("writer");
    rustix::io::write(&writer, b"one\ntw").expect("write");
    assert_eq!(collect(&mut reader), ["one"]);
    rustix::io::write(&writer, b"o\n\n  \nthree\n").expect("write");
    assert_eq!(collect(&mut reader), ["two", "three"]);
    remove(&path).expect("rm");
}

#[test]
fn an_overlong_line_is_discarded_and_the_next_one_kept() {
    let path = temp_fifo("long");
    let mut reader = Reader::open(&path).expect("open");
    let writer = fs::open(&path, OFlags::WRONLY, Mode::empty()).expect("writer");
    let long = vec![b'x'; 3 * MAX_LINE];
    for part in long.chunks(1000) {
        rustix::io::write(&writer, part).expect("write");
        assert!(collect(&mut reader).is_empty());
    }
    rustix::io::write(&writer, b"\nok\n").expect("write");
    assert_eq!(collect(&mut reader), [format!("<too long: {}>", 3 * MAX_LINE), "ok".into()]);
    remove(&path).expect("rm");
}

#[test]
fn an_overlong_line_keeps_only_its_last_pipe_buf_bytes() {
    let path = temp_fifo("tail");
    let mut reader = Reader::open(&path).expect("open");
    let writer = fs::open(&path, OFlags::WRONLY, Mode::empty()).expect("writer");
    let mut expected = Vec::new();
    for i in 0..5 * MAX_LINE / 1000 {
        let part = vec![b'a' + (i % 26) as u8; 1000];
        rustix::io::write(&writer, &part).expect("write");
        expected.extend_from_slice(&part);
        assert!(reader.pending.len() <= MAX_LINE, "memory stays bounded");
        assert!(reader.read_lines(|_| panic!("no line yet")).expect("read") > 0);
    }
    rustix::io::write(&writer, b"end\n").expect("write");
    expected.extend_from_slice(b"end");
    let mut seen = None;
    reader
        .read_lines(|line| match line {
            Line::TooLong { len, tail } => seen = Some((len, tail.to_vec())),
            Line::Complete(_) => panic!("too long"),
        })
        .expect("read");
    let (len, tail) = seen.expect("a line");
    assert_eq!(len, expected.len());
    assert_eq!(tail, expected[expected.len() - MAX_LINE..]);
    remove(&path).expect("rm");
}

#[test]
fn a_forked_child_does_not_hold_the_servers_fifo() {
    let path = temp_fifo("fork");
    let reader = Reader::open(&path).expect("open");
    let fds = [reader.read.as_raw_fd(), reader._write.as_raw_fd()];
    // SAFETY: the child only calls fcntl and _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let closed = fds.iter().all(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1);
        unsafe { libc::_exit(i32::from(!closed)) };
    }
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{status}");
    assert!(fds.iter().all(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1));
    drop(reader);
    remove(&path).expect("rm");
}

#[test]
fn a_client_sends_a_line_the_server_reads() {
    let path = temp_fifo("send");
    let mut reader = Reader::open(&path).expect("open");
    send_line(&path, b"{\"pid\": 1}\n", OPTIONS).expect("send");
    assert_eq!(collect(&mut reader), ["{\"pid\": 1}"]);
    remove(&path).expect("rm");
}

#[test]
fn a_client_without_server_fails_after_its_wait() {
    let missing = std::env::temp_dir().join("et-fifo-missing-nothing-here");
    let started = Instant::now();
    let err = send_line(&missing, b"x\n", OPTIONS).unwrap_err();
    assert!(matches!(err, SendError::NoServer { .. }), "{err:?}");
    assert!(started.elapsed() >= OPTIONS.connect_timeout);

    // A FIFO nobody reads: ENXIO, the same error.
    let path = temp_fifo("unread");
    let err = send_line(&path, b"x\n", OPTIONS).unwrap_err();
    assert!(matches!(err, SendError::NoServer { .. }), "{err:?}");
    remove(&path).expect("rm");
}

#[test]
fn a_client_refuses_lines_over_pipe_buf() {
    let line = vec![b'x'; MAX_LINE + 2];
    let err = send_line(Path::new("/nonexistent"), &line, OPTIONS).unwrap_err();
    assert!(matches!(err, SendError::TooLong(n) if n == MAX_LINE + 1));
}

#[test]
fn a_full_pipe_is_waited_on_then_reported() {
    let path = temp_fifo("full");
    let mut reader = Reader::open(&path).expect("open");
    let line = vec![b'y'; 1023];
    let line = [line.as_slice(), b"\n"].concat();
    // Fill the pipe (64 KiB by default) until the client times out.
    let err = loop {
        if let Err(err) = send_line(&path, &line, OPTIONS) {
            break err;
        }
    };
    assert!(matches!(err, SendError::Timeout(_)), "{err:?}");
    // Draining makes room again, and the next send succeeds.
    while reader.read_lines(|_| {}).expect("drain") > 0 {}
    send_line(&path, &line, OPTIONS).expect("send after drain");
    remove(&path).expect("rm");
}

#[test]
fn a_regular_file_is_not_a_server() {
    let path = std::env::temp_dir().join(format!("et-regular-{}", std::process::id()));
    std::fs::write(&path, b"").expect("write");
    assert!(Reader::open(&path).is_err());
    let err = send_line(&path, b"x\n", OPTIONS).unwrap_err();
    assert!(matches!(err, SendError::NoServer { .. }), "{err:?}");
    std::fs::remove_file(&path).expect("rm");
}

#[test]
fn a_client_never_keeps_a_torch_fifo_open() {
    // torch's server makes a plain FIFO and reads it with a blocking readline.
    let path = std::env::temp_dir().join(format!("et-fifo-{}-torch", std::process::id()));
    let _ = remove(&path);
    fs::mkfifoat(CWD, &path, Mode::from_raw_mode(0o666)).expect("mkfifo");
    let mut reader = Reader::open(&path).expect("open");
    let client = Client::new(path.clone(), OPTIONS);
    assert!(client.try_send(b"first\n").expect("try"));
    client.send(b"second\n").expect("send");
    assert_eq!(collect(&mut reader), ["first", "second"]);
    // A blocking reader sees end of file once the lines are read: no client holds the
    // FIFO open.
    let flags = OFlags::RDONLY | OFlags::NONBLOCK;
    let blocking = fs::open(&path, flags, Mode::empty()).expect("open");
    rustix::fs::fcntl_setfl(&blocking, OFlags::empty()).expect("blocking");
    drop(reader);
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::read(&blocking, &mut buf).expect("read"), 0);
    remove(&path).expect("rm");
    assert!(!client.try_send(b"x\n").expect("try without server"));
}

#[test]
fn a_client_keeps_our_fifo_open_and_reconnects_after_a_restart() {
    let path = temp_fifo("kept");
    let mut reader = Reader::open(&path).expect("open");
    let client = Client::new(path.clone(), OPTIONS);
    assert!(client.try_send(b"first\n").expect("try"));
    assert!(client.kept().is_some(), "our server's FIFO is kept open");
    client.send(b"second\n").expect("send on the kept fd");
    assert_eq!(collect(&mut reader), ["first", "second"]);
    // The server stops (its FIFO goes) and starts again at the same path.
    drop(reader);
    create(&path, None).expect("mkfifo again");
    let mut reader = Reader::open(&path).expect("reopen");
    assert!(!client.try_send(b"third\n").expect("EPIPE: send must reconnect"));
    client.send(b"third\n").expect("send after the restart");
    assert_eq!(collect(&mut reader), ["third"]);
    drop(reader);
    remove(&path).expect("rm");
    let err = client.send(b"x\n").unwrap_err();
    assert!(matches!(err, SendError::NoServer { .. }), "{err:?}");
}

#[test]
fn a_client_learns_the_stacks_directory_when_it_connects_to_our_server() {
    let path = temp_fifo("sidecar");
    let sidecar = stacks_sidecar(&path);
    assert_eq!(sidecar.to_str(), path.to_str().map(|p| format!("{p}.stacks")).as_deref());
    std::fs::write(&sidecar, "/run/job/stacks\n").expect("write");
    let mut reader = Reader::open(&path).expect("open");
    let client = Client::new(path.clone(), OPTIONS);
    assert!(client.try_send(b"first\n").expect("try"));
    assert_eq!(client.take_announced(), Some(stacks_dir("/run/job/stacks")));
    client.send(b"second\n").expect("send");
    assert_eq!(client.take_announced(), None, "read once per connection, not per request");
    assert_eq!(collect(&mut reader), ["first", "second"]);
    // A restart: the next connection reads it again.
    drop(reader);
    create(&path, None).expect("mkfifo again");
    std::fs::write(&sidecar, "/run/job/stacks-2").expect("write");
    reader = Reader::open(&path).expect("reopen");
    client.send(b"third\n").expect("send after the restart");
    assert_eq!(client.take_announced(), Some(stacks_dir("/run/job/stacks-2")));
    assert_eq!(collect(&mut reader), ["third"]);
    drop(reader);
    remove(&path).expect("rm");
    std::fs::remove_file(&sidecar).expect("rm");
}

fn stacks_dir(path: &str) -> Announced {
    Announced::StacksDir(path.into())
}

#[test]
fn a_stacks_sidecar_that_is_not_the_servers_is_refused_without_its_content() {
    let path = temp_fifo("bad-sidecar");
    let sidecar = stacks_sidecar(&path);
    let target = std::env::temp_dir().join(format!("et-fifo-{}-target", std::process::id()));
    std::fs::write(&target, "/secret\n").expect("write");
    let fifo = fs::open(&path, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()).expect("open");
    let refusal = |reason: &str| {
        let sidecar = sidecar.display();
        Some(Announced::Refused(format!("the stacks sidecar {sidecar} is refused: {reason}")))
    };
    let announced = || announced_stacks_dir(&path, &fifo);
    assert_eq!(announced(), None, "no sidecar: a server not taking stacks");
    std::os::unix::fs::symlink(&target, &sidecar).expect("symlink");
    assert_eq!(announced(), refusal("it is a symbolic link"));
    std::fs::remove_file(&sidecar).expect("rm");
    std::fs::hard_link(&target, &sidecar).expect("link");
    assert_eq!(announced(), refusal("it has 2 hard links (a link to another file)"));
    std::fs::remove_file(&sidecar).expect("rm");
    fs::mkfifoat(CWD, &sidecar, Mode::from_raw_mode(0o600)).expect("mkfifo");
    assert_eq!(announced(), refusal("it is not a regular file"));
    std::fs::remove_file(&sidecar).expect("rm");
    let not_a_path = "it does not hold an absolute path of at most PATH_MAX bytes";
    std::fs::write(&sidecar, "relative/dir\n").expect("write");
    assert_eq!(announced(), refusal(not_a_path));
    std::fs::write(&sidecar, format!("/{}", "x".repeat(libc::PATH_MAX as usize))).expect("write");
    assert_eq!(announced(), refusal(not_a_path));
    std::fs::write(&sidecar, "/run/job/stacks\n").expect("write");
    assert_eq!(announced(), Some(stacks_dir("/run/job/stacks")));
    // Another user's file (chown needs root, as the suite runs).
    std::os::unix::fs::chown(&sidecar, Some(54321), None).expect("chown (needs root)");
    let me = rustix::process::geteuid().as_raw();
    assert_eq!(announced(), refusal(&format!("it belongs to uid 54321, not to uid {me}")));
    std::fs::remove_file(&sidecar).expect("rm");
    std::fs::remove_file(&target).expect("rm");
    // torch's server leaves a plain FIFO: a sidecar beside it is never read.
    remove(&path).expect("rm");
    fs::mkfifoat(CWD, &path, Mode::from_raw_mode(0o666)).expect("mkfifo");
    std::fs::write(&sidecar, "/run/job/stacks\n").expect("write");
    let mut reader = Reader::open(&path).expect("open");
    let client = Client::new(path.clone(), OPTIONS);
    client.send(b"x\n").expect("send");
    assert_eq!(client.take_announced(), None);
    assert_eq!(collect(&mut reader), ["x"]);
    remove(&path).expect("rm");
    std::fs::remove_file(&sidecar).expect("rm");
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).expect("stat").permissions().mode() & 0o7777
}

/// A directory anyone may write, without the sticky bit: anyone may rename over a name.
fn open_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("et-fifo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

#[test]
fn the_mode_is_set_whole_with_the_mark_and_a_link_at_the_path_is_replaced() {
    let dir = open_dir("mode");
    let (path, target) = (dir.join("t.fifo"), dir.join("secret"));
    std::fs::write(&target, "root only").expect("write");
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::os::unix::fs::symlink(&target, &path).expect("symlink");
    // 0666 is wider than what mkfifo gets under the usual umask: fchmod sets it whole.
    let identity = create(&path, Some(Mode::from_raw_mode(0o666))).expect("create");
    assert_eq!(mode_of(&path), 0o1666);
    assert_eq!(path_state(&path, identity), PathState::Ours);
    assert_eq!(mode_of(&target), 0o600, "the link's target is untouched");
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "root only");
    create(&path, Some(Mode::from_raw_mode(0o600))).expect("create");
    assert_eq!(mode_of(&path), 0o1600);
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_link_swapped_in_while_the_fifo_is_created_is_never_followed() {
    let dir = open_dir("race");
    let (path, target) = (dir.join("t.fifo"), dir.join("secret"));
    std::fs::write(&target, "root only").expect("write");
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Another user's loop: a link to the target, renamed over whatever is at the path.
    let swapper = {
        let (path, target, done) = (path.clone(), target.clone(), done.clone());
        let link = dir.join("link");
        thread::spawn(move || {
            let mut swaps = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&target, &link).expect("symlink");
                if std::fs::rename(&link, &path).is_ok() {
                    swaps += 1;
                }
            }
            swaps
        })
    };
    let (mut created, mut refused) = (0, 0);
    for _ in 0..500 {
        match create(&path, None) {
            Ok(_) => created += 1,
            Err(_) => refused += 1,
        }
        assert_eq!(mode_of(&target), 0o600, "the target was chmod-ed");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    assert!(swaps > 0 && created > 0, "swaps {swaps}, created {created}, refused {refused}");
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "root only");
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_link_or_another_users_fifo_at_the_path_is_replaced_when_the_server_opens() {
    use std::os::unix::fs::MetadataExt;
    let dir = open_dir("open");
    let (path, elsewhere) = (dir.join("t.fifo"), dir.join("elsewhere"));
    let mut endpoint = Endpoint::create(path.clone(), None).expect("create");
    // Before the server starts, a link to a FIFO elsewhere takes the path.
    fs::mkfifoat(CWD, &elsewhere, Mode::from_raw_mode(0o600)).expect("mkfifo");
    remove(&path).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
    endpoint.open().expect("open");
    let opened = std::fs::symlink_metadata(&path).expect("stat");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&opened.file_type()), "not followed");
    assert_eq!(mode_of(&elsewhere), 0o600);
    endpoint.close(&mut Vec::new());
    // Then a FIFO of another user (chown needs root, as the suite runs).
    remove(&path).expect("rm");
    fs::mkfifoat(CWD, &path, Mode::from_raw_mode(0o666)).expect("mkfifo");
    std::os::unix::fs::chown(&path, Some(54321), None).expect("chown (needs root)");
    assert!(Reader::open(&path).is_err(), "not this user's");
    endpoint.open().expect("open");
    let uid = std::fs::symlink_metadata(&path).expect("stat").uid();
    assert_eq!(uid, rustix::process::geteuid().as_raw());
    endpoint.close(&mut Vec::new());
    endpoint.withdraw();
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_marked_fifo_of_another_user_is_used_per_request_without_sidecar_or_ring() {
    // Another user made a FIFO with our mark, and a sidecar, while our server was away.
    let path = temp_fifo("theirs");
    let sidecar = stacks_sidecar(&path);
    std::fs::write(&sidecar, "/their/stacks\n").expect("write");
    // Their server's read end (opened before the chown: a server opens only its own FIFO).
    let mut reader = Reader::open(&path).expect("open");
    for file in [&path, &sidecar] {
        std::os::unix::fs::chown(file, Some(65534), Some(65534)).expect("chown (needs root)");
    }
    let client = Client::new(path.clone(), OPTIONS);
    for i in 0..5 {
        if i % 2 == 0 {
            assert!(client.try_send(b"line\n").expect("try"));
        } else {
            client.send(b"line\n").expect("send");
        }
        assert!(client.kept().is_none(), "not kept open");
        assert!(client.take_announced().is_none(), "its sidecar is not read");
        assert!(!client.ring.is_armed(), "no ring is offered to it");
    }
    assert_eq!(collect(&mut reader), ["line"; 5]);
    // Our server comes back: it replaces the FIFO, and the next request reaches it.
    create(&path, None).expect("mkfifo");
    std::fs::remove_file(&sidecar).expect("rm");
    let mut ours = Reader::open(&path).expect("open");
    client.send(b"to ours\n").expect("send");
    assert!(client.kept().is_some(), "ours is kept open");
    assert!(client.ring.is_armed(), "and may get a ring");
    assert_eq!(collect(&mut ours), ["to ours"]);
    assert!(collect(&mut reader).is_empty());
    remove(&path).expect("rm");
}

#[test]
fn a_kept_fifo_is_left_once_its_path_leads_to_another_one() {
    let path = temp_fifo("replaced");
    let mut old = Reader::open(&path).expect("open");
    let client = Client::new(path.clone(), OPTIONS);
    client.send(b"first\n").expect("send");
    assert_eq!(collect(&mut old), ["first"]);
    // Another server took the path while the old one still reads its FIFO.
    create(&path, None).expect("mkfifo");
    let mut new = Reader::open(&path).expect("open");
    let started = Instant::now();
    loop {
        client.send(b"next\n").expect("send");
        if collect(&mut new) == ["next"] {
            break;
        }
        assert_eq!(collect(&mut old), ["next"], "until it looks at the path");
        assert!(started.elapsed() < Duration::from_secs(10), "never reconnected");
        thread::sleep(Duration::from_millis(1));
    }
    assert!(collect(&mut old).is_empty());
    remove(&path).expect("rm");
}

#[test]
fn a_line_is_a_request_a_ring_offer_or_malformed_and_a_request_after_garbage_is_kept() {
    let mut request = Vec::new();
    codec::encode_json_line(4321, "train", codec::Number::Float(12.5), 9, &mut request);
    let request = request.trim_ascii_end();
    let offer = ring::announcement(4321, 9);
    let garbage_then_request = [&[b'x'; 2 * MAX_LINE][..], request].concat();
    let mut out = Vec::new();
    decode_line(Line::Complete(request), &mut out);
    decode_line(Line::Complete(offer.trim_ascii_end()), &mut out);
    decode_line(Line::Complete(b"{\"elastic_timer_ring\": 2, \"pid\": 1, \"fd\": 3}"), &mut out);
    decode_line(Line::Complete(b"junk"), &mut out);
    let tail = &garbage_then_request[garbage_then_request.len() - MAX_LINE..];
    decode_line(Line::TooLong { len: garbage_then_request.len(), tail }, &mut out);
    let is_request = |arrival: &Arrival| matches!(arrival, Arrival::Request(r) if r.pid == 4321 && r.scope == "train" && r.signal == 9);
    assert!(is_request(&out[0]), "{out:?}");
    assert!(matches!(out[1], Arrival::Ring(Ok((4321, 9)))), "{out:?}");
    assert!(matches!(&out[2], Arrival::Ring(Err(why)) if why.contains("version 2")), "{out:?}");
    assert!(matches!(out[3], Arrival::Malformed(_)), "{out:?}");
    assert!(matches!(&out[4], Arrival::Malformed(why) if why.contains("was kept")), "{out:?}");
    assert!(is_request(&out[5]), "{out:?}");
    assert_eq!(out.len(), 6);
}
