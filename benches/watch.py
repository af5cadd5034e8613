"""What watching costs a training step: a ~50 ms DDP step, watched and unwatched, side by side.

``python benches/watch.py [--blocks N] [--steps N] [--out DIR]``

The harness runs our File server (adaptive, as ``--watch`` does) and one worker process, a
one-rank gloo DDP job: a Dataset that takes 45 ms a batch (a DataLoader), an 8-layer MLP
(forward, backward, SGD step). The worker alternates blocks of steps unwatched and watched
(``elastic_timer.watch`` installed with a ``FileTimerClient`` on the server's FIFO, then
removed), so that drift and other load hit both alike. Per block: the median step time, the
write system calls the worker made (``/proc/self/io``), and the server's CPU time.

It also measures the two unit costs: one progress event (release + acquire through the ring),
and the global forward hooks' cost per module call (a 200-module model, hooks on and off).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_DATA_SECONDS = 0.045


def _syscw() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("syscw:")).split()[1])


def worker(blocks: int, steps: int) -> dict[str, object]:
    """Runs in the worker process (TORCHELASTIC_TIMER_FILE names the server's FIFO)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Dataset

    from elastic_timer import watch

    torch.set_num_threads(1)

    class Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
        def __len__(self) -> int:
            return 1 << 30

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            time.sleep(STEP_DATA_SECONDS)
            return torch.randn(64, 256), torch.randn(64, 1)

    dist.init_process_group("gloo", rank=0, world_size=1)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = DistributedDataParallel(nn.Sequential(*layers, nn.Linear(256, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    loss_fn = nn.MSELoss()
    batches = iter(DataLoader(Batches(), batch_size=None))

    def step() -> float:
        started = time.perf_counter()
        x, y = next(batches)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - started

    for _ in range(10):  # warm up, and let the ring be offered and taken
        step()
    results: dict[str, list[dict[str, float]]] = {"unwatched": [], "watched": []}
    for block in range(2 * blocks):
        watched = block % 2 == 1
        if watched:
            watch.install()
        writes = _syscw()
        times = [step() for _ in range(steps)]
        writes = _syscw() - writes
        if watched:
            watch.uninstall()
        results["watched" if watched else "unwatched"].append(
            {"median": statistics.median(times), "writes_per_step": writes / steps}
        )
    dist.destroy_process_group()
    return {"blocks": results, **unit_costs()}


def unit_costs() -> dict[str, float]:
    """One progress event; one module call with the global forward hooks, minus without."""
    import torch
    from torch import nn

    from elastic_timer import watch

    w = watch.install()
    n = 20000
    started = time.perf_counter()
    for i in range(n):
        w.progress("bench a" if i % 2 else "bench b")
    event = (time.perf_counter() - started) / n
    watch.uninstall()
    model = nn.Sequential(*[nn.Identity() for _ in range(200)])
    x = torch.zeros(1)

    def per_module_call() -> float:
        best = float("inf")
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(50):
                model(x)
            best = min(best, (time.perf_counter() - started) / (50 * 201))
        return best

    bare = per_module_call()
    watch.install()
    hooked = per_module_call()
    watch.uninstall()
    return {"event_seconds": event, "module_call_bare": bare, "module_call_hooked": hooked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10, help="blocks per side")
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    parser.add_argument("--out", type=Path, default=None, help="write results.json there")
    args = parser.parse_args()
    if os.environ.get("ELASTIC_TIMER_BENCH_WORKER"):
        json.dump(worker(args.blocks, args.steps), sys.stdout)
        return

    from elastic_timer import FileTimerServer

    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "fifo")
        server = FileTimerServer(
            fifo, max_interval=0.1, adaptive=True, state_file=os.path.join(tmp, "state")
        )
        server.start()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic()
        env = dict(
            os.environ,
            ELASTIC_TIMER_BENCH_WORKER="1",
            TORCHELASTIC_TIMER_FILE=fifo,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(29500 + os.getpid() % 1000),
            OMP_NUM_THREADS="1",
        )
        try:
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:]],
                env=env,
                stdout=subprocess.PIPE,
                check=True,
                timeout=1800,
            ).stdout
        finally:
            used = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.monotonic() - wall
            server.stop()
    result = json.loads(out)
    blocks = result["blocks"]
    unwatched = statistics.median(b["median"] for b in blocks["unwatched"])
    watched = statistics.median(b["median"] for b in blocks["watched"])
    pairs = [w["median"] / u["median"] for u, w in zip(blocks["unwatched"], blocks["watched"])]
    server_cpu = (used.ru_utime + used.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
    summary = {
        "step_unwatched_ms": unwatched * 1e3,
        "step_watched_ms": watched * 1e3,
        "overhead_percent": (watched / unwatched - 1) * 100,
        "overhead_percent_paired_median": (statistics.median(pairs) - 1) * 100,
        "writes_per_step_unwatched": statistics.median(
            b["writes_per_step"] for b in blocks["unwatched"]
        ),
        "writes_per_step_watched": statistics.median(
            b["writes_per_step"] for b in blocks["watched"]
        ),
        "progress_event_us": result["event_seconds"] * 1e6,
        "forward_hook_us_per_module_call": (
            result["module_call_hooked"] - result["module_call_bare"]
        )
        * 1e6,
        "server_cpu_percent_of_run": server_cpu / wall * 100,
    }
    for key, value in summary.items():
        print(f"{key:36} {value:10.3f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({**summary, "raw": result}, indent=1))


if __name__ == "__main__":
    main()
