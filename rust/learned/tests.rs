use std::fs::File;
use std::path::{Path, PathBuf};

use super::state::{Problem, MAX_STATE_BYTES, STATE_FORMAT};
use super::*;

type Pid = i64;
use proptest::prelude::*;

const SECOND: Duration = Duration::from_secs(1);

fn config() -> LearnConfig {
    LearnConfig { floor: SECOND, warmup: 1, min_samples: 3, ..LearnConfig::default() }
}

fn learner(config: LearnConfig) -> Learner<Pid> {
    Learner::new(config).expect("a valid config")
}

/// One block of `scope` in `pid` from `start` that takes `took`; what its acquire got.
fn block(
    learner: &mut Learner<Pid>,
    pid: Pid,
    scope: &str,
    start: Instant,
    took: Duration,
    after: Duration,
) -> Acquired {
    let acquired = learner.acquired(pid, scope, start, after);
    learner.released(pid, scope, start + took);
    acquired
}

fn summary(learner: &Learner<Pid>, scope: &str) -> ScopeSummary {
    learner.summaries().find(|s| s.scope == scope).expect("the scope is tracked")
}

#[test]
fn is_send_to_live_in_the_server_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Learner<Pid>>();
}

#[test]
fn the_bound_is_factor_times_the_longest_once_learned() {
    let base = Instant::now();
    let after = Duration::from_secs(1800);
    let mut learner = learner(config());
    // Warm-up (1), then 3 samples: 2 s, 4 s, 3 s.
    for (i, secs) in [100, 2, 4, 3].into_iter().enumerate() {
        let got = block(&mut learner, 7, "s", base, Duration::from_secs(secs), after);
        assert_eq!(got, Acquired::default(), "not learned before sample {i}");
    }
    let got = learner.acquired(7, "s", base, after);
    let expected =
        Learned { bound: Duration::from_secs(20), samples: 3, max: Duration::from_secs(4), after };
    assert_eq!(got, Acquired { learned: Some(expected), limit_reached: None });
    // A bound that would not undercut `after` is no bound.
    assert_eq!(learner.acquired(7, "s", base, Duration::from_secs(20)).learned, None);
    assert!(learner.acquired(7, "s", base, Duration::from_secs(21)).learned.is_some());
}

#[test]
fn the_floor_holds_for_fast_blocks() {
    let base = Instant::now();
    let mut learner = learner(config());
    for _ in 0..4 {
        let _ = block(&mut learner, 1, "fast", base, Duration::from_millis(3), 60 * SECOND);
    }
    let learned = learner.acquired(1, "fast", base, 60 * SECOND).learned.expect("learned");
    assert_eq!(learned.bound, SECOND);
    assert_eq!(learned.max, Duration::from_millis(3));
}

#[test]
fn each_worker_warms_up_in_each_scope() {
    let base = Instant::now();
    let long = 100 * SECOND;
    let mut learner = learner(LearnConfig { warmup: 2, ..config() });
    for pid in [1, 2] {
        for scope in ["a", "b"] {
            for _ in 0..2 {
                let _ = block(&mut learner, pid, scope, base, long, long);
            }
        }
    }
    assert!(learner.summaries().all(|s| s.samples == 0 && s.max.is_none()));
    let _ = block(&mut learner, 1, "a", base, SECOND, long);
    let _ = block(&mut learner, 2, "a", base, SECOND, long);
    assert_eq!(summary(&learner, "a").samples, 2);
    assert_eq!(summary(&learner, "a").max, Some(SECOND));
    assert_eq!(summary(&learner, "b").samples, 0);
}

#[test]
fn acquiring_again_begins_the_block_again() {
    let base = Instant::now();
    let mut learner = learner(LearnConfig { warmup: 0, ..config() });
    let _ = learner.acquired(1, "s", base, 60 * SECOND);
    let _ = learner.acquired(1, "s", base + 10 * SECOND, 60 * SECOND);
    learner.released(1, "s", base + 12 * SECOND);
    // A second release, or one without an acquire, is no sample.
    learner.released(1, "s", base + 20 * SECOND);
    learner.released(2, "s", base + 20 * SECOND);
    let s = summary(&learner, "s");
    assert_eq!((s.samples, s.max), (1, Some(2 * SECOND)));
}

