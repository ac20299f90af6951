"""``edgefleet fleet deploy``: roll a bundle out over MQTT in waves, canaries first.

1. Devices: the ``--device`` list, or every device of ``--fleet`` that has a retained ``online`` status.
   With ``--fleet``, devices whose status names another target are skipped (they would refuse it).
2. The bundle goes out once: as retained chunks on ``edgefleet/<fleet>/bundles/<sha256>/<n>`` or from
   ``--url`` (``edgefleet serve`` or any web server); every device gets the same ``deployment_id``.
3. Wave 1 is the ``canary`` devices. A device counts as done when it reports ``deployed`` (it passed its
   smoke inference and health window) and its retained status shows the new model; ``deploy_failed``
   or no answer within ``wave_timeout_s`` counts as a failure.
4. The next wave starts only while failures stay within ``max_failures``; otherwise the rollout stops
   and the devices not reached keep their model. Retained chunks are removed at the end.
5. With a ``gate`` (``toolchain.shipping.canary``), the canary wave must also pass it: ``prepare`` runs
   before anything is published (it may refuse the rollout), ``judge`` after the canaries installed;
   a reason from ``judge`` stops the rollout like failures do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from device_agent.formats.deploy import HttpSource, MqttSource
from device_agent.formats.manifest import Manifest, manifest_sha256
from device_agent.formats.telemetry import TelemetryError, check_id, decode_status, topic
from toolchain.errors import ToolchainError
from toolchain.shipping.flash import (
    CHUNK_BYTES,
    EventWatch,
    MqttDest,
    check_bundle,
    clear_chunks,
    make_command,
    mqtt_connect,
    publish_checked,
    publish_chunks,
)

DISCOVER_S = 2.0  # how long to collect retained status messages when discovering a fleet
STATUS_SETTLE_S = 10.0  # after 'deployed', how long to wait for the status to show the new model


class DeployError(ToolchainError):
    """A rollout cannot start (no devices, bad bundle, unreachable broker)."""


class CanaryCheck(Protocol):
    """A check of the canary wave beyond a healthy install (a metric gate)."""

    def prepare(self, canaries: list[str]) -> None:
        """Refuse (raise DeployError) before anything is published, or get ready."""

    def judge(self, roll: Rollout, canaries: list[str]) -> str | None:
        """Return None to promote, or why the rollout stops (after undoing what is needed)."""


@dataclass
class DeviceResult:
    """One device's outcome in a rollout."""

    device_id: str
    wave: int | None
    state: str  # deployed | failed | timeout | skipped | not_reached
    reason: str = ""
    version: int | None = None


@dataclass
class Rollout:
    """The outcome of ``deploy``: per-device results and whether the rollout stopped early."""

    deployment_id: str
    name: str
    version: int
    sha256: str
    waves: list[list[str]]
    results: dict[str, DeviceResult] = field(default_factory=dict)
    stopped: bool = False
    stop_reason: str = ""
    gate: dict[str, Any] | None = None

    @property
    def failures(self) -> int:
        return sum(1 for r in self.results.values() if r.state in ("failed", "timeout"))

    @property
    def ok(self) -> bool:
        return not self.stopped and self.failures == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment_id": self.deployment_id,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "waves": self.waves,
            "stopped": self.stopped,
            "stop_reason": self.stop_reason,
            "failures": self.failures,
            "gate": self.gate,
            "devices": {d: r.__dict__ for d, r in sorted(self.results.items())},
        }


def plan_waves(devices: Sequence[str], canary: int, wave_size: int | None = None) -> list[list[str]]:
    """Split devices (kept in the given order) into a canary wave and the rest (in waves of ``wave_size``)."""
    if canary < 0:
        raise DeployError(f"--canary must be >= 0, got {canary}")
    if wave_size is not None and wave_size < 1:
        raise DeployError(f"--wave-size must be >= 1, got {wave_size}")
    devs = list(dict.fromkeys(devices))
    waves: list[list[str]] = []
    if canary:
        waves.append(devs[:canary])
        devs = devs[canary:]
    step = wave_size or max(len(devs), 1)
    waves += [devs[i : i + step] for i in range(0, len(devs), step)]
    return [w for w in waves if w]


class StatusWatch:
    """Keep the latest status of every device of a fleet (retained messages arrive first)."""

    def __init__(self, client: Any, fleet: str) -> None:
        self.latest: dict[str, Any] = {}
        self.cond = threading.Condition()
        client.message_callback_add(f"edgefleet/{fleet}/+/status", self._on_status)
        client.subscribe(f"edgefleet/{fleet}/+/status", qos=1)

    def _on_status(self, client: Any, userdata: Any, msg: Any) -> None:
        if not msg.payload:
            return
        try:
            st = decode_status(bytes(msg.payload))
        except TelemetryError:
            return
        with self.cond:
            self.latest[st.device_id] = st
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
            return True


