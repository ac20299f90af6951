"""Benchmark the build's cost against model size: wall time and peak memory of ``edgefleet build``.

For three models (the digits CNN, MobileNetV2 0.35 at 96x96x3 and MobileNetV2 1.0 at 224x224x3, the
last two made in code with ``toolchain.steps.architectures`` and fitted for one epoch on images made
in code: accuracy does not matter here, memory does), ``edgefleet build --target all`` runs as a
subprocess, one build at a time, and the whole process tree is measured:

* peak RSS of any single process, from the kernel (``os.wait4``: the build's own high-water mark and
  that of every child it waited for, such as the conversion children of toolchain.steps.isolate);
* peak of the summed RSS of the tree, polled every ``POLL_S`` from /proc (parent and children alive at
  the same moment; a poll can miss a short spike, the single-process figure cannot).

The issue 16 goal is a peak <= 3 GB for the MobileNetV2 1.0 build (300 calibration images).

    .venv/bin/python -m benchmarks.build_memory_bench              # all three (about 10 minutes)
    .venv/bin/python -m benchmarks.build_memory_bench --models cnn # one model
    .venv/bin/python -m benchmarks.build_memory_bench --cache /tmp/bm-cache  # reuse models and data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
POLL_S = 0.05
CALIBRATION_IMAGES = 300
EVAL_IMAGES = 100
CLASSES = 10
FIT_EPOCHS = 1
GOAL_PEAK_BYTES = 3 * 10**9
GOAL_MODEL = "mobilenetv2-1.0-224"
# The same MobileNetV2 1.0 build measured by this script before the memory work (commit c9a50f5,
# everything in one process, whole-set batches), on the machine of the table.
BEFORE = (
    "Before the memory work (commit c9a50f5) the MobileNetV2 1.0 build measured 9.98 GB largest process,"
    " 12.05 GB process tree, 655 s (issue 16 saw 9.4 GB)."
)


@dataclass(frozen=True)
class Case:
    """One model of the table: its key, label, and how it is made (built-in arch, image side, alpha)."""

    key: str
    label: str
    arch: str
    side: int | None  # None: the shipped 8x8 digits
    alpha: float = 1.0


CASES = (
    Case("cnn", "digits CNN (8x8x1)", "cnn", None),
    Case("mobilenetv2-0.35-96", "MobileNetV2 0.35 (96x96x3)", "mobilenetv2", 96, 0.35),
    Case(GOAL_MODEL, "MobileNetV2 1.0 (224x224x3)", "mobilenetv2", 224, 1.0),
)


def images(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``n`` uint8-range float32 images (side x side x 3) of 10 classes and their labels.

    Each class is a bright square at its own place on a noisy background, so a short fit learns a
    little and the quantized models see realistic activation ranges.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    rng.shuffle(y)
    x = rng.uniform(0, 96, size=(n, side, side, 3)).astype(np.float32)
    cell = side // 4
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[i, r * cell : (r + 1) * cell, col * cell : (col + 1) * cell, c % 3] += 150.0
    return np.clip(x, 0, 255), y.astype(np.int64)


def prepare(case: Case, cache: Path) -> tuple[Path, Path, Path, int]:
    """Make (or reuse from ``cache``) the model, its calibration and eval data; return paths and params."""
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / f"{case.key}.keras"
    data = cache / f"{case.key}-calib.npz" if case.side else DIGITS
    test = cache / f"{case.key}-eval.npz" if case.side else DIGITS_TEST
    meta = cache / f"{case.key}.json"
    if model.is_file() and data.is_file() and test.is_file() and meta.is_file():
        return model, data, test, int(json.loads(meta.read_text())["params"])
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.data import load_dataset
    from toolchain.steps.models import save_model

    names = np.array([str(i) for i in range(CLASSES)])
    if case.side:
        x, y = images(CALIBRATION_IMAGES, case.side, 0)
        np.savez(data, x=x, y=y, class_names=names)
        xt, yt = images(EVAL_IMAGES, case.side, 1)
        np.savez(test, x=xt, y=yt, class_names=names)
        del xt, yt
    else:
        ds = load_dataset(DIGITS)
        x, y = ds.x, ds.y
    net = build_architecture(case.arch, x, CLASSES, alpha=case.alpha)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    net.fit(x, y, epochs=FIT_EPOCHS if case.side else 10, batch_size=32, verbose=0)
    save_model(net, model)
    params = int(net.count_params())
    meta.write_text(json.dumps({"params": params}))
    return model, data, test, params


def tree_rss(root: int) -> tuple[int, int]:
    """Return (summed RSS, largest single RSS) in bytes of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:  # the process ended between listdir and read
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * page
    total, largest, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        largest = max(largest, rss.get(pid, 0))
        todo.extend(children.get(pid, []))
    return total, largest


