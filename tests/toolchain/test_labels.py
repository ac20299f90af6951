"""Class names travel with the model; calibration data needs only x (issue 11, found 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.formats.manifest import load_manifest
from toolchain.steps.data import DataError, load_dataset

pytestmark = pytest.mark.slow

NAMES = ["bearing", "healthy", "misaligned"]


def _tabular(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three separable classes in 6 columns of very different scales (0.001 .. 4000)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    means = np.random.default_rng(7).normal(0.0, 2.0, size=(3, 6))
    x = (means[y] + rng.normal(0.0, 0.3, size=(n, 6)) + 5.0) * np.logspace(-3, np.log10(4000), 6)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def named_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlp trained on data whose classes have names, with the sidecar ``train`` writes."""
    from toolchain.steps.data import Dataset
    from toolchain.steps.models import write_model_meta
    from toolchain.steps.train import train_model

    x, y = _tabular(240, 1)
    path = tmp_path_factory.mktemp("named") / "named.keras"
    train_model(Dataset(x, y, None, list(NAMES), "train"), "mlp", 20, path, progress=False)
    write_model_meta(path, {"class_names": NAMES})
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_unlabelled_calibration_data_loads_only_for_calibration(tmp_path: Path) -> None:
    x, _ = _tabular(30, 2)
    only_x = _npz(tmp_path / "x.npz", x=x)
    ds = load_dataset(only_x, require_labels=False)
    assert not ds.labelled and ds.n == 30 and (ds.y == -1).all()
    with pytest.raises(DataError, match="must hold arrays 'x' and 'y'"):
        load_dataset(only_x)


def test_names_come_from_the_model_with_x_only_calibration_and_index_labelled_eval(
    named_model: Path, tmp_path: Path
) -> None:
    from toolchain.build import build_bundles

    x, _ = _tabular(120, 2)
    xt, yt = _tabular(90, 3)
    report = build_bundles(
        named_model,
        _npz(tmp_path / "calib.npz", x=x),
        ["raspberry-pi"],
        tmp_path / "o",
        eval_data=_npz(tmp_path / "test.npz", x=xt, y=yt),  # bare indices 0..2, no names
        progress=False,
    )
    assert report["labels"] == NAMES and report["labels_source"] == "model"
    entry = report["targets"]["raspberry-pi"]
    assert entry["status"] == "ok", entry["error"]
    assert entry["accuracy"] > 0.9  # the indices were read as the model's classes, not shuffled
    assert load_manifest(tmp_path / "o" / "raspberry-pi").labels == NAMES


def test_x_only_data_without_eval_data_is_one_clear_error(named_model: Path, tmp_path: Path) -> None:
    from toolchain.build import build_bundles

    x, _ = _tabular(120, 2)
    with pytest.raises(DataError, match="has no labels.*--eval-data") as e:
        build_bundles(named_model, _npz(tmp_path / "c.npz", x=x), ["mobile"], tmp_path / "o", progress=False)
    assert "\n" not in str(e.value)


def test_eval_data_with_unknown_names_is_a_clear_error(named_model: Path, tmp_path: Path) -> None:
    from toolchain.build import build_bundles

    x, _ = _tabular(120, 2)
    xt, yt = _tabular(60, 3)
    other = np.array(["cat", "dog", "bird"])
    with pytest.raises(DataError, match="do not know"):
        build_bundles(
            named_model,
            _npz(tmp_path / "c.npz", x=x),
            ["mobile"],
            tmp_path / "o",
            eval_data=_npz(tmp_path / "t.npz", x=xt, y=other[yt]),
            progress=False,
        )
