"""
Benchmark 6: how long a hang costs. From the moment a worker hangs to its reap, with torch's
server (which can only wait for the ``after`` the step asked for) and with ours learning the
step's duration (``adaptive=True``).

One child of the harness per side runs the Local server and forks the workers, so it waits
for them itself. Each worker runs steps of lognormal duration (median 20 ms; one in 20 three
times longer) with an inner scope, each step inside ``expires(after=AFTER)``, and hangs in a
random step after the first 15; the other workers are healthy and must never be touched.
Ours uses a floor of 0.5 s and the default factor (5): a hang is reaped at
``max(0.5 s, 5 x the longest step)``. The figure is the median over the hung workers; the
ratio is what learning saves against the fixed ``after``, which the sizes keep short (at the
default size 10 s; real jobs ask for minutes).
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import random
import time
from multiprocessing.connection import Connection
from typing import Any

from .common import Metric, Side, Sizes, Target, progress, reply, spawn

FLOOR = 0.5


def _worker(module_name: str, queue: Any, seed: int, hang: bool, after: float, starts: Any) -> None:
    """40 jittery steps with an inner scope; a hanging worker records when its hang began."""
    timer = importlib.import_module(module_name)
    rng = random.Random(seed)
    client = timer.LocalTimerClient(queue)
    hang_step = rng.randrange(15, 40) if hang else -1
    for step in range(40):
        duration = math.exp(rng.gauss(math.log(0.02), 0.3)) * (3 if rng.random() < 0.05 else 1)
        with timer.expires(after=after, scope="train step", client=client):
            with timer.expires(after=after, scope="forward", client=client):
                time.sleep(duration / 2)
            if step == hang_step:
                starts[seed] = time.time()  # the hang begins
                time.sleep(after * 3)
            time.sleep(duration / 2)


def _run_side(conn: Connection, module_name: str, workers: int, after: float) -> None:
    """The side's server, and its workers (every other one hangs), in this child."""
    timer = importlib.import_module(module_name)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    options: dict[str, Any] = {"max_interval": 0.1}
    if module_name == "elastic_timer":
        options.update(adaptive=True, adaptive_floor=FLOOR)
    server = timer.LocalTimerServer(queue, **options)
    server.start()
    starts = ctx.Array("d", workers)
    procs = []
    for index in range(workers):
        hang = index % 2 == 0
        proc = ctx.Process(target=_worker, args=(module_name, queue, index, hang, after, starts))
        proc.start()
        procs.append((proc, hang, index))
    hangs: list[float] = []
    touched = 0
    for proc, hang, index in procs:
        proc.join(after * 4)
        ended = time.time()
        if proc.is_alive():  # never reaped: censored at the cap
            proc.kill()
            proc.join()
            hangs.append(math.inf)
        elif hang:
            hangs.append(ended - starts[index])
        elif proc.exitcode != 0:
            touched += 1
    server.stop()
    reply(conn, {"hangs": hangs, "touched": touched})


def run(sides: list[Side], sizes: Sizes, workdir: str) -> list[Metric]:
    after = sizes.adaptive_after
    samples: dict[str, list[float]] = {}
    touched: dict[str, int] = {}
    for side in sides:
        progress(f"adaptive: {side.label}, {sizes.adaptive_workers} workers, after={after} s")
        name = side.module.__name__
        child = spawn(f"adaptive-{side.key}", _run_side, name, sizes.adaptive_workers, after)
        result = child.recv(after * 8 + 60)
        child.finish()
        samples[side.key] = result["hangs"]
        touched[side.key] = result["touched"]
    return [
        Metric(
            family="adaptive",
            key="hang_to_reap",
            title=f"hang to reap, steps asking for after={after:g} s (ours learning them)",
            unit="s",
            torch=samples["torch"],
            ours=samples["ours"],
            stat="median",
            target=Target(f"at the learned bound: under {2 * FLOOR:g} s", ours_max=2 * FLOOR),
            torch_cap=after * 4,
            ours_cap=after * 4,
            notes=(
                f"healthy workers killed: torch {touched['torch']}, ours {touched['ours']}; "
                f"ours: adaptive=True, adaptive_floor={FLOOR} s, factor 5"
            ),
        )
    ]
