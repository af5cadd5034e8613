"""Stack dumps read: the threads and frames of a faulthandler or py-spy dump, a fingerprint
that groups equal stacks, and where a dump waits (a torch.distributed call, a backward pass)."""

from __future__ import annotations

import hashlib
import re

__all__ = ["BACKWARD", "COLLECTIVES", "Frame", "collective", "fingerprint", "threads", "where"]

# torch.distributed's blocking calls (functions of torch/distributed/): a rank whose stack is
# in one of them waits for others.
COLLECTIVES = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "monitored_barrier",
        "broadcast",
        "broadcast_object_list",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "gather",
        "gather_object",
        "scatter",
        "scatter_object_list",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    }
)

# Where a backward pass runs: a rank of a DistributedDataParallel model that is there when the
# others hang waits for their gradients' all-reduce, which DDP runs inside it.
BACKWARD = "backward"

# A frame as faulthandler writes it, and as py-spy dump does.
_FAULTHANDLER_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.+)$')
_PY_SPY_FRAME = re.compile(r"^\s+(?P<func>\S.*) \((?P<file>.+):(?P<line>\d+)\)$")
_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+|\d+)")

Frame = tuple[str, int, str]  # file, line, function


def threads(stacks: str) -> list[list[Frame]]:
    """The frames of each thread of a faulthandler or py-spy dump, innermost first."""
    found: list[list[Frame]] = []
    current: list[Frame] | None = None
    for line in stacks.splitlines():
        if _THREAD.match(line.strip()):
            current = []
            found.append(current)
            continue
        match = _FAULTHANDLER_FRAME.match(line) or _PY_SPY_FRAME.match(line)
        if match is None:
            continue
        if current is None:
            current = []
            found.append(current)
        current.append((match["file"], int(match["line"]), match["func"].strip()))
    return [frames for frames in found if frames]


def fingerprint(stacks: str) -> str:
    """Equal for two dumps whose threads are at the same lines of the same code, whatever
    the thread ids, the order the threads were listed in, and how often (a worker asked for
    its stacks twice, by its own expiry and by another host's report, appends two dumps)."""
    normalised = sorted({repr(frames) for frames in threads(stacks)})
    return hashlib.sha1("\n".join(normalised).encode()).hexdigest()[:16]


def collective(stacks: str) -> str | None:
    """The torch.distributed call a dump waits in (the innermost), if any; else ``backward``
    when a thread is in autograd's backward pass."""
    for frames in threads(stacks):
        for path, _, func in frames:
            if func in COLLECTIVES and "torch/distributed/" in path:
                return func
    for frames in threads(stacks):
        if any(f == "_engine_run_backward" and "torch/autograd/" in p for p, _, f in frames):
            return BACKWARD
    return None


def where(stacks: str) -> str:
    """A one-line answer: the collective, or the innermost frame of the first thread."""
    call = collective(stacks)
    if call is not None:
        return f"in {call}"
    found = threads(stacks)
    if not found:
        return "no Python frames"
    path, line, func = found[0][0]
    return f"in {func} ({path.rsplit('/', 1)[-1]}:{line})"
