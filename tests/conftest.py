"""Shared fixtures and rules: a clean global timer client, cleanup of the servers and child
processes a test starts (only those: nothing else is ever signalled), no skipped test, and a
failed test's leftover processes killed.

Also the ``torch`` marker's bookkeeping: every test of a module that imports torch at top level,
and every ``torchrun`` test, is marked ``torch``. On a Python without torch, ``-m "not torch"``
does not import those modules at all; anywhere else they are collected as usual, so a missing
torch is an error, never a skip. ``ft_launcher`` tests are deselected (not skipped) on Pythons
that PyPI has no nvidia-resiliency-ext for (it has 3.10 to 3.12).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Generator, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

import pytest

import elastic_timer

# multiprocessing's own helpers outlive the test that started them, and later tests use them.
_SHARED_HELPERS = (b"multiprocessing.resource_tracker", b"multiprocessing.forkserver")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fails every skipped test (a skip would hide a missing feature: this suite has none to
    hide), and keeps each phase's report on the item for the fixtures below."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, and this suite fails every skip: {report.longrepr}"
    setattr(item, f"report_{report.when}", report)
    return report


def _descendants() -> set[int]:
    """The pids of this process's live descendants (from /proc), with multiprocessing's own
    helpers left out."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X") and not any(h in command for h in _SHARED_HELPERS):
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture(autouse=True)
def kill_what_a_failed_test_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails (an assertion, or pytest-timeout) may leave workers behind that
    would disturb the tests after it: the processes it started that still run are killed."""
    before = _descendants()
    yield
    reports = (getattr(request.node, f"report_{when}", None) for when in ("setup", "call"))
    if not any(report is not None and report.failed for report in reports):
        return
    for pid in _descendants() - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


TORCH_INSTALLED = importlib.util.find_spec("torch") is not None


@functools.cache
def imports_torch(path: Path) -> bool:
    """Whether the module at ``path`` imports torch at top level."""
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name.partition(".")[0] == "torch" for name in names):
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    deselects_torch = re.search(r"\bnot\s+torch\b", config.getoption("markexpr") or "")
    if TORCH_INSTALLED or not deselects_torch or collection_path.suffix != ".py":
        return None
    return imports_torch(collection_path) or None


def pytest_report_header(config: pytest.Config) -> str:
    return "torch: " + ("installed" if TORCH_INSTALLED else "not installed")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if imports_torch(item.path) or item.get_closest_marker("torchrun"):
            item.add_marker(pytest.mark.torch)
    if not (3, 10) <= sys.version_info < (3, 13):
        # PyPI has nvidia-resiliency-ext for Python 3.10 to 3.12 only: not a feature of ours.
        unsupported = [item for item in items if item.get_closest_marker("ft_launcher")]
        if unsupported:
            config.hook.pytest_deselected(items=unsupported)
            items[:] = [item for item in items if item not in unsupported]


class Stoppable(Protocol):
    def stop(self) -> None: ...


@pytest.fixture
def no_client() -> Iterator[None]:
    """No timer client is configured before or after the test (``configure`` is global)."""
    elastic_timer.configure(None)
    yield
    elastic_timer.configure(None)


@pytest.fixture
def servers() -> Iterator[list[Stoppable]]:
    """Append every server the test builds; each is stopped at teardown, even on failure."""
    started: list[Stoppable] = []
    yield started
    for server in reversed(started):
        server.stop()


@pytest.fixture
def children() -> Iterator[list[BaseProcess | subprocess.Popen[bytes]]]:
    """Append every child process the test starts; survivors are killed (by pid) and reaped."""
    started: list[BaseProcess | subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if isinstance(child, subprocess.Popen):
            if child.poll() is None:
                child.kill()
            child.wait(10)
        else:
            if child.is_alive():
                child.kill()
            child.join(10)


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    """Where the test's File server puts its FIFO."""
    return str(tmp_path / "timer.fifo")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A private directory for Unix sockets, with a short path whatever TMPDIR is: a socket's
    path has at most 108 bytes, and ``tmp_path`` under a long TMPDIR (a CI job's) passes that."""
    directory = Path(tempfile.mkdtemp(prefix="et-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
