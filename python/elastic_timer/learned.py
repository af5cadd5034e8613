"""The state file of learned timeouts, read for ``elastic-timer timeouts``.

The server (``rust/learned.rs``, whose module documentation defines the format) writes it;
this reads version 1 of that format and nothing else. Only the figures a report shows are
read: the histogram behind the quantiles stays the server's business.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from . import _native

__all__ = [
    "MAX_STATE_BYTES",
    "STATE_FORMAT",
    "STATE_VERSION",
    "ScopeFigures",
    "StateFileError",
    "read_state",
]

STATE_FORMAT = "elastic-timer learned timeouts"
STATE_VERSION = 1
# A state file is input: anything larger is refused unread (the same bound as the server's).
MAX_STATE_BYTES = 64 << 20


class StateFileError(Exception):
    """A state file that cannot be read, or is not one; the message is one line."""


@dataclass(frozen=True)
class ScopeFigures:
    """One scope's figures; durations in seconds, None where there is none."""

    scope: str
    samples: int
    p50: float | None
    p99: float | None
    max: float | None
    after: float | None
    suggested: float | None


DURATIONS = ("p50", "p99", "max", "after", "suggested")


def read_state(path: str) -> list[ScopeFigures]:
    """The scopes of the state file at ``path``, in the file's order."""
    try:
        # The server's own rule (rust/learned.rs): a file private to this user or root.
        data = _native.read_private_file(path, MAX_STATE_BYTES)
    except OSError as e:
        raise StateFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
    try:
        state = json.loads(data)
    except ValueError as e:  # UnicodeDecodeError is one
        raise StateFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StateFileError(f"{path} is not an elastic-timer state file")
    version = state.get("version")
    if type(version) is not int or version != STATE_VERSION:
        raise StateFileError(
            f"{path} has format version {json.dumps(version)}, and this elastic-timer reads "
            f"version {STATE_VERSION}"
        )
    scopes = state.get("scopes")
    if not isinstance(scopes, list):
        raise StateFileError(f"{path} is corrupt: no list of scopes")
    try:
        return [_figures(record) for record in scopes]
    except ValueError as e:
        raise StateFileError(f"{path} is corrupt: {e}") from None


def _figures(record: Any) -> ScopeFigures:
    if not isinstance(record, dict) or not isinstance(record.get("scope"), str):
        raise ValueError(f"a scope without a name: {_shown(record)}")
    scope = record["scope"]
    samples = record.get("samples")
    if type(samples) is not int or samples < 0:
        raise ValueError(f"scope {scope!r}: samples is {_shown(samples)}")
    durations = {key: _seconds(scope, key, record.get(key)) for key in DURATIONS}
    return ScopeFigures(scope=scope, samples=samples, **durations)


def _seconds(scope: str, key: str, value: object) -> float | None:
    if value is None:
        return None
    # A bool is an int, and Python's json reads NaN and Infinity.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"scope {scope!r}: {key} is {_shown(value)}, not seconds")
    return float(value)


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
