"""Safe defaults on the host (issue 12, finding 7): key modes whatever the umask, no signing with a
readable private key, ``serve`` on loopback, passwords kept off the command line, device text escaped
in the terminal, and ``verify`` saying loudly when it did not check the signature."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from device_agent.formats.keys import KeyFileError, load_public_key_file
from tests.conftest import Mosquitto
from tests.helpers import wait_for
from toolchain.cli import main
from toolchain.cli.passwords import CMDLINE_WARNING, password_options, resolve_password
from toolchain.cli.terminal import safe_text
from toolchain.shipping.signing import SigningError, create_keys, sign_bundle

pytestmark = [pytest.mark.timeout(120)]
EDGEFLEET = [sys.executable, "-m", "toolchain.cli"]


def run(args: list[str], umask: int | None = None, env: dict[str, str] | None = None, timeout_s: float = 60):
    """Run ``edgefleet ARGS`` in a subprocess (optionally under ``umask``); return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        EDGEFLEET + args,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=full_env,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,  # noqa: PLW1509 - single-threaded here
    )


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A small valid bundle (digits baseline, placeholder model)."""
    from toolchain.fleet.sim import digits_baseline, write_bundle

    return write_bundle(tmp_path / "bundle", digits_baseline()[0])[0]


# --------------------------------------------------------------------------------------------------
# keys


def test_keys_create_under_umask_000_is_still_private(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    r = run(["keys", "create", "--out", str(out)], umask=0o000)
    assert r.returncode == 0, r.stderr
    assert mode(out) == 0o700  # was 0777
    assert mode(out / "fleet.key") == 0o600
    assert mode(out / "fleet.pub") == 0o644  # was 0666
    # --force over files someone left world-writable puts the modes right as well.
    (out / "fleet.key").chmod(0o666)
    (out / "fleet.pub").chmod(0o666)
    r = run(["keys", "create", "--out", str(out), "--force"], umask=0o000)
    assert r.returncode == 0, r.stderr
    assert (mode(out / "fleet.key"), mode(out / "fleet.pub")) == (0o600, 0o644)


def test_keys_create_refuses_a_folder_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = run(["keys", "create", "--out", str(shared)])
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("Error: ") and f"chmod 700 {shared}" in r.stderr
    assert not (shared / "fleet.key").exists()


def test_signing_with_a_key_others_can_read_is_refused(tmp_path: Path, bundle: Path) -> None:
    priv, _ = create_keys(tmp_path / "k")
    priv.chmod(0o644)
    with pytest.raises(SigningError) as e:
        sign_bundle(bundle, priv)
    msg = str(e.value)
    assert "\n" not in msg and f"chmod 600 {priv}" in msg and "0644" in msg
    assert not (bundle / "manifest.sig").exists()
    priv.chmod(0o600)
    sign_bundle(bundle, priv)  # the fix the message gives works
    assert (bundle / "manifest.sig").is_file()


def test_the_agent_refuses_a_trusted_key_others_can_change(tmp_path: Path) -> None:
    _, pub = create_keys(tmp_path / "k")
    assert len(load_public_key_file(pub)) == 32
    pub.chmod(0o666)
    with pytest.raises(KeyFileError, match=re.escape(f"chmod 644 {pub}")):
        load_public_key_file(pub)


# --------------------------------------------------------------------------------------------------
# verify


def test_verify_without_a_key_says_the_signature_was_not_checked(tmp_path: Path, bundle: Path) -> None:
    priv, pub = create_keys(tmp_path / "k")
    sign_bundle(bundle, priv)
    r = run(["verify", str(bundle)])
    assert r.returncode == 0
    assert "NOT CHECKED" in r.stdout and "signature was NOT CHECKED" in r.stderr and "--key" in r.stderr
    r = run(["verify", str(bundle), "--json"])
    assert '"signature_checked": false' in r.stdout
    r = run(["verify", str(bundle), "--key", str(pub)])
    assert r.returncode == 0 and "signature verified" in r.stdout and "NOT CHECKED" not in r.stdout + r.stderr


# --------------------------------------------------------------------------------------------------
# serve


def test_serve_listens_on_loopback_unless_told_otherwise(bundle: Path) -> None:
    import urllib.request

    proc = subprocess.Popen(
        [*EDGEFLEET, "serve", str(bundle), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"at http://([0-9.]+):(\d+)/", line)
        assert m, line
        assert m.group(1) == "127.0.0.1"  # was 0.0.0.0: every interface
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(2)}/manifest.json", timeout=10) as resp:
            assert resp.status == 200
        listening = Path("/proc/net/tcp").read_text()
        port_hex = f"{int(m.group(2)):04X}"
        rows = [ln.split() for ln in listening.splitlines()[1:] if ln.split()[1].endswith(":" + port_hex)]
        assert rows and all(r[1] == "0100007F:" + port_hex for r in rows if r[3] == "0A")
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------------------------------
# passwords


def test_password_flags_warn_and_the_env_var_and_file_do_not(tmp_path: Path) -> None:
    base = ["fleet", "collect", "--broker", "mqtt://127.0.0.1:1", "--db", "bogus://x", "--username", "u"]
    r = run([*base, "--password", "hunter2"])
    assert r.returncode == 78 and CMDLINE_WARNING in r.stderr  # warned before the bad --db stopped it
    r = run(base, env={"EDGEFLEET_MQTT_PASSWORD": "hunter2"})
    assert r.returncode == 78 and "Warning" not in r.stderr
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    r = run([*base, "--password-file", str(pw)])
    assert r.returncode == 78 and "Warning" not in r.stderr
    r = run([*base, "--password-file", str(pw), "--password", "x"])
    assert r.returncode == 2 and "one way only" in r.stderr
    r = run(["fleet", "deploy", "b", "--broker", "http://x", "--fleet", "lab", "--password", "hunter2"])
    assert CMDLINE_WARNING in r.stderr and r.returncode == 1
    r = run(["flash", "b", "--to", "mqtt://u:hunter2@127.0.0.1:1/lab/d1"])
    assert "password in the --to URL" in r.stderr


def test_password_file_and_env_var_reach_the_command(tmp_path: Path) -> None:
    got: dict[str, Any] = {}

    @click.command()
    @password_options
    def cmd(password: str | None, password_file: str | None) -> None:
        got["pw"] = resolve_password(password, password_file)

    pw = tmp_path / "pw"
    pw.write_text("s3cret with spaces\r\nsecond line\n")
    r = CliRunner().invoke(cmd, ["--password-file", str(pw)])
    assert r.exit_code == 0 and got["pw"] == "s3cret with spaces" and "Warning" not in r.output
    r = CliRunner().invoke(cmd, [], env={"EDGEFLEET_MQTT_PASSWORD": "from-env"})
    assert r.exit_code == 0 and got["pw"] == "from-env" and "Warning" not in r.output
    r = CliRunner().invoke(cmd, [], env={"EDGEFLEET_MQTT_PASSWORD_FILE": str(pw)})
    assert r.exit_code == 0 and got["pw"] == "s3cret with spaces"
    r = CliRunner().invoke(cmd, ["--password-file", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "missing" in r.output


# --------------------------------------------------------------------------------------------------
# terminal output


def test_safe_text_shows_control_characters_instead_of_obeying_them() -> None:
    assert safe_text("1.0\r\nok\tx") == "1.0\\r\\nok\\tx"
    assert safe_text("\x1b[2J\x07\x7f\x9b") == "\\x1b[2J\\x07\\x7f\\x9b"
    assert safe_text("abc\u202edef") == "abc\\u202edef"  # right-to-left override
    assert safe_text("café 1.2-rc") == "café 1.2-rc" and safe_text(3) == 3 and safe_text(None) is None


@pytest.mark.broker
def test_fleet_status_escapes_what_a_device_reports(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A device's agent_version with CR/LF and an escape sequence, through a real broker and collector."""
    from toolchain.fleet.collector import Collector
    from toolchain.fleet.sim import Publisher
    from toolchain.fleet.storage import open_store

    hostile = "1.0\r\nlab  evil  online\x1b[2J\x1b]0;pwned\x07"
    raw = (
        '{"schema": 1, "type": "status", "device_id": "cam-1", "fleet": "lab", "state": "online",'
        ' "ts": "2026-12-05T08:00:00.000Z", "model": null, "agent_version": '
        + __import__("json").dumps(hostile)
        + ', "target": "x86"}'
    )
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    col = Collector(db, mosquitto.url, fleet="lab", client_id="esc", evaluate=False, worker_processes=0)
    col.start()
    try:
        assert col.wait_ready(20)
        pub = Publisher(mosquitto.url)
        pub.publish("edgefleet/lab/cam-1/status", raw.encode())
        assert pub.wait_acked(20)
        pub.close()

        def stored() -> Any:
            with open_store(db) as s:
                return s.query("SELECT agent_version FROM devices WHERE device_id = 'cam-1'")

        rows = wait_for(stored, 30, "the device row")
    finally:
        col.stop()
    assert rows[0][0] == hostile  # stored as reported
    r = CliRunner().invoke(main, ["fleet", "status", "--db", db])
    assert r.exit_code == 0, r.output
    assert "\r" not in r.output and "\x1b" not in r.output and "\x07" not in r.output
    assert "1.0\\r\\nlab  evil  online\\x1b[2J" in r.output
    assert sum("cam-1" in line for line in r.output.splitlines()) == 1  # no forged second row
    r = CliRunner().invoke(main, ["fleet", "status", "--db", db, "--json"])
    assert __import__("json").loads(r.output)["devices"][0]["agent_version"] == hostile
