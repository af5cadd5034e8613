"""The worker's side of stack dumps: ``faulthandler``, armed once per process.

A server taking stacks names its stacks directory to its workers (``_stacks_dir``).
elastic-timer's clients then call ``arm_stack_dump``, which arms ``faulthandler`` on the
server's signal to write every thread's stack to the file the server reads for this process
(``_native.stacks_file``). Workers whose client is torch's are dumped with ``py-spy``
instead, when the server has it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
from typing import IO

from . import _native
from ._stacks_dir import SIGNAL_FILE, create_new
from .options import env, parse_signal

__all__ = ["arm_stack_dump"]

logger = logging.getLogger(__name__)

# The most of the signal file read: a signal number and a newline.
_MAX_SIGNAL_BYTES = 16

# This process's arming: (pid, stacks directory, signal, the file faulthandler writes to).
_armed: tuple[int, str, int, IO[str]] | None = None
# The directory this process last failed to arm in, as (pid, directory): warned about once.
_failed: tuple[int, str] | None = None


def arm_stack_dump(directory: str | None = None) -> bool:
    """
    Lets a server taking stacks get this process's: arms ``faulthandler`` on the server's
    signal, to write every thread's stack to a file of this process's in the server's stacks
    directory: ``directory`` (the one a server named when this process's ``FileTimerClient``
    connected to it), else ``ELASTIC_TIMER_STACKS_DIR``. Done once per process and directory
    (and again in a forked child, which gets a file of its own); elastic-timer's clients call
    it. A directory it cannot arm in is a warning, once. Returns whether it is armed.
    """
    global _armed, _failed
    pid = os.getpid()
    if _armed is not None and _armed[0] == pid and directory in (None, _armed[1]):
        return True
    if directory is None:
        directory = os.environ.get(env("stacks_dir"))
        if not directory:
            return False
    if _failed == (pid, directory):
        return False
    try:
        signum = _read_stack_signal(directory)
        path = _native.stacks_file(directory)
        file = os.fdopen(create_new(os.fspath(path), 0o666), "w", encoding="utf-8")
        # faulthandler keeps the file open.
        faulthandler.register(signum, file=file, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError) as err:
        _failed = (pid, directory)
        logger.warning(
            "Cannot arm stack dumps in %s, the timer server's stacks directory, so this "
            "process's stacks will not be logged if its timer expires: %s",
            directory,
            err,
        )
        return False
    previous, _armed = _armed, (pid, directory, signum, file)
    if previous is not None:
        # Armed before (by the parent of this fork, or for an earlier server): let go of it.
        if previous[2] != signum:
            faulthandler.unregister(previous[2])
        previous[3].close()
    return True


def _read_stack_signal(directory: str) -> int:
    """The signal a server named in its stacks directory. The directory may be writable by
    others: the file must be private to this process's user or root, and what it holds is
    never shown (it could be a link to a secret)."""
    path = os.path.join(directory, SIGNAL_FILE)
    try:
        data = _native.read_private_file(path, _MAX_SIGNAL_BYTES)
    except _native.UnsafeFile as e:
        raise OSError(f"{path} is refused: {e}") from None
    try:
        return parse_signal(data.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is one
        raise ValueError(f"{path} does not hold a signal number") from None


def _rearm_in_child() -> None:
    # The parent's registration writes to the parent's file: give the child its own.
    if _armed is not None:
        arm_stack_dump(_armed[1])


os.register_at_fork(after_in_child=_rearm_in_child)
