"""The state file of learned timeouts, read for ``elastic-timer timeouts``.

The server's core owns the file: its format (documented in ``rust/learned/state.rs``), and
its one reader, the one the server loads it with, rules for a file someone else may have put
there included. This module names that reader and what it gives for the CLI.
"""

from __future__ import annotations

from ._native import MAX_STATE_BYTES, STATE_FORMAT, STATE_VERSION, StateFileError
from ._native import ScopeTimeout as ScopeFigures
from ._native import read_state_file as read_state

__all__ = [
    "MAX_STATE_BYTES",
    "STATE_FORMAT",
    "STATE_VERSION",
    "ScopeFigures",
    "StateFileError",
    "read_state",
]
