"""``edgefleet-agent status``: the running agent's health in a terminal, --json, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_agent.cli import main
from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.formats.alertcmd import encode_alert_command
from tests.conftest import free_port
from tests.device_agent.agent_bundles import cached_onnx_bundle
from tests.device_agent.agent_helpers import write_config


def _config(tmp_path: Path, listen: str, extra: str = "") -> Path:
    cfg = write_config(
        tmp_path / "agent.toml", bundle=cached_onnx_bundle(), state_dir=tmp_path / "state", listen=listen
    )
    cfg.write_text(cfg.read_text() + extra)
    return cfg


@pytest.mark.timeout(60)
def test_status_shows_the_alert_and_capture_of_the_running_agent(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, f"127.0.0.1:{free_port()}", "\n[capture]\nsample_rate = 0.0\non_alert_rate = 0.5\n"
    )
    d = Daemon(load_config(cfg)).start()
    try:
        d.alert_follower.handle(
            "t",
            encode_alert_command(fleet="lab", device_id="pi-001", in_alert=True, seq=42, reason="psi 0.4"),
        )
        d.alert_follower.handle("t", b"garbage")
        r = CliRunner().invoke(main, ["status", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        assert "IN ALERT since" in r.output and ": psi 0.4" in r.output
        assert "rate 0.5" in r.output and "refused 1 (malformed 1, foreign 0, stale 0)" in r.output
        assert "lab/pi-001" in r.output and "mqtt      off" in r.output
        r = CliRunner().invoke(main, ["status", "--config", str(cfg), "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output)
        assert doc["alert_commands"]["in_alert"] is True and doc["alert_commands"]["seq"] == 42
        assert doc["capture"]["rate"] == 0.5
    finally:
        d.stop()


@pytest.mark.timeout(60)
def test_status_over_a_unix_socket_with_a_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    os.chmod(token, 0o600)
    sock = tmp_path / "api.sock"
    cfg = _config(tmp_path, f"unix:{sock}")
    cfg.write_text(cfg.read_text().replace("[api]\n", f'[api]\ntoken_file = "{token}"\n'))
    d = Daemon(load_config(cfg)).start()
    try:
        r = CliRunner().invoke(main, ["status", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        assert "not in alert" in r.output and "capture   off" in r.output
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("off", "listen is off"),
        ("127.0.0.1:0", "picks a free port"),
        ("127.0.0.1:PORT", "cannot reach the agent"),
    ],
)
def test_status_errors_are_one_line(tmp_path: Path, listen: str, says: str) -> None:
    cfg = _config(tmp_path, listen.replace("PORT", str(free_port())))
    r = CliRunner().invoke(main, ["status", "--config", str(cfg)])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and says in r.output and r.output.count("\n") == 1


def test_status_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[agent]\n")
    r = CliRunner().invoke(main, ["status", "--config", str(bad)])
    assert r.exit_code == 78 and r.output.startswith("Error: ")
