"""A serving process stand-in for updater tests: loads bundles with the real runtime (Predictor)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, manifest_sha256, verify_bundle
from device_agent.inference import Predictor
from device_agent.update import Updater, UpdaterConfig


class Serving:
    """Holds the model being served; ``switch`` verifies and loads a bundle like the agent does."""

    def __init__(self, policy: VerifyPolicy | None = None, refuse: bool = False) -> None:
        self.policy = policy
        self.refuse = refuse
        self.predictor: Predictor | None = None
        self.bundle_dir: Path | None = None
        self.sha256: str | None = None
        self.switches: list[Path] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.states: list[str] = []
        self.lock = threading.Lock()

    def load(self, bundle_dir: Path) -> None:
        verify_bundle(
            bundle_dir,
            VerifyPolicy(trusted_keys=self.policy.trusted_keys if self.policy else (), allow_unsigned=True),
        )
        pred = Predictor(bundle_dir)
        with self.lock:
            self.predictor, self.bundle_dir, self.sha256 = pred, bundle_dir, manifest_sha256(bundle_dir)

    def switch(self, bundle_dir: Path) -> bool:
        self.switches.append(bundle_dir)
        if self.refuse and self.switches and len(self.switches) == 1:
            return False
        self.load(bundle_dir)
        return True

    def emit(self, event: str, message: str, detail: Any) -> None:
        self.events.append((event, message, dict(detail)))

    def on_state(self, status: dict[str, Any]) -> None:
        self.states.append(str(status["state"]))

    def predict_ok(self, x: np.ndarray) -> np.ndarray:
        assert self.predictor is not None
        return self.predictor.predict(x)

    @property
    def version(self) -> int | None:
        return self.predictor.manifest.version if self.predictor else None


def make_updater(
    state_dir: Path, serving: Serving, policy: VerifyPolicy, fallback: Path | None = None, **config: Any
) -> Updater:
    """Build an Updater wired to ``serving`` and load what it says to serve."""
    health = config.pop("health", lambda: True)
    smoke = config.pop("smoke", None)
    cfg = UpdaterConfig(
        state_dir=state_dir,
        policy=policy,
        fallback_bundle=fallback,
        health_window_s=config.pop("health_window_s", 0.2),
        health_poll_s=0.05,
        **config,
    )
    extra = {"smoke": smoke} if smoke is not None else {}
    up = Updater(
        cfg, switch=serving.switch, emit=serving.emit, on_state=serving.on_state, health=health, **extra
    )
    up.recover()
    d = up.serving_dir()
    if d is not None:
        serving.load(d)
    return up


def signed_updater(
    state_dir: Path, ota_keys: dict[str, Path], make_version: Any, **config: Any
) -> tuple[Updater, Serving]:
    """An x86 updater trusting the test key, falling back to a signed v1; and what it serves."""
    pol = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target="x86")
    serving = Serving(pol)
    return make_updater(state_dir, serving, pol, fallback=make_version(1), **config), serving
