"""Train a built-in architecture on the user's data, repeatably: same data and seed, same weights.

``train_model`` holds out a stratified, seeded validation split, weights the classes when the labels
are unbalanced, halves the learning rate when the validation loss stops improving, stops early on the
validation loss (never before ``MIN_EPOCHS``) and restores the best epoch's weights. Everything random
(weight initialisation, the split, the per-epoch shuffling, dropout) derives from one ``seed``, and
TensorFlow's op determinism is on while it trains, so two runs give bit-identical weights on the same
machine and software. The model's metadata (class names, feature names, settings) is written beside it
(``toolchain.steps.models.write_model_meta``), so ``build`` knows the labels without the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.architectures import build_architecture
from toolchain.steps.data import Dataset
from toolchain.steps.models import model_meta_path, save_model, write_model_meta
from toolchain.tfenv import import_keras, import_tf, native_quiet, terminal_stderr

DEFAULT_SEED = 0
DEFAULT_EPOCHS = 100  # the most; early stopping usually ends far sooner
VALIDATION_FRACTION = 0.15
# fit()'s own default for the short fine-tunes of pruning and QAT (which set no early stopping).
FIT_VALIDATION_FRACTION = 0.1
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
# Early stopping watches the validation loss (smoother than accuracy on a few dozen samples).
PATIENCE_EPOCHS = 10
MIN_EPOCHS = 10  # no early stop before this many epochs (capped at --epochs)
# Smaller validation-loss gains do not count as progress: with L2 and a learning rate that keeps
# halving, the loss creeps down by 1e-5 an epoch long after the model stopped learning.
EARLY_STOP_MIN_DELTA = 1e-3
# What early stopping and the learning-rate schedule watch: the validation cross-entropy without the
# regularisation penalty (Keras's val_loss includes it).
XENT_MONITOR = "val_xent"
# ReduceLROnPlateau: halve the learning rate after LR_PATIENCE_EPOCHS without a better validation loss.
LR_PATIENCE_EPOCHS = 4
LR_FACTOR = 0.5
MIN_LEARNING_RATE = 1e-5
# class_weight "auto" weights classes (n / (K * count)) when the largest class is this many times the
# smallest; below it the weights are all close to 1 and plain accuracy is the better objective.
IMBALANCE_RATIO = 1.5
CLASS_WEIGHT_MODES = ("auto", "balanced", "none")
MIN_TRAIN_SAMPLES = 10
MODEL_SUFFIXES = (".keras", ".h5")


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
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    val_loss: float = float("nan")
    seed: int = DEFAULT_SEED
    class_weight: dict[int, float] | None = None
    val_recall: dict[str, float] = field(default_factory=dict)  # per class name, on the validation split
    meta_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "train_accuracy": self.train_accuracy,
            "seed": self.seed,
            "class_weight": (
                {str(k): v for k, v in self.class_weight.items()} if self.class_weight else None
            ),
            "val_recall": self.val_recall,
            "meta_path": str(self.meta_path) if self.meta_path else None,
            "history": self.history,
        }


# --------------------------------------------------------------------------------------------------
# Output path: checked before any data is read or any epoch runs


def check_out_path(out_path: str | Path) -> Path:
    """Check that a model can be saved at ``out_path`` (creating missing folders); raise TrainError if not.

    Refused, each with one line: a suffix other than ``.keras``/``.h5``, an existing directory, a
    parent that is a file, a folder that cannot be created, and a folder that cannot be written (tried
    with a temporary file, which is removed).
    """
    p = Path(out_path)
    shown = str(out_path)
    if p.is_dir():
        raise TrainError(
            f"--out {shown!r} is a directory; give a file name such as {shown.rstrip('/')}/model.keras"
        )
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise TrainError(f"--out {shown!r} must end in .keras or .h5 (for example model.keras)")
    if model_meta_path(p).is_dir():
        raise TrainError(
            f"--out {shown!r}: its metadata file {str(model_meta_path(p))!r} is a directory; remove it"
        )
    parent = p.parent
    for anc in (parent, *parent.parents):
        if anc.exists():
            if not anc.is_dir():
                raise TrainError(
                    f"--out {shown!r}: {str(anc)!r} is a file, not a folder; choose another --out path"
                )
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(
            f"--out {shown!r}: cannot create folder {str(parent)!r} ({e.strerror or e}); choose a writable path"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgefleet-probe-", dir=parent)
    except OSError as e:
        raise TrainError(
            f"--out {shown!r}: cannot write in {str(parent)!r} ({e.strerror or e}); choose a writable path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return p


# --------------------------------------------------------------------------------------------------
# Determinism and class weights


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and TensorFlow and turn on TensorFlow's op determinism for the duration.

    With it, the same data and seed give bit-identical weights run after run (same machine and
    software: other CPUs or library versions may round differently). Op determinism is process-wide;
    it is switched back off afterwards when it was off before.
    """
    tf = import_tf()
    keras = import_keras()
    try:  # the only place with is_op_determinism_enabled/disable_op_determinism (TensorFlow 2.21 is pinned)
        from tensorflow.python.framework import config as tf_config
    except ImportError:  # pragma: no cover - a TensorFlow without it: determinism stays on afterwards
        tf_config = None

    was_on = bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on and tf_config is not None and hasattr(tf_config, "disable_op_determinism"):
            tf_config.disable_op_determinism()


