"""The end-to-end demo behind ``./run demo``: train, build, deploy, monitor, alert on the shipped digits.

Everything runs on this machine with embedded defaults: an in-process MQTT broker (amqtt), two device
agents (real daemons with their disk outboxes, running the raspberry-pi bundle in LiteRT), and the fleet
collector on SQLite. One device sees held-out digits, the other the same digits with lower contrast and
sensor noise; the collector must flag the second and not the first.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import data
from toolchain.data import digits_path
from toolchain.errors import ToolchainError

DIGITS_TRAIN = digits_path(data.DIGITS_TRAIN)  # package data: works from an installed wheel
DIGITS_TEST = digits_path(data.DIGITS_TEST)
DEMO_FLEET = "demo"
DEMO_TARGET = "raspberry-pi"
DEVICES = {"pi-clean": "held-out digits", "pi-shifted": "held-out digits, lower contrast + noise"}
WINDOW_SAMPLES = 250  # samples per telemetry window in the demo (real devices default to 60 s windows)
PASSES = 3  # how many times each device walks the 359 held-out digits
CONTRAST = 0.5
NOISE_STD = 2.0
ARRIVAL_TIMEOUT_S = 60.0
EVALUATION_WAIT_S = 5.0


class DemoError(ToolchainError):
    """The demo could not complete one of its stages."""


def shift_digits(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return digits with halved contrast and Gaussian sensor noise, clipped to the 0..16 range."""
    rng = np.random.default_rng(seed)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    shifted = (x - mean) * CONTRAST + mean + rng.normal(0.0, NOISE_STD, size=x.shape)
    return np.clip(shifted, 0.0, 16.0).astype(np.float32)


def _agent_config(
    path: Path,
    device: str,
    bundle: Path,
    state_dir: Path,
    broker_url: str,
    pub_key: Path,
    capture: bool = False,
) -> Path:
    # demo --loop: pi-shifted captures only while the fleet says it is in alert, and serves the HTTP
    # API (an ephemeral loopback port) so its captured samples can be labelled through /v1/feedback.
    extra = (
        [
            "[capture]",
            "sample_rate = 0",
            "on_alert_rate = 1.0",
            "max_samples_per_hour = 100000",
            "",
        ]
        if capture
        else []
    )
    path.write_text(
        "\n".join(
            [
                "[agent]",
                f'device_id = "{device}"',
                f'fleet = "{DEMO_FLEET}"',
                f'bundle = "{bundle}"',
                f'state_dir = "{state_dir}"',
                f'trusted_keys = ["{pub_key}"]',
                "allow_unsigned = false",
                "",
                "[mqtt]",
                f'url = "{broker_url}"',
                "",
                "[telemetry]",
                "window_s = 3600",
                f"window_max_samples = {WINDOW_SAMPLES}",
                "",
                "[api]",
                'listen = "127.0.0.1:0"' if capture else 'listen = "off"',
                "",
                *extra,
            ]
        )
    )
    return path


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _stored(db_url: str, n: int) -> bool:
    from toolchain.fleet import status_rows

    seen = {r["device_id"]: r["windows"] for r in status_rows(db_url)}
    return all(seen.get(d, 0) >= n for d in DEVICES)


def _evaluated(collector: Any, n: int) -> bool:
    return bool(collector.counters.evaluations >= n)


def _wait_soft(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.1)


def cli_command() -> str:
    """Return how to call ``edgefleet`` from a fresh shell, quoted for the shell: the absolute path of
    this installation's script (``'/my work/.venv/bin/edgefleet'``).

    Hints must work when pasted into a new terminal, where a virtual environment is not active and
    paths may hold spaces: so never a bare ``edgefleet`` unless the one on PATH is this installation's.
    """
    here = Path(sys.executable).parent / "edgefleet"
    on_path = shutil.which("edgefleet")
    if on_path and here.exists() and Path(on_path).resolve() == here.resolve():
        return "edgefleet"
    if here.exists():
        return shlex.quote(str(here))
    return f"{shlex.quote(sys.executable)} -m toolchain.cli"


def path_hint() -> list[str] | None:
    """Return the lines telling how to put ``edgefleet`` on PATH (commands after ``$ ``, quoted for
    the shell), or None when it already is."""
    if cli_command() == "edgefleet":
        return None
    bindir = Path(sys.executable).parent
    activate = bindir / "activate"
    if activate.exists():
        return [
            "edgefleet is not on your PATH; in each new shell run",
            f"  $ source {shlex.quote(str(activate))} && edgefleet --help",
            "or call it by its path:",
            f"  $ {cli_command()} --help",
        ]
    return [
        "edgefleet is not on your PATH; add its folder in each new shell",
        f'  $ export PATH={shlex.quote(str(bindir))}:"$PATH" && edgefleet --help',
        "or call it by its path:",
        f"  $ {cli_command()} --help",
    ]


def fleet_status_hint(db_url: str) -> str:
    """Return the command that shows the demo's fleet again (pasteable in a fresh shell)."""
    return f"{cli_command()} fleet status --db {shlex.quote(db_url)}"


