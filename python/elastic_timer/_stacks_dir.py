"""The server's side of the stacks directory: making it known to workers.

A server taking stacks names its stacks directory in two ways: in its own environment (the
``stacks_dir`` option's variable), which the workers it starts inherit, and, for the File
server, in the sidecar beside its FIFO (``_native.stacks_sidecar``), which elastic-timer's
``FileTimerClient`` reads when it connects, so that workers started by anything else learn it
too. In the directory it writes the signal workers arm ``faulthandler`` on (``SIGNAL_FILE``);
each worker then writes its stacks to a file of its own there (``stack_dump``).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass

from . import _native

# In the stacks directory: the signal number workers arm faulthandler on.
SIGNAL_FILE = "signal"

# The stacks directories this process's running servers put in the environment, and how many
# servers use each: a server resolving its options later must not take one of them for the
# user's, and the variable goes when the last of them stops.
_announced_dirs: Counter[str] = Counter()

# A file as it was written: device, inode and change time (an inode number freed by its
# removal is soon given to a new file; the change time tells them apart).
FileIdentity = tuple[int, int, int]


def create_new(path: str, mode: int) -> int:
    """A new file at ``path`` opened for writing, never through a link someone left there. A
    file already there (a leftover of an earlier process) is replaced, where this process may
    remove it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, mode)


def _identity(stat: os.stat_result) -> FileIdentity:
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def _replace_file(path: str, text: str) -> FileIdentity:
    """Writes ``path`` anew: a file beside it, renamed over it, so that a reader never sees it
    half written and a link at ``path`` is replaced, not followed. Returns its identity."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with os.fdopen(create_new(temporary, 0o644), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.replace(temporary, path)
            # After the rename, which changes the change time.
            stat = os.fstat(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return _identity(stat)


def from_environment(variable: str) -> str | None:
    """The job-wide stacks directory in ``variable``, unless a server of this process put it
    there."""
    directory = os.environ.get(variable, "")
    return directory if directory and directory not in _announced_dirs else None


@dataclass
class Announcement:
    """What ``announce`` did, for ``withdraw`` to undo."""

    variable: str
    # The directory this server put in the variable (None: the variable was the user's).
    environment: str | None
    # The sidecar beside the FIFO and its identity, removed only if still the same file.
    sidecar: tuple[str, FileIdentity] | None


def announce(
    directory: str, signal: int, fifo: str | None, variable: str, *, user_set: bool
) -> Announcement:
    """Creates ``directory`` if missing, writes ``signal`` in it, and names it beside ``fifo``
    (a File server's) and, unless the user set it (``user_set``), in ``variable``. OSError,
    having named it nowhere, if it cannot."""
    os.makedirs(directory, exist_ok=True)
    _replace_file(os.path.join(directory, SIGNAL_FILE), f"{signal}\n")
    sidecar = None
    if fifo is not None:
        path = os.fspath(_native.stacks_sidecar(fifo))
        sidecar = (path, _replace_file(path, f"{directory}\n"))
    environment = None if user_set else directory
    if environment is not None:
        _announced_dirs[environment] += 1
        os.environ[variable] = environment
    return Announcement(variable, environment, sidecar)


def withdraw(announcement: Announcement) -> None:
    """Undoes ``announce``: the sidecar goes if still this server's, the variable with the
    last server of this process that set it."""
    if announcement.sidecar is not None:
        path, identity = announcement.sidecar
        with contextlib.suppress(OSError):
            if _identity(os.lstat(path)) == identity:  # not another server's since
                os.unlink(path)
    directory = announcement.environment
    if directory is not None:
        _announced_dirs[directory] -= 1
        if _announced_dirs[directory] <= 0:
            del _announced_dirs[directory]
            if os.environ.get(announcement.variable) == directory:
                del os.environ[announcement.variable]


def remove_stale_sidecar(fifo: str) -> None:
    """Removes a sidecar left by a server that died with the FIFO this server replaced: its
    clients would arm for stacks that nobody takes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_native.stacks_sidecar(fifo))
