"""``elastic-timer-run --watch``: an unmodified DDP script (tests/jobs/watched_ddp.py) under two
agents (2 ranks each, gloo, c10d rendezvous on localhost), watched through torch's hooks only.

The job has the rhythm of a real one: a 6 s first step, 40-80 ms batches, an ~8 s evaluation
every 25 steps and a checkpoint every 50 (rank 0 saves, then works 8 s more while the others
wait in ``dist.barrier()``). None of that may be killed; a rank stuck in its Dataset must be.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from test_torchrun import LAUNCHER, read_events, two_agents

pytestmark = pytest.mark.torch

JOB = str(Path(__file__).parent / "jobs" / "watched_ddp.py")
# The clean job takes about 90 s on 2 idle cores, its restart twice that.
TIMEOUT = 400


def watch_env(tmp_path: Path, **job: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JOB_LOG=str(tmp_path / "job.log"),
        OMP_NUM_THREADS="1",
        LOGLEVEL="INFO",
        ELASTIC_TIMER_EVENT_LOG=str(tmp_path / "events.jsonl"),
        # A worker that aborts (a C++ std::terminate in torch, say) shows where each of its
        # threads was in the agent's stderr, which a failing test prints.
        PYTHONFAULTHANDLER="1",
        **job,
    )
    for name in (
        "TORCHELASTIC_ENABLE_FILE_TIMER",
        "TORCHELASTIC_TIMER_FILE",
        "ELASTIC_TIMER_WATCH",
    ):
        env.pop(name, None)
    return env


def two_watched_agents(
    env: dict[str, str], run_id: str, *launcher_args: str
) -> list[tuple[int, str]]:
    """The job under two ``elastic-timer-run --watch`` agents; each one's exit code and stderr."""
    log = Path(env["JOB_LOG"])
    outcomes = two_agents(
        env,
        run_id,
        JOB,
        *launcher_args,
        flags=("--watch",),
        # Each agent keeps what it learned in a file of its own, as on two hosts.
        agent_env=lambda n: {"ELASTIC_TIMER_STATE_FILE": str(log.with_name(f"learned-{n}.json"))},
        timeout=TIMEOUT,
    )
    for number, (_, output) in enumerate(outcomes):  # for a look after the test
        log.with_name(f"agent-{number}.err").write_text(output)
    return outcomes


def job_log(tmp_path: Path) -> list[str]:
    log = tmp_path / "job.log"
    return log.read_text().splitlines() if log.exists() else []


def both(outcomes: list[tuple[int, str]]) -> str:
    return "\n".join(err[-12000:] for _, err in outcomes)


@pytest.mark.torchrun
@pytest.mark.timeout(2 * TIMEOUT)  # a 130-step job (two with a restart)
def test_a_watched_clean_job_ends_0_and_nothing_fires(tmp_path: Path) -> None:
    outcomes = two_watched_agents(watch_env(tmp_path), "watch-clean")
    assert [code for code, _ in outcomes] == [0, 0], both(outcomes)
    assert sorted(job_log(tmp_path)) == [f"rank {r} attempt 0 done 130" for r in range(4)]
    events = read_events(tmp_path / "events.jsonl")
    assert [e for e in events if e["event"] in ("timer expired", "hang report")] == []
    # What was watched, and learned from this run alone.
    learned = learned_by_either(tmp_path)
    for place in (
        "inside DataLoader next",
        "after optimizer.step of SGD",
        "inside forward (no_grad) of DistributedDataParallel",
    ):
        assert learned[f"watch: {place}"]["suggested"] is not None, place
    # Seen too rarely to learn: they keep the generous bound.
    for place in (
        "inside forward of DistributedDataParallel (first step)",
        "after torch.save",
        "inside barrier",
        "inside init_process_group (first step)",
    ):
        assert learned[f"watch: {place}"]["suggested"] is None, place