def run_demo(
    out_dir: str | Path,
    *,
    epochs: int = 30,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    fresh: bool = False,
    loop: bool = False,
    debug: bool = False,
) -> dict[str, Any]:
    """Run the whole loop into ``out_dir``; return a summary dict (also written to summary.json).

    ``loop``: after the drift alert, capture, label, fine-tune, build v2 and canary it
    (``toolchain.demoloop``); the summary gets ``loop``.
    """
    from toolchain.build import build_bundles
    from toolchain.report import summary_table
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    out = Path(out_dir).resolve()  # agent configs resolve relative paths against their own folder
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out_dir": str(out)}
    t0 = time.perf_counter()

    # 1. Train -------------------------------------------------------------------------------------
    echo("==> 1/5 train: digits CNN on the shipped digits (calibration_data/digits.npz)")
    train = load_dataset(DIGITS_TRAIN)
    model_path = out / "digits_cnn.keras"
    if not model_path.exists():
        result = train_model(train, "cnn", epochs, model_path, progress=progress)
        summary["train"] = result.to_dict()
    else:
        echo(f"    reusing {model_path}")

    # 2. Build every target, signed ------------------------------------------------------------------
    echo("==> 2/5 build: signed int8 bundles for every target, verified in LiteRT / ONNX Runtime / OpenVINO")
    from toolchain.shipping.signing import create_keys

    keys = out / "keys"
    priv, pub = keys / "fleet.key", keys / "fleet.pub"
    if not (priv.exists() and pub.exists()):
        priv, pub = create_keys(keys, "fleet", force=True)
    bundles = out / "bundles"
    version = 1
    if (bundles / DEMO_TARGET / "manifest.json").exists():
        from device_agent.formats.manifest import load_manifest

        version = load_manifest(bundles / DEMO_TARGET).version + 1
    if bundles.exists():
        shutil.rmtree(bundles)
    report = build_bundles(
        model_path,
        DIGITS_TRAIN,
        ["all"],
        bundles,
        eval_data=DIGITS_TEST,
        version=version,
        sign_key=priv,
        progress=progress,
    )
    echo(summary_table(report))
    summary["build"] = {
        "report_html": str(bundles / "report.html"),
        "report_json": str(bundles / "report.json"),
    }

    # 3. Deploy: broker, collector, two agents ----------------------------------------------------------
    echo(
        f"==> 3/5 deploy: embedded MQTT broker, fleet collector (SQLite), {len(DEVICES)} agents on {DEMO_TARGET}"
    )
    from device_agent.agent import Daemon, EmbeddedBroker
    from toolchain.fleet import Collector, drift_table, register_bundle, status_rows, write_report
    from toolchain.fleet.status import recent_alerts

    db_path = out / "fleet.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    db_url = f"sqlite:///{db_path}"
    register_bundle(db_url, bundles / DEMO_TARGET)
    test = load_dataset(DIGITS_TEST)
    inputs = {"pi-clean": test.x, "pi-shifted": shift_digits(test.x)}
    daemons: dict[str, Daemon] = {}
    timeline: list[tuple[float, str, str]] | None = None
    with EmbeddedBroker() as broker:
        collector = Collector(db_url, broker.url, fleet=DEMO_FLEET)
        collector.start()
        try:
            collector.wait_ready()
            for device in DEVICES:
                state = out / "devices" / device
                if state.exists():
                    shutil.rmtree(state)
                state.mkdir(parents=True)
                cfg = _agent_config(
                    state / "agent.toml",
                    device,
                    bundles / DEMO_TARGET,
                    state / "state",
                    broker.url,
                    pub,
                    capture=loop and device == "pi-shifted",
                )
                daemons[device] = Daemon.from_file(cfg, watch_bundle=False).start()

            # 4. Monitor: feed data through the agents' Python API ------------------------------------
            echo(f"==> 4/5 monitor: {PASSES} passes over {len(test.x)} held-out digits per device")
            correct = {d: 0 for d in DEVICES}
            order = np.concatenate([np.arange(len(test.x))] * PASSES)
            total = len(order)
            windows = 0
            for start in range(0, total, WINDOW_SAMPLES):
                for i in order[start : start + WINDOW_SAMPLES]:
                    for device, xs in inputs.items():
                        pred = daemons[device].agent.predict(xs[i])
                        correct[device] += int(pred.labels[0] == test.class_names[int(test.y[i])])
                for d in daemons.values():
                    if d.agent.window_count():
                        d.agent.close_window()
                windows += 1
                # Pace the windows like minutes on a real fleet: let the collector store and evaluate
                # each one, so alerts go through their hysteresis as they would in production.
                evaluated = collector.counters.evaluations
                _wait(partial(_stored, db_url, windows), ARRIVAL_TIMEOUT_S, f"window {windows}")
                _wait_soft(partial(_evaluated, collector, evaluated + len(DEVICES)), EVALUATION_WAIT_S)
                rows = {r["device_id"]: r for r in status_rows(db_url)}
                done = min(start + WINDOW_SAMPLES, total)
                echo(
                    f"    {done:5d}/{total} samples: "
                    + "; ".join(
                        f"{d} {rows[d]['windows']} windows stored, drift {rows[d]['drift_state']}"
                        for d in DEVICES
                    )
                )
            if loop:
                from toolchain.demoloop import LoopContext, run_loop

                echo(
                    "==> loop: capture on pi-shifted, label, export, fine-tune, build v2, canary --gate drift"
                )
                loop_ctx = LoopContext(
                    out=out,
                    db_url=db_url,
                    broker_url=broker.url,
                    model_path=model_path,
                    bundle=bundles / DEMO_TARGET,
                    priv=priv,
                    pub=pub,
                    daemons=daemons,
                    collector=collector,
                    test=test,
                    inputs=inputs,
                    window_samples=WINDOW_SAMPLES,
                    train_path=Path(DIGITS_TRAIN),
                    shift=shift_digits,
                    fleet=DEMO_FLEET,
                    echo=echo,
                    progress=progress,
                    debug=debug,
                )
                summary["loop"] = run_loop(loop_ctx)
                timeline = loop_ctx.timeline
        finally:
            for d in daemons.values():
                d.stop()
            collector.stop()

    # 5. Report ---------------------------------------------------------------------------------------
    echo("==> 5/5 report: drift per device")
    drift_rows = [r for r in drift_table(db_url) if r.get("device_id") in DEVICES]
    if loop:  # one row per (device, model) after the rollout: the newest model's last, as the states use it
        drift_rows.sort(key=lambda r: (r["device_id"], r["model"]["version"]))
    from toolchain.report import text_table

    table_rows = []
    for r in drift_rows:
        table_rows.append(
            [
                r["device_id"] + (f" v{r['model']['version']}" if loop else ""),
                DEVICES[r["device_id"]],
                f"{100 * correct[r['device_id']] / total:.1f}%"
                if r["model"]["version"] == version
                else "-",  # the monitor stage measured the first model only (--loop: see the loop line)
                r["state"],
                f"{r.get('max_psi') or 0:.3f}",
                str(r.get("worst_feature") or ""),
                f"{r.get('class_psi') or 0:.3f}",
                f"{r.get('confidence_shift') or 0:+.3f}",
            ]
        )
    echo(
        text_table(
            [
                "device",
                "data",
                "accuracy",
                "drift",
                "max PSI",
                "worst feature",
                "class PSI",
                "confidence shift",
            ],
            table_rows,
        )
    )
    alerts = [a for a in recent_alerts(db_url) if a["device_id"] in DEVICES]
    for a in reversed(alerts):
        echo(
            f"    alert on edgefleet/{a['fleet']}/alerts: {a['device_id']} {a['previous']} -> {a['state']}: {a['message']}"
        )
    report_path = out / "fleet-report.html"
    write_report(db_url, report_path, timeline=timeline)
    states = {r["device_id"]: r["state"] for r in drift_rows}
    summary.update(
        {
            "fleet": {"db": db_url, "report_html": str(report_path), "states": states, "alerts": alerts},
            "accuracy": {d: correct[d] / total for d in DEVICES},
            "elapsed_s": round(time.perf_counter() - t0, 1),
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    echo("")
    echo(f"build report:  {bundles / 'report.html'}")
    echo(f"fleet report:  {report_path}")
    cmd = cli_command()
    echo(f"fleet db:      {db_path}")
    echo(f"  $ {fleet_status_hint(db_url)}")
    ok = states.get("pi-clean") not in ("alert",) and states.get("pi-shifted") in ("alert", "warn")
    if loop:  # the loop may clear pi-shifted's alert: what counts is that it was raised on it alone
        flagged = {a["device_id"] for a in alerts if a["state"] in ("alert", "warn")}
        ok = states.get("pi-clean") != "alert" and flagged == {"pi-shifted"}
    echo(
        "result:        "
        + ("drift flagged on pi-shifted only, as expected" if ok else f"UNEXPECTED drift states {states}")
    )
    if loop and "loop" in summary:
        lp = summary["loop"]
        promoted = f"promoted v{lp['promoted_version']}" if lp["promoted_version"] else "not promoted"
        cleared = "alert cleared" if lp["alert_cleared"] else "alert not cleared"
        echo(
            f"loop:          {lp['captured']} captured; accuracy on shifted digits"
            f" {100 * lp['accuracy_shifted_before']:.1f}% -> {100 * lp['accuracy_shifted_after']:.1f}%;"
            f" canary gate {lp['gate']['outcome']} ({lp['gate']['action']}); {promoted}; {cleared}"
        )
    hint = path_hint()
    if hint:
        echo(f"next:          {hint[0]}")
        for line in hint[1:]:
            echo(f"               {line}")
    summary["cli"] = cmd
    summary["ok"] = ok
    return summary
