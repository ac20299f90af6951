"""The typed records the build's steps pass along: the options, the build context, one target's result.

``build_bundles`` (toolchain.build) makes one ``BuildContext`` from the user's ``BuildOptions`` and the
loaded inputs, fills in the float model's figures (``toolchain.steps.reference``), then runs every
target through the steps of ``toolchain.steps.target``, each writing its part of a ``TargetResult``.
``report.json`` is written from these records (``BuildContext.report``, ``TargetResult.to_dict``);
their keys are what docs/cli.md documents, and a test holds them to the report built before these
types existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import ModelFormat
from toolchain.errors import ToolchainError
from toolchain.report import REPORT_SCHEMA
from toolchain.steps.data import Dataset
from toolchain.steps.models import LoadedModel
from toolchain.steps.per_class import DEFAULT_MAX_CLASS_DROP_POINTS
from toolchain.targets import Target

QUANTIZE_MODES = ("ptq", "qat")


def finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively; numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass(frozen=True)
class BuildOptions:
    """What the user chose for the whole build (``edgefleet build`` flags)."""

    quantize: str = "ptq"
    prune: float | None = None
    cluster: int | None = None
    version: int = 1
    sign_key: Path | None = None
    allow_accuracy_drop: bool = False
    progress: bool = True
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP_POINTS
    # ONNX targets: try the int8 forms and ship the fastest that keeps accuracy (toolchain.steps.int8_forms)
    int8_search: bool = True

    @property
    def qat(self) -> bool:
        """True when the model is fine-tuned quantization-aware (``--quantize qat``)."""
        return self.quantize == "qat"

    def check(self) -> None:
        """Raise ToolchainError (one line, naming the flag) for an option out of range."""
        if self.quantize not in QUANTIZE_MODES:
            raise ToolchainError(
                f"--quantize {self.quantize!r} is unknown. Known: {', '.join(QUANTIZE_MODES)}"
            )
        if self.prune is not None and not 0 < self.prune < 1:
            raise ToolchainError(
                f"--prune {self.prune} must be between 0 and 1 (0.5 prunes half the weights)"
            )
        if self.cluster is not None:
            from toolchain.steps.cluster import check_clusters

            check_clusters(self.cluster)
        v = self.version
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ToolchainError(f"--version {v!r} must be a positive integer")
        points = self.max_class_drop
        if isinstance(points, bool) or not isinstance(points, (int, float)) or not 0 <= points <= 100:
            raise ToolchainError(
                f"--max-class-drop {points!r} must be between 0 and 100 percentage points"
                " (100 turns the gate off)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the report's ``options`` section."""
        return {
            "quantize": self.quantize,
            "prune": self.prune,
            "cluster": self.cluster,
            "allow_accuracy_drop": self.allow_accuracy_drop,
            "max_class_drop": float(self.max_class_drop),
            "signed": self.sign_key is not None,
        }


def accuracy_tries(
    options: BuildOptions,
    *,
    float_accuracy: float | None = None,
    pruned_accuracy: float | None = None,
    class_label: str | None = None,
) -> str:
    """Return what to try when a target misses its accuracy budget (or a class its recall), given what
    this build already did: never "try --quantize qat" to a QAT build, and a lower ``--prune`` first
    when pruning alone cost accuracy (``float_accuracy``/``pruned_accuracy``, the float model's before
    and after pruning). ``class_label`` names the class whose recall dropped."""
    tries: list[str] = []
    if options.prune is not None:
        cost = ""
        if float_accuracy is not None and pruned_accuracy is not None:
            cost = f" (pruning alone took the float model from {float_accuracy:.4f} to {pruned_accuracy:.4f})"
        tries.append(f"a lower --prune than {options.prune:g}{cost}")
    if not options.qat:
        tries.append("--quantize qat")
    more = f"more samples of class {class_label!r}" if class_label is not None else "more samples"
    if options.qat:
        tries.append(f"{more} in --data (QAT fine-tunes on it)")
        tries.append("a model with more capacity (more filters or units)")
    else:
        tries.append(f"{more} in --data" if class_label is not None else "more representative --data")
    return "try " + ", ".join(tries[:-1]) + " or " + tries[-1] if len(tries) > 1 else "try " + tries[0]