def learned_by_either(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Each scope's figures in the agents' state files (a learned one over one that is not)."""
    learned: dict[str, dict[str, Any]] = {}
    for n in range(2):
        for scope in json.loads((tmp_path / f"learned-{n}.json").read_text())["scopes"]:
            if scope["scope"] not in learned or scope["suggested"] is not None:
                learned[scope["scope"]] = scope
    return learned


def stopped_at(tmp_path: Path, attempt: int = 0) -> float:
    (line,) = [x for x in job_log(tmp_path) if x.startswith(f"rank 3 attempt {attempt} stopped")]
    return float(line.split()[-1])


def check_hang(tmp_path: Path, outcomes: list[tuple[int, str]]) -> dict[str, Any]:
    """Rank 3 alone was killed, soon after it stopped, and the report and summary say so."""
    events = read_events(tmp_path / "events.jsonl")
    killed = [e for e in events if e["event"] == "timer expired" and e["outcome"] == "signalled"]
    assert len(killed) == 1, [(e["pid"], e["scopes"], e["outcome"]) for e in killed]
    (kill,) = killed
    assert kill["scopes"] == ["watch: inside DataLoader next"]
    assert kill["time"] - stopped_at(tmp_path) < 20
    (report,) = [e for e in events if e["event"] == "hang report"]
    assert report["suspects"] == [3], report
    return kill


def check_summary(outcomes: list[tuple[int, str]]) -> None:
    """The failure summary of rank 3's agent says where it stopped, and shows it."""
    (rank_3_agent,) = [err for _, err in outcomes if "rank      : 3 (local_rank: 1)" in err]
    summary = rank_3_agent[rank_3_agent.index("ChildFailedError") :]
    failure = summary[summary.index("rank      : 3 (local_rank: 1)") :]
    assert "no progress for" in failure and "inside DataLoader next" in failure, failure
    assert re.search(r'watched_ddp.py", line \d+ in __getitem__', failure), failure


@pytest.mark.torchrun
@pytest.mark.timeout(2 * TIMEOUT)  # a 130-step job (two with a restart)
def test_a_rank_stuck_in_its_dataset_is_killed_alone_and_named(tmp_path: Path) -> None:
    env = watch_env(tmp_path, HANG_RANK="3", HANG_ATTEMPTS="0")
    outcomes = two_watched_agents(env, "watch-hang")
    assert [code for code, _ in outcomes] == [1, 1], both(outcomes)
    check_hang(tmp_path, outcomes)
    check_summary(outcomes)
    assert not any("done" in line for line in job_log(tmp_path))


@pytest.mark.torchrun
@pytest.mark.timeout(2 * TIMEOUT)  # a 130-step job (two with a restart)
def test_a_restart_keeps_what_was_learned_and_ends_0(tmp_path: Path) -> None:
    env = watch_env(tmp_path, HANG_RANK="3", HANG_ATTEMPTS="0")
    outcomes = two_watched_agents(env, "watch-restart", "--max-restarts", "1")
    assert [code for code, _ in outcomes] == [0, 0], both(outcomes)
    check_hang(tmp_path, outcomes)
    assert sorted(x for x in job_log(tmp_path) if "done" in x) == [
        f"rank {r} attempt 1 done 130" for r in range(4)
    ]
    # The restarted group's servers loaded the state file: their first acquires of a learned
    # place already had a learned bound.
    events = read_events(tmp_path / "events.jsonl")
    started = [e for e in events if e["event"] == "watchdog started"]
    assert len(started) == 4  # two agents, two attempts
    assert any(
        re.search(r"Watching the workers. progress; [1-9]\d* place\(s\) learned already", err)
        for _, err in outcomes
    ), both(outcomes)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


# -- the worker's side, without torchrun ------------------------------------------------------

WORKER = """
import os, sys, torch
from torch import nn
from torch.utils.data import DataLoader
assert "elastic_timer.watch" in sys.modules, "watched once torch is imported"
model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for x in DataLoader(torch.zeros(4, 2), batch_size=2):
    model(x).sum().backward()
    optimizer.step()
with torch.no_grad():
    model(torch.zeros(1, 2))
torch.save({}, os.devnull)
pid = os.fork()
if pid == 0:  # a fork (a DataLoader worker, say) reports nothing
    model(torch.zeros(1, 2))
    torch.save({}, os.devnull)
    os._exit(0)
os.waitpid(pid, 0)
print("done")
"""


def watched_python(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    from elastic_timer.watch import BOOT_DIR

    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([BOOT_DIR, os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120
    )


def test_a_watched_worker_reports_each_place_once_torch_is_imported(tmp_path: Path) -> None:
    from elastic_timer import FileTimerServer

    fifo = str(tmp_path / "fifo")
    server = FileTimerServer(fifo, adaptive=True)
    server.start()
    try:
        result = watched_python(
            tmp_path, WORKER, ELASTIC_TIMER_WATCH="1", TORCHELASTIC_TIMER_FILE=fifo
        )
        assert result.returncode == 0 and result.stdout == "done\n", result.stderr[-3000:]
        scopes = {t["scope"] for t in server.timeouts()}
    finally:
        server.stop()
    assert scopes == {
        "watch: inside DataLoader next (first step)",
        "watch: after DataLoader next (first step)",
        "watch: inside forward of Sequential (first step)",
        "watch: after forward of Sequential (first step)",
        "watch: inside optimizer.step of SGD (first step)",
        "watch: after optimizer.step of SGD",
        "watch: inside DataLoader next",
        "watch: after DataLoader next",
        "watch: inside forward of Sequential",
        "watch: after forward of Sequential",
        "watch: inside optimizer.step of SGD",
        "watch: inside forward (no_grad) of Sequential",
        "watch: after forward (no_grad) of Sequential",
        "watch: inside torch.save",
        "watch: after torch.save",
    }


def test_install_without_a_timer_server_is_a_clear_error(tmp_path: Path) -> None:
    code = """if True:
        import os
        os.environ.pop("TORCHELASTIC_TIMER_FILE", None)
        from elastic_timer import watch
        try:
            watch.install()
        except RuntimeError as error:
            print(error)
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(
        "elastic_timer.watch.install() needs a timer client, or TORCHELASTIC_TIMER_FILE"
    ), result.stdout


def test_the_bootstrap_runs_the_next_sitecustomize_and_is_inert_elsewhere(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_RAN = True\n")
    probe = (
        "import builtins, sys\n"
        "print(getattr(builtins, 'OTHER_RAN', False), 'elastic_timer' in sys.modules)"
    )
    from elastic_timer.watch import BOOT_DIR

    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("ELASTIC_TIMER", "TORCHELASTIC"))
    }
    path = os.pathsep.join([BOOT_DIR, str(other)])
    cases = [
        ({}, "True False"),  # not a watched job: nothing imported
        ({"ELASTIC_TIMER_WATCH": "1"}, "True False"),  # the agent: no timer FIFO
        # A worker: armed, but nothing watched until torch is imported.
        ({"ELASTIC_TIMER_WATCH": "1", "TORCHELASTIC_TIMER_FILE": "/nonexistent"}, "True True"),
    ]
    for extra, expected in cases:
        env = {**base, "PYTHONPATH": path, **extra}
        result = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.stdout.strip() == expected, (extra, result.stdout, result.stderr)


def test_a_process_started_by_a_watched_worker_is_not_watched(tmp_path: Path) -> None:
    code = "import torch\nfrom elastic_timer import watch\nprint(watch.watched() is not None)"
    env = {"ELASTIC_TIMER_WATCH": "1", "TORCHELASTIC_TIMER_FILE": str(tmp_path / "fifo")}
    started_by_worker = watched_python(tmp_path, code, ELASTIC_TIMER_WATCHED_PID="1", **env)
    assert started_by_worker.stdout.strip() == "False", started_by_worker.stderr
    started_by_agent = watched_python(tmp_path, code, **env)
    assert started_by_agent.stdout.strip() == "True", started_by_agent.stderr


@pytest.mark.torch  # the launcher's help is torchrun's, with ours in front
def test_the_launchers_help_explains_watch() -> None:
    result = subprocess.run([LAUNCHER, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--watch" in result.stdout and "ELASTIC_TIMER_WATCH=1" in result.stdout
    assert "learned timeouts" in result.stdout and "ELASTIC_TIMER_WATCH_BOUND" in result.stdout


@pytest.mark.torchrun
def test_a_dry_run_reports_the_hang_and_kills_nothing(tmp_path: Path) -> None:
    """One agent, 2 ranks, a short job; rank 1 sleeps in its Dataset at step 30 for good."""
    env = short_job(tmp_path, "1", ELASTIC_TIMER_DRY_RUN="1")
    cmd = [LAUNCHER, "--watch", "--standalone", "--nproc-per-node", "2", JOB]
    agent = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    events = tmp_path / "events.jsonl"

    def dry_runs() -> list[dict[str, Any]]:
        if not events.exists():
            return []
        return [
            e
            for e in read_events(events)
            if e["event"] == "timer expired" and e["outcome"] == "dry_run"
        ]

    try:
        stuck = ["watch: inside DataLoader next"]
        assert wait_for(lambda: any(e["scopes"] == stuck for e in dry_runs()), timeout=120)
        assert agent.poll() is None  # nothing was killed: the job still runs (rank 1 hangs)
        hung = [x for x in job_log(tmp_path) if "stopped" in x]
        assert len(hung) == 1 and "done" not in " ".join(job_log(tmp_path))
    finally:
        agent.terminate()
        stderr = agent.communicate(timeout=60)[1]
    assert "Dry run: worker pid=" in stderr


@pytest.mark.torchrun
def test_an_unmodified_lightning_job_is_watched_through_the_same_hooks(tmp_path: Path) -> None:
    """Lightning (DDP over gloo, 2 ranks under one agent): rank 1 stops in its Dataset after
    some 30 steps; it alone is killed, its peer (in backward) is spared."""
    env = watch_env(tmp_path, HANG_RANK="1")
    job = str(Path(__file__).parent / "jobs" / "watched_lightning.py")
    # This interpreter's launcher: Lightning is installed where the tests run.
    cmd = [sys.executable, "-m", "elastic_timer.run", "--watch", "--standalone"]
    result = subprocess.run(
        [*cmd, "--nproc-per-node", "2", "--monitor-interval", "0.1", job],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1, result.stderr[-4000:]
    events = read_events(tmp_path / "events.jsonl")
    outcomes = [(e["scopes"], e["outcome"]) for e in events if e["event"] == "timer expired"]
    assert (["watch: inside DataLoader next"], "signalled") in outcomes, outcomes
    assert [o for o in outcomes if o[1] == "signalled"] == [
        (["watch: inside DataLoader next"], "signalled")
    ]
    (report,) = [e for e in events if e["event"] == "hang report"]
    assert report["suspects"] == [1]
    summary = result.stderr[result.stderr.index("Root Cause") :]
    assert "rank      : 1 (local_rank: 1)" in summary and "no progress for" in summary


def test_install_with_watch_prepares_the_workers_environment_not_the_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from elastic_timer import torch as integration
    from elastic_timer.watch import BOOT_DIR, watched

    for name in ("ELASTIC_TIMER_ADAPTIVE", "ELASTIC_TIMER_STACK_DUMP", "ELASTIC_TIMER_WATCH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ELASTIC_TIMER_STACK_DUMP", "2")  # the user's setting is kept
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", BOOT_DIR, "/b"]))
    monkeypatch.setenv("ELASTIC_TIMER_WATCH", "1")  # what a custom launcher sets
    integration.install()
    try:
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [BOOT_DIR, "/a", "/b"]
        assert os.environ["ELASTIC_TIMER_ADAPTIVE"] == "1"
        assert os.environ["ELASTIC_TIMER_STACK_DUMP"] == "2"
        assert watched() is None  # the agent itself is not watched
    finally:
        integration.uninstall()


def short_job(tmp_path: Path, hang_rank: str, **extra: str) -> dict[str, str]:
    """The watched DDP job in 40 steps, without evaluations or checkpoints; ``hang_rank`` stops
    in its Dataset at step 30."""
    return watch_env(
        tmp_path,
        HANG_RANK=hang_rank,
        HANG_ATTEMPTS="0",
        STEPS="40",
        HANG_STEP="30",
        FIRST_STEP_SECONDS="1",
        EVAL_EVERY="1000",
        CKPT_EVERY="1000",
        **extra,
    )


@pytest.mark.torchrun
@pytest.mark.ft_launcher
def test_ft_launcher_with_watch_kills_the_stuck_rank_alone(tmp_path: Path) -> None:
    cmd = [LAUNCHER, "--launcher", "ft_launcher", "--watch", "--standalone"]
    result = subprocess.run(
        [*cmd, "--nproc-per-node", "2", "--monitor-interval", "0.1", JOB],
        env=short_job(tmp_path, "1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1, result.stderr[-4000:]
    events = read_events(tmp_path / "events.jsonl")
    outcomes = [(e["scopes"], e["outcome"]) for e in events if e["event"] == "timer expired"]
    assert [o for o in outcomes if o[1] == "signalled"] == [
        (["watch: inside DataLoader next"], "signalled")
    ], outcomes
    (report,) = [e for e in events if e["event"] == "hang report"]
    assert report["suspects"] == [1]
    assert "no progress for" in result.stderr
