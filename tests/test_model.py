"""The File server's timer map behaves like torch's ``_timers`` dict, step for step.

A hypothesis state machine drives ``register_timers``, ``clear_timers`` and
``get_expired_timers`` of a FileTimerServer that is never started (so nothing is ever
signalled) and compares ``_timers`` after every step with a few lines of Python written from
torch's source. The pids are those of real ``sleep`` processes, because the server drops
requests naming no live process; the refusals it adds (pids 0 and 1, invalid
signals) are part of the model.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from elastic_timer import FileTimerRequest, FileTimerServer

# (pid, scope_id, repr(expiration_time), signal): repr tells -0.0 from 0.0 and matches nan.
View = tuple[int, str, str, int]

SCOPES = ["a", "b", "c"]
# Acquires: already passed, far future, never (inf, nan), and an int as torch's client may send.
ACQUIRE_EXPIRATIONS: list[float] = [
    0.0,
    -0.0,
    1.0,
    1.7e9,
    4_000_000_000,
    4e9 + 0.5,
    1e300,
    math.inf,
    math.nan,
]
RELEASE_EXPIRATIONS: list[float] = [-1, -1.0, -0.5, -1e300, -math.inf]
DEADLINES: list[float] = [-math.inf, -1.0, 0.0, 1.0, 1.7e9, 4e9, 4e9 + 0.5, 1e300, math.inf]
SIGNALS = [0, 9, 15, -3, 999]  # 999: not a signal, refused by our server


def view(pid: int, scope: str, expiration: float, signal: int) -> View:
    return (pid, scope, repr(float(expiration)), signal)


def view_of(request: FileTimerRequest) -> View:
    return view(request.worker_pid, request.scope_id, request.expiration_time, request.signal)


class TorchTimerModel:
    """torch's FileTimerServer timer map, minus its I/O (see its register_timers and
    get_expired_timers), plus the requests our server refuses instead of acting on."""

    def __init__(self, live_pids: set[int]) -> None:
        self.live_pids = live_pids
        self.timers: dict[tuple[int, str], View] = {}
        self.requests = 0

    def accepts(self, pid: int, signal: int) -> bool:
        """Refused by our server: pids that are not one other live process, bad signals."""
        return pid in self.live_pids and (signal <= 0 or 1 <= signal <= 64)

    def register(self, pid: int, scope: str, expiration: float, signal: int) -> None:
        self.requests += 1
        key = (pid, scope)
        if expiration < 0:  # a release; releasing what was never acquired is a no-op
            self.timers.pop(key, None)
        elif self.accepts(pid, signal):
            self.timers[key] = view(pid, scope, expiration, signal)

    def clear(self, pids: set[int]) -> None:
        self.timers = {k: v for k, v in self.timers.items() if k[0] not in pids}

    def expired(self, deadline: float) -> dict[int, set[View]]:
        result: dict[int, set[View]] = {}
        for key, timer in self.timers.items():
            if float(timer[2]) <= deadline:
                result.setdefault(key[0], set()).add(timer)
        return result


class TimerMapMachine(RuleBasedStateMachine):
    """One never-started server against the model, over random request sequences."""

    pids: list[int] = []  # noqa: RUF012 (set once per test, below)
    fifo_dir: Path = Path()
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        fifo = self.fifo_dir / f"model-{next(self.counter)}.fifo"
        self.server = FileTimerServer(str(fifo), "model", signal_self=False)
        self.model = TorchTimerModel({*self.pids, os.getpid()})

    def teardown(self) -> None:
        self.server.stop()  # never started: this only removes the FIFO

    def all_pids(self) -> list[int]:
        # Live sleepers, pids our server refuses (0, 1), and its own (pytest's), accepted.
        return [*self.pids, 0, 1, os.getpid()]

    @rule(data=st.data())
    def register_batch(self, data: st.DataObject) -> None:
        """register_timers with a batch of acquires and releases, applied in order."""
        request = st.tuples(
            st.sampled_from(self.all_pids()),
            st.sampled_from(SCOPES),
            st.sampled_from(ACQUIRE_EXPIRATIONS + RELEASE_EXPIRATIONS),
            st.sampled_from(SIGNALS),
        )
        batch = data.draw(st.lists(request, max_size=4))
        for pid, scope, expiration, signal in batch:
            self.model.register(pid, scope, expiration, signal)
        self.server.register_timers([FileTimerRequest(*r) for r in batch])

    @precondition(lambda self: bool(self.model.timers))
    @rule(data=st.data())
    def release_existing(self, data: st.DataObject) -> None:
        """A release of a timer that exists (random batches rarely hit one)."""
        pid, scope = data.draw(st.sampled_from(sorted(self.model.timers)))
        expiration = data.draw(st.sampled_from(RELEASE_EXPIRATIONS))
        self.model.register(pid, scope, expiration, 0)
        self.server.register_timers([FileTimerRequest(pid, scope, expiration, 0)])

    @rule(pids=st.sets(st.sampled_from([0, 1, 2, 3])))
    def clear(self, pids: set[int]) -> None:
        """clear_timers drops every timer of the given workers."""
        chosen = {self.all_pids()[i] for i in pids}
        self.model.clear(chosen)
        self.server.clear_timers(chosen)

    @rule(deadline=st.sampled_from(DEADLINES))
    def expired(self, deadline: float) -> None:
        """get_expired_timers(deadline): by pid, the timers expiring at or before it."""
        got = {
            pid: {view_of(r) for r in requests}
            for pid, requests in self.server.get_expired_timers(deadline).items()
        }
        for requests in self.server.get_expired_timers(deadline).values():
            assert all(type(r) is FileTimerRequest for r in requests)
        assert got == self.model.expired(deadline)

    @invariant()
    def same_timers(self) -> None:
        timers = self.server._timers
        assert {k: view_of(v) for k, v in timers.items()} == self.model.timers
        assert all(k == (v.worker_pid, v.scope_id) for k, v in timers.items())
        assert self.server._request_count == self.model.requests
        assert self.server.stats()["live_timers"] == len(self.model.timers)


@pytest.fixture(scope="module")
def sleeper_pids() -> Iterator[list[int]]:
    """Three live processes whose pids the server accepts; killed (by pid) at the end."""
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        yield [s.pid for s in sleepers]
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait(10)


def test_timer_map_matches_torchs_semantics(sleeper_pids: list[int], tmp_path: Path) -> None:
    """Any sequence of register/clear/get_expired calls leaves the same timers as torch's dict
    would (re-acquire replaces, negative expiration releases, vacuous release is a no-op)."""
    TimerMapMachine.pids = sleeper_pids
    TimerMapMachine.fifo_dir = tmp_path
    run_state_machine_as_test(
        TimerMapMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        ),
    )
