"""Shared fixtures: a clean global timer client, and cleanup of the servers and child processes
a test starts (only those: nothing else is ever signalled)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from typing import Protocol

import pytest

import elastic_timer


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