def class_weights(y: np.ndarray, n_classes: int, mode: str = "auto") -> dict[int, float] | None:
    """Return Keras ``class_weight`` (``n / (K * count)`` per present class) for ``mode``, or None.

    ``auto`` weights only when the largest class has at least ``IMBALANCE_RATIO`` times the samples
    of the smallest present class; ``balanced`` always; ``none`` never.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise TrainError(f"class weight mode {mode!r} unknown. Known: {', '.join(CLASS_WEIGHT_MODES)}")
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes)
    present = counts[counts > 0]
    if mode == "auto" and present.max() < IMBALANCE_RATIO * present.min():
        return None
    k = present.size
    total = float(counts.sum())
    return {c: (total / (k * float(counts[c])) if counts[c] else 1.0) for c in range(n_classes)}


# --------------------------------------------------------------------------------------------------
# Fitting


def progress_enabled(progress: bool) -> bool:
    """Show progress bars only when asked and stderr is a terminal."""
    return bool(progress) and sys.stderr.isatty()


def epoch_bar_callback(keras: Any, total: int, desc: str, show: bool) -> Any:
    """Return a Keras callback that advances a tqdm bar per epoch on the terminal (hidden unless ``show``).

    The bar writes to ``terminal_stderr()``, so it stays visible while ``native_quiet()`` holds fd 2.
    """
    from tqdm import tqdm

    class _Bar(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="epoch", disable=not show, file=terminal_stderr())

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            shown = {
                k: f"{v:.3f}"
                for k, v in logs.items()
                if k in ("loss", "accuracy", "val_xent", "val_accuracy")
            }
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
    validation_fraction: float = FIT_VALIDATION_FRACTION,
    patience: int | None = PATIENCE_EPOCHS,
    min_epochs: int = 0,
    lr_patience: int | None = None,
    class_weight: dict[int, float] | None = None,
    monitor: str = XENT_MONITOR,
    extra_callbacks: list[Any] | None = None,
    desc: str = "train",
    progress: bool = True,
    seed: int = DEFAULT_SEED,
    validation: Dataset | None = None,
    strategy: Any = None,
) -> dict[str, list[float]]:
    """Compile and fit ``model`` on ``data`` deterministically; return the Keras history.

    The validation split is stratified and seeded (or ``validation`` when given, with ``data`` all
    training). ``patience`` enables early stopping on ``monitor`` (not before ``min_epochs``) with the
    best weights restored; ``lr_patience`` enables ReduceLROnPlateau on the validation loss.
    """
    keras = import_keras()
    if validation is not None:
        train, val = data, validation
    elif validation_fraction > 0:
        train, val = data.split(validation_fraction, seed=seed)
    else:
        train, val = data, None
    has_val = val is not None and val.n > 0
    show = progress_enabled(progress)  # decided before native_quiet() takes fd 2 away from the terminal
    # native_quiet: under op determinism TensorFlow's runtime logs a harmless native error line
    # ("NodeDef mentions attribute use_unbounded_threadpool ...") the first time it rewrites Keras's
    # input pipeline; it goes to NATIVE_LOG (or the terminal with --debug) instead of the user's screen.
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with deterministic(seed), native_quiet():
        with scope:  # a tf.distribute strategy makes the optimizer's variables (toolchain.steps.distributed)
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate),
                loss="sparse_categorical_crossentropy",
                # The data part of the loss alone: Keras's val_loss adds any regularisation penalty (L2),
                # which shrinks epoch after epoch whether or not the model gets better on unseen data.
                metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(name="xent")],
            )
        callbacks = [epoch_bar_callback(keras, epochs, desc, show), *(extra_callbacks or [])]
        if has_val and lr_patience:
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=XENT_MONITOR, factor=LR_FACTOR, patience=lr_patience, min_lr=MIN_LEARNING_RATE
                )
            )
        if has_val and patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=monitor,
                    min_delta=EARLY_STOP_MIN_DELTA,
                    patience=patience,
                    restore_best_weights=True,
                    start_from_epoch=max(0, min(min_epochs, epochs) - patience),
                )
            )
        # A seeded permutation first, so the batches do not follow the file's order even in epoch 1's
        # first shuffle buffer; Keras then reshuffles every epoch from the seeded global generator.
        order = np.random.default_rng(seed).permutation(train.n)
        hist = model.fit(
            train.x[order],
            train.y[order],
            validation_data=(val.x, val.y) if has_val and val is not None else None,
            epochs=epochs,
            batch_size=batch_size,
            class_weight=class_weight,
            shuffle=True,
            verbose=0,
            callbacks=callbacks,
        )
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def best_epoch(history: dict[str, list[float]], monitor: str, start_epoch: int = 0) -> int:
    """Return the 1-based epoch whose weights EarlyStopping restored (its improvement rule, min_delta)."""
    vals = history.get(monitor)
    if not vals:
        return len(history.get("loss", []))
    sign = -1.0 if "acc" in monitor else 1.0  # minimise loss, maximise accuracy
    best, best_i = float("inf"), start_epoch
    for i, v in enumerate(vals):
        if i < start_epoch or not np.isfinite(v):
            continue
        if sign * v + EARLY_STOP_MIN_DELTA < best:
            best, best_i = sign * v, i
    return best_i + 1


def measure(model: Any, data: Dataset, class_names: list[str]) -> tuple[float, float, dict[str, float]]:
    """Return ``(accuracy, cross-entropy, recall per class name)`` of ``model`` on ``data`` (NaN when empty)."""
    if not data.n:
        return float("nan"), float("nan"), {}
    scores = np.asarray(model.predict(data.x, verbose=0))
    pred = scores.argmax(1)
    accuracy = float(np.mean(pred == data.y))
    p_true = np.clip(scores[np.arange(data.n), data.y], 1e-7, 1.0)
    loss = float(-np.mean(np.log(p_true)))
    recall: dict[str, float] = {}
    for c, name in enumerate(class_names):
        sel = data.y == c
        if sel.any():
            recall[name] = float(np.mean(pred[sel] == c))
    return accuracy, loss, recall


def training_settings(
    *,
    epochs: int,
    epochs_run: int,
    best: int,
    batch_size: int,
    learning_rate: float,
    lr_patience: int,
    patience: int,
    min_epochs: int,
    monitor: str = XENT_MONITOR,
) -> dict[str, Any]:
    """Return the optimiser, schedule and early-stopping settings a model's metadata records."""
    return {
        "epochs_max": epochs,
        "epochs_run": epochs_run,
        "best_epoch": best,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "lr_schedule": {
            "type": "reduce_on_plateau",
            "monitor": XENT_MONITOR,
            "factor": LR_FACTOR,
            "patience": lr_patience,
            "min_lr": MIN_LEARNING_RATE,
        },
        "early_stopping": {
            "monitor": monitor,
            "patience": patience,
            "min_epochs": min_epochs,
            "min_delta": EARLY_STOP_MIN_DELTA,
            "restore_best_weights": True,
        },
        "optimizer": "adam",
        "loss": "sparse_categorical_crossentropy",
        "op_determinism": True,
    }


