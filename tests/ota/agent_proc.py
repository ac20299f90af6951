"""The real agent (``edgefleet-agent run``) in a subprocess for OTA tests, with an optional pause point.

``pause_at`` stops the updater's worker thread at one point of an update (a persisted state, the middle
of writing the slot, or right after the active pointer moved) so a test can SIGKILL the process there.
Only the test process patches this; the agent code has no test hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import REPO, AgentRun, http_call, wait_for

__all__ = ["REPO", "wait_for"]

PRELUDE = r"""
import os, sys, time
import device_agent.update.machine as U, device_agent.store as S, device_agent.mqtt as M
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


class Agent(AgentRun):
    """One ``edgefleet-agent run`` process, optionally stopping at ``pause_at``."""

    def __init__(self, config: Path, log_path: Path, pause_at: str | None = None) -> None:
        self.marker = log_path.with_suffix(".paused")
        self.marker.unlink(missing_ok=True)
        env = (
            {"EDGEFLEET_TEST_PAUSE_AT": pause_at, "EDGEFLEET_TEST_PAUSED": str(self.marker)}
            if pause_at
            else {}
        )
        super().__init__(PRELUDE, config, log_path, env)

    @property
    def base(self) -> str:
        return self.api_base()

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
            self.exited()
            return self.marker.exists()

        wait_for(paused, timeout_s, f"the update to reach its pause point ({self.log()[-500:]})")

    def sigkill(self) -> None:
        self.kill()


def call(url: str, body: Any = None) -> tuple[int, Any]:
    return http_call(url, body)


def damage_active_slot(state: Path) -> None:
    """Flip one byte of the active slot's model, as a worn SD card would."""
    from device_agent.store import BundleStore

    slot = BundleStore(state).active_dir()
    assert slot is not None
    model = slot / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))


def start_fleet_agents(
    tmp_path: Path,
    devices: dict[str, Path],
    *,
    pub: Path,
    mqtt_url: str,
    targets: dict[str, str] | None = None,
    extra_config: str = "",
    started: list[Any] | None = None,
) -> dict[str, Agent]:
    """Start one agent per device (id -> its v1 bundle; ``targets``: id -> target, x86 otherwise).

    Each serves v1 and is connected to the broker on return; every one is appended to ``started``
    first, so the caller stops them even when one fails to come up.
    """
    out = {}
    for dev, v1 in devices.items():
        cfg = write_agent_config(
            tmp_path / f"{dev}.toml",
            bundle=v1,
            state_dir=tmp_path / dev,
            pub=pub,
            mqtt_url=mqtt_url,
            device_id=dev,
            target=(targets or {}).get(dev, "x86"),
        )
        if extra_config:
            with cfg.open("a") as fh:
                fh.write(extra_config)
        a = Agent(cfg, tmp_path / f"{dev}.log")
        if started is not None:
            started.append(a)
        out[dev] = a
    for a in out.values():
        assert a.model_version() == 1
        wait_for(lambda a=a: a.health()["mqtt"]["connected"], 30, "the agent's MQTT connection")
    return out
