"""The daemons' own process metrics, on their private registries (the default registry,
which would carry them, is not used: tests build one registry per daemon)."""

from __future__ import annotations

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry


def register_process_metrics(registry: CollectorRegistry) -> None:
    """``process_*`` (RSS, open and max fds, CPU seconds, start time; read from /proc on
    Linux), ``python_info`` and ``python_gc_*``, as the default registry has them. The
    collectors read the process at scrape time and keep no state, so the module's shared
    instances can serve several registries (the unit tests build many)."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