def deploy(
    bundle: Path,
    broker: MqttDest,
    *,
    devices: Sequence[str] | None = None,
    canary: int = 1,
    wave_size: int | None = None,
    max_failures: int = 0,
    url: str | None = None,
    public_key: Path | None = None,
    wave_timeout_s: float = 300.0,
    chunk_bytes: int = CHUNK_BYTES,
    on_progress: Callable[[str], None] | None = None,
    gate: CanaryCheck | None = None,
) -> Rollout:
    """Roll ``bundle`` out to ``devices`` (or the whole fleet) in waves; see the module docstring."""
    say = on_progress or (lambda s: None)
    m: Manifest = check_bundle(bundle, public_key)
    sha = manifest_sha256(bundle)
    if max_failures < 0:
        raise DeployError(f"--max-failures must be >= 0, got {max_failures}")
    if devices is not None:
        try:
            devices = [check_id(d, "--device") for d in devices]
        except TelemetryError as e:
            raise DeployError(str(e)) from None
    client = mqtt_connect(broker)
    src: HttpSource | MqttSource | None = None
    try:
        statuses = StatusWatch(client, broker.fleet)
        skipped: dict[str, str] = {}
        if devices is None:
            statuses.wait_for(lambda: False, DISCOVER_S)  # collect the retained statuses
            with statuses.cond:
                known = dict(statuses.latest)
            devices = []
            for d, st in sorted(known.items()):
                if st.state != "online":
                    skipped[d] = "offline"
                elif st.target and st.target != m.target:
                    skipped[d] = f"device target {st.target!r}, bundle target {m.target!r}"
                else:
                    devices.append(d)
            if not devices:
                raise DeployError(
                    f"no online device of fleet {broker.fleet!r} can take a {m.target!r} bundle"
                    f" ({len(known)} known); name devices with --device or check 'edgefleet fleet status'"
                )
        if not devices:
            raise DeployError("no device to deploy to; pass --device ID (repeatable) or --fleet NAME")
        waves = plan_waves(devices, canary, wave_size)
        if gate is not None:
            if not canary:
                raise DeployError("a canary gate needs canaries: pass --canary N (N >= 1)")
            gate.prepare(waves[0])
        if url:
            src = HttpSource(url if url.endswith("/") else url + "/")
        else:
            say(f"publishing {m.name} v{m.version} as retained chunks")
            src = publish_chunks(client, broker.fleet, bundle, chunk_bytes)
        cmd = make_command(bundle, m, src)
        roll = Rollout(cmd.deployment_id, m.name, m.version, sha, waves)
        for d, why in skipped.items():
            roll.results[d] = DeviceResult(d, None, "skipped", why)
        watch = EventWatch(client, broker.fleet, cmd.deployment_id)
        payload = cmd.encode()
        for i, wave in enumerate(waves, start=1):
            kind = "canary" if canary and i == 1 else "wave"
            say(f"{kind} {i}/{len(waves)}: {', '.join(wave)}")
            for d in wave:
                publish_checked(client, topic(broker.fleet, d, "cmd"), payload)
            budget = max_failures - roll.failures

            def too_many(got: dict[str, Any], _budget: int = budget) -> bool:
                return sum(1 for ev, _ in got.values() if ev == "deploy_failed") > _budget

            got = watch.wait(wave, wave_timeout_s, stop=too_many)
            for d in wave:
                if d not in got:
                    roll.results[d] = DeviceResult(d, i, "timeout", f"no answer within {wave_timeout_s:g} s")
                    continue
                ev, detail = got[d]
                if ev == "deploy_failed":
                    roll.results[d] = DeviceResult(
                        d, i, "failed", str(detail.get("reason") or detail.get("message"))
                    )
                    continue

                def shows_new(_d: str = d) -> bool:
                    st = statuses.latest.get(_d)
                    return bool(st and st.state == "online" and st.model and st.model.sha256 == sha)

                if statuses.wait_for(shows_new, STATUS_SETTLE_S):
                    roll.results[d] = DeviceResult(d, i, "deployed", "", m.version)
                else:
                    roll.results[d] = DeviceResult(
                        d, i, "failed", "reported deployed but its status does not show the new model"
                    )
            if roll.failures > max_failures:
                roll.stopped = True
                roll.stop_reason = (
                    f"{roll.failures} failure(s) in {kind} {i} exceed --max-failures {max_failures};"
                    " the remaining devices were not touched"
                )
                for later in waves[i:]:
                    for d in later:
                        roll.results[d] = DeviceResult(d, None, "not_reached", "rollout stopped")
                break
            if gate is not None and i == 1:
                verdict = gate.judge(roll, [d for d in wave if roll.results[d].state == "deployed"])
                if verdict:
                    roll.stopped = True
                    roll.stop_reason = verdict
                    for later in waves[1:]:
                        for d in later:
                            roll.results[d] = DeviceResult(d, None, "not_reached", "canary gate failed")
                    break
        return roll
    finally:
        if isinstance(src, MqttSource):
            try:
                clear_chunks(client, src)
            except Exception:  # noqa: BLE001 - cleanup of retained chunks is best effort
                pass
        client.loop_stop()
        client.disconnect()
