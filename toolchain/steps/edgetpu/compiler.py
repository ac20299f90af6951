"""Run ``edgetpu_compiler`` on an int8 .tflite and read its operation log, in the compiler's own words.

``compile`` runs the real compiler when it is on PATH (in its own session, killed after
``COMPILER_TIMEOUT_S``) and parses the ``Operator  Count  Status`` table of its log into
``CompileRow``s; the status strings below are that table's vocabulary, which the analysis
(``toolchain.steps.edgetpu.rules``) mirrors.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.targets import EdgeTPU

# Seconds edgetpu_compiler may run before it is killed (tests patch it). The compiler's own default
# timeout is 180 s; ours is a little longer so its own message wins when it gives up first.
COMPILER_TIMEOUT_S = 240.0
# Lines of compiler output kept in a failed CompileResult.
LOG_TAIL_LINES = 20

# The compiler's operation-log vocabulary (its "Status" column).
MAPPED = "Mapped to Edge TPU"
NOT_SUPPORTED = "Operation not supported"
LIMITATION = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
DATA_TYPE = "Operation is working on an unsupported data type"
AFTER_UNMAPPED = "More than one subgraph is not supported"
VERSION_NOT_SUPPORTED = "Operation version not supported"
REASONS = (MAPPED, NOT_SUPPORTED, LIMITATION, DATA_TYPE, AFTER_UNMAPPED, VERSION_NOT_SUPPORTED)

STATUS_MAPPED = "mapped"
STATUS_NOT_MAPPED = "not_mapped"


@dataclass(frozen=True)
class CompileRow:
    """One row of the compiler's operation log: an op, how many of it, and their status."""

    op: str
    count: int
    reason: str

    @property
    def status(self) -> str:
        return STATUS_MAPPED if self.reason == MAPPED else STATUS_NOT_MAPPED

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "count": self.count, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class CompileResult:
    """Outcome of running edgetpu_compiler: ``compiled``, ``failed`` or ``compiler_not_found``."""

    status: str
    message: str
    compiled_path: Path | None = None
    log_path: Path | None = None
    compiler_version: str | None = None
    ops: tuple[CompileRow, ...] = ()
    ops_total: int | None = None
    ops_mapped: int | None = None
    on_chip_bytes: int | None = None
    off_chip_bytes: int | None = None
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "compiled_path": str(self.compiled_path) if self.compiled_path else None,
            "log_path": str(self.log_path) if self.log_path else None,
            "compiler_version": self.compiler_version,
            "ops": [r.to_dict() for r in self.ops],
            "ops_total": self.ops_total,
            "ops_mapped": self.ops_mapped,
            "on_chip_bytes": self.on_chip_bytes,
            "off_chip_bytes": self.off_chip_bytes,
            "log_tail": self.log_tail,
        }


