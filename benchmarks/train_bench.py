"""Benchmark `edgefleet train` against plain baselines, side by side in one run, over several seeds.

Data: the shipped digits (``calibration_data/digits.npz`` for training, ``digits_test.npz`` for test)
and two tabular sets made in code:

- ``cells``: the breast-cancer data set's shape: 569 samples, 30 correlated features in units from
  0.001 to 4000, two classes 63/37 (two Gaussian classes with a shared covariance, Mahalanobis
  distance 4). A held-out 20 % (stratified, fixed) is the test set.
- ``machines``: 2,000 samples, 8 features from 0.01 to 1,500, three classes 70/20/10 whose boundary
  is not linear (an interaction and a threshold), so a linear model cannot fit it.

Seeds 0..N-1: seed s trains every method with seed s and, for ``cells`` and ``machines``, on data
draw s (each draw split 80/20, stratified), so the spread covers both the training seed and the
data; the digits are the same every time. Methods:

- ``edgefleet train``: ``toolchain.steps.train.train_model`` with every default (what
  ``edgefleet train --arch mlp|cnn --seed S`` runs).
- ``previous defaults``: the same architecture with the training settings before issue 11 (early
  stopping on validation accuracy with patience 3, 10 % validation split, no learning-rate schedule,
  no class weights, at most 20 epochs).
- ``logistic regression``: scikit-learn ``StandardScaler`` + ``LogisticRegression`` on the flattened
  raw features (deterministic: its spread is the data's).
- ``hand-written Keras``: a plain model written by hand (``Normalization`` adapted to the training
  data, Dense 64, Dense 32; for the digits ``x / 16`` and the ``cnn``'s layers), Adam 1e-3, batch 32,
  a fixed 30 epochs, no validation, no regularisation.

Writes the ``train`` section of BENCHMARKS.md.

    .venv/bin/python -m benchmarks.train_bench               # 5 seeds (about 10 minutes on 2 cores)
    .venv/bin/python -m benchmarks.train_bench --seeds 2     # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _bench  # noqa: E402
from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, publish_section  # noqa: E402

SEEDS = 5
DATA_SEED = 0
TEST_FRACTION = 0.2
HAND_EPOCHS = 30
OLD_EPOCHS = 20
OLD_PATIENCE = 3
OLD_VALIDATION_FRACTION = 0.1
GOAL_MLP_VS_LOGREG_PTS = 1.0  # |edgefleet mlp - logistic regression| on `cells`, mean over seeds


@dataclass
class Split:
    """A data set's fixed train and test parts (raw values) and its class names."""

    name: str
    arch: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    note: str = ""


@dataclass
class Runs:
    """One method on one data set: a row per seed."""

    acc: list[float] = field(default_factory=list)
    bal: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------- data


def make_cells(seed: int = DATA_SEED, n: int = 569, d: int = 30, minority: float = 0.373) -> tuple[Any, Any]:
    """Return ``(x, y)`` shaped like the breast-cancer set: 30 correlated features from 0.001 to 4000."""
    rng = np.random.default_rng(seed)
    n1 = int(round(n * minority))
    y = np.r_[np.zeros(n - n1, np.int64), np.ones(n1, np.int64)]
    load = rng.normal(size=(4, d))  # four shared factors: strongly correlated columns
    cov = load.T @ load / 4 + 0.5 * np.eye(d)
    mu = rng.normal(size=d) + 1.0
    mu *= 4.0 / np.sqrt(mu @ np.linalg.solve(cov, mu))  # Mahalanobis distance 4 between the classes
    f = rng.multivariate_normal(np.zeros(d), cov, size=n) + np.outer(y, mu)
    units = np.logspace(-3, np.log10(4000), d)
    rng.shuffle(units)
    x = (f * 0.2 + 1.0) * units
    order = rng.permutation(n)
    return x[order].astype(np.float32), y[order]


