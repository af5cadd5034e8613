"""Real torchrun (and ft_launcher) jobs with elastic-timer's server inside the agent.

The job (tests/jobs/train.py) runs three steps per worker, each inside
``expires(after=1)``; the rank named by HANG_RANK hangs in its second step on the attempts
listed in HANG_ATTEMPTS. Workers configure their client with ``elastic_timer.configure()``:
the FIFO comes from TORCHELASTIC_TIMER_FILE, set by the agent. The jobs are marked
``torchrun`` (which implies ``torch``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from elastic_timer._torch_versions import torch_signals_self

# Every test here runs torchrun, torch's agent or its launcher code.
pytestmark = pytest.mark.torch

JOB = str(Path(__file__).parent / "jobs" / "train.py")
LAUNCHER = shutil.which("elastic-timer-run") or "elastic-timer-run"
COMMON = ["--monitor-interval", "0.1", "--nproc-per-node", "2"]


def job_env(tmp_path: Path, hang_rank: int = -1, hang_attempts: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JOB_LOG=str(tmp_path / "job.log"),
        HANG_RANK=str(hang_rank),
        HANG_ATTEMPTS=hang_attempts,
        OMP_NUM_THREADS="1",
        LOGLEVEL="INFO",
    )
    env.pop("TORCHELASTIC_ENABLE_FILE_TIMER", None)
    env.pop("TORCHELASTIC_TIMER_FILE", None)
    return env


def finished(tmp_path: Path) -> list[str]:
    log = tmp_path / "job.log"
    if not log.exists():
        return []
    return sorted(" ".join(line.split()[:4]) for line in log.read_text().splitlines())


def run(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


@pytest.mark.torchrun
def test_a_job_without_hang_finishes_with_exit_0_and_no_reap(tmp_path: Path) -> None:
    env = job_env(tmp_path)
    env["ELASTIC_TIMER_EVENT_LOG"] = str(tmp_path / "events.jsonl")
    result, _ = run([LAUNCHER, "--standalone", *COMMON, JOB], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert finished(tmp_path) == ["rank 0 attempt 0", "rank 1 attempt 0"]
    assert "Reaping worker" not in result.stderr
    # Our server ran in the agent: only ours writes an event log, and it reaped nothing.
    names = [r["event"] for r in read_events(tmp_path / "events.jsonl")]
    assert names == ["watchdog started", "watchdog stopped"], names


def root_cause(stderr: str) -> str:
    """The Root Cause block of torchrun's failure summary (ChildFailedError)."""
    assert "Root Cause (first observed failure):" in stderr, stderr[-3000:]
    return stderr[stderr.index("Root Cause (first observed failure):") :]


# What our server writes in the error file of a worker it reaps: the scope of the step's
# expires(after=1) (the job's one `with` line) and the bound that ran out.
EXPIRY_SAYS = re.compile(
    r"traceback : elastic-timer: a timer of worker pid (\d+) expired; the worker was sent "
    r"signal 9\n\s+scope \"" + re.escape(JOB) + r"#\d+\": its bound of (0\.9\d|1\.0\d) s ran out"
)


