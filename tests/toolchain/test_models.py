"""Model loading (tf_keras .keras/.h5/SavedModel, Keras 3 .keras), Keras 3 rebuild, built-in archs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.architectures import build_architecture
from toolchain.steps.models import ModelError, keras_file_version, load_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "calibration_data" / "digits.npz"
DIGITS_TEST = REPO / "calibration_data" / "digits_test.npz"


def _keras3() -> object:
    from toolchain.tfenv import import_tf

    import_tf()
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("Keras 3 is not installed")
    return keras


@pytest.fixture(scope="module")
def keras3_functional(tmp_path_factory: pytest.TempPathFactory, digits: dict) -> Path:
    """A Keras 3 (plain `import keras`) functional CNN trained briefly on the digits."""
    keras = _keras3()
    L = keras.layers  # type: ignore[attr-defined]
    keras.utils.set_random_seed(0)  # type: ignore[attr-defined]
    inp = keras.Input((8, 8, 1))  # type: ignore[attr-defined]
    h = L.Rescaling(1 / 16.0)(inp)
    h = L.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = L.MaxPooling2D(2)(h)
    h = L.Flatten()(h)
    out = L.Dense(10, activation="softmax")(h)
    model = keras.Model(inp, out)  # type: ignore[attr-defined]
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits["x"], digits["y"], epochs=6, verbose=0, batch_size=32)
    path = tmp_path_factory.mktemp("k3") / "k3_cnn.keras"
    model.save(path)
    return path


def test_tf_keras_formats_load_and_agree(digits_cnn_path: Path, tmp_path: Path, digits: dict) -> None:
    lm = load_model(digits_cnn_path)
    assert lm.kind == "tf_keras" and lm.input_shape == (8, 8, 1) and lm.n_outputs == 10
    ref = lm.predict(digits["x_test"][:20])
    lm.model.save(tmp_path / "m.h5")
    lm.model.save(tmp_path / "sm", save_format="tf")
    for p in (tmp_path / "m.h5", tmp_path / "sm"):
        other = load_model(p)
        assert other.kind == "tf_keras"
        np.testing.assert_allclose(other.predict(digits["x_test"][:20]), ref, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_model_files_give_one_line_errors(digits_cnn_path: Path, tmp_path: Path, damage: str) -> None:
    p = tmp_path / "bad.keras"
    raw = digits_cnn_path.read_bytes()
    p.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])
    with pytest.raises(ModelError, match=r"bad.keras.*(truncated or corrupt|corrupt)") as ei:
        load_model(p)
    assert "\n" not in str(ei.value)


def test_truncated_h5_and_bad_savedmodel(tmp_path: Path) -> None:
    (tmp_path / "m.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(ModelError, match="not a valid HDF5 file"):
        load_model(tmp_path / "m.h5")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ModelError, match="not a SavedModel"):
        load_model(tmp_path / "dir")


def test_keras3_file_is_detected_and_predicts(keras3_functional: Path, digits: dict) -> None:
    assert keras_file_version(keras3_functional).startswith("3")
    lm = load_model(keras3_functional)
    assert lm.kind == "keras3" and lm.input_shape == (8, 8, 1)
    acc = float(np.mean(lm.predict(digits["x_test"]).argmax(1) == digits["y_test"]))
    assert acc > 0.8


def test_keras3_rebuilds_as_tf_keras_with_the_same_outputs(keras3_functional: Path, digits: dict) -> None:
    import tf_keras

    lm = load_model(keras3_functional)
    m2 = lm.as_tf_keras("pruning")
    assert isinstance(m2, tf_keras.Model)
    np.testing.assert_allclose(
        np.asarray(m2(digits["x_test"][:32])), lm.predict(digits["x_test"][:32]), atol=1e-4
    )


def test_keras3_subclassed_model_names_the_workaround(tmp_path: Path) -> None:
    keras = _keras3()

    @keras.saving.register_keras_serializable(package="t")  # type: ignore[attr-defined]
    class Tiny(keras.Model):  # type: ignore[attr-defined,misc,name-defined]
        def __init__(self, **kw: object) -> None:
            super().__init__(**kw)
            self.d = keras.layers.Dense(3, activation="softmax")  # type: ignore[attr-defined]

        def call(self, x: object) -> object:
            return self.d(x)

    from toolchain.steps.models import rebuild_as_tf_keras

    m = Tiny()
    m(np.zeros((1, 4), np.float32))
    with pytest.raises(
        ModelError, match=r"subclassed model .*re-save it with tf_keras .*--quantize ptq and no --prune"
    ):
        rebuild_as_tf_keras(m, tmp_path / "tiny.keras", "pruning")


def test_keras3_ptq_builds_every_target(keras3_functional: Path, tmp_path: Path) -> None:
    from toolchain.build import build_bundles

    rep = build_bundles(
        keras3_functional,
        DIGITS,
        ["all"],
        tmp_path / "o",
        eval_data=DIGITS_TEST,
        progress=False,
        allow_accuracy_drop=True,  # a briefly trained model: assert the drop below instead of the budget
    )
    for t, e in rep["targets"].items():
        assert e["status"] == "ok", (t, e.get("error"))
        assert e["top1_agreement"] >= 0.9
        assert e["accuracy"] >= e["float_accuracy"] - 0.03
    assert rep["model"]["kind"] == "keras3"


def test_keras3_can_be_pruned_after_rebuild(keras3_functional: Path, tmp_path: Path) -> None:
    from toolchain.build import build_bundles

    rep = build_bundles(
        keras3_functional,
        DIGITS,
        ["mobile"],
        tmp_path / "o",
        eval_data=DIGITS_TEST,
        prune=0.5,
        progress=False,
        allow_accuracy_drop=True,
    )
    assert rep["targets"]["mobile"]["status"] == "ok"
    assert rep["targets"]["mobile"]["sparsity"] >= 0.4


def test_builtin_architectures_take_raw_values() -> None:
    rng = np.random.default_rng(0)
    tab = (rng.normal(size=(40, 5)) * 100 + 500).astype(np.float32)
    mlp = build_architecture("mlp", tab, 3)
    assert mlp.output_shape == (None, 3) and mlp.layers[1].name == "normalize"  # first after the input
    # The Normalization layer learned the data's mean, so raw values come out standardised.
    norm = mlp.get_layer("normalize")
    assert np.allclose(np.asarray(norm.mean).ravel(), tab.mean(axis=0), rtol=1e-3)
    imgs = rng.uniform(0, 255, size=(8, 8, 8, 1)).astype(np.float32)
    mnv2 = build_architecture("mobilenetv2", imgs, 10)
    assert mnv2.input_shape == (None, 8, 8, 1) and mnv2.output_shape == (None, 10)
    assert any(layer.name == "resize" for layer in mnv2.layers)
    assert not any(hasattr(layer, "layers") and layer.layers for layer in mnv2.layers)  # flat graph for tfmot
    with pytest.raises(ModelError, match="needs images"):
        build_architecture("cnn", tab, 3)
    with pytest.raises(ModelError, match="unknown architecture"):
        build_architecture("resnet", tab, 3)
