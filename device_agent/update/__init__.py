"""Over-the-air updates on the device, in rooms.

``fetch``    HTTP(S) with resume, retained chunks over MQTT, unpacking; the manifest pre-check
``state``    the persisted deployment document, ``TRANSITIONS``, recovery at start-up
``machine``  the ``Updater``: a queue of deployments moved through the states, the smoke inference
``config``   the agent config's ``[update]`` table and the updater an agent builds from its config

The deploy command itself is a shared format: ``device_agent.formats.deploy``. The daemon and the
updater meet through ``UpdaterHost`` (below): the daemon serves bundles, publishes events and the
deployment status, and hands deploy commands over; ``attach_to_daemon`` wires one to the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from device_agent.formats.deploy import CommandError
from device_agent.update.config import parse_update_section, updater_for_agent
from device_agent.update.fetch import UpdateError
from device_agent.update.machine import Updater, smoke_inference
from device_agent.update.state import STATES, UpdaterConfig


class UpdaterHost(Protocol):
    """What the updater needs from the process that serves the model (``device_agent.daemon.Daemon``)."""

    def switch_bundle(self, path: str | Path, *, enforce_floor: bool = True) -> bool:
        """Verify, load and serve a bundle; False when it refused (it says why in an event)."""
        ...

    def served_bundle(self) -> Path:
        """The folder of the bundle served now."""
        ...

    def publish_event(self, event: str, message: str = "", detail: Mapping[str, Any] | None = None) -> None:
        """Send a device event (``deployed``, ``deploy_failed``, ``command_rejected``...)."""
        ...

    def set_deployment_status(self, status: dict[str, Any] | None, *, publish: bool = True) -> None:
        """Show the deployment state in the retained status (None: no deployment); ``publish``: send it now."""
        ...

    def set_command_handler(self, fn: Callable[[str, bytes], None] | None) -> None:
        """Route ``cmd`` messages (topic, payload) to ``fn``."""
        ...


def attach_to_daemon(up: Updater, host: UpdaterHost) -> None:
    """Wire the updater into a started daemon and start its worker.

    Switching goes through ``host.switch_bundle`` (verify, smoke inference, atomic swap); events through
    ``host.publish_event``; the deployment state into the retained status; deploy commands arrive
    through the host's cmd handler. Health during the window: the host still serves the new slot.
    """

    def smoke(bundle_dir: Path) -> None:
        served = host.served_bundle()
        if served != Path(bundle_dir):
            raise UpdateError(f"the agent serves {str(served)!r}, not the new bundle, after the switch")
        smoke_inference(bundle_dir)  # an independent load from the slot on disk, besides the agent's own

    def health() -> bool:
        active = up.store.active_dir()
        return active is not None and host.served_bundle() == active

    def on_command(topic: str, payload: bytes) -> None:
        try:
            up.handle_command(payload)
        except CommandError as e:
            host.publish_event("command_rejected", str(e)[:500], {"topic": topic[:200]})
            raise  # the MQTT layer logs it with the payload cut short and counts it

    # The updater checks the anti-rollback floor itself (and must be able to roll back to the fallback).
    up.switch = lambda bundle_dir: host.switch_bundle(bundle_dir, enforce_floor=False)
    up.smoke = smoke
    up.health = health
    up.emit = lambda event, message, detail: host.publish_event(event, message, detail)
    up.on_state = host.set_deployment_status
    host.set_deployment_status(None if up.status()["state"] == "idle" else up.status(), publish=False)
    host.set_command_handler(on_command)
    up.report_pending()
    up.start()


__all__ = [
    "STATES",
    "CommandError",
    "UpdateError",
    "Updater",
    "UpdaterConfig",
    "UpdaterHost",
    "attach_to_daemon",
    "parse_update_section",
    "updater_for_agent",
]