@pytest.mark.torchrun
def test_a_hung_worker_ends_the_job_with_torchruns_failure_summary(tmp_path: Path) -> None:
    """--max-restarts 0: the hung worker is reaped and the agent, which our server never
    kills, ends the job as torchrun ends a failed job: exit 1 and its failure summary, whose
    Root Cause names the expired timer (written to the worker's error file before the kill)."""
    result, _ = run(
        [LAUNCHER, "--standalone", *COMMON, JOB], job_env(tmp_path, hang_rank=1, hang_attempts="0")
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert finished(tmp_path) == ["rank 0 attempt 0"]
    assert "Reaping worker_pid" in result.stderr
    cause = root_cause(result.stderr)
    assert "rank      : 1 (local_rank: 1)" in cause
    assert "exitcode  : -9" in cause
    said = EXPIRY_SAYS.search(cause)
    assert said, cause
    assert f"(pid: {said[1]})" in cause  # the worker it names is the one that died
    assert "error.json" in cause  # the summary read the worker's error file


@pytest.mark.torchrun
def test_the_failure_summary_has_the_hung_workers_stacks(tmp_path: Path) -> None:
    """With stacks on, the Root Cause shows where the worker was stuck; the event log names
    the error file written."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0")
    events = tmp_path / "events.jsonl"
    env.update(ELASTIC_TIMER_STACK_DUMP="5", ELASTIC_TIMER_EVENT_LOG=str(events))
    result, _ = run([LAUNCHER, "--standalone", *COMMON, JOB], env)
    assert result.returncode == 1, result.stderr[-3000:]
    cause = root_cause(result.stderr)
    assert EXPIRY_SAYS.search(cause), cause
    stacks_at = cause.index("Its Python stacks, taken before the signal (from faulthandler):")
    assert 'train.py", line' in cause[stacks_at:]
    assert "in main" in cause[stacks_at:]
    (expired,) = [r for r in read_events(events) if r["event"] == "timer expired"]
    assert expired["error_file"].endswith("/1/error.json"), expired
    assert f"error_file: {expired['error_file']}" in cause


@pytest.mark.torchrun
def test_a_worker_that_records_its_own_error_keeps_its_message(tmp_path: Path) -> None:
    """The timer reaps with SIGTERM, which the worker turns into an exception that torch's
    @record writes to its error file: the summary shows the worker's traceback, not ours."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0")
    env.update(HANG_SIGNAL="TERM", RECORD="1")
    result, _ = run([LAUNCHER, "--standalone", *COMMON, JOB], env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Reaping worker_pid" in result.stderr
    cause = root_cause(result.stderr)
    assert "RuntimeError: rank 1 was told to stop (signal 15)" in cause, cause
    assert "elastic-timer: a timer" not in cause


@pytest.mark.torchrun
@pytest.mark.parametrize("signal_self", [True, None])
def test_install_with_torchs_self_signal_ends_the_job_as_stock_torch(
    tmp_path: Path, signal_self: bool | None
) -> None:
    """install(signal_self=True) is torch's behaviour from 2.7 on: the server kills its agent
    after the reap, before any summary. install() (None) does what the installed torch's own
    server does. Either way the reap happens at the deadline, as with torch's server."""
    ours_dir, torch_dir = tmp_path / "ours", tmp_path / "torch"
    ours_dir.mkdir()
    torch_dir.mkdir()
    launch = (
        "import logging, sys; from elastic_timer import torch as t; "
        "log = logging.getLogger('elastic_timer'); log.addHandler(logging.StreamHandler()); "
        "log.setLevel('INFO'); "
        f"t.install(signal_self={signal_self}, descendants_only=True); "
        "from torch.distributed.run import main; main(sys.argv[1:])"
    )
    ours_env = job_env(ours_dir, hang_rank=1, hang_attempts="0")
    ours_env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    ours_env["ELASTIC_TIMER_EVENT_LOG"] = str(ours_dir / "events.jsonl")
    ours, _ = run([sys.executable, "-c", launch, "--standalone", *COMMON, JOB], ours_env)
    stock_env = job_env(torch_dir, hang_rank=1, hang_attempts="0")
    stock_env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    stock, _ = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *COMMON, JOB], stock_env
    )
    assert stock.returncode == (-signal.SIGKILL if torch_signals_self() else 1)
    killed = signal_self is True or torch_signals_self()
    assert ours.returncode == (-signal.SIGKILL if killed else 1), ours.stderr[-3000:]
    if signal_self is None:
        assert ours.returncode == stock.returncode
    assert finished(ours_dir) == finished(torch_dir) == ["rank 0 attempt 0"]
    assert "Reaping worker_pid" in ours.stderr  # our server logged the reap
    if killed:
        assert "Root Cause" not in ours.stderr  # the agent died before it could say why
    # The reap came at the deadline: the event's time against the expiration the worker sent
    # (both wall clock), with a margin for 2 loaded cores.
    [expired] = [r for r in read_events(ours_dir / "events.jsonl") if r["event"] == "timer expired"]
    late = expired["time"] - expired["expirations"][0]
    assert 0 <= late < 1.0, f"reaped {late:.3f} s after the deadline"


