"""Pruning and QAT fine-tune with the class weights ``train`` used (issue 11, found in its audit).

On unbalanced labels an unweighted fine-tune pulls the model back towards the majority class: on the
90/10 data below the float ``mlp`` (auto class weights) recognises about 3 in 4 rare samples, and
after an unweighted 50 % prune only 1 in 10 (QAT alone: 4 in 10). Real builds, real runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolchain.steps.classweights import class_weight_mode, finetune_class_weights
from toolchain.steps.data import DataError, Dataset

LABELS = ["ok", "rare"]
# The shipped model may lose this much of the float model's recall on the rare class (unweighted
# fine-tunes lost 33 to 63 points here).
MAX_RARE_RECALL_LOSS = 0.15


def _unbalanced(seed: int, n: int = 2000) -> Dataset:
    """About 10 % 'rare' rows, shifted by 1.2 and 0.6 standard deviations in two of four features."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.10).astype(np.int64)
    x = rng.normal(size=(n, 4))
    x[:, 0] += 1.2 * y
    x[:, 1] += 0.6 * y
    return Dataset(x.astype(np.float32), y, None, list(LABELS), f"unbalanced-{seed}")


def test_the_mode_comes_from_the_model_sidecar() -> None:
    assert class_weight_mode(None) == "auto"
    assert class_weight_mode({"training": {"class_weight_mode": "none"}}) == "none"
    assert class_weight_mode({"training": {"class_weight_mode": "bogus"}}) == "auto"
    ds = _unbalanced(0, 200)
    weights, mode = finetune_class_weights(ds, 2, None)
    assert mode == "auto" and weights is not None and weights[1] > 3 * weights[0]
    assert finetune_class_weights(ds, 2, {"training": {"class_weight_mode": "none"}}) == (None, "none")


@pytest.fixture(scope="module")
def rare_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolchain.steps.train import train_model

    path = tmp_path_factory.mktemp("rare") / "mlp.keras"
    res = train_model(_unbalanced(0), "mlp", 40, path, progress=False)
    assert res.class_weight is not None  # train weighted the classes (auto)
    return path


_BUILDS: dict[str, dict[str, Any]] = {}


def _build(model: Path, root: pytest.TempPathFactory, **kw: Any) -> dict[str, Any]:
    """Build ``model`` for mobile with ``kw`` once per test session; return report.json's document."""
    from toolchain.build import build_bundles

    key = repr(sorted(kw.items()))
    if key not in _BUILDS:
        _BUILDS[key] = build_bundles(
            model,
            _unbalanced(0),
            ["mobile"],
            root.mktemp("build") / "out",
            eval_data=_unbalanced(1),
            allow_accuracy_drop=True,
            progress=False,
            **kw,
        )
    return _BUILDS[key]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [{"prune": 0.5}, {"quantize": "qat"}, {"quantize": "qat", "prune": 0.5}],
    ids=["prune", "qat", "qat+prune"],
)
def test_fine_tunes_keep_the_rare_class(
    rare_mlp: Path, tmp_path_factory: pytest.TempPathFactory, kw: dict[str, Any]
) -> None:
    rep = _build(rare_mlp, tmp_path_factory, **kw)
    entry = rep["targets"]["mobile"]
    assert entry["status"] == "ok", entry.get("error")
    float_recall = entry["float_per_class"]["rare"]["recall"]
    shipped_recall = entry["per_class"]["rare"]["recall"]
    assert float_recall > 0.6
    assert shipped_recall >= float_recall - MAX_RARE_RECALL_LOSS, (float_recall, shipped_recall)
    if "prune" in kw:
        assert rep["prune"]["class_weight_mode"] == "auto"
        assert rep["prune"]["class_weight"]["rare"] > 3 * rep["prune"]["class_weight"]["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"prune": 0.5}, {"quantize": "qat"}], ids=["prune", "qat"])
def test_fine_tunes_refuse_unlabelled_data_before_any_work(
    rare_mlp: Path, tmp_path: Path, kw: dict[str, Any]
) -> None:
    from toolchain.build import build_bundles

    ds = _unbalanced(0)
    unlabelled = Dataset(ds.x, np.full(ds.n, -1, dtype=np.int64), None, [], "x-only.npz")
    flag = "--prune" if "prune" in kw else "--quantize qat"
    with pytest.raises(
        DataError, match=f"{flag} fine-tune the model on --data, but 'x-only.npz' has no labels"
    ):
        build_bundles(
            rare_mlp, unlabelled, ["mobile"], tmp_path / "out", eval_data=_unbalanced(1), progress=False, **kw
        )
    assert not (tmp_path / "out" / "mobile").exists()


@pytest.mark.slow
def test_pruning_shrinks_the_download_not_the_model_file(
    rare_mlp: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Why the size budget's advice does not say --prune: the int8 file stores the zeros too."""
    plain = _build(rare_mlp, tmp_path_factory)["targets"]["mobile"]
    pruned = _build(rare_mlp, tmp_path_factory, prune=0.5)["targets"]["mobile"]
    assert pruned["sparsity"] > 0.4 and (plain["sparsity"] or 0) < 0.05
    assert abs(pruned["size_bytes"] - plain["size_bytes"]) <= 0.02 * plain["size_bytes"]
    assert pruned["gzip_size_bytes"] < 0.9 * plain["gzip_size_bytes"]
