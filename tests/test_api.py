"""The public API is torch's: the same names, paths and signatures, the same request objects,
the same ``expires``/``configure`` contract, and torch's watchdog semantics for pure-Python
servers written against the abstract ``TimerServer``."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pickle
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed.elastic.timer as torch_timer
import torch.distributed.elastic.timer.file_based_local_timer as torch_file_timer
from helpers import wait_for

import elastic_timer
from elastic_timer import (
    FileTimerRequest,
    RequestQueue,
    TimerClient,
    TimerRequest,
    TimerServer,
    configure,
    expires,
)

# -- exports and signatures ------------------------------------------------------------------

DOCUMENTED_NAMES = [
    "FileTimerClient",
    "FileTimerRequest",
    "FileTimerServer",
    "LocalTimerClient",
    "LocalTimerServer",
    "MultiprocessingRequestQueue",
    "RequestQueue",
    "TimerClient",
    "TimerRequest",
    "TimerServer",
    "configure",
    "expires",
]

SUBMODULES = ["api", "local_timer", "file_based_local_timer", "debug_info_logging"]


def test_every_documented_name_is_exported() -> None:
    """``import elastic_timer as timer`` gives every name torch's package and docs use."""
    assert set(DOCUMENTED_NAMES) <= set(elastic_timer.__all__)
    for name in DOCUMENTED_NAMES:
        assert hasattr(elastic_timer, name), name
    torch_public = {n for n in dir(torch_timer) if not n.startswith("_")} - set(SUBMODULES)
    assert torch_public <= set(DOCUMENTED_NAMES)


@pytest.mark.parametrize("submodule", SUBMODULES)
def test_submodules_mirror_torch_paths(submodule: str) -> None:
    """``torch.distributed.elastic.timer.X`` imports become ``elastic_timer.X`` imports."""
    torch_module = importlib.import_module(f"torch.distributed.elastic.timer.{submodule}")
    ours = importlib.import_module(f"elastic_timer.{submodule}")
    assert sorted(ours.__all__) == sorted(torch_module.__all__)
    for name in torch_module.__all__:
        assert hasattr(ours, name), f"elastic_timer.{submodule}.{name}"
    for name in ours.__all__:
        top = getattr(elastic_timer, name, None)
        if top is not None:
            assert top is getattr(ours, name), f"elastic_timer.{name} is a different object"


SIGNATURES = [
    "api.TimerRequest.__init__",
    "api.TimerClient.acquire",
    "api.TimerClient.release",
    "api.RequestQueue.size",
    "api.RequestQueue.get",
    "api.TimerServer.__init__",
    "api.TimerServer.register_timers",
    "api.TimerServer.clear_timers",
    "api.TimerServer.get_expired_timers",
    "api.TimerServer._reap_worker",
    "api.TimerServer._run_watchdog",
    "api.TimerServer.start",
    "api.TimerServer.stop",
    "api.configure",
    "api.expires",
    "local_timer.LocalTimerClient.__init__",
    "local_timer.LocalTimerClient.acquire",
    "local_timer.LocalTimerClient.release",
    "local_timer.LocalTimerServer.__init__",
    "local_timer.LocalTimerServer.register_timers",
    "local_timer.LocalTimerServer.clear_timers",
    "local_timer.LocalTimerServer.get_expired_timers",
    "local_timer.LocalTimerServer._reap_worker",
    "local_timer.MultiprocessingRequestQueue.__init__",
    "local_timer.MultiprocessingRequestQueue.size",
    "local_timer.MultiprocessingRequestQueue.get",
    "file_based_local_timer.FileTimerRequest.__init__",
    "file_based_local_timer.FileTimerRequest.to_json",
    "file_based_local_timer.FileTimerClient.__init__",
    "file_based_local_timer.FileTimerClient.acquire",
    "file_based_local_timer.FileTimerClient.release",
    "file_based_local_timer.FileTimerServer.__init__",
    "file_based_local_timer.FileTimerServer.start",
    "file_based_local_timer.FileTimerServer.stop",
    "file_based_local_timer.FileTimerServer.run_once",
    "file_based_local_timer.FileTimerServer.register_timers",
    "file_based_local_timer.FileTimerServer.clear_timers",
    "file_based_local_timer.FileTimerServer.get_expired_timers",
    "file_based_local_timer.FileTimerServer.get_last_progress_time",
    "file_based_local_timer.FileTimerServer.is_process_running",
    "file_based_local_timer.FileTimerServer._reap_worker",
    "debug_info_logging.log_debug_info_for_expired_timers",
]


