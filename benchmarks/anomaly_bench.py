"""Benchmark anomaly detection: AUROC of the float autoencoder vs its int8 bundles per target, beside PCA.

Data made in code (tests/fabricate.py), two sets:

- ``tabular``: 8 columns in units from 0.001 to 4000; normal rows follow two hidden factors plus a
  little noise; anomalies (25 % of the test set) break the structure (columns drawn independently
  with the same spread) or carry a 4-sigma spike in one column. 1,000 normal rows to train on.
- ``images``: 16x16x1 images in [0, 1]; normal ones are one smooth blob (random place, width,
  brightness); anomalies are stripes or speckle noise. 600 normal images to train on.

Each test set comes twice: obvious anomalies (strength 1) and subtle ones (strength ``SUBTLE``: a
small spike, or a little of the structure broken; stripes or speckle faintly over a blob).

Methods, side by side in one run:

- ``edgefleet`` float: ``edgefleet train --task anomaly --arch autoencoder`` (default settings), the
  score computed by the float Keras model;
- ``edgefleet`` int8, per target and runtime: ``edgefleet build --task anomaly`` (threshold at the
  99th percentile of the int8 model's scores of the training data), the score measured through the
  agent one sample at a time (the report's ``auroc`` is the worst of that and the batch path);
- ``PCA`` (the plain alternative): the squared reconstruction error from the top principal
  components (as many as the autoencoder's bottleneck: 2 for tabular, 64 for images) of the
  standardised training data, float64 numpy.

Goal: int8 AUROC within ``GOAL_MAX_AUROC_DROP`` of float on every target (the build's gate).

    .venv/bin/python -m benchmarks.anomaly_bench          # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._bench import BENCHMARKS_MD, markdown_table, progress_print, write_section  # noqa: E402

GOAL_MAX_AUROC_DROP = 0.02
TARGETS = ["mobile", "raspberry-pi", "x86"]
SETS = {  # name -> (train samples, test samples, PCA components)
    "tabular": (1000, 800, 2),
    "images": (600, 400, 64),
}
# Anomaly strength of the test sets (tests/fabricate.py): 1 = obvious, SUBTLE = barely off normal,
# where the int8 score's resolution near the threshold matters most.
SUBTLE = 0.05
STRENGTHS = (1.0, SUBTLE)


def pca_scores(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Return the squared reconstruction error of ``test`` from ``train``'s top ``k`` principal components."""
    a = train.reshape(len(train), -1).astype(np.float64)
    b = test.reshape(len(test), -1).astype(np.float64)
    mu, sd = a.mean(0), a.std(0) + 1e-12
    a, b = (a - mu) / sd, (b - mu) / sd
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    v = vt[:k].T
    resid = b - (b @ v) @ v.T
    return np.asarray((resid**2).mean(1))


