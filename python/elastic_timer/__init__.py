"""
Expiration timers that kill stuck workers: a drop-in, native backend for
``torch.distributed.elastic.timer``.

A timer server runs on the host, in the process that starts the workers (the agent). A worker
wraps code that may hang in ``expires``; if the block has not finished by the deadline, the
server reaps the worker (signals it), and the agent restarts the worker group::

    import multiprocessing as mp
    import elastic_timer as timer

    def main():
        mp_queue = mp.get_context("spawn").Queue()
        server = timer.LocalTimerServer(mp_queue, max_interval=0.01)
        server.start()  # non-blocking
        ...  # start the workers with mp_queue as an argument

    def trainer_func(mp_queue):
        timer.configure(timer.LocalTimerClient(mp_queue))
        with timer.expires(after=60):  # 60 second expiry
            ...  # do some work

Replace ``import torch.distributed.elastic.timer as timer`` by ``import elastic_timer as
timer`` and nothing else changes; the README lists the intended differences.
"""

from ._native import __version__
from .api import RequestQueue, TimerClient, TimerRequest, TimerServer, configure, expires
from .file_based_local_timer import FileTimerClient, FileTimerRequest, FileTimerServer
from .local_timer import LocalTimerClient, LocalTimerServer, MultiprocessingRequestQueue

__all__ = [
    "FileTimerClient",
    "FileTimerRequest",
    "FileTimerServer",
    "LocalTimerClient",
    "LocalTimerServer",
    "MultiprocessingRequestQueue",
    "RequestQueue",
    "TimerClient",
    "TimerRequest",
    "TimerServer",
    "__version__",
    "configure",
    "expires",
]
