"""``edgefleet train --init-from MODEL --data OLD --data NEW``: read the data, fine-tune, print what changed.

The first ``--data`` is OLD (what the model was trained on, replayed), the others are NEW (for example
``edgefleet fleet samples export`` files, whose unlabelled rows are dropped and counted). With a single
``--data`` it is NEW and nothing is replayed. Only this layer prints.
"""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.output import emit_json, stdout_to_stderr


def run_finetune(
    init_from: str,
    data_paths: tuple[str, ...],
    label: str | None,
    arch: str | None,
    replay: float | None,
    learning_rate: float,
    epochs: int,
    seed: int,
    class_weight: str,
    out: Path,
    as_json: bool,
) -> None:
    """Fine-tune ``init_from`` (checks first, one line each) and print the result as text or JSON."""
    from toolchain.steps.finetune import check_replay, finetune_model
    from toolchain.steps.train import TrainError, json_safe
    from toolchain.steps.trainset import combine, load_labelled

    check_replay(replay, len(data_paths) > 1)  # a bad --replay fails before any data is read
    if not Path(init_from).exists():
        raise TrainError(
            f"--init-from {init_from!r} does not exist; pass the deployed model's .keras or .h5 file"
        )
    with stdout_to_stderr(as_json):
        old_part = load_labelled(data_paths[0], label) if len(data_paths) > 1 else None
        new_parts = [load_labelled(p, label) for p in data_paths[1:] or data_paths]
        dropped_new = sum(p.unlabelled for p in new_parts)
        said = [
            f"dropped {part.unlabelled} unlabelled samples (y = -1) of {part.data.source};"
            f" {part.data.n} labelled samples kept"
            for part in ([old_part] if old_part else []) + new_parts
            if part.unlabelled
        ]
        if old_part is None:
            said.append(
                "no OLD data: fine-tuning on NEW only, nothing replayed (pass --data OLD --data NEW so the"
                " model keeps what it knew)"
            )

        def ready(notes: list[str]) -> None:  # every check passed: say what was dropped, then train
            for line in [*said, *notes]:
                click.echo(line, err=True)

        result = finetune_model(
            init_from,
            old_part.data if old_part else None,
            combine([p.data for p in new_parts], what="NEW --data"),
            epochs,
            out,
            replay=replay,
            arch=arch,
            learning_rate=learning_rate,
            class_weight=class_weight,
            seed=seed,
            unlabelled_dropped=(old_part.unlabelled if old_part else 0, dropped_new),
            progress=not as_json,
            on_ready=ready,
        )
    weights = (
        {result.class_names[k]: round(v, 4) for k, v in result.class_weight.items()}
        if result.class_weight
        else None
    )
    doc = {
        "model": str(result.path),
        "metadata": str(result.meta_path),
        "init_from": init_from,
        "arch": result.arch,
        "seed": seed,
        "classes": result.class_names,
        "new_samples": result.new_samples,
        "old_samples": result.old_samples,
        "unlabelled_dropped": dropped_new + (old_part.unlabelled if old_part else 0),
        "replay": result.replay_fraction,
        "replay_samples": result.replay_samples,
        "learning_rate": learning_rate,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "validation": {"old": result.val_old, "new": result.val_new},
        "accuracy_before": result.before,
        "accuracy_after": result.after,
        "val_loss": json_safe(result.val_loss),
        "val_recall": result.val_recall,
        "train_accuracy": result.train_accuracy,
        "class_weight": weights,
    }
    if as_json:
        emit_json(doc)
        return
    click.echo(
        f"saved {result.path} (fine-tuned from {init_from}: {result.arch or 'own architecture'},"
        f" {len(result.class_names)} classes, seed {seed}; {result.new_samples} new samples +"
        f" {result.replay_samples} replayed old, replay {result.replay_fraction:g}, learning rate"
        f" {learning_rate:g}; best epoch {result.best_epoch} of {result.epochs_run})"
    )
    click.echo(f"{'validation accuracy':<22}{'samples':>8}{'before':>9}{'after':>9}")
    for key, n in (
        ("old", result.val_old),
        ("new", result.val_new),
        ("all", result.val_old + result.val_new),
    ):
        b, a = result.before.get(key), result.after.get(key)
        if n:
            click.echo(f"  {key:<20}{n:>8}{_pct(b):>9}{_pct(a):>9}")
    if weights:
        click.echo("class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in weights.items()))
    click.echo(f"class names, preprocessing kept and training settings: {result.meta_path}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
