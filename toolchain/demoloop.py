"""``edgefleet demo --loop``: after the drift alert, close the loop on ``pi-shifted``.

Runs inside the demo's broker, collector and agents (``toolchain.demo.run_demo`` calls ``run_loop``
before it stops them), through the code paths of the real commands:

1. wait for the collector's retained alert command to reach ``pi-shifted`` (its ``[capture]`` has
   ``sample_rate = 0``, ``on_alert_rate = 1.0``: it captures because of the alert);
2. measure its accuracy on half of the shifted held-out digits (the *evaluation* half, a seeded split),
   through the agent;
3. send the other half (the *capture* half) through its HTTP API (``POST /v1/predict``, which returns
   prediction ids) ``CAPTURE_PASSES`` times, each pass with fresh sensor noise (the device keeps seeing
   digits like these), and label them through ``POST /v1/feedback`` with the held-out labels, standing
   in for a person. The evaluation half is never captured, so the accuracy after is not on trained data;
4. wait for the collector to store the samples and labels, export them (``fleet samples export``);
5. fine-tune the deployed model (``train --init-from``: OLD = the demo's training digits, NEW = the
   export), build v2 for raspberry-pi (signed, calibrated on OLD as v1 was, so the drift baseline stays
   comparable, as docs/cli.md recommends) and the old model again as v3 (the rollback bundle: an agent
   refuses older versions);
6. ``fleet deploy v2 --canary 1 --gate drift --rollback-bundle v3`` to pi-shifted then pi-clean. The
   gate compares the canary's last ``GATE_WINDOWS`` windows before the install with its first ones
   after; both are fed the same shifted digits in the same order (before: explicitly; after: a feeder
   thread that starts when the canary serves v2), so the decision does not depend on thread timing;
7. measure the evaluation half again and feed a few windows to see whether the alert clears.

The drift alert is about the *inputs* (lower contrast, noise) compared with the training data; a
fine-tuned model classifies them better but does not change them, so with the baseline kept the
alert is expected to stay; ``alert_cleared`` reports what the collector says, not what we hope.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from toolchain.errors import ToolchainError

SHIFTED = "pi-shifted"
CLEAN = "pi-clean"
LOOP_SEED = 0
FINETUNE_EPOCHS = 8
CAPTURE_PASSES = 4  # passes over the capture half, each with fresh sensor noise (seeds 0..3)
GATE_WINDOWS = 2
GATE_TIMEOUT_S = 300.0
ALERT_WAIT_S = 30.0
ARRIVAL_WAIT_S = 60.0
CLEAR_WINDOWS_MAX = 3  # windows fed after the rollout while waiting for the alert to clear
HTTP_BATCH = 64


class LoopError(ToolchainError):
    """A step of ``demo --loop`` could not complete (one line, says which)."""


@dataclass
class LoopContext:
    """What the demo already has running when the loop starts."""

    out: Path
    db_url: str
    broker_url: str
    model_path: Path
    bundle: Path  # the v1 raspberry-pi bundle
    priv: Path
    pub: Path
    daemons: dict[str, Any]
    collector: Any
    test: Any  # the held-out Dataset
    inputs: dict[str, np.ndarray]
    window_samples: int
    train_path: Path
    shift: Callable[[np.ndarray, int], np.ndarray]  # the demo's sensor shift (contrast, noise; seeded)
    fleet: str = "demo"
    echo: Callable[[str], None] = print
    progress: bool = False
    debug: bool = False
    timeline: list[tuple[float, str, str]] = field(default_factory=list)

    def note(self, what: str, detail: str, ts: float | None = None) -> None:
        ts = time.time() if ts is None else ts
        self.timeline.append((ts, what, detail))
        self.echo(f"    [{time.strftime('%H:%M:%S', time.localtime(ts))}] {what}: {detail}")


def _post(url: str, doc: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback URL the demo made
        out: dict[str, Any] = json.loads(resp.read())
    return out


def _wait(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise LoopError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _close(daemon: Any) -> None:
    if daemon.agent.window_count():
        daemon.agent.close_window()


def _accuracy(ctx: LoopContext, idx: np.ndarray) -> float:
    """Accuracy of pi-shifted (whatever it serves now) on the shifted held-out rows ``idx``, via its agent."""
    d = ctx.daemons[SHIFTED]
    names = ctx.test.class_names
    correct = 0
    for i in idx:
        pred = d.agent.predict(ctx.inputs[SHIFTED][i])
        correct += int(pred.labels[0] == names[int(ctx.test.y[i])])
    _close(d)
    return correct / len(idx)


def _serving_version(daemon: Any) -> int:
    return int(daemon.agent.model.ref.version)


def _samples(db_url: str) -> dict[str, Any]:
    from toolchain.fleet.samples import Selection, summary
    from toolchain.fleet.storage import open_store

    with open_store(db_url) as store:
        rows = summary(store, Selection(device=SHIFTED))
    return rows[0] if rows else {"samples": 0, "labelled": 0}


def _feed_window(ctx: LoopContext, at: int) -> int:
    """One window on both agents: shifted / clean digits from row ``at`` on (cycling); return the next row."""
    n = len(ctx.test.x)
    for _ in range(ctx.window_samples):
        for dev in (SHIFTED, CLEAN):
            ctx.daemons[dev].agent.predict(ctx.inputs[dev][at % n])
        at += 1
    for dev in (SHIFTED, CLEAN):
        _close(ctx.daemons[dev])
    return at


class _Feeder:
    """Feed windows in a thread (so the gate gets its windows while ``deploy`` waits for them).

    ``start_when``: feed nothing until it is true (the canary serves the new model), then start from row 0.
    """

    def __init__(self, ctx: LoopContext, start_when: Callable[[], bool] | None = None) -> None:
        self.ctx = ctx
        self.start_when = start_when
        self.stop = threading.Event()
        self.windows = 0
        self.thread = threading.Thread(target=self._run, name="demo-loop-feeder", daemon=True)

    def __enter__(self) -> _Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while self.start_when is not None and not self.start_when():
            if self.stop.wait(0.05):
                return
        at = 0
        while not self.stop.is_set():
            at = _feed_window(self.ctx, at)
            self.windows += 1
            self.stop.wait(0.3)


def _windows_stored(db_url: str, device: str) -> int:
    from toolchain.fleet import status_rows

    return next((int(r["windows"]) for r in status_rows(db_url) if r["device_id"] == device), 0)


def _drift_state(ctx: LoopContext) -> str | None:
    """The collector's drift verdict for pi-shifted on the model it serves now (None: no windows yet)."""
    from toolchain.fleet import drift_table

    sha = ctx.daemons[SHIFTED].agent.model.ref.sha256
    for r in drift_table(ctx.db_url, device=SHIFTED):
        if r.get("scope") == "device" and r["model"]["sha256"] == sha:
            return str(r["state"])
    return None


