"""edgefleet's device side: run model bundles offline and ship their statistics (numpy + one runtime).

``import device_agent`` stays light: ``Agent`` (the Python API) is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_agent.agent import Agent

__all__ = ["Agent"]


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from device_agent.agent import Agent

        return Agent
    raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
