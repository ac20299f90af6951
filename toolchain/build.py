"""The host build pipeline: model + calibration data -> one verified int8 bundle per target + a report.

``build_bundles`` is the Python API; ``edgefleet build`` is a thin layer over it. It runs steps over
typed records (``toolchain.steps.context``: ``BuildOptions``, ``BuildContext``, ``TargetResult``):

1. check options and targets, load the model and data (bad input fails here, before any work), and
   check every destination (``DIR/<target>``) may receive the bundle (``toolchain.steps.inputs``);
2. the float model's scores, optional pruning (tfmot, measured), optional weight clustering
   (``toolchain.steps.cluster``, sparsity-preserving when pruned), optional QAT fine-tuning
   (prune- and/or cluster-preserving), the baseline, and float references (.tflite/.onnx) for size,
   accuracy and latency comparisons (``toolchain.steps.reference``);
3. per target (``toolchain.steps.target``): convert, verify in the device runtimes, measure
   accuracy/size/sparsity/latency, check each runtime through the agent, per-class metrics, Edge TPU
   analysis and compile (coral), the gates (accuracy budget, per-class recall ``--max-class-drop``,
   size, ``[budget]``); then assemble the bundle in a staging folder next to its destination, sign
   it (``sign_key``), rename it into place, and measure its compression and OTA cost;
4. write ``DIR/report.json`` and ``DIR/report.html`` from the records.

A target that fails (conversion, verification, accuracy budget, size limit) leaves no bundle; the
others still build, and ``BuildError`` (carrying the report) is raised at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolchain.errors import USER_ERRORS, ToolchainError
from toolchain.report import merge_previous, write_report
from toolchain.steps.cluster import compression_report
from toolchain.steps.context import BuildContext, BuildOptions, TargetResult
from toolchain.steps.data import Dataset
from toolchain.steps.inputs import load_inputs
from toolchain.steps.isolate import release_memory
from toolchain.steps.package import assemble_bundle, discard, place_bundle, staging_dir
from toolchain.steps.per_class import DEFAULT_MAX_CLASS_DROP_POINTS
from toolchain.steps.reference import prepare_reference
from toolchain.steps.target import (
    analyse_edgetpu,
    apply_gates,
    bundle_fields,
    evaluate_classes,
    manifest_metrics,
    measure_artifact,
    new_result,
)
from toolchain.targets import Target, resolve_targets


class BuildError(ToolchainError):
    """One or more targets failed; ``report`` holds what was built and why the rest failed."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="target", disable=not (progress and sys.stderr.isatty()), file=sys.stderr
    )


def _sign(staging: Path, sign_key: Path) -> None:
    try:
        from toolchain.shipping.signing import sign_bundle
    except ImportError:
        raise ToolchainError(
            "--sign-key needs toolchain.shipping.signing, which this installation lacks; update edgefleet"
        ) from None
    sign_bundle(staging, Path(sign_key))


def _check_sign_key(key: Path) -> None:
    """Fail before any work when the signing key is missing or unreadable."""
    if not key.is_file():
        raise ToolchainError(
            f"--sign-key {str(key)!r} does not exist; create a pair with 'edgefleet keys create --out DIR'"
        )
    try:
        from toolchain.shipping.signing import load_private_key
    except ImportError:
        raise ToolchainError(
            "--sign-key needs toolchain.shipping.signing, which this installation lacks; update edgefleet"
        ) from None
    load_private_key(key)


def build_bundles(
    model_path: str | Path,
    data: str | Path | Dataset,
    targets: Sequence[str] | Sequence[Target],
    out_dir: str | Path,
    *,
    quantize: str = "ptq",
    prune: float | None = None,
    cluster: int | None = None,
    eval_data: str | Path | Dataset | None = None,
    label: str | None = None,
    version: int = 1,
    name: str | None = None,
    sign_key: str | Path | None = None,
    allow_accuracy_drop: bool = False,
    progress: bool = True,
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP_POINTS,
    int8_search: bool = True,
) -> dict[str, Any]:
    """Build one bundle per target into ``out_dir/<target>/``; return the report (also in report.json)."""
    t_start = time.perf_counter()
    options = BuildOptions(
        quantize=quantize,
        prune=prune,
        cluster=cluster,
        version=version,
        sign_key=Path(sign_key) if sign_key else None,
        allow_accuracy_drop=allow_accuracy_drop,
        progress=progress,
        max_class_drop=max_class_drop,
        int8_search=int8_search,
    )
    options.check()
    resolved = [t if isinstance(t, Target) else None for t in targets]
    target_list: list[Target] = (
        list(targets) if all(resolved) else resolve_targets([str(t) for t in targets])  # type: ignore[arg-type]
    )
    if sign_key is not None:
        _check_sign_key(Path(sign_key))
    ctx = load_inputs(
        model_path, data, target_list, out_dir, options, eval_data=eval_data, label=label, name=name
    )
    results: dict[str, TargetResult] = {}
    try:
        prepare_reference(ctx)
        release_memory()
        bar = _bar(len(target_list), "targets", progress)
        for t in target_list:
            bar.set_description(f"target {t.name}")
            results[t.name] = _build_target(ctx, t)
            release_memory()  # this target's runtimes and arrays before the next target's
            bar.update(1)
        bar.close()
    finally:
        discard(ctx.work)
    report = ctx.report(results, round(time.perf_counter() - t_start, 2))
    merged = merge_previous(ctx.out, report)
    write_report(ctx.out, merged)
    failures = [f"{name}: {r.error}" for name, r in results.items() if r.status != "ok"]
    if failures:
        head = (
            failures[0] if len(failures) == 1 else f"{len(failures)} targets failed: " + "; ".join(failures)
        )
        raise BuildError(head, merged)
    return merged


def _build_target(ctx: BuildContext, t: Target) -> TargetResult:
    """Run one target through the steps (toolchain.steps.target); a failure is recorded, not raised."""
    t0 = time.perf_counter()
    result = new_result(ctx, t)
    dest = ctx.out / t.name
    staging: Path | None = None
    try:
        tdir = ctx.work / t.name
        artifact, classes_by_runtime = measure_artifact(ctx, t, result, tdir)
        class_failure = evaluate_classes(ctx, result, classes_by_runtime)
        accelerated: Path | None = None
        extra: dict[str, Path] = {}
        edgetpu_manifest: dict[str, Any] | None = None
        if t.edgetpu is not None:
            accelerated, edgetpu_manifest, extra = analyse_edgetpu(t, artifact.path, tdir, result)
        apply_gates(ctx, t, artifact, result, class_failure)
        staging = staging_dir(dest)
        assemble_bundle(
            staging,
            **bundle_fields(ctx, t, artifact),
            metrics=manifest_metrics(ctx, result),
            accelerated_file=accelerated,
            edgetpu=edgetpu_manifest,
            extra_files=extra,
        )
        if ctx.options.sign_key is not None:
            _sign(staging, ctx.options.sign_key)
        result.bundle_action = place_bundle(staging, dest)
        staging = None
        result.bundle = t.name
        result.bundle_bytes = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
        result.compression = compression_report(
            artifact.path, ctx.float_refs[t.format].path, dest, ctx.options.cluster
        )
        result.status = "ok"
    except USER_ERRORS as e:
        result.error = str(e)
    finally:
        discard(staging)
        result.build_s = round(time.perf_counter() - t0, 2)
    return result