def _resolve(package: str, dotted: str) -> Callable[..., Any]:
    module, *attrs = dotted.split(".")
    obj: Any = importlib.import_module(f"{package}.{module}")
    for attr in attrs:
        obj = getattr(obj, attr)
    assert callable(obj)
    return obj  # type: ignore[no-any-return]


def _parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults: what a caller relies on (annotations do not matter)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("dotted", SIGNATURES)
def test_signatures_match_torch(dotted: str) -> None:
    """Every call that works against torch's API (positional or keyword) works against ours;
    our additions are keyword-only parameters with defaults, after torch's, and the servers'
    opt-in ``**diagnostics`` (see test_diagnostics)."""
    theirs = _parameters(_resolve("torch.distributed.elastic.timer", dotted))
    ours = _parameters(_resolve("elastic_timer", dotted))
    assert [(n, k) for n, k, _ in ours[: len(theirs)]] == [(n, k) for n, k, _ in theirs]
    for (name, _, default), (_, _, their_default) in zip(ours, theirs):
        if their_default is not inspect.Parameter.empty:
            assert default == their_default, name
        # else: a default where torch requires the argument only accepts more calls.
    additions = ours[len(theirs) :]
    if additions and additions[-1][:2] == ("diagnostics", inspect.Parameter.VAR_KEYWORD):
        additions.pop()
    for name, kind, default in additions:
        assert kind is inspect.Parameter.KEYWORD_ONLY, name
        assert default is not inspect.Parameter.empty, name


# -- request objects --------------------------------------------------------------------------


def test_timer_request_equality() -> None:
    """Requests compare by value, as torch's tests and servers compare them."""
    request = TimerRequest(1234, "scope", 1.5)
    assert request == TimerRequest(1234, "scope", 1.5)
    assert request != TimerRequest(1235, "scope", 1.5)
    assert request != TimerRequest(1234, "other", 1.5)
    assert request != TimerRequest(1234, "scope", 2.5)
    assert request != (1234, "scope", 1.5)
    assert request != "TimerRequest(1234, 'scope', 1.5)"
    assert request is not None
    assert request in [TimerRequest(1, "x", 0), TimerRequest(1234, "scope", 1.5)]


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_timer_request_pickles(protocol: int) -> None:
    """Requests cross a multiprocessing queue: pickling keeps every field."""
    request = TimerRequest(1234, "é scope", 1700000000.25)
    clone = pickle.loads(pickle.dumps(request, protocol=protocol))
    assert type(clone) is TimerRequest
    assert clone == request
    assert (clone.worker_id, clone.scope_id, clone.expiration_time) == (
        1234,
        "é scope",
        1700000000.25,
    )
    file_request = FileTimerRequest(77, "s", 3.5, 15)
    file_clone = pickle.loads(pickle.dumps(file_request, protocol=protocol))
    assert file_clone == file_request
    assert (file_clone.version, file_clone.signal) == (1, 15)


def test_file_timer_request_fields() -> None:
    """FileTimerRequest carries torch's fields: a version, the pid, and the reap signal."""
    request = FileTimerRequest(4321, "step", 12.5, 9)
    assert request.version == 1
    assert request.worker_pid == 4321
    assert request.worker_id == 4321
    assert (request.scope_id, request.expiration_time, request.signal) == ("step", 12.5, 9)
    assert FileTimerRequest(4321, "step", 12.5).signal == 0
    assert request == FileTimerRequest(4321, "step", 12.5, 9)
    assert request != FileTimerRequest(4321, "step", 12.5, 15)
    assert request != TimerRequest(4321, "step", 12.5)
    assert TimerRequest(4321, "step", 12.5) != request


@pytest.mark.parametrize(
    ("pid", "scope", "expiration", "sig"),
    [
        (1234, "step", 1700000000.123456, 9),
        (1234, "step", -1, 0),
        (99, 'é中😀\n"\\', 0.1, 15),
        (2**40, "", 1e300, 2),
    ],
)
def test_file_timer_request_json_is_torchs(
    pid: int, scope: str, expiration: float, sig: int
) -> None:
    """The JSON a FileTimerRequest writes is byte for byte torch's, so mixed versions talk."""
    ours = FileTimerRequest(pid, scope, expiration, sig).to_json()
    theirs = torch_file_timer.FileTimerRequest(pid, scope, expiration, sig).to_json()
    assert ours == theirs
    assert json.loads(ours) == {
        "version": 1,
        "pid": pid,
        "scope_id": scope,
        "expiration_time": expiration,
        "signal": sig,
    }


# -- configure and expires --------------------------------------------------------------------


