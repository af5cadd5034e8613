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
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from elastic_timer._torch_versions import torch_signals_self

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
    """--max-restarts 0: the hung worker is reaped and the job ends exactly as with torch's own
    server: from torch 2.7 on the agent is signalled too (SIGKILL), before that it reports the
    failed worker (exit 1). Our reap happens at the deadline."""
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
    assert stock.returncode == (-signal.SIGKILL if torch_signals_self() else 1)
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


def read_events(path: Path) -> list[dict[str, Any]]:
    """The records of an ELASTIC_TIMER_EVENT_LOG: only our server writes one."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.torchrun
def test_learned_timeouts_catch_a_hang_in_seconds_and_again_after_the_restart(
    tmp_path: Path,
) -> None:
    """--max-restarts 1 with ELASTIC_TIMER_ADAPTIVE=1 and steps that ask for 60 s: rank 1
    hangs after 12 steps and is reaped at the learned bound (the 0.5 s floor here); the group
    restarts under a new server, which loads what the first learned (a file per run id), and
    rank 1, hanging at its first step, is reaped at the learned bound again."""
    env = job_env(tmp_path, hang_rank=1, hang_attempts="0,1")
    events = tmp_path / "events.jsonl"
    env.update(
        STEPS="20",
        STEP_TIMEOUT="60",
        HANG_STEPS="12,0",
        ELASTIC_TIMER_ADAPTIVE="1",
        ELASTIC_TIMER_ADAPTIVE_FLOOR="0.5",
        ELASTIC_TIMER_EVENT_LOG=str(events),
    )
    result, took = run([LAUNCHER, "--standalone", "--max-restarts", "1", *COMMON, JOB], env)
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


# -- ft_launcher (nvidia-resiliency-ext): torchrun's fork, with its own copy of torch's timer ---

FT_LAUNCHER = [LAUNCHER, "--launcher", "ft_launcher"]
STOCK_FT_LAUNCHER = [sys.executable, "-m", "nvidia_resiliency_ext.fault_tolerance.launcher"]
FT_TIMER = "nvidia_resiliency_ext.fault_tolerance._torch_elastic_compat.timer"
needs_ft_launcher = pytest.mark.ft_launcher  # deselected before Python 3.10 (conftest)


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
        # torch's copy keeps torch's self-signal.
        torch_server = looked_up(torch_timer)(str(tmp_path / "torch.fifo"), "run", 0.1)
        servers.append(torch_server)
        assert (torch_server._run_id, torch_server._signal_self) == ("run", True)
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
