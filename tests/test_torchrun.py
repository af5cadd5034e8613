"""Real torchrun jobs with elastic-timer's server inside the agent.

The job (tests/jobs/train.py) runs three steps per worker, each inside
``expires(after=1)``; the rank named by HANG_RANK hangs in its second step on the attempts
listed in HANG_ATTEMPTS. Workers configure their client with ``elastic_timer.configure()``:
the FIFO comes from TORCHELASTIC_TIMER_FILE, set by the agent. The jobs are marked
``torchrun`` (which implies ``torch``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

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
    result, _ = run([LAUNCHER, "--standalone", *COMMON, JOB], job_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert finished(tmp_path) == ["rank 0 attempt 0", "rank 1 attempt 0"]
    assert "Reaping worker" not in result.stderr
    assert "elastic_timer" in result.stderr  # our server ran in the agent


@pytest.mark.torchrun
def test_a_hung_worker_ends_the_job_as_with_stock_torch(tmp_path: Path) -> None:
    """--max-restarts 0: the hung worker is reaped and the agent signalled, exactly as torch's
    own server does it (the job ends with SIGKILL). Our reap happens at the deadline."""
    ours_dir, torch_dir = tmp_path / "ours", tmp_path / "torch"
    ours_dir.mkdir()
    torch_dir.mkdir()
    ours, ours_time = run(
        [LAUNCHER, "--standalone", *COMMON, JOB], job_env(ours_dir, hang_rank=1, hang_attempts="0")
    )
    stock_env = job_env(torch_dir, hang_rank=1, hang_attempts="0")
    stock_env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    stock, stock_time = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *COMMON, JOB], stock_env
    )
    assert stock.returncode == -signal.SIGKILL
    assert ours.returncode == stock.returncode, ours.stderr[-3000:]
    assert finished(ours_dir) == finished(torch_dir) == ["rank 0 attempt 0"]
    assert "Reaping worker_pid" in ours.stderr
    assert "elastic_timer" in ours.stderr  # our server logged the reap
    print(f"job with a hung worker: elastic-timer {ours_time:.2f} s, torch {stock_time:.2f} s")


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
    records = [json.loads(line) for line in events.read_text().splitlines()]
    (expired,) = [r for r in records if r["event"] == "timer expired"]
    assert expired["outcome"] == "signalled"
    assert "in main" in expired["stacks"], expired["stacks"]


@pytest.mark.torchrun
def test_stock_torchrun_kills_its_agent_instead_of_restarting(tmp_path: Path) -> None:
    """Why the launcher turns the self-signal off: with torch's server --max-restarts is moot."""
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
    assert result.returncode == -signal.SIGKILL
    assert finished(tmp_path) == ["rank 0 attempt 0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.torchrun
def test_two_nodes_on_localhost(tmp_path: Path) -> None:
    """Two agents (c10d rendezvous on 127.0.0.1), a worker on node 1 hangs: it is reaped, both
    the failed group restarts, and both agents end the job cleanly (exit 0). The other
    workers are still training when the hang is reaped, as in a real job."""
    port = free_port()
    env = job_env(tmp_path, hang_rank=3, hang_attempts="0")
    env.update(STEPS="6", STEP_SECONDS="1", STEP_TIMEOUT="1.5")
    cmd = [
        LAUNCHER,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "two-nodes",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.1",
        JOB,
    ]
    agents = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert [agent.returncode for agent in agents] == [0, 0], (
        outputs[0][1][-2000:] + outputs[1][1][-2000:]
    )
    done = finished(tmp_path)
    assert "rank 3 attempt 0" not in done  # the hung worker never finished its first attempt
    assert "rank 3 attempt 1" in done  # its restart did
    assert {line.split(" attempt")[0] for line in done} == {f"rank {r}" for r in range(4)}
    assert sum("Reaping worker_pid" in err for _, err in outputs) == 1


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