class RecordingClient(TimerClient):
    """A TimerClient that records its calls: ("acquire", scope, expiration) / ("release", scope)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.calls.append(("acquire", scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        self.calls.append(("release", scope_id))

    def kinds_and_scopes(self) -> list[tuple[str, str]]:
        return [(call[0], call[1]) for call in self.calls]


def _line() -> int:
    """The caller's current line number."""
    return sys._getframe(1).f_lineno


def _scope_of(line: int) -> str:
    return f"{__file__}#{line}"


@pytest.mark.usefixtures("no_client")
def test_expires_without_a_client_raises() -> None:
    """Forgetting ``configure`` fails loudly instead of running the block unguarded."""
    with pytest.raises(RuntimeError, match="Configure timer client"):
        with expires(after=1):
            pytest.fail("the block ran without a timer client")

    @expires(after=1)
    def guarded() -> None:
        pytest.fail("the function ran without a timer client")

    with pytest.raises(RuntimeError, match="Configure timer client"):
        guarded()


@pytest.mark.usefixtures("no_client")
def test_exceptions_propagate_and_the_timer_is_released() -> None:
    """An exception in the block reaches the caller, and the timer is still released."""
    client = RecordingClient()
    configure(client)
    with pytest.raises(ValueError, match="foobar"):
        with expires(after=1):
            raise ValueError("foobar")
    assert [kind for kind, _ in client.kinds_and_scopes()] == ["acquire", "release"]


@pytest.mark.usefixtures("no_client")
def test_explicit_client_is_used() -> None:
    """``client=`` wins over the configured client: one acquire, one release, same scope."""
    configured = RecordingClient()
    configure(configured)
    explicit = RecordingClient()
    before = time.time()
    with expires(after=7, scope="test", client=explicit):
        assert len(explicit.calls) == 1
    after = time.time()
    assert configured.calls == []
    assert len(explicit.calls) == 2
    kind, scope, expiration = explicit.calls[0]
    assert (kind, scope) == ("acquire", "test")
    assert before + 7 <= expiration <= after + 7
    assert explicit.calls[1] == ("release", "test")


@pytest.mark.usefixtures("no_client")
def test_expiration_time_is_now_plus_after() -> None:
    """The deadline sent is ``time.time() + after`` at the moment the block is entered."""
    client = RecordingClient()
    configure(client)
    for after in (0.5, 60, 3600.25):
        before = time.time()
        with expires(after=after):
            pass
        entered_by = time.time()
        expiration = client.calls[-2][2]
        assert before + after <= expiration <= entered_by + after


@pytest.mark.usefixtures("no_client")
def test_default_scope_is_the_with_line() -> None:
    """Without ``scope``, the timer is named after this file and the line of the ``with``."""
    client = RecordingClient()
    configure(client)
    line = _line() + 1
    with expires(after=5):
        pass
    assert client.kinds_and_scopes() == [
        ("acquire", _scope_of(line)),
        ("release", _scope_of(line)),
    ]


@pytest.mark.usefixtures("no_client")
def test_different_with_lines_get_different_scopes() -> None:
    """Two guarded blocks in a row are two timers, not one shared timer."""
    client = RecordingClient()
    configure(client)
    first = _line() + 1
    with expires(after=5):
        pass
    second = _line() + 1
    with expires(after=5):
        pass
    scopes = [scope for _, scope in client.kinds_and_scopes()]
    assert scopes == [_scope_of(first)] * 2 + [_scope_of(second)] * 2
    assert first != second


@pytest.mark.usefixtures("no_client")
def test_nested_blocks_get_distinct_scopes() -> None:
    """Leaving an inner block releases only the inner timer: the outer stays armed."""
    client = RecordingClient()
    configure(client)
    outer = _line() + 1
    with expires(after=10):
        inner = _line() + 1
        with expires(after=1):
            pass
        assert client.kinds_and_scopes()[-1] == ("release", _scope_of(inner))
        assert ("release", _scope_of(outer)) not in client.kinds_and_scopes()
    assert client.kinds_and_scopes() == [
        ("acquire", _scope_of(outer)),
        ("acquire", _scope_of(inner)),
        ("release", _scope_of(inner)),
        ("release", _scope_of(outer)),
    ]


def _recurse(n: int, client: TimerClient) -> None:
    if n > 0:
        with expires(after=5, client=client):
            _recurse(n - 1, client)


