"""Load the models people bring and build the built-in architectures.

Accepted files: tf_keras (Keras 2) ``.keras``, ``.h5`` and SavedModel directories, and ``.keras``
files saved by Keras 3 (``import keras``). Keras 3 models are converted for PTQ through
``model.export()`` to a SavedModel; pruning and QAT need tf_keras models, so ``as_tf_keras``
rebuilds a Keras 3 Sequential/Functional model of standard layers as tf_keras (config translated
layer by layer, weights copied layer by layer) and otherwise stops with an error naming the
workaround.

The built-in architectures are in ``toolchain.steps.architectures``.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.tfenv import import_keras, import_tf

log = logging.getLogger(__name__)

PREDICT_BATCH = 256


class ModelError(ToolchainError):
    """A model file cannot be loaded or used as asked."""


@dataclass
class LoadedModel:
    """A model ready for the pipeline; ``kind`` is ``tf_keras``, ``keras3``, ``savedmodel`` or ``onnx``."""

    path: Path
    kind: str
    model: Any  # tf_keras.Model, a Keras 3 model, or a loaded SavedModel object
    input_shape: tuple[int, ...]  # per sample, no batch axis
    n_outputs: int
    _export_dir: Path | None = field(default=None, repr=False)
    _serve: Any = field(default=None, repr=False)
    _input_name: str = field(default="", repr=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the float model's scores (n, K) for raw inputs (n, *input_shape)."""
        from toolchain.steps.data import batch_rows

        step = batch_rows(np.shape(x)[1:], PREDICT_BATCH)
        outs = []
        for i in range(0, len(x), step):
            chunk = np.asarray(x[i : i + step], dtype=np.float32)
            if self.kind == "onnx":
                outs.append(np.asarray(self.model.run(None, {self._input_name: chunk})[0]))
            elif self.kind == "savedmodel":
                tf = import_tf()
                res = self._serve(tf.constant(chunk))
                val = next(iter(res.values())) if isinstance(res, Mapping) else res
                outs.append(np.asarray(val))
            else:
                outs.append(np.asarray(self.model(chunk, training=False)))
        out = np.concatenate(outs, axis=0) if outs else np.zeros((0, self.n_outputs), np.float32)
        return out.reshape(out.shape[0], -1).astype(np.float32)

    def conversion_source(self, workdir: Path) -> Any:
        """Return what the converters take: the tf_keras model, or a SavedModel directory."""
        if self.kind == "tf_keras":
            return self.model
        if self.kind == "savedmodel":
            return self.path
        if self.kind == "onnx":
            return OnnxSource(self.path, self._input_name)
        if self._export_dir is None:
            d = Path(tempfile.mkdtemp(prefix="keras3-export-", dir=workdir))
            try:
                self.model.export(str(d / "saved_model"))
            except Exception as e:  # noqa: BLE001 - Keras raises many types here
                raise ModelError(
                    f"cannot export Keras 3 model {str(self.path)!r} to a SavedModel ({_first_line(e)});"
                    " save it with tf_keras instead"
                ) from None
            self._export_dir = d / "saved_model"
        return self._export_dir

    def as_tf_keras(self, purpose: str) -> Any:
        """Return a tf_keras model (rebuilt from Keras 3 when its layers allow) for pruning/QAT."""
        if self.kind == "tf_keras":
            return self.model
        if self.kind == "onnx":
            raise ModelError(onnx_keras_only(purpose, self.path))
        if self.kind == "savedmodel":
            raise ModelError(
                f"{purpose} needs a Keras model, but {str(self.path)!r} is a plain SavedModel;"
                " pass the .keras/.h5 file it was exported from, or build with --quantize ptq and no --prune"
            )
        return rebuild_as_tf_keras(self.model, self.path, purpose)


@dataclass(frozen=True)
class OnnxSource:
    """A float ONNX model given by the user, as the converters take it (the ONNX back end quantizes it)."""

    path: Path
    input_name: str


def onnx_keras_only(purpose: str, path: Path) -> str:
    """Return the one-line error for pruning/QAT asked of an ONNX model."""
    return (
        f"{purpose} needs the Keras model; {str(path)!r} is ONNX, which builds with --quantize ptq and no"
        " --prune only (pass the .keras/.h5 file to prune or fine-tune)"
    )


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:160]


