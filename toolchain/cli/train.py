"""``edgefleet train``: train a built-in architecture on the user's data, repeatably (``--seed``).

The ``--out`` path is checked (suffix, folder, writable) before the data is read or TensorFlow is
imported (``toolchain.steps.train`` imports TensorFlow only inside its functions), so a typo costs
a second, not a training run. Only this layer prints.
"""

from __future__ import annotations

import click

from toolchain.cli.output import emit_json, stdout_to_stderr
from toolchain.steps.train import CLASS_WEIGHT_MODES, DEFAULT_EPOCHS, DEFAULT_SEED, check_out_path


@click.command("train")
@click.option(
    "--data",
    "data_path",
    required=True,
    help="Training data: .npz (x, y), .csv (with --label) or an image folder.",
)
@click.option("--label", default=None, help="Label column (CSV) or label array name (.npz, default y).")
@click.option(
    "--arch", type=click.Choice(["mlp", "cnn", "mobilenetv2"]), required=True, help="Built-in architecture."
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def train_cmd(
    data_path: str,
    label: str | None,
    arch: str,
    epochs: int,
    seed: int,
    class_weight: str,
    workers: int,
    out_path: str,
    as_json: bool,
) -> None:
    """Train a built-in architecture on your data (seeded, repeatable; early stopping on validation loss)."""
    out = check_out_path(out_path)  # before reading data or importing TensorFlow
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    with stdout_to_stderr(as_json):
        ds = load_dataset(data_path, label)
        if workers > 1:
            from toolchain.steps.distributed import train_workers

            result = train_workers(
                data_path,
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
                ds, arch, epochs, out, seed=seed, class_weight=class_weight, progress=not as_json
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
        "input_shape": list(ds.sample_shape),
        "classes": ds.class_names,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_accuracy": _finite(result.val_accuracy),
        "val_loss": _finite(result.val_loss),
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


def _finite(v: float) -> float | None:
    return v if v == v and v not in (float("inf"), float("-inf")) else None
