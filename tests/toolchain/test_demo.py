"""The README's main command, end to end: train, build (signed), two agents, collector, drift, alert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, verify_bundle


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(900)
def test_demo_flags_the_shifted_device_only(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        # A relative --out, as `./run demo` uses: agent configs must not resolve it against their own folder.
        [sys.executable, "-m", "toolchain.cli", "demo", "--out", "demo", "--json", "--epochs", "15"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=850,
    )
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
