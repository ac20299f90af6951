"""Weight clustering (tfmot) with a short fine-tune, and what it buys: unique weights and compressed sizes.

``cluster_model`` wraps every Dense/Conv layer of a tf_keras model in tfmot's clustering wrapper
(``number_of_clusters`` = K centroids per kernel, k-means++ initialisation), fine-tunes so the
centroids move to where the loss wants them, strips the wrappers and measures the largest number of
unique values per output channel left in the float kernels (at most K). On a pruned model it uses
tfmot's sparsity-preserving clustering, so the zeros stay zeros (one centroid is pinned at 0).

Clustering alone does not shrink a file: a kernel still stores one value per weight. It makes the
weights repeat, so a general-purpose compressor (gzip, what an OTA transfer or a flash image can use)
squeezes them. ``compression_report`` measures that on the artifact a target ships: raw and gzip
sizes, their ratios to the plain float file of the same format, the unique stored values per output
channel of every kernel (evidence the clustering survived conversion and int8 requantization), and
what transferring the bundle costs as it is sent today (uncompressed) and gzip-compressed per file.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.data import Dataset
from toolchain.steps.prune import PRUNABLE, copy_model
from toolchain.tfenv import import_keras

CLUSTER_MIN = 2
CLUSTER_MAX = 256
CLUSTER_EPOCHS = 5
CLUSTER_LEARNING_RATE = 3e-4
BATCH_SIZE = 32
GZIP_LEVEL = 9
# Layers whose kernels are clustered (tfmot's clustering registry supports these; biases stay float).
CLUSTERABLE = PRUNABLE


class ClusterError(ToolchainError):
    """Clustering cannot be applied as asked."""


def check_clusters(k: object) -> int:
    """Return ``k`` as the number of clusters, or raise ClusterError (one line naming ``--cluster``)."""
    if isinstance(k, bool) or not isinstance(k, int) or not CLUSTER_MIN <= k <= CLUSTER_MAX:
        raise ClusterError(
            f"--cluster {k!r} must be a whole number of clusters from {CLUSTER_MIN} to {CLUSTER_MAX}"
            " (16 keeps 16 distinct weights per kernel)"
        )
    return k


@dataclass
class ClusterResult:
    """The stripped clustered model and what was reached."""

    model: Any
    clusters: int
    preserve_sparsity: bool
    clustered_layers: list[str]
    unique_per_channel_max: int  # over the clustered float kernels (<= clusters)
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        """Return the report's ``cluster`` section."""
        return {
            "clusters": self.clusters,
            "preserve_sparsity": self.preserve_sparsity,
            "clustered_layers": self.clustered_layers,
            "unique_per_channel_max_in_keras": self.unique_per_channel_max,
            "epochs": self.epochs,
        }


def _kernel_name(layer: Any) -> str:
    return "depthwise_kernel" if type(layer).__name__ == "DepthwiseConv2D" else "kernel"


def kernel_unique_per_channel(model: Any) -> int:
    """Return the largest number of distinct values in one output channel of any clusterable kernel."""
    worst = 0
    for layer in model.layers:
        if type(layer).__name__ not in CLUSTERABLE:
            continue
        for w in layer.weights:
            if _kernel_name(layer) in w.name and len(w.shape) >= 2:
                arr = np.asarray(w.numpy())
                worst = max(worst, max_unique_per_channel(arr, arr.ndim - 1))
    return worst


def max_unique_per_channel(arr: np.ndarray, axis: int) -> int:
    """Return the largest count of distinct values along one index of ``axis`` (one output channel)."""
    moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
    return max((len(np.unique(row)) for row in moved), default=0)


def cluster_model(
    model: Any,
    data: Dataset,
    clusters: int,
    *,
    preserve_sparsity: bool = False,
    epochs: int = CLUSTER_EPOCHS,
    learning_rate: float = CLUSTER_LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    seed: int = 0,
    class_weight: dict[int, float] | None = None,
) -> ClusterResult:
    """Cluster the kernels of ``model`` (tf_keras) to ``clusters`` values each, fine-tune, strip, measure.

    ``class_weight`` is the weighting ``train`` used (``toolchain.steps.classweights``), so the
    fine-tune does not undo it on unbalanced labels.
    """
    import tensorflow_model_optimization as tfmot

    from toolchain.steps.train import fit

    keras = import_keras()
    check_clusters(clusters)
    if any(hasattr(layer, "layers") and layer.layers for layer in model.layers):
        raise ClusterError(
            "clustering does not support nested models; flatten the model into one Functional graph"
        )
    ck = tfmot.clustering.keras
    init = ck.CentroidInitialization.KMEANS_PLUS_PLUS
    names: list[str] = []

    def wrap(layer: Any) -> Any:
        # The wrapper takes the (copied) layer itself, so its trained (and pruned) weights carry over.
        if type(layer).__name__ not in CLUSTERABLE:
            return layer
        kernel = next((w for w in layer.weights if _kernel_name(layer) in w.name), None)
        if kernel is None or math.prod(kernel.shape) <= clusters:
            return layer  # nothing to gain: the kernel has no more values than centroids
        names.append(layer.name)
        if preserve_sparsity:
            # tfmot 0.8 does not export the sparsity-preserving variant in its public API
            from tensorflow_model_optimization.python.core.clustering.keras.experimental import (
                cluster as experimental_cluster,
            )

            return experimental_cluster.cluster_weights(
                layer, number_of_clusters=clusters, cluster_centroids_init=init, preserve_sparsity=True
            )
        return ck.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=init)

    try:
        wrapped = keras.models.clone_model(copy_model(model), clone_function=wrap)
    except (ValueError, TypeError) as e:
        raise ClusterError(f"tfmot cannot cluster this model ({str(e).splitlines()[0][:150]})") from None
    if not names:
        raise ClusterError(
            f"the model has no kernel with more than {clusters} weights in a clusterable layer"
            f" ({', '.join(CLUSTERABLE)}); --cluster has nothing to do"
        )
    fit(
        wrapped,
        data,
        epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        patience=None,
        desc=f"cluster {clusters}" + (" (sparsity-preserving)" if preserve_sparsity else ""),
        progress=progress,
        seed=seed,
        class_weight=class_weight,
    )
    stripped = ck.strip_clustering(wrapped)
    return ClusterResult(
        stripped, clusters, preserve_sparsity, names, kernel_unique_per_channel(stripped), epochs
    )