#[test]
fn releasing_an_unknown_scope_tracks_nothing() {
    let mut learner = learner(config());
    learner.released(1, "never acquired", Instant::now());
    assert_eq!(learner.summaries().count(), 0);
    assert!(learner.workers.is_empty());
}

#[test]
fn a_gone_worker_loses_its_open_blocks_and_warms_up_again() {
    let base = Instant::now();
    let mut learner = learner(config());
    let _ = block(&mut learner, 1, "s", base, SECOND, 60 * SECOND); // warm-up
    let _ = learner.acquired(1, "s", base, 60 * SECOND);
    learner.worker_gone(1);
    assert_eq!(learner.worker_scopes, 0);
    learner.released(1, "s", base + SECOND);
    assert_eq!(summary(&learner, "s").samples, 0);
    // A new process with the same pid starts its warm-up afresh.
    let _ = block(&mut learner, 1, "s", base, SECOND, 60 * SECOND);
    assert_eq!(summary(&learner, "s").samples, 0);
    let _ = block(&mut learner, 1, "s", base, SECOND, 60 * SECOND);
    assert_eq!(summary(&learner, "s").samples, 1);
    learner.worker_gone(99);
}

#[test]
fn scopes_past_the_cap_are_not_learned_and_warn_once() {
    let base = Instant::now();
    let mut learner = learner(LearnConfig { max_scopes: 2, ..config() });
    assert_eq!(learner.acquired(1, "a", base, SECOND).limit_reached, None);
    assert_eq!(learner.acquired(1, "b", base, SECOND).limit_reached, None);
    assert_eq!(learner.acquired(1, "c", base, SECOND).limit_reached, Some(Limit::Scopes));
    assert_eq!(learner.acquired(1, "d", base, SECOND).limit_reached, None);
    assert_eq!(learner.acquired(1, "a", base, SECOND).limit_reached, None);
    let scopes: Vec<String> = learner.summaries().map(|s| s.scope).collect();
    assert_eq!(scopes, ["a", "b"]);
    assert_eq!(learner.worker_scopes, 2);
}

#[test]
fn long_scopes_are_not_learned_and_warn_once() {
    let base = Instant::now();
    let mut learner = learner(config());
    let long = "x".repeat(MAX_SCOPE_BYTES + 1);
    assert_eq!(learner.acquired(1, &long, base, SECOND).limit_reached, Some(Limit::ScopeBytes));
    assert_eq!(learner.acquired(2, &long, base, SECOND).limit_reached, None);
    learner.released(1, &long, base);
    assert_eq!(learner.summaries().count(), 0);
    let fits = "x".repeat(MAX_SCOPE_BYTES);
    assert_eq!(learner.acquired(1, &fits, base, SECOND).limit_reached, None);
}

#[test]
fn worker_scope_pairs_are_capped_but_learned_bounds_still_apply() {
    let base = Instant::now();
    let after = 60 * SECOND;
    let mut learner = learner(LearnConfig { warmup: 0, max_worker_scopes: 1, ..config() });
    for _ in 0..3 {
        let _ = block(&mut learner, 1, "s", base, SECOND, after);
    }
    let got = block(&mut learner, 2, "s", base, 30 * SECOND, after);
    assert_eq!(got.limit_reached, Some(Limit::WorkerScopes));
    assert_eq!(got.learned.map(|l| l.bound), Some(5 * SECOND));
    let got = block(&mut learner, 1, "t", base, SECOND, after);
    assert_eq!(got, Acquired::default());
    assert_eq!(summary(&learner, "s").samples, 3);
    assert_eq!(summary(&learner, "t").samples, 0);
    assert_eq!(learner.workers.len(), 1);
    learner.worker_gone(1);
    let _ = block(&mut learner, 2, "s", base, SECOND, after);
    assert_eq!(summary(&learner, "s").samples, 4);
}

