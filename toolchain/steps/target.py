"""The steps one target goes through, each filling its part of the target's ``TargetResult``.

In order (``toolchain.build._build_target`` runs them): ``measure_artifact`` converts the model,
verifies the artifact in the device runtimes, scores every runtime and checks each one through the
agent's own path (``toolchain.steps.parity``; runtimes that disagree leave the manifest);
``evaluate_classes`` adds the per-class metrics; ``analyse_edgetpu`` the Edge TPU analysis and
compile; ``apply_gates`` the memory figures and the gates (accuracy budget, per-class recall drop,
size limit, the target's ``[budget]``), raising a one-line error when one fails and
``--allow-accuracy-drop`` does not cover it. ``bundle_fields`` and ``manifest_metrics`` give what the
bundle is assembled from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import ModelFormat
from toolchain.errors import ToolchainError
from toolchain.steps import budget
from toolchain.steps.artifact import Artifact
from toolchain.steps.context import BuildContext, Measurement, TargetResult, accuracy_tries, finite
from toolchain.steps.convert import convert_for_target
from toolchain.steps.evaluate import artifact_sparsity, gzip_size
from toolchain.steps.package import EDGETPU_LOG_FILE, assemble_bundle
from toolchain.steps.per_class import accuracy, predicted_classes, target_class_evaluation
from toolchain.steps.reference import float_latency
from toolchain.steps.verify import predict_artifact, verify_artifact
from toolchain.targets import Target

log = logging.getLogger(__name__)

# The report keys the manifest's ``metrics`` repeats.
MANIFEST_METRICS = (
    "accuracy",
    "float_accuracy",
    "top1_agreement",
    "sqnr_db",
    "size_bytes",
    "float_size_bytes",
    "sparsity",
    "latency_ms_p50",
    "latency_ms_p95",
    "preferred_runtime",
)


def new_result(ctx: BuildContext, t: Target) -> TargetResult:
    """Return the result a target starts with: failed, with the float model's figures to compare."""
    ref = ctx.float_refs[t.format]
    return TargetResult(
        target=t.name,
        format=t.format.value,
        float_accuracy=ctx.float_accuracy,
        float_size_bytes=ref.size_bytes,
        float_gzip_size_bytes=ref.gzip_size_bytes,
    )


def measure_artifact(
    ctx: BuildContext, t: Target, result: TargetResult, tdir: Path
) -> tuple[Artifact, dict[str, np.ndarray]]:
    """Convert, verify and score the target's artifact; check each runtime through the agent.

    Sets ``result.measured`` and returns the artifact (its ``runtimes`` now the kept ones, preferred
    first) and the top-1 classes each kept runtime predicts on the evaluation data, one sample at a
    time where the agent ran it.
    """
    assert ctx.model_calib is not None and ctx.model_eval is not None and ctx.deployed_eval is not None
    evald = ctx.model_eval
    prebuilt = None
    # Clustered builds ship QDQ per-channel untried: a per-tensor form re-rounds the shared values and
    # loses the <= K values per channel that clustering is for (seen: 13 values per channel at K=6).
    if ctx.options.int8_search and t.format == ModelFormat.ONNX and ctx.options.cluster is None:
        from toolchain.steps.int8_forms import search_forms

        prebuilt, result.int8_form_choice = search_forms(ctx, t, tdir, lambda a: bundle_fields(ctx, t, a))
    artifact = convert_for_target(
        ctx.source_model,
        t,
        ctx.model_calib.x,
        tdir,
        qat=ctx.options.qat,
        progress=ctx.options.progress,
        prebuilt=prebuilt,
    )
    ver = verify_artifact(artifact, t, evald.x, ctx.deployed_eval)
    per_rt: dict[str, Any] = {}
    rt_pred: dict[str, np.ndarray] = {}  # top-1 class per eval sample, for the per-class metrics
    for rt in artifact.runtimes:
        scores = predict_artifact(artifact, rt, evald.x)
        rt_pred[rt] = predicted_classes(scores)
        per_rt[rt] = {"accuracy": accuracy(scores, evald.y), "latency": artifact.latency.get(rt)}
    # Each runtime as the device runs it (the agent, one sample at a time and in its batches);
    # runtimes that disagree beyond the budget leave the manifest.
    parity = runtime_parity(ctx, t, artifact, per_rt, ver, tdir)
    artifact.runtimes = parity.kept
    kept = parity.kept
    preferred = kept[0]
    lat = artifact.latency.get(preferred, {}).get("threads_N", {})
    float_lat = float_latency(ctx.float_refs[t.format], kept, ctx.model_calib.x[:1], t.threads)
    per_runtime = {rt: dict(v, **ver["per_runtime"].get(rt, {})) for rt, v in per_rt.items()}
    for rt, dev in parity.per_runtime.items():
        per_runtime.setdefault(rt, {}).update(dev)
    for rt, why in parity.excluded.items():
        log.warning("runtime %s left out of the bundle: %s", rt, why)
    # accuracy and agreement of the target are those of the kept runtimes' worst paths
    acc = per_runtime[preferred]["accuracy"]
    result.measured = Measurement(
        accuracy=acc,
        accuracy_drop=ctx.float_accuracy - acc,
        max_accuracy_drop=t.limits.max_accuracy_drop,
        size_bytes=artifact.size_bytes,
        gzip_size_bytes=gzip_size(artifact.path),
        size_ratio=artifact.size_bytes / ctx.float_refs[t.format].size_bytes,
        sparsity=artifact_sparsity(artifact.path),
        top1_agreement=min(per_runtime[rt]["top1_agreement"] for rt in kept),
        sqnr_db=ver["sqnr_db"],
        runtimes=list(kept),
        latency_ms_p50=lat.get("p50_ms"),
        latency_ms_p95=lat.get("p95_ms"),
        threads=t.threads,
        latency=artifact.latency,
        float_latency=float_lat,
        per_runtime=per_runtime,
        inputs=[s.to_dict() for s in artifact.inputs],
        outputs=[s.to_dict() for s in artifact.outputs],
        checks=artifact.checks,
        runtimes_excluded=dict(parity.excluded),
        parity_batch_sizes=list(parity.batch_sizes),
        precision={rt: per_runtime[rt].get("precision") for rt in kept},
        float_latency_ms_p50=float_lat.get(preferred, {}).get("threads_N", {}).get("p50_ms"),
    )
    return artifact, {rt: parity.batch_1_classes.get(rt, rt_pred[rt]) for rt in kept}


