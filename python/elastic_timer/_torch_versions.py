"""Where torch releases differ in behaviour that elastic-timer keeps: what the installed one does.

torch is not a dependency. Without it, the newest torch's behaviour is kept. The version comes
from the package metadata, so torch is never imported for it.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata

# From this release on, torch's FileTimerServer signals its own process after a reap.
SELF_SIGNAL_SINCE = (2, 7)


def signals_self(torch_version: str | None) -> bool:
    """Whether that torch's ``FileTimerServer`` signals its process after a reap (None: none)."""
    release = re.match(r"(\d+)\.(\d+)", torch_version or "")
    return release is None or (int(release[1]), int(release[2])) >= SELF_SIGNAL_SINCE


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def torch_signals_self() -> bool:
    """``signals_self`` of the installed torch."""
    return signals_self(installed_torch())
