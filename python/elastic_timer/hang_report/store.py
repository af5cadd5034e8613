"""The report's protocol over the job's store: the keys of one hang, the claim, a host's
contribution published, and the gathering of all of them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .schema import Contribution

__all__ = [
    "GENERATION",
    "PREFIX",
    "STOP",
    "Keys",
    "Store",
    "await_wake",
    "claim",
    "gather",
    "publish",
    "wake_all",
]

PREFIX = "elastic-timer/hang/"
# Reports written in this store so far: a store that outlives a restart of the worker group
# (static rendezvous) gets a new set of keys for the next hang.
GENERATION = PREFIX + "generation"

# What a host's own wake key holds when it stops listening; any other value is a claim (the
# claiming host's name).
STOP = "stop"

# A torch.distributed Store (TCPStore, PrefixStore): add, append, check, compare_set, get and
# set are what the report uses. torch's stubs lack some of them, hence Any.
Store = Any


@dataclass(frozen=True)
class Keys:
    """The store keys of one hang (one generation)."""

    generation: int = 0

    def _key(self, name: str) -> str:
        return f"{PREFIX}{self.generation}/{name}"

    @property
    def trigger(self) -> str:
        return self._key("trigger")

    @property
    def reports(self) -> str:
        return self._key("reports")

    @property
    def count(self) -> str:
        return self._key("count")

    @property
    def report(self) -> str:
        return self._key("report")

    def wake(self, group_rank: int) -> str:
        """What host ``group_rank`` waits on while the job is healthy: set by a claim, or by
        the host itself when it stops."""
        return self._key(f"wake/{group_rank}")


def publish(store: Store, share: Contribution, keys: Keys = Keys()) -> int:
    """Adds a host's contribution (one append, one add); returns the hosts counted so far."""
    store.append(keys.reports, json.dumps(share, separators=(",", ":")) + "\n")
    return int(store.add(keys.count, 1))


def gather(
    store: Store, expected_hosts: int, timeout: float, keys: Keys = Keys(), poll: float = 0.05
) -> list[Contribution]:
    """Every contribution there is once all ``expected_hosts`` counted, or ``timeout`` passed:
    one counter polled, one key read."""
    deadline = time.monotonic() + timeout
    while store.add(keys.count, 0) < expected_hosts and time.monotonic() < deadline:
        time.sleep(poll)
    raw = store.get(keys.reports) if store.check([keys.reports]) else b""
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def claim(store: Store, me: str, keys: Keys = Keys()) -> bool:
    """Whether this host is the first to report a hang (and so writes the report)."""
    return bytes(store.compare_set(keys.trigger, "", me)).decode() == me


def wake_all(store: Store, hosts: int, me: str, keys: Keys = Keys()) -> None:
    """Tells every host of this host's claim: one request that sets every wake key, and the
    store answers each host's waiting request at once."""
    names = [keys.wake(rank) for rank in range(hosts)]
    store.multi_set(names, [me] * hosts)


def await_wake(store: Store, key: str, timeout: float) -> bool:
    """Whether ``key`` is set within ``timeout``: one request, which the store answers when it
    is set. A store that fails sooner than ``timeout`` (gone, broken) raises."""
    began = time.monotonic()
    try:
        store.wait([key], timedelta(seconds=timeout))
    except RuntimeError:  # torch's DistStoreError on the timeout, DistNetworkError if gone
        if time.monotonic() - began < timeout:
            raise
        return False
    return True