def keras_file_version(path: Path) -> str:
    """Return the ``keras_version`` recorded in a ``.keras`` archive, or raise ModelError if it is not one."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "config.json" not in names:
                raise ModelError(
                    f"{str(path)!r} is a zip file but not a .keras model (no config.json); re-save the model"
                )
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
            bad = z.testzip()
            if bad is not None:
                raise ModelError(
                    f"model file {str(path)!r} is corrupt ({bad} fails its CRC); re-save or re-download it"
                )
    except zipfile.BadZipFile:
        raise ModelError(
            f"model file {str(path)!r} is not a valid .keras archive (truncated or corrupt?); re-save or "
            "re-download it"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(
            f"cannot read model file {str(path)!r} ({_first_line(e)}); re-save or re-download it"
        ) from None
    return str(meta.get("keras_version", ""))


def load_model(path: str | Path) -> LoadedModel:
    """Load a tf_keras .keras/.h5/SavedModel, a Keras 3 .keras file, or a plain SavedModel directory."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model {str(p)!r} does not exist; pass a .keras or .h5 file or a SavedModel folder")
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            raise ModelError(
                f"folder {str(p)!r} is not a SavedModel (no saved_model.pb); pass a .keras/.h5 file or a "
                "SavedModel"
            )
        return _load_savedmodel(p)
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return _load_onnx(p)
    if suffix == ".keras":
        version = keras_file_version(p)
        if version.startswith("3"):
            return _load_keras3(p)
        return _load_tf_keras(p)
    if suffix in (".h5", ".hdf5"):
        try:
            import h5py

            with h5py.File(p, "r") as f:
                if "model_config" not in f.attrs:
                    raise ModelError(
                        f"{str(p)!r} is an HDF5 file without a model config (weights only?); save the whole "
                        "model"
                    )
        except OSError:
            raise ModelError(
                f"model file {str(p)!r} is not a valid HDF5 file (truncated or corrupt?); re-save it"
            ) from None
        return _load_tf_keras(p)
    raise ModelError(f"model {str(p)!r} has an unknown format; use .keras, .h5, .onnx or a SavedModel folder")


# ONNX operators whose first input is NCHW by the ONNX spec (a rank-4 graph input they read directly is).
NCHW_OPS = (
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "BatchNormalization",
    "InstanceNormalization",
)


