"""Helpers the test modules share (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

CLI = [sys.executable, "-m", "elastic_timer.cli"]
LIBFAKETIME = "/usr/lib/*/faketime/libfaketime.so.1"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Polls ``predicate`` until it is truthy or ``timeout`` passes; returns whether it was.

    The timeout only bounds how long a failing test waits: a passing one returns at once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``elastic-timer ARGS`` to completion (commands that exit on their own)."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=30, check=False, env=env
    )


def open_rings() -> int:
    """How many request rings (``elastic_timer.ring``'s memfds) this process holds open."""
    count = 0
    for fd in glob.glob("/proc/self/fd/*"):
        try:
            count += "elastic-timer-ring" in os.readlink(fd)
        except OSError:  # the fd the glob itself opened, closed since
            pass
    return count


def libfaketime() -> str:
    found = sorted(glob.glob(LIBFAKETIME))
    if not found:
        pytest.fail(
            f"libfaketime not found ({LIBFAKETIME}): install Debian's libfaketime "
            "(apt-get install libfaketime; scripts/test.sh does it)"
        )
    return found[0]


def faulthandler_dump(*threads: list[tuple[str, int, str]], ids: int = 0x7F00) -> str:
    """A stack dump as faulthandler writes it: one block per thread (each a list of
    ``(path, line, function)``, innermost frame first)."""
    blocks = []
    for number, frames in enumerate(threads):
        header = "Current thread" if number == 0 else "Thread"
        lines = [f"{header} 0x{ids + number:016x} (most recent call first):"]
        lines += [f'  File "{path}", line {line} in {func}' for path, line, func in frames]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