#[test]
fn summaries_report_quantiles_after_and_suggestion() {
    let base = Instant::now();
    let mut learner = learner(LearnConfig { warmup: 0, ..config() });
    let _ = learner.acquired(1, "idle", base, 7 * SECOND);
    for ms in 1..=100u64 {
        let after = Duration::from_secs(if ms == 50 { 900 } else { 600 });
        let _ = block(&mut learner, 1, "s", base, Duration::from_millis(ms * 10), after);
    }
    let s = summary(&learner, "s");
    assert_eq!(s.samples, 100);
    assert_eq!(s.max, Some(SECOND));
    assert_eq!(s.after, Some(900 * SECOND));
    assert_eq!(s.suggested, Some(5 * SECOND));
    let p50 = s.p50.expect("samples").as_secs_f64();
    assert!((0.5..=0.5 * 1.125).contains(&p50), "p50 {p50}");
    let p99 = s.p99.expect("samples").as_secs_f64();
    assert!((0.99..=1.0).contains(&p99), "p99 {p99}");
    let idle = summary(&learner, "idle");
    let expected = ScopeSummary {
        scope: "idle".into(),
        samples: 0,
        p50: None,
        p99: None,
        max: None,
        after: Some(7 * SECOND),
        suggested: None,
    };
    assert_eq!(idle, expected);
}

#[test]
fn the_suggestion_is_at_most_after() {
    let base = Instant::now();
    let mut learner = learner(LearnConfig { warmup: 0, ..config() });
    for _ in 0..3 {
        let _ = block(&mut learner, 1, "s", base, 10 * SECOND, 30 * SECOND);
    }
    assert_eq!(summary(&learner, "s").suggested, Some(30 * SECOND));
}

#[test]
fn config_is_validated() {
    let bad = [
        LearnConfig { factor: 0.5, ..config() },
        LearnConfig { factor: f64::NAN, ..config() },
        LearnConfig { factor: f64::INFINITY, ..config() },
        LearnConfig { min_samples: 0, ..config() },
        LearnConfig { min_samples: MAX_MIN_SAMPLES + 1, ..config() },
        LearnConfig { max_scopes: 0, ..config() },
        LearnConfig { max_worker_scopes: 0, ..config() },
    ];
    for config in bad {
        assert!(Learner::<Pid>::new(config.clone()).is_err(), "{config:?}");
    }
    assert_eq!(LearnConfig::default().validate(), Ok(()));
    let message = Learner::<Pid>::new(LearnConfig { factor: 0.5, ..config() }).unwrap_err();
    assert_eq!(message.to_string(), "the factor must be a finite number of at least 1, not 0.5");
}

// -- state file -----------------------------------------------------------------------------

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/learned-state.json")
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// A comparable copy of the summaries.
fn figures(learner: &Learner<Pid>) -> Vec<(String, u64, [Option<Duration>; 5])> {
    learner
        .summaries()
        .map(|s| (s.scope.to_owned(), s.samples, [s.p50, s.p99, s.max, s.after, s.suggested]))
        .collect()
}

fn load(path: &Path) -> Result<Learner<Pid>, StateError> {
    Learner::load(config(), path)
}

fn problem(bytes: &[u8]) -> Problem {
    let dir = scratch();
    let path = dir.path().join("state.json");
    std::fs::write(&path, bytes).expect("written");
    match load(&path) {
        Err(StateError::Invalid { path: reported, problem }) => {
            assert_eq!(reported, path);
            problem
        }
        other => panic!("{:?} loaded as {other:?}", String::from_utf8_lossy(bytes)),
    }
}

#[test]
fn a_missing_file_is_a_fresh_start() {
    let dir = scratch();
    let path = dir.path().join("none.json");
    let learner = load(&path).expect("fresh");
    assert_eq!(learner.summaries().count(), 0);
    // To a reader that is not starting afresh, it is an error.
    let error = read_state(&path).expect_err("nothing to read");
    assert!(matches!(&error, StateError::Missing { path: p } if *p == path));
    let expected = format!("cannot read the state file {}: there is no such file", path.display());
    assert_eq!(error.to_string(), expected);
}