@pytest.mark.usefixtures("no_client")
def test_the_same_line_entered_recursively_is_one_scope() -> None:
    """torch's ``test_get_timer_recursive``: recursion through one ``with`` re-acquires one
    timer (the innermost deadline is the one in effect) instead of stacking new ones."""
    client = RecordingClient()
    _recurse(3, client)
    kinds = [kind for kind, _ in client.kinds_and_scopes()]
    assert kinds == ["acquire"] * 3 + ["release"] * 3
    scopes = {scope for _, scope in client.kinds_and_scopes()}
    assert len(scopes) == 1
    (scope,) = scopes
    assert scope.startswith(f"{__file__}#")


@pytest.mark.usefixtures("no_client")
def test_expires_as_a_decorator() -> None:
    """``@expires(after=...)`` guards every call, recursive ones included; the scope is the
    decorator's line and the configured client is looked up at call time."""
    client = RecordingClient()

    @expires(after=5)
    def countdown(n: int) -> int:
        return countdown(n - 1) + 1 if n > 0 else 0

    undecorated = inspect.unwrap(countdown)
    assert isinstance(undecorated, types.FunctionType)
    line = undecorated.__code__.co_firstlineno  # the decorator's line
    configure(client)
    assert countdown(2) == 2
    assert (
        client.kinds_and_scopes()
        == [("acquire", _scope_of(line))] * 3 + [("release", _scope_of(line))] * 3
    )
    client.calls.clear()
    assert countdown(0) == 0
    assert client.kinds_and_scopes() == [
        ("acquire", _scope_of(line)),
        ("release", _scope_of(line)),
    ]


@pytest.mark.usefixtures("no_client")
def test_a_decorated_function_raising_still_releases() -> None:
    """A decorated function that raises releases its timer and re-raises."""
    client = RecordingClient()

    @expires(after=5, scope="decorated", client=client)
    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        boom()
    assert client.kinds_and_scopes() == [("acquire", "decorated"), ("release", "decorated")]


# -- pure-Python servers on the abstract TimerServer -------------------------------------------


class MockRequestQueue(RequestQueue):
    """torch's api_test queue: always two requests waiting."""

    def __init__(self) -> None:
        self.gets: list[tuple[int, float]] = []

    def size(self) -> int:
        return 2

    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        self.gets.append((size, timeout))
        return [TimerRequest("w1", "test_1", 0), TimerRequest("w2", "test_2", 0)]


class MockTimerServer(TimerServer):
    """torch's api_test server: reaping w1 raises, w2 succeeds, w3 fails (returns False)."""

    def __init__(self, request_queue: RequestQueue, max_interval: float) -> None:
        super().__init__(request_queue, max_interval)
        self.registered: list[list[TimerRequest]] = []
        self.cleared: list[set[Any]] = []
        self.reap_calls: list[Any] = []

    def register_timers(self, timer_requests: list[TimerRequest]) -> None:
        self.registered.append(list(timer_requests))

    def clear_timers(self, worker_ids: set[Any]) -> None:
        self.cleared.append(set(worker_ids))

    def get_expired_timers(self, deadline: float) -> dict[Any, list[TimerRequest]]:
        return {
            f"w{i}": [
                TimerRequest(f"w{i}", f"test_{i}_0", 0),
                TimerRequest(f"w{i}", f"test_{i}_1", 0),
            ]
            for i in range(1, 4)
        }

    def _reap_worker(self, worker_id: Any) -> bool:
        self.reap_calls.append(worker_id)
        if worker_id == "w1":
            raise RuntimeError("test error")
        return bool(worker_id == "w2")