def data_sha256(data: Dataset) -> str:
    """Return a SHA-256 over the samples and labels (float32 x, int64 y), to recognise the data later."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.x, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(data.y, dtype=np.int64).tobytes())
    return h.hexdigest()


def train_model(
    data: Dataset,
    arch: str,
    epochs: int,
    out_path: str | Path,
    *,
    validation_fraction: float = VALIDATION_FRACTION,
    patience: int = PATIENCE_EPOCHS,
    min_epochs: int = MIN_EPOCHS,
    lr_patience: int = LR_PATIENCE_EPOCHS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    class_weight: str = "auto",
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    arch_options: dict[str, Any] | None = None,
    strategy: Any = None,
) -> TrainResult:
    """Train built-in ``arch`` on ``data``, save it (tf_keras .keras or .h5) and its metadata sidecar.

    ``arch_options`` are ``build_architecture``'s knobs (width, depth, resolution, alpha); none gives
    the fixed architecture. ``strategy`` (a ``tf.distribute`` strategy, see
    ``toolchain.steps.distributed``) holds the model's variables; ``batch_size`` is then the global batch.

    Same ``data`` and ``seed`` give bit-identical weights. Raises TrainError for a bad ``out_path``
    before any work, and for too little data.
    """
    out_path = check_out_path(out_path)
    if epochs < 1:
        raise TrainError(f"--epochs must be at least 1, got {epochs}")
    if data.n < MIN_TRAIN_SAMPLES:
        raise TrainError(
            f"training data {data.source!r} has {data.n} samples; need at least {MIN_TRAIN_SAMPLES}"
        )
    present = int(np.unique(data.y).size)
    if data.n_classes < 2 or present < 2:
        raise TrainError(
            f"training data {data.source!r} has {present} class with samples; classification needs at least 2"
        )
    if not 0 <= validation_fraction < 1:
        raise TrainError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction > 0:
        train, val = data.split(validation_fraction, seed=seed)
    else:
        train, val = data, data.subset(np.array([], dtype=np.int64))
    weights = class_weights(train.y, data.n_classes, class_weight)
    # Seeded initial weights. Not under op determinism: Normalization.adapt's tf.data pipeline then logs
    # a native "NodeDef mentions attribute use_unbounded_threadpool" error line (harmless, but printed),
    # and adapt's mean and variance do not depend on it. Statistics come from the training split only.
    import_keras().utils.set_random_seed(seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_architecture(arch, train.x, data.n_classes, seed=seed, **(arch_options or {}))
    monitor = XENT_MONITOR
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
        monitor=monitor,
        desc=f"train {arch}",
        progress=progress,
        seed=seed,
        strategy=strategy,
    )
    epochs_run = len(history.get("loss", []))
    start = max(0, min(min_epochs, epochs) - patience) if patience else 0
    best = best_epoch(history, monitor, start) if val.n and patience else epochs_run
    # The restored weights are those of the best epoch; measure them rather than trusting the log.
    val_accuracy, val_loss, val_recall = measure(model, val, data.class_names)
    train_acc = float(np.mean(np.argmax(model.predict(train.x, verbose=0), axis=1) == train.y))
    save_model(model, out_path)
    meta = {
        "class_names": list(data.class_names),
        "feature_names": list(data.feature_names) if data.feature_names else None,
        "input_shape": list(data.sample_shape),
        "arch": arch,
        "arch_options": dict(arch_options or {}),
        "seed": seed,
        "data": {
            "source": data.source,
            "kind": data.kind,
            "samples": data.n,
            "class_counts": [int(v) for v in np.bincount(data.y, minlength=data.n_classes)],
            "sha256": data_sha256(data),
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
                monitor=monitor,
            ),
            "validation_fraction": validation_fraction,
            "validation_split": "stratified",
            "class_weight_mode": class_weight,
            "class_weight": {data.class_names[k]: v for k, v in weights.items()} if weights else None,
            "distribution": (
                {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync)}
                if strategy is not None
                else None
            ),
        },
        "metrics": {
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "val_recall": val_recall,
            "train_accuracy": train_acc,
        },
        "versions": library_versions(),
    }
    meta_path = write_model_meta(out_path, json_safe(meta))
    return TrainResult(
        model,
        out_path,
        epochs_run,
        val_accuracy,
        train_acc,
        history,
        best_epoch=best,
        val_loss=val_loss,
        seed=seed,
        class_weight=weights,
        val_recall=val_recall,
        meta_path=meta_path,
    )


def library_versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for dist in ("edgefleet", "tensorflow", "tf-keras", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def json_safe(v: Any) -> Any:
    """Replace NaN/inf by None (strict JSON) throughout nested dicts and lists."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v