def run(md: Path) -> None:
    """Train, build and measure both data sets; write the ``anomaly`` section of BENCHMARKS.md."""
    from click.testing import CliRunner

    from tests.fabricate import anomaly_images, anomaly_tabular
    from toolchain.cli import main
    from toolchain.steps.anomaly import auroc

    rows: list[list[Any]] = []
    missed: list[str] = []
    versus: list[str] = []  # the float autoencoder against PCA, per test set
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as tmp:
        d = Path(tmp)
        for name, (n_train, n_test, k) in SETS.items():
            gen = anomaly_tabular if name == "tabular" else anomaly_images
            x, _ = gen(n_train, 0.0, seed=0)
            np.savez(d / f"{name}.npz", x=x)
            t0 = time.perf_counter()
            res = CliRunner().invoke(
                main,
                ["train", "--task", "anomaly", "--arch", "autoencoder", "--data", str(d / f"{name}.npz")]
                + ["--out", str(d / f"{name}.keras"), "--json"],
                catch_exceptions=False,
            )
            if res.exit_code:
                raise SystemExit(res.output)
            progress_print(f"{name}: trained in {time.perf_counter() - t0:.0f} s")
            for strength in STRENGTHS:
                xt, yt = gen(n_test, 0.25, seed=1, strength=strength)
                test = d / f"{name}_test_{strength}.npz"
                np.savez(test, x=xt, y=yt)
                label = f"{name}, strength {strength:g}"
                args = [
                    "build",
                    str(d / f"{name}.keras"),
                    "--task",
                    "anomaly",
                    "--data",
                    str(d / f"{name}.npz"),
                ]
                args += ["--eval-data", str(test), "--out", str(d / f"{name}-{strength}"), "--json"]
                args += ["--allow-accuracy-drop"]  # a target over the AUROC gate is a MISSED row, not a stop
                args += [a for t in TARGETS for a in ("--target", t)]
                res = CliRunner().invoke(main, args, catch_exceptions=False)
                report = json.loads(res.stdout)
                progress_print(f"{label}: built in {report['build_s']} s")
                pca = auroc(pca_scores(x, xt, k), yt)
                versus.append(f"{label}: {report['float']['auroc']:.3f} vs {pca:.3f}")
                rows.append([label, "PCA (float64)", "numpy", pca, None, None, None, None, "-"])
                rows.append(
                    [label, "float", "tf_keras", report["float"]["auroc"], None, None, None, None, "-"]
                )
                for target, e in report["targets"].items():
                    for rt, fig in e.get("per_runtime", {}).items():
                        drop = (e["float_auroc"] - fig["auroc"]) if fig.get("auroc") is not None else None
                        ok = drop is not None and drop <= GOAL_MAX_AUROC_DROP
                        if not ok:
                            missed.append(f"{label}/{target}/{rt}")
                        rows.append(
                            [
                                label,
                                f"int8 {target}",
                                rt,
                                fig.get("auroc"),
                                drop,
                                fig.get("precision"),
                                fig.get("recall"),
                                fig.get("false_positive_rate"),
                                "met" if ok else "MISSED",
                            ]
                        )
    headers = [
        "data",
        "model",
        "runtime",
        "AUROC",
        "drop vs float",
        "precision",
        "recall",
        "false positives",
        f"goal: drop <= {GOAL_MAX_AUROC_DROP}",
    ]
    body = markdown_table(headers, rows)
    body += (
        "\nint8 rows: the agent's path, one sample at a time (the worse of that and the 64-sample batch"
        " path); precision, recall and false positives at the bundle's threshold (99th percentile of the"
        " int8 scores of the training data). "
        + (f"MISSED: {', '.join(missed)}." if missed else "Goal met on every target and runtime.")
        + "\n\nThe false-positive rate on new normal samples is above the 1 % the 99th percentile names: the"
        " threshold comes from the scores of the training data, which the autoencoder reconstructs better"
        " than unseen data (build with held-out normal samples as --data for a truer threshold).\n"
        "\nFloat autoencoder vs PCA (AUROC): " + "; ".join(versus) + ". Where PCA is ahead, the autoencoder"
        " is no better a detector than a linear model on that data: the goal here is that int8 keeps the"
        " float model's ranking.\n"
    )
    intro = (
        "`benchmarks/anomaly_bench.py`: `edgefleet train --task anomaly --arch autoencoder` and"
        " `edgefleet build --task anomaly` on two data sets made in code (tabular: 8 columns from 0.001 to"
        " 4000, 1,000 normal rows; images: 16x16 blobs, 600), each tested on held-out data with 25 %"
        f" anomalies, obvious (strength 1) and subtle (strength {SUBTLE:g}: barely off the normal"
        " structure, tests/fabricate.py); a PCA reconstruction error with as many components as the autoencoder's bottleneck is"
        " the plain alternative. The score is computed inside the int8 graph: scores above the calibration"
        " range saturate (docs/anomaly.md), which ties the strongest anomalies but keeps them above the"
        " threshold."
    )
    write_section(
        "anomaly", "Anomaly detection: AUROC float vs int8 (anomaly_bench.py)", body, intro=intro, path=md
    )
    print(body)


def main() -> None:
    """Parse arguments and run the benchmark."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--md", type=Path, default=BENCHMARKS_MD, help="markdown file to write the section into")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(args.md)


if __name__ == "__main__":
    main()