def test_run_watchdog_clears_only_reaped_workers(caplog: pytest.LogCaptureFixture) -> None:
    """torch's ``test_run_watchdog``: a reap that raises counts as reaped (and is logged), a
    reap that returns False keeps the worker's timers for the next pass."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    queue = MockRequestQueue()
    server = MockTimerServer(queue, max_interval=1)
    server._run_watchdog()
    assert queue.gets == [(2, 1)]
    assert server.registered == [[TimerRequest("w1", "test_1", 0), TimerRequest("w2", "test_2", 0)]]
    assert server.reap_calls == ["w1", "w2", "w3"]
    assert server.cleared == [{"w1", "w2"}]
    thrown = [
        r for r in caplog.records if "Uncaught exception thrown from _reap_worker" in r.message
    ]
    assert len(thrown) == 1
    assert thrown[0].levelno == logging.ERROR
    assert thrown[0].exc_info is not None
    assert "test error" in str(thrown[0].exc_info[1])
    assert any(
        r.levelno == logging.ERROR and "Error reaping worker=[w3]" in r.message
        for r in caplog.records
    )
    assert any(
        "Reaping worker_id=[w2]" in r.message and "test_2_0" in r.message for r in caplog.records
    )


class ScriptedQueue(RequestQueue):
    """Hands out the given batches one per ``get``, then waits (briefly) with nothing."""

    def __init__(self, batches: list[list[TimerRequest]]) -> None:
        self._batches = list(batches)
        self._lock = threading.Lock()

    def size(self) -> int:
        with self._lock:
            return len(self._batches[0]) if self._batches else 0

    def get(self, size: int, timeout: float) -> list[TimerRequest]:
        with self._lock:
            if self._batches:
                return self._batches.pop(0)[:size]
        time.sleep(min(timeout, 0.01))
        return []


class DictTimerServer(TimerServer):
    """torch's LocalTimerServer logic in pure Python, reaping by recording (it never signals
    anything: worker ids here are names, not pids)."""

    def __init__(
        self,
        request_queue: RequestQueue,
        max_interval: float,
        daemon: bool = True,
        outcomes: dict[str, list[bool]] | None = None,
    ) -> None:
        super().__init__(request_queue, max_interval, daemon)
        self._timers: dict[tuple[Any, str], TimerRequest] = {}
        self.outcomes = outcomes or {}
        self.reaped: list[Any] = []
        self.cleared: list[set[Any]] = []
        self.fail_next_register = False

    def register_timers(self, timer_requests: list[TimerRequest]) -> None:
        if self.fail_next_register:
            self.fail_next_register = False
            raise RuntimeError("register failed")
        for request in timer_requests:
            key = (request.worker_id, request.scope_id)
            if request.expiration_time < 0:
                self._timers.pop(key, None)
            else:
                self._timers[key] = request

    def clear_timers(self, worker_ids: set[Any]) -> None:
        self.cleared.append(set(worker_ids))
        for key in list(self._timers):
            if key[0] in worker_ids:
                del self._timers[key]

    def get_expired_timers(self, deadline: float) -> dict[Any, list[TimerRequest]]:
        expired: dict[Any, list[TimerRequest]] = {}
        for request in self._timers.values():
            if request.expiration_time <= deadline:
                expired.setdefault(request.worker_id, []).append(request)
        return expired

    def _reap_worker(self, worker_id: Any) -> bool:
        self.reaped.append(worker_id)
        planned = self.outcomes.get(worker_id, [])
        return planned.pop(0) if planned else True


def test_a_failed_reap_keeps_the_timers_and_is_retried() -> None:
    """Expired workers are reaped via ``_reap_worker``; one whose reap returns False keeps its
    timers (``clear_timers`` skips it) and is reaped again on the next pass."""
    now = time.time()
    queue = ScriptedQueue(
        [
            [
                TimerRequest("stuck", "a", now - 60),
                TimerRequest("stuck", "b", now + 60),
                TimerRequest("busy", "a", now + 60),
                TimerRequest("stubborn", "a", now - 60),
                TimerRequest("done", "a", now - 60),
                TimerRequest("done", "a", -1),
            ]
        ]
    )
    server = DictTimerServer(queue, max_interval=0.01, outcomes={"stubborn": [False, True]})
    server._run_watchdog()
    assert sorted(server.reaped) == ["stubborn", "stuck"]
    assert server.cleared == [{"stuck"}]
    assert set(server._timers) == {("busy", "a"), ("stubborn", "a")}
    server._run_watchdog()
    assert sorted(server.reaped) == ["stubborn", "stubborn", "stuck"]
    assert server.cleared[-1] == {"stubborn"}
    assert set(server._timers) == {("busy", "a")}


@pytest.mark.parametrize("daemon", [True, False])
def test_start_and_stop_run_the_watchdog_thread(
    daemon: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``start()`` runs torch's watchdog loop on a thread (daemon as asked), which survives an
    error in a pass and reaps what expires; ``stop()`` ends the thread within max_interval."""
    caplog.set_level(logging.INFO, logger="elastic_timer")
    now = time.time()
    queue = ScriptedQueue(
        [[TimerRequest("ignored", "a", now - 60)], [TimerRequest("late", "a", now + 0.2)]]
    )
    server = DictTimerServer(queue, max_interval=0.05, daemon=daemon)
    server.fail_next_register = True
    server.start()
    thread = server._watchdog_thread
    try:
        assert thread is not None
        assert thread.daemon is daemon
        assert wait_for(lambda: server.reaped == ["late"]), server.reaped
        assert wait_for(lambda: not server._timers)
    finally:
        server.stop()
    assert server._watchdog_thread is None
    thread.join(2)
    assert not thread.is_alive()
    assert any(
        r.message == "Error running watchdog" and r.exc_info is not None for r in caplog.records
    )
    server.stop()  # a second stop is harmless
