"""Benchmark `edgefleet train --init-from` (fine-tuning with replay) against its alternatives on a shift.

Data made in code, each with an OLD regime (what the deployed model was trained on) and a NEW one (what
the devices see after the world moved), plus fixed test sets of both:

- ``tabular``: 6 features in units from 0.001 to 4000, two classes 75/25. In NEW one feature sits 4
  standard deviations away and the class follows another rule (the sum of two features becomes their
  difference). 600 OLD rows, 200 labelled NEW rows (what a few days of captured and labelled samples
  give), 600 test rows of each.
- ``images``: 10x10x1 images in [0, 1], a bright row, column or cross (60/25/15) on noise; NEW images
  are inverted (a camera swapped for one with another polarity). 500 OLD, 240 NEW, 300 test of each.

Methods, side by side in one run (seed s for everything):

- ``deployed``: the model trained on OLD with ``edgefleet train`` defaults (``mlp`` / ``cnn``).
- ``fine-tune, replay 0``: ``train --init-from deployed --data OLD --data NEW --replay 0`` (no OLD row
  trained on; OLD still has its share of the validation split, so early stopping sees forgetting).
- ``fine-tune, replay 0.5``: ``train --init-from deployed --data OLD --data NEW`` (the default).
- ``fine-tune, replay 0.5, lr 1e-3``: the default with ``--learning-rate 1e-3`` (train's rate).
- ``from scratch on OLD+NEW``: ``train --arch ... --data OLD --data NEW`` (new weights, new statistics).

Writes the ``finetune`` section of BENCHMARKS.md.

    .venv/bin/python -m benchmarks.finetune_bench              # 1 seed, both data sets (~6 minutes on 2 cores)
    .venv/bin/python -m benchmarks.finetune_bench --seeds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, publish_section  # noqa: E402
from tests.fabricate import shifted_images, shifted_regime  # noqa: E402  (the data test_finetune uses)

SEEDS = 1
METHODS = (
    "deployed",
    "fine-tune, replay 0",
    "fine-tune, replay 0.5",
    "fine-tune, replay 0.5, lr 1e-3",
    "from scratch on OLD+NEW",
)


@dataclass
class Shift:
    """One data set: OLD and NEW training data, test sets of both, and the built-in architecture."""

    name: str
    arch: str
    class_names: list[str]
    make: Callable[[int, int, bool], tuple[np.ndarray, np.ndarray]]
    n_old: int
    n_new: int
    n_test: int


SHIFTS = {
    "tabular": Shift("tabular", "mlp", ["ok", "fault"], shifted_regime, 600, 200, 600),
    "images": Shift("images", "cnn", ["row", "column", "cross"], shifted_images, 500, 240, 300),
}


def _acc(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(model.predict(x, verbose=0)).argmax(1) == y))


def run_shift(sh: Shift, seed: int, work: Path) -> dict[str, tuple[float, float, int, float]]:
    """Return method -> (old test accuracy, new test accuracy, epochs run, wall seconds)."""
    from toolchain.steps import finetune as F
    from toolchain.steps.data import Dataset
    from toolchain.steps.train import DEFAULT_EPOCHS, train_model
    from toolchain.steps.trainset import combine

    base = 10 * seed
    old = Dataset(*sh.make(base, sh.n_old, False), None, sh.class_names, "old")
    new = Dataset(*sh.make(base + 1, sh.n_new, True), None, sh.class_names, "new")
    xo, yo = sh.make(base + 2, sh.n_test, False)
    xn, yn = sh.make(base + 3, sh.n_test, True)
    out: dict[str, tuple[float, float, int, float]] = {}
    t0 = time.perf_counter()
    deployed = work / f"{sh.name}-{seed}-deployed.keras"
    r = train_model(old, sh.arch, DEFAULT_EPOCHS, deployed, seed=seed, progress=False)
    out["deployed"] = (_acc(r.model, xo, yo), _acc(r.model, xn, yn), r.epochs_run, time.perf_counter() - t0)
    for replay, lr, method in (
        (0.0, F.LEARNING_RATE, METHODS[1]),
        (0.5, F.LEARNING_RATE, METHODS[2]),
        (0.5, 1e-3, METHODS[3]),
    ):
        progress_print(f"{sh.name} seed {seed}: {method}")
        t0 = time.perf_counter()
        f = F.finetune_model(
            deployed,
            old,
            new,
            DEFAULT_EPOCHS,
            work / f"{sh.name}-{seed}-ft{replay}-{lr:g}.keras",
            replay=replay,
            learning_rate=lr,
            seed=seed,
            progress=False,
        )
        out[method] = (_acc(f.model, xo, yo), _acc(f.model, xn, yn), f.epochs_run, time.perf_counter() - t0)
    progress_print(f"{sh.name} seed {seed}: {METHODS[4]}")
    t0 = time.perf_counter()
    s = train_model(
        combine([old, new]), sh.arch, DEFAULT_EPOCHS, work / f"{sh.name}-{seed}-scratch.keras", seed=seed,
        progress=False,
    )  # fmt: skip
    out[METHODS[4]] = (_acc(s.model, xo, yo), _acc(s.model, xn, yn), s.epochs_run, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=SEEDS, help="seeds 0..N-1 (data draw and training)")
    ap.add_argument("--data", default="tabular,images", help="comma-separated: tabular, images")
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section into")
    args = ap.parse_args()
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        for name in names:
            sh = SHIFTS[name]
            runs = [run_shift(sh, seed, Path(tmp)) for seed in range(args.seeds)]
            for m in METHODS:
                vals = np.array([r[m] for r in runs], dtype=np.float64)
                rows.append(
                    [
                        f"{name} ({sh.arch})",
                        m,
                        f"{100 * vals[:, 0].mean():.1f}",
                        f"{100 * vals[:, 1].mean():.1f}",
                        f"{vals[:, 2].mean():.0f}",
                        f"{vals[:, 3].mean():.1f}",
                    ]
                )
    from toolchain.steps import finetune as F
    from toolchain.steps import train as T

    intro = (
        "`benchmarks/finetune_bench.py`: what `edgefleet train --init-from` buys after a shift. The deployed "
        "model is trained on OLD; NEW is a labelled set from the shifted regime (`tabular`: one feature 4 "
        "standard deviations away and another class rule, 600 OLD / 200 NEW rows; `images`: inverted "
        "10x10 images, 500 OLD / 240 NEW). Fine-tuning starts from the deployed weights with learning rate "
        f"{F.LEARNING_RATE:g} (from scratch: {T.LEARNING_RATE:g}), keeps the model's preprocessing and "
        f"classes, and stops early on a validation split of NEW plus as many OLD rows; replay "
        f"{F.DEFAULT_REPLAY} mixes in that share of NEW's size of OLD rows. Test accuracy on fresh OLD and "
        f"NEW draws, mean over seeds 0..{args.seeds - 1}; `s` is the wall time of that training on this "
        "shared 2-core host (the deployed row: its original training). From scratch re-adapts the "
        "`mlp`'s `Normalization` to OLD+NEW, so its manifest preprocessing and drift baseline change; "
        "fine-tuning keeps both."
    )
    headers = ["data", "method", "old test acc %", "new test acc %", "epochs", "s"]
    body = markdown_table(headers, rows)
    publish_section(
        "finetune",
        "Fine-tuning after a shift: replay vs none vs from scratch",
        body,
        intro=intro,
        path=args.md,
    )


if __name__ == "__main__":
    main()
