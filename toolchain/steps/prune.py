"""Magnitude pruning with a short fine-tune (tfmot), and sparsity measured in real weights.

tfmot's ``ConstantSparsity`` prunes only every ``frequency`` steps (default 100), so a short
fine-tune on a small data set could end with nothing pruned at all. We set the frequency from the
number of steps per epoch (``PRUNE_UPDATES_PER_EPOCH`` mask updates per epoch, at least one step
apart), then strip the pruning wrappers and measure the sparsity reached in the kernels; the
build reports the sparsity of the final artifact on top of that (``toolchain.steps.evaluate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.data import Dataset
from toolchain.tfenv import import_keras

PRUNE_EPOCHS = 8
PRUNE_UPDATES_PER_EPOCH = 4
PRUNE_LEARNING_RATE = 1e-3
# Share of the fine-tune over which sparsity ramps from 0 to the target (the rest recovers).
PRUNE_RAMP_FRACTION = 0.5
BATCH_SIZE = 32
# Layers whose kernels are pruned (biases and normalisation layers are left alone).
PRUNABLE = ("Dense", "Conv2D", "Conv1D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")


class PruneError(ToolchainError):
    """Pruning cannot be applied as asked."""


@dataclass
class PruneResult:
    """The stripped pruned model and what was reached."""

    model: Any
    requested: float
    reached: float  # zero fraction over the kernels of prunable layers
    pruned_layers: list[str]
    frequency_steps: int
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "reached_in_keras": self.reached,
            "pruned_layers": self.pruned_layers,
            "frequency_steps": self.frequency_steps,
            "epochs": self.epochs,
        }


def kernel_sparsity(model: Any) -> float:
    """Return the fraction of exact zeros over the kernels of prunable layers."""
    zeros = total = 0
    for layer in _flat_layers(model):
        if type(layer).__name__ not in PRUNABLE:
            continue
        for w in layer.weights:
            if "kernel" in w.name:
                arr = np.asarray(w.numpy())
                zeros += int((arr == 0).sum())
                total += arr.size
    return zeros / total if total else 0.0


def copy_model(model: Any) -> Any:
    """Return an independent copy of a tf_keras model (same weights), so callers' models stay untouched."""
    keras = import_keras()
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _flat_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out += _flat_layers(layer)
        else:
            out.append(layer)
    return out


def _schedule(tfmot: Any, sparsity: float, total_steps: int, frequency: int) -> Any:
    """Return a schedule that ramps sparsity up over the first part of the fine-tune, then holds it.

    Cutting half the weights at step 0 (ConstantSparsity) cost MobileNetV2 9-11 points that a short
    fine-tune could not win back; a polynomial ramp (Zhu and Gupta 2017, tfmot's PolynomialDecay) to the
    target over ``PRUNE_RAMP_FRACTION`` of the steps lets the network adapt while weights go, and the
    rest of the fine-tune recovers with the final mask. The ramp ends on a mask update (a multiple of
    ``frequency``) so the target sparsity is reached exactly.
    """
    end = (min(round(total_steps * PRUNE_RAMP_FRACTION), total_steps - 1) // frequency) * frequency
    if end < 2 * frequency:  # too short a fine-tune to ramp: prune at once
        return tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=frequency)
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=end, frequency=frequency
    )


def prune_model(
    model: Any,
    data: Dataset,
    sparsity: float,
    *,
    epochs: int = PRUNE_EPOCHS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = PRUNE_LEARNING_RATE,
    progress: bool = True,
    seed: int = 0,
    class_weight: dict[int, float] | None = None,
) -> PruneResult:
    """Prune ``model`` (tf_keras) to ``sparsity`` with ConstantSparsity, fine-tune, strip, measure.

    ``class_weight`` is the weighting ``train`` used (``toolchain.steps.classweights``), so the fine-tune
    does not undo it on unbalanced labels.
    """
    import tensorflow_model_optimization as tfmot

    from toolchain.steps.train import fit

    keras = import_keras()
    if not 0 < sparsity < 1:
        raise PruneError(f"--prune {sparsity} must be between 0 and 1 (0.5 = half the weights)")
    if any(hasattr(layer, "layers") and layer.layers for layer in model.layers):
        raise PruneError(
            "pruning does not support nested models; flatten the model into one Functional graph"
        )
    steps_per_epoch = max(1, math.ceil(data.n * 0.9 / batch_size))
    frequency = max(1, steps_per_epoch // PRUNE_UPDATES_PER_EPOCH)
    schedule = _schedule(tfmot, sparsity, steps_per_epoch * epochs, frequency)
    pruned_names: list[str] = []

    def wrap(layer: Any) -> Any:
        # The wrapper takes the (copied) layer itself, so its trained weights carry over.
        if type(layer).__name__ in PRUNABLE:
            pruned_names.append(layer.name)
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    try:
        wrapped = keras.models.clone_model(copy_model(model), clone_function=wrap)
    except ValueError as e:
        raise PruneError(f"tfmot cannot prune this model ({str(e).splitlines()[0][:150]})") from None
    if not pruned_names:
        raise PruneError(
            f"the model has no prunable layers ({', '.join(PRUNABLE)}); --prune has nothing to do"
        )
    fit(
        wrapped,
        data,
        epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        patience=None,
        extra_callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        desc=f"prune {sparsity:.0%}",
        progress=progress,
        seed=seed,
        class_weight=class_weight,
    )
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    return PruneResult(stripped, sparsity, kernel_sparsity(stripped), pruned_names, frequency, epochs)
