"""QAT on data in [0, 1] (issue 11, found 3): identity layers no longer leave float ops in int8 models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.data import Dataset, load_dataset
from toolchain.steps.verify import float_op_advice

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"


def test_float_op_advice_never_tells_a_qat_build_to_use_qat() -> None:
    for only_conversions in (True, False):
        assert "--quantize qat" not in float_op_advice(only_conversions, qat=True)
        assert "--quantize ptq" in float_op_advice(only_conversions, qat=True)
    assert "--quantize qat" in float_op_advice(True, qat=False)
    assert "int8 kernel" in float_op_advice(False, qat=False)


def _unit_range(path: Path) -> Dataset:
    ds = load_dataset(path)
    return Dataset(ds.x / 16.0, ds.y, ds.feature_names, ds.class_names, f"{ds.source} / 16", ds.kind)


@pytest.fixture(scope="module")
def unit_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in cnn trained on the digits scaled to [0, 1] (its first layer is Rescaling(1.0))."""
    from toolchain.steps.train import train_model

    path = tmp_path_factory.mktemp("unit-cnn") / "cnn.keras"
    train_model(_unit_range(DIGITS), "cnn", 4, path, progress=False)
    return path


@pytest.mark.slow
def test_identity_layers_are_found_and_dropped_without_changing_outputs() -> None:
    from toolchain.steps.simplify import drop_identity_layers, identity_layers
    from toolchain.tfenv import import_keras

    keras = import_keras()
    L = keras.layers
    inp = keras.Input((4, 4, 2))
    h = L.Rescaling(1.0, name="one")(inp)
    h = L.Rescaling(0.5, offset=0.1, name="half")(h)
    h = L.Conv2D(3, 2, name="conv")(h)
    h = L.Rescaling(1.0, offset=0.0, name="one_again")(h)
    h = L.Lambda(lambda t: keras.backend.clip(t, -10.0, 10.0), name="clip")(
        h
    )  # identity only on small values
    out = L.Dense(2, name="dense")(L.Flatten()(h))
    model = keras.Model(inp, out)
    assert identity_layers(model) == ["one", "one_again"]
    dropped = drop_identity_layers(model)
    assert [type(layer).__name__ for layer in dropped.layers if layer.name in ("one", "one_again")] == [
        "Activation",
        "Activation",
    ]
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(dropped(x)))
    plain = keras.Model(inp, L.Dense(2)(L.Flatten()(inp)))
    assert drop_identity_layers(plain) is plain  # nothing to drop: the same model


@pytest.mark.slow
@pytest.mark.parametrize("prune", [None, 0.5])
def test_qat_on_unit_range_images_builds_int8_for_every_target(
    unit_cnn: Path, tmp_path: Path, prune: float | None
) -> None:
    """The issue's reproduction: train --arch cnn on digits / 16, build --quantize qat [--prune 0.5]."""
    from toolchain.build import build_bundles
    from toolchain.targets import load_target

    report = build_bundles(
        unit_cnn,
        _unit_range(DIGITS),
        ["all"],
        tmp_path / "o",
        quantize="qat",
        prune=prune,
        eval_data=_unit_range(DIGITS_TEST),
        progress=False,
    )
    for name, entry in report["targets"].items():
        assert entry["status"] == "ok", entry["error"]
        assert entry["checks"]["float_ops"] == []
        if entry["format"] == "tflite":
            # no float tensor between a DEQUANTIZE and a QUANTIZE inside the model
            assert "DEQUANTIZE" not in entry["checks"]["ops"] or name == "mobile"
        assert entry["accuracy"] >= entry["float_accuracy"] - load_target(name).limits.max_accuracy_drop
