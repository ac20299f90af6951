"""The ``--task regression`` paths of ``edgefleet train``, ``build`` and ``evaluate`` (issue 15).

Kept apart from the classification commands so those stay as they were; only this layer prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from toolchain.cli.output import emit_json, stdout_to_stderr
from toolchain.steps.train import LEARNING_RATE


def _metrics_line(metrics: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{name}: MAE {m['mae']:.4g}, RMSE {m['rmse']:.4g}, R2 {m['r2']:.3f}" for name, m in metrics.items()
    )


def run_train_regression(
    data_path: str,
    label: str | None,
    arch: str,
    epochs: int,
    seed: int,
    learning_rate: float | None,
    out: Path,
    as_json: bool,
) -> None:
    """Train a regression model (``toolchain.steps.regression.train_regression``) and report it."""
    from toolchain.steps.regression import load_regression_data, train_regression

    with stdout_to_stderr(as_json):
        ds = load_regression_data(data_path, label)
        res = train_regression(
            ds,
            arch,
            epochs,
            out,
            seed=seed,
            learning_rate=learning_rate if learning_rate is not None else LEARNING_RATE,
            progress=not as_json,
        )
    doc: dict[str, Any] = {
        "model": str(res.path),
        "metadata": str(res.meta_path),
        "task": "regression",
        "arch": arch,
        "seed": seed,
        "samples": ds.n,
        "input_shape": list(ds.x.shape[1:]),
        "targets": res.target_names,
        "epochs_run": res.epochs_run,
        "val_metrics": res.val_metrics,
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(
        f"saved {res.path} ({arch} regression, {ds.n} samples, {len(res.target_names)} target(s), seed {seed},"
        f" {res.epochs_run} epochs)"
    )
    click.echo("validation: " + _metrics_line(res.val_metrics))
