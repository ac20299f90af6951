"""Regression (``--task regression``): numeric targets, their data, training and error metrics.

The model learns standardised targets ``z = (y - mean) / std`` (one linear output per target, MSE
loss), so targets in units from 0.001 to 4000 train alike. The mean and std travel in the model's
sidecar (``regression``) and in the bundle's manifest (``task.scale``/``task.offset``): the agent
returns ``z * scale + offset``, the values in the user's units. The int8 output then quantizes the
standardised value, whose range (a few standard deviations) sets the output step per target
(``output_scale * std``), instead of one scale shared by targets of very different units.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.steps.data import CSV_MAX_ROWS, DataError, check_finite
from toolchain.steps.models import read_model_meta, save_model, write_model_meta
from toolchain.steps.train import (
    BATCH_SIZE,
    EARLY_STOP_MIN_DELTA,
    LEARNING_RATE,
    LR_FACTOR,
    LR_PATIENCE_EPOCHS,
    MIN_EPOCHS,
    MIN_LEARNING_RATE,
    MIN_TRAIN_SAMPLES,
    PATIENCE_EPOCHS,
    VALIDATION_FRACTION,
    TrainError,
    check_out_path,
    deterministic,
    json_safe,
    library_versions,
)
from toolchain.tfenv import import_keras, native_quiet

REGRESSION_ARCHS = ("mlp", "cnn")
METRICS = ("mae", "rmse", "r2")


@dataclass
class RegressionData:
    """Samples ``x`` (n, *shape) float32 and numeric targets ``y`` (n, T) float64 with their names."""

    x: np.ndarray
    y: np.ndarray
    target_names: list[str]
    feature_names: list[str] | None
    source: str

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: np.ndarray) -> RegressionData:
        return RegressionData(self.x[idx], self.y[idx], self.target_names, self.feature_names, self.source)

    def split(self, fraction: float, seed: int = 0) -> tuple[RegressionData, RegressionData]:
        """A seeded random split: (the rest, ``fraction`` held out)."""
        order = np.random.default_rng(seed).permutation(self.n)
        k = int(round(self.n * fraction))
        return self.subset(np.sort(order[k:])), self.subset(np.sort(order[:k]))


def load_regression_data(path: str | Path, label: str | None = None) -> RegressionData:
    """Load numeric targets: ``.npz`` (``x`` and ``y`` (n,) or (n, T), optional ``target_names``) or a
    CSV whose ``--label`` names the target column(s), comma-separated for several.

    Raises DataError (one line) for anything else: an image folder, text targets, NaN.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data {str(p)!r} does not exist; pass an .npz (x, y) or a .csv with --label COLUMN")
    if p.is_dir():
        raise DataError(
            f"{str(p)!r} is a folder; --task regression reads numeric targets from .npz (x, y) or .csv"
            " (--label COLUMN), not from image folder names"
        )
    if p.suffix.lower() == ".npz":
        ds = _load_npz(p, label)
    elif p.suffix.lower() in (".csv", ".tsv", ".txt"):
        ds = _load_csv(p, label)
    else:
        raise DataError(f"data {str(p)!r} has an unknown format; use .npz (x, y) or .csv with --label COLUMN")
    if ds.n == 0:
        raise DataError(f"data {str(p)!r} holds no samples")
    check_finite(ds.x, str(p))
    bad = ~np.isfinite(ds.y)
    if bad.any():
        first = int(np.argwhere(bad.any(axis=1))[0][0])
        raise DataError(
            f"{str(p)!r}: the targets hold {int(bad.sum())} NaN or infinite value(s) (first in sample {first});"
            " drop those rows"
        )
    return ds


def _load_npz(p: Path, label: str | None) -> RegressionData:
    ykey = label or "y"
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"cannot read {str(p)!r} as .npz ({str(e)[:80]}); save it with numpy.savez(x=..., y=...)"
        ) from None
    if "x" not in arrays or ykey not in arrays:
        raise DataError(f"{str(p)!r} must hold arrays 'x' and {ykey!r}; it holds {sorted(arrays)}")
    x, y = arrays["x"], arrays[ykey]
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise DataError(f"{str(p)!r}: x has dtype {x.dtype} and shape {x.shape}; want numbers (n, ...)")
    if y.dtype.kind not in "fiub":
        raise DataError(
            f"{str(p)!r}: {ykey!r} holds {y.dtype} values; --task regression needs numbers (class names"
            " train without --task regression)"
        )
    y = y.reshape(y.shape[0], -1) if y.ndim else y.reshape(1, 1)
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{str(p)!r}: x has {x.shape[0]} samples but {ykey!r} has {y.shape[0]} targets")
    names = [str(v) for v in arrays["target_names"].tolist()] if "target_names" in arrays else None
    if names is None:
        names = [ykey] if y.shape[1] == 1 else [f"{ykey}{i}" for i in range(y.shape[1])]
    if len(names) != y.shape[1] or len(set(names)) != len(names):
        raise DataError(f"{str(p)!r}: target_names must be {y.shape[1]} distinct names, got {names}")
    feats = [str(v) for v in arrays["feature_names"].tolist()] if "feature_names" in arrays else None
    return RegressionData(x.astype(np.float32), y.astype(np.float64), names, feats, str(p))


