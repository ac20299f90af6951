"""`train_model`: built-in architectures on the user's data, validation split, early stopping (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.data import load_dataset
from toolchain.steps.models import load_model
from toolchain.steps.train import TrainError, train_model

pytestmark = pytest.mark.slow


def _csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 300
    temp = rng.normal(60, 15, n)
    vib = rng.normal(0.5, 0.2, n)
    label = np.where(temp + 40 * vib > 80, "hot", "ok")
    p = tmp_path / "machines.csv"
    p.write_text(
        "temp_c,vibration,state\n"
        + "".join(f"{a:.3f},{b:.4f},{c}\n" for a, b, c in zip(temp, vib, label, strict=True))
    )
    return p


def test_mlp_on_csv_learns_from_raw_values(tmp_path: Path) -> None:
    ds = load_dataset(_csv(tmp_path), label="state")
    res = train_model(ds, "mlp", 30, tmp_path / "m.keras", progress=False)
    assert res.path.is_file() and res.epochs_run >= 1
    assert res.val_accuracy > 0.85 and res.train_accuracy > 0.85  # chance is ~0.5
    lm = load_model(res.path)
    assert lm.kind == "tf_keras" and lm.input_shape == (2,) and lm.n_outputs == 2
    acc = float(np.mean(lm.predict(ds.x).argmax(1) == ds.y))
    assert acc == pytest.approx(res.train_accuracy, abs=1e-6)


def test_early_stopping_stops_before_the_epoch_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = rng.integers(0, 2, 120)  # pure noise: validation accuracy stops improving
    from toolchain.steps.data import Dataset

    res = train_model(
        Dataset(x, y, None, ["a", "b"], "noise"), "mlp", 60, tmp_path / "n.h5", patience=2, progress=False
    )
    assert res.epochs_run < 60


def test_bad_training_requests(tmp_path: Path, digits: dict) -> None:
    from toolchain.steps.data import Dataset

    ds = Dataset(digits["x"][:5], digits["y"][:5], None, [str(i) for i in range(10)], "tiny")
    with pytest.raises(TrainError, match="5 samples; need at least 10"):
        train_model(ds, "cnn", 1, tmp_path / "m.keras", progress=False)
    big = Dataset(digits["x"], digits["y"], None, [str(i) for i in range(10)], "d")
    with pytest.raises(TrainError, match=r"must end in .keras or .h5"):
        train_model(big, "cnn", 1, tmp_path / "m.onnx", progress=False)
