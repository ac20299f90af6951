"""The class weighting of the build's short fine-tunes (pruning, QAT): the one ``train`` used.

``edgefleet train`` weights the classes when the labels are unbalanced (``toolchain.steps.train``).
Pruning and QAT fine-tune the trained model again on the calibration data; without the same weights
those few epochs pull the model back towards the majority class, and the rare class's recall drops
in the shipped model although the float model had it. The mode comes from the model's sidecar (what
``train`` was told, ``auto`` by default); a model trained elsewhere gets ``auto``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toolchain.steps.data import Dataset
from toolchain.steps.train import CLASS_WEIGHT_MODES, class_weights

DEFAULT_MODE = "auto"


def class_weight_mode(meta: Mapping[str, Any] | None) -> str:
    """Return the class weight mode ``train`` recorded in the model's sidecar, or ``auto``."""
    training = (meta or {}).get("training")
    mode = training.get("class_weight_mode") if isinstance(training, Mapping) else None
    return mode if mode in CLASS_WEIGHT_MODES else DEFAULT_MODE


def finetune_class_weights(
    data: Dataset, n_classes: int, meta: Mapping[str, Any] | None
) -> tuple[dict[int, float] | None, str]:
    """Return the Keras ``class_weight`` for a fine-tune on ``data`` (labels in model order) and its mode."""
    mode = class_weight_mode(meta)
    return class_weights(data.y, n_classes, mode), mode
