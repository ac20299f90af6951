"""``edgefleet train``: train a built-in architecture on the user's data, repeatably (``--seed``), or
fine-tune a deployed model on new data (``--init-from MODEL --data OLD --data NEW [--replay F]``).

The ``--out`` path is checked (suffix, folder, writable) before the data is read or TensorFlow is
imported (``toolchain.steps.train`` imports TensorFlow only inside its functions), so a typo costs
a second, not a training run. Only this layer prints.
"""

from __future__ import annotations

import click

from toolchain.cli.options import task_option
from toolchain.cli.output import emit_json, stdout_to_stderr
from toolchain.steps.architectures import ARCHITECTURES, TASK_ARCHITECTURES
from toolchain.steps.finetune import DEFAULT_REPLAY
from toolchain.steps.finetune import LEARNING_RATE as FINETUNE_LEARNING_RATE
from toolchain.steps.train import (
    CLASS_WEIGHT_MODES,
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    LEARNING_RATE,
    TrainError,
    check_out_path,
)


@click.command("train")
@click.option(
    "--data",
    "data_paths",
    required=True,
    multiple=True,
    help="Training data: .npz (x, y), .csv (with --label) or an image folder; repeat to combine. With"
    " --init-from the first is OLD (replayed) and the rest NEW, e.g. a 'fleet samples export'.",
)
@click.option("--label", default=None, help="Label column (CSV) or label array name (.npz, default y).")
@click.option(
    "--arch",
    type=click.Choice([*ARCHITECTURES, *TASK_ARCHITECTURES]),
    default=None,
    help="Built-in architecture (required unless --init-from, which keeps the model's); autoencoder"
    " with --task anomaly.",
)
@click.option(
    "--init-from",
    "init_from",
    default=None,
    help="Fine-tune this model (.keras/.h5, e.g. the deployed one): same architecture, preprocessing and"
    " class names.",
)
@click.option(
    "--replay",
    type=float,
    default=None,
    help=f"With --init-from: OLD rows mixed in per NEW row, 0..1 [default: {DEFAULT_REPLAY}; 0 without OLD].",
)
@click.option(
    "--learning-rate",
    "learning_rate",
    type=float,
    default=None,
    help=f"Starting learning rate [default: {LEARNING_RATE:g}; {FINETUNE_LEARNING_RATE:g} with --init-from].",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DEFAULT_EPOCHS,
    show_default=True,
    help="Most epochs (early stopping on the validation loss usually ends far sooner).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=2**31 - 1),
    default=DEFAULT_SEED,
    show_default=True,
    help="Seed for initial weights, validation split and shuffling: same data and seed, same model.",
)
@click.option(
    "--class-weight",
    "class_weight",
    type=click.Choice(CLASS_WEIGHT_MODES),
    default="auto",
    show_default=True,
    help="Weight classes by inverse frequency: auto = when the largest class is 1.5x the smallest.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train data-parallel in this many local worker processes (MultiWorkerMirroredStrategy).",
)
@click.option("--out", "out_path", required=True, help="Where to save the model (.keras or .h5).")
@task_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def train_cmd(
    data_paths: tuple[str, ...],
    label: str | None,
    arch: str | None,
    init_from: str | None,
    replay: float | None,
    learning_rate: float | None,
    epochs: int,
    seed: int,
    class_weight: str,
    workers: int,
    out_path: str,
    task: str,
    as_json: bool,
) -> None:
    """Train a built-in architecture on your data (seeded, repeatable; early stopping on validation loss).

    With --init-from MODEL, fine-tune that model instead: --data OLD --data NEW [--replay F].
    """
    if init_from is None and arch is None:
        raise click.UsageError("Missing option '--arch' (needed unless --init-from MODEL)")
    if init_from is None and replay is not None:
        raise TrainError("--replay applies to fine-tuning; pass --init-from MODEL (the deployed model)")
    if learning_rate is not None and not (0 < learning_rate < float("inf")):
        raise TrainError(f"--learning-rate must be a positive number, got {learning_rate}")
    if task == "anomaly" or arch == "autoencoder":
        _train_anomaly(
            data_paths, label, arch, task, init_from, learning_rate, epochs, seed, workers, out_path, as_json
        )
        return
    out = check_out_path(out_path)  # before reading data or importing TensorFlow
    if task == "regression":
        from toolchain.cli.regression import run_train_regression

        if init_from is not None or workers > 1 or len(data_paths) != 1:
            raise TrainError(
                "--task regression trains from scratch on one --data (no --init-from, --workers)"
            )
        assert arch is not None
        run_train_regression(data_paths[0], label, arch, epochs, seed, learning_rate, out, as_json)
        return
    if init_from is not None:
        from toolchain.cli.finetune import run_finetune

        if workers > 1:
            raise TrainError("--workers applies to training from scratch, not to --init-from fine-tuning")

        run_finetune(
            init_from,
            data_paths,
            label,
            arch,
            replay,
            learning_rate if learning_rate is not None else FINETUNE_LEARNING_RATE,
            epochs,
            seed,
            class_weight,
            out,
            as_json,
        )
        return
    assert arch is not None
    from toolchain.steps.train import train_model
    from toolchain.steps.trainset import combine, load_labelled

    with stdout_to_stderr(as_json):
        parts = [load_labelled(p, label) for p in data_paths]
        ds = combine([part.data for part in parts])
        if workers > 1:
            from toolchain.steps.distributed import train_workers

            if len(data_paths) != 1 or learning_rate is not None or parts[0].unlabelled:
                raise TrainError(
                    "--workers trains on one fully labelled --data with the default learning rate;"
                    " combine the files into one, drop unlabelled rows, or train with --workers 1"
                )
            result = train_workers(
                data_paths[0],
                label,
                arch,
                epochs,
                out,
                workers=workers,
                seed=seed,
                class_weight=class_weight,
                progress=not as_json,
            )
        else:
            result = train_model(
                ds,
                arch,
                epochs,
                out,
                seed=seed,
                class_weight=class_weight,
                learning_rate=learning_rate if learning_rate is not None else LEARNING_RATE,
                progress=not as_json,
            )
            for part in parts:  # said after training, so a refusal stays one line
                if part.unlabelled:
                    click.echo(
                        f"dropped {part.unlabelled} unlabelled samples (y = -1) of {part.data.source}",
                        err=True,
                    )
    weights = (
        {ds.class_names[k]: round(v, 4) for k, v in result.class_weight.items()}
        if result.class_weight
        else None
    )
    doc = {
        "model": str(result.path),
        "metadata": str(result.meta_path) if result.meta_path else None,
        "arch": arch,
        "seed": seed,
        "workers": workers,
        "samples": ds.n,
        "unlabelled_dropped": sum(part.unlabelled for part in parts),
        "input_shape": list(ds.sample_shape),
        "classes": ds.class_names,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_accuracy": finite(result.val_accuracy),
        "val_loss": finite(result.val_loss),
        "val_recall": result.val_recall,
        "train_accuracy": result.train_accuracy,
        "class_weight": weights,
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(
        f"saved {result.path} ({arch}, {ds.n} samples, {len(ds.class_names)} classes, seed {seed}): "
        f"validation accuracy {100 * result.val_accuracy:.2f}% "
        f"(best epoch {result.best_epoch} of {result.epochs_run})"
    )
    if result.val_recall:
        shown = ", ".join(f"{name} {100 * r:.1f}%" for name, r in result.val_recall.items())
        click.echo(f"validation recall per class: {shown}")
    if weights:
        click.echo("class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in weights.items()))
    if result.meta_path:
        click.echo(f"class names and training settings: {result.meta_path}")


def finite(v: float | None) -> float | None:
    """Return ``v``, or None for NaN, infinity or None (strict JSON)."""
    if v is None:
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _train_anomaly(
    data_paths: tuple[str, ...],
    label: str | None,
    arch: str | None,
    task: str,
    init_from: str | None,
    learning_rate: float | None,
    epochs: int,
    seed: int,
    workers: int,
    out_path: str,
    as_json: bool,
) -> None:
    """``train --task anomaly --arch autoencoder``: fit the autoencoder to normal samples only."""
    if task != "anomaly":
        raise TrainError("--arch autoencoder learns what normal looks like; train it with --task anomaly")
    if arch != "autoencoder":
        raise TrainError(f"--task anomaly trains --arch autoencoder (got --arch {arch or 'none'})")
    if init_from is not None or workers > 1:
        raise TrainError("--task anomaly trains from scratch in one process; drop --init-from and --workers")
    out = check_out_path(out_path)  # before reading data or importing TensorFlow
    from toolchain.steps.anomaly import load_normal, train_autoencoder

    with stdout_to_stderr(as_json):
        ds = load_normal(data_paths, label)
        result = train_autoencoder(
            ds, epochs, out, seed=seed, learning_rate=learning_rate, progress=not as_json
        )
    doc = {
        "model": str(result.path),
        "metadata": str(result.meta_path),
        "task": "anomaly",
        "arch": "autoencoder",
        "seed": seed,
        "samples": ds.n,
        "input_shape": list(ds.sample_shape),
        "labels": ["normal", "anomaly"],
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_score_mean": finite(result.val_score_mean),
        "val_score_p99": finite(result.val_score_p99),
        "train_score_mean": finite(result.train_score_mean),
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(
        f"saved {result.path} (autoencoder, {ds.n} normal samples, seed {seed}): validation score mean"
        f" {result.val_score_mean:.4g}, 99th percentile {result.val_score_p99:.4g}"
        f" (best epoch {result.best_epoch} of {result.epochs_run}); the build picks the threshold"
    )