def _load_csv(p: Path, label: str | None) -> RegressionData:
    if not label:
        raise DataError(f"CSV data {str(p)!r} needs --label COLUMN (the target; COL1,COL2 for several)")
    targets = [t.strip() for t in label.split(",") if t.strip()]
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        fh = open(p, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read {str(p)!r} ({e.strerror})") from None
    with fh:
        reader = csv.reader(fh, delimiter=delim)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{str(p)!r} is empty; a CSV needs a header row and one row per sample") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{str(p)!r} is not a readable CSV file ({str(e)[:60]})") from None
        missing = [t for t in targets if t not in header]
        if missing:
            raise DataError(
                f"target column {missing[0]!r} is not in {str(p)!r}; columns: {', '.join(header)[:200]}"
            )
        ti = [header.index(t) for t in targets]
        fi = [i for i in range(len(header)) if i not in ti]
        if not fi:
            raise DataError(f"{str(p)!r} has no feature columns besides the target(s)")
        rows: list[list[float]] = []
        try:
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{str(p)!r} line {lineno} has {len(row)} fields, the header has {len(header)}"
                    )
                try:
                    rows.append([float(c) for c in row])
                except ValueError:
                    bad = next(i for i, c in enumerate(row) if not _is_number(c))
                    what = "target" if bad in ti else "feature"
                    raise DataError(
                        f"{str(p)!r} line {lineno}, {what} column {header[bad]!r}: {row[bad][:30]!r} is not a number"
                    ) from None
                if len(rows) > CSV_MAX_ROWS:
                    raise DataError(f"{str(p)!r} has more than {CSV_MAX_ROWS} rows; convert it to .npz")
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{str(p)!r} is not a readable CSV file ({str(e)[:60]})") from None
    if not rows:
        raise DataError(f"{str(p)!r} has a header but no rows")
    a = np.array(rows, dtype=np.float64)
    return RegressionData(a[:, fi].astype(np.float32), a[:, ti], targets, [header[i] for i in fi], str(p))


def _is_number(c: str) -> bool:
    try:
        float(c)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Metrics


def error_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Return ``{target: {"mae", "rmse", "r2"}}`` in the targets' units (r2: 1 - SSE / SST)."""
    t = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if t.shape != p.shape:
        raise DataError(f"predictions of shape {p.shape} do not match targets of shape {t.shape}")
    out = {}
    for j, name in enumerate(names):
        err = p[:, j] - t[:, j]
        sst = float(((t[:, j] - t[:, j].mean()) ** 2).sum())
        out[name] = {
            "mae": float(np.abs(err).mean()),
            "rmse": float(np.sqrt((err**2).mean())),
            "r2": 1.0 - float((err**2).sum()) / sst if sst > 0 else float("nan"),
        }
    return out


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class RegressionTrainResult:
    """The trained model's path, sidecar, epochs and validation errors in the targets' units."""

    path: Path
    meta_path: Path
    epochs_run: int
    val_metrics: dict[str, dict[str, float]]
    target_names: list[str]


