"""``edgefleet profile``: the bench on a device over a real sshd (127.0.0.1) and locally."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import DEVICE_PROFILE_FILE, BundleError, VerifyPolicy, verify_bundle
from toolchain.cli import main

REPO = Path(__file__).resolve().parents[2]
# How the "device" (this machine, reached over ssh) starts the agent: the test's own interpreter and
# checkout, since the ssh session's PATH does not hold the venv.
AGENT_COMMAND = f"env PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} -m device_agent.cli"


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def eval_npz(tmp_path: Path, digits: dict[str, np.ndarray]) -> Path:
    p = tmp_path / "eval.npz"
    np.savez(p, x=digits["x_test"][:80].reshape(80, -1), y=digits["y_test"][:80])  # the bundle takes (n, 64)
    return p


def _build_dir(bundle: Path, root: Path) -> Path:
    """Lay the bundle out as a build folder (OUT/x86 + report.json) and return the bundle path."""
    out = root / "out"
    out.mkdir()
    dst = out / "x86"
    shutil.copytree(bundle, dst)
    report = {
        "schema": 1,
        "name": "digits",
        "version": 2,
        "created_at": "2026-12-05T00:00:00Z",
        "targets": {"x86": {"status": "ok", "bundle": "x86", "accuracy": 0.9}},
    }
    (out / "report.json").write_text(json.dumps(report))
    return dst


def _ssh(sshd: object) -> list[str]:
    opts: list[str] = []
    for o in sshd.ssh_options:  # type: ignore[attr-defined]
        opts += ["--ssh-option", o]
    return opts + ["--agent-command", AGENT_COMMAND]


@pytest.mark.ssh
@pytest.mark.timeout(240)
def test_profile_over_ssh_keeps_the_signature_and_fills_the_report(
    sshd, make_version, ota_keys, tmp_path, eval_npz
) -> None:
    device = tmp_path / "device"
    device.mkdir()
    b = _build_dir(make_version(2), tmp_path)
    code, out, err = run(
        "profile", str(b), "--on", sshd.url(device), "--eval-data", str(eval_npz), "--runs", "60",
        "--key", str(ota_keys["pub"]), "--json", *_ssh(sshd),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host"] == "127.0.0.1" and doc["eval_data"] == "eval.npz" and doc["label"] == "y"
    bench = doc["bench"]
    assert bench["samples"] == 80 and bench["accuracy"] > 0.8 and bench["latency_ms_p95"] > 0
    assert bench["bundle"]["version"] == 2 and bench["cpu"]["count"] >= 1
    # the device folder is left as found
    assert list(device.iterdir()) == []
    # beside the signed files, unlisted: the signature still verifies with the trusted key
    assert json.loads((b / DEVICE_PROFILE_FILE).read_text()) == doc
    verify_bundle(b, VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]])))
    report = json.loads((b.parent / "report.json").read_text())
    assert report["targets"]["x86"]["device_profile"] == doc
    page = (b.parent / "report.html").read_text()
    assert "On the device" in page and "<td>127.0.0.1</td>" in page
    # the profile is measurement, never shipped: flash copies only the listed files
    state = tmp_path / "state"
    state.mkdir()
    code, _, err = run("flash", str(b), "--to", str(state))
    assert code == 0, err
    (drop,) = list((state / "bundles" / "incoming").iterdir())
    assert not (drop / DEVICE_PROFILE_FILE).exists()


@pytest.mark.ssh
@pytest.mark.timeout(240)
def test_profile_over_budget_fails_with_one_line_but_keeps_the_evidence(
    sshd, make_version, tmp_path, eval_npz, monkeypatch
) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    x86 = (REPO / "targets" / "x86.toml").read_text()
    (targets / "x86.toml").write_text(x86 + "\n[budget]\nmax_latency_ms = 0.000001\n")
    monkeypatch.setenv("EDGEFLEET_TARGETS", str(targets))
    device = tmp_path / "device"
    device.mkdir()
    b = make_version(2, key=None)
    code, out, err = run(
        "profile", str(b), "--on", sshd.url(device), "--eval-data", str(eval_npz), "--runs", "30", *_ssh(sshd)
    )
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("Error: max_latency_ms: measured "), err
    assert "on 127.0.0.1 is over the x86 budget of 0.000 ms (p95)" in line
    doc = json.loads((b / DEVICE_PROFILE_FILE).read_text())
    assert doc["budget"]["checked"] is True and doc["budget"]["max_latency_ms"]["ok"] is False
    assert doc["budget_error"] == line.removeprefix("Error: ")
    # --no-budget-check only records
    code, out, err = run(
        "profile", str(b), "--on", sshd.url(device), "--runs", "30", "--no-budget-check", *_ssh(sshd)
    )
    assert code == 0, err
    assert "budget: not checked" not in out and "wrote " in out
    assert json.loads((b / DEVICE_PROFILE_FILE).read_text())["bench"]["input"] == "synthetic"


@pytest.mark.ssh
@pytest.mark.timeout(180)
def test_profile_over_ssh_errors_are_one_line(sshd, make_version, tmp_path) -> None:
    b = make_version(2, key=None)
    code, _, err = run("profile", str(b), "--on", sshd.url(tmp_path / "nope"), *_ssh(sshd))
    assert code == 1 and "no such directory" in err and err.count("\n") == 1, err
    opts = _ssh(sshd)
    opts[-1] = "/nonexistent/edgefleet-agent"
    code, _, err = run("profile", str(b), "--on", sshd.url(tmp_path), *opts)
    assert code == 1 and "cannot run on 127.0.0.1" in err and "--agent-command" in err, err
    assert [p for p in tmp_path.iterdir() if p.name.startswith("edgefleet-profile-")] == []


def test_profile_local_and_bad_arguments(make_version, tmp_path, eval_npz) -> None:
    b = make_version(3, key=None)
    code, out, err = run("profile", str(b), "--on", "local", "--eval-data", str(eval_npz), "--runs", "30")
    assert code == 0, err
    assert "accuracy" in out and "p95" in out and f"wrote {b / DEVICE_PROFILE_FILE}" in out
    assert "budget: not checked (target 'x86' sets no [budget] max_latency_ms)" in out
    doc = json.loads((b / DEVICE_PROFILE_FILE).read_text())
    assert doc["on"] == "local" and doc["bench"]["accuracy"] > 0.8
    for args, needle in [
        (["--on", "mqtt://broker/fleet"], "use ssh://user@host[:port]/DIR"),
        (["--on", "local", "--eval-data", str(tmp_path / "none.npz")], "is not a file"),
        (["--on", "local", "--label", "y"], "--label needs --eval-data"),
    ]:
        code, _, err = run("profile", str(b), *args)
        assert code == 1 and needle in err and err.count("\n") == 1, err
    code, _, err = run("profile", str(tmp_path / "nobundle"), "--on", "local")
    assert code == 1 and "is not a folder" in err


def _relative_layout(bundle: Path, eval_npz: Path, root: Path) -> Path:
    """A working folder with the bundle and the data in it, to name them relative to it."""
    work = root / "my work"
    work.mkdir()
    shutil.copytree(bundle, work / "bundle")
    shutil.copy(eval_npz, work / "eval.npz")
    return work


def test_profile_local_takes_paths_relative_to_the_caller(
    make_version, tmp_path, eval_npz, monkeypatch
) -> None:
    """The local bench runs in a folder of its own: relative --eval-data and BUNDLE are the caller's."""
    work = _relative_layout(make_version(3, key=None), eval_npz, tmp_path)
    monkeypatch.chdir(work)
    code, out, err = run(
        "profile", "bundle", "--on", "local", "--eval-data", "eval.npz", "--runs", "20", "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["eval_data"] == "eval.npz" and doc["bench"]["samples"] == 80 and doc["bench"]["accuracy"] > 0.8
    assert (work / "bundle" / DEVICE_PROFILE_FILE).is_file()


@pytest.mark.ssh
@pytest.mark.timeout(240)
def test_profile_over_ssh_takes_paths_relative_to_the_caller(
    sshd, make_version, tmp_path, eval_npz, monkeypatch
) -> None:
    work = _relative_layout(make_version(2, key=None), eval_npz, tmp_path)
    device = tmp_path / "device"
    device.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run(
        "profile", "bundle", "--on", sshd.url(device), "--eval-data", "eval.npz", "--runs", "20", "--json",
        *_ssh(sshd),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["bench"]["samples"] == 80 and doc["bench"]["accuracy"] > 0.8
    assert (work / "bundle" / DEVICE_PROFILE_FILE).is_file() and list(device.iterdir()) == []


def test_a_listed_device_profile_is_refused_and_other_extra_files_still_are(make_version) -> None:
    from device_agent.formats.manifest import check_relpath

    with pytest.raises(BundleError, match="reserved"):
        check_relpath(DEVICE_PROFILE_FILE)
    b = make_version(2, key=None)
    (b / DEVICE_PROFILE_FILE).write_text("{}")
    verify_bundle(b, VerifyPolicy(allow_unsigned=True))
    (b / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="which the manifest does not list"):
        verify_bundle(b, VerifyPolicy(allow_unsigned=True))
