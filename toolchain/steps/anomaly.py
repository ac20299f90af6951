"""Anomaly detection (issue 15): the ``autoencoder`` architecture, its training, the score and its metrics.

The model is trained on normal data only. It reconstructs its (normalised) input and computes the
anomaly **score inside the graph**: the mean squared reconstruction error over the sample's values,
``mean((n - r)^2)`` where ``n`` is the normalised input (``Normalization`` for tabular data, folded
into the manifest's affine preprocessing at build time; ``Rescaling`` for images) and ``r`` the
reconstruction. The mean is a ``Dense(1)`` with constant weights ``1/D`` (an int8 kernel in every
runtime), so each runtime returns one scalar per sample and the agent only compares it with the
threshold the build picked (``toolchain.steps.anomaly_build``).

``autoencoder`` is dense for tabular samples (n, D) and convolutional for images (n, H, W, C).
Training minimises the score itself (mean absolute error of the score against 0, which is the
score: it is never negative), with the same seeded, deterministic fit, early stopping on a held-out
tenth and learning-rate schedule as the classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.data import Dataset

# The labels of every anomaly bundle: index 1 is "anomaly", as in the eval data's ``y`` (1 = anomaly).
LABELS = ("normal", "anomaly")
SCORE = "reconstruction_mse"
DEFAULT_THRESHOLD_PERCENTILE = 99.0
# Names a label may have to count as normal / anomalous in data given to an anomaly model.
NORMAL_NAMES = ("0", "normal")
ANOMALY_NAMES = ("1", "anomaly")
# The autoencoders' starting learning rate (3x the classifiers': the score's loss is smooth and small
# data sets converge within a few dozen epochs).
LEARNING_RATE = 3e-3
# Dense autoencoder: hidden units and the bottleneck (a third of the features, at least 2).
DENSE_UNITS = 32
MIN_BOTTLENECK = 2
# Convolutional autoencoder: filters of the two encoder blocks (each halves height and width).
CONV_FILTERS = (8, 4)
# Images smaller than this on a side skip the pooling (a 2x2 pool would leave nothing to decode).
MIN_POOL_SIDE = 8


class AnomalyError(ToolchainError):
    """Data or options that an anomaly model cannot use."""


# --------------------------------------------------------------------------------------------------
# Architecture


def build_autoencoder(x: np.ndarray, seed: int = 0) -> Any:
    """Return an uncompiled tf_keras autoencoder for raw inputs like ``x``: output (n, 1), the score.

    Tabular samples (D,) get a dense autoencoder behind a ``Normalization`` adapted to ``x``; images
    (H, W, C) a convolutional one behind ``Rescaling(1 / max |x|)``. The score is the mean squared
    difference between the normalised input and the reconstruction (see the module docstring).
    """
    from toolchain.steps.models import ModelError
    from toolchain.tfenv import import_keras, import_tf

    keras = import_keras()
    import_tf().random.set_seed(seed)
    L = keras.layers
    shape = tuple(int(d) for d in x.shape[1:])
    inp = keras.Input(shape=shape, name="input")
    if len(shape) == 1:
        d = shape[0]
        if d < 2:
            raise ModelError(
                "--arch autoencoder needs at least 2 features (a reconstruction of 1 is trivial)"
            )
        norm = L.Normalization(axis=-1, name="normalize")
        norm.adapt(x.astype(np.float32))
        n = norm(inp)
        h = L.Dense(DENSE_UNITS, activation="relu")(n)
        h = L.Dense(max(MIN_BOTTLENECK, d // 3), name="bottleneck")(h)  # linear: no dead code units
        h = L.Dense(DENSE_UNITS, activation="relu")(h)
        r = L.Dense(d, name="reconstruction")(h)
        name = "dense_autoencoder"
    elif len(shape) == 3:
        scale = float(np.max(np.abs(x))) or 1.0
        n = L.Rescaling(1.0 / scale, name="rescale")(inp)
        pool = min(shape[0], shape[1]) >= MIN_POOL_SIDE and shape[0] % 4 == 0 and shape[1] % 4 == 0
        h = n
        for f in CONV_FILTERS:
            h = L.Conv2D(f, 3, padding="same", activation="relu")(h)
            if pool:
                h = L.MaxPooling2D(2)(h)
        for f in reversed(CONV_FILTERS):
            # a strided transposed convolution, not UpSampling2D: its ONNX Resize defeats ONNX
            # Runtime's shape inference before quantization ("Incomplete symbolic shape inference")
            if pool:
                h = L.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu")(h)
            else:
                h = L.Conv2D(f, 3, padding="same", activation="relu")(h)
        r = L.Conv2D(shape[2], 3, padding="same", name="reconstruction")(h)
        name = "conv_autoencoder"
    else:
        raise ModelError(
            f"--arch autoencoder takes tabular samples (features,) or images (height, width, channels);"
            f" the data has samples of shape {shape}"
        )
    diff = L.Subtract(name="residual")([n, r])
    sq = L.Multiply(name="squared_residual")([diff, diff])
    flat = L.Flatten(name="flat_residual")(sq) if len(shape) > 1 else sq
    size = int(np.prod(shape))
    score = L.Dense(
        1,
        use_bias=False,
        trainable=False,
        kernel_initializer=keras.initializers.Constant(1.0 / size),
        name="score",
    )(flat)
    return keras.Model(inp, score, name=name)


# --------------------------------------------------------------------------------------------------
# Data: normal samples only


def normal_rows(ds: Dataset, what: str = "--data") -> Dataset:
    """Return ``ds`` for training or calibrating an anomaly model: its labels must all say normal.

    Labels are ignored when every one is ``0``/``normal``; any other label (an anomaly among the
    training samples, or class labels meant for a classifier) is refused in one line, because an
    autoencoder fitted to anomalies learns to reconstruct them and stops flagging them.
    """
    if not ds.labelled:
        return ds
    present = sorted({ds.class_names[int(i)] for i in np.unique(ds.y)})
    odd = [c for c in present if c not in NORMAL_NAMES]
    if odd:
        n_odd = int(sum(int((ds.y == ds.class_names.index(c)).sum()) for c in odd))
        kind = "anomalies" if all(c in ANOMALY_NAMES for c in odd) else f"labels {odd[:5]}"
        raise AnomalyError(
            f"{what} {ds.source!r} has {n_odd} samples labelled as {kind}; --task anomaly learns from"
            " normal samples only: drop those rows (or the 'y' array), or keep labels for --eval-data"
        )
    return Dataset(ds.x, np.full(ds.n, -1, dtype=np.int64), ds.feature_names, [], ds.source, ds.kind)


def anomaly_truth(ds: Dataset, what: str = "--eval-data") -> np.ndarray | None:
    """Return eval labels as 0 (normal) / 1 (anomaly), or None when ``ds`` has no labels.

    Accepted label names: ``0``/``normal`` and ``1``/``anomaly``; anything else is refused in one line.
    """
    if not ds.labelled:
        return None
    names = np.asarray(ds.class_names, dtype=object)[ds.y]
    ok = np.isin(names, NORMAL_NAMES + ANOMALY_NAMES)
    if not ok.all():
        bad = sorted({str(v) for v in names[~ok]})[:5]
        raise AnomalyError(
            f"{what} {ds.source!r} has labels {bad}; anomaly eval data labels each sample 0 (normal)"
            " or 1 (anomaly)"
        )
    return np.isin(names, ANOMALY_NAMES).astype(np.int64)


def check_percentile(p: float) -> float:
    """Return ``p`` as a float when it is a percentile in (0, 100); raise AnomalyError (one line) otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < float(p) < 100:
        raise AnomalyError(
            f"--threshold-percentile {p!r} must be between 0 and 100 (exclusive), e.g. 99: the share of"
            " normal samples scored below the threshold"
        )
    return float(p)


