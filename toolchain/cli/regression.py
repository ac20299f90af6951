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


def run_build_regression(
    model: str,
    data_path: str,
    targets: tuple[str, ...],
    out_dir: str,
    eval_data: str | None,
    label: str | None,
    version: int,
    name: str | None,
    sign_key: str | None,
    max_error_increase: float,
    allow: bool,
    as_json: bool,
) -> None:
    """``edgefleet build --task regression`` (``toolchain.steps.regbuild``)."""
    from toolchain.steps.regbuild import RegressionBuildError, build_regression_bundles

    try:
        with stdout_to_stderr(as_json):
            report = build_regression_bundles(
                model,
                data_path,
                list(targets),
                out_dir,
                eval_data=eval_data,
                label=label,
                version=version,
                name=name,
                sign_key=sign_key,
                max_error_increase=max_error_increase,
                allow_error_increase=allow,
                progress=not as_json,
            )
    except RegressionBuildError as e:
        if e.report is not None:
            if as_json:
                emit_json(e.report)
            else:
                click.echo(regression_table(e.report))
        raise
    if as_json:
        emit_json(report)
        return
    click.echo(regression_table(report))
    click.echo(f"\nbundles in {out_dir}/<target>/; report: {Path(out_dir) / 'report.html'}")


def regression_table(report: dict[str, Any]) -> str:
    """The terminal table of a regression report: a row per (hardware target, output)."""
    from toolchain.report import text_table
    from toolchain.steps.regbuild import METRIC_HEADERS, metric_rows

    return text_table(METRIC_HEADERS, metric_rows(report))


def print_regression_report(base: Path, report: dict[str, Any], as_json: bool) -> None:
    """``edgefleet report`` of a regression build: re-render report.html, print the table."""
    from toolchain.steps.regbuild import write_regression_report

    write_regression_report(base, report)
    if as_json:
        emit_json(report)
        return
    click.echo(regression_table(report))
    click.echo(f"\nreport: {base / 'report.html'}")


def bundle_task(bundle: str, task: str) -> str:
    """The bundle's task; a ``--task`` other than classification (the default) must match it."""
    from device_agent.formats.manifest import BundleError, load_manifest
    from toolchain.errors import ToolchainError

    try:
        kind = load_manifest(Path(bundle)).task_type
    except (BundleError, OSError):
        return task  # evaluate reports the bundle's own problem in one line
    if task != "classification" and task != kind:
        raise ToolchainError(f"--task {task} does not match bundle {bundle!r}, whose task is {kind}")
    return kind


def run_evaluate_regression(
    bundle: str, data_path: str, label: str | None, runtimes: list[str], as_json: bool
) -> None:
    """``edgefleet evaluate`` of a regression bundle: MAE/RMSE/R2 per target in every runtime, through
    the agent one sample at a time, beside the figures the build measured."""
    from device_agent.formats.manifest import load_manifest
    from toolchain.errors import ToolchainError
    from toolchain.report import text_table
    from toolchain.steps.regbuild import device_values
    from toolchain.steps.regression import error_metrics, load_regression_data

    m = load_manifest(Path(bundle))
    listed = [r.value for r in m.model.runtimes]
    unknown = [r for r in runtimes if r not in listed]
    if unknown:
        raise ToolchainError(
            f"--runtime {unknown[0]!r} is not in bundle {bundle!r}; it lists {', '.join(listed)}"
        )
    with stdout_to_stderr(as_json):
        ds = load_regression_data(data_path, label)
        if ds.y.shape[1] != len(m.labels):
            raise ToolchainError(
                f"{data_path!r} has {ds.y.shape[1]} target(s); the bundle predicts {m.labels}"
            )
        per_runtime: dict[str, Any] = {}
        for rt in runtimes or listed:
            values, times = device_values(Path(bundle), rt, ds.x)
            per_runtime[rt] = {
                "metrics": error_metrics(ds.y, values, m.labels),
                "agent_ms_p50": float(sorted(times)[len(times) // 2]),
            }
    doc = {
        "name": m.name,
        "version": m.version,
        "target": m.target,
        "task": "regression",
        "data": data_path,
        "samples": ds.n,
        "targets": m.labels,
        "per_runtime": per_runtime,
        "build_metrics": m.metrics,
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(f"{m.name} v{m.version} ({m.target}, regression) on {ds.n} samples of {data_path}")
    rows = [
        [rt, n, f"{v['mae']:.4g}", f"{v['rmse']:.4g}", f"{v['r2']:.4f}", f"{r['agent_ms_p50']:.3f}"]
        for rt, r in per_runtime.items()
        for n, v in r["metrics"].items()
    ]
    click.echo(text_table(["runtime", "output", "MAE", "RMSE", "R2", "agent p50 ms"], rows))