#[test]
fn the_reader_gives_each_scopes_figures_as_saved() {
    let scopes = read_state(&fixture()).expect("the fixture reads");
    let ms = Duration::from_millis;
    let first = ScopeSummary {
        scope: "train.py:42".into(),
        samples: 12,
        p50: Some(Duration::from_micros(1_048_576)),
        p99: Some(ms(1250)),
        max: Some(ms(1250)),
        after: Some(ms(1_800_000)),
        suggested: Some(ms(6250)),
    };
    assert_eq!(scopes[0].summary, first);
    let names: Vec<&str> = scopes.iter().map(|s| s.summary.scope.as_str()).collect();
    assert_eq!(names, ["train.py:42", "train.py:57", "checkpoint.py:10"]);
    // A suggestion under the saving server's settings (min_samples 2) is read as saved; a
    // server loading the file derives its own (min_samples 3 here: none yet).
    let dir = scratch();
    let path = dir.path().join("state.json");
    let record = serde_json::json!({"scope": "s", "samples": 2, "max": 1.0, "after": 60.0,
        "p50": 1.0, "p99": 1.0, "suggested": 5.0, "histogram": [[143, 2]]});
    let state = serde_json::json!({"format": STATE_FORMAT, "version": 1, "scopes": [record]});
    std::fs::write(&path, state.to_string()).expect("written");
    let saved = read_state(&path).expect("read");
    assert_eq!(saved[0].summary.suggested, Some(5 * SECOND));
    assert_eq!(summary(&load(&path).expect("loaded"), "s").suggested, None);
}

#[test]
fn save_then_load_round_trips() {
    let base = Instant::now();
    let mut learner = learner(LearnConfig { warmup: 0, ..config() });
    for ms in [1, 7, 300, 2_000, 2_001, 86_400_000] {
        let _ = block(&mut learner, 1, "s\n\"é\"", base, Duration::from_millis(ms), SECOND);
    }
    let _ = learner.acquired(1, "open", base, Duration::MAX);
    let _ = learner.acquired(1, "no after", base, SECOND);
    learner.scopes[2].after_us = None;
    let dir = scratch();
    let path = dir.path().join("state.json");
    learner.save(&path).expect("saved");
    learner.save(&path).expect("saved over");
    let loaded = load(&path).expect("loaded");
    assert_eq!(figures(&loaded), figures(&learner));
    assert_eq!(loaded.scopes, learner.scopes);
    let names = std::fs::read_dir(dir.path()).expect("listed").count();
    assert_eq!(names, 1, "no temporary file left behind");
}