@dataclass
class FloatReference:
    """The plain float32 model in one format: its file and sizes, and latencies measured beside artifacts.

    ``latency`` maps ``"runtime@threads"`` to a latency record (``toolchain.steps.latency``); it is a
    cache shared by the targets of that format, so each runtime and thread count is timed once.
    """

    format: ModelFormat
    path: Path
    size_bytes: int
    gzip_size_bytes: int
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the report's ``float.<format>`` section."""
        return {
            "size_bytes": self.size_bytes,
            "gzip_size_bytes": self.gzip_size_bytes,
            "latency": dict(sorted(self.latency.items())),
        }


@dataclass
class BuildContext:
    """Everything the steps share: the options, what was loaded, and the float model's figures.

    Filled in three stages: ``toolchain.steps.inputs`` (model, data, labels, destinations),
    ``toolchain.steps.reference`` (the model to convert, the float scores, the baseline, the float
    references), then read by every target's steps. ``calib``/``evald`` hold the data as the device
    receives it; ``model_calib``/``model_eval`` as the converted model takes it (the input normalisation
    folded out of the model applied, or the same data when nothing was folded).
    """

    options: BuildOptions
    targets: list[Target]
    name: str
    out: Path
    work: Path
    model_path: Path
    model: LoadedModel
    data: Dataset
    calib: Dataset
    evald: Dataset
    eval_note: str
    labels: list[str]
    labels_source: str
    created_at: str
    # set by toolchain.steps.reference
    model_calib: Dataset | None = None
    model_eval: Dataset | None = None
    float_eval: np.ndarray | None = None
    float_accuracy: float = 0.0
    float_classes: dict[str, Any] = field(default_factory=dict)
    pruned_accuracy: float | None = None
    prune_report: dict[str, Any] | None = None
    clustered_accuracy: float | None = None
    cluster_report: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    # The image layout the caller sends and the artifact takes (ONNX models only; see the manifest).
    input_layout: dict[str, str] | None = None
    source_model: Any = None
    deployed_eval: np.ndarray | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    float_refs: dict[ModelFormat, FloatReference] = field(default_factory=dict)
    # the model the float references were converted from (the int8 form search reuses the float ONNX
    # file when it is also ``source_model``)
    float_source: Any = None

    def report(self, results: dict[str, TargetResult], build_s: float) -> dict[str, Any]:
        """Return report.json's document for this build (before merging an earlier report)."""
        doc: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "name": self.name,
            "version": self.options.version,
            "created_at": self.created_at,
            "model": {
                "path": str(self.model_path),
                "kind": self.model.kind,
                "input_shape": list(self.model.input_shape),
                "outputs": self.model.n_outputs,
            },
            "data": {
                "path": self.data.source,
                "samples": self.data.n,
                "calibration_samples": self.calib.n,
                "eval": {"source": self.eval_note, "samples": self.evald.n},
            },
            "options": self.options.to_dict(),
            "labels": self.labels,
            "labels_source": self.labels_source,
            "float": self.float_report(),
            "targets": {name: r.to_dict() for name, r in results.items()},
        }
        if self.preprocessing is not None:
            doc["preprocessing"] = self.preprocessing
        if self.prune_report is not None:
            doc["prune"] = self.prune_report
        if self.cluster_report is not None:
            doc["cluster"] = self.cluster_report
        doc["build_s"] = build_s
        return doc

    def float_report(self) -> dict[str, Any]:
        """Return the report's ``float`` section: accuracy, per class, and each format's reference."""
        doc: dict[str, Any] = {"accuracy": self.float_accuracy, **self.float_classes}
        if self.pruned_accuracy is not None:
            doc["pruned_accuracy"] = self.pruned_accuracy
        if self.clustered_accuracy is not None:
            doc["clustered_accuracy"] = self.clustered_accuracy
        for fmt, ref in self.float_refs.items():
            doc[fmt.value] = ref.to_dict()
        return doc


