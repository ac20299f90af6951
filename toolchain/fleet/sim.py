"""A simulated fleet for tests, benchmarks and load trials: windows, bundles and an MQTT publisher.

Nothing here is used by the collector itself. ``SoftmaxDigits`` is a tiny numpy classifier for the
shipped digits data, so drift tests have model outputs without TensorFlow; tests with the real
bundles use ``device_agent.inference.Predictor`` instead.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import (
    DType,
    Manifest,
    ModelEntry,
    ModelFormat,
    RuntimeName,
    TensorSpec,
    file_entry,
    manifest_sha256,
)
from device_agent.stats import Profile, ProfileSpec, baseline_to_dict, build_baseline
from device_agent.telemetry import ModelRef, encode_stats, encode_status, topic

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data"


def load_digits() -> dict[str, np.ndarray]:
    """Return the shipped digits split: x, y (train) and x_test, y_test; x is (n, 8, 8, 1) in 0..16."""
    tr = np.load(DIGITS / "digits.npz")
    te = np.load(DIGITS / "digits_test.npz")
    return {
        "x": tr["x"].astype(np.float64),
        "y": tr["y"],
        "x_test": te["x"].astype(np.float64),
        "y_test": te["y"],
    }


class SoftmaxDigits:
    """Multinomial logistic regression on the 64 pixels (full-batch gradient descent, fixed steps)."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 0.5, l2: float = 1e-3
    ) -> None:
        xf = x.reshape(len(x), -1) / 16.0
        k = int(y.max()) + 1
        self.w = np.zeros((xf.shape[1], k))
        self.b = np.zeros(k)
        onehot = np.eye(k)[y]
        for _ in range(steps):
            g = self.predict(x) - onehot
            self.w -= lr * (xf.T @ g / len(xf) + l2 * self.w)
            self.b -= lr * g.mean(axis=0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return class probabilities (n, 10) for inputs (n, 8, 8, 1)."""
        z = x.reshape(len(x), -1) / 16.0 @ self.w + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def digits_baseline(model: Any | None = None) -> tuple[Profile, Any]:
    """Return (baseline profile over the digits training split, model with ``predict``)."""
    d = load_digits()
    model = model or SoftmaxDigits(d["x"], d["y"])
    labels = [str(i) for i in range(10)]
    return build_baseline(d["x"], model.predict(d["x"]), labels), model


def write_bundle(
    root: Path,
    baseline: Profile,
    name: str = "digits",
    version: int = 1,
    target: str = "x86",
    model_bytes: bytes | None = None,
) -> tuple[Path, str]:
    """Write a bundle folder holding ``baseline`` (and a placeholder model file); return (path, model sha256).

    The placeholder model is enough for registration, which reads only the manifest and baseline.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "baseline.json").write_text(json.dumps(baseline_to_dict(baseline, {"data": "digits"})))
    (root / "model.onnx").write_bytes(model_bytes or f"placeholder {name} v{version}".encode())
    (root / "labels.txt").write_text("\n".join(baseline.spec.labels) + "\n")
    shape = [1, *baseline.spec.features.input_shape]
    manifest = Manifest(
        name=name,
        version=version,
        target=target,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        files=[file_entry(root, p) for p in ("model.onnx", "baseline.json", "labels.txt")],
        model=ModelEntry("model.onnx", ModelFormat.ONNX, (RuntimeName.ONNXRUNTIME,)),
        inputs=[TensorSpec("input", tuple(shape), DType.FLOAT32)],
        outputs=[TensorSpec("output", (1, len(baseline.spec.labels)), DType.FLOAT32)],
        labels=list(baseline.spec.labels),
    )
    (root / "manifest.json").write_bytes(manifest.to_bytes())
    return root, manifest_sha256(root)


def window_profile(
    spec: ProfileSpec, x: np.ndarray, probs: np.ndarray, violations: dict[str, int] | None = None
) -> Profile:
    """Profile one window of inputs (n, *shape) and output scores (n, K)."""
    p = spec.new_profile()
    p.update_inputs(x)
    p.update_outputs(probs)
    p.update_latency(np.full(len(x), 0.4))
    for k, v in (violations or {}).items():
        p.add_violation(k, v)
    return p


def stats_payload(
    device: str,
    seq: int,
    model: ModelRef,
    profile: Profile,
    fleet: str = "lab",
    t0: float | None = None,
    window_s: float = 60.0,
    dropped: int = 0,
    stream: str | None = None,
) -> tuple[str, bytes]:
    """Return (topic, payload) of one stats window ending ``seq`` windows after ``t0``.

    ``stream`` defaults to one fixed id per device (``sim_stream``): a simulated device never loses
    its state unless a test gives it a new stream.
    """
    t0 = time.time() - 3600 if t0 is None else t0
    start = t0 + seq * window_s
    raw = encode_stats(
        device_id=device,
        fleet=fleet,
        seq=seq,
        window_start=start,
        window_end=start + window_s,
        model=model,
        profile=profile,
        dropped_windows=dropped,
        agent_version="sim-1",
        stream=sim_stream(device) if stream is None else stream,
    )
    return topic(fleet, device, "stats"), raw


def sim_stream(device: str) -> str:
    """Return the fixed stream id of a simulated device (16 hex digits)."""
    return hashlib.sha256(device.encode()).hexdigest()[:16]


def status_payload(
    device: str,
    model: ModelRef | None,
    state: str = "online",
    fleet: str = "lab",
    deployment: dict[str, Any] | None = None,
    ts: float | None = None,
) -> tuple[str, bytes]:
    """Return (topic, payload) of a device status message."""
    raw = encode_status(
        device_id=device,
        fleet=fleet,
        state=state,
        ts=time.time() if ts is None else ts,
        model=model,
        agent_version="sim-1",
        target="x86",
        deployment=deployment,
    )
    return topic(fleet, device, "status"), raw


class Publisher:
    """A paho MQTT 5 publisher that can wait until the broker acknowledged every QoS 1 message."""

    def __init__(
        self, broker_url: str, client_id: str = "", max_inflight: int = 200, protocol: str = "5"
    ) -> None:
        from toolchain.fleet.collector import parse_broker_url

        addr = parse_broker_url(broker_url)
        self.client = _mqtt_client(client_id, protocol, max_inflight)
        self._acked = 0
        self._sent = 0
        self._cv = threading.Condition()
        self.client.on_publish = self._on_publish
        self.client.connect(addr.host, addr.port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cv:
            self._acked += 1
            self._cv.notify_all()

    def publish(self, topic_name: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic_name, payload, qos=qos, retain=retain)
        with self._cv:
            self._sent += 1

    def publish_all(self, messages: Iterable[tuple[str, bytes]], qos: int = 1) -> int:
        n = 0
        for t, p in messages:
            self.publish(t, p, qos)
            n += 1
        return n

    def wait_acked(self, timeout_s: float = 60.0) -> bool:
        """Block until every QoS 1 message published so far was acknowledged by the broker."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._acked < self._sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _mqtt_client(client_id: str, protocol: str, max_inflight: int) -> Any:
    """A paho client for the simulator: MQTT ``protocol`` ("5" or "3.1.1"), no auth, no TLS.

    Up to ``max_inflight`` QoS 1 messages unacknowledged at a time; the rest wait in paho's queue,
    which has no limit (``max_queued_messages_set(0)``), so no message of a simulation is dropped.
    """
    import paho.mqtt.client as mqtt

    proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    return client
