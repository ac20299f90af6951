"""``edgefleet build | evaluate | report | targets``: thin layers over the Python API (train: cli/train.py).

Only this layer prints. With ``--json`` the result goes to stdout as one JSON document and nothing
else does (library chatter on file descriptor 1 is redirected to stderr while the work runs).
Heavy modules (TensorFlow, the runtimes) are imported inside the commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from toolchain.steps.per_class import DEFAULT_MAX_CLASS_DROP_POINTS

DEFAULT_OUT = "bundles"


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """While active, send everything written to stdout (Python and C level) to stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit_json(doc: Any) -> None:
    """Print one JSON document to stdout."""
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


# --------------------------------------------------------------------------------------------------
# build


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
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout (nothing else on stdout).")
def build_cmd(
    model: str,
    data_path: str,
    targets: tuple[str, ...],
    quantize: str,
    prune: float | None,
    eval_data: str | None,
    label: str | None,
    version: int,
    name: str | None,
    out_dir: str,
    sign_key: str | None,
    allow_accuracy_drop: bool,
    max_class_drop: float,
    as_json: bool,
) -> None:
    """Turn MODEL (.keras, .h5 or SavedModel) into verified int8 bundles, one per target."""
    from toolchain.build import BuildError, build_bundles
    from toolchain.report import summary_table

    try:
        with stdout_to_stderr(as_json):
            report = build_bundles(
                model,
                data_path,
                list(targets),
                out_dir,
                quantize=quantize,
                prune=prune,
                eval_data=eval_data,
                label=label,
                version=version,
                name=name,
                sign_key=sign_key,
                allow_accuracy_drop=allow_accuracy_drop,
                progress=not as_json,
                max_class_drop=max_class_drop,
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


# --------------------------------------------------------------------------------------------------
# evaluate


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
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON on stdout.")
def evaluate_cmd(
    bundle: str, data_path: str, label: str | None, runtimes: tuple[str, ...], as_json: bool
) -> None:
    """Re-measure a BUNDLE on labelled data: accuracy, per-class metrics and latency in each runtime."""
    from toolchain.report import MAX_TEXT_MATRIX_CLASSES, confusion_text, per_class_rows, text_table
    from toolchain.steps.data import load_dataset
    from toolchain.steps.evaluate import evaluate_bundle

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


# --------------------------------------------------------------------------------------------------
# report


@click.command("report")
@click.argument("out_dir")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
def report_cmd(out_dir: str, as_json: bool) -> None:
    """Re-render the summary table and OUT_DIR/report.html from OUT_DIR/report.json."""
    from toolchain.report import load_report, summary_table, write_report

    report = load_report(out_dir)
    base = Path(out_dir) if Path(out_dir).is_dir() else Path(out_dir).parent
    _, html_path = write_report(base, report)
    if as_json:
        emit_json(report)
        return
    click.echo(summary_table(report))
    click.echo(f"\nreport: {html_path}")


# --------------------------------------------------------------------------------------------------
# targets


@click.group("targets")
def targets_cmd() -> None:
    """List and show hardware target profiles (targets/*.toml)."""


@targets_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON on stdout.")
def targets_list(as_json: bool) -> None:
    """List the target profiles found."""
    from toolchain.report import text_table
    from toolchain.targets import list_targets

    found = list_targets()
    if as_json:
        emit_json([t.to_dict() for t in found.values()])
        return
    rows = [
        [
            t.name,
            t.format.value,
            f"{t.quantization.input_dtype.value}/{t.quantization.output_dtype.value}",
            ", ".join(r.value for r in t.runtimes),
            str(t.threads),
            f"{100 * t.limits.max_accuracy_drop:.2f}",
            t.description,
        ]
        for t in found.values()
    ]
    click.echo(
        text_table(["name", "format", "I/O", "runtimes", "threads", "max drop (pts)", "description"], rows)
    )


@targets_cmd.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON on stdout.")
def targets_show(name: str, as_json: bool) -> None:
    """Show one target profile in full."""
    from toolchain.targets import load_target

    t = load_target(name)
    d = t.to_dict()
    if as_json:
        emit_json(d)
        return
    for k in ("name", "description", "format", "runtimes", "threads", "quantization", "limits", "path"):
        v = d[k]
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        click.echo(f"{k:13} {v}")
    if d.get("budget"):
        set_keys = {k: v for k, v in d["budget"].items() if v is not None}
        click.echo(f"{'budget':13} " + (", ".join(f"{k}={v}" for k, v in set_keys.items()) or "none set"))
    if d["edgetpu"]:
        e = d["edgetpu"]
        click.echo(
            f"{'edgetpu':13} compiler={e['compiler']}, static_batch={e['static_batch']}, "
            f"max_on_chip_bytes={e['max_on_chip_bytes']}"
        )
        ops = e["supported_ops"]
        click.echo(
            f"{'':13} supported ops: " + ", ".join(f"{k}" + (f"<=v{v}" if v else "") for k, v in ops.items())
        )