# --------------------------------------------------------------------------------------------------
# Metrics


def pick_threshold(normal_scores: np.ndarray, percentile: float) -> float:
    """Return the ``percentile``-th percentile of scores of normal samples (linear interpolation).

    A sample is an anomaly when its score is strictly above it, so about ``100 - percentile`` % of
    normal samples like these are flagged.
    """
    s = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    if s.size == 0 or not np.isfinite(s).all():
        raise AnomalyError("cannot pick a threshold: no finite scores of normal samples")
    return float(np.percentile(s, check_percentile(percentile)))


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Return the area under the ROC curve of ``scores`` for ``truth`` (1 = anomaly); None without both.

    The Mann-Whitney form with average ranks, so tied scores count one half (quantized scores tie).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(truth).reshape(-1).astype(bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # average rank per run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # 1-based ranks averaged over the run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class Detection:
    """How a threshold separates labelled samples: flagged is ``score > threshold``."""

    precision: float | None  # flagged that are anomalies (None when nothing is flagged)
    recall: float | None  # anomalies flagged (None without anomalies)
    false_positive_rate: float | None  # normal samples flagged (None without normal samples)
    flagged: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
            "flagged": self.flagged,
        }


def detection(scores: np.ndarray, truth: np.ndarray, threshold: float) -> Detection:
    """Return precision, recall and false-positive rate of ``score > threshold`` against ``truth``."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(truth).reshape(-1).astype(bool)
    flagged = s > threshold
    tp = int((flagged & t).sum())
    n_flag, n_pos, n_neg = int(flagged.sum()), int(t.sum()), int((~t).sum())
    return Detection(
        precision=tp / n_flag if n_flag else None,
        recall=tp / n_pos if n_pos else None,
        false_positive_rate=int((flagged & ~t).sum()) / n_neg if n_neg else None,
        flagged=n_flag,
    )


def decision_probs(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Return (n, 2) one-hot rows [normal, anomaly] for ``score > threshold``, as the agent records them."""
    flag = (np.asarray(scores, dtype=np.float64).reshape(-1) > threshold).astype(np.float64)
    return np.stack([1.0 - flag, flag], axis=1)


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class AutoencoderResult:
    """The trained autoencoder, where it was saved, and its scores on the validation split."""

    path: Path
    meta_path: Path
    epochs_run: int
    best_epoch: int
    val_score_mean: float
    val_score_p99: float
    train_score_mean: float