@dataclass
class Run:
    """What one measured build gave."""

    rc: int
    wall_s: float
    peak_single_bytes: int  # kernel high-water mark of the largest single process
    peak_tree_bytes: int  # polled peak of the summed RSS of the tree
    stderr_tail: str


def measure(cmd: list[str], env: dict[str, str]) -> Run:
    """Run ``cmd`` to the end; return its wall time, exit code and peak memory (single and tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid)[0])
            done.wait(POLL_S)

    err: list[str] = []
    poller = threading.Thread(target=poll, daemon=True)
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else ""))
    poller.start()
    reader.start()
    # wait4 (not Popen.wait): its ru_maxrss covers the child and every descendant it waited for.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    reader.join()
    single = int(usage.ru_maxrss) * 1024  # KiB on Linux
    return Run(proc.returncode, wall, single, max(peak[0], single), "".join(err)[-600:])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def run(keys: list[str], cache: Path | None, md: Path, extra_args: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="build-mem-bench-"))
    cache_dir = cache or work / "models"
    rows: list[list[Any]] = []
    notes: list[str] = []
    goal_line = ""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        for case in CASES:
            if case.key not in keys:
                continue
            progress_print(f"== {case.label}: preparing the model and data ...")
            model, data, test, params = prepare(case, cache_dir)
            out = work / f"out-{case.key}"
            cmd = [sys.executable, "-m", "toolchain.cli", "build", str(model), "--data", str(data)]
            cmd += ["--eval-data", str(test), "--target", "all", "--out", str(out), "--allow-accuracy-drop"]
            cmd += ["--max-class-drop", "100", *extra_args]
            progress_print(f"== {case.label}: edgefleet build --target all ...")
            r = measure(cmd, env)
            calib_n = int(np.load(data, mmap_mode="r")["x"].shape[0])
            report_path = out / "report.json"
            ok = "?"
            if report_path.is_file():
                rep = json.loads(report_path.read_text())
                ok = ", ".join(f"{t}: {e['status']}" for t, e in sorted(rep["targets"].items()))
            if r.rc != 0:
                notes.append(f"{case.label}: build exited {r.rc}: {r.stderr_tail.strip().splitlines()[-1:]}")
            rows.append(
                [
                    case.label,
                    f"{params / 1e6:.2f} M",
                    calib_n,
                    f"{r.wall_s:.0f}",
                    gb(r.peak_single_bytes),
                    gb(r.peak_tree_bytes),
                    ok,
                ]
            )
            progress_print(f"   {rows[-1]}")
            if case.key == GOAL_MODEL:
                peak = max(r.peak_single_bytes, r.peak_tree_bytes)
                verdict = "met" if peak <= GOAL_PEAK_BYTES and r.rc == 0 else "MISSED"
                goal_line = (
                    f"Goal (issue 16): MobileNetV2 1.0 at 224x224x3 builds all four targets with a peak"
                    f" <= 3 GB: **{verdict}** ({gb(peak)} GB peak, {r.wall_s:.0f} s)."
                )
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(
        [
            "model",
            "parameters",
            "calibration images",
            "build s",
            "peak RSS, largest process (GB)",
            "peak RSS, process tree (GB)",
            "targets",
        ],
        rows,
    )
    intro = (
        "`edgefleet build --target all` (coral, mobile, raspberry-pi, x86; PTQ) run as a subprocess, one"
        " build at a time. *Largest process* is the kernel's high-water mark (`wait4` ru_maxrss) of the"
        " build and of every child it waited for (the TensorFlow conversions run in child processes,"
        " docs/conversion.md); *process tree* is the summed RSS of the build and its children polled"
        f" every {POLL_S * 1000:.0f} ms (pages two processes share count in each). The MobileNetV2 models are made in code (random images of"
        f" {CLASSES} classes, {CALIBRATION_IMAGES} calibration and {EVAL_IMAGES} eval images, fitted"
        f" {FIT_EPOCHS} epoch): accuracy does not matter here. {BEFORE}"
    )
    body = table + ("\n\n" + goal_line if goal_line else "") + "".join(f"\n\n{n}" for n in notes)
    write_section(
        "build_memory",
        "Build cost against model size (build_memory_bench.py)",
        intro=intro,
        body=body,
        path=md,
    )
    progress_print(body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(c.key for c in CASES), help="comma-separated case keys")
    ap.add_argument("--cache", type=Path, default=None, help="keep the made models and data here")
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD)
    args, extra = ap.parse_known_args(argv)
    run([k.strip() for k in args.models.split(",")], args.cache, args.md, extra)


if __name__ == "__main__":
    main()
