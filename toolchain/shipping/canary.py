"""A canary gated by model metrics: ``edgefleet fleet deploy BUNDLE --canary N --gate drift|confidence|accuracy``.

``MetricGate`` is the ``CanaryCheck`` that ``toolchain.shipping.deploy.deploy`` runs on the canary wave:

1. ``prepare`` (before anything is published): registers the bundle's baseline (and the rollback
   bundle's) in the fleet database, checks that the rollback bundle is above the new version (an agent's
   anti-rollback floor refuses anything else over the air), and measures every canary's last K windows
   on the model it runs now. A canary without such windows, or ``--gate accuracy`` without labelled
   predictions, refuses the rollout before any device is touched.
2. ``judge`` (after the canaries installed): waits until every canary sent K windows on the new model
   (the collector stores them), printing progress, or until ``timeout_s``; decides with
   ``toolchain.shipping.gate.decide``; on a failure or a timeout deploys the rollback bundle to the
   canaries (a real rollout); records the decision with its numbers in ``rollout_events``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.formats.manifest import Manifest, manifest_sha256
from toolchain.errors import ToolchainError
from toolchain.fleet.registry import RegistryError, register_bundle
from toolchain.fleet.rollouts import current_model, measure, record_gate, window_count
from toolchain.fleet.storage import Store, open_store, sqlite_path_exists
from toolchain.shipping.deploy import DeployError, Rollout, deploy
from toolchain.shipping.flash import MqttDest, check_bundle
from toolchain.shipping.gate import GATES, DeviceVerdict, GateDecision, Measure, decide

POLL_S = 1.0  # how often the fleet database is read while waiting for the canaries' windows


@dataclass
class GateOptions:
    """What ``--gate``, ``--gate-windows``, ``--gate-timeout``, ``--rollback-bundle`` and ``--db`` asked for."""

    gate: str
    db_url: str
    windows: int = 3
    timeout_s: float = 600.0
    rollback_bundle: Path | None = None


class MetricGate:
    """The canary check of ``fleet deploy --gate`` (see the module docstring)."""

    def __init__(
        self,
        opts: GateOptions,
        bundle: Path,
        broker: MqttDest,
        *,
        public_key: Path | None = None,
        wave_timeout_s: float = 300.0,
        say: Callable[[str], None] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        if opts.gate not in GATES:
            raise DeployError(f"--gate {opts.gate!r} is not one of {', '.join(GATES)}")
        if opts.windows < 1:
            raise DeployError(f"--gate-windows must be >= 1, got {opts.windows}")
        if not opts.timeout_s > 0:
            raise DeployError(f"--gate-timeout must be > 0 seconds, got {opts.timeout_s}")
        self.opts = opts
        self.bundle = bundle
        self.broker = broker
        self.public_key = public_key
        self.wave_timeout_s = wave_timeout_s
        self.say = say or (lambda s: None)
        self.poll_s = poll_s
        self.manifest: Manifest = check_bundle(bundle, public_key)
        self.sha = manifest_sha256(bundle)
        self.rollback_manifest: Manifest | None = None
        self.before: dict[str, Measure] = {}
        if opts.rollback_bundle is not None:
            rb = check_bundle(opts.rollback_bundle, public_key)
            if rb.version <= self.manifest.version:
                raise DeployError(
                    f"--rollback-bundle {rb.name} v{rb.version} is not above the new v{self.manifest.version}:"
                    " the canaries' anti-rollback floor would refuse it; build the old model again under"
                    f" --version {self.manifest.version + 1} (docs/ota.md, deliberate rollback)"
                )
            if rb.target != self.manifest.target:
                raise DeployError(
                    f"--rollback-bundle is built for {rb.target!r}, the bundle for {self.manifest.target!r}"
                )
            self.rollback_manifest = rb
        self.check_db()

    def _store(self) -> Store:
        if not sqlite_path_exists(self.opts.db_url):
            raise DeployError(
                f"fleet database {self.opts.db_url!r} does not exist; the gate reads the windows"
                " 'edgefleet fleet collect --db URL' stores"
            )
        return open_store(self.opts.db_url)

    def check_db(self) -> None:
        """Refuse a missing SQLite file or an unreachable database before the broker is touched."""
        self._store().close()

    # ---------------------------------------------------------------------------------------------

    def prepare(self, canaries: list[str]) -> None:
        fleet, gate, k = self.broker.fleet, self.opts.gate, self.opts.windows
        with self._store() as store:
            # Registered here so the collector stores the new model's windows packed from the first one.
            for b in [self.bundle, self.opts.rollback_bundle]:
                if b is None:
                    continue
                try:
                    register_bundle(store, b)
                except RegistryError as e:
                    if gate != "accuracy":
                        raise DeployError(f"--gate {gate} compares with the bundle's baseline: {e}") from None
                    self.say(f"gate accuracy: {b} not registered ({e}); its labelled counts are still read")
            for d in canaries:
                cur = current_model(store, fleet, d)
                if cur is None:
                    raise DeployError(
                        f"canary {d!r} is not in the fleet database {self.opts.db_url!r}; the gate needs"
                        " its windows from before the install (is the collector running?)"
                    )
                if cur[0] == self.sha:
                    raise DeployError(
                        f"canary {d!r} already runs {self.manifest.name} v{self.manifest.version}"
                    )
                try:
                    m = measure(store, gate, fleet, d, cur[0], k, newest=True)
                except LookupError as e:
                    raise DeployError(
                        f"--gate {gate} cannot measure canary {d!r} before the install: {e}"
                    ) from None
                if m is None and gate == "accuracy":
                    raise DeployError(
                        f"--gate accuracy needs ground truth: canary {d!r} has no labelled predictions on"
                        " its current model; send labels with POST /v1/feedback or use --gate drift|confidence"
                    )
                if m is None:
                    raise DeployError(
                        f"canary {d!r} has no windows on its current model in {self.opts.db_url!r};"
                        " the gate needs them to compare with"
                    )
                if gate == "drift" and m.state == "insufficient":
                    raise DeployError(
                        f"canary {d!r} sent only {m.count} prediction(s) in its last {m.windows} window(s):"
                        " too few to judge drift before the install; wait for more or raise --gate-windows"
                    )
                self.before[d] = m
        self.say(
            f"gate {gate}: before the install, "
            + ", ".join(f"{d} {_brief(gate, m)}" for d, m in sorted(self.before.items()))
        )

    def _wait(self, store: Store, canaries: list[str]) -> bool:
        """Wait for K windows on the new model from every canary; return True when the time ran out."""
        fleet, k = self.broker.fleet, self.opts.windows
        deadline = time.monotonic() + self.opts.timeout_s
        last = ""
        while True:
            got = {d: window_count(store, fleet, d, self.sha, self.opts.gate == "accuracy") for d in canaries}
            line = ", ".join(f"{d} {min(n, k)}/{k}" for d, n in sorted(got.items()))
            if line != last:
                self.say(f"gate {self.opts.gate}: windows on v{self.manifest.version}: {line}")
                last = line
            if all(n >= k for n in got.values()):
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(self.poll_s)

    def _decide(self, canaries: list[str]) -> GateDecision:
        """Wait for the windows and decide; a database that fails meanwhile fails the gate (safe side)."""
        fleet, gate, k = self.broker.fleet, self.opts.gate, self.opts.windows
        try:
            with self._store() as store:
                timed_out = self._wait(store, canaries)
                after = {d: measure(store, gate, fleet, d, self.sha, k, newest=False) for d in canaries}
        except Exception as e:  # noqa: BLE001 - whatever breaks the reading, the canaries are rolled back
            why = f"cannot read the fleet database ({type(e).__name__}: {e}); failing safe"
            return GateDecision(
                gate, k, "failed", [DeviceVerdict(d, self.before.get(d), None, False, why) for d in canaries]
            )
        if timed_out:
            self.say(
                f"gate {gate}: not every canary sent {k} window(s) within {self.opts.timeout_s:g} s;"
                " failing safe (rollback)"
            )
        return decide(gate, k, {d: (self.before.get(d), after[d]) for d in canaries}, timed_out)

    def judge(self, roll: Rollout, canaries: list[str]) -> str | None:
        gate, k = self.opts.gate, self.opts.windows
        if not canaries:
            return "no canary installed the bundle; the gate has nothing to judge"
        decision = self._decide(canaries)
        doc: dict[str, Any] = decision.to_dict()
        why: str | None = None
        if decision.passed:
            action = "promoted"
            self.say(decision.message + "; promoting")
        else:
            self.say(decision.message)
            action, note, back = self._roll_back(canaries)
            doc["rollback"] = back
            why = f"{decision.message}; {note}"
        roll.gate = {**doc, "action": action}
        try:
            with self._store() as store:
                record_gate(
                    store,
                    fleet=self.broker.fleet,
                    deployment_id=roll.deployment_id,
                    name=roll.name,
                    version=roll.version,
                    sha256=roll.sha256,
                    gate=gate,
                    outcome=decision.outcome,
                    action=action,
                    windows=k,
                    message=decision.message,
                    detail=roll.gate,
                )
        except Exception as e:  # noqa: BLE001 - the rollout's result is printed even when it cannot be stored
            roll.gate["recorded"] = False
            self.say(f"gate {gate}: the decision could not be stored in the fleet database ({e})")
        return why

    def _roll_back(self, canaries: list[str]) -> tuple[str, str, dict[str, Any]]:
        """Deploy the rollback bundle to the canaries; return (action, one-line note, detail)."""
        v = self.manifest.version
        devs = " ".join(f"--device {d}" for d in canaries)
        rb, m = self.opts.rollback_bundle, self.rollback_manifest
        if rb is None or m is None:
            note = (
                f"the canaries keep v{v}: an agent reverts by itself only when an install fails its smoke"
                " inference or health window, and its anti-rollback floor refuses older versions; build the"
                f" old model under --version {v + 1} and run 'edgefleet fleet deploy OLD_BUNDLE {devs}'"
                " (or pass --rollback-bundle)"
            )
            return "kept", note, {"bundle": None, "devices": {}}
        self.say(f"rolling the canaries back to {m.name} v{m.version}: {', '.join(canaries)}")
        try:
            back = deploy(
                rb,
                self.broker,
                devices=canaries,
                canary=0,
                public_key=self.public_key,
                wave_timeout_s=self.wave_timeout_s,
                on_progress=self.say,
            )
        except ToolchainError as e:
            detail = {"bundle": str(rb), "name": m.name, "version": m.version, "error": str(e), "devices": {}}
            return "rollback_failed", f"ROLLBACK to v{m.version} FAILED: {e}", detail
        states = {d: r.state for d, r in back.results.items()}
        detail = {
            "bundle": str(rb),
            "name": m.name,
            "version": m.version,
            "deployment_id": back.deployment_id,
            "devices": states,
        }
        if back.ok:
            return "rolled_back", f"canaries rolled back to v{m.version}", detail
        bad = ", ".join(f"{d} {s}" for d, s in sorted(states.items()) if s != "deployed")
        return "rollback_failed", f"ROLLBACK to v{m.version} FAILED on {bad}", detail


def _brief(gate: str, m: Measure) -> str:
    if gate == "drift":
        return f"{m.state} (max PSI {m.value:.3f}, {m.windows} windows)"
    if m.value is None:
        return f"n/a ({m.windows} windows)"
    return f"{m.value:.3f} ({m.windows} windows)"


__all__ = ["GateDecision", "GateOptions", "MetricGate"]
