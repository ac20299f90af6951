"""Load and validate hardware target profiles (``targets/*.toml``); adding a target adds no code."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.formats.manifest import DType, ModelFormat, RuntimeName
from toolchain.errors import ToolchainError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_TARGETS = Path(__file__).resolve().parent.parent / "targets"
ENV_TARGETS = "EDGEFLEET_TARGETS"


class TargetError(ToolchainError):
    """A target profile is unknown or invalid."""


@dataclass(frozen=True)
class Quantization:
    """Quantization scheme of a target: ``int8`` weights and activations, and the I/O dtypes."""

    scheme: str
    input_dtype: DType
    output_dtype: DType

    @property
    def full_integer(self) -> bool:
        """True when inputs and outputs are integer too (no float tensor at all)."""
        return self.input_dtype != DType.FLOAT32 and self.output_dtype != DType.FLOAT32


@dataclass(frozen=True)
class Limits:
    """What a target tolerates: model size in bytes and accuracy drop vs float (absolute, 0.01 = 1 point)."""

    max_model_bytes: int
    max_accuracy_drop: float


@dataclass(frozen=True)
class EdgeTPU:
    """Edge TPU constraints: the compiler, static shapes, on-chip memory and op -> max version table."""

    compiler: str
    static_batch: bool
    max_on_chip_bytes: int
    supported_ops: Mapping[str, int]  # builtin op name -> highest version the compiler accepts (0 = any)


@dataclass(frozen=True)
class Budget:
    """A device's budget (``[budget]``, every key optional): the build fails a target over any of them.

    ``max_model_bytes`` (model file), ``max_arena_bytes`` (peak tensor memory, see
    ``toolchain.steps.budget``), ``max_latency_ms`` (p95, batch 1, the target's threads),
    ``min_edgetpu_op_share`` (0..1 of the ops mapped to the Edge TPU; ``[edgetpu]`` profiles only).
    """

    max_model_bytes: int | None = None
    max_arena_bytes: int | None = None
    max_latency_ms: float | None = None
    min_edgetpu_op_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_model_bytes": self.max_model_bytes,
            "max_arena_bytes": self.max_arena_bytes,
            "max_latency_ms": self.max_latency_ms,
            "min_edgetpu_op_share": self.min_edgetpu_op_share,
        }


BUDGET_KEYS = ("max_model_bytes", "max_arena_bytes", "max_latency_ms", "min_edgetpu_op_share")


@dataclass(frozen=True)
class Target:
    """A hardware target profile."""

    name: str
    description: str
    format: ModelFormat
    runtimes: tuple[RuntimeName, ...]
    threads: int
    quantization: Quantization
    limits: Limits
    edgetpu: EdgeTPU | None = None
    path: Path | None = field(default=None, compare=False)
    budget: Budget | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "format": self.format.value,
            "runtimes": [r.value for r in self.runtimes],
            "threads": self.threads,
            "quantization": {
                "scheme": self.quantization.scheme,
                "input_dtype": self.quantization.input_dtype.value,
                "output_dtype": self.quantization.output_dtype.value,
            },
            "limits": {
                "max_model_bytes": self.limits.max_model_bytes,
                "max_accuracy_drop": self.limits.max_accuracy_drop,
            },
            "edgetpu": None,
            "budget": self.budget.to_dict() if self.budget else None,
            "path": str(self.path) if self.path else None,
        }
        if self.edgetpu:
            d["edgetpu"] = {
                "compiler": self.edgetpu.compiler,
                "static_batch": self.edgetpu.static_batch,
                "max_on_chip_bytes": self.edgetpu.max_on_chip_bytes,
                "supported_ops": dict(self.edgetpu.supported_ops),
            }
        return d


def target_dirs() -> list[Path]:
    """Return the folders searched for profiles: $EDGEFLEET_TARGETS (os.pathsep-separated), ./targets, the shipped ones."""
    dirs: list[Path] = []
    env = os.environ.get(ENV_TARGETS)
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    cwd = Path.cwd() / "targets"
    if cwd.is_dir():
        dirs.append(cwd)
    dirs.append(REPO_TARGETS)
    seen: list[Path] = []
    for d in dirs:
        if d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def _keys(d: Any, required: set[str], optional: set[str], where: str) -> None:
    from device_agent.formats.strict import check_keys

    check_keys(
        d,
        sorted(required),
        sorted(optional),
        where,
        error=TargetError,
        unknown="{where}: unknown key(s) {extra}; allowed: {allowed}",
        missing="{where}: missing key(s) {missing}",
        not_mapping="{where} must be a table",
    )


def _enum(cls: Any, value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise TargetError(
            f"{where}: {value!r} is unknown. Known: {', '.join(m.value for m in cls)}"
        ) from None


def parse_target(doc: Mapping[str, Any], path: Path | None = None) -> Target:
    """Validate one profile document strictly (unknown keys are errors)."""
    where = str(path) if path else "target"
    _keys(
        doc,
        {"name", "format", "runtimes", "quantization", "limits"},
        {"description", "threads", "edgetpu", "budget"},
        where,
    )
    name = doc["name"]
    if (
        not isinstance(name, str)
        or not name
        or not all(c.isalnum() or c in "-_" for c in name)
        or name != name.lower()
    ):
        raise TargetError(f"{where}: name {name!r} must be lowercase letters, digits, '-' or '_'")
    if path is not None and path.stem != name:
        raise TargetError(f"{where}: name {name!r} must equal the file name {path.stem!r}")
    fmt = _enum(ModelFormat, doc["format"], f"{where}: format")
    if not isinstance(doc["runtimes"], list) or not doc["runtimes"]:
        raise TargetError(f"{where}: runtimes must be a non-empty list")
    runtimes = tuple(_enum(RuntimeName, r, f"{where}: runtimes") for r in doc["runtimes"])
    if fmt == ModelFormat.ONNX and RuntimeName.LITERT in runtimes:
        raise TargetError(f"{where}: LiteRT cannot run ONNX models; use onnxruntime or openvino")
    if fmt == ModelFormat.TFLITE and RuntimeName.ONNXRUNTIME in runtimes:
        raise TargetError(f"{where}: ONNX Runtime cannot run .tflite models; use litert or openvino")
    threads = doc.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise TargetError(f"{where}: threads must be a positive integer, got {threads!r}")
    q = doc["quantization"]
    _keys(q, {"scheme", "input_dtype", "output_dtype"}, set(), f"{where}: [quantization]")
    if q["scheme"] != "int8":
        raise TargetError(f"{where}: [quantization] scheme {q['scheme']!r} is unknown. Known: int8")
    io_dtypes = {DType.FLOAT32, DType.INT8, DType.UINT8}
    quant = Quantization(
        "int8",
        _enum(DType, q["input_dtype"], f"{where}: [quantization] input_dtype"),
        _enum(DType, q["output_dtype"], f"{where}: [quantization] output_dtype"),
    )
    if quant.input_dtype not in io_dtypes or quant.output_dtype not in io_dtypes:
        raise TargetError(f"{where}: [quantization] I/O dtypes must be float32, int8 or uint8")
    if fmt == ModelFormat.ONNX and (
        quant.input_dtype != DType.FLOAT32 or quant.output_dtype != DType.FLOAT32
    ):
        raise TargetError(
            f"{where}: ONNX QDQ targets keep float32 I/O; set input_dtype/output_dtype = 'float32'"
        )
    lim = doc["limits"]
    _keys(lim, {"max_model_bytes", "max_accuracy_drop"}, set(), f"{where}: [limits]")
    if not isinstance(lim["max_model_bytes"], int) or lim["max_model_bytes"] <= 0:
        raise TargetError(f"{where}: [limits] max_model_bytes must be a positive integer")
    drop = lim["max_accuracy_drop"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 1:
        raise TargetError(
            f"{where}: [limits] max_accuracy_drop must be in [0, 1] (0.01 = 1 point), got {drop!r}"
        )
    limits = Limits(int(lim["max_model_bytes"]), float(drop))
    etpu = None
    if "edgetpu" in doc:
        e = doc["edgetpu"]
        _keys(e, {"compiler", "supported_ops"}, {"static_batch", "max_on_chip_bytes"}, f"{where}: [edgetpu]")
        if fmt != ModelFormat.TFLITE or not quant.full_integer:
            raise TargetError(
                f"{where}: [edgetpu] needs format 'tflite' with integer input and output dtypes"
            )
        ops = e["supported_ops"]
        if isinstance(ops, list):
            ops = {str(o): 0 for o in ops}
        if (
            not isinstance(ops, Mapping)
            or not ops
            or not all(isinstance(v, int) and v >= 0 for v in ops.values())
        ):
            raise TargetError(
                f"{where}: [edgetpu] supported_ops must be a list of op names or a table op = max_version"
            )
        etpu = EdgeTPU(
            compiler=str(e["compiler"]),
            static_batch=bool(e.get("static_batch", True)),
            max_on_chip_bytes=int(e.get("max_on_chip_bytes", 8_000_000)),
            supported_ops={str(k).upper(): int(v) for k, v in ops.items()},
        )
    budget = _budget(doc["budget"], etpu is not None, where) if "budget" in doc else None
    desc = doc.get("description", "")
    if not isinstance(desc, str):
        raise TargetError(f"{where}: description must be a string")
    return Target(name, desc, fmt, runtimes, threads, quant, limits, etpu, path, budget)


def _budget(b: Any, has_edgetpu: bool, where: str) -> Budget:
    """Validate ``[budget]``: known keys only, positive sizes and latency, a share in (0, 1]."""
    where = f"{where}: [budget]"
    _keys(b, set(), set(BUDGET_KEYS), where)
    for key in ("max_model_bytes", "max_arena_bytes"):
        v = b.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise TargetError(f"{where} {key} must be a positive integer (bytes), got {v!r}")
    lat = b.get("max_latency_ms")
    if lat is not None and (
        isinstance(lat, bool) or not isinstance(lat, (int, float)) or not 0 < lat < float("inf")
    ):
        raise TargetError(
            f"{where} max_latency_ms must be a positive number (milliseconds, p95), got {lat!r}"
        )
    share = b.get("min_edgetpu_op_share")
    if share is not None:
        if not has_edgetpu:
            raise TargetError(f"{where} min_edgetpu_op_share needs an [edgetpu] table in the same profile")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise TargetError(
                f"{where} min_edgetpu_op_share must be in (0, 1] (0.9 = 90% of ops on the Edge TPU), got {share!r}"
            )
    return Budget(
        max_model_bytes=b.get("max_model_bytes"),
        max_arena_bytes=b.get("max_arena_bytes"),
        max_latency_ms=float(lat) if lat is not None else None,
        min_edgetpu_op_share=float(share) if share is not None else None,
    )


def load_target_file(path: Path) -> Target:
    """Read and validate one profile file."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror})") from None
    return parse_target(doc, path)


def list_targets() -> dict[str, Target]:
    """Return every profile found, by name (earlier folders win)."""
    found: dict[str, Target] = {}
    for d in target_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.toml")):
            if p.stem not in found:
                found[p.stem] = load_target_file(p)
    return found


def load_target(name: str) -> Target:
    """Return the named profile or raise with the list of known ones."""
    targets = list_targets()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise TargetError(f"unknown target {name!r}. Known: {known}. See 'edgefleet targets list'.")
    return targets[name]


def resolve_targets(names: list[str]) -> list[Target]:
    """Expand ``all`` and de-duplicate, keeping order."""
    if not names:
        raise TargetError("no target given; use --target NAME (repeatable) or --target all")
    if "all" in names:
        return [list_targets()[n] for n in sorted(list_targets())]
    out: list[Target] = []
    for n in names:
        t = load_target(n)
        if t not in out:
            out.append(t)
    return out
