"""Benchmark ``edgefleet train --task regression`` and its int8 bundles against a linear regression.

Two tabular data sets made in code, each split 80/20 per draw:

- ``plant``: 600 samples, 6 features in units from 0.001 to 4000, one target (a flow in the
  hundreds) that is linear in the features plus Gaussian noise: a linear regression is the right
  model here, so matching it is the test.
- ``engines``: 1,500 samples, 8 features from 0.01 to 1,500, two targets of different units: a
  remaining life in hours (an interaction and a square root: not linear) and a temperature rise in
  kelvin (near linear).

Per seed s (training seed s, data draw s): ``edgefleet train --task regression --arch mlp``
(``toolchain.steps.regression.train_regression``, every default), then ``edgefleet build --task
regression --target mobile --target x86`` (real conversions; MAE measured through the agent one
sample at a time), beside a linear regression by numpy least squares on the raw features with an
intercept. The table gives the test MAE per target as mean ± standard deviation over seeds.

Goal (issue 15): the float ``edgefleet train`` MAE within about 10 % of the linear regression's on
both data sets (ratio <= 1.10 on every target); the int8 rows show what quantization adds.

    .venv/bin/python -m benchmarks.regression_bench             # 3 seeds (a few minutes on 2 cores)
    .venv/bin/python -m benchmarks.regression_bench --seeds 1   # a quick look
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

from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, write_section  # noqa: E402

SEEDS = 3
EPOCHS = 100
GOAL_RATIO = 1.10
TARGETS = ("mobile", "x86")


def plant(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """600 samples, 6 features (0.001..4000), a linear flow target with noise."""
    rng = np.random.default_rng(1000 + seed)
    n = 600
    x = np.stack(
        [
            rng.uniform(0.001, 0.005, n),
            rng.uniform(0.0, 1.0, n),
            rng.normal(20.0, 5.0, n),
            rng.uniform(100.0, 400.0, n),
            rng.uniform(1000.0, 4000.0, n),
            rng.normal(0.5, 0.1, n),
        ],
        axis=1,
    )
    flow = 40000 * x[:, 0] + 150 * x[:, 1] + 4 * x[:, 2] + 0.5 * x[:, 3] + 0.05 * x[:, 4] - 80 * x[:, 5]
    return x.astype(np.float32), (flow + rng.normal(0, 10.0, n))[:, None], ["flow_l_min"]


def engines(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """1,500 samples, 8 features (0.01..1500), remaining life (not linear) and a temperature rise."""
    rng = np.random.default_rng(2000 + seed)
    n = 1500
    x = np.stack(
        [
            rng.uniform(0.01, 0.1, n),
            rng.uniform(0.0, 1.0, n),
            rng.uniform(0.0, 1.0, n),
            rng.uniform(10.0, 90.0, n),
            rng.uniform(100.0, 1500.0, n),
            rng.normal(5.0, 1.0, n),
            rng.uniform(0.0, 10.0, n),
            rng.uniform(200.0, 800.0, n),
        ],
        axis=1,
    )
    life = 3000 - 1500 * x[:, 1] * x[:, 2] - 40 * np.sqrt(x[:, 4]) + 5 * x[:, 3] + rng.normal(0, 40, n)
    rise = 0.02 * x[:, 4] + 3 * x[:, 6] + 40 * x[:, 0] + rng.normal(0, 1.0, n)
    return x.astype(np.float32), np.stack([life, rise], axis=1), ["life_h", "rise_k"]


DATASETS = {"plant (6 features, 1 target)": plant, "engines (8 features, 2 targets)": engines}


def linear_mae(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> np.ndarray:
    """Test MAE per target of an ordinary least-squares fit with an intercept (numpy lstsq)."""
    a = np.c_[x.astype(np.float64), np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = np.c_[xt.astype(np.float64), np.ones(len(xt))] @ coef
    return np.abs(pred - yt).mean(axis=0)


def run_one(make: Any, seed: int, work: Path) -> dict[str, Any]:
    """Train and build one draw; return MAE per method and target, and the output steps."""
    from toolchain.steps.regbuild import build_regression_bundles
    from toolchain.steps.regression import RegressionData, train_regression

    x, y, names = make(seed)
    order = np.random.default_rng(seed).permutation(len(x))
    k = int(0.8 * len(x))
    tr, te = order[:k], order[k:]
    out: dict[str, Any] = {"linear regression": linear_mae(x[tr], y[tr], x[te], y[te])}
    np.savez(work / "train.npz", x=x[tr], y=y[tr], target_names=np.array(names))
    np.savez(work / "test.npz", x=x[te], y=y[te], target_names=np.array(names))
    t0 = time.perf_counter()
    train_regression(
        RegressionData(x[tr], y[tr], names, None, "train"),
        "mlp",
        EPOCHS,
        work / "m.keras",
        seed=seed,
        progress=False,
    )
    out["train_s"] = time.perf_counter() - t0
    rep = build_regression_bundles(
        work / "m.keras",
        work / "train.npz",
        list(TARGETS),
        work / "out",
        eval_data=work / "test.npz",
        progress=False,
    )
    first = rep["targets"][TARGETS[0]]["per_target"]
    out["edgefleet train (float)"] = np.array([first[n]["float_mae"] for n in names])
    for t in TARGETS:
        entry = rep["targets"][t]
        rt = entry["preferred_runtime"]
        out[f"int8 {t} ({rt}, agent)"] = np.array([entry["per_target"][n]["mae"] for n in names])
        out[f"step {t}"] = np.array([entry["per_target"][n]["output_step"] for n in names])
    out["names"] = names
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD)
    args = ap.parse_args()
    rows: list[list[Any]] = []
    goal_lines: list[str] = []
    met = True
    for label, make in DATASETS.items():
        runs = []
        for seed in range(args.seeds):
            progress_print(f"{label}: seed {seed}")
            with tempfile.TemporaryDirectory() as d:
                runs.append(run_one(make, seed, Path(d)))
        names = runs[0]["names"]
        methods = [k for k in runs[0] if k not in ("names", "train_s") and not k.startswith("step ")]
        lin = np.stack([r["linear regression"] for r in runs])
        for j, n in enumerate(names):
            for meth in methods:
                v = np.stack([r[meth] for r in runs])[:, j]
                ratio = v / lin[:, j]
                steps: list[Any] = (
                    [r[f"step {meth.split()[1]}"] for r in runs] if meth.startswith("int8") else []
                )
                have = bool(steps) and all(s is not None for s in steps)
                step = float(np.mean([s[j] for s in steps])) if have else None
                rows.append(
                    [
                        label,
                        n,
                        meth,
                        f"{v.mean():.4g} ± {v.std():.2g}",
                        f"{ratio.mean():.3f}",
                        step,
                        len(runs),
                    ]
                )
            ratio = np.stack([r["edgefleet train (float)"] for r in runs])[:, j] / lin[:, j]
            ok = ratio.mean() <= GOAL_RATIO
            met = met and ok
            goal_lines.append(f"{label} {n}: {ratio.mean():.3f} ({'met' if ok else 'MISSED'})")
    headers = ["data", "target", "method", "test MAE", "MAE / linear", "int8 output step", "seeds"]
    body = markdown_table(headers, rows)
    goal = (
        f"**Goal** (issue 15): float `edgefleet train` MAE within {100 * (GOAL_RATIO - 1):.0f} % of a linear"
        f" regression's on both data sets, mean ratio per target: {'; '.join(goal_lines)}: "
        + ("**met**." if met else "**MISSED**.")
    )
    intro = (
        "`benchmarks/regression_bench.py`: `edgefleet train --task regression --arch mlp` (defaults) and its"
        " int8 bundles from `edgefleet build --task regression --target mobile --target x86` (MAE measured"
        " through the agent, one sample at a time) against a linear regression (numpy least squares with an"
        " intercept on the raw features), on two tabular sets made in code (see the script's docstring), split"
        f" 80/20 per draw; mean ± standard deviation over seeds 0..{args.seeds - 1}. The int8 output step is"
        " the output's quantization step in the target's units (the model's int8 output quantizes the"
        " standardised target; the manifest rescales it).\n\n" + goal
    )
    write_section(
        "regression",
        "Regression: MAE float vs int8 and vs a linear regression",
        body,
        intro=intro,
        path=args.md,
    )
    print(body)
    print(goal)


if __name__ == "__main__":
    main()
