//! The server end to end: real FIFOs, real child processes, real signals.

use super::pass::{wall_now, Clock, State};
use super::*;
use crate::codec;
use crate::deadlines::DeadlineMap;
use crate::reaper::Refusal;
use crate::test_support::{
    fill_fd_table, in_own_process, pid_of, shell_once_it_says, shell_with_env, sleeper,
};
use crate::transport::{direct::Direct, fifo};
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::time::Instant;

fn config() -> Config {
    Config {
        caps: Caps::NONE,
        max_interval: Duration::from_millis(100),
        signal_self: false,
        delegate_reaps: false,
        max_pidfds: 64,
        descendants_only: false,
        dry_run: false,
        escalate_after: None,
        stack_dump: None,
        adaptive: None,
        error_files: false,
        fifo_mode: None,
    }
}

fn fifo_server(name: &str, config: Config) -> (Server, PathBuf) {
    let path = std::env::temp_dir().join(format!("et-server-{}-{name}", std::process::id()));
    (
        Server::new(
            fifo::Endpoint::create(path.clone(), config.fifo_mode).expect("mkfifo"),
            config,
        )
        .expect("server"),
        path,
    )
}

fn request(pid: u32, scope: &str, after: f64, signal: i32) -> Request {
    Request { pid: i64::from(pid), scope: scope.into(), expiration: wall_now() + after, signal }
}

fn send(path: &std::path::Path, request: &Request) {
    let mut line = Vec::new();
    codec::encode_json_line(
        request.pid,
        &request.scope,
        codec::Number::Float(request.expiration),
        i64::from(request.signal),
        &mut line,
    );
    let options = fifo::SendOptions {
        connect_timeout: Duration::from_secs(1),
        send_timeout: Duration::from_secs(1),
    };
    fifo::send_line(path, &line, options).expect("send");
}

#[test]
fn a_stuck_worker_is_killed_at_its_deadline() {
    let (mut server, path) = fifo_server("stuck", config());
    let events = server.start().expect("start");
    let mut worker = sleeper();
    // Measured from the acquire: the deadline is 0.2 s after the request is made.
    let acquired = Instant::now();
    send(&path, &request(worker.id(), "step", 0.2, libc::SIGKILL));
    let status = worker.wait().expect("wait");
    let waited = acquired.elapsed();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(waited >= Duration::from_millis(195), "fired early: {waited:?}");
    // Generous on 2 loaded cores; the benches measure the real lateness.
    assert!(waited < Duration::from_millis(200 + 1000), "fired late: {waited:?}");
    match events.recv_timeout(Duration::from_secs(1)).expect("event") {
        Event::Expired { expiries, ack: None } => {
            assert_eq!(expiries.len(), 1);
            assert!(matches!(expiries[0].outcome, ReapOutcome::Signalled));
            assert_eq!(expiries[0].timers[0].scope, "step");
        }
        other => panic!("unexpected {other:?}"),
    }
    server.stop();
    assert!(!path.exists(), "stop removes the FIFO");
}

#[test]
fn a_released_timer_never_fires() {
    let (mut server, path) = fifo_server("released", config());
    let _events = server.start().expect("start");
    let mut worker = sleeper();
    send(&path, &request(worker.id(), "step", 0.1, libc::SIGKILL));
    send(&path, &request(worker.id(), "step", -1.0 - wall_now(), 0));
    thread::sleep(Duration::from_millis(300));
    assert!(worker.try_wait().expect("try_wait").is_none(), "worker was killed");
    server.stop();
    assert_eq!(server.stats().requests, 2);
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

#[test]
fn refused_and_malformed_requests_are_reported_and_nothing_is_lost() {
    let (mut server, path) = fifo_server("bad", config());
    let events = server.start().expect("start");
    let worker = sleeper();
    send(&path, &request(worker.id(), "kept", 60.0, libc::SIGKILL));
    let bad = Request { pid: -1, ..request(1, "minus-one", -1.0, libc::SIGKILL) };
    send(&path, &bad);
    fifo::send_line(
        &path,
        b"not json\n",
        fifo::SendOptions {
            connect_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
        },
    )
    .expect("send");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(events.recv_timeout(Duration::from_secs(2)).expect("event"));
    }
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::Refused { reason: Refusal::ReservedPid(-1), .. })));
    assert!(seen.iter().any(|e| matches!(e, Event::Malformed(_))));
    let timers = server.timers();
    assert!(timers.iter().any(|t| t.scope == "kept"));
    server.stop();
    let mut worker = worker;
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