def onnx_input_layout(path: Path) -> str | None:
    """Return ``NCHW`` or ``NHWC`` for a rank-4 ONNX input, from the operator that reads it; else None.

    ONNX convolutions and pools take NCHW, so an input read directly by one is NCHW (PyTorch exports);
    an input read by ``Transpose(perm=[0, 3, 1, 2])`` is NHWC (tf2onnx exports of Keras models).
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    graph_input = next(i for i in m.graph.input if i.name not in inits)
    if len(graph_input.type.tensor_type.shape.dim) != 4:
        return None
    readers = [n for n in m.graph.node if graph_input.name in n.input]
    if readers and all(n.op_type in NCHW_OPS for n in readers):
        return "NCHW"
    perms = [
        list(a.ints) for n in readers if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"
    ]
    if readers and len(perms) == len(readers) and all(p == [0, 3, 1, 2] for p in perms):
        return "NHWC"
    return None


def _load_onnx(p: Path) -> LoadedModel:
    """Load a float ONNX model (one input with a free or fixed batch axis, one output) in ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(p), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, ValidationError, OSError...
        raise ModelError(
            f"cannot load ONNX model {str(p)!r} ({_first_line(e)}); re-export it (torch.onnx.export)"
        ) from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ModelError(
            f"model {str(p)!r} must have exactly one input and one output (it has {len(inputs)} and"
            f" {len(proto.graph.output)}); multi-tensor models are not supported"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) < 2 or any(d is None for d in shape[1:]):
        raise ModelError(
            f"ONNX model {str(p)!r} has input shape {shape}; only the batch axis (the first) may be"
            " dynamic: export with fixed sample dimensions"
        )
    if shape[0] is not None:
        # Calibration and the parity check run batches; the device runs batch 1 and more.
        raise ModelError(
            f"ONNX model {str(p)!r} has a fixed batch of {shape[0]}; export it with a dynamic batch axis"
            " (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
        )
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise ModelError(
            f"ONNX model {str(p)!r} takes {onnx.TensorProto.DataType.Name(elem)} input; export the float32"
            " model (edgefleet quantizes it)"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    sample_shape = tuple(int(d or 0) for d in shape[1:])
    # The output's size from one probe run: exports often leave every output axis symbolic.
    probe = np.zeros((1, *sample_shape), np.float32)
    out = np.asarray(session.run(None, {inputs[0].name: probe})[0])
    n_out = int(np.prod(out.shape[1:])) if out.ndim > 1 else 1
    return LoadedModel(p, "onnx", session, sample_shape, n_out, _input_name=inputs[0].name)


def _model_io(model: Any, where: Path) -> tuple[tuple[int, ...], int]:
    inputs = model.inputs if hasattr(model, "inputs") else None
    if not inputs or len(inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(
            f"model {str(where)!r} must have exactly one input and one output (multi-tensor models are not "
            "supported)"
        )
    in_shape = tuple(inputs[0].shape)[1:]
    if any(d is None for d in in_shape):
        raise ModelError(
            f"model {str(where)!r} has a dynamic input shape {tuple(inputs[0].shape)}; give the Input layer "
            "a fixed shape"
        )
    out_shape = tuple(model.outputs[0].shape)[1:]
    n_out = int(np.prod([d for d in out_shape if d is not None])) if out_shape else 1
    return tuple(int(d) for d in in_shape), n_out


def _load_tf_keras(p: Path) -> LoadedModel:
    keras = import_keras()
    try:
        model = keras.models.load_model(str(p), compile=False)
    except Exception as e:  # noqa: BLE001 - tf_keras raises OSError, ValueError, KeyError... for bad files
        raise ModelError(
            f"cannot load model {str(p)!r} ({_first_line(e)}); is the file complete and saved by Keras?"
        ) from None
    shape, n_out = _model_io(model, p)
    return LoadedModel(p, "tf_keras", model, shape, n_out)


def _load_keras3(p: Path) -> LoadedModel:
    import_tf()
    try:
        import keras as keras3
    except ImportError:
        raise ModelError(f"{str(p)!r} was saved by Keras 3; pip install keras>=3 to read it") from None
    if not str(keras3.__version__).startswith("3"):
        raise ModelError(
            f"{str(p)!r} was saved by Keras 3 but 'keras' here is {keras3.__version__}; install keras>=3"
        )
    try:
        model = keras3.saving.load_model(str(p), compile=False)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"cannot load Keras 3 model {str(p)!r} ({_first_line(e)}); is the file complete?"
        ) from None
    shape, n_out = _model_io(model, p)
    return LoadedModel(p, "keras3", model, shape, n_out)


def _load_savedmodel(p: Path) -> LoadedModel:
    keras = import_keras()
    try:
        model = keras.models.load_model(str(p), compile=False)
        shape, n_out = _model_io(model, p)
        return LoadedModel(p, "tf_keras", model, shape, n_out)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - not a Keras SavedModel: fall back to its serving signature
        pass
    tf = import_tf()
    try:
        obj = tf.saved_model.load(str(p))
        serve = obj.signatures["serving_default"]
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"cannot load SavedModel {str(p)!r} ({_first_line(e)}); is the folder complete?"
        ) from None
    specs = serve.structured_input_signature[1]
    if len(specs) != 1 or len(serve.structured_outputs) != 1:
        raise ModelError(f"SavedModel {str(p)!r} must have one input and one output in 'serving_default'")
    spec = next(iter(specs.values()))
    shape = tuple(spec.shape)[1:]
    if any(d is None for d in shape):
        raise ModelError(
            f"SavedModel {str(p)!r} has a dynamic input shape {tuple(spec.shape)}; export it with a fixed "
            "shape"
        )
    out = next(iter(serve.structured_outputs.values()))
    n_out = int(np.prod([d for d in tuple(out.shape)[1:] if d is not None]))
    lm = LoadedModel(p, "savedmodel", obj, tuple(int(d) for d in shape), n_out)
    lm._serve = serve
    return lm


# --------------------------------------------------------------------------------------------------
# Keras 3 -> tf_keras


# Config keys every tf_keras layer accepts through **kwargs.
_BASE_LAYER_KEYS = {
    "name",
    "trainable",
    "dtype",
    "input_shape",
    "batch_input_shape",
    "batch_size",
    "input_dim",
}


def _workaround(path: Path, purpose: str, why: str) -> ModelError:
    return ModelError(
        f"{purpose} needs a tf_keras model and Keras 3 model {str(path)!r} cannot be rebuilt as one ({why});"
        " re-save it with tf_keras (import tf_keras as keras), or build with --quantize ptq and no --prune"
    )


