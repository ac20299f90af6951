"""QAT keeps a model's input normalisation (found by the conversion matrix, cell u01-c3-k20-mlp-qat).

tfmot's ``quantize_apply`` built its copy of a tf_keras ``Normalization`` before setting the
adapted mean and variance, so the QAT model, and the int8 model converted from it, normalised with
mean 0 and variance 1: the built-in mlp on images (Flatten, then Normalization, which the build
cannot fold into the manifest) lost up to 4.5 points to QAT, depending on the training seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from toolchain.steps.data import Dataset


def _images(n: int, seed: int) -> Dataset:
    """3-channel 6x6 images in [0, 255] (far from mean 0, variance 1), 3 unbalanced classes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    protos = np.random.default_rng(7).uniform(60.0, 200.0, size=(3, 6, 6, 3))
    x = np.clip(protos[y] + rng.normal(0.0, 20.0, size=(n, 6, 6, 3)), 0.0, 255.0)
    return Dataset(x.astype(np.float32), y.astype(np.int64), None, ["a", "b", "c"])


@pytest.mark.slow
def test_qat_model_normalises_its_input_as_the_float_model_does() -> None:
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.qat import qat_finetune, quantize_aware_model
    from toolchain.tfenv import import_keras

    keras = import_keras()
    data = _images(120, seed=1)
    model = build_architecture("mlp", data.x, 3, seed=0)
    norm = model.get_layer("normalize")
    want = keras.Model(model.input, norm.output).predict(data.x, verbose=0)
    assert float(np.abs(want).max()) < 10.0  # standardised (the raw values reach 255)

    qat = quantize_aware_model(model)
    wrapped = next(layer for layer in qat.layers if layer.name.endswith("normalize"))
    # The wrapped layer itself on the flattened raw input (the wrapper's own input quantizer starts
    # at tfmot's [-6, 6] and only training widens it). Without the fix it returned the raw input.
    got = wrapped.layer(data.x.reshape(len(data.x), -1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # What a user notices: the fine-tuned QAT model classifies like the float model it came from.
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(data.x, data.y, epochs=5, batch_size=16, verbose=0, shuffle=False)
    test = _images(200, seed=2)
    float_acc = float(np.mean(np.argmax(model.predict(test.x, verbose=0), axis=1) == test.y))
    tuned = qat_finetune(model, data, epochs=1, progress=False)
    qat_acc = float(np.mean(np.argmax(tuned.predict(test.x, verbose=0), axis=1) == test.y))
    assert float_acc >= 0.9, float_acc
    assert qat_acc >= float_acc - 0.02, (qat_acc, float_acc)