_LOG_ROW = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")
_SIZE = re.compile(r"^([\d.]+)\s*(B|KiB|MiB|GiB)$")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(text: str) -> int | None:
    """Parse the compiler's sizes (``3.21MiB``, ``7.75KiB``, ``0.00B``) into bytes."""
    m = _SIZE.match(text.strip())
    return round(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def parse_compiler_log(text: str) -> list[CompileRow]:
    """Parse the ``Operator  Count  Status`` table of an edgetpu_compiler log or stdout."""
    rows: list[CompileRow] = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            in_table = True
            continue
        if not in_table or not line.strip():
            continue
        m = _LOG_ROW.match(line.strip())
        if m is None:
            if rows:
                break  # the table ended
            continue
        rows.append(CompileRow(m.group(1), int(m.group(2)), m.group(3)))
    return rows


def parse_compiler_summary(text: str) -> dict[str, Any]:
    """Pull the version, op counts and memory figures out of edgetpu_compiler's stdout."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if line.startswith("Edge TPU Compiler version"):
            out["version"] = line.rsplit(" ", 1)[-1].strip()
        elif key == "Total number of operations" and value.isdigit():
            out["ops_total"] = int(value)
        elif key == "Number of operations that will run on Edge TPU" and value.isdigit():
            out["ops_mapped"] = int(value)
        elif key == "On-chip memory used for caching model parameters":
            out["on_chip_bytes"] = parse_size(value)
        elif key == "Off-chip memory used for streaming uncached model parameters":
            out["off_chip_bytes"] = parse_size(value)
    return out


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def compile(tflite_path: Path, out_dir: Path, constraints: EdgeTPU) -> CompileResult:  # noqa: A001
    """Run edgetpu_compiler on a .tflite into out_dir/model_edgetpu.tflite and parse its operation log."""
    tflite_path = Path(tflite_path)
    out_dir = Path(out_dir)
    exe = shutil.which(constraints.compiler)
    if exe is None:
        return CompileResult(
            status="compiler_not_found",
            message=(
                f"the Edge TPU compiler {constraints.compiler!r} is not on PATH, so no _edgetpu.tflite was "
                "made; the bundle runs the int8 model on the CPU. Install 'edgetpu-compiler' from Coral's "
                "apt repository (x86_64 Debian/Ubuntu) and build again to run on the Edge TPU."
            ),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    produced = out_dir / f"{tflite_path.stem}_edgetpu.tflite"
    produced_log = out_dir / f"{tflite_path.stem}_edgetpu.log"
    for stale in (produced, produced_log, out_dir / "model_edgetpu.tflite", out_dir / "model_edgetpu.log"):
        stale.unlink(missing_ok=True)  # never mistake an earlier run's output for this one's
    cmd = [exe, "--out_dir", str(out_dir), "--show_operations", str(tflite_path)]
    try:
        # Own session: the compiler forks a worker, and a timeout must stop both.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        return CompileResult(
            status="failed",
            message=f"cannot run {exe} ({e.strerror}); check that it is an executable edgetpu_compiler",
        )
    try:
        stdout, stderr = proc.communicate(timeout=COMPILER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        for partial_file in (produced, produced_log):
            partial_file.unlink(missing_ok=True)
        return CompileResult(
            status="failed",
            message=(
                f"{constraints.compiler} did not finish within {COMPILER_TIMEOUT_S:g} s on "
                f"{tflite_path.name}; the bundle keeps the int8 CPU model (try a smaller model)"
            ),
            log_tail=_tail((stdout or "") + (stderr or "")),
        )
    proc_stdout, proc_stderr, returncode = stdout or "", stderr or "", proc.returncode
    output = proc_stdout + ("\n" + proc_stderr if proc_stderr else "")
    summary = parse_compiler_summary(proc_stdout)
    if returncode != 0 or not produced.is_file():
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        last = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        why = f"exit code {returncode}" if returncode != 0 else f"no {produced.name} was written"
        return CompileResult(
            status="failed",
            message=f"{constraints.compiler} failed on {tflite_path.name} ({why}): {last.strip()}",
            compiler_version=summary.get("version"),
            log_tail=_tail(output),
        )
    compiled = out_dir / "model_edgetpu.tflite"
    if produced != compiled:
        os.replace(produced, compiled)
    log_path: Path | None = None
    log_text = proc_stdout
    if produced_log.is_file():
        log_path = out_dir / "model_edgetpu.log"
        if produced_log != log_path:
            os.replace(produced_log, log_path)
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
    rows = parse_compiler_log(log_text) or parse_compiler_log(proc_stdout)
    mapped = sum(r.count for r in rows if r.reason == MAPPED) if rows else summary.get("ops_mapped")
    total = sum(r.count for r in rows) if rows else summary.get("ops_total")
    if mapped is not None and total:
        msg = f"compiled: {mapped} of {total} ops run on the Edge TPU"
    else:
        msg = "compiled"
    return CompileResult(
        status="compiled",
        message=msg,
        compiled_path=compiled,
        log_path=log_path,
        compiler_version=summary.get("version"),
        ops=tuple(rows),
        ops_total=total,
        ops_mapped=mapped,
        on_chip_bytes=summary.get("on_chip_bytes"),
        off_chip_bytes=summary.get("off_chip_bytes"),
    )