@dataclass
class Measurement:
    """What converting, verifying and running one target's artifact measured, after the parity step.

    ``runtimes`` are the runtimes the manifest keeps, preferred first; accuracy and agreement are the
    kept runtimes' worst over the whole batch, one sample at a time and the agent's batch size.
    ``latency``/``float_latency`` map runtime -> ``{"threads_1": ..., "threads_N": ...}``.
    """

    accuracy: float
    accuracy_drop: float
    max_accuracy_drop: float
    size_bytes: int
    gzip_size_bytes: int
    size_ratio: float
    sparsity: float | None
    top1_agreement: float
    sqnr_db: float
    runtimes: list[str]
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    threads: int
    latency: dict[str, Any]
    float_latency: dict[str, Any]
    per_runtime: dict[str, dict[str, Any]]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    checks: dict[str, Any]
    runtimes_excluded: dict[str, str]
    parity_batch_sizes: list[int]
    precision: dict[str, Any]
    float_latency_ms_p50: float | None

    @property
    def preferred_runtime(self) -> str:
        """The runtime the device tries first (the fastest of the kept ones)."""
        return self.runtimes[0]

    def to_dict(self) -> dict[str, Any]:
        """Return the figures as report.json keys, in the report's order."""
        return {
            "accuracy": self.accuracy,
            "accuracy_drop": self.accuracy_drop,
            "max_accuracy_drop": self.max_accuracy_drop,
            "size_bytes": self.size_bytes,
            "gzip_size_bytes": self.gzip_size_bytes,
            "size_ratio": self.size_ratio,
            "sparsity": self.sparsity,
            "top1_agreement": self.top1_agreement,
            "sqnr_db": self.sqnr_db,
            "preferred_runtime": self.preferred_runtime,
            "runtimes": list(self.runtimes),
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p95": self.latency_ms_p95,
            "threads": self.threads,
            "latency": self.latency,
            "float_latency": self.float_latency,
            "per_runtime": self.per_runtime,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "checks": self.checks,
            "runtimes_excluded": self.runtimes_excluded,
            "parity_batch_sizes": self.parity_batch_sizes,
            "precision": self.precision,
            "float_latency_ms_p50": self.float_latency_ms_p50,
        }


@dataclass
class TargetResult:
    """One target's outcome: what each step measured, the gates' verdicts, and the bundle it left.

    The steps fill it in order; a target that fails keeps what was filled before the failure (parts
    still ``None`` are not written), ``status`` stays ``"failed"`` and ``error`` says why.
    ``to_dict`` gives the report.json entry, keys in the order the steps ran.
    """

    target: str
    format: str
    float_accuracy: float
    float_size_bytes: int
    float_gzip_size_bytes: int
    status: str = "failed"
    error: str | None = None
    bundle: str | None = None
    measured: Measurement | None = None
    # per-class metrics and the recall gate's figures (toolchain.steps.per_class.target_class_evaluation)
    classes: dict[str, Any] | None = None
    # the Edge TPU analysis and compile summary (coral-like targets only)
    edgetpu: dict[str, Any] | None = None
    # the int8 forms tried and the one shipped, with why (ONNX targets; toolchain.steps.int8_forms)
    int8_form_choice: dict[str, Any] | None = None
    # activation memory (toolchain.steps.budget.measure_arena: arena_bytes, arena_method, ...)
    arena: dict[str, Any] | None = None
    edgetpu_op_share: float | None = None
    warnings: list[str] = field(default_factory=list)
    accuracy_budget: str | None = None
    class_drop_budget: str | None = None
    budget: dict[str, Any] | None = None
    # sizes, ratios, unique weights per channel and OTA cost (toolchain.steps.cluster.compression_report)
    compression: dict[str, Any] | None = None
    bundle_action: str | None = None
    bundle_bytes: int | None = None
    build_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the report.json entry (JSON-ready: NaN/inf become null, numpy numbers plain)."""
        return finite(self.raw_dict())

    def raw_dict(self) -> dict[str, Any]:
        """Return the report.json entry with the values as measured (NaN stays NaN)."""
        doc: dict[str, Any] = {
            "status": self.status,
            "error": self.error,
            "bundle": self.bundle,
            "format": self.format,
            "float_accuracy": self.float_accuracy,
            "float_size_bytes": self.float_size_bytes,
            "float_gzip_size_bytes": self.float_gzip_size_bytes,
        }
        if self.measured is not None:
            doc.update(self.measured.to_dict())
        if self.int8_form_choice is not None:
            doc["int8_form_choice"] = self.int8_form_choice
        if self.classes is not None:
            doc.update(self.classes)
        if self.edgetpu is not None:
            doc["edgetpu"] = self.edgetpu
        if self.arena is not None:
            doc.update(self.arena)
            if self.edgetpu is not None:
                doc["edgetpu_op_share"] = self.edgetpu_op_share
        if self.warnings:
            doc["warnings"] = list(self.warnings)
        optional = (
            "accuracy_budget",
            "class_drop_budget",
            "budget",
            "compression",
            "bundle_action",
            "bundle_bytes",
            "build_s",
        )
        doc.update({k: getattr(self, k) for k in optional if getattr(self, k) is not None})
        return doc