#[test]
fn saving_over_a_directory_is_a_write_error() {
    let dir = scratch();
    let path = dir.path().join("sub");
    std::fs::create_dir(&path).expect("created");
    let error = learner(config()).save(&path).expect_err("a directory is in the way");
    assert!(matches!(&error, StateError::Write { path: p, .. } if *p == path), "{error}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("listed").count(), 1, "no temporary file");
}

#[test]
fn the_fixture_is_what_save_writes() {
    // Both sides read this file: the CLI's tests use it too, so they agree on one format.
    let text = std::fs::read_to_string(fixture()).expect("the fixture");
    let learner = Learner::load(LearnConfig::default(), &fixture()).expect("the fixture loads");
    let s = summary(&learner, "train.py:42");
    assert_eq!((s.samples, s.max), (12, Some(Duration::from_millis(1250))));
    let dir = scratch();
    let path = dir.path().join("state.json");
    learner.save(&path).expect("saved");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
    let expected: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(saved, expected);
}

#[test]
fn other_files_are_named_as_such() {
    assert!(matches!(problem(b""), Problem::NotJson(_)));
    assert!(matches!(problem(b"{\"format\": \"elastic-timer"), Problem::NotJson(_)));
    assert!(matches!(problem(b"\xff\xfe"), Problem::NotJson(_)));
    assert!(matches!(problem(b"[1, 2]"), Problem::Foreign(_)));
    assert!(matches!(problem(b"{\"version\": 1}"), Problem::Foreign(_)));
    assert!(matches!(problem(b"{\"format\": 3, \"version\": 1}"), Problem::Foreign(_)));
    let future = format!("{{\"format\": {STATE_FORMAT:?}, \"version\": 2, \"scopes\": {{}}}}");
    let message = problem(future.as_bytes()).to_string();
    assert_eq!(message, "it has format version 2, and this elastic-timer reads version 1");
    let no_version = format!("{{\"format\": {STATE_FORMAT:?}}}");
    assert!(matches!(problem(no_version.as_bytes()), Problem::Version(_)));
}

#[test]
fn corrupt_content_is_an_error() {
    let record = |fields: &str| {
        let defaults = [
            ("scope", "\"s\""),
            ("samples", "2"),
            ("max", "1.5"),
            ("after", "null"),
            ("p50", "null"),
            ("p99", "null"),
            ("suggested", "null"),
            ("histogram", "[[200, 2]]"),
        ];
        let mut fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(fields).expect("test fields");
        for (key, value) in defaults {
            fields.entry(key).or_insert(serde_json::from_str(value).expect("default"));
        }
        let scopes = serde_json::Value::Array(vec![fields.into()]);
        format!("{{\"format\": {STATE_FORMAT:?}, \"version\": 1, \"scopes\": {scopes}}}")
    };
    assert!(load_bytes(record("{}").as_bytes()).is_ok(), "the base record is valid");
    for bad in [
        r#"{"samples": -1}"#,
        r#"{"samples": 0}"#,
        r#"{"max": null}"#,
        r#"{"max": -1.0}"#,
        r#"{"after": "soon"}"#,
        r#"{"histogram": [[320, 1]]}"#,
        r#"{"histogram": [[3, 4294967296]]}"#,
        r#"{"histogram": [[3, 2], [4, 1]]}"#,
        r#"{"histogram": {}}"#,
        r#"{"scope": 5}"#,
        r#"{"p50": -0.5}"#,
        r#"{"p99": "1s"}"#,
        r#"{"suggested": -2}"#,
    ] {
        assert!(matches!(problem(record(bad).as_bytes()), Problem::Corrupt(_)), "{bad}");
    }
    let long = serde_json::Value::from("x".repeat(MAX_SCOPE_BYTES + 1));
    let long = record(&format!("{{\"scope\": {long}}}"));
    assert!(matches!(problem(long.as_bytes()), Problem::Corrupt(_)));
    let one = serde_json::json!({"scope": "s", "samples": 0, "max": null, "after": null,
        "p50": null, "p99": null, "suggested": null, "histogram": []});
    let twice = serde_json::json!({"format": STATE_FORMAT, "version": 1, "scopes": [one, one]});
    let message = problem(twice.to_string().as_bytes()).to_string();
    assert_eq!(message, "it is corrupt: scope \"s\": listed twice");
}

fn load_bytes(bytes: &[u8]) -> Result<Learner<Pid>, StateError> {
    let dir = scratch();
    let path = dir.path().join("state.json");
    std::fs::write(&path, bytes).expect("written");
    load(&path)
}

#[test]
fn a_large_file_is_refused_unread() {
    let dir = scratch();
    let path = dir.path().join("state.json");
    File::create(&path).and_then(|f| f.set_len(MAX_STATE_BYTES + 1)).expect("made");
    assert!(matches!(load(&path), Err(StateError::Invalid { problem: Problem::TooLarge, .. })));
}

#[test]
fn an_unreadable_path_is_a_read_error() {
    let dir = scratch();
    assert!(matches!(load(dir.path()), Err(StateError::Read { .. })));
}

#[test]
fn a_file_someone_else_could_have_written_is_refused_unread() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let path = dir.path().join("state.json");
    learner(config()).save(&path).expect("saved");
    load(&path).expect("a private file of ours loads");
    let refusal = |path: &Path| match load(path) {
        Err(StateError::Read { source, .. }) => source.to_string(),
        other => panic!("loaded: {other:?}"),
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    assert_eq!(refusal(&path), "group or others may write it (mode 0666)");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    assert_eq!(refusal(&link), "it is a symbolic link");
    // A FIFO would block a plain open until someone opened it to write.
    let fifo = dir.path().join("fifo.json");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600))
        .expect("mkfifo");
    assert_eq!(refusal(&fifo), "it is not a regular file");
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
        assert_eq!(refusal(&path), "it belongs to uid 65534, not to uid 0");
    }
}

