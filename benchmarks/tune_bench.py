"""Benchmark `edgefleet tune` against the fixed architectures, and 1 against 2 local workers.

Data: the shipped digits (8x8x1 as 64 features reshaped to images, 0..16; ``calibration_data``) and
``shapes32``, a 32x32x3 image set made here: three classes 50/30/20 (a bright square, a bright ring, a
diagonal bar, each at a random place and size, on noise in [0, 255]), 600 training and 300 test
images. The test data is split as ``tune`` splits it (stratified, seed 0): the selection half ranks
the candidates (and is the fixed builds' evaluation set), the held-out half gives every row's
accuracy, so the fixed models and the winner are scored on the same unseen samples.

Rows, all for the ``mobile`` target (LiteRT int8), side by side in one run:

- ``fixed cnn`` / ``fixed mobilenetv2``: ``train_model`` with the architecture's defaults and
  ``--epochs`` (early stopping), then ``build_bundles`` with PTQ, as ``edgefleet train`` +
  ``edgefleet build`` would;
- ``tune, W workers``: ``toolchain.tune.run.tune`` with ``--trials`` trials (``mlp`` and ``cnn``,
  plus ``mobilenetv2`` with ``--with-mobilenet``) and the same ``--epochs`` at most.

Search time is the wall time of the whole search (all trials, the best bundle's held-out run).

    .venv/bin/python -m benchmarks.tune_bench                # 4 trials per search (~15 min on 2 busy cores)
    .venv/bin/python -m benchmarks.tune_bench --trials 8 --with-mobilenet
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _bench  # noqa: E402
from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, publish_section  # noqa: E402

TARGET = "mobile"
TRIALS = 4
EPOCHS = 10
SEED = 0


def shapes32(path: Path, n: int, seed: int) -> Path:
    """Write ``n`` 32x32x3 images of three classes (square, ring, bar; 50/30/20) to ``path`` (.npz)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.5, 0.3, 0.2]).astype(np.int64)
    x = rng.uniform(0, 120, (n, 32, 32, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    for i, c in enumerate(y):
        cy, cx, r = rng.integers(9, 23), rng.integers(9, 23), rng.integers(4, 8)
        if c == 0:
            mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        elif c == 1:
            d = np.hypot(yy - cy, xx - cx)
            mask = (d <= r + 1) & (d >= r - 1)
        else:
            mask = abs((yy - cy) - (xx - cx)) <= 1
            mask &= (abs(yy - cy) <= r + 3) & (abs(xx - cx) <= r + 3)
        x[i][mask] += 135
    np.savez(path, x=x, y=y)
    return path


def fixed_row(arch: str, train: Path, test: Path, work: Path, epochs: int) -> dict[str, Any]:
    """Train the fixed ``arch``, build it for the target, score it on the held-out half."""
    from toolchain.build import BuildError, build_bundles
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model
    from toolchain.tune.results import holdout_accuracy
    from toolchain.tune.run import SELECTION_FRACTION
    from toolchain.tune.trial import split_eval

    t0 = time.perf_counter()
    ds = load_dataset(train)
    sel, hold, _, _ = split_eval(load_dataset(test), SELECTION_FRACTION, SEED)
    model = work / f"{arch}.keras"
    train_model(ds, arch, epochs, model, seed=SEED, progress=False)
    try:
        report = build_bundles(model, ds, [TARGET], work / arch, eval_data=sel, progress=False)
    except BuildError as e:
        report = e.report or {}
    entry = report["targets"][TARGET]
    ok = entry["status"] == "ok"
    acc = holdout_accuracy(work / arch / TARGET, entry["preferred_runtime"], hold) if ok else None
    return {
        "method": f"fixed {arch}",
        "holdout": acc,
        "size": entry.get("size_bytes"),
        "latency": entry.get("latency_ms_p95"),
        "time_s": time.perf_counter() - t0,
        "note": "built" if ok else f"failed: {entry.get('error')}",
    }


def tune_row(
    train: Path, test: Path, out: Path, trials: int, workers: int, archs: list[str]
) -> dict[str, Any]:
    """Run one search; return the best candidate's row."""
    from toolchain.tune.run import tune
    from toolchain.tune.study import TuneError

    t0 = time.perf_counter()
    try:
        doc = tune(
            train,
            test,
            TARGET,
            out,
            trials=trials,
            workers=workers,
            archs=archs,
            max_epochs=EPOCHS,
            seed=SEED,
            progress=False,
        )
    except TuneError as e:
        return {"method": f"tune, {workers} worker(s)", "time_s": time.perf_counter() - t0, "note": str(e)}
    best = doc["best"]
    t = doc["trials"]
    s = best["settings"]
    opts = " ".join(f"{k}={v}" for k, v in s["arch_options"].items())
    return {
        "method": f"tune, {workers} worker(s)",
        "holdout": best["holdout_accuracy"],
        "size": best["size_bytes"],
        "latency": best["latency_ms"],
        "time_s": time.perf_counter() - t0,
        "note": (
            f"{t['total']} trials ({t['within_budget']} within budget); best: {s['arch']} {opts}"
            f" epochs={s['epochs']} prune={s['sparsity']} {s['quantize']}"
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--with-mobilenet", action="store_true", help="also search and build mobilenetv2")
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD)
    args = ap.parse_args()
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        work = Path(tmp)
        s_train, s_test = shapes32(work / "s_train.npz", 600, 1), shapes32(work / "s_test.npz", 300, 2)
        archs = ["mlp", "cnn"] + (["mobilenetv2"] if args.with_mobilenet else [])
        plan: list[tuple[str, Path, Path, list[str]]] = [
            ("digits", _bench.DIGITS, _bench.DIGITS_TEST, ["cnn"]),
            ("shapes32", s_train, s_test, ["cnn", "mobilenetv2"]),
        ]
        for name, train, test, fixed in plan:
            for arch in fixed:
                progress_print(f"{name}: fixed {arch}")
                r = fixed_row(arch, train, test, work / f"{name}-fixed", EPOCHS)
                rows.append(
                    [name, r["method"], r["holdout"], r["size"], r["latency"], r["time_s"], r["note"]]
                )
            for workers in (1, 2) if name == "digits" else (2,):
                progress_print(f"{name}: tune, {workers} worker(s), {args.trials} trials")
                r = tune_row(train, test, work / f"{name}-tune-{workers}", args.trials, workers, archs)
                rows.append(
                    [
                        name,
                        r["method"],
                        r.get("holdout"),
                        r.get("size"),
                        r.get("latency"),
                        r["time_s"],
                        r["note"],
                    ]
                )
    headers = ["data", "method", "held-out acc", "size B", "p95 ms", "wall s", "notes"]
    body = markdown_table(headers, rows)
    intro = (
        f"`python -m benchmarks.tune_bench --trials {args.trials}`: target `{TARGET}`, at most {EPOCHS} epochs,"
        " accuracy on the held-out half of the test data (the half no trial saw), size of the int8 model,"
        " p95 latency of one batch-1 call in LiteRT on this machine, wall time of training + build (fixed)"
        " or of the whole search (tune). The 1 vs 2 worker rows are the same search on the digits; on a"
        " machine whose cores are busy with other work, two workers share the same cores."
    )
    publish_section(
        "tune",
        "Tuning: edgefleet tune vs the fixed architectures (tune_bench.py)",
        body,
        intro=intro,
        path=args.md,
    )


if __name__ == "__main__":
    main()
