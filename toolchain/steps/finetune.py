"""Fine-tune a deployed model on new data without forgetting the old (``edgefleet train --init-from``).

The model keeps everything the device and the fleet rely on: its architecture and weights as the
starting point, its preprocessing (an adapted ``Normalization`` keeps the mean and variance it was
adapted to, so the device's drift baseline stays comparable; ``Rescaling`` keeps its scale), and its
class names (read from the metadata ``train`` stored beside it; data is matched to them by name).

Training mixes NEW (every labelled sample) with a seeded, stratified sample of OLD of
``replay x len(NEW)`` rows ("replay"), so what the model knew is rehearsed while it learns the new.
Early stopping watches a validation split holding out ``VALIDATION_FRACTION`` of NEW plus as many rows
of OLD (never trained on), so it stops when the loss on the old and the new together stops falling,
even with ``replay 0``. The learning rate starts lower than ``train``'s (``LEARNING_RATE``) so the first
steps do not undo the deployed weights; the schedule, determinism (``--seed``) and class weights are
``train``'s own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.steps.architectures import ARCHITECTURES
from toolchain.steps.data import DataError, Dataset, check_fits, conform
from toolchain.steps.models import ModelError, load_model, read_model_meta, save_model, write_model_meta
from toolchain.steps.train import (
    BATCH_SIZE,
    DEFAULT_SEED,
    LR_PATIENCE_EPOCHS,
    MIN_EPOCHS,
    MIN_TRAIN_SAMPLES,
    PATIENCE_EPOCHS,
    VALIDATION_FRACTION,
    XENT_MONITOR,
    TrainError,
    best_epoch,
    check_out_path,
    class_weights,
    data_sha256,
    fit,
    json_safe,
    library_versions,
    measure,
    training_settings,
)
from toolchain.tfenv import native_quiet

DEFAULT_REPLAY = 0.5  # OLD rows mixed in, as a fraction of NEW's labelled rows
LEARNING_RATE = 3e-4  # a third of train's 1e-3: small first steps from the deployed weights
# Layers whose weights are the model's preprocessing: fine-tuning must leave them exactly as they are.
PREPROCESSING_LAYERS = ("Normalization", "Rescaling", "Resizing")


@dataclass
class FineTuneResult:
    """The fine-tuned model, where it went, and accuracy before and after on the old and new validation rows."""

    model: Any
    path: Path
    meta_path: Path
    arch: str | None
    class_names: list[str]
    epochs_run: int
    best_epoch: int
    new_samples: int  # labelled NEW rows (training and validation)
    old_samples: int  # OLD rows given
    replay_fraction: float
    replay_samples: int  # OLD rows trained on
    val_old: int  # OLD rows in the validation split
    val_new: int  # NEW rows in the validation split
    before: dict[str, float | None]  # {"old": accuracy, "new": accuracy, "all": ...} of the deployed model
    after: dict[str, float | None]
    val_loss: float
    train_accuracy: float
    class_weight: dict[int, float] | None = None
    val_recall: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line each: what was dropped, reordered, capped
    history: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Base:
    """The deployed model as fine-tuning starts from it."""

    path: Path
    model: Any  # tf_keras model
    meta: dict[str, Any]
    class_names: list[str]
    names_source: str  # model | data | indices
    arch: str | None
    input_shape: tuple[int, ...]


def check_replay(replay: float | None, have_old: bool) -> float:
    """Return the replay fraction to use: ``DEFAULT_REPLAY`` when unset and OLD is given, 0 without OLD."""
    if replay is None:
        return DEFAULT_REPLAY if have_old else 0.0
    if not (0.0 <= replay <= 1.0):  # also refuses NaN
        raise TrainError(
            f"--replay {replay} is outside [0, 1]; it is the share of OLD rows to mix in per NEW row"
            f" (default {DEFAULT_REPLAY})"
        )
    if replay > 0 and not have_old:
        raise TrainError(
            f"--replay {replay} needs old data to replay: pass --data OLD --data NEW (the first --data is OLD)"
        )
    return float(replay)


def load_base(init_from: str | Path, arch: str | None, old: Dataset | None, new: Dataset) -> Base:
    """Load the model to fine-tune (tf_keras), its metadata and class names; refuse a conflicting ``arch``."""
    p = Path(init_from)
    if not p.exists():
        raise TrainError(
            f"--init-from {str(p)!r} does not exist; pass the deployed model's .keras or .h5 file"
        )
    try:
        lm = load_model(p)
        model = lm.as_tf_keras("fine-tuning (--init-from)")
        meta = read_model_meta(p) or {}
    except ModelError as e:
        raise TrainError(f"--init-from: {e}") from None
    recorded = meta.get("arch") or (model.name if model.name in ARCHITECTURES else None)
    if arch is not None and arch != recorded:
        what = f"a built-in {recorded}" if recorded else "not a built-in architecture"
        raise TrainError(
            f"--arch {arch} conflicts with --init-from {str(p)!r} ({what}); fine-tuning keeps the model's"
            " architecture: drop --arch, or train a new model without --init-from"
        )
    k = lm.n_outputs
    names = meta.get("class_names")
    if names:
        if len(names) != k:
            raise TrainError(
                f"--init-from {str(p)!r}: its metadata names {len(names)} classes but the model has {k}"
                " outputs; delete the stale .edgefleet.json beside it"
            )
        source = "model"
    elif old is not None and old.n_classes == k:
        names, source = list(old.class_names), "data"
    elif new.n_classes == k:
        names, source = list(new.class_names), "data"
    else:
        names, source = [str(i) for i in range(k)], "indices"
    return Base(p, model, meta, list(names), source, recorded, lm.input_shape)


def match_classes(ds: Dataset, names: list[str], what: str, init_from: Path) -> tuple[Dataset, str | None]:
    """Return ``ds`` labelled with the model's class indices (by name) and a note when they were reordered."""
    index_labels = all(c.isdigit() and int(c) < len(names) for c in ds.class_names)
    unknown = [c for c in ds.class_names if c not in names]
    if unknown and not index_labels:
        raise TrainError(
            f"{what} {ds.source!r} has class(es) {unknown[:5]} that --init-from {init_from.name!r} does not know"
            f" (its classes: {names[:10]}); fine-tuning keeps the model's classes: relabel the data, or train"
            " a new model with --arch"
        )
    note = None
    if not unknown and ds.class_names != names[: len(ds.class_names)]:
        note = (
            f"{what} {ds.source!r}: classes matched to the model's by name (file order {ds.class_names[:10]})"
        )
    try:
        return conform(ds, names), note
    except DataError as e:
        raise TrainError(str(e)) from None


