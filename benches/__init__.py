"""Benchmarks of elastic-timer against ``torch.distributed.elastic.timer``: see ``run.py``."""
