"""Shared helpers for benchmark scripts: machine info and BENCHMARKS.md sections.

Each benchmark owns one section of ``BENCHMARKS.md`` between ``<!-- begin NAME -->`` and
``<!-- end NAME -->`` markers; ``write_section`` replaces that section (or appends it) and leaves every
other benchmark's section alone, so scripts run in any order.

Usage::

    from benchmarks._bench import machine_info, markdown_table, write_section
    table = markdown_table(["case", "p50 ms"], [["ours", 1.2], ["plain", 1.5]])
    write_section("build", "Build pipeline", intro="...", body=table)

Run a benchmark as ``python -m benchmarks.NAME`` from the repository root, or as a script that puts the
repository root on ``sys.path`` first (``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
DEFAULT_LIBRARIES = (
    "numpy",
    "tensorflow",
    "tf-keras",
    "tensorflow-model-optimization",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "openvino",
    "ai-edge-litert",
)
HEADER = (
    "# Benchmarks\n\n"
    "Each section is written by the script named in it (`benchmarks/*.py`) and replaced when it runs again.\n"
    "Numbers are from the machine listed in the section, measured in one run side by side.\n"
)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    """Return total RAM in GiB (Linux), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1024 * 1024), 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def library_versions(names: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, str]:
    """Return installed versions of the named distributions (missing ones are left out)."""
    out: dict[str, str] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine_info(libraries: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, Any]:
    """Return what a benchmark row needs to be reproducible: CPU, cores, RAM, OS, Python, libraries."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": ram_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": library_versions(libraries),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_markdown(info: dict[str, Any] | None = None) -> str:
    """Return the machine info as a short markdown paragraph."""
    info = info or machine_info()
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items())
    ram = f"{info['ram_gib']} GiB RAM" if info.get("ram_gib") else "RAM unknown"
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {ram}, {info['os']}, Python {info['python']}; "
        f"run {info['date_utc']}.  \nLibraries: {libs or 'n/a'}.\n"
    )


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Return a GitHub markdown table; floats are shortened, None is '-'."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def render_section(
    name: str, title: str, body: str, intro: str = "", info: dict[str, Any] | None = None
) -> str:
    """Return a complete marked section (markers, heading, machine info, intro, body)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"section name {name!r} must be lowercase letters, digits, '-' or '_'")
    parts = [f"<!-- begin {name} -->", f"## {title}", "", machine_markdown(info)]
    if intro:
        parts += [intro.rstrip() + "\n"]
    parts += [body.rstrip() + "\n", f"<!-- end {name} -->"]
    return "\n".join(parts)


def replace_section(doc: str, name: str, section: str) -> str:
    """Return ``doc`` with the section ``name`` replaced by ``section`` (appended when absent)."""
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _m: section, doc, count=1)
    if not doc.strip():
        doc = HEADER
    return doc.rstrip("\n") + "\n\n" + section + "\n"


def write_section(
    name: str,
    title: str,
    body: str,
    intro: str = "",
    path: Path = BENCHMARKS_MD,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write (replace or append) one benchmark's section of BENCHMARKS.md atomically; return the path."""
    section = render_section(name, title, body, intro=intro, info=info)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    new = replace_section(old, name, section)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
    return path


def publish_section(name: str, title: str, body: str, intro: str = "", path: Path = BENCHMARKS_MD) -> Path:
    """Write one benchmark's section of BENCHMARKS.md (``write_section``) and print its table to stdout."""
    out = write_section(name, title, body, intro=intro, path=path)
    print(body)
    return out


def progress_print(*args: Any) -> None:
    """Print a progress line to stderr (benchmarks keep stdout for results)."""
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(work: Path, extra_conf: str = "") -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """Start Mosquitto on a free port (anonymous, no persistence, ``extra_conf`` lines appended).

    Return (process, ``mqtt://`` URL), or (None, None) when it is not installed or does not listen in 10 s.
    """
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if not binary:
        return None, None
    port = free_port()
    conf = work / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}{extra_conf}")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def train_cached(
    arch: str, data: Path, out: Path, epochs: int, cache: Path | None, *, patience: int
) -> tuple[Path, float]:
    """Train ``arch`` on ``data`` into ``out`` (or copy it from ``cache``); return it and the seconds taken.

    The seconds are NaN for a model copied from ``cache``.
    """
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    cached = cache / out.name if cache is not None else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, out)
        return out, float("nan")
    t0 = time.perf_counter()
    train_model(load_dataset(data), arch, epochs, out, patience=patience, progress=sys.stderr.isatty())
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, cached)
    return out, time.perf_counter() - t0