# --------------------------------------------------------------------------------- what ships


def _gz(blob: bytes) -> int:
    return len(gzip.compress(blob, compresslevel=GZIP_LEVEL, mtime=0))


def _tflite_kernels(path: Path) -> list[tuple[str, np.ndarray, int]]:
    """Return (name, stored values, output-channel axis) of every constant tensor with >= 2 axes."""
    from toolchain.steps.evaluate import tflite_constants

    out = []
    for t, arr in tflite_constants(path):
        if arr.dtype.kind in "iu" and t.zero_point and len(t.zero_point) > 1:
            axis = int(t.quantized_dimension)
        else:
            # float kernels: Conv2D/FullyConnected store output channels first, DepthwiseConv2D last
            axis = arr.ndim - 1 if arr.shape[0] == 1 else 0
        out.append((str(t.name), arr, axis))
    return out


def _onnx_kernels(path: Path) -> list[tuple[str, np.ndarray, int]]:
    import onnx

    from toolchain.steps.evaluate import onnx_constants

    m = onnx.load(str(path))
    axes: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear":
            axes[node.input[0]] = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
    out = []
    for init, arr in onnx_constants(m):
        axis = axes.get(init.name, 0) % arr.ndim
        out.append((init.name, arr, axis))
    return out


def unique_weights(path: Path) -> dict[str, Any]:
    """Return distinct stored values per output channel over a model file's kernels.

    ``max`` is the largest count in any channel of any kernel, ``mean`` the mean over the channels of
    all kernels, ``kernels`` how many kernels were read. int8 values are read as stored, so this is
    what survived quantization (per-channel int8 maps K float values to at most K integers).
    """
    path = Path(path)
    kernels = _tflite_kernels(path) if path.suffix == ".tflite" else _onnx_kernels(path)
    counts: list[int] = []
    for _, arr, axis in kernels:
        moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        counts += [len(np.unique(row)) for row in moved]
    return {
        "max": max(counts) if counts else None,
        "mean": round(float(np.mean(counts)), 2) if counts else None,
        "kernels": len(kernels),
    }


def bundle_transfer(bundle: Path) -> tuple[int, int]:
    """Return (bytes an OTA update transfers today, bytes with every file gzip-compressed) for a bundle.

    The agent fetches ``manifest.json``, its signature and each file the manifest lists, uncompressed
    (HTTP without content coding, or MQTT chunks of the raw stream), so today's cost is the sum of the
    file sizes; the second figure is what per-file gzip (Content-Encoding: gzip) would cost.
    """
    raw = gz = 0
    for p in sorted(bundle.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            blob = p.read_bytes()
            raw += len(blob)
            gz += _gz(blob)
    return raw, gz


def compression_report(
    artifact: Path, float_path: Path, bundle: Path | None, clusters: int | None
) -> dict[str, Any]:
    """Return a target's ``compression`` section (sizes, ratios to the float file, unique weights, OTA)."""
    blob, float_blob = Path(artifact).read_bytes(), Path(float_path).read_bytes()
    size, gz = len(blob), _gz(blob)
    float_size, float_gz = len(float_blob), _gz(float_blob)
    doc: dict[str, Any] = {
        "clusters": clusters,
        "size_bytes": size,
        "gzip_size_bytes": gz,
        "float_size_bytes": float_size,
        "float_gzip_size_bytes": float_gz,
        "float_format": Path(float_path).suffix.lstrip("."),
        "size_ratio": round(size / float_size, 4),
        "gzip_ratio": round(gz / float_size, 4),
        "unique_weights_per_channel": unique_weights(Path(artifact)),
        "ota_compressed": False,
    }
    if bundle is not None:
        doc["ota_bytes"], doc["ota_gzip_bytes"] = bundle_transfer(bundle)
    return doc
