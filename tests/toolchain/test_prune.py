"""Pruning reaches the requested sparsity in a short fine-tune; prune-preserving QAT keeps it (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.data import load_dataset
from toolchain.steps.models import load_model
from toolchain.steps.prune import PruneError, kernel_sparsity, prune_model
from toolchain.steps.qat import qat_finetune

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pruned(digits_cnn_path: Path):  # type: ignore[no-untyped-def]
    lm = load_model(digits_cnn_path)
    ds = load_dataset(REPO / "calibration_data" / "digits.npz")
    return lm, ds, prune_model(lm.model, ds, 0.5, epochs=2, progress=False)


def test_prune_reaches_the_sparsity_and_leaves_the_original_alone(pruned) -> None:  # type: ignore[no-untyped-def]
    lm, ds, res = pruned
    assert res.reached == pytest.approx(0.5, abs=0.03)
    assert kernel_sparsity(lm.model) < 0.01  # the caller's model is untouched
    assert res.frequency_steps < 100  # tfmot's default would not prune at all in 2 short epochs
    acc = float(np.mean(np.asarray(res.model(ds.x)).argmax(1) == ds.y))
    assert acc > 0.85
    assert not any("prune_low_magnitude" in layer.name for layer in res.model.layers)  # stripped


def test_prune_preserving_qat_keeps_the_zeros(pruned) -> None:  # type: ignore[no-untyped-def]
    _, ds, res = pruned
    qat = qat_finetune(res.model, ds, pruned=True, epochs=1, progress=False)
    zeros = total = 0
    for w in qat.weights:
        if "kernel" in w.name and len(w.shape) >= 2:
            arr = np.asarray(w.numpy())
            zeros += int((arr == 0).sum())
            total += arr.size
    assert zeros / total >= 0.45


def test_bad_sparsity(pruned) -> None:  # type: ignore[no-untyped-def]
    lm, ds, _ = pruned
    with pytest.raises(PruneError, match="between 0 and 1"):
        prune_model(lm.model, ds, 1.2, progress=False)
