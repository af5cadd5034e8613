"""Makes ``torch.distributed.elastic.timer`` and its submodules elastic-timer's, in every
process that has this directory on its ``PYTHONPATH`` (workers started by ``spawn`` too), so
that torch's own tests of the module run unchanged against ours."""

import importlib
import sys

_SUBMODULES = ("api", "debug_info_logging", "file_based_local_timer", "local_timer")


def _alias() -> None:
    package = "torch.distributed.elastic.timer"
    parent = importlib.import_module("torch.distributed.elastic")
    ours = importlib.import_module("elastic_timer")
    sys.modules[package] = ours
    parent.timer = ours  # type: ignore[attr-defined]
    for name in _SUBMODULES:
        sys.modules[f"{package}.{name}"] = importlib.import_module(f"elastic_timer.{name}")


_alias()
