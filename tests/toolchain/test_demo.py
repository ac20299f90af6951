"""The README's main command, end to end: train, build (signed), two agents, collector, drift, alert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, verify_bundle


def run_demo(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``edgefleet demo --json --epochs 15 ARGS`` in a subprocess, run in ``cwd``."""
    cmd = [sys.executable, "-m", "toolchain.cli", "demo", "--json", "--epochs", "15", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=850)


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(900)
def test_demo_flags_the_shifted_device_only(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "demo"
    # A relative --out, as `./run demo` uses: agent configs must not resolve it against their own folder.
    proc = run_demo(cli_env, tmp_path, "--out", "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True
    assert summary["fleet"]["states"] == {"pi-clean": "ok", "pi-shifted": "alert"}
    assert [a["device_id"] for a in summary["fleet"]["alerts"]] == ["pi-shifted"]
    assert summary["accuracy"]["pi-clean"] > 0.9 > summary["accuracy"]["pi-shifted"]
    # Every bundle the demo built is signed with the demo's key and verifies against it.
    keys = load_trusted_keys([out / "keys" / "fleet.pub"])
    for target in ("mobile", "raspberry-pi", "coral", "x86"):
        manifest = verify_bundle(out / "bundles" / target, VerifyPolicy(trusted_keys=keys, target=target))
        assert manifest.name and (out / "bundles" / target / "manifest.sig").is_file()
    for page in (out / "bundles" / "report.html", out / "fleet-report.html"):
        assert "<svg" in page.read_text()
    assert "Error" not in proc.stderr


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(900)
def test_demo_loop_captures_labels_finetunes_and_canaries(tmp_path: Path, cli_env: dict[str, str]) -> None:
    import numpy as np

    out = tmp_path / "demo"
    proc = run_demo(cli_env, tmp_path, "--out", str(out), "--loop")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is True
    # The alert was raised on pi-shifted alone (the loop may clear it later; pi-clean never alerts).
    assert {a["device_id"] for a in summary["fleet"]["alerts"]} == {"pi-shifted"}
    assert summary["fleet"]["states"]["pi-clean"] == "ok"
    loop = summary["loop"]
    assert set(loop) >= {
        "captured",
        "accuracy_shifted_before",
        "accuracy_shifted_after",
        "canary_passed",
        "promoted_version",
        "alert_cleared",
    }
    # Captured because of the alert command (sample_rate 0): the labelled capture passes, plus what the
    # monitor stage sent after the alert (unlabelled: those predictions had no id a person could label).
    assert loop["labelled"] == 4 * (359 // 2)
    assert loop["captured"] > loop["labelled"]
    exported = np.load(out / "loop" / "samples.npz")
    assert len(exported["x"]) == loop["captured"]
    assert int((exported["y"] >= 0).sum()) == loop["labelled"]
    assert set(exported["device"].tolist()) == {"pi-shifted"}
    assert 0.0 < loop["accuracy_shifted_before"] < 1.0
    assert loop["evaluated_on"] == 359 - 359 // 2
    v1 = 1
    if loop["canary_passed"]:
        assert loop["gate"]["action"] == "promoted"
        assert loop["promoted_version"] == v1 + 1
        assert loop["serving_versions"] == {"pi-shifted": v1 + 1, "pi-clean": v1 + 1}
        # The fine-tuned model serves pi-shifted: better on shifted digits it never trained on.
        assert loop["accuracy_shifted_after"] > loop["accuracy_shifted_before"]
    else:
        assert loop["promoted_version"] is None
        assert loop["gate"]["action"] in ("rolled_back", "rollback_failed")
        assert loop["serving_versions"]["pi-clean"] == v1  # never reached
    assert isinstance(loop["alert_cleared"], bool)
    assert (loop["drift_state_after"] != "alert") if loop["alert_cleared"] else True
    page = (out / "fleet-report.html").read_text()
    assert 'id="timeline"' in page and 'id="canary-gates"' in page
    for step in ("alert", "capture", "deploy", "gate"):
        assert f"<td>{step}</td>" in page
    assert "Traceback" not in proc.stderr
