"""Workers that survive SIGKILL, the way they do on clusters: stuck on a hung filesystem.

A minimal FUSE server, served by a thread of this process straight on ``/dev/fuse`` (no
libfuse, no dependency), mounts a directory whose one name, ``hung``, never answers a lookup.
A process that stats it waits for the reply. Once the server has read the request, a SIGKILL
cannot end that wait (fs/fuse/dev.c, ``request_wait_answer``: a fatal signal only ends a
request the daemon has not taken yet; one in userspace is waited out uninterruptibly), so the
killed process stays in state D, as it would on a hung NFS or FUSE mount. Answering the
request releases it: the stat returns and the pending SIGKILL lands.

cgroup v2's ``cgroup.freeze`` cannot stand in for this: it lets fatal signals through.
Needs root (mount(2)) and ``/dev/fuse``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from helpers import wait_for

HUNG_NAME = b"hung"

# The worker says it is about to stat, then stats and blocks.
WORKER = "import os, sys; print('stat', flush=True); os.stat(sys.argv[1])"

# include/uapi/linux/fuse.h
FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_INIT = 1, 2, 3, 26
FUSE_INTERRUPT, FUSE_BATCH_FORGET = 36, 42
FUSE_ROOT_ID = 1
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<II")  # major, minor (the rest: features we do not ask for)
INIT_OUT_SIZE = 64  # fuse_init_out; the kernel takes it shorter or whole, zeros ask for nothing
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr: ino, size, blocks,
# atime, mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags.
ATTR_OUT = struct.Struct("<QII" + "QQQQQQ" + "IIIIIIIIII")
# The kernel refuses reads into buffers smaller than what a request may take.
READ_SIZE = 1 << 17

MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)} (this needs root and /dev/fuse)")


class HungFilesystem:
    """The server of a FUSE filesystem whose ``hung`` entry never answers until ``release``."""

    def __init__(self, device: int, mountpoint: Path) -> None:
        self.hung_path = mountpoint / HUNG_NAME.decode()
        self._device = device
        self._held: dict[int, int] = {}  # unique id of each unanswered lookup -> its caller
        self._lock = threading.Lock()
        self.initialised = threading.Event()
        # select() on the device and this pipe: a write to it stops the serving thread, which
        # a read blocked on the device would never notice.
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="hung-fuse", daemon=True)
        self._thread.start()

    def start_worker(
        self, started: Callable[[subprocess.Popen[bytes]], object]
    ) -> subprocess.Popen[bytes]:
        """Starts a process that stats ``hung_path`` and returns once the server holds its
        lookup: from then on, SIGKILL leaves it in state D until ``release`` (before the kill
        it sleeps interruptibly, in state S). ``started`` is given the process first, to clean
        it up even if it never gets that far."""
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(self.hung_path)], stdout=subprocess.PIPE
        )
        started(worker)
        assert worker.stdout is not None
        assert worker.stdout.readline() == b"stat\n"
        assert wait_for(lambda: self._holds(worker.pid)), "the worker's lookup never came"
        return worker

    def release(self) -> None:
        """Answers every held lookup (with ENOENT): their waits end and pending kills land."""
        with self._lock:
            held, self._held = self._held, {}
        for unique in held:
            self._reply(unique, -errno.ENOENT)

    def stop(self) -> None:
        """Stops the serving thread (after which nothing answers: release first)."""
        os.write(self._stop_write, b"x")
        self._thread.join(10)
        os.close(self._stop_read)
        os.close(self._stop_write)

    def _holds(self, pid: int) -> bool:
        with self._lock:
            return pid in self._held.values()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._device, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            try:
                request = os.read(self._device, READ_SIZE)
            except OSError as error:
                # EAGAIN: nothing after all; ENOENT: the request was interrupted before we
                # read it; ENODEV: the connection is gone (unmounted or aborted).
                if error.errno in (errno.EAGAIN, errno.EINTR, errno.ENOENT):
                    continue
                if error.errno == errno.ENODEV:
                    return
                raise
            self._answer(request)

    def _answer(self, request: bytes) -> None:
        _, opcode, unique, nodeid, _, _, pid, _, _ = IN_HEADER.unpack_from(request)
        body = request[IN_HEADER.size :]
        if opcode == FUSE_INIT:
            major, minor = INIT_IN.unpack_from(body)
            assert major == 7, f"FUSE protocol {major}.{minor}: this speaks 7.x"
            # Its own minor version back, with no flag: the kernel's defaults, no feature.
            self._reply(unique, 0, struct.pack("<II", major, minor).ljust(INIT_OUT_SIZE, b"\0"))
            self.initialised.set()
        elif opcode == FUSE_GETATTR and nodeid == FUSE_ROOT_ID:
            # An empty directory owned by root (anyone looking at the mount sees just that).
            root = ATTR_OUT.pack(
                1, 0, 0, FUSE_ROOT_ID, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 0, 0
            )
            self._reply(unique, 0, root)
        elif opcode == FUSE_LOOKUP and body.rstrip(b"\0") == HUNG_NAME:
            with self._lock:
                self._held[unique] = pid  # read and never answered: the hang
        elif opcode == FUSE_LOOKUP:
            self._reply(unique, -errno.ENOENT)
        elif opcode in (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT):
            # No reply expected. An INTERRUPT (the kernel's news of the SIGKILL) is ignored:
            # the held lookup stays unanswered.
            pass
        else:
            self._reply(unique, -errno.ENOSYS)

    def _reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        os.write(
            self._device, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload
        )


@contextmanager
def hung_filesystem(mountpoint: Path) -> Iterator[HungFilesystem]:
    """Mounts a ``HungFilesystem`` at ``mountpoint`` (created); after, also when the body
    fails: releases what it holds, stops serving, unmounts and closes the device."""
    assert os.path.exists("/dev/fuse"), "a worker that survives SIGKILL needs /dev/fuse (and root)"
    mountpoint.mkdir()
    with ExitStack() as undo:  # each step's undoing, run in reverse order
        device = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK)
        # Closing the last descriptor of the device aborts the connection: whatever would
        # still wait on it (nothing, after the release) fails with ENOTCONN, never hangs.
        undo.callback(os.close, device)
        options = f"fd={device},rootmode=40000,user_id=0,group_id=0".encode()
        flags = MS_NOSUID | MS_NODEV
        _check(_libc.mount(b"et-fuse", bytes(mountpoint), b"fuse", flags, options), "mount")
        undo.callback(lambda: _check(_libc.umount2(bytes(mountpoint), MNT_DETACH), "umount"))
        filesystem = HungFilesystem(device, mountpoint)
        undo.callback(filesystem.stop)
        undo.callback(filesystem.release)
        # Requests sent before INIT is answered wait killably: hang nothing before it is.
        assert filesystem.initialised.wait(10), "the kernel sent no FUSE_INIT"
        yield filesystem
