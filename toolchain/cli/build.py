"""``edgefleet build | report``: thin layers over ``toolchain.build.build_bundles`` and its report.

Only this layer prints. With ``--json`` the result goes to stdout as one JSON document and nothing
else does (``toolchain.cli.output``). Heavy modules (TensorFlow, the runtimes) are imported inside the
commands. ``evaluate`` is in cli/evaluate.py, ``targets`` in cli/targets.py, ``train`` in cli/train.py.
"""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.options import task_option
from toolchain.cli.output import emit_json, stdout_to_stderr
from toolchain.steps.per_class import DEFAULT_MAX_CLASS_DROP_POINTS

DEFAULT_OUT = "bundles"


@click.command("build")
@click.argument("model")
@click.option(
    "--data",
    "data_path",
    required=True,
    help="Calibration/training data (.npz, .csv with --label, image folder).",
)
@click.option(
    "--target", "targets", multiple=True, required=True, help="Target profile (repeatable) or 'all'."
)
@click.option(
    "--quantize",
    type=click.Choice(["ptq", "qat"]),
    default="ptq",
    show_default=True,
    help="Post-training or quantization-aware.",
)
@click.option(
    "--prune",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Prune to this sparsity (0.5 = half the weights) with a short fine-tune.",
)
@click.option(
    "--cluster",
    type=click.IntRange(2, 256),
    default=None,
    metavar="K",
    help="Cluster each kernel's weights to K shared values (2..256) with a short fine-tune; with --prune"
    " the zeros are kept, with --quantize qat the clusters are (smaller after gzip).",
)
@click.option("--eval-data", default=None, help="Labelled test data (default: hold out 20% of --data).")
@click.option("--label", default=None, help="Label column (CSV) or label array name (.npz).")
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Bundle version (only ever increases).",
)
@click.option("--name", default=None, help="Bundle name (default: the model file's name).")
@click.option(
    "--out",
    "out_dir",
    default=DEFAULT_OUT,
    show_default=True,
    help="Output folder: one bundle per target in OUT/<target>/.",
)
@click.option("--sign-key", default=None, help="Sign each bundle with this Ed25519 private key (PEM).")
@click.option("--allow-accuracy-drop", is_flag=True, help="Ship targets that exceed their accuracy budget.")
@click.option(
    "--max-class-drop",
    "max_class_drop",
    type=click.FloatRange(0, 100),
    default=DEFAULT_MAX_CLASS_DROP_POINTS,
    show_default=True,
    metavar="POINTS",
    help="Fail a target where one class's recall drops more than this many points from float to int8"
    " (and by 2+ samples); 100 turns it off.",
)
@click.option(
    "--int8-search/--no-int8-search",
    default=True,
    show_default=True,
    help="x86 (ONNX): try the int8 forms (QDQ per-channel/per-tensor, reduced range) and ship the fastest"
    " that keeps accuracy; --no-int8-search ships QDQ per-channel without trying the others.",
)
@task_option
@click.option(
    "--max-error-increase",
    "max_error_increase",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    metavar="PERCENT",
    help="--task regression: fail a target whose int8 MAE exceeds the float MAE by more than this.",
)
@click.option(
    "--threshold-percentile",
    "threshold_percentile",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    default=None,
    metavar="P",
    help="--task anomaly: the threshold is this percentile of the int8 model's scores of --data"
    " (normal samples) [default: 99].",
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout (nothing else on stdout).")
def build_cmd(
    model: str,
    data_path: str,
    targets: tuple[str, ...],
    quantize: str,
    prune: float | None,
    cluster: int | None,
    eval_data: str | None,
    label: str | None,
    version: int,
    name: str | None,
    out_dir: str,
    sign_key: str | None,
    allow_accuracy_drop: bool,
    max_class_drop: float,
    int8_search: bool,
    task: str,
    max_error_increase: float,
    threshold_percentile: float | None,
    as_json: bool,
) -> None:
    """Turn MODEL (.keras, .h5 or SavedModel) into verified int8 bundles, one per target."""
    if task != "anomaly" and threshold_percentile is not None:
        raise click.UsageError("--threshold-percentile applies to --task anomaly")
    if task == "regression":
        from toolchain.cli.regression import run_build_regression

        if quantize != "ptq" or prune is not None or cluster is not None:
            raise click.UsageError("--task regression builds with --quantize ptq, no --prune or --cluster")
        run_build_regression(
            model, data_path, targets, out_dir, eval_data, label, version, name, sign_key,
            max_error_increase, allow_accuracy_drop, as_json,
        )  # fmt: skip
        return
    from toolchain.build import BuildError, build_bundles
    from toolchain.errors import ToolchainError
    from toolchain.report import summary_table
    from toolchain.steps.anomaly import model_task
    from toolchain.steps.models import read_model_meta

    trained_for = model_task(read_model_meta(Path(model)))
    if trained_for != task and trained_for != "classification":
        raise ToolchainError(
            f"model {model!r} was trained with --task {trained_for}; build it with --task {trained_for}"
        )
    if task == "anomaly":
        _build_anomaly(
            model,
            data_path,
            targets,
            quantize,
            prune,
            cluster,
            eval_data,
            label,
            version,
            name,
            out_dir,
            sign_key,
            allow_accuracy_drop,
            99.0 if threshold_percentile is None else threshold_percentile,
            as_json,
        )
        return
    try:
        with stdout_to_stderr(as_json):
            report = build_bundles(
                model,
                data_path,
                list(targets),
                out_dir,
                quantize=quantize,
                prune=prune,
                cluster=cluster,
                eval_data=eval_data,
                label=label,
                version=version,
                name=name,
                sign_key=sign_key,
                allow_accuracy_drop=allow_accuracy_drop,
                progress=not as_json,
                max_class_drop=max_class_drop,
                int8_search=int8_search,
            )
    except BuildError as e:
        if e.report is not None:
            if as_json:
                emit_json(e.report)
            else:
                click.echo(summary_table(e.report))
        raise
    if as_json:
        emit_json(report)
        return
    click.echo(summary_table(report))
    click.echo(f"\nbundles in {out_dir}/<target>/; report: {Path(out_dir) / 'report.html'}")


def _build_anomaly(
    model: str,
    data_path: str,
    targets: tuple[str, ...],
    quantize: str,
    prune: float | None,
    cluster: int | None,
    eval_data: str | None,
    label: str | None,
    version: int,
    name: str | None,
    out_dir: str,
    sign_key: str | None,
    allow_accuracy_drop: bool,
    threshold_percentile: float,
    as_json: bool,
) -> None:
    """``build --task anomaly`` (toolchain.steps.anomaly_build): the threshold from the int8 scores."""
    from toolchain.build import BuildError
    from toolchain.report import summary_table
    from toolchain.steps.anomaly_build import build_anomaly_bundles
    from toolchain.targets import resolve_targets

    unsupported = [
        flag
        for flag, on in (
            ("--prune", prune is not None),
            ("--cluster", cluster is not None),
            ("--quantize qat", quantize == "qat"),
        )
        if on
    ]
    try:
        with stdout_to_stderr(as_json):
            report = build_anomaly_bundles(
                model,
                data_path,
                resolve_targets(list(targets)),
                out_dir,
                threshold_percentile=threshold_percentile,
                eval_data=eval_data,
                label=label,
                version=version,
                name=name,
                sign_key=sign_key,
                allow_accuracy_drop=allow_accuracy_drop,
                progress=not as_json,
                unsupported=unsupported,
            )
    except BuildError as e:
        if e.report is not None:
            emit_json(e.report) if as_json else click.echo(summary_table(e.report))
        raise
    if as_json:
        emit_json(report)
        return
    click.echo(summary_table(report))
    click.echo(f"\nbundles in {out_dir}/<target>/; report: {Path(out_dir) / 'report.html'}")


@click.command("report")
@click.argument("out_dir")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def report_cmd(out_dir: str, as_json: bool) -> None:
    """Re-render the summary table and OUT_DIR/report.html from OUT_DIR/report.json."""
    from toolchain.report import load_report, summary_table, write_report

    report = load_report(out_dir)
    base = Path(out_dir) if Path(out_dir).is_dir() else Path(out_dir).parent
    if report.get("task") == "regression":
        from toolchain.cli.regression import print_regression_report

        print_regression_report(base, report, as_json)
        return
    _, html_path = write_report(base, report)
    if as_json:
        emit_json(report)
        return
    click.echo(summary_table(report))
    click.echo(f"\nreport: {html_path}")