def runtime_parity(
    ctx: BuildContext,
    t: Target,
    artifact: Artifact,
    per_rt: dict[str, Any],
    ver: dict[str, Any],
    tdir: Path,
) -> Any:
    """Check every runtime of ``artifact`` through the agent on a scratch bundle (toolchain.steps.parity).

    Folds the whole-batch figures measured before into each runtime's paths, so a runtime's
    ``accuracy`` in ``per_rt`` becomes its worst over the whole batch, one sample at a time and the
    agent's batch size. Raises ParityError (one line) when no runtime is left.
    """
    from toolchain.steps.parity import check_parity, scratch_bundle

    assert ctx.deployed_eval is not None
    scratch = tdir / "parity-bundle"
    try:
        assemble_bundle(scratch, **bundle_fields(ctx, t, artifact))
        result = check_parity(
            scratch,
            artifact.runtimes,
            ctx.evald.x,
            ctx.evald.y,
            ctx.deployed_eval,
            float_accuracy=ctx.float_accuracy,
            max_accuracy_drop=t.limits.max_accuracy_drop,
            apply_budget=not ctx.options.allow_accuracy_drop,
            tries=_tries(ctx),
        )
    finally:
        scratch_bundle(scratch)
    for rt, dev in result.per_runtime.items():
        whole = {
            "accuracy": per_rt[rt]["accuracy"],
            "top1_agreement": ver["per_runtime"][rt]["top1_agreement"],
        }
        dev["paths"] = {"whole_batch": whole, **dev["paths"]}
        for k in ("accuracy", "top1_agreement"):
            dev[k] = min(p[k] for p in dev["paths"].values())
        per_rt[rt]["accuracy"] = dev["accuracy"]
    return result


def evaluate_classes(ctx: BuildContext, result: TargetResult, rt_pred: dict[str, np.ndarray]) -> str | None:
    """Set the per-class metrics of float and int8; return the recall gate's failure, if any."""
    assert result.measured is not None and ctx.float_eval is not None
    class_fields, class_failure = target_class_evaluation(
        ctx.evald.y,
        predicted_classes(ctx.float_eval),
        rt_pred,
        result.measured.preferred_runtime,
        ctx.labels,
        ctx.options.max_class_drop,
        tries=lambda label: _tries(ctx, label),
    )
    result.classes = class_fields
    return class_failure


