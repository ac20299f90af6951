"""Benchmark compression to the limit: pruning, weight clustering and QAT side by side, in one run.

For the digits CNN (built-in ``cnn``) and a MobileNetV2 (alpha 0.35) trained on a 32x32x3 colour image
set made in code (the digits upsampled 4x, drawn in a random colour on a random darker background with
noise, values in [0, 1]), and for one TFLite target (``mobile``) and, for the CNN, the ONNX target
(``x86``): plain PTQ, prune 50 % + PTQ, cluster K + PTQ, prune + cluster + PTQ, and the
cluster-preserving QAT (CQAT) and pruning-cluster-preserving QAT (PCQAT) builds. Every row is a real
``build_bundles`` run; sizes and unique weights per channel come from the report's ``compression``
section (read from the shipped file). Writes the ``compress`` section of BENCHMARKS.md.

    .venv/bin/python -m benchmarks.compress_bench                 # both models (about 20 min on 2 cores)
    .venv/bin/python -m benchmarks.compress_bench --quick         # the digits CNN only
    .venv/bin/python -m benchmarks.compress_bench --cache DIR     # reuse trained models
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"
CNN_EPOCHS = 30
MOBILENET_EPOCHS = 40
PATIENCE = 8
UPSAMPLE = 4
SEED = 0
# (label, quantize, prune, cluster K); K per model below
CONFIGS: tuple[tuple[str, str, float | None, bool], ...] = (
    ("PTQ", "ptq", None, False),
    ("prune 50% + PTQ", "ptq", 0.5, False),
    ("cluster K + PTQ", "ptq", None, True),
    ("prune 50% + cluster K + PTQ", "ptq", 0.5, True),
    ("cluster K + CQAT", "qat", None, True),
    ("prune 50% + cluster K + PCQAT", "qat", 0.5, True),
)
# (model label, goal gzip ratio to the float TFLite file, goal accuracy loss in points)
GOALS = {"digits CNN": (0.12, 0.5), "MobileNetV2 0.35 (32x32x3)": (0.15, 1.0)}


def colour_digits(src: Path, dst: Path, seed: int) -> Path:
    """Write a 32x32x3 colour image set in [0, 1] made from the 8x8 digits (labels kept).

    Each digit is upsampled 4x (nearest neighbour) and drawn in a random bright colour on a random
    darker background, with Gaussian noise (sigma 0.05), then clipped to [0, 1].
    """
    d = np.load(src)
    rng = np.random.default_rng(seed)
    ink = np.kron(d["x"][..., 0] / 16.0, np.ones((UPSAMPLE, UPSAMPLE), dtype=np.float32))  # (n, 32, 32)
    n = len(ink)
    fg = rng.uniform(0.5, 1.0, size=(n, 1, 1, 3))
    bg = rng.uniform(0.0, 0.35, size=(n, 1, 1, 3))
    x = bg + (fg - bg) * ink[..., None] + rng.normal(0, 0.05, size=(n, 32, 32, 3))
    np.savez(dst, x=np.clip(x, 0, 1).astype(np.float32), y=d["y"], class_names=d["class_names"])
    return dst


def train(arch: str, data: Path, out: Path, epochs: int, cache: Path | None) -> tuple[Path, float]:
    """Train ``arch`` on ``data`` into ``out`` (or copy it from ``cache``); return it and the seconds taken."""
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    cached = cache / out.name if cache is not None else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, out)
        return out, float("nan")
    t0 = time.perf_counter()
    train_model(load_dataset(data), arch, epochs, out, patience=PATIENCE, progress=sys.stderr.isatty())
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, cached)
    return out, time.perf_counter() - t0
