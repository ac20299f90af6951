"""``edgefleet profile``: run ``edgefleet-agent bench`` on a device and keep the result with the bundle.

Order of work: verify the bundle on the host (every hash; the signature with ``--key``); copy a clean
bundle (manifest, signature, listed files: what ``flash`` sends) and the evaluation data to the
device (``ssh://user@host[:port]/DIR``: a fresh folder under DIR, removed afterwards) or to a
temporary folder (``local``: this machine, in a fresh process); run the bench there; write
``device_profile.json`` into the bundle folder (unsigned and unlisted: the signature stays valid
and ``verify_bundle`` tolerates exactly this file) and into ``report.json``/``report.html`` of the
build folder when the bundle sits in one; then check the target's ``[budget]`` keys a device
measures (``max_latency_ms`` against the device's p95). Over budget: the files are written first
(the evidence stays), then ``BudgetError``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from device_agent.formats.manifest import DEVICE_PROFILE_FILE, Manifest, manifest_sha256
from toolchain.errors import ToolchainError

PROFILE_SCHEMA = 1
BENCH_TIMEOUT_S = 600.0
DEFAULT_AGENT_COMMAND = "edgefleet-agent"
LOCAL = "local"
EVAL_SUFFIXES = (".npz", ".npy", ".csv")


class ProfileError(ToolchainError):
    """A bundle cannot be profiled on the device (destination, data, the bench itself)."""


@dataclass(frozen=True)
class ProfileResult:
    """What ``profile_bundle`` wrote: the profile document and the files it went to."""

    doc: dict[str, Any]
    profile_path: Path
    report_path: Path | None


def check_eval_data(path: str | Path | None, label: str | None) -> tuple[Path | None, str | None]:
    """Return the eval file and the label array/column to pass to the bench (``y`` of an .npz by default)."""
    if path is None:
        if label is not None:
            raise ProfileError("--label needs --eval-data (the file holding the labels)")
        return None, None
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"--eval-data {str(p)!r} is not a file; pass a .npz (x, y), .npy or .csv")
    # absolute: the local bench runs in a folder of its own, where a relative path means nothing
    p = p.resolve()
    if p.suffix.lower() not in EVAL_SUFFIXES:
        raise ProfileError(
            f"--eval-data {str(p)!r}: use a .npz (arrays x and y), .npy or .csv (with --label)"
        )
    if label is None and p.suffix.lower() == ".npz":
        import numpy as np

        try:
            with np.load(p, allow_pickle=False) as z:
                files = set(z.files)
        except (OSError, ValueError) as e:
            raise ProfileError(f"cannot read --eval-data {str(p)!r} ({e})") from None
        if "x" not in files:
            raise ProfileError(f"--eval-data {str(p)!r} has no array 'x' (it has {', '.join(sorted(files))})")
        label = "y" if "y" in files else None
    return p, label


def _bench_args(
    bundle: str, data: str | None, label: str | None, runs: int, runtime: str | None
) -> list[str]:
    args = ["bench", "--bundle", bundle, "--json", "--runs", str(runs)]
    if data is not None:
        args += ["--input", data]
    if label is not None:
        args += ["--label", label]
    if runtime is not None:
        args += ["--runtime", runtime]
    return args


def _parse_bench(stdout: str, where: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                break
            if isinstance(doc, dict) and "latency_ms_p95" in doc:
                return doc
    raise ProfileError(f"the bench on {where} printed no result; run 'edgefleet-agent bench --json' there")


def _failure(stderr: str, where: str, agent: str) -> ProfileError:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = (lines or ["(no output)"])[-1][:300]
    if "not found" in last or "No such file" in last:
        return ProfileError(
            f"{agent!r} cannot run on {where} ({last}); install edgefleet[device] there"
            " or pass --agent-command"
        )
    return ProfileError(f"the bench on {where} failed: {last.removeprefix('Error: ')}")


def bench_local(
    bundle: Path, m: Manifest, data: Path | None, label: str | None, runs: int, runtime: str | None
) -> dict[str, Any]:
    """Run the bench in a fresh process on this machine, on a clean copy of the bundle."""
    from toolchain.shipping.flash import copy_clean

    with tempfile.TemporaryDirectory(prefix="edgefleet-profile-") as tmp:
        clean = Path(tmp) / "bundle"
        copy_clean(bundle, m, clean)
        cmd = [sys.executable, "-m", "device_agent.cli"] + _bench_args(
            str(clean), str(data) if data else None, label, runs, runtime
        )
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise ProfileError(f"the bench did not finish within {BENCH_TIMEOUT_S:g} s") from None
    if r.returncode != 0:
        raise _failure(r.stderr, "this machine", "device_agent.cli")
    return _parse_bench(r.stdout, "this machine")


def bench_ssh(
    bundle: Path,
    m: Manifest,
    dest: Any,
    data: Path | None,
    label: str | None,
    runs: int,
    runtime: str | None,
    ssh_options: Sequence[str] = (),
    agent_command: str = DEFAULT_AGENT_COMMAND,
) -> dict[str, Any]:
    """Copy the clean bundle and the data into a fresh folder under the device's DIR, bench, clean up."""
    from toolchain.shipping.flash import FlashError, _run, _ssh_base, copy_clean

    q = shlex.quote
    ssh = _ssh_base(dest, ssh_options)
    work = f"{dest.path.rstrip('/')}/edgefleet-profile-{manifest_sha256(bundle)[:12]}-{os.getpid()}"
    try:
        _run(
            ssh
            + [
                f"test -d {q(dest.path)} || {{ echo 'no such directory: {dest.path}' >&2; exit 3; }};"
                f" rm -rf {q(work)} && mkdir -p {q(work)}"
            ],
            f"ssh {dest.login}",
        )
        try:
            with tempfile.TemporaryDirectory(prefix="edgefleet-profile-") as tmp:
                clean = Path(tmp) / "bundle"
                copy_clean(bundle, m, clean)
                sources = [str(clean)]
                if data is not None:
                    staged = Path(tmp) / ("eval" + data.suffix.lower())
                    staged.write_bytes(data.read_bytes())
                    sources.append(str(staged))
                scp = ["scp", "-B", "-q", "-r"] + (["-P", str(dest.port)] if dest.port else [])
                for o in ssh_options:
                    scp += ["-o", o]
                _run(scp + sources + [f"{dest.login}:{work}/"], "scp")
            remote_data = f"eval{data.suffix.lower()}" if data is not None else None
            args = _bench_args("bundle", remote_data, label, runs, runtime)
            cmd = f"cd {q(work)} && {agent_command} " + " ".join(q(a) for a in args)
            try:
                r = subprocess.run(ssh + [cmd], capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise ProfileError(
                    f"the bench on {dest.host} did not finish within {BENCH_TIMEOUT_S:g} s"
                ) from None
            if r.returncode != 0:
                raise _failure(r.stderr, dest.host, agent_command)
            return _parse_bench(r.stdout, dest.host)
        finally:
            try:
                _run(ssh + [f"rm -rf {q(work)}"], f"ssh {dest.login} (clean up)")
            except FlashError:
                pass  # the result matters more than a leftover folder; it is named after the bundle
    except FlashError as e:
        raise ProfileError(str(e)) from None


def device_budget_check(m: Manifest, bench: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    """Check the keys of the target's ``[budget]`` a device measures; return (verdict, error line)."""
    from dataclasses import replace

    from toolchain.steps.budget import BudgetError, check_budget
    from toolchain.targets import Budget, TargetError, load_target

    try:
        target = load_target(m.target)
    except TargetError:
        return {"checked": False, "reason": f"no target profile {m.target!r} here"}, None
    if target.budget is None or target.budget.max_latency_ms is None:
        return {"checked": False, "reason": f"target {m.target!r} sets no [budget] max_latency_ms"}, None
    only = replace(target, budget=Budget(max_latency_ms=target.budget.max_latency_ms))
    try:
        verdict = check_budget(only, {"max_latency_ms": bench.get("latency_ms_p95")}, where=f"on {where}")
    except BudgetError as e:
        return dict(e.verdict, checked=True), str(e)
    return dict(verdict, checked=True), None


def profile_bundle(
    bundle: str | Path,
    on: str,
    *,
    eval_data: str | Path | None = None,
    label: str | None = None,
    runs: int = 200,
    runtime: str | None = None,
    public_key: str | Path | None = None,
    ssh_options: Sequence[str] = (),
    agent_command: str = DEFAULT_AGENT_COMMAND,
    check_budget: bool = True,
) -> ProfileResult:
    """Bench ``bundle`` on ``on`` (``local`` or ``ssh://...``), write the profile; see the module doc."""
    from toolchain.shipping.flash import SshDest, check_bundle, parse_destination
    from toolchain.steps.budget import BudgetError

    b = Path(bundle)
    if not b.is_dir():
        raise ProfileError(
            f"bundle {str(bundle)!r} is not a folder; pass the folder that holds manifest.json"
        )
    m = check_bundle(b, Path(public_key) if public_key else None)
    data, label = check_eval_data(eval_data, label)
    if on == LOCAL:
        where = socket.gethostname()
        bench = bench_local(b, m, data, label, runs, runtime)
    else:
        dest = parse_destination(on) if on.startswith("ssh://") else None
        if not isinstance(dest, SshDest):
            raise ProfileError(
                f"--on {on!r}: use ssh://user@host[:port]/DIR (a folder on the device) or local"
            )
        where = dest.host
        bench = bench_ssh(b, m, dest, data, label, runs, runtime, ssh_options, agent_command)
    if bench.get("bundle", {}).get("sha256") != manifest_sha256(b):
        raise ProfileError("the device benched another bundle than the one given (manifest sha256 differs)")
    verdict, error = device_budget_check(m, bench, where) if check_budget else ({"checked": False}, None)
    doc = {
        "schema": PROFILE_SCHEMA,
        "on": on if on == LOCAL else _safe_url(on),
        "host": where,
        "eval_data": data.name if data is not None else None,
        "label": label,
        "profiled_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bench": bench,
        "budget": verdict,
        "budget_error": error,
    }
    profile_path = b / DEVICE_PROFILE_FILE
    _write_json(profile_path, doc)
    report_path = _into_report(b, doc)
    if error is not None:
        raise BudgetError(error, verdict)
    return ProfileResult(doc, profile_path, report_path)


def _safe_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise ProfileError(f"cannot write {str(path)!r} ({e.strerror}); check permissions") from None


def _into_report(bundle: Path, doc: dict[str, Any]) -> Path | None:
    """Add the profile to the build folder's report (entry of this bundle's target), re-render the HTML."""
    from toolchain.report import REPORT_JSON, ReportError, load_report, write_report

    out = bundle.resolve().parent
    if not (out / REPORT_JSON).is_file():
        return None
    try:
        report = load_report(out)
    except ReportError:
        return None
    entry = report.get("targets", {}).get(bundle.resolve().name)
    if not isinstance(entry, dict) or entry.get("bundle") != bundle.resolve().name:
        return None
    entry["device_profile"] = doc
    try:
        write_report(out, report)
    except OSError as e:
        raise ProfileError(f"cannot update {str(out / REPORT_JSON)!r} ({e.strerror})") from None
    return out / REPORT_JSON