def _clean_layer_config(
    class_name: str, cfg: dict[str, Any], keras2: Any, path: Path, purpose: str
) -> dict[str, Any]:
    cls = getattr(keras2.layers, class_name, None)
    if cls is None or not inspect.isclass(cls):
        raise _workaround(path, purpose, f"layer type {class_name!r} has no tf_keras equivalent")
    out: dict[str, Any] = {}
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v.get("class_name") == "DTypePolicy":
            v = v.get("config", {}).get("name", "float32")
        if k == "batch_shape":
            out["batch_input_shape"] = v
            continue
        if k.endswith("_initializer"):
            continue  # weights are copied afterwards
        if k.endswith(("_regularizer", "_constraint")):
            if v is not None:
                log.warning("dropping %s of layer %s while rebuilding as tf_keras", k, cfg.get("name"))
            continue
        if k in params or k in _BASE_LAYER_KEYS:
            out[k] = v
        elif v not in (None, False, 0, "", [], {}):
            raise _workaround(
                path, purpose, f"layer {cfg.get('name')!r} ({class_name}) uses option {k}={str(v)[:40]!r}"
            )
    return out


def _history(arg: Any) -> list[Any]:
    """Return tf_keras inbound entries [[layer, node, tensor, {}], ...] for a Keras 3 node argument."""
    if isinstance(arg, Mapping) and arg.get("class_name") == "__keras_tensor__":
        name, node, idx = arg["config"]["keras_history"]
        return [[name, node, idx, {}]]
    if isinstance(arg, (list, tuple)):
        out: list[Any] = []
        for a in arg:
            out += _history(a)
        return out
    return []


def rebuild_as_tf_keras(model3: Any, path: Path, purpose: str) -> Any:
    """Rebuild a Keras 3 Sequential/Functional model of standard layers as tf_keras, weights included."""
    keras2 = import_keras()
    cfg = model3.get_config()
    kind = type(model3).__name__
    if kind not in ("Sequential", "Functional"):
        raise _workaround(path, purpose, f"it is a subclassed model ({kind})")
    try:
        if kind == "Sequential":
            layers = []
            for lc in cfg["layers"]:
                layers.append(
                    {
                        "class_name": lc["class_name"],
                        "config": _clean_layer_config(lc["class_name"], lc["config"], keras2, path, purpose),
                    }
                )
            model2 = keras2.Sequential.from_config({"name": cfg.get("name", "sequential"), "layers": layers})
        else:
            layers = []
            for lc in cfg["layers"]:
                nodes = []
                for node in lc.get("inbound_nodes", []):
                    hist = _history(node.get("args", [])) if isinstance(node, Mapping) else []
                    if isinstance(node, Mapping) and node.get("kwargs"):
                        raise _workaround(
                            path, purpose, f"layer {lc['name']!r} is called with keyword arguments"
                        )
                    nodes.append(hist)
                layers.append(
                    {
                        "class_name": lc["class_name"],
                        "name": lc["name"],
                        "config": _clean_layer_config(lc["class_name"], lc["config"], keras2, path, purpose),
                        "inbound_nodes": nodes,
                    }
                )

            def io(spec: Any) -> Any:
                if isinstance(spec, list) and spec and isinstance(spec[0], str):
                    return [spec]
                return spec

            model2 = keras2.Model.from_config(
                {
                    "name": cfg.get("name", "model"),
                    "layers": layers,
                    "input_layers": io(cfg["input_layers"]),
                    "output_layers": io(cfg["output_layers"]),
                }
            )
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - from_config raises many types for unknown layers/options
        raise _workaround(path, purpose, _first_line(e)) from None
    by_name = {layer.name: layer for layer in model3.layers}
    for layer in model2.layers:
        src = by_name.get(layer.name)
        if src is None:
            continue
        w = src.get_weights()
        if len(w) != len(layer.get_weights()):
            raise _workaround(
                path, purpose, f"layer {layer.name!r} has a different number of weights in tf_keras"
            )
        if w:
            layer.set_weights(w)
    # Check the rebuild computes the same function.
    x = np.random.default_rng(0).normal(size=(4, *model2.input_shape[1:])).astype(np.float32)
    a = np.asarray(model3(x, training=False))
    b = np.asarray(model2(x, training=False))
    if a.shape != b.shape or not np.allclose(a, b, atol=1e-4, rtol=1e-3):
        raise _workaround(path, purpose, "the rebuilt model computes different outputs")
    return model2


