"""``edgefleet evaluate``: re-measure a built bundle on labelled data (``toolchain.steps.evaluate``).

Only this layer prints; ``--json`` prints the measurements and nothing else on stdout.
"""

from __future__ import annotations

import click

from toolchain.cli.options import task_option
from toolchain.cli.output import emit_json, stdout_to_stderr


@click.command("evaluate")
@click.argument("bundle")
@click.option(
    "--data", "data_path", required=True, help="Labelled test data (.npz, .csv with --label, image folder)."
)
@click.option("--label", default=None, help="Label column (CSV) or label array name (.npz).")
@click.option(
    "--runtime",
    "runtimes",
    multiple=True,
    help="Measure only this runtime (repeatable; default: all the bundle lists).",
)
@task_option
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON on stdout.")
def evaluate_cmd(
    bundle: str, data_path: str, label: str | None, runtimes: tuple[str, ...], task: str, as_json: bool
) -> None:
    """Re-measure a BUNDLE on labelled data: accuracy, per-class metrics and latency in each runtime."""
    from toolchain.cli.regression import bundle_task, run_evaluate_regression

    kind = bundle_task(bundle, task)
    if kind == "regression":
        run_evaluate_regression(bundle, data_path, label, list(runtimes), as_json)
        return
    from toolchain.report import MAX_TEXT_MATRIX_CLASSES, confusion_text, per_class_rows, text_table
    from toolchain.steps.data import load_dataset
    from toolchain.steps.evaluate import evaluate_bundle

    if kind == "anomaly":
        _evaluate_anomaly(bundle, data_path, label, runtimes, as_json)
        return
    with stdout_to_stderr(as_json):
        ds = load_dataset(data_path, label)
        res = evaluate_bundle(bundle, ds, runtimes=list(runtimes) or None, progress=not as_json)
    if as_json:
        emit_json(res)
        return
    rows = []
    for rt, v in res["per_runtime"].items():
        lat = v["latency"]
        rows.append(
            [
                rt,
                f"{100 * v['accuracy']:.2f}%",
                f"{lat['threads_1']['p50_ms']:.3f}",
                f"{lat['threads_N']['p50_ms']:.3f} ({lat['threads_N']['threads']})",
                f"{lat['threads_N']['p95_ms']:.3f}",
                f"{v['latency_ms_p50']:.3f}" if v.get("latency_ms_p50") is not None else "-",
            ]
        )
    click.echo(
        f"{res['name']} v{res['version']} ({res['target']}, {res['format']}, {res['size_bytes']} bytes) on "
        f"{res['samples']} samples of {res['data']}"
    )
    click.echo(
        text_table(
            ["runtime", "accuracy", "p50 ms 1 thread", "p50 ms (threads)", "p95 ms", "agent p50 ms"], rows
        )
    )
    if res.get("build_accuracy") is not None:
        click.echo(f"accuracy at build time: {100 * res['build_accuracy']:.2f}%")
    if res.get("per_class"):
        click.echo(f"\nper class ({res['preferred_runtime']}):")
        click.echo(
            text_table(["class", "support", "precision", "recall", "F1"], per_class_rows(res["per_class"]))
        )
        if len(res["labels"]) <= MAX_TEXT_MATRIX_CLASSES:
            click.echo("\nconfusion matrix (rows true, columns predicted):")
            click.echo(confusion_text(res["confusion_matrix"], res["labels"]))


def _evaluate_anomaly(
    bundle: str, data_path: str, label: str | None, runtimes: tuple[str, ...], as_json: bool
) -> None:
    """``evaluate`` of an anomaly bundle: AUROC, precision and recall at its threshold, per runtime."""
    from toolchain.report import format_value, text_table
    from toolchain.steps.anomaly_build import evaluate_anomaly_bundle
    from toolchain.steps.data import load_dataset

    with stdout_to_stderr(as_json):
        res = evaluate_anomaly_bundle(bundle, load_dataset(data_path, label), list(runtimes) or None)
    if as_json:
        emit_json(res)
        return
    click.echo(
        f"{res['name']} v{res['version']} ({res['target']}, anomaly, threshold {res['threshold']:.4g}) on"
        f" {res['samples']} samples ({res['anomalies']} anomalies) of {res['data']}"
    )
    rows = [
        [
            rt,
            format_value(v.get("auroc")),
            format_value(v.get("precision"), "pct"),
            format_value(v.get("recall"), "pct"),
            format_value(v.get("false_positive_rate"), "pct"),
            format_value(v.get("latency_ms_p50"), "ms"),
        ]
        for rt, v in res["per_runtime"].items()
    ]
    click.echo(
        text_table(["runtime", "AUROC", "precision", "recall", "false positives", "agent p50 ms"], rows)
    )
    if res.get("build_auroc") is not None:
        click.echo(f"AUROC at build time: {res['build_auroc']:.4f}")
