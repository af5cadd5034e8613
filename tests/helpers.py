"""Helpers the test modules share (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


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