def save_model(model: Any, out_path: Path) -> Path:
    """Save a tf_keras model as .keras or .h5 (by suffix) atomically."""
    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".keras", ".h5"):
        raise ModelError(f"--out {str(out_path)!r} must end in .keras or .h5")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp{out_path.suffix}")
    try:
        model.save(str(tmp))
        tmp.replace(out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_path


MODEL_META_SCHEMA = 1
MODEL_META_SUFFIX = ".edgefleet.json"


def model_meta_path(model_path: Path) -> Path:
    """Return the sidecar path that carries a model's metadata (``model.keras`` -> ``model.keras.edgefleet.json``)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + MODEL_META_SUFFIX)


def write_model_meta(model_path: Path, meta: Mapping[str, Any]) -> Path:
    """Write the model's metadata sidecar atomically (``class_names``, ``arch``, ``seed``...; JSON)."""
    out = model_meta_path(model_path)
    body = {"schema": MODEL_META_SCHEMA, **dict(meta)}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    return out


def read_model_meta(model_path: Path) -> dict[str, Any] | None:
    """Return the metadata ``train`` stored beside a model, or None when there is no sidecar.

    Raises ModelError on a sidecar that is not a JSON object of a known schema, naming the file.
    """
    p = model_meta_path(model_path)
    if not p.is_file():
        return None
    try:
        body = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{str(p)!r} is not readable JSON ({e}); delete it or re-run 'edgefleet train'"
        ) from e
    if not isinstance(body, dict) or body.get("schema") != MODEL_META_SCHEMA:
        raise ModelError(
            f"{str(p)!r} is not an edgefleet model sidecar of schema {MODEL_META_SCHEMA}; delete it or re-run 'edgefleet train'"
        )
    names = body.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)):
        raise ModelError(f"{str(p)!r}: class_names must be a list of strings")
    return body


# --------------------------------------------------------------------------------------------------
# Input normalisation -> manifest preprocessing


def fold_input_normalization(model: Any) -> tuple[Any, dict[str, Any] | None]:
    """Move a ``Normalization`` layer fed directly by the model input into an affine preprocessing step.

    int8 models quantize their input per tensor: raw tabular features of very different ranges (a
    temperature around 60 and a vibration around 0.5) then share one scale and the small ones lose
    all resolution. Standardising in float *before* quantization keeps them: the layer is replaced
    by an identity, its ``(x - mean) / sqrt(var)`` becomes the manifest's
    ``{"type": "affine", "scale": 1/sqrt(var), "offset": -mean/sqrt(var)}`` (per feature, last axis),
    and the device still receives raw values. Returns ``(model, None)`` when there is nothing to fold.
    """
    keras = import_keras()
    if not hasattr(model, "layers") or len(model.inputs) != 1:
        return model, None
    inp = model.inputs[0]
    norm = None
    for layer in model.layers:
        if type(layer).__name__ != "Normalization":
            continue
        try:
            fed_by_input = layer.input is inp or layer.input.name == inp.name
        except (AttributeError, ValueError):  # layer used several times
            fed_by_input = False
        if fed_by_input:
            norm = layer
            break
    if norm is None:
        return model, None
    mean = np.asarray(norm.mean, dtype=np.float64).reshape(-1)
    var = np.asarray(norm.variance, dtype=np.float64).reshape(-1)
    feat = int(inp.shape[-1])
    if mean.size not in (1, feat) or var.size != mean.size:
        return model, None
    std = np.maximum(np.sqrt(var), 1e-7)  # as tf_keras: max(sqrt(variance), epsilon)
    scale = 1.0 / std
    offset = -mean / std

    def clone(layer: Any) -> Any:
        if layer is norm:
            return keras.layers.Activation("linear", name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    core = keras.models.clone_model(model, clone_function=clone)
    by_name = {layer.name: layer for layer in model.layers}
    for layer in core.layers:
        src = by_name.get(layer.name)
        if src is not None and src is not norm and src.get_weights():
            layer.set_weights(src.get_weights())
    pre = {
        "type": "affine",
        "scale": [float(v) for v in scale] if scale.size > 1 else float(scale[0]),
        "offset": [float(v) for v in offset] if offset.size > 1 else float(offset[0]),
    }
    return core, pre


def apply_preprocessing(x: np.ndarray, pre: dict[str, Any] | None) -> np.ndarray:
    """Apply a manifest preprocessing step to raw inputs, exactly as device_agent.inference does."""
    if not pre or pre.get("type") == "none":
        return x
    scale = np.asarray(pre["scale"], dtype=np.float32)
    offset = np.asarray(pre["offset"], dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) * scale + offset).astype(np.float32)
