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
timer`` and nothing else changes; the documentation lists the intended differences.

The modules (each one's own docstring says more; this list is the one the documentation site
shows). These four mirror torch's:

- ``api``: the abstract classes (``TimerRequest``, ``TimerClient``, ``RequestQueue``,
  ``TimerServer``, with torch's Python watchdog loop for custom subclasses), ``configure``
  and ``expires``.
- ``local_timer``: timers over a ``multiprocessing.Queue`` (``LocalTimerClient``,
  ``LocalTimerServer``).
- ``file_based_local_timer``: timers over a named FIFO (``FileTimerClient``,
  ``FileTimerServer``).
- ``debug_info_logging``: logs which timers expired, as torch's does.

The rest:

- ``_native``: the Rust core (the deadlines, the transports, the reaping), compiled.
- ``_request``: the timer request and the abstract client, below ``api``.
- ``_server``: what the two servers share: the native server and the thread that reports its
  events (logging, ``log_event``, an overridden ``_reap_worker``).
- ``options``: the one table of the servers' opt-in options (keyword, ``ELASTIC_TIMER_*``
  variable, ``serve`` flag, parser, default, help) and their resolution; the docs' options
  page is generated from it.
- ``events``: the event sink (JSON lines to the event log, a callback).
- ``_stacks_dir``: how a server names its stacks directory to its workers (the variable, the
  FIFO's sidecar).
- ``stack_dump``: a worker's side of the stack dumps (``faulthandler`` armed on the server's
  signal, on the file the server reads).
- ``hang_report``: one hang report for a whole torchrun job, gathered through its rendezvous
  store.
- ``report_view``: ``elastic-timer report``: a hang report from the event log, for a
  terminal or as one self-contained web page.
- ``learned``: the learned-timeouts state file, read by the server's own reader (for
  ``elastic-timer timeouts``).
- ``metrics``: the servers' counters in Prometheus text, and served over HTTP.
- ``torch``: ``install()``, which makes torch's elastic agent (and ft_launcher's) use our
  ``FileTimerServer``.
- ``watch``: watching an unmodified training script's progress through hooks torch offers.
- ``_watch_boot``: the ``sitecustomize`` that ``--watch`` puts on the workers' path.
- ``run``: ``elastic-timer-run``, torchrun (or ft_launcher) with our server.
- ``cli``: ``elastic-timer serve`` (a standalone server), ``elastic-timer timeouts`` and
  ``elastic-timer report``.
- ``_torch_versions``: what the installed torch does where its releases differ.
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