#[test]
fn saving_replaces_what_someone_put_at_the_path_and_writes_nothing_else() {
    let dir = scratch();
    let target = dir.path().join("shell-startup");
    std::fs::write(&target, "kept\n").expect("written");
    for name in ["symlink.json", "hardlink.json"] {
        let path = dir.path().join(name);
        if name == "symlink.json" {
            std::os::unix::fs::symlink(&target, &path).expect("symlink");
        } else {
            std::fs::hard_link(&target, &path).expect("link");
        }
        learner(config()).save(&path).expect("saved");
        // The name now holds a new file of ours; the file it led to is as it was.
        let saved = std::fs::symlink_metadata(&path).expect("stat");
        assert!(saved.file_type().is_file(), "{name}");
        load(&path).expect("ours, private: it loads");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "kept\n", "{name}");
    }
}

#[test]
fn scopes_past_the_cap_are_dropped_on_load() {
    let dir = scratch();
    let path = dir.path().join("state.json");
    let mut many = learner(config());
    for scope in ["a", "b", "c"] {
        let _ = many.acquired(1, scope, Instant::now(), SECOND);
    }
    many.save(&path).expect("saved");
    let loaded: Learner<Pid> =
        Learner::load(LearnConfig { max_scopes: 2, ..config() }, &path).expect("ok");
    let scopes: Vec<String> = loaded.summaries().map(|s| s.scope).collect();
    assert_eq!(scopes, ["a", "b"]);
}

// -- properties -----------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        pid: Pid,
        scope: u8,
        after_ms: u64,
    },
    Release {
        pid: Pid,
        scope: u8,
    },
    Gone(Pid),
    /// The clock moves on.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3i64, 0..3u8, 0..20_000u64)
            .prop_map(|(pid, scope, after_ms)| Op::Acquire { pid, scope, after_ms }),
        4 => (0..3i64, 0..3u8).prop_map(|(pid, scope)| Op::Release { pid, scope }),
        1 => (0..3i64).prop_map(Op::Gone),
        4 => (0..3_000u64).prop_map(Op::Wait),
    ]
}

fn settings() -> impl Strategy<Value = LearnConfig> {
    (1.0..10.0f64, 0..2_000u64, 0..3u32, 1..=MAX_MIN_SAMPLES).prop_map(
        |(factor, floor_ms, warmup, min_samples)| LearnConfig {
            factor,
            floor: Duration::from_millis(floor_ms),
            warmup,
            min_samples,
            ..LearnConfig::default()
        },
    )
}

/// The obvious bookkeeping: every completed block of every worker, warm-up flagged.
#[derive(Default)]
struct Model {
    open: HashMap<(Pid, u8), Instant>,
    completed: HashMap<(Pid, u8), u32>,
    /// Per scope: the durations that count.
    samples: HashMap<u8, Vec<Duration>>,
}

