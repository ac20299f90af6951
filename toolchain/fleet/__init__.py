"""Fleet telemetry: collect device statistics, store them, and judge drift, skew and decay.

The in-process API (what ``edgefleet fleet ...`` and the demo call)::

    from toolchain.fleet import Collector, register_bundle, drift_table, write_report

    register_bundle("sqlite:///fleet.db", "out/x86")          # baseline keyed by model sha256
    with Collector("sqlite:///fleet.db", "mqtt://127.0.0.1:1883") as c:   # background threads
        c.wait_ready()
        ...                                                      # devices publish
    rows = drift_table("sqlite:///fleet.db", since="1h")         # worst first
    write_report("sqlite:///fleet.db", "report.html")

Modules import lazily, so ``import toolchain.fleet`` costs nothing until a name is used.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Collector",
    "DriftConfig",
    "register_bundle",
    "drift_table",
    "status_rows",
    "write_report",
    "open_store",
]

_WHERE = {
    "Collector": "toolchain.fleet.collector",
    "DriftConfig": "toolchain.fleet.drift",
    "register_bundle": "toolchain.fleet.registry",
    "drift_table": "toolchain.fleet.queries",
    "status_rows": "toolchain.fleet.status",
    "write_report": "toolchain.fleet.report",
    "open_store": "toolchain.fleet.storage",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'toolchain.fleet' has no attribute {name!r}")
