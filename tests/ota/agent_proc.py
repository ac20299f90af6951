"""The real agent (``edgefleet-agent run``) in a subprocess for OTA tests, with an optional pause point.

``pause_at`` stops the updater's worker thread at one point of an update (a persisted state, the middle
of writing the slot, or right after the active pointer moved) so a test can SIGKILL the process there.
Only the test process patches this; the agent code has no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

PRELUDE = r"""
import os, sys, time
import device_agent.updater as U, device_agent.store as S, device_agent.mqtt as M
U.INCOMING_POLL_S = 0.2
U.HEALTH_POLL_S = 0.1
M.RECONNECT_MIN_S = 0.1
M.RECONNECT_MAX_S = 0.5
pause = os.environ.get("EDGEFLEET_TEST_PAUSE_AT")
marker = os.environ.get("EDGEFLEET_TEST_PAUSED")

def hold(where):
    with open(marker, "w") as fh:
        fh.write(where)
    while True:
        time.sleep(1)

if pause and pause.startswith("state:"):
    _persist = U.Updater._persist
    def persist(self, **ch):
        _persist(self, **ch)
        if ch.get("state") == pause[6:]:
            hold(pause)
    U.Updater._persist = persist
elif pause == "mid-copy":
    _copy = S.copy_file_synced
    calls = []
    def copy(src, dst):
        _copy(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            hold(pause)
    S.copy_file_synced = copy
elif pause == "pointer-moved":
    _set = S.BundleStore.set_active
    def set_active(self, ref):
        _set(self, ref)
        if ref is not None:
            hold(pause)
    S.BundleStore.set_active = set_active
from device_agent.cli import main
main()
"""


def wait_for(pred: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def write_agent_config(
    path: Path,
    *,
    bundle: Path,
    state_dir: Path,
    pub: Path | None,
    mqtt_url: str | None = None,
    device_id: str = "pi-001",
    fleet: str = "lab",
    target: str = "x86",
    health_window_s: float = 1.0,
    extra_update: str = "",
) -> Path:
    """Write an agent.toml that trusts ``pub`` (or allows unsigned bundles without it)."""
    keys = f'trusted_keys = ["{pub}"]\n' if pub else "allow_unsigned = true\n"
    text = (
        f'[agent]\ndevice_id = "{device_id}"\nfleet = "{fleet}"\nbundle = "{bundle}"\nstate_dir = "{state_dir}"\n'
        f'target = "{target}"\n{keys}\n[api]\nlisten = "127.0.0.1:0"\n\n'
        f"[update]\nhealth_window_s = {health_window_s}\n{extra_update}\n"
    )
    if mqtt_url:
        text += f'\n[mqtt]\nurl = "{mqtt_url}"\nkeepalive_s = 5\n'
    path.write_text(text)
    return path


class Agent:
    """One ``edgefleet-agent run`` process."""

    def __init__(self, config: Path, log_path: Path, pause_at: str | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.marker = log_path.with_suffix(".paused")
        self.marker.unlink(missing_ok=True)
        if pause_at:
            env["EDGEFLEET_TEST_PAUSE_AT"] = pause_at
            env["EDGEFLEET_TEST_PAUSED"] = str(self.marker)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE, "run", "--config", str(config)],
            stdout=self._log,
            stderr=self._log,
            env=env,
            cwd=str(REPO),
        )
        self._base: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def base(self) -> str:
        if self._base is None:

            def find() -> str | None:
                for line in self.log().splitlines():
                    if "listening on " in line:
                        return "http://" + line.rsplit("listening on ", 1)[1].strip()
                if self.proc.poll() is not None:
                    raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                return None

            self._base = str(wait_for(find, 60, "the agent's API"))
        return self._base

    def get(self, path: str) -> tuple[int, Any]:
        return call(self.base + path)

    def health(self) -> dict[str, Any]:
        code, doc = self.get("/v1/health")
        assert code == 200, doc
        return doc

    def model_version(self) -> int:
        return int(self.health()["model"]["version"])

    def predict(self, rows: list[Any]) -> dict[str, Any]:
        code, doc = call(self.base + "/v1/predict", {"inputs": rows})
        assert code == 200, doc
        return doc

    def wait_paused(self, timeout_s: float = 60.0) -> None:
        def paused() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.marker.exists()

        wait_for(paused, timeout_s, f"the update to reach its pause point ({self.log()[-500:]})")

    def sigkill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def call(url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text