def preprocessing_state(model: Any) -> dict[str, list[np.ndarray]]:
    """Return the weights of the model's preprocessing layers (Normalization's mean, variance, count...)."""
    return {
        layer.name: [np.array(w, copy=True) for w in layer.get_weights()]
        for layer in model.layers
        if type(layer).__name__ in PREPROCESSING_LAYERS
    }


def _split_plan(
    old: Dataset | None, new: Dataset, replay: float, seed: int
) -> tuple[Dataset, Dataset, Dataset, Dataset, list[str]]:
    """Return ``(train, replayed, val_old, val_new, notes)``: NEW's training part plus the OLD replay sample."""
    notes: list[str] = []
    new_train, val_new = new.split(VALIDATION_FRACTION, seed=seed)
    empty = new.subset(np.array([], dtype=np.int64))
    if old is None or old.n == 0:
        return new_train, empty, empty, val_new, notes
    k_val = min(val_new.n, old.n // 2)
    if k_val > 0:
        old_rest, val_old = old.split(k_val / old.n, seed=seed)
    else:
        old_rest, val_old = old, old.subset(np.array([], dtype=np.int64))
    want = int(round(replay * new.n))
    if want == 0 or old_rest.n == 0:
        replayed = old_rest.subset(np.array([], dtype=np.int64))
    elif want >= old_rest.n:
        replayed = old_rest
        if want > old_rest.n:
            notes.append(
                f"replay {replay} of {new.n} new rows asks for {want} old rows; OLD has {old_rest.n} left"
                " after validation: all of them are replayed"
            )
    else:
        _, replayed = old_rest.split(want / old_rest.n, seed=seed + 1)
    train = Dataset(
        np.concatenate([new_train.x, replayed.x]),
        np.concatenate([new_train.y, replayed.y]),
        new.feature_names,
        new.class_names,
        f"{new_train.source} + {replayed.n} replayed rows of {old.source}",
        new.kind,
    )
    return train, replayed, val_old, val_new, notes


def _accuracy(model: Any, ds: Dataset) -> float | None:
    if not ds.n:
        return None
    with native_quiet():
        return float(np.mean(np.asarray(model.predict(ds.x, verbose=0)).argmax(1) == ds.y))


def _file_sha256(p: Path) -> str | None:
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _summary(ds: Dataset | None, dropped: int = 0) -> dict[str, Any] | None:
    if ds is None:
        return None
    return {
        "source": ds.source,
        "kind": ds.kind,
        "samples": ds.n,
        "unlabelled_dropped": dropped,
        "class_counts": [int(v) for v in np.bincount(ds.y, minlength=ds.n_classes)],
        "sha256": data_sha256(ds),
    }


def finetune_model(
    init_from: str | Path,
    old: Dataset | None,
    new: Dataset,
    epochs: int,
    out_path: str | Path,
    *,
    replay: float | None = None,
    arch: str | None = None,
    learning_rate: float = LEARNING_RATE,
    class_weight: str = "auto",
    seed: int = DEFAULT_SEED,
    batch_size: int = BATCH_SIZE,
    patience: int = PATIENCE_EPOCHS,
    min_epochs: int = MIN_EPOCHS,
    lr_patience: int = LR_PATIENCE_EPOCHS,
    unlabelled_dropped: tuple[int, int] = (0, 0),
    progress: bool = True,
    on_ready: Callable[[list[str]], None] | None = None,
) -> FineTuneResult:
    """Continue training ``init_from`` on ``new`` with ``replay`` x len(new) rows of ``old``; save to ``out_path``.

    Every check (paths, replay, architecture, input shape, class names, sample counts) runs before the
    first epoch and raises TrainError in one line. ``unlabelled_dropped`` = rows dropped from (OLD, NEW)
    while loading, recorded in the metadata. ``on_ready`` gets the notes (one line each: classes
    reordered, replay capped) once every check has passed, before the first epoch. Same inputs and
    ``seed`` give bit-identical weights.
    """
    out = check_out_path(out_path)
    init = Path(init_from)
    if init.exists() and out.resolve() == init.resolve():
        raise TrainError(
            f"--out {str(out_path)!r} is the --init-from model; write the fine-tuned model to a new file"
            " (for example model-v2.keras) so the deployed one stays as it is"
        )
    if epochs < 1:
        raise TrainError(f"--epochs must be at least 1, got {epochs}")
    if not (learning_rate > 0 and np.isfinite(learning_rate)):
        raise TrainError(f"--learning-rate must be a positive number, got {learning_rate}")
    replay_f = check_replay(replay, old is not None and old.n > 0)
    base = load_base(init, arch, old, new)
    for what, ds in (("OLD data", old), ("NEW data", new)):
        if ds is not None:
            try:
                check_fits(ds, base.input_shape, None, what=what)
            except DataError as e:
                raise TrainError(str(e)) from None
    notes: list[str] = []
    new_m, note = match_classes(new, base.class_names, "NEW data", init)
    notes += [note] if note else []
    old_m = None
    if old is not None:
        old_m, note = match_classes(old, base.class_names, "OLD data", init)
        notes += [note] if note else []
    if new_m.n < MIN_TRAIN_SAMPLES:
        raise TrainError(
            f"NEW data {new.source!r} has {new_m.n} labelled samples; fine-tuning needs at least"
            f" {MIN_TRAIN_SAMPLES} (label more captured samples)"
        )
    train, replayed, val_old, val_new, plan_notes = _split_plan(old_m, new_m, replay_f, seed)
    notes += plan_notes
    names = base.class_names
    model = base.model
    val = Dataset(
        np.concatenate([val_old.x, val_new.x]),
        np.concatenate([val_old.y, val_new.y]),
        new_m.feature_names,
        names,
        "validation (old + new)",
        new_m.kind,
    )
    before = {
        "old": _accuracy(model, val_old),
        "new": _accuracy(model, val_new),
        "all": _accuracy(model, val),
    }
    pre_before = preprocessing_state(model)
    if on_ready is not None:
        on_ready(notes)
    weights = class_weights(train.y, len(names), class_weight)
    history = fit(
        model,
        train,
        epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        validation=val if val.n else None,
        validation_fraction=0.0,
        patience=patience,
        min_epochs=min_epochs,
        lr_patience=lr_patience,
        class_weight=weights,
        monitor=XENT_MONITOR,
        desc="fine-tune",
        progress=progress,
        seed=seed,
    )
    pre_after = preprocessing_state(model)
    for layer, ws in pre_before.items():
        if any(not np.array_equal(a, b) for a, b in zip(ws, pre_after.get(layer, []), strict=False)):
            raise TrainError(
                f"fine-tuning changed preprocessing layer {layer!r}; this is a bug, please report it"
            )
    epochs_run = len(history.get("loss", []))
    start = max(0, min(min_epochs, epochs) - patience) if patience else 0
    best = best_epoch(history, XENT_MONITOR, start) if val.n and patience else epochs_run
    with native_quiet():
        val_accuracy, val_loss, val_recall = measure(model, val, names)
        train_acc = float(np.mean(np.asarray(model.predict(train.x, verbose=0)).argmax(1) == train.y))
    after = {"old": _accuracy(model, val_old), "new": _accuracy(model, val_new), "all": val_accuracy}
    save_model(model, out)
    meta = dict(base.meta)
    meta.pop("schema", None)
    meta.update(
        {
            "class_names": names,
            "feature_names": base.meta.get("feature_names") or new_m.feature_names,
            "input_shape": list(base.input_shape),
            "arch": base.arch,
            "seed": seed,
            "init_from": {
                "path": str(init),
                "sha256": _file_sha256(init),
                "class_names_source": base.names_source,
                "data_sha256": (base.meta.get("data") or {}).get("sha256"),
                "preprocessing_kept": sorted(pre_before),
            },
            "data": {
                "old": _summary(old_m, unlabelled_dropped[0]),
                "new": _summary(new_m, unlabelled_dropped[1]),
                "replay_fraction": replay_f,
                "replay_samples": replayed.n,
                "validation_old": val_old.n,
                "validation_new": val_new.n,
            },
            "training": {
                **training_settings(
                    epochs=epochs,
                    epochs_run=epochs_run,
                    best=best,
                    batch_size=batch_size,
                    learning_rate=learning_rate,
                    lr_patience=lr_patience,
                    patience=patience,
                    min_epochs=min_epochs,
                ),
                "mode": "fine-tune",
                "validation_fraction": VALIDATION_FRACTION,
                "validation_split": "stratified: NEW's fraction plus as many OLD rows",
                "class_weight_mode": class_weight,
                "class_weight": {names[k]: v for k, v in weights.items()} if weights else None,
            },
            "metrics": {
                "val_accuracy": val_accuracy,
                "val_loss": val_loss,
                "val_recall": val_recall,
                "train_accuracy": train_acc,
                "before": before,
                "after": after,
            },
            "versions": library_versions(),
        }
    )
    meta_path = write_model_meta(out, json_safe(meta))
    return FineTuneResult(
        model=model,
        path=out,
        meta_path=meta_path,
        arch=base.arch,
        class_names=names,
        epochs_run=epochs_run,
        best_epoch=best,
        new_samples=new_m.n,
        old_samples=old_m.n if old_m is not None else 0,
        replay_fraction=replay_f,
        replay_samples=replayed.n,
        val_old=val_old.n,
        val_new=val_new.n,
        before=before,
        after=after,
        val_loss=val_loss,
        train_accuracy=train_acc,
        class_weight=weights,
        val_recall=val_recall,
        notes=notes,
        history=history,
    )
