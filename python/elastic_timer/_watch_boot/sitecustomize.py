"""elastic-timer's watch bootstrap: ``elastic-timer-run --watch`` puts this directory first
on its workers' ``PYTHONPATH``. It runs any other ``sitecustomize`` on the path, as if this one
were not there, then lets ``elastic_timer.watch`` watch the worker once it imports torch. It
does nothing in any other process (see ``elastic_timer.watch.bootstrap``)."""

import importlib.machinery
import importlib.util
import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _watch() -> None:
    try:
        from elastic_timer.watch import bootstrap
    except ImportError:
        # elastic_timer itself is not importable here: look beside this directory.
        sys.path.append(
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        )
        from elastic_timer.watch import bootstrap
    bootstrap()


try:
    _chain()
finally:
    try:
        # The cheap part of elastic_timer.watch.bootstrap's test first: most processes that
        # inherit this path (tools the script runs) are not workers of a watched job.
        if os.environ.get("ELASTIC_TIMER_WATCH") and os.environ.get("TORCHELASTIC_TIMER_FILE"):
            _watch()
    except Exception as err:  # never stop the worker from starting
        sys.stderr.write(f"elastic-timer watch: not watching this process: {err}\n")
