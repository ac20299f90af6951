"""The bundle format: manifest schema, strict loading, verification and signatures.

A bundle is a directory::

    manifest.json      this schema (integer ``schema``); lists every other file with sha256 and size
    manifest.sig       optional Ed25519 signature over the exact bytes of manifest.json
    model.tflite | model.onnx, model_edgetpu.tflite (coral, when compiled), baseline.json, labels.txt

The device consumes bundles, so the device side owns the format; the host imports it from here.
The bundle never chooses how it is verified: keys, target and version floor come from the caller.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError
from device_agent.formats.strict import check_keys

# Schema 2 adds ``model.precision``; schema-1 manifests are still read (their precision is f32,
# what the build verified them in).
MANIFEST_SCHEMA = 2
READ_MANIFEST_SCHEMAS = (1, 2)
# Manifest keys a reader accepts when absent (added after schema 2 without a bump; old meaning kept).
OPTIONAL_KEYS = {"input_layout", "task"}
# What the model does. Absent ``task`` means classification (every manifest before issue 15).
TASKS = ("classification", "regression", "anomaly")
# Image layouts ``input_layout`` names: batch, channels, height, width.
LAYOUTS = ("NCHW", "NHWC")
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
# Written by ``edgefleet profile`` beside the signed files: measurements, not part of the bundle. It
# is neither listed nor signed, never copied to devices (flash, serve and the updater send the
# listed files only), and never read by the agent; verification tolerates it so a profiled bundle
# still verifies.
DEVICE_PROFILE_FILE = "device_profile.json"
MANIFEST_MAX_BYTES = 1 << 20
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HASH_CHUNK_BYTES = 1 << 20


class BundleError(AgentError):
    """A bundle is malformed, altered, unsigned, or not meant for this device."""


class ModelFormat(str, Enum):
    """Artifact formats a bundle can carry."""

    TFLITE = "tflite"
    ONNX = "onnx"


class RuntimeName(str, Enum):
    """Runtimes the agent can execute a model with."""

    LITERT = "litert"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Precision(str, Enum):
    """The inference precision a bundle was verified in, pinned in runtimes that choose one per
    machine (OpenVINO's ``INFERENCE_PRECISION_HINT``; bf16 is its default on AVX512-BF16/AMX CPUs)."""

    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"


class DType(str, Enum):
    """Tensor dtypes at a model's boundary."""

    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"
    INT32 = "int32"
    INT64 = "int64"


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the runtime sees it. ``-1`` in ``shape`` is a dynamic axis."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    quantization: Quantization | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.value,
            "quantization": asdict(self.quantization) if self.quantization else None,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        _keys(d, {"name", "shape", "dtype", "quantization"}, where)
        shape = d["shape"]
        if not isinstance(shape, list) or not all(_is_int(v) and v >= -1 for v in shape):
            raise BundleError(f"{where}.shape must be a list of integers (-1 for dynamic), got {shape!r}")
        q = d["quantization"]
        quant = None
        if q is not None:
            _keys(q, {"scale", "zero_point"}, f"{where}.quantization")
            if not _is_num(q["scale"]) or q["scale"] <= 0 or not _is_int(q["zero_point"]):
                raise BundleError(f"{where}.quantization needs a positive scale and an integer zero_point")
            quant = Quantization(float(q["scale"]), int(q["zero_point"]))
        return cls(str(d["name"]), tuple(shape), _enum(DType, d["dtype"], f"{where}.dtype"), quant)


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle with its sha256 (hex) and size."""

    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ModelEntry:
    """The model file, its format, and runtimes in order of preference.

    ``accelerated_path`` is an optional variant for an accelerator (the Edge TPU-compiled model);
    the agent falls back to ``path`` when the accelerator is absent. ``precision`` is what the
    runtimes compute in (pinned where a runtime would otherwise choose per machine).
    """

    path: str
    format: ModelFormat
    runtimes: tuple[RuntimeName, ...]
    accelerated_path: str | None = None
    precision: Precision = Precision.F32


@dataclass
class Manifest:
    """``manifest.json``: what the bundle holds and how to run it."""

    name: str
    version: int
    target: str
    created_at: str
    files: list[FileEntry]
    model: ModelEntry
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str]
    preprocessing: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    baseline: str = "baseline.json"
    metrics: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    edgetpu: dict[str, Any] | None = None
    schema: int = MANIFEST_SCHEMA
    # Optional (absent in older manifests, which mean "feed the model's own layout"): the image layout
    # the caller sends and the one the model file takes, e.g. {"caller": "NCHW", "model": "NCHW"}.
    input_layout: dict[str, str] | None = None
    # Optional: ``{"type": one of TASKS, ...}`` with the task's own keys (see ``check_task``).
    task: dict[str, Any] | None = None

    @property
    def task_type(self) -> str:
        """``classification``, ``regression`` or ``anomaly`` (absent ``task`` is classification)."""
        return "classification" if self.task is None else str(self.task["type"])

    @property
    def anomaly_threshold(self) -> float | None:
        """The score above which a sample is an anomaly (anomaly bundles only; None otherwise)."""
        return (
            float(self.task["threshold"]) if self.task is not None and self.task_type == "anomaly" else None
        )

    def to_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {
            "path": self.model.path,
            "format": self.model.format.value,
            "runtimes": [r.value for r in self.model.runtimes],
            "accelerated_path": self.model.accelerated_path,
        }
        if self.schema >= 2:
            model["precision"] = self.model.precision.value
        d: dict[str, Any] = {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "created_at": self.created_at,
            "files": [asdict(f) for f in self.files],
            "model": model,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "labels": list(self.labels),
            "preprocessing": self.preprocessing,
            "baseline": self.baseline,
            "metrics": self.metrics,
            "threads": self.threads,
            "edgetpu": self.edgetpu,
        }
        if self.input_layout is not None:
            d["input_layout"] = dict(self.input_layout)
        if self.task is not None:
            d["task"] = dict(self.task)
        return d

    def to_bytes(self) -> bytes:
        """Return the canonical bytes written to ``manifest.json`` (and signed)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n").encode()

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validate a parsed manifest strictly: known keys, types, safe paths."""
        if not isinstance(d, Mapping):
            raise BundleError("manifest.json must hold a JSON object")
        schema = d.get("schema")
        if not _is_int(schema) or schema not in READ_MANIFEST_SCHEMAS:
            known = ", ".join(str(v) for v in READ_MANIFEST_SCHEMAS)
            raise BundleError(
                f"manifest schema {schema!r} is not supported (this agent reads schemas {known});"
                " update the agent, or rebuild the bundle with a matching edgefleet"
            )
        check_keys(
            d,
            sorted(set(cls.__dataclass_fields__) - OPTIONAL_KEYS),
            OPTIONAL_KEYS,
            "manifest",
            error=BundleError,
        )
        name = d["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BundleError(f"manifest name {name!r} must match {NAME_RE.pattern}")
        if not _is_int(d["version"]) or d["version"] < 1:
            raise BundleError(f"manifest version must be a positive integer, got {d['version']!r}")
        if not isinstance(d["target"], str) or not NAME_RE.match(d["target"]):
            raise BundleError(f"manifest target {d['target']!r} is not a valid target name")
        files = []
        if not isinstance(d["files"], list) or not d["files"]:
            raise BundleError("manifest.files must be a non-empty list")
        for i, f in enumerate(d["files"]):
            _keys(f, {"path", "sha256", "size_bytes"}, f"files[{i}]")
            check_relpath(f["path"])
            if not isinstance(f["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
                raise BundleError(f"files[{i}].sha256 must be 64 lowercase hex digits")
            if not _is_int(f["size_bytes"]) or f["size_bytes"] < 0:
                raise BundleError(f"files[{i}].size_bytes must be a non-negative integer")
            files.append(FileEntry(f["path"], f["sha256"], int(f["size_bytes"])))
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise BundleError("manifest.files lists a path twice")
        m = d["model"]
        model_keys = {"path", "format", "runtimes", "accelerated_path"}
        _keys(m, model_keys | ({"precision"} if schema >= 2 else set()), "model")
        if m["path"] not in paths:
            raise BundleError(f"model.path {m['path']!r} is not listed in manifest.files")
        if m["accelerated_path"] is not None and m["accelerated_path"] not in paths:
            raise BundleError(
                f"model.accelerated_path {m['accelerated_path']!r} is not listed in manifest.files"
            )
        if not isinstance(m["runtimes"], list) or not m["runtimes"]:
            raise BundleError("model.runtimes must be a non-empty list")
        model = ModelEntry(
            m["path"],
            _enum(ModelFormat, m["format"], "model.format"),
            tuple(_enum(RuntimeName, r, "model.runtimes") for r in m["runtimes"]),
            m["accelerated_path"],
            _enum(Precision, m["precision"], "model.precision") if schema >= 2 else Precision.F32,
        )
        if d["baseline"] not in paths:
            raise BundleError(f"baseline {d['baseline']!r} is not listed in manifest.files")
        for k in ("inputs", "outputs"):
            if not isinstance(d[k], list) or len(d[k]) != 1:
                raise BundleError(
                    f"manifest.{k} must list exactly one tensor (multi-tensor models are not supported)"
                )
        labels = d["labels"]
        if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
            raise BundleError("manifest.labels must be a list of strings")
        if not _is_int(d["threads"]) or d["threads"] < 1:
            raise BundleError("manifest.threads must be a positive integer")
        for k in ("preprocessing", "metrics"):
            if not isinstance(d[k], Mapping):
                raise BundleError(f"manifest.{k} must be an object")
        check_preprocessing(d["preprocessing"])
        layout = d.get("input_layout")
        if layout is not None:
            check_input_layout(layout)
        task = d.get("task")
        if task is not None:
            check_task(task)
            if "scale" in task and len(task["scale"]) != len(labels):
                raise BundleError(
                    f"manifest task.scale has {len(task['scale'])} numbers for {len(labels)} labels (targets)"
                )
            if task["type"] == "anomaly" and list(labels) != list(ANOMALY_LABELS):
                raise BundleError(
                    f"an anomaly bundle's labels are {list(ANOMALY_LABELS)}, not {list(labels)[:5]}"
                )
        return cls(
            name=name,
            version=int(d["version"]),
            target=d["target"],
            created_at=str(d["created_at"]),
            files=files,
            model=model,
            inputs=[TensorSpec.from_dict(t, f"inputs[{i}]") for i, t in enumerate(d["inputs"])],
            outputs=[TensorSpec.from_dict(t, f"outputs[{i}]") for i, t in enumerate(d["outputs"])],
            labels=list(labels),
            preprocessing=dict(d["preprocessing"]),
            baseline=d["baseline"],
            metrics=dict(d["metrics"]),
            threads=int(d["threads"]),
            edgetpu=d["edgetpu"],
            schema=int(schema),
            input_layout=dict(layout) if layout is not None else None,
            task=dict(task) if task is not None else None,
        )

    def file(self, path: str) -> FileEntry:
        """Return the entry for ``path``."""
        for f in self.files:
            if f.path == path:
                return f
        raise BundleError(f"{path!r} is not listed in the manifest")


def check_input_layout(layout: Any) -> None:
    """Validate ``input_layout``: ``{"caller": L, "model": L}`` with L one of ``LAYOUTS``."""
    _keys(layout, {"caller", "model"}, "input_layout")
    for k in ("caller", "model"):
        if layout[k] not in LAYOUTS:
            raise BundleError(f"input_layout.{k} {layout[k]!r} is unknown. Known: {', '.join(LAYOUTS)}")


def check_task(task: Any) -> None:
    """Validate ``task``: an object whose ``type`` is one of ``TASKS``.

    Each task's own keys are checked by the function for that type in ``TASK_CHECKS``; a task
    without one takes ``type`` alone.
    """
    if not isinstance(task, Mapping):
        raise BundleError("manifest.task must be an object with a 'type'")
    kind = task.get("type")
    if kind not in TASKS:
        raise BundleError(f"manifest task.type {kind!r} is unknown. Known: {', '.join(TASKS)}")
    check = TASK_CHECKS.get(str(kind))
    if check is None:
        _keys(task, {"type"}, "task")
    else:
        check(task)


def check_regression_task(task: Mapping[str, Any]) -> None:
    """Validate a regression task: ``{"type", "scale", "offset"}``, one finite number per target each.

    The model's outputs are standardised targets; the agent returns ``output * scale + offset``
    (the values in the user's units). ``scale`` must be non-zero.
    """
    _keys(task, {"type", "scale", "offset"}, "task")
    for k in ("scale", "offset"):
        v = task[k]
        if (
            not isinstance(v, list)
            or not v
            or not all(type(x) in (int, float) and math.isfinite(x) for x in v)
        ):
            raise BundleError(
                f"manifest task.{k} must be a non-empty list of finite numbers (one per target)"
            )
    if len(task["scale"]) != len(task["offset"]):
        raise BundleError("manifest task.scale and task.offset must have one number per target each")
    if any(x == 0 for x in task["scale"]):
        raise BundleError("manifest task.scale must not hold 0")


# Anomaly bundles (issue 15): their two labels, and the scores the model may compute.
ANOMALY_LABELS = ("normal", "anomaly")
ANOMALY_SCORES = ("reconstruction_mse",)


def check_anomaly_task(task: Mapping[str, Any]) -> None:
    """Validate an anomaly task: ``{"type": "anomaly", "score": ..., "threshold": t, "threshold_percentile": p}``.

    The model outputs one score per sample (``score`` names how it is computed); the agent labels a
    sample ``anomaly`` when its score is above ``threshold`` (finite, >= 0), which the build picked
    as the ``threshold_percentile``-th percentile (0 < p < 100) of normal samples' scores.
    """
    _keys(task, {"type", "score", "threshold", "threshold_percentile"}, "task")
    if task["score"] not in ANOMALY_SCORES:
        raise BundleError(
            f"manifest task.score {task['score']!r} is unknown. Known: {', '.join(ANOMALY_SCORES)}"
        )
    if not _is_num(task["threshold"]) or task["threshold"] < 0:
        raise BundleError(f"manifest task.threshold {task['threshold']!r} must be a finite number >= 0")
    p = task["threshold_percentile"]
    if not _is_num(p) or not 0 < p < 100:
        raise BundleError(f"manifest task.threshold_percentile {p!r} must be between 0 and 100")


# Per-task validation of ``manifest.task`` beyond its ``type``: one function per task with keys.
TASK_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "regression": check_regression_task,
    "anomaly": check_anomaly_task,
}


def check_preprocessing(pre: Mapping[str, Any]) -> None:
    """Validate the declared preprocessing: ``none`` or ``affine`` (``x * scale + offset``)."""
    kind = pre.get("type")
    if kind == "none":
        _keys(pre, {"type"}, "preprocessing")
    elif kind == "affine":
        _keys(pre, {"type", "scale", "offset"}, "preprocessing")
        for k in ("scale", "offset"):
            v = pre[k]
            vals = v if isinstance(v, list) else [v]
            if not vals or not all(_is_num(x) for x in vals):
                raise BundleError(f"preprocessing.{k} must be a finite number or a list of them")
    else:
        raise BundleError(f"preprocessing.type {kind!r} is unknown; use 'none' or 'affine'")


def check_relpath(path: Any) -> None:
    """Refuse paths that could escape the bundle directory."""
    if not isinstance(path, str) or not path or len(path) > 255:
        raise BundleError(f"bundle file path {path!r} is not a non-empty string")
    if path.startswith(("/", "\\")) or ":" in path or "\\" in path or "\x00" in path:
        raise BundleError(f"bundle file path {path!r} must be relative")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"bundle file path {path!r} must not contain '..', '.' or empty parts")
    if path in (MANIFEST_FILE, SIGNATURE_FILE, DEVICE_PROFILE_FILE):
        raise BundleError(f"bundle file path {path!r} is reserved")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> FileEntry:
    """Hash one file of a bundle being written."""
    p = root / rel
    return FileEntry(rel, sha256_file(p), p.stat().st_size)


def read_manifest_bytes(bundle_dir: Path) -> bytes:
    """Read manifest.json with a size cap, refusing symlinks."""
    p = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(
            f"bundle {str(bundle_dir)!r} is not a directory; pass the folder that holds manifest.json"
        )
    if p.is_symlink() or not p.is_file():
        raise BundleError(
            f"no manifest.json in {str(bundle_dir)!r}; is this a bundle built by 'edgefleet build'?"
        )
    if p.stat().st_size > MANIFEST_MAX_BYTES:
        raise BundleError(f"manifest.json in {str(bundle_dir)!r} is larger than {MANIFEST_MAX_BYTES} bytes")
    return p.read_bytes()


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise BundleError(f"manifest.json is not valid JSON ({e}); rebuild the bundle") from None
    return Manifest.from_dict(doc)


def load_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Load and validate a bundle's manifest (no file hashing; see ``verify_bundle``)."""
    return parse_manifest(read_manifest_bytes(Path(bundle_dir)))


@dataclass(frozen=True)
class VerifyPolicy:
    """What the device (not the bundle) decides about accepting a bundle."""

    trusted_keys: tuple[bytes, ...] = ()  # raw 32-byte Ed25519 public keys
    allow_unsigned: bool = False
    target: str | None = None
    min_version_exclusive: int | None = None
    max_bytes: int | None = None


def check_manifest_policy(
    raw: bytes, sig: bytes | None, policy: VerifyPolicy, source: str = "bundle"
) -> Manifest:
    """Apply the device's policy to manifest bytes alone; return the parsed manifest.

    Checks the signature (when keys are trusted), schema, target, anti-rollback version floor and
    total size cap: everything that can be decided before any model file is read or downloaded.
    """
    if policy.trusted_keys:
        if sig is None:
            raise BundleError(
                f"{source} is unsigned but this device trusts signing keys; sign it with"
                " 'edgefleet build --sign-key KEY'"
            )
        verify_signature(raw, sig, policy.trusted_keys)
    elif not policy.allow_unsigned:
        raise BundleError(
            "no trusted key is configured and allow_unsigned is false; set [agent] trusted_keys"
        )
    manifest = parse_manifest(raw)
    if policy.target is not None and manifest.target != policy.target:
        raise BundleError(f"bundle is built for target {manifest.target!r}, this device is {policy.target!r}")
    if policy.min_version_exclusive is not None and manifest.version <= policy.min_version_exclusive:
        raise BundleError(
            f"bundle version {manifest.version} is not newer than the active version {policy.min_version_exclusive};"
            " to roll back, re-sign the old model under a higher --version"
        )
    total = sum(f.size_bytes for f in manifest.files)
    if policy.max_bytes is not None and total > policy.max_bytes:
        raise BundleError(f"bundle holds {total} bytes, more than the cap of {policy.max_bytes}")
    return manifest


def verify_bundle(bundle_dir: str | os.PathLike[str], policy: VerifyPolicy | None = None) -> Manifest:
    """Verify a bundle completely and return its manifest.

    Checks, in order: manifest size and schema, the signature (when keys are trusted), target,
    anti-rollback version floor, total size cap, then every file: a regular file (no symlink) inside
    the bundle with the listed size and sha256, and no file that the manifest does not list (but
    ``DEVICE_PROFILE_FILE``, an unsigned record of measurements the agent never reads).
    """
    policy = policy or VerifyPolicy(allow_unsigned=True)
    root = Path(bundle_dir)
    raw = read_manifest_bytes(root)
    sig_path = root / SIGNATURE_FILE
    sig = None
    if not sig_path.is_symlink() and sig_path.is_file():
        sig = sig_path.read_bytes()[:4096]
    manifest = check_manifest_policy(raw, sig, policy, f"bundle {str(root)!r}")
    listed = {f.path for f in manifest.files}
    allowed = listed | {MANIFEST_FILE, SIGNATURE_FILE, DEVICE_PROFILE_FILE}
    for p in _walk(root):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise BundleError(f"bundle file {rel!r} is a symlink; bundles hold regular files only")
        if p.is_file() and rel not in allowed:
            raise BundleError(f"bundle holds {rel!r}, which the manifest does not list; rebuild the bundle")
    resolved_root = root.resolve()
    for f in manifest.files:
        p = root / f.path
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"bundle file {f.path!r} is missing or not a regular file")
        if resolved_root not in p.resolve().parents:
            raise BundleError(f"bundle file {f.path!r} escapes the bundle directory")
        size = p.stat().st_size
        if size != f.size_bytes:
            raise BundleError(f"bundle file {f.path!r} has {size} bytes, the manifest says {f.size_bytes}")
        digest = sha256_file(p)
        if digest != f.sha256:
            raise BundleError(
                f"bundle file {f.path!r} has sha256 {digest[:12]}..., the manifest says {f.sha256[:12]}..."
            )
    return manifest


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in dirnames:
            if (d / name).is_symlink():
                yield d / name
        for name in filenames:
            yield d / name


def manifest_sha256(bundle_dir: str | os.PathLike[str]) -> str:
    """Return the sha256 of manifest.json: the identity of a bundle (it pins every file's hash)."""
    return hashlib.sha256(read_manifest_bytes(Path(bundle_dir))).hexdigest()


# --------------------------------------------------------------------------------------------------
# Signatures: Ed25519 over the exact bytes of manifest.json.


def key_id(public_raw: bytes) -> str:
    """Return a short, stable id of a raw Ed25519 public key (first 16 hex of its sha256)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def sign_manifest(manifest_bytes: bytes, private_raw: bytes) -> bytes:
    """Return the ``manifest.sig`` document for manifest bytes and a raw 32-byte private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(private_raw)
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    doc = {
        "alg": "ed25519",
        "key_id": key_id(pub),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
    }
    return (json.dumps(doc) + "\n").encode()


def verify_signature(manifest_bytes: bytes, sig_doc: bytes, trusted_keys: Sequence[bytes]) -> str:
    """Check ``manifest.sig`` against the trusted raw public keys; return the key id that signed."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        doc = json.loads(sig_doc.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("alg") != "ed25519":
            raise ValueError("alg")
        sig = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BundleError(
            "manifest.sig is malformed; re-sign the bundle with 'edgefleet build --sign-key'"
        ) from None
    for pub in trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(sig, manifest_bytes)
            return key_id(pub)
        except InvalidSignature:
            continue
    raise BundleError(
        f"bundle signature (key {str(doc.get('key_id'))[:16]!r}) does not verify with any trusted key; "
        "sign with a key listed in [agent] trusted_keys"
    )


# --------------------------------------------------------------------------------------------------


def _keys(d: Any, want: set[str], where: str) -> None:
    check_keys(d, sorted(want), (), where, error=BundleError)


def _enum(cls: type[Enum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(m.value for m in cls)
        raise BundleError(f"{where} {value!r} is unknown. Known: {known}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