proptest! {
    #[test]
    fn the_bound_stays_between_the_longest_block_and_after(
        config in settings(),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let base = Instant::now();
        let mut now = base;
        let mut learner = learner(config.clone());
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Acquire { pid, scope, after_ms } => {
                    let after = Duration::from_millis(after_ms);
                    let got = learner.acquired(pid, &format!("s{scope}"), now, after);
                    model.open.insert((pid, scope), now);
                    prop_assert_eq!(got.limit_reached, None);
                    let samples = model.samples.get(&scope).map_or(&[][..], Vec::as_slice);
                    let longest = samples.iter().max().copied();
                    let learned = samples.len() >= config.min_samples as usize;
                    match got.learned {
                        Some(l) => {
                            prop_assert!(learned);
                            prop_assert!(l.bound < after);
                            prop_assert!(l.bound >= config.floor);
                            prop_assert_eq!(Some(l.max), longest);
                            prop_assert!(l.bound.as_secs_f64() >= config.factor * l.max.as_secs_f64() - 1e-6);
                            prop_assert_eq!(l.samples, samples.len() as u64);
                            prop_assert_eq!(l.after, after);
                        }
                        None => {
                            // Not learned, or factor x longest (or the floor) reaches after.
                            let longest = longest.unwrap_or_default().as_secs_f64();
                            prop_assert!(
                                !learned
                                    || config.floor >= after
                                    || config.factor * longest >= after.as_secs_f64() - 2e-6
                            );
                        }
                    }
                }
                Op::Release { pid, scope } => {
                    learner.released(pid, &format!("s{scope}"), now);
                    if let Some(start) = model.open.remove(&(pid, scope)) {
                        let completed = model.completed.entry((pid, scope)).or_default();
                        if *completed < config.warmup {
                            *completed += 1;
                        } else {
                            model.samples.entry(scope).or_default().push(now - start);
                        }
                    }
                }
                Op::Gone(pid) => {
                    learner.worker_gone(pid);
                    model.open.retain(|&(p, _), _| p != pid);
                    model.completed.retain(|&(p, _), _| p != pid);
                }
                Op::Wait(ms) => now += Duration::from_millis(ms),
            }
        }
        for s in learner.summaries() {
            let scope: u8 = s.scope[1..].parse().expect("s<n>");
            let samples = model.samples.get(&scope).map_or(&[][..], Vec::as_slice);
            prop_assert_eq!(s.samples, samples.len() as u64);
            prop_assert_eq!(s.max, samples.iter().max().copied());
            prop_assert!(s.p50 <= s.p99 && s.p99 <= s.max);
            if let (Some(suggested), Some(after)) = (s.suggested, s.after) {
                prop_assert!(suggested <= after);
            }
        }
    }

    #[test]
    fn the_scope_cap_holds_whatever_the_scopes(
        max_scopes in 1..8usize,
        scopes in proptest::collection::vec(any::<u16>(), 1..100),
    ) {
        let mut learner = learner(LearnConfig { max_scopes, ..config() });
        let now = Instant::now();
        let mut warnings = 0;
        for (pid, scope) in scopes.iter().enumerate() {
            let got = learner.acquired(pid as Pid % 4, &format!("step {scope}"), now, SECOND);
            warnings += usize::from(got.limit_reached == Some(Limit::Scopes));
        }
        let distinct: std::collections::HashSet<_> = scopes.iter().collect();
        prop_assert_eq!(learner.summaries().count(), distinct.len().min(max_scopes));
        prop_assert_eq!(warnings, usize::from(distinct.len() > max_scopes));
        prop_assert!(learner.worker_scopes <= 4 * max_scopes);
    }

}

proptest! {
    // Each case writes and syncs a file.
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn save_and_load_round_trip(
        blocks in proptest::collection::vec((0..4u8, 0..100_000_000u64, 0..4_000_000u64), 0..60),
    ) {
        let base = Instant::now();
        let mut learner = learner(LearnConfig { warmup: 0, ..config() });
        for (scope, took_us, after_ms) in blocks {
            let took = Duration::from_micros(took_us);
            let _ = block(&mut learner, 1, &format!("s{scope}"), base, took, Duration::from_millis(after_ms));
        }
        let dir = scratch();
        let path = dir.path().join("state.json");
        learner.save(&path).expect("saved");
        let loaded = load(&path).expect("loaded");
        prop_assert_eq!(figures(&loaded), figures(&learner));
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic(
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = std::fs::read(fixture()).expect("the fixture");
        for (at, byte) in flips {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        // Loaded or refused, both fine: what must not happen is a panic.
        let _ = load_bytes(&bytes);
    }

    #[test]
    fn arbitrary_bytes_are_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert!(load_bytes(&bytes).is_err());
    }
}