@pytest.mark.torchrun
def test_a_hung_worker_is_reaped_and_the_group_restarted(tmp_path: Path) -> None:
    """--max-restarts 1: the hang of attempt 0 is reaped, the group restarts, the job ends 0."""
    result, _ = run(
        [LAUNCHER, "--standalone", "--max-restarts", "1", *COMMON, JOB],
        job_env(tmp_path, hang_rank=1, hang_attempts="0"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert finished(tmp_path) == ["rank 0 attempt 0", "rank 0 attempt 1", "rank 1 attempt 1"]
    assert "Reaping worker_pid" in result.stderr


def read_events(path: Path) -> list[dict[str, Any]]:
    """The records of an ELASTIC_TIMER_EVENT_LOG: only our server writes one."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.torchrun
def test_learned_timeouts_catch_a_hang_in_seconds_and_again_after_the_restart(
    tmp_path: Path,
) -> None:
    """--adaptive (as ELASTIC_TIMER_ADAPTIVE=1), --max-restarts 1, steps that ask for 60 s:
    rank 1 hangs after 12 steps and is reaped at the learned bound (the 0.5 s floor here); the group
    restarts under a new server, which loads what the first learned (a file per run id), and
    rank 1, hanging at its first step, is reaped at the learned bound again."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0,1")
    events = tmp_path / "events.jsonl"
    env.update(
        STEPS="20",
        STEP_TIMEOUT="60",
        HANG_STEPS="12,0",
        ELASTIC_TIMER_ADAPTIVE_FLOOR="0.5",
        ELASTIC_TIMER_EVENT_LOG=str(events),
    )
    cmd = [LAUNCHER, "--adaptive", "--standalone", "--max-restarts", "1", *COMMON, JOB]
    result, took = run(cmd, env)
    assert result.returncode != 0, "both attempts hung: the job fails"
    assert "rank 1" not in " ".join(finished(tmp_path)), result.stderr[-3000:]
    records = [json.loads(line) for line in events.read_text().splitlines()]
    expired = [r for r in records if r["event"] == "timer expired"]
    assert [(r["outcome"], r["learned_bound"]) for r in expired] == [("signalled", 0.5)] * 2
    first, second = expired
    assert first["learned_samples"] >= 10
    assert second["learned_samples"] >= first["learned_samples"], "learned afresh"
    assert all(r["learned_after"] > 59 for r in expired)
    assert took < 60, "a hang cost its after (60 s), not the learned bound"


@pytest.mark.torchrun
def test_environment_variables_turn_on_stack_dumps_and_the_event_log(tmp_path: Path) -> None:
    """A torchrun user cannot pass keywords to the agent's server: the environment does it.
    The hung worker's stacks appear in the agent's log before its reap, and in the event log."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0")
    events = tmp_path / "events.jsonl"
    env.update(ELASTIC_TIMER_STACK_DUMP="5", ELASTIC_TIMER_EVENT_LOG=str(events))
    result, _ = run([LAUNCHER, "--standalone", "--max-restarts", "1", *COMMON, JOB], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert finished(tmp_path) == ["rank 0 attempt 0", "rank 0 attempt 1", "rank 1 attempt 1"]
    stacks_at = result.stderr.index("Stacks of expired worker pid=")
    assert "from faulthandler)" in result.stderr[stacks_at:]
    assert 'train.py", line' in result.stderr[stacks_at:]
    assert stacks_at < result.stderr.index("Reaping worker_pid")
    (expired,) = [r for r in read_events(events) if r["event"] == "timer expired"]
    assert expired["outcome"] == "signalled"
    assert "in main" in expired["stacks"], expired["stacks"]


@pytest.mark.torchrun
def test_stock_torchrun_kills_its_agent_instead_of_restarting(tmp_path: Path) -> None:
    """Why the launcher turns the self-signal off: with torch's server (from torch 2.7 on)
    --max-restarts is moot. Before 2.7 torch's server left the agent alone, which restarted."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0")
    env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    result, _ = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--max-restarts",
            "1",
            *COMMON,
            JOB,
        ],
        env,
    )
    if torch_signals_self():
        assert result.returncode == -signal.SIGKILL
        assert finished(tmp_path) == ["rank 0 attempt 0"]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert finished(tmp_path) == ["rank 0 attempt 0", "rank 0 attempt 1", "rank 1 attempt 1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.torchrun
def test_two_nodes_on_localhost(tmp_path: Path) -> None:
    """Two agents (c10d rendezvous on 127.0.0.1), a worker on node 1 hangs: it is reaped, both
    the failed group restarts, and both agents end the job cleanly (exit 0). The other
    workers are still training when the hang is reaped, as in a real job."""
    env = job_env(tmp_path, hang_rank=3, hang_attempts="0")
    # Healthy steps keep a 2 s margin to their timeout, even on 2 loaded cores; the hang (in
    # rank 3's second step) is reaped at 4 s, while the others still train (8 steps of 1 s).
    env.update(STEPS="8", STEP_SECONDS="1", STEP_TIMEOUT="3")
    outcomes = two_agents(env, "two-nodes", JOB, "--max-restarts", "1")
    assert [code for code, _ in outcomes] == [0, 0], outcomes[0][1][-2000:] + outcomes[1][1][-2000:]
    done = finished(tmp_path)
    assert "rank 3 attempt 0" not in done  # the hung worker never finished its first attempt
    assert "rank 3 attempt 1" in done  # its restart did
    assert {line.split(" attempt")[0] for line in done} == {f"rank {r}" for r in range(4)}
    assert sum("Reaping worker_pid" in err for _, err in outcomes) == 1


COLLECTIVE_JOB = str(Path(__file__).parent / "jobs" / "collective.py")


def two_agents(
    env: dict[str, str],
    run_id: str,
    script: str = "",
    *launcher_args: str,
    flags: Sequence[str] = (),
    agent_env: Callable[[int], dict[str, str]] = lambda number: {},
    timeout: float = 120,
) -> list[tuple[int, str]]:
    """Runs ``script`` (tests/jobs/collective.py by default) under two agents (2 ranks each,
    c10d rendezvous on 127.0.0.1); returns each agent's exit code and stderr. ``flags`` are
    elastic-timer-run's own (``--watch``), ``agent_env(n)`` what agent n's environment adds."""
    cmd = [
        LAUNCHER,
        *flags,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        run_id,
        "--monitor-interval",
        "0.1",
        *launcher_args,
        script or COLLECTIVE_JOB,
    ]
    agents = [
        subprocess.Popen(
            cmd,
            env={**env, **agent_env(number)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(2)
    ]
    try:
        # communicate, not wait: an agent's stderr must be read as it comes, or it blocks.
        outputs = [agent.communicate(timeout=timeout)[1] for agent in agents]
        return [(agent.returncode, output) for agent, output in zip(agents, outputs)]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def hang_job_env(tmp_path: Path, hang_rank: int) -> dict[str, str]:
    env = job_env(tmp_path)
    env.update(
        HANG_RANK=str(hang_rank),
        ELASTIC_TIMER_STACK_DUMP="5",
        ELASTIC_TIMER_EVENT_LOG=str(tmp_path / "events.jsonl"),
    )
    return env


@pytest.mark.torchrun
def test_one_hang_report_names_the_rank_that_is_not_in_the_collective(tmp_path: Path) -> None:
    """The issue's proof: ranks step through all_reduce inside expires(after=3); at step 2
    rank 3 sleeps in load_batch instead. Both agents take all their ranks' stacks, one
    report names rank 3 as the only suspect, and rank 3's agent's summary has its stack."""
    outcomes = two_agents(hang_job_env(tmp_path, hang_rank=3), "hang-report")
    assert [code for code, _ in outcomes] == [1, 1], outcomes[0][1][-3000:] + outcomes[1][1][-3000:]
    assert not (tmp_path / "job.log").exists()  # nobody finished
    (report,) = [r for r in read_events(tmp_path / "events.jsonl") if r["event"] == "hang report"]
    assert report["suspects"] == [3]
    assert (report["hosts"], report["expected_hosts"], report["missing_hosts"]) == (2, 2, [])
    assert report["unanswered"] == []
    waiting, suspect = report["groups"]
    assert waiting["ranks"] == [0, 1, 2] and waiting["collective"] == "all_reduce"
    assert "in all_reduce" in waiting["stack"] and "in load_batch" not in waiting["stack"]
    assert suspect["ranks"] == [3] and suspect["suspect"] is True
    assert "in load_batch" in suspect["stack"] and "all_reduce" not in suspect["stack"]
    for _, stderr in outcomes:  # both agents log it
        assert "Hang report: 4 rank(s) from 2 of 2 host(s), in 2 group(s); suspects: rank 3" in (
            stderr
        )
    (rank_3_agent,) = [err for _, err in outcomes if "rank      : 3 (local_rank: 1)" in err]
    summary = rank_3_agent[rank_3_agent.index("ChildFailedError") :]
    failure = summary[summary.index("rank      : 3 (local_rank: 1)") :]
    assert re.search(r'collective.py", line \d+ in load_batch', failure.split("\n[")[0])


@pytest.mark.torchrun
def test_with_flight_recorder_the_suspect_is_the_rank_behind_in_sequence_numbers(
    tmp_path: Path, socket_dir: Path
) -> None:
    """The same hang, with each rank serving torch's worker control plane (worker_main) and
    Flight Recorder on: every rank's last collectives are in the report, and rank 3 is the
    suspect because it never enqueued the all_reduce the others are in. The ranks' sockets
    are in a directory of a short path, whatever TMPDIR is."""
    env = hang_job_env(tmp_path, hang_rank=3)
    env.update(CONTROL_PLANE_DIR=str(socket_dir), TORCH_FR_BUFFER_SIZE="100")
    outcomes = two_agents(env, "flight-recorder")
    assert [code for code, _ in outcomes] == [1, 1], outcomes[0][1][-3000:]
    (report,) = [r for r in read_events(tmp_path / "events.jsonl") if r["event"] == "hang report"]
    assert (report["suspects"], report["suspects_from"]) == ([3], "flight recorder")
    enqueued = {
        int(rank): summary["pg_status"]["0"]["enqueued"]
        for group in report["groups"]
        for rank, summary in group["collectives"].items()
    }
    assert enqueued == {0: 3, 1: 3, 2: 3, 3: 2}  # steps 0 and 1 done, step 2 in all_reduce
    assert [group["collectives_missing"] for group in report["groups"]] == [{}, {}]
    assert any("(behind the others in Flight Recorder's" in err for _, err in outcomes)


@pytest.mark.torchrun
def test_the_same_job_without_a_hang_ends_0_and_writes_no_report(tmp_path: Path) -> None:
    outcomes = two_agents(hang_job_env(tmp_path, hang_rank=-1), "no-hang")
    assert [code for code, _ in outcomes] == [0, 0], outcomes[0][1][-3000:]
    assert sorted((tmp_path / "job.log").read_text().splitlines()) == [
        f"rank {r} done" for r in range(4)
    ]
    events = read_events(tmp_path / "events.jsonl")
    assert [e for e in events if e["event"] in ("hang report", "timer expired")] == []
    assert all("Hang report" not in stderr for _, stderr in outcomes)


@pytest.mark.torch  # the launcher's help is torchrun's, with ours in front
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_launcher_help_explains_the_restart_behaviour(flag: str) -> None:
    result = subprocess.run([LAUNCHER, flag], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--max-restarts above 0" in result.stdout
    for variable in ("STACK_DUMP", "ESCALATE_AFTER", "DRY_RUN", "EVENT_LOG"):
        assert f"ELASTIC_TIMER_{variable}=" in result.stdout
    assert "--nproc-per-node" in result.stdout  # torchrun's own arguments follow


def test_configure_without_argument_or_variable_is_a_clear_error() -> None:
    code = "import elastic_timer as t\ntry: t.configure()\nexcept RuntimeError as e: print(e)"
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_TIMER_FILE"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert "TORCHELASTIC_TIMER_FILE" in result.stdout


@pytest.mark.torch
def test_install_points_torchs_server_at_ours_and_uninstall_restores(tmp_path: Path) -> None:
    """What torch's agent looks up resolves to our server after install(), with the
    signal_self default asked for, and to torch's again after uninstall()."""
    import torch.distributed.elastic.timer as torch_timer
    import torch.distributed.elastic.timer.file_based_local_timer as torch_file_timer

    import elastic_timer
    from elastic_timer import torch as integration

    def looked_up(module: Any) -> Any:  # what the agent gets, patched at run time
        return getattr(module, "FileTimerServer")  # noqa: B009

    original = looked_up(torch_timer)
    integration.install(signal_self=False, descendants_only=True)
    try:
        assert integration.installed()
        for module in (torch_timer, torch_file_timer):
            assert issubclass(looked_up(module), elastic_timer.FileTimerServer)
        # Built the way LocalElasticAgent builds it.
        events: list[str] = []
        server = looked_up(torch_timer)(
            file_path=str(tmp_path / "agent.fifo"),
            run_id="run",
            max_interval=0.1,
            daemon=True,
            log_event=lambda name, request: events.append(name),
        )
        assert server._signal_self is False
        assert server._core.stats()["refused"] == 0
        # A process the agent did not start is refused (this test's own parent, say).
        server.register_timers([elastic_timer.FileTimerRequest(os.getppid(), "x", 1e12, 9)])
        assert server._core.stats()["refused"] == 1
        server.start()
        assert abs(server.get_last_progress_time() - time.time()) <= 2
        server.stop()
        assert events == ["watchdog started", "watchdog stopped"]
    finally:
        integration.uninstall()
    assert not integration.installed()
    assert looked_up(torch_timer) is original
    assert looked_up(torch_file_timer) is original


# -- ft_launcher (nvidia-resiliency-ext): torchrun's fork, with its own copy of torch's timer ---

FT_LAUNCHER = [LAUNCHER, "--launcher", "ft_launcher"]
STOCK_FT_LAUNCHER = [sys.executable, "-m", "nvidia_resiliency_ext.fault_tolerance.launcher"]
FT_TIMER = "nvidia_resiliency_ext.fault_tolerance._torch_elastic_compat.timer"
needs_ft_launcher = pytest.mark.ft_launcher  # deselected outside Python 3.10-3.12 (conftest)


def expired_by_our_server(events: Path) -> dict[str, Any]:
    """The one reap of the job, from our server's event log; ft_launcher's agent built the
    server (at the FIFO path that agent chose, and without a run_id)."""
    records = read_events(events)
    started = [r for r in records if r["event"] == "watchdog started"]
    assert started, records
    for record in started:
        assert Path(record["fifo"]).name.startswith("watchdog_timer_"), record
        assert record["run_id"] == "", record
    (expired,) = [r for r in records if r["event"] == "timer expired"]
    assert expired["outcome"] == "signalled", expired
    assert expired["signal"] == signal.SIGKILL
    assert [scope.split("#")[0] for scope in expired["scopes"]] == [JOB]
    return expired


@pytest.mark.torchrun
@needs_ft_launcher
def test_ft_launcher_job_has_its_hung_rank_reaped_by_our_server_and_restarted(
    tmp_path: Path,
) -> None:
    """A 2-rank ft_launcher job: rank 1 hangs inside expires(after=1), our native server reaps
    it, ft_launcher restarts the group (--max-restarts 1) and the job ends with exit code 0."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0")
    events = tmp_path / "events.jsonl"
    env["ELASTIC_TIMER_EVENT_LOG"] = str(events)
    result, _ = run([*FT_LAUNCHER, "--standalone", "--max-restarts", "1", *COMMON, JOB], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert finished(tmp_path) == ["rank 0 attempt 0", "rank 0 attempt 1", "rank 1 attempt 1"]
    expired_by_our_server(events)
    # One server per attempt, as ft_launcher's agent starts one per worker group.
    assert [r["event"] for r in read_events(events)].count("watchdog started") == 2


@pytest.mark.torchrun
@needs_ft_launcher
def test_ft_launcher_without_restarts_ends_as_stock_ft_launcher(tmp_path: Path) -> None:
    """--max-restarts 0: ft_launcher's own server never signals the agent, so ours does not
    either: the hung rank is reaped and the job ends with stock ft_launcher's exit code."""
    ours_dir, stock_dir = tmp_path / "ours", tmp_path / "stock"
    ours_dir.mkdir()
    stock_dir.mkdir()
    ours_env = job_env(ours_dir, hang_rank=1, hang_attempts="0")
    ours_env["ELASTIC_TIMER_EVENT_LOG"] = str(ours_dir / "events.jsonl")
    ours, _ = run([*FT_LAUNCHER, "--standalone", *COMMON, JOB], ours_env)
    stock_env = job_env(stock_dir, hang_rank=1, hang_attempts="0")
    stock_env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    stock, _ = run([*STOCK_FT_LAUNCHER, "--standalone", *COMMON, JOB], stock_env)
    assert "Reaping worker_pid" in stock.stderr, stock.stderr[-3000:]  # its watchdog ran
    assert ours.returncode == stock.returncode != -signal.SIGKILL, ours.stderr[-3000:]
    assert finished(ours_dir) == finished(stock_dir) == ["rank 0 attempt 0"]
    expired_by_our_server(ours_dir / "events.jsonl")


def test_launcher_help_says_both_launchers() -> None:
    plain = subprocess.run([LAUNCHER, "--help"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0
    assert "--launcher torchrun" in plain.stdout
    assert "--launcher ft_launcher" in plain.stdout
    assert "usage: elastic-timer-run [-h]" in plain.stdout  # torchrun's arguments follow
    assert "--ft-cfg-path" not in plain.stdout


@needs_ft_launcher
def test_launcher_help_with_ft_launcher_lists_its_arguments() -> None:
    result = subprocess.run([*FT_LAUNCHER, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--max-restarts above 0" in result.stdout
    assert "--ft-cfg-path" in result.stdout  # ft_launcher's own arguments follow


def test_an_unknown_launcher_is_a_clear_error() -> None:
    result = subprocess.run(
        [LAUNCHER, "--launcher", "mpirun", "train.py"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown launcher 'mpirun' (choose from torchrun, ft_launcher)" in result.stderr


@needs_ft_launcher
def test_install_points_ft_launchers_copy_at_ours_and_uninstall_restores(
    tmp_path: Path, servers: list[Any]
) -> None:
    """ft_launcher's agent looks up FileTimerServer in its own copy of torch's timer package:
    install() patches that copy too, keeping ft_launcher's behaviour (no self-signal) and its
    signature (no run_id), and uninstall() gives it its own class back."""
    import importlib

    import elastic_timer
    from elastic_timer import torch as integration

    names = (
        FT_TIMER,
        f"{FT_TIMER}.file_based_local_timer",
        "torch.distributed.elastic.timer",
        "torch.distributed.elastic.timer.file_based_local_timer",
    )
    modules = [importlib.import_module(name) for name in names]

    def looked_up(module: Any) -> Any:  # what the agent gets, patched at run time
        return getattr(module, "FileTimerServer")  # noqa: B009

    originals = [looked_up(module) for module in modules]
    ft_timer, _, torch_timer, _ = modules
    integration.install(descendants_only=True)
    try:
        for module in modules:
            assert issubclass(looked_up(module), elastic_timer.FileTimerServer)
        events: list[str] = []
        # Built the way ft_launcher's agent builds it.
        server = looked_up(ft_timer)(
            file_path=str(tmp_path / "ft.fifo"),
            max_interval=0.1,
            daemon=True,
            log_event=lambda name, request: events.append(name),
        )
        assert server._run_id == ""
        assert server._signal_self is False  # ft_launcher's own server never signals the agent
        server.start()
        server.stop()
        assert events == ["watchdog started", "watchdog stopped"]
        # ft_launcher's positional order has no run_id.
        positional = looked_up(ft_timer)(str(tmp_path / "positional.fifo"), 0.5)
        servers.append(positional)
        assert (positional._run_id, positional._max_interval) == ("", 0.5)
        with pytest.raises(TypeError, match="at most 4 positional"):
            looked_up(ft_timer)(str(tmp_path / "x.fifo"), 0.5, True, None, "extra")
        with pytest.raises(TypeError, match="multiple values for argument 'max_interval'"):
            looked_up(ft_timer)(str(tmp_path / "x.fifo"), 0.5, max_interval=1)
        torch_server = looked_up(torch_timer)(str(tmp_path / "torch.fifo"), "run", 0.1)
        servers.append(torch_server)
        # torch's copy keeps what the installed torch's server does (it signals itself from 2.7).
        expected = ("run", torch_signals_self())
        assert (torch_server._run_id, torch_server._signal_self) == expected
    finally:
        integration.uninstall()
    assert not integration.installed()
    assert [looked_up(module) for module in modules] == originals


@pytest.mark.parametrize(
    ("hidden", "warned"),
    [
        ("nvidia_resiliency_ext", False),  # not installed
        ("nvidia_resiliency_ext.fault_tolerance", True),  # installed, but broken
    ],
)
@needs_ft_launcher
def test_without_a_usable_ft_launcher(hidden: str, warned: bool) -> None:
    """install() then patches torch's server alone (with a warning when the package is there
    but cannot be imported), and --launcher ft_launcher is a clear error, not a traceback."""
    code = f"""if True:
        import logging, sys
        logging.basicConfig(format="%(levelname)s %(message)s")
        sys.modules[{hidden!r}] = None  # what an import of it then raises: ModuleNotFoundError
        import torch.distributed.elastic.timer as torch_timer
        import elastic_timer
        from elastic_timer import torch as integration
        from elastic_timer.run import main
        integration.install()
        print("patched", issubclass(torch_timer.FileTimerServer, elastic_timer.FileTimerServer))
        integration.uninstall()
        main(["--launcher", "ft_launcher", "train.py"])
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == "patched True\n"
    assert ("nvidia_resiliency_ext is installed but cannot be imported" in result.stderr) is warned
    assert "elastic-timer-run: --launcher ft_launcher needs nvidia-resiliency-ext" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.torchrun
@needs_ft_launcher
def test_ft_launcher_agents_write_the_hang_report_too(tmp_path: Path) -> None:
    """ft_launcher's agent (its own copy of torch's) joins the report as torchrun's does."""
    env = hang_job_env(tmp_path, hang_rank=1)
    result, _ = run([*FT_LAUNCHER, "--standalone", *COMMON, COLLECTIVE_JOB], env)
    (report,) = [r for r in read_events(tmp_path / "events.jsonl") if r["event"] == "hang report"]
    assert report["suspects"] == [1], result.stderr[-3000:]
    assert [g["ranks"] for g in report["groups"]] == [[0], [1]]
    assert "in load_batch" in report["groups"][1]["stack"]