def train_autoencoder(
    data: Dataset,
    epochs: int,
    out_path: str | Path,
    *,
    seed: int = 0,
    learning_rate: float | None = None,
    progress: bool = True,
) -> AutoencoderResult:
    """Train ``autoencoder`` on the normal samples ``data``, save it and its metadata sidecar.

    Labels must all be normal (``normal_rows``); they are not used. Same data and seed give the same
    weights (the classifiers' deterministic fit). Raises AnomalyError / TrainError in one line.
    """
    from toolchain.steps import train as tr
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.models import save_model, write_model_meta
    from toolchain.tfenv import import_keras, native_quiet

    out_path = tr.check_out_path(out_path)
    if epochs < 1:
        raise tr.TrainError(f"--epochs must be at least 1, got {epochs}")
    data = normal_rows(data)
    if data.n < tr.MIN_TRAIN_SAMPLES:
        raise tr.TrainError(
            f"training data {data.source!r} has {data.n} samples; need at least {tr.MIN_TRAIN_SAMPLES}"
        )
    keras = import_keras()
    rng = np.random.default_rng(seed)
    order = rng.permutation(data.n)
    n_val = max(1, int(round(data.n * tr.VALIDATION_FRACTION)))
    val_x, train_x = data.x[order[:n_val]], data.x[order[n_val:]]
    keras.utils.set_random_seed(seed)
    model = build_architecture("autoencoder", train_x, 0, seed=seed)
    lr = learning_rate if learning_rate is not None else LEARNING_RATE
    show = tr.progress_enabled(progress)
    zeros = np.zeros((len(train_x), 1), np.float32)
    with tr.deterministic(seed), native_quiet():
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="mae")
        start = max(0, min(tr.MIN_EPOCHS, epochs) - tr.PATIENCE_EPOCHS)
        callbacks = [
            tr.epoch_bar_callback(keras, epochs, "train autoencoder", show),
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=tr.LR_FACTOR,
                patience=tr.LR_PATIENCE_EPOCHS,
                min_lr=tr.MIN_LEARNING_RATE,
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=tr.PATIENCE_EPOCHS,
                restore_best_weights=True,
                start_from_epoch=start,
            ),
        ]
        hist = model.fit(
            train_x,
            zeros,
            validation_data=(val_x, np.zeros((len(val_x), 1), np.float32)),
            epochs=epochs,
            batch_size=tr.BATCH_SIZE,
            shuffle=True,
            verbose=0,
            callbacks=callbacks,
        )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    epochs_run = len(history.get("loss", []))
    val_losses = history.get("val_loss") or [float("nan")]
    best = int(np.nanargmin(val_losses[start:])) + start + 1 if len(val_losses) > start else epochs_run
    val_scores = np.asarray(model.predict(val_x, verbose=0)).reshape(-1)
    train_scores = np.asarray(model.predict(train_x, verbose=0)).reshape(-1)
    save_model(model, out_path)
    meta = {
        "task": {"type": "anomaly", "score": SCORE},
        "class_names": list(LABELS),
        "feature_names": list(data.feature_names) if data.feature_names else None,
        "input_shape": list(data.sample_shape),
        "arch": "autoencoder",
        "arch_options": {},
        "seed": seed,
        "data": {
            "source": data.source,
            "kind": data.kind,
            "samples": data.n,
            "sha256": tr.data_sha256(data),
        },
        "training": {
            "epochs_max": epochs,
            "epochs_run": epochs_run,
            "best_epoch": best,
            "batch_size": tr.BATCH_SIZE,
            "learning_rate": lr,
            "loss": "mean reconstruction_mse (mae of the score against 0)",
            "validation_fraction": tr.VALIDATION_FRACTION,
            "op_determinism": True,
        },
        "metrics": {
            "val_score_mean": float(val_scores.mean()),
            "val_score_p99": float(np.percentile(val_scores, 99)),
            "train_score_mean": float(train_scores.mean()),
        },
        "versions": tr.library_versions(),
    }
    meta_path = write_model_meta(out_path, tr.json_safe(meta))
    return AutoencoderResult(
        path=out_path,
        meta_path=meta_path,
        epochs_run=epochs_run,
        best_epoch=best,
        val_score_mean=float(val_scores.mean()),
        val_score_p99=float(np.percentile(val_scores, 99)),
        train_score_mean=float(train_scores.mean()),
    )


def load_normal(paths: Sequence[str | Path], label: str | None = None) -> Dataset:
    """Load and join the normal samples of every ``--data`` (labels, when present, must say normal)."""
    from toolchain.steps.data import load_dataset

    parts = [normal_rows(load_dataset(p, label, require_labels=False)) for p in paths]
    first = parts[0]
    for p in parts[1:]:
        if p.sample_shape != first.sample_shape:
            raise AnomalyError(
                f"--data {p.source!r} has samples of shape {p.sample_shape}, {first.source!r} {first.sample_shape}"
            )
    if len(parts) == 1:
        return first
    x = np.concatenate([p.x for p in parts])
    src = " + ".join(p.source for p in parts)
    return Dataset(x, np.full(len(x), -1, dtype=np.int64), first.feature_names, [], src, first.kind)


def model_task(meta: dict[str, Any] | None) -> str:
    """Return the task a model's sidecar records (``classification`` when it names none)."""
    task = (meta or {}).get("task")
    return str(task.get("type")) if isinstance(task, dict) and task.get("type") else "classification"
