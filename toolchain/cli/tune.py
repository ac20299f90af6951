"""``edgefleet tune``: search architectures and compression inside a device budget (``toolchain.tune``).

Only this layer prints. With ``--json`` pareto.json's document goes to stdout and nothing else does.
"""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.output import emit_json, stdout_to_stderr
from toolchain.steps.architectures import ARCHITECTURES


@click.command("tune")
@click.option(
    "--data", "data_path", required=True, help="Training and calibration data (.npz, .csv, image folder)."
)
@click.option(
    "--eval-data",
    "eval_path",
    required=True,
    help="Labelled test data; half ranks the candidates, the other half (held out) reports the winner.",
)
@click.option("--target", required=True, help="Target profile to search for (one).")
@click.option(
    "--max-model-bytes", type=click.IntRange(min=1), default=None, help="Largest model file (bytes)."
)
@click.option(
    "--max-arena-bytes", type=click.IntRange(min=1), default=None, help="Largest activation arena (bytes)."
)
@click.option(
    "--max-latency-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Slowest p95 latency, batch 1, at the target's threads (ms, on this machine).",
)
@click.option(
    "--trials", type=click.IntRange(min=1), required=True, help="Trials in the study (all workers)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine sharing the study.",
)
@click.option(
    "--out", "out_dir", required=True, help="Output folder: pareto.json, report.html, best/<target>/."
)
@click.option("--resume", is_flag=True, help="Continue the study in --out (or --storage) up to --trials.")
@click.option(
    "--storage",
    default=None,
    help="Study database: sqlite:///PATH (default OUT/study.sqlite3) or postgresql+psycopg://USER@HOST/DB"
    " to share one search between machines.",
)
@click.option("--study", "study_name", default=None, help="Study name in --storage (default tune-TARGET).")
@click.option(
    "--arch",
    "archs",
    multiple=True,
    type=click.Choice(ARCHITECTURES),
    help="Architectures to search (repeatable; default every one that takes the data).",
)
@click.option(
    "--epochs",
    "max_epochs",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Most epochs a trial trains (trials try from a third of it up to it).",
)
@click.option("--label", default=None, help="Label column (CSV) or label array name (.npz).")
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=2**31 - 1),
    default=0,
    show_default=True,
    help="Seed for the eval split, the sampler and training.",
)
@click.option("--sign-key", default=None, help="Sign the bundles with this Ed25519 private key (PEM).")
@click.option("--json", "as_json", is_flag=True, help="Print pareto.json to stdout (nothing else on stdout).")
def tune_cmd(
    data_path: str,
    eval_path: str,
    target: str,
    max_model_bytes: int | None,
    max_arena_bytes: int | None,
    max_latency_ms: float | None,
    trials: int,
    workers: int,
    out_dir: str,
    resume: bool,
    storage: str | None,
    study_name: str | None,
    archs: tuple[str, ...],
    max_epochs: int,
    label: str | None,
    seed: int,
    sign_key: str | None,
    as_json: bool,
) -> None:
    """Search architecture, training and compression for the best model within a device budget."""
    from toolchain.cli.terminal import safe_text
    from toolchain.report import text_table
    from toolchain.tune.html import settings_text
    from toolchain.tune.run import tune

    with stdout_to_stderr(as_json):
        doc = tune(
            data_path,
            eval_path,
            target,
            out_dir,
            trials=trials,
            workers=workers,
            max_model_bytes=max_model_bytes,
            max_arena_bytes=max_arena_bytes,
            max_latency_ms=max_latency_ms,
            resume=resume,
            storage=storage,
            study_name=study_name,
            seed=seed,
            archs=archs or None,
            max_epochs=max_epochs,
            label=label,
            sign_key=sign_key,
            progress=not as_json,
        )
    if as_json:
        emit_json(doc)
        return
    front = set(doc["pareto_front"])
    rows = [
        [
            c["trial"],
            c["status"],
            settings_text(c["settings"]),
            "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.2f}%",
            "-" if c["size_bytes"] is None else f"{c['size_bytes'] / 1024:.1f}",
            "-" if c["latency_ms"] is None else f"{c['latency_ms']:.3f}",
            "yes" if c["trial"] in front else "",
        ]
        for c in doc["candidates"]
    ]
    click.echo(text_table(["trial", "status", "settings", "accuracy", "size KB", "p95 ms", "Pareto"], rows))
    for c in doc["candidates"]:
        if c.get("reason"):
            click.echo(f"trial {c['trial']} {c['status']}: {safe_text(c['reason'])}")
    for w in doc.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    best = doc["best"]
    held = best["holdout_accuracy"]
    click.echo(
        f"\nbest within budget: trial {best['trial']}, held-out accuracy "
        f"{'-' if held is None else f'{100 * held:.2f}%'} ({doc['holdout']['samples']} samples no trial saw;"
        f" selection {100 * best['selection_accuracy']:.2f}%)"
    )
    where = Path(out_dir)
    click.echo(f"bundle: {where / best['bundle'] if best['bundle'] else best.get('note')}")
    click.echo(f"pareto: {where / 'pareto.json'}; report: {where / 'report.html'}")