def run_loop(ctx: LoopContext, epochs: int = FINETUNE_EPOCHS) -> dict[str, Any]:
    """Run the loop (see the module docstring); return the ``loop`` summary. Raises LoopError in one line."""
    step = ["alert"]
    try:
        return _run(ctx, epochs, step)
    except ToolchainError as e:
        raise LoopError(f"demo --loop, step {step[0]}: {e}") from None
    except Exception as e:  # noqa: BLE001 - one line naming the step, never a traceback (--debug shows it)
        if ctx.debug:
            raise
        raise LoopError(f"demo --loop, step {step[0]}: {type(e).__name__}: {e}") from None


def _run(ctx: LoopContext, epochs: int, step: list[str]) -> dict[str, Any]:
    from device_agent.formats.manifest import load_manifest
    from toolchain.build import build_bundles
    from toolchain.fleet.samples import Selection, export
    from toolchain.fleet.storage import open_store
    from toolchain.shipping.canary import GateOptions, MetricGate
    from toolchain.shipping.deploy import deploy
    from toolchain.shipping.flash import MqttDest
    from toolchain.steps.finetune import finetune_model
    from toolchain.steps.trainset import combine, load_labelled

    loop_dir = ctx.out / "loop"
    loop_dir.mkdir(exist_ok=True)
    shifted = ctx.daemons[SHIFTED]
    names = ctx.test.class_names
    order = np.random.default_rng(LOOP_SEED).permutation(len(ctx.test.x))
    cap_idx, eval_idx = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])

    # 1. the alert command reaches the device -----------------------------------------------------------
    if shifted.capturer is None:
        raise LoopError(f"{SHIFTED} has no [capture] section")
    _wait(lambda: bool(shifted.alert_follower.in_alert), ALERT_WAIT_S, f"the alert command on {SHIFTED}")
    from toolchain.fleet.status import recent_alerts

    raised = [a for a in recent_alerts(ctx.db_url) if a["device_id"] == SHIFTED and a["state"] == "alert"]
    ctx.note(  # at the time the collector raised it (the newest raise, before the loop started)
        "alert",
        f"collector: {SHIFTED} drift {raised[0]['previous']} -> alert; its alert command set the capture"
        f" rate to {shifted.capturer.rate:g}"
        if raised
        else f"{SHIFTED} in alert; capture rate {shifted.capturer.rate:g}",
        ts=float(raised[0]["ts"]) if raised else None,
    )

    # 2. accuracy before ------------------------------------------------------------------------------
    step[0] = "accuracy before"
    before = _accuracy(ctx, eval_idx)
    v1 = load_manifest(ctx.bundle)
    ctx.echo(f"    accuracy of v{v1.version} on {len(eval_idx)} shifted held-out digits: {100 * before:.1f}%")

    # 3. capture through the HTTP API, label through /v1/feedback ------------------------------------
    step[0] = "capture and label"
    if shifted.api is None:
        raise LoopError(f"{SHIFTED} has no HTTP API to label through")
    base = f"http://{shifted.api.address}"
    outcomes: dict[str, int] = {}
    for p in range(CAPTURE_PASSES):
        xs = ctx.shift(ctx.test.x, p)
        for s in range(0, len(cap_idx), HTTP_BATCH):
            rows = cap_idx[s : s + HTTP_BATCH]
            got = _post(f"{base}/v1/predict", {"inputs": xs[rows].tolist()})
            items = [
                {"id": pid, "label": names[int(ctx.test.y[i])]}
                for pid, i in zip(got["ids"], rows, strict=True)
            ]
            for r in _post(f"{base}/v1/feedback", {"items": items})["results"]:
                outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        _close(shifted)
    counted = outcomes.get("correct", 0) + outcomes.get("incorrect", 0)
    sent = CAPTURE_PASSES * len(cap_idx)
    if counted != sent:
        raise LoopError(f"/v1/feedback counted {counted} of {sent} labels ({outcomes})")
    expect = counted - int(shifted.capturer.counts()["labels_not_captured"])
    _wait(
        lambda: _samples(ctx.db_url)["labelled"] >= expect,
        ARRIVAL_WAIT_S,
        f"the collector to store {expect} labelled samples of {SHIFTED}",
    )
    stored = _samples(ctx.db_url)
    cap = shifted.capturer.counts()
    skipped = {k: v for k, v in cap.items() if k.startswith(("skipped", "labels_not")) and v}
    ctx.note(
        "capture",
        f"{stored['samples']} samples of {SHIFTED} stored, {stored['labelled']} labelled through /v1/feedback"
        + (f"; not captured: {skipped}" if skipped else ""),
    )

    # 4. export ----------------------------------------------------------------------------------------
    step[0] = "export"
    export_path = loop_dir / "samples.npz"
    with open_store(ctx.db_url) as store:
        exported = export(store, Selection(device=SHIFTED), export_path)
    ctx.echo(f"    exported {exported.samples} samples ({exported.labelled} labelled) to {export_path}")

    # 5. fine-tune, build v2 and the rollback bundle ----------------------------------------------------
    step[0] = "fine-tune"
    old = load_labelled(ctx.train_path)
    new = load_labelled(export_path)
    ctx.echo(
        f"    fine-tuning {ctx.model_path.name}: OLD {old.data.n} training digits, NEW {new.data.n} labelled"
        f" samples ({new.unlabelled} unlabelled dropped), {epochs} epochs, seed {LOOP_SEED}"
    )
    v2_model = loop_dir / "digits_cnn_v2.keras"
    tuned = finetune_model(
        ctx.model_path,
        old.data,
        combine([new.data], what="NEW --data"),
        epochs,
        v2_model,
        seed=LOOP_SEED,
        unlabelled_dropped=(old.unlabelled, new.unlabelled),
        progress=ctx.progress,
    )
    step[0] = "build"
    v2_dir, rb_dir = loop_dir / "bundles-v2", loop_dir / "bundles-rollback"
    for model, out_dir, version in (
        (v2_model, v2_dir, v1.version + 1),
        (ctx.model_path, rb_dir, v1.version + 2),
    ):
        build_bundles(
            model,
            ctx.train_path,
            [v1.target],
            out_dir,
            eval_data=ctx.test,
            version=version,
            name=v1.name,
            sign_key=ctx.priv,
            progress=ctx.progress,
        )
    v2_bundle, rb_bundle = v2_dir / v1.target, rb_dir / v1.target
    ctx.echo(
        f"    built {v1.name} v{v1.version + 1} (fine-tuned) and v{v1.version + 2} (the old model again,"
        " the rollback bundle), signed"
    )

    # 6. canary on pi-shifted gated by drift, promotion to pi-clean ------------------------------------
    step[0] = "canary deploy"
    had = _windows_stored(ctx.db_url, SHIFTED)
    at = 0
    for _ in range(GATE_WINDOWS):  # the windows the gate measures before the install
        at = _feed_window(ctx, at)
    _wait(
        lambda: _windows_stored(ctx.db_url, SHIFTED) >= had + GATE_WINDOWS,
        ARRIVAL_WAIT_S,
        f"{GATE_WINDOWS} windows of {SHIFTED} before the install",
    )
    u = urlsplit(ctx.broker_url)
    dest = MqttDest(u.hostname or "127.0.0.1", int(u.port or 1883), False, None, None, ctx.fleet, None)
    gate = MetricGate(
        GateOptions("drift", ctx.db_url, GATE_WINDOWS, GATE_TIMEOUT_S, rb_bundle),
        v2_bundle,
        dest,
        public_key=ctx.pub,
        say=lambda s: ctx.echo(f"    {s}"),
    )
    ctx.note("deploy", f"v{v1.version + 1} to {SHIFTED} (canary, --gate drift), then {CLEAN}")
    with _Feeder(ctx, start_when=lambda: _serving_version(shifted) != v1.version):
        roll = deploy(
            v2_bundle,
            dest,
            devices=[SHIFTED, CLEAN],
            canary=1,
            public_key=ctx.pub,
            on_progress=lambda s: ctx.echo(f"    {s}"),
            gate=gate,
        )
    g = roll.gate or {}
    passed = g.get("outcome") == "passed"
    states = {d: r.state for d, r in roll.results.items()}
    versions = {d: _serving_version(ctx.daemons[d]) for d in (SHIFTED, CLEAN)}
    ctx.note(
        "gate",
        f"{g.get('message', 'no decision')}; {g.get('action', '')}; "
        + ", ".join(f"{d} {st}, serving v{versions[d]}" for d, st in states.items() if d in versions),
    )
    promoted = v1.version + 1 if passed and all(v == v1.version + 1 for v in versions.values()) else None

    # 7. accuracy after, and the alert -----------------------------------------------------------------
    step[0] = "accuracy after"
    after = _accuracy(ctx, eval_idx)
    ctx.echo(
        f"    accuracy of v{versions[SHIFTED]} on the same {len(eval_idx)} shifted digits: {100 * after:.1f}%"
    )
    cleared = False
    with _Feeder(ctx) as feeder:
        deadline = time.monotonic() + ARRIVAL_WAIT_S
        while feeder.windows < CLEAR_WINDOWS_MAX and time.monotonic() < deadline:
            if not shifted.alert_follower.in_alert and _drift_state(ctx) != "alert":
                cleared = True
                break
            time.sleep(0.3)
    state = _drift_state(ctx)
    if cleared:
        ctx.note("cleared", f"{SHIFTED} drift {state}; the alert command says not in alert")
    else:
        ctx.note(
            "not cleared",
            f"{SHIFTED} still in drift {state} after {CLEAR_WINDOWS_MAX} windows on v{versions[SHIFTED]}: its"
            " inputs still differ from the training data the baseline describes",
        )
    return {
        "captured": int(exported.samples),
        "labelled": int(exported.labelled),
        "accuracy_shifted_before": round(before, 4),
        "accuracy_shifted_after": round(after, 4),
        "evaluated_on": int(len(eval_idx)),
        "finetune_validation": {"before": tuned.before, "after": tuned.after},
        "canary_passed": passed,
        "gate": {k: g.get(k) for k in ("outcome", "action", "message")},
        "promoted_version": promoted,
        "serving_versions": versions,
        "alert_cleared": cleared,
        "drift_state_after": state,
    }
