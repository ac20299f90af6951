"""Train a built-in architecture on the user's data (validation split, early stopping, progress bar)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.data import Dataset
from toolchain.steps.models import build_architecture, save_model
from toolchain.tfenv import import_keras, import_tf

VALIDATION_FRACTION = 0.1
PATIENCE_EPOCHS = 3
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
MIN_TRAIN_SAMPLES = 10


class TrainError(ToolchainError):
    """Training cannot start or produced no usable model."""


@dataclass
class TrainResult:
    """The trained model, where it was saved, and what training measured."""

    model: Any
    path: Path
    epochs_run: int
    val_accuracy: float
    train_accuracy: float
    history: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "epochs_run": self.epochs_run,
            "val_accuracy": self.val_accuracy,
            "train_accuracy": self.train_accuracy,
            "history": self.history,
        }


def progress_enabled(progress: bool) -> bool:
    """Show progress bars only when asked and stderr is a terminal."""
    return bool(progress) and sys.stderr.isatty()


def epoch_bar_callback(keras: Any, total: int, desc: str, progress: bool) -> Any:
    """Return a Keras callback that advances a tqdm bar per epoch (quiet when not a TTY)."""
    from tqdm import tqdm

    class _Bar(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = tqdm(
                total=total, desc=desc, unit="epoch", disable=not progress_enabled(progress), file=sys.stderr
            )

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            shown = {k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_accuracy")}
            self.bar.set_postfix(shown)
            self.bar.update(1)

        def on_train_end(self, logs: Any = None) -> None:
            self.bar.close()

    return _Bar()


def fit(
    model: Any,
    data: Dataset,
    epochs: int,
    *,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    validation_fraction: float = VALIDATION_FRACTION,
    patience: int | None = PATIENCE_EPOCHS,
    extra_callbacks: list[Any] | None = None,
    desc: str = "train",
    progress: bool = True,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Compile and fit ``model`` on ``data`` with a stratified validation split; return the history."""
    keras = import_keras()
    tf = import_tf()
    tf.random.set_seed(seed)
    train, val = data.split(validation_fraction, seed=seed) if validation_fraction > 0 else (data, None)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [epoch_bar_callback(keras, epochs, desc, progress), *(extra_callbacks or [])]
    if patience and val is not None and val.n:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=patience, restore_best_weights=True
            )
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(train.n)
    hist = model.fit(
        train.x[order],
        train.y[order],
        validation_data=(val.x, val.y) if val is not None and val.n else None,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        callbacks=callbacks,
    )
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def train_model(
    data: Dataset,
    arch: str,
    epochs: int,
    out_path: str | Path,
    *,
    validation_fraction: float = VALIDATION_FRACTION,
    patience: int = PATIENCE_EPOCHS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train built-in ``arch`` on ``data`` and save it (tf_keras .keras or .h5) to ``out_path``."""
    if epochs < 1:
        raise TrainError(f"--epochs must be at least 1, got {epochs}")
    if data.n < MIN_TRAIN_SAMPLES:
        raise TrainError(
            f"training data {data.source!r} has {data.n} samples; need at least {MIN_TRAIN_SAMPLES}"
        )
    if data.n_classes < 2:
        raise TrainError(f"training data {data.source!r} has {data.n_classes} class; need at least 2")
    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".keras", ".h5"):
        raise TrainError(f"--out {str(out_path)!r} must end in .keras or .h5")
    model = build_architecture(arch, data.x, data.n_classes, seed=seed)
    history = fit(
        model,
        data,
        epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        validation_fraction=validation_fraction,
        patience=patience,
        desc=f"train {arch}",
        progress=progress,
        seed=seed,
    )
    save_model(model, out_path)
    epochs_run = len(history.get("loss", []))
    val_acc = history.get("val_accuracy", [float("nan")])
    # EarlyStopping restores the best weights: report the best validation accuracy, which they reached.
    best = float(np.nanmax(val_acc)) if val_acc else float("nan")
    train_acc = float(np.mean(np.argmax(model.predict(data.x, verbose=0), axis=1) == data.y))
    return TrainResult(model, out_path, epochs_run, best, train_acc, history)