def analyse_edgetpu(
    t: Target, tflite: Path, tdir: Path, result: TargetResult
) -> tuple[Path | None, dict[str, Any], dict[str, Path]]:
    """Analyse the int8 model for the Edge TPU and compile it when the compiler is installed.

    Sets ``result.edgetpu``; returns the compiled model (or None), the manifest's ``edgetpu`` summary
    and the extra files the bundle carries (the compiler's log).
    """
    from toolchain.steps import edgetpu

    assert t.edgetpu is not None
    rep = edgetpu.analyze(tflite, t.edgetpu)
    compiled_result = edgetpu.compile(tflite, tdir / "edgetpu", t.edgetpu)
    rep = rep.with_compiler(compiled_result)
    d = rep.to_dict()
    compiled = compiled_result.status == "compiled" and compiled_result.compiled_path is not None
    summary = {
        "ops_total": d["ops_total"],
        "ops_mapped": d["ops_mapped"],
        "unmapped": d["unmapped"],
        "compiled": compiled,
        "compiler_status": compiled_result.status,
        "message": compiled_result.message
        if not compiled
        else f"{compiled_result.message}; model_edgetpu.tflite runs on the Edge TPU, model.tflite is the CPU fallback",
        "compiler_version": compiled_result.compiler_version,
    }
    if compiled and compiled_result.ops_total is not None:
        summary["compiler_ops_total"] = compiled_result.ops_total
        summary["compiler_ops_mapped"] = compiled_result.ops_mapped
    result.edgetpu = dict(
        summary, notes=d["notes"], on_chip_bytes_estimate=d["on_chip_bytes_estimate"], compiler=d["compiler"]
    )
    extra: dict[str, Path] = {}
    if compiled and compiled_result.log_path is not None and Path(compiled_result.log_path).is_file():
        extra[EDGETPU_LOG_FILE] = Path(compiled_result.log_path)
    accelerated = (
        Path(compiled_result.compiled_path)
        if compiled and compiled_result.compiled_path is not None
        else None
    )
    return accelerated, finite(summary), extra


def apply_gates(
    ctx: BuildContext, t: Target, artifact: Artifact, result: TargetResult, class_failure: str | None
) -> None:
    """Record the memory figures, then check the gates in order; raise ToolchainError on the first failed.

    ``--allow-accuracy-drop`` lets a target past the accuracy budget and the per-class recall gate
    (the verdict says so in the report); the size limit and the ``[budget]`` always hold.
    """
    assert result.measured is not None
    budget.record_measurements(artifact.path, result)
    acc, float_acc = result.measured.accuracy, ctx.float_accuracy
    allow = ctx.options.allow_accuracy_drop
    if acc + 1e-9 < float_acc - t.limits.max_accuracy_drop:
        msg = (
            f"accuracy {acc:.4f} is {100 * (float_acc - acc):.2f} points below float {float_acc:.4f};"
            f" the {t.name} budget is {100 * t.limits.max_accuracy_drop:.2f} points"
        )
        if not allow:
            raise ToolchainError(msg + f" ({_tries(ctx)}, or pass --allow-accuracy-drop to ship it anyway)")
        result.accuracy_budget = "exceeded, allowed by --allow-accuracy-drop: " + msg
    else:
        result.accuracy_budget = "ok"
    if class_failure is not None:
        if not allow:
            raise ToolchainError(class_failure + " (or pass --allow-accuracy-drop to ship it anyway)")
        result.class_drop_budget = "exceeded, allowed by --allow-accuracy-drop: " + class_failure
    else:
        result.class_drop_budget = "ok"
    if artifact.size_bytes > t.limits.max_model_bytes:
        raise ToolchainError(
            f"model is {artifact.size_bytes} bytes, over the {t.name} limit of "
            f"{t.limits.max_model_bytes}; {budget.ADVICE['max_model_bytes']}"
        )
    budget.enforce(t, result)


def _tries(ctx: BuildContext, class_label: str | None = None) -> str:
    """What to try when this build misses its accuracy budget (``context.accuracy_tries``)."""
    return accuracy_tries(
        ctx.options,
        float_accuracy=ctx.float_accuracy,
        pruned_accuracy=ctx.pruned_accuracy,
        class_label=class_label,
    )


def bundle_fields(ctx: BuildContext, t: Target, artifact: Artifact) -> dict[str, Any]:
    """Return the ``assemble_bundle`` arguments a target's bundle and its parity scratch copy share."""
    return {
        "name": ctx.name,
        "version": ctx.options.version,
        "target": t.name,
        "model_file": artifact.path,
        "model_format": artifact.format,
        "runtimes": list(artifact.runtimes),
        "inputs": artifact.inputs,
        "outputs": artifact.outputs,
        "labels": ctx.labels,
        "baseline": ctx.baseline,
        "threads": t.threads,
        "preprocessing": ctx.preprocessing or {"type": "none"},
        "input_layout": ctx.input_layout,
    }


def manifest_metrics(ctx: BuildContext, result: TargetResult) -> dict[str, Any]:
    """Return the manifest's ``metrics``: the headline figures of the report entry, plus data and mode."""
    entry = result.to_dict()
    assert ctx.model_eval is not None
    metrics = {k: entry[k] for k in MANIFEST_METRICS}
    metrics["eval_samples"] = ctx.model_eval.n
    metrics["quantize"] = "qat" if ctx.options.qat else "ptq"
    return finite(metrics)
