"""Shared fixtures: a clean global timer client, and cleanup of the servers and child processes
a test starts (only those: nothing else is ever signalled).

Also the ``torch`` marker's bookkeeping: every test of a module that imports torch at top level,
and every ``torchrun`` test, is marked ``torch``. On a Python without torch, ``-m "not torch"``
does not import those modules at all; anywhere else they are collected as usual, so a missing
torch is an error, never a skip. Under CI (``CI`` set), any skipped test fails the run.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

import pytest

import elastic_timer

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
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if imports_torch(item.path) or item.get_closest_marker("torchrun"):
            item.add_marker(pytest.mark.torch)


SKIPPED: list[str] = []  # node ids, for the CI rule


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("CI") and SKIPPED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if os.environ.get("CI") and SKIPPED:
        terminalreporter.write_line(
            f"CI: {len(SKIPPED)} skipped test(s) fail the run: " + ", ".join(SKIPPED), red=True
        )


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
