"""Quantization-aware fine-tuning (tfmot), pruning-preserving when the model was pruned.

tfmot's default 8-bit registry covers convolutions, dense, pooling, activations and the like.
Layers it does not know but that carry no trainable weights (``Rescaling``, ``Normalization``,
``Resizing``, ...) get ``OutputOnlyQuantizeConfig``: their output is fake-quantized with a moving
min/max, their weights (if any, such as Normalization's mean/variance) stay as they are, so the
converter has learned ranges for every activation. A layer with trainable weights that tfmot does
not support stops QAT with an error naming it.

Layers that compute the identity (``Rescaling(1.0)`` after the input of a model trained on data in
[0, 1]) are replaced by a linear activation first (``toolchain.steps.simplify``): with a fake-quant
of their own they would leave a float tensor between two quantization steps in the TFLite model.
"""

from __future__ import annotations

from typing import Any

from toolchain.errors import ToolchainError
from toolchain.steps.data import Dataset
from toolchain.steps.prune import copy_model
from toolchain.steps.simplify import drop_identity_layers
from toolchain.tfenv import import_keras

QAT_EPOCHS = 3
# Layers tfmot's registry does not list but quantize_apply's layout transforms handle (Conv + BN folding).
FOLDED_BY_TRANSFORMS = ("BatchNormalization",)
QAT_LEARNING_RATE = 1e-4
BATCH_SIZE = 32


class QATError(ToolchainError):
    """Quantization-aware training cannot be applied to this model."""


def _output_only_config_class() -> Any:
    import tensorflow_model_optimization as tfmot

    base = tfmot.quantization.keras.QuantizeConfig

    class OutputOnlyQuantizeConfig(base):  # type: ignore[misc,valid-type]
        """Fake-quantize a layer's output only (8 bit, asymmetric, moving min/max)."""

        def get_weights_and_quantizers(self, layer: Any) -> list[Any]:
            return []

        def get_activations_and_quantizers(self, layer: Any) -> list[Any]:
            return []

        def set_quantize_weights(self, layer: Any, quantize_weights: Any) -> None:
            pass

        def set_quantize_activations(self, layer: Any, quantize_activations: Any) -> None:
            pass

        def get_output_quantizers(self, layer: Any) -> list[Any]:
            return [
                tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
                    num_bits=8, per_axis=False, symmetric=False, narrow_range=False
                )
            ]

        def get_config(self) -> dict[str, Any]:
            return {}

    return OutputOnlyQuantizeConfig


def quantize_aware_model(model: Any, pruned: bool = False, clustered: bool = False) -> Any:
    """Return an (untrained) quantization-aware copy of a tf_keras model.

    ``clustered`` uses tfmot's cluster-preserving scheme (CQAT; PCQAT when also ``pruned``), which
    keeps each clustered kernel's values on its centroids while the centroids train.
    """
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry,
    )

    keras = import_keras()
    qk = tfmot.quantization.keras
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    output_only = _output_only_config_class()
    if any(hasattr(layer, "layers") and layer.layers for layer in model.layers):
        raise QATError("QAT does not support nested models; flatten the model into one Functional graph")

    def annotate(layer: Any) -> Any:
        # Annotation wraps the (copied) layer itself, so its trained weights carry over.
        clone = layer
        if type(layer).__name__ == "InputLayer":
            return clone
        # BatchNormalization is not in the registry on its own, but quantize_apply folds it into the
        # convolution before it (its layout transforms); a BN it cannot fold fails there, with its name.
        if registry.supports(layer) or type(layer).__name__ in FOLDED_BY_TRANSFORMS:
            return qk.quantize_annotate_layer(clone)
        if layer.trainable_weights:
            raise QATError(
                f"layer {layer.name!r} ({type(layer).__name__}) has trainable weights that tfmot cannot"
                " quantize-aware train; build with --quantize ptq"
            )
        return qk.quantize_annotate_layer(clone, quantize_config=output_only())

    try:
        annotated = keras.models.clone_model(drop_identity_layers(copy_model(model)), clone_function=annotate)
        with qk.quantize_scope({"OutputOnlyQuantizeConfig": output_only}):
            if clustered:
                scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
                    preserve_sparsity=pruned
                )
                return refresh_adapted_state(qk.quantize_apply(annotated, scheme))
            if pruned:
                scheme = qk.collab_opts.Default8BitPrunePreserveQuantizeScheme()
                return refresh_adapted_state(qk.quantize_apply(annotated, scheme))
            return refresh_adapted_state(qk.quantize_apply(annotated))
    except QATError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise QATError(
            f"tfmot cannot make this model quantization-aware ({str(e).splitlines()[0][:160]})"
        ) from None


def refresh_adapted_state(model: Any) -> Any:
    """Recompute the constants adapted layers derive from their weights; return ``model``.

    A tf_keras ``Normalization`` keeps its adapted mean and variance as weights and computes the
    tensors its ``call`` uses from them when it is built or adapted. ``quantize_apply`` builds its
    copy before it sets the weights, so the copy normalised with mean 0 and variance 1: QAT then
    fine-tuned, and the int8 model shipped, a model that skipped its input normalisation (an mlp on
    images lost 4.5 points on 20 classes; the conversion matrix found it).
    """
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # tfmot wraps each layer in a QuantizeWrapper
        if type(inner).__name__ == "Normalization" and inner.built and hasattr(inner, "finalize_state"):
            inner.finalize_state()
    return model


def qat_finetune(
    model: Any,
    data: Dataset,
    *,
    pruned: bool = False,
    clustered: bool = False,
    epochs: int = QAT_EPOCHS,
    learning_rate: float = QAT_LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    seed: int = 0,
    class_weight: dict[int, float] | None = None,
) -> Any:
    """Fine-tune a quantization-aware copy of ``model`` on ``data``; return the QAT model.

    ``class_weight`` is the weighting ``train`` used (``toolchain.steps.classweights``): without it a
    fine-tune on unbalanced labels pulls the model back towards the majority class.
    """
    from toolchain.steps.train import fit

    qat = quantize_aware_model(model, pruned=pruned, clustered=clustered)
    fit(
        qat,
        data,
        epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        patience=None,
        desc="QAT" + (" (cluster-preserving)" if clustered else " (prune-preserving)" if pruned else ""),
        progress=progress,
        seed=seed,
        class_weight=class_weight,
    )
    return qat