def target_scaling(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-target (mean, std) of ``y`` (n, T); a constant target gets std 1."""
    mean = y.mean(axis=0)
    std = y.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def train_regression(
    data: RegressionData,
    arch: str,
    epochs: int,
    out_path: str | Path,
    *,
    seed: int = 0,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    validation_fraction: float = VALIDATION_FRACTION,
    patience: int = PATIENCE_EPOCHS,
    min_epochs: int = MIN_EPOCHS,
    progress: bool = True,
) -> RegressionTrainResult:
    """Train built-in ``arch`` with linear outputs on standardised targets; save it and its sidecar.

    Early stopping and the learning-rate schedule watch the validation MSE; the best epoch's weights
    are kept. Same data and seed, same weights (``toolchain.steps.train.deterministic``).
    """
    out = check_out_path(out_path)
    if arch not in REGRESSION_ARCHS:
        raise TrainError(f"--task regression trains --arch {' or '.join(REGRESSION_ARCHS)}, not {arch!r}")
    if data.n < MIN_TRAIN_SAMPLES:
        raise TrainError(
            f"training data {data.source!r} has {data.n} samples; need at least {MIN_TRAIN_SAMPLES}"
        )
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.train import epoch_bar_callback, progress_enabled

    keras = import_keras()
    train, val = data.split(validation_fraction, seed=seed)
    mean, std = target_scaling(train.y)
    z_train = ((train.y - mean) / std).astype(np.float32)
    z_val = ((val.y - mean) / std).astype(np.float32)
    keras.utils.set_random_seed(seed)
    model = build_architecture(arch, train.x, len(data.target_names), seed=seed, linear=True)
    start_at_least_squares(model, train.x, z_train)
    show = progress_enabled(progress)
    has_val = val.n > 0
    with deterministic(seed), native_quiet():
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
        callbacks = [epoch_bar_callback(keras, epochs, f"train {arch} (regression)", show)]
        if has_val:
            callbacks += [
                keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss",
                    factor=LR_FACTOR,
                    patience=LR_PATIENCE_EPOCHS,
                    min_lr=MIN_LEARNING_RATE,
                ),
                keras.callbacks.EarlyStopping(
                    monitor="val_loss",
                    min_delta=EARLY_STOP_MIN_DELTA,
                    patience=patience,
                    restore_best_weights=True,
                    start_from_epoch=max(0, min(min_epochs, epochs) - patience),
                ),
            ]
        order = np.random.default_rng(seed).permutation(train.n)
        hist = model.fit(
            train.x[order],
            z_train[order],
            validation_data=(val.x, z_val) if has_val else None,
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            verbose=0,
            callbacks=callbacks,
        )
    epochs_run = len(hist.history.get("loss", []))
    check = val if has_val else train
    pred = np.asarray(model.predict(check.x, verbose=0), dtype=np.float64) * std + mean
    val_metrics = error_metrics(check.y, pred, data.target_names)
    save_model(model, out)
    meta = {
        "task": "regression",
        "class_names": None,
        "regression": {
            "targets": list(data.target_names),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        },
        "feature_names": list(data.feature_names) if data.feature_names else None,
        "input_shape": list(data.x.shape[1:]),
        "arch": arch,
        "seed": seed,
        "data": {"source": data.source, "samples": data.n},
        "training": {
            "epochs_max": epochs,
            "epochs_run": epochs_run,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "loss": "mse on standardised targets",
            "validation_fraction": validation_fraction,
            "early_stopping": {"monitor": "val_loss", "patience": patience, "min_epochs": min_epochs},
        },
        "metrics": {"validation": val_metrics},
        "versions": library_versions(),
    }
    meta_path = write_model_meta(out, json_safe(meta))
    return RegressionTrainResult(out, meta_path, epochs_run, val_metrics, list(data.target_names))


def start_at_least_squares(model: Any, x: np.ndarray, z: np.ndarray) -> None:
    """Set the ``mlp``'s linear path to the least-squares fit of the standardised targets on the
    normalised inputs (its ``scores`` bias takes the intercept), so training starts where a linear
    regression ends and the hidden layers learn only what is not linear. No-op for other models."""
    names = {layer.name for layer in model.layers}
    if not {"linear", "normalize", "scores"} <= names:
        return
    xn = np.asarray(model.get_layer("normalize")(x.reshape(x.shape[0], -1)), dtype=np.float64)
    a = np.c_[xn, np.ones(len(xn))]
    coef, *_ = np.linalg.lstsq(a, z.astype(np.float64), rcond=None)
    model.get_layer("linear").set_weights([coef[:-1].astype(np.float32)])
    kernel, _ = model.get_layer("scores").get_weights()
    model.get_layer("scores").set_weights([kernel, coef[-1].astype(np.float32)])


def regression_meta(model_path: Path, n_outputs: int) -> dict[str, Any]:
    """Return the sidecar's ``regression`` part (targets, mean, std), or an identity scaling named
    ``y``/``y0..`` for a model without one (it then predicts in the user's units already)."""
    meta = read_model_meta(model_path) or {}
    reg = meta.get("regression")
    if reg is None:
        names = ["y"] if n_outputs == 1 else [f"y{i}" for i in range(n_outputs)]
        return {"targets": names, "mean": [0.0] * n_outputs, "std": [1.0] * n_outputs}
    if not (len(reg.get("targets", [])) == len(reg.get("mean", [])) == len(reg.get("std", [])) == n_outputs):
        raise DataError(
            f"the model has {n_outputs} outputs but its sidecar names {len(reg.get('targets', []))} targets;"
            " re-run 'edgefleet train --task regression'"
        )
    return dict(reg)