#[test]
fn a_refusal_before_start_is_handed_to_the_caller_and_not_reported_again() {
    let (mut server, _path) = fifo_server("early", config());
    // Not expired: refused for its pid alone.
    server.register([Request { pid: -1, ..request(1, "early", 60.0, libc::SIGKILL) }]);
    let undelivered = server.take_undelivered();
    assert!(
        matches!(undelivered[..], [Event::Refused { reason: Refusal::ReservedPid(-1), .. }]),
        "{undelivered:?}"
    );
    assert!(server.take_undelivered().is_empty());
    let events = server.start().expect("start");
    server.stop();
    assert_eq!(events.try_iter().count(), 0, "reported twice");
    assert_eq!(server.stats().refused, 1);
}

#[test]
fn the_timers_of_an_exited_worker_are_dropped_when_it_exits() {
    // With a pidfd (its readiness), and without one (past a budget of 0: the sweep).
    for max_pidfds in [64, 0] {
        let config = Config { max_pidfds, ..config() };
        let (mut server, path) = fifo_server(&format!("exit-{max_pidfds}"), config);
        let events = server.start().expect("start");
        let mut worker = sleeper();
        send(&path, &request(worker.id(), "a", 60.0, libc::SIGKILL));
        let deadline = Instant::now() + Duration::from_secs(2);
        while server.timers().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(server.timers().len(), 1);
        worker.kill().expect("kill");
        worker.wait().expect("wait");
        let exited = loop {
            match events.recv_timeout(Duration::from_secs(2)).expect("an exit event") {
                Event::WorkerExited { pid, dropped } => break (pid, dropped),
                Event::Warning(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(exited, (pid_of(&worker), 1), "max_pidfds={max_pidfds}");
        assert!(server.timers().is_empty());
        server.stop();
    }
}

#[test]
fn the_servers_own_process_may_time_itself_unless_only_descendants_are_served() {
    let own = std::process::id();
    for descendants_only in [false, true] {
        let config = Config { descendants_only, ..config() };
        let server = Server::new(Direct, config).expect("server");
        server.register([request(own, "self", 60.0, libc::SIGTERM)]);
        let listed = server.timers().iter().any(|t| t.pid == i64::from(own));
        assert_eq!(listed, !descendants_only);
        assert_eq!(server.stats().refused, u64::from(descendants_only));
        server.register([request(own, "self", -1.0 - wall_now(), 0)]);
        assert!(server.timers().is_empty());
    }
}

#[test]
fn stop_returns_at_once_with_far_deadlines_and_no_client() {
    let (mut server, _path) = fifo_server("stop", config());
    let _events = server.start().expect("start");
    let worker = sleeper();
    server.register([request(worker.id(), "far", 3600.0, libc::SIGKILL)]);
    let started = Instant::now();
    server.stop();
    assert!(started.elapsed() < Duration::from_millis(100));
    let mut worker = worker;
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

#[test]
fn run_once_processes_everything_already_sent() {
    let (mut server, path) = fifo_server("once", config());
    let _events = server.start().expect("start");
    for i in 0..50 {
        send(&path, &request(std::process::id(), &format!("s{i}"), -1.0 - wall_now(), 0));
    }
    server.run_once();
    assert_eq!(server.stats().requests, 50);
    assert!(!server.is_running());
}

fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    condition()
}

#[test]
fn deadlines_are_monotonic_instants_fixed_on_receipt() {
    let mono = Instant::now();
    let clock = Clock { mono, wall: 1_000.0 };
    assert_eq!(clock.deadline(1_002.5), Some(mono + Duration::from_millis(2_500)));
    assert_eq!(clock.deadline(999.0), mono.checked_sub(Duration::from_secs(1)).or(Some(mono)));
    assert_eq!(clock.deadline(1_000.0), Some(mono));
    for never in [f64::INFINITY, f64::NAN, 1e300] {
        assert_eq!(clock.deadline(never), None, "{never}");
    }
    assert!(clock.deadline(-1e300).is_some_and(|d| d <= mono), "long past: due at once");
    // The map keeps the Instant: a later wall-clock step changes nothing (nothing reads
    // the wall clock again for this timer).
    let mut map: DeadlineMap<i64> = DeadlineMap::new();
    let request = Request { pid: 7, scope: "s".into(), expiration: 1_002.5, signal: 9 };
    map.apply(7, request, clock.deadline(1_002.5));
    assert_eq!(map.next_deadline(), Some(mono + Duration::from_millis(2_500)));
}

#[test]
fn equal_expirations_are_equal_instants_until_the_wall_clock_steps() {
    let mut state = State::new(8, Caps::NONE).expect("state");
    let base = state.clock_base;
    let expiration = base.wall + 5.0;
    // Readings later on, each off by the error of reading two clocks.
    let reading = |after: Duration, error: f64| Clock {
        mono: base.mono + after,
        wall: base.wall + after.as_secs_f64() + error,
    };
    let first = state.deadline(reading(Duration::from_millis(10), 30e-6), expiration);
    let second = state.deadline(reading(Duration::from_millis(900), -40e-6), expiration);
    assert_eq!(first, base.deadline(expiration));
    assert_eq!(first, second, "one deadline for every worker is one instant");
    assert!(!Clock::now().stepped_since(state.clock_base), "a fresh reading is no step");
    // Stepped an hour forward: what is asked for from now on follows the wall clock.
    let stepped = reading(Duration::from_secs(1), 3600.0);
    assert_eq!(
        state.deadline(stepped, stepped.wall + 5.0),
        Some(stepped.mono + Duration::from_secs(5))
    );
    assert_eq!(state.clock_base.wall, stepped.wall);
}

#[test]
fn descendants_only_refuses_other_processes() {
    let (mut server, _path) =
        fifo_server("descendants", Config { descendants_only: true, ..config() });
    let events = server.start().expect("start");
    let mut child = sleeper();
    // Our parent: alive, not our descendant, and never signalled (its deadline is far).
    let parent = rustix::process::getppid().expect("a parent").as_raw_nonzero().get();
    let parent = parent.unsigned_abs();
    server.register([
        request(child.id(), "child", 3600.0, libc::SIGKILL),
        request(parent, "parent", 3600.0, libc::SIGKILL),
        request(parent, "again", 3600.0, libc::SIGKILL),
    ]);
    let timers = server.timers();
    assert_eq!(timers.len(), 1);
    assert_eq!(timers[0].scope, "child");
    assert_eq!(server.stats().refused, 2);
    match events.recv_timeout(Duration::from_secs(1)).expect("event") {
        Event::Refused { request, reason: Refusal::NotDescendant(pid) } => {
            assert_eq!((request.scope.as_str(), pid), ("parent", i64::from(parent)));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(events.try_recv().is_err(), "a refused pid is reported once");
    server.stop();
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn a_request_glued_to_garbage_is_kept() {
    let (mut server, path) = fifo_server("garbage", config());
    let _events = server.start().expect("start");
    let worker = sleeper();
    // A writer leaves bytes without a newline, short and then far past PIPE_BUF; each
    // time, the next client's line is glued to them.
    for garbage in [&b"\x00junk{\"version\""[..], &[b'x'; 3 * fifo::MAX_LINE]] {
        let writer = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        std::io::Write::write_all(&mut &writer, garbage).expect("write");
        drop(writer);
        let scope = format!("after-{}", garbage.len());
        send(&path, &request(worker.id(), &scope, 3600.0, libc::SIGKILL));
        assert!(wait_until(|| server.timers().iter().any(|t| t.scope == scope)), "{scope}");
    }
    let stats = server.stats();
    assert_eq!((stats.requests, stats.malformed), (2, 2));
    server.stop();
    let mut worker = worker;
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

#[test]
fn a_deleted_fifo_is_created_again_and_another_servers_is_left_alone() {
    let (mut server, path) = fifo_server("deleted", config());
    let events = server.start().expect("start");
    let worker = sleeper();
    for round in 0..2 {
        std::fs::remove_file(&path).expect("rm");
        assert!(wait_until(|| path.exists()), "created again");
        let scope = format!("after-delete-{round}");
        send(&path, &request(worker.id(), &scope, 3600.0, libc::SIGKILL));
        assert!(wait_until(|| server.timers().iter().any(|t| t.scope == scope)));
    }
    let Event::Warning(warning) = events.recv_timeout(Duration::from_secs(1)).expect("event")
    else {
        panic!("expected a warning")
    };
    assert!(warning.ends_with("was deleted; created it again"), "{warning}");
    // A regular file in its place: no client could reach a server through it.
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(&path, b"").expect("write");
    assert!(wait_until(|| std::fs::metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_fifo()
    })));
    // Another FIFO (another server's) in its place stays, even after our stop.
    let other = path.with_extension("other");
    fifo::create(&other, None).expect("mkfifo");
    std::fs::rename(&other, &path).expect("rename");
    let identity = fifo::Reader::open(&path).expect("open").identity();
    // The loop has seen it once it says so.
    loop {
        match events.recv_timeout(Duration::from_secs(5)).expect("a warning") {
            Event::Warning(warning) if warning.contains("is now another FIFO") => break,
            Event::Warning(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    server.stop();
    assert_eq!(fifo::path_state(&path, identity), fifo::PathState::Ours, "left alone");
    fifo::remove(&path).expect("rm");
    let mut worker = worker;
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

#[test]
fn a_delegated_reap_waits_for_its_answer_and_a_failed_one_is_retried() {
    let (mut server, _path) = fifo_server("delegate", config());
    // Decided at each start (a Python override may be patched in after the server is built).
    server.delegate_reaps(true).expect("stopped");
    let events = server.start().expect("start");
    assert!(server.delegate_reaps(false).is_err(), "changed under a running loop");
    let mut worker = sleeper();
    server.register([request(worker.id(), "d", 0.0, libc::SIGTERM)]);
    let Event::Expired { expiries, .. } =
        events.recv_timeout(Duration::from_secs(1)).expect("event")
    else {
        panic!("expected an expiry")
    };
    assert!(matches!(expiries[0].outcome, ReapOutcome::Delegated));
    assert_eq!(expiries[0].signal, libc::SIGTERM);
    server.complete_reap(expiries[0].pid, false);
    let Event::Expired { expiries, .. } =
        events.recv_timeout(Duration::from_secs(1)).expect("retry")
    else {
        panic!("expected the retry")
    };
    server.complete_reap(expiries[0].pid, true);
    assert!(server.timers().is_empty());
    assert!(worker.try_wait().expect("try_wait").is_none(), "delegation never signals");
    server.stop();
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

fn expiry(events: &Receiver<Event>) -> Expiry {
    loop {
        match events.recv_timeout(Duration::from_secs(5)).expect("event") {
            Event::Expired { mut expiries, .. } => return expiries.remove(0),
            Event::WorkerExited { .. } | Event::Warning(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_dry_run_reports_each_expiry_and_signals_nothing() {
    let (mut server, _path) = fifo_server("dry", Config { dry_run: true, ..config() });
    let events = server.start().expect("start");
    let mut worker = sleeper();
    server.register([
        request(worker.id(), "first", 0.0, libc::SIGKILL),
        request(worker.id(), "later", 0.2, libc::SIGKILL),
    ]);
    for scope in ["first", "later"] {
        let expiry = expiry(&events);
        assert!(matches!(expiry.outcome, ReapOutcome::DryRun), "{:?}", expiry.outcome);
        assert_eq!((expiry.timers[0].scope.as_str(), expiry.signal), (scope, libc::SIGKILL));
    }
    assert!(worker.try_wait().expect("try_wait").is_none(), "a dry run kills nothing");
    let stats = server.stats();
    assert_eq!((stats.expired, stats.reaped, stats.live_timers), (2, 0, 0));
    server.stop();
    worker.kill().expect("kill");
    worker.wait().expect("wait");
}

#[test]
fn a_worker_that_ignores_its_signal_is_killed_after_the_grace() {
    let grace = Duration::from_millis(300);
    let (mut server, _path) =
        fifo_server("escalate", Config { escalate_after: Some(grace), ..config() });
    let events = server.start().expect("start");
    // A shell that ignores SIGTERM, waiting on a child that would die of it.
    let (mut worker, said) = shell_once_it_says("trap '' TERM; echo trapped; sleep 30 & wait");
    assert_eq!(said, "trapped\n", "the trap is set");
    server.register([request(worker.id(), "stuck", 0.0, libc::SIGTERM)]);
    assert!(matches!(expiry(&events).outcome, ReapOutcome::Signalled));
    let started = Instant::now();
    let status = worker.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(started.elapsed() >= grace - Duration::from_millis(50), "{:?}", started.elapsed());
    match events.recv_timeout(Duration::from_secs(1)).expect("event") {
        Event::Escalated { pid, signal, after } => {
            assert_eq!((pid, signal), (pid_of(&worker), libc::SIGTERM));
            assert!(after >= grace, "{after:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let stats = server.stats();
    assert_eq!((stats.reaped, stats.escalated, stats.unreapable), (1, 1, 0));
    server.stop();
}

#[test]
fn a_worker_that_dies_of_its_signal_is_not_escalated() {
    let grace = Duration::from_millis(200);
    let (mut server, _path) =
        fifo_server("no-escalate", Config { escalate_after: Some(grace), ..config() });
    let events = server.start().expect("start");
    let mut worker = sleeper();
    server.register([request(worker.id(), "stuck", 0.0, libc::SIGTERM)]);
    assert!(matches!(expiry(&events).outcome, ReapOutcome::Signalled));
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGTERM));
    thread::sleep(grace * 2);
    assert!(events.try_recv().is_err(), "nothing more to report");
    assert_eq!(server.stats().escalated, 0);
    server.stop();
}

#[test]
fn stacks_are_taken_before_the_signal() {
    let dir = std::env::temp_dir().join(format!("et-server-stacks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let stack_dump = stacks::Config {
        grace: Duration::from_secs(2),
        signal: rustix::process::Signal::USR2,
        dir: dir.clone(),
        // A stand-in for py-spy (the worker is not armed): prints its arguments.
        py_spy: Some(PathBuf::from("echo")),
        hold: Duration::ZERO,
    };
    let (mut server, _path) =
        fifo_server("stacks", Config { stack_dump: Some(stack_dump), ..config() });
    let events = server.start().expect("start");
    let mut worker = sleeper();
    server.register([request(worker.id(), "stuck", 0.0, libc::SIGKILL)]);
    // Told first that its stacks are being taken, with the scopes that expired.
    match events.recv_timeout(Duration::from_secs(5)).expect("event") {
        Event::Dumping { pid, scopes } => {
            assert_eq!(pid.as_raw_nonzero().get(), i32::try_from(worker.id()).expect("pid"));
            assert_eq!(scopes, ["stuck"]);
        }
        other => panic!("expected Dumping, got {other:?}"),
    }
    let expiry = expiry(&events);
    assert!(matches!(expiry.outcome, ReapOutcome::Signalled));
    assert_eq!(expiry.error_file, None); // error_files is off
    let stacks = expiry.stacks.expect("stacks");
    assert_eq!(stacks.source, stacks::Dumper::PySpy);
    assert_eq!(stacks.text, format!("dump --pid {}\n", worker.id()));
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
    assert_eq!(server.stats().stack_dumps, 1);
    server.stop();
    std::fs::remove_dir_all(&dir).expect("rm");
}

fn adaptive(name: &str) -> (Config, PathBuf) {
    let path = std::env::temp_dir().join(format!("et-learned-{}-{name}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let learn = crate::learned::LearnConfig {
        factor: 2.0,
        floor: Duration::from_millis(200),
        warmup: 0,
        min_samples: 3,
        ..Default::default()
    };
    let adaptive = Adaptive { learn, state_file: Some(path.clone()) };
    (Config { adaptive: Some(adaptive), ..config() }, path)
}

/// Acquires and releases `scope` for the worker `runs` times, each block taking `took`.
fn run_blocks(server: &Server, worker: &Child, scope: &str, runs: usize, took: Duration) {
    for _ in 0..runs {
        server.register([request(worker.id(), scope, 60.0, libc::SIGKILL)]);
        thread::sleep(took);
        server.register([request(worker.id(), scope, -1.0 - wall_now(), 0)]);
    }
}

#[test]
fn a_learned_bound_fires_long_before_the_after_asked_for_and_outlives_the_server() {
    let (config, path) = adaptive("bound");
    let mut server = Server::new(Direct, config.clone()).expect("server");
    let events = server.start().expect("start");
    let mut worker = sleeper();
    run_blocks(&server, &worker, "step", 3, Duration::from_millis(10));
    // Learned: 3 samples of ~10 ms, so a bound of max(200 ms, 2 x ~10 ms) instead of 60 s.
    let acquired = Instant::now();
    server.register([request(worker.id(), "step", 60.0, libc::SIGKILL)]);
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
    let waited = acquired.elapsed();
    assert!(waited >= Duration::from_millis(195), "fired before the bound: {waited:?}");
    assert!(waited < Duration::from_secs(10), "fired at the after, not the bound: {waited:?}");
    let fired = expiry(&events);
    let learned = fired.learned.expect("the learned bound fired");
    assert_eq!(learned.samples, 3);
    assert_eq!(learned.bound, Duration::from_millis(200), "the floor: 2 x 10 ms is less");
    assert!(learned.after > Duration::from_secs(59), "{learned:?}");
    let stats = server.stats();
    assert_eq!((stats.learned_expiries, stats.learned_scopes), (1, 1));
    server.stop();

    // A new server loads what this one learned and enforces it from its first acquire.
    let mut next = Server::new(Direct, config).expect("server");
    let events = next.start().expect("start");
    let mut worker = sleeper();
    let acquired = Instant::now();
    next.register([request(worker.id(), "step", 60.0, libc::SIGKILL)]);
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
    assert!(acquired.elapsed() < Duration::from_secs(10), "{:?}", acquired.elapsed());
    assert_eq!(expiry(&events).learned.map(|l| l.samples), Some(3));
    next.stop();
    std::fs::remove_file(&path).expect("the state file was saved");
}

#[test]
fn a_bad_state_file_is_reported_and_learning_starts_afresh() {
    let (config, path) = adaptive("corrupt");
    std::fs::write(&path, b"{not json").expect("write");
    let mut server = Server::new(Direct, config).expect("a bad file costs no server");
    let events = server.start().expect("start");
    match events.recv_timeout(Duration::from_secs(1)).expect("a warning") {
        Event::Warning(warning) => {
            assert!(warning.contains("cannot load the state file"), "{warning}");
            assert!(warning.ends_with("learning from scratch"), "{warning}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.stats().learned_scopes, 0);
    server.stop();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_dry_run_reports_what_the_learned_bound_would_kill_and_kills_nothing() {
    let (config, path) = adaptive("dry");
    let config = Config { dry_run: true, ..config };
    let mut server = Server::new(Direct, config).expect("server");
    let events = server.start().expect("start");
    let mut worker = sleeper();
    run_blocks(&server, &worker, "step", 3, Duration::from_millis(5));
    server.register([request(worker.id(), "step", 60.0, libc::SIGKILL)]);
    let fired = expiry(&events);
    assert!(matches!(fired.outcome, ReapOutcome::DryRun));
    assert_eq!(fired.learned.map(|l| l.bound), Some(Duration::from_millis(200)));
    assert!(worker.try_wait().expect("try_wait").is_none(), "a dry run killed");
    server.stop();
    worker.kill().expect("kill");
    worker.wait().expect("wait");
    let _ = std::fs::remove_file(&path);
}

/// A worker whose environment names a torchrun error file.
fn torchrun_worker(error_file: &std::path::Path) -> Child {
    shell_with_env(crate::error_file::VARIABLE, &error_file.to_string_lossy())
}

#[test]
fn the_error_file_says_which_timer_fired_before_the_signal_unless_the_worker_wrote_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, _path) = fifo_server("error-file", Config { error_files: true, ..config() });
    let events = server.start().expect("start");

    let path = dir.path().join("error.json");
    let mut worker = torchrun_worker(&path);
    server.register([request(worker.id(), "step", 0.3, libc::SIGKILL)]);
    let written = expiry(&events);
    assert!(matches!(written.outcome, ReapOutcome::Signalled));
    assert_eq!(written.error_file.as_deref(), Some(path.as_path()));
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
    let content: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let message = content["message"]["extraInfo"]["py_callstack"].as_str().expect("str");
    let expected =
        format!("a timer of worker pid {} expired; the worker was sent signal 9", worker.id());
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains("scope \"step\": its bound of 0.3"), "{message}");

    let own = dir.path().join("own.json");
    std::fs::write(&own, "{\"message\": \"the worker's own\"}").expect("write");
    let mut worker = torchrun_worker(&own);
    server.register([request(worker.id(), "step", 0.0, libc::SIGKILL)]);
    let kept = expiry(&events);
    assert!(matches!(kept.outcome, ReapOutcome::Signalled));
    assert_eq!(kept.error_file, None);
    worker.wait().expect("wait");
    assert_eq!(std::fs::read_to_string(&own).expect("read"), "{\"message\": \"the worker's own\"}");
    server.stop();
}

#[test]
fn when_the_learned_bound_fires_the_error_file_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, state) = adaptive("error-file");
    let config = Config { error_files: true, ..config };
    let mut server = Server::new(Direct, config).expect("server");
    let events = server.start().expect("start");
    let path = dir.path().join("error.json");
    let mut worker = torchrun_worker(&path);
    run_blocks(&server, &worker, "step", 3, Duration::from_millis(10));
    server.register([request(worker.id(), "step", 60.0, libc::SIGKILL)]);
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
    assert!(expiry(&events).learned.is_some());
    let content: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let message = content["message"]["extraInfo"]["py_callstack"].as_str().expect("str");
    let said = "scope \"step\": its learned bound of 0.20 s ran out (the longest of 3 blocks took";
    assert!(message.contains(said), "{message}");
    assert!(message.contains("its client asked for 60.0"), "{message}");
    server.stop();
    let _ = std::fs::remove_file(&state);
}

#[test]
fn a_worker_whose_state_cannot_be_read_keeps_its_timer_and_is_reaped_once_it_can() {
    let name = "server::tests::a_worker_whose_state_cannot_be_read_keeps_its_timer_and_is_reaped_once_it_can";
    if !in_own_process(name) {
        return;
    }
    let mut worker = sleeper();
    // Tracked by pid: the loop's sweep reads /proc to tell whether it still runs.
    let mut server = Server::new(Direct, Config { max_pidfds: 0, ..config() }).expect("server");
    let events = server.start().expect("start");
    server.register([request(worker.id(), "step", 0.5, libc::SIGKILL)]);
    // The loop has made its fds (its timer) before the table fills.
    let has_timerfd = || {
        std::fs::read_dir("/proc/self/fd").expect("fds").flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|link| link.to_string_lossy().ends_with("[timerfd]"))
        })
    };
    assert!(wait_until(has_timerfd));
    let mut held = fill_fd_table(64);
    // The reserved slot taken too: /proc cannot be read at all.
    drop(server.shared.lock().workers.proc().spare.borrow_mut().take());
    held.push(rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 0).expect("the freed slot"));
    // Past the deadline, the reap fails and is retried (every 100 ms); nothing is dropped,
    // and the blindness is reported once.
    let (mut blind, mut failed) = (0, 0);
    while failed < 5 {
        match events.recv_timeout(Duration::from_secs(5)).expect("an event") {
            Event::Warning(warning) if warning.contains("cannot tell whether some workers") => {
                blind += 1;
            }
            Event::Expired { expiries, .. } => {
                assert!(matches!(expiries[0].outcome, ReapOutcome::Failed(_)), "{expiries:?}");
                failed += 1;
            }
            Event::WorkerExited { .. } => panic!("a running worker was taken for exited"),
            _ => {}
        }
    }
    assert_eq!(blind, 1, "reported once, not per sweep");
    assert!(worker.try_wait().expect("try_wait").is_none());
    // One fd free: the next retry reads /proc (and takes the reserve again), and reaps.
    drop(held.pop());
    assert_eq!(worker.wait().expect("wait").signal(), Some(libc::SIGKILL));
    drop(held);
    server.stop();
}

#[test]
fn a_spared_worker_is_reported_not_signalled_and_its_next_expiry_kills_it() {
    let (mut server, _path) = fifo_server("spare", config());
    let events = server.start().expect("start");
    let mut worker = sleeper();
    let pid = Pid::from_raw(worker.id() as i32).expect("pid");
    server.register([request(worker.id(), "watch: after forward", 1.0, libc::SIGKILL)]);
    assert!(wait_until(|| server.stats().live_timers == 1));
    server.spare(pid);
    let spared = expiry(&events);
    assert!(matches!(spared.outcome, ReapOutcome::Spared), "{:?}", spared.outcome);
    assert!(worker.try_wait().expect("try_wait").is_none(), "a spared worker lives");
    assert_eq!(server.stats().live_timers, 0);
    // Spared once: its next expiry is a reap.
    server.register([request(worker.id(), "watch: after forward", 0.0, libc::SIGKILL)]);
    assert!(matches!(expiry(&events).outcome, ReapOutcome::Signalled));
    worker.wait().expect("wait");
    server.stop();
}