def make_machines(seed: int = DATA_SEED, n: int = 2000) -> tuple[Any, Any]:
    """Return ``(x, y)``: 8 features from 0.01 to 1,500, classes 70/20/10 with a non-linear boundary."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    score_fault = z[:, 0] * z[:, 1] + 0.8 * np.abs(z[:, 2]) + 0.3 * rng.normal(size=n)
    score_wear = z[:, 3] + 0.7 * z[:, 4] ** 2 + 0.3 * rng.normal(size=n)
    y = np.zeros(n, np.int64)
    y[score_wear > np.quantile(score_wear, 0.78)] = 1
    y[score_fault > np.quantile(score_fault, 0.9)] = 2
    units = np.array([0.01, 0.5, 3.0, 20.0, 80.0, 300.0, 900.0, 1500.0])
    x = z * units + 2 * units
    return x.astype(np.float32), y


def stratified_test_split(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any, Any, Any]:
    """Return ``x, y, x_test, y_test`` with TEST_FRACTION of every class held out (fixed seed)."""
    from toolchain.steps.data import Dataset

    rest, held = Dataset(x, y, None, [str(c) for c in range(int(y.max()) + 1)], "").split(
        TEST_FRACTION, seed=DATA_SEED
    )
    return rest.x, rest.y, held.x, held.y


def load_splits(seed: int = DATA_SEED) -> list[Split]:
    """Return the three data sets: the tabular ones drawn with ``seed``, the digits as shipped."""
    tr, te = np.load(_bench.DIGITS), np.load(_bench.DIGITS_TEST)
    digits = Split(
        "digits (8x8, 10 classes)",
        "cnn",
        tr["x"],
        tr["y"],
        te["x"],
        te["y"],
        [str(c) for c in tr["class_names"]],
        "1,438 train / 359 test (as shipped)",
    )
    cells = Split(
        "cells (30 features, 63/37)",
        "mlp",
        *stratified_test_split(*make_cells(seed)),
        ["benign", "malignant"],
    )
    cells.note = f"{cells.y.size} train / {cells.y_test.size} test per draw"
    machines = Split(
        "machines (8 features, 70/20/10)",
        "mlp",
        *stratified_test_split(*make_machines(seed)),
        ["ok", "wear", "fault"],
    )
    machines.note = f"{machines.y.size} train / {machines.y_test.size} test per draw"
    return [cells, machines, digits]


# ------------------------------------------------------------------------------------------------ methods


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Return the mean per-class recall over the classes present in ``y``."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def run_edgefleet(s: Split, seed: int, work: Path) -> tuple[np.ndarray, int]:
    """`edgefleet train` with every default; return test predictions and epochs run."""
    from toolchain.steps.data import Dataset
    from toolchain.steps.train import DEFAULT_EPOCHS, train_model

    ds = Dataset(s.x, s.y, None, s.class_names, s.name)
    res = train_model(ds, s.arch, DEFAULT_EPOCHS, work / f"ef-{seed}.keras", seed=seed, progress=False)
    return np.asarray(res.model.predict(s.x_test, verbose=0)).argmax(1), res.epochs_run


def run_previous_defaults(s: Split, seed: int, work: Path) -> tuple[np.ndarray, int]:
    """The training settings `edgefleet train` had before issue 11, on the same architecture."""
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.data import Dataset
    from toolchain.steps.train import fit

    ds = Dataset(s.x, s.y, None, s.class_names, s.name)
    model = build_architecture(s.arch, s.x, len(s.class_names), seed=seed)
    hist = fit(
        model,
        ds,
        OLD_EPOCHS,
        validation_fraction=OLD_VALIDATION_FRACTION,
        patience=OLD_PATIENCE,
        monitor="val_accuracy",
        progress=False,
        seed=seed,
    )
    return np.asarray(model.predict(s.x_test, verbose=0)).argmax(1), len(hist["loss"])


def run_logistic_regression(s: Split, seed: int, work: Path) -> tuple[np.ndarray, int]:
    """scikit-learn: standardise, then multinomial logistic regression (L2, C=1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    flat = s.x.reshape(s.x.shape[0], -1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    model.fit(flat, s.y)
    return model.predict(s.x_test.reshape(s.x_test.shape[0], -1)), 0


def run_hand_keras(s: Split, seed: int, work: Path) -> tuple[np.ndarray, int]:
    """What a user writes by hand: plain layers, Adam 1e-3, batch 32, a fixed number of epochs."""
    from toolchain.tfenv import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input(shape=s.x.shape[1:])
    if s.arch == "mlp":
        norm = L.Normalization()
        norm.adapt(s.x)
        h = L.Dense(32, activation="relu")(L.Dense(64, activation="relu")(norm(inp)))
    else:
        h = L.Conv2D(16, 3, padding="same", activation="relu")(L.Rescaling(1 / 16)(inp))
        h = L.Conv2D(32, 3, padding="same", activation="relu")(L.MaxPooling2D(2)(h))
        h = L.Dropout(0.2)(L.Dense(64, activation="relu")(L.Flatten()(L.MaxPooling2D(2)(h))))
    model = keras.Model(inp, L.Dense(len(s.class_names), activation="softmax")(h))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(s.x, s.y, epochs=HAND_EPOCHS, batch_size=32, verbose=0)
    return np.asarray(model.predict(s.x_test, verbose=0)).argmax(1), HAND_EPOCHS


METHODS: dict[str, Callable[[Split, int, Path], tuple[np.ndarray, int]]] = {
    "edgefleet train": run_edgefleet,
    "previous defaults": run_previous_defaults,
    "logistic regression": run_logistic_regression,
    "hand-written Keras": run_hand_keras,
}


# ---------------------------------------------------------------------------------------------- the run


def pct(values: list[float]) -> str:
    """Return ``mean ± sd`` in percent (population sd over seeds)."""
    a = 100 * np.asarray(values)
    return f"{a.mean():.2f} ± {a.std():.2f}"


def run(seeds: int) -> tuple[list[list[Any]], dict[tuple[str, str], Runs]]:
    """Train every method on every data set for each seed; return table rows and the raw runs."""
    from toolchain.tfenv import import_keras

    keras = import_keras()
    results: dict[tuple[str, str], Runs] = {}
    rows: list[list[Any]] = []
    draws = [load_splits(seed) for seed in range(seeds)]  # seed s: data draw s (tabular), training seed s
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        for i, name in enumerate(s.name for s in draws[0]):
            for method, fn in METHODS.items():
                r = results.setdefault((name, method), Runs())
                for seed in range(seeds):
                    s = draws[seed][i]
                    keras.backend.clear_session()
                    t0 = time.perf_counter()
                    pred, epochs = fn(s, seed, work)
                    r.seconds.append(time.perf_counter() - t0)
                    r.acc.append(float(np.mean(pred == s.y_test)))
                    r.bal.append(balanced_accuracy(s.y_test, pred))
                    r.epochs.append(epochs)
                    progress_print(
                        f"{name:34s} {method:20s} seed {seed}: acc {100 * r.acc[-1]:.2f}% "
                        f"balanced {100 * r.bal[-1]:.2f}% epochs {epochs} {r.seconds[-1]:.1f}s"
                    )
                rows.append(
                    [
                        name,
                        method,
                        pct(r.acc),
                        pct(r.bal),
                        f"{100 * min(r.acc):.2f}",
                        f"{np.mean(r.epochs):.0f}" if r.epochs[0] else "-",
                        round(float(np.mean(r.seconds)), 2),
                        len(r.acc),
                    ]
                )
    return rows, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=SEEDS, help="training seeds 0..N-1 per method")
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section into")
    args = ap.parse_args()
    rows, results = run(args.seeds)
    splits = {s.name: s for s in load_splits()}
    cells = next(n for n in splits if n.startswith("cells"))
    diff = 100 * (
        np.asarray(results[(cells, "edgefleet train")].acc) - results[(cells, "logistic regression")].acc
    )
    met = abs(float(diff.mean())) <= GOAL_MLP_VS_LOGREG_PTS
    one_sample = 100 / splits[cells].y_test.size
    goal = (
        f"**Goal** (issue 11): the `mlp` within about {GOAL_MLP_VS_LOGREG_PTS:.0f} point of a logistic "
        "regression on standardised features on `cells`, stable across seeds: edgefleet minus logistic "
        f"regression, per draw, {diff.mean():+.2f} ± {diff.std():.2f} points (one test sample is "
        f"{one_sample:.2f} points): **{'met' if met else 'missed'}**."
    )
    from toolchain.steps import train as T

    intro = (
        "`benchmarks/train_bench.py`: `edgefleet train` (every default: at most "
        f"{T.DEFAULT_EPOCHS} epochs, {T.VALIDATION_FRACTION:.0%} stratified validation split, early stopping "
        f"on validation cross-entropy with patience {T.PATIENCE_EPOCHS} after at least {T.MIN_EPOCHS} epochs and the "
        f"best weights restored, learning rate {T.LEARNING_RATE:g} halved after {T.LR_PATIENCE_EPOCHS} "
        "epochs without progress, class weights when the largest class is "
        f"{T.IMBALANCE_RATIO}x the smallest, op determinism) against the settings it had before issue 11, "
        "a scikit-learn logistic regression on standardised features, and a plain Keras model written by "
        f"hand (Normalization, Dense 64, Dense 32 or the `cnn`'s layers; fixed {HAND_EPOCHS} epochs, no "
        "validation, no regularisation). Test accuracy and balanced accuracy (mean "
        f"per-class recall) as mean ± standard deviation over seeds 0..{args.seeds - 1} (seed s: training "
        "seed s and, for the tabular sets, data draw s); `worst` is the lowest accuracy of any seed; `s` is "
        "the mean wall time per training run "
        "on this shared 2-core host. Data: "
        + "; ".join(f"`{n.split(' ')[0]}` {s.note}" for n, s in splits.items())
        + ". `cells` and `machines` are made in code (see the script's docstring). Class weights aim at "
        "balanced accuracy: on unbalanced labels (`machines`) an unweighted model can score more plain "
        "accuracy by neglecting the rare classes, which the balanced column shows.\n\n" + goal
    )
    headers = ["data", "method", "test acc %", "balanced acc %", "worst %", "epochs", "s", "seeds"]
    body = markdown_table(headers, rows)
    publish_section("train", "Training: edgefleet train vs plain baselines", body, intro=intro, path=args.md)
    print(goal)


if __name__ == "__main__":
    main()
