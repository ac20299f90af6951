"""``edgefleet build --task anomaly``: an autoencoder -> one verified int8 bundle per target, with its threshold.

The classifier pipeline (``toolchain.build``) scores top-1 classes; an anomaly model outputs one
score per sample (``toolchain.steps.anomaly``), so its build has its own, shorter order of work:

1. check the options and inputs (one line each, before any work): the percentile, the model (one
   output), ``--data`` (normal samples only), ``--eval-data`` (labels 0 normal / 1 anomaly), the
   destinations;
2. the float model: its normalisation folded into the manifest's preprocessing (as for classifiers),
   its scores on the calibration and evaluation data, its AUROC and threshold;
3. per target: convert to int8 (``toolchain.steps.convert``: structure checks, latency), assemble a
   scratch bundle, and run ``--data`` and the evaluation data through the agent
   (``device_agent.Agent``) in each runtime, one sample at a time and in the agent's batches; the
   **threshold is the percentile of the shipped int8 model's own scores** of ``--data`` on the
   device path (batch 1, the preferred runtime), not the float model's; AUROC (the worst path and
   runtime), precision and recall at that threshold; the AUROC gate (``MAX_AUROC_DROP`` below the
   float model's unless ``--allow-accuracy-drop``) and the size limit; then the bundle with
   ``task = {"type": "anomaly", "score": ..., "threshold": t, "threshold_percentile": p}`` and a
   baseline whose class counts are the int8 decisions on ``--data``;
4. ``DIR/report.json`` and ``report.html``.

Not here yet (refused in one line): pruning, clustering, QAT, ONNX input models. Coral bundles are
converted and verified like the others, without the Edge TPU op analysis.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.stats import baseline_to_dict, build_baseline
from toolchain.errors import USER_ERRORS, ToolchainError
from toolchain.steps.anomaly import (
    LABELS,
    SCORE,
    AnomalyError,
    anomaly_truth,
    auroc,
    check_percentile,
    decision_probs,
    detection,
    model_task,
    normal_rows,
    pick_threshold,
)
from toolchain.steps.context import finite
from toolchain.steps.data import DataError, Dataset, check_fits, load_dataset
from toolchain.steps.models import (
    ModelError,
    apply_preprocessing,
    fold_input_normalization,
    load_model,
    read_model_meta,
)
from toolchain.steps.package import (
    assemble_bundle,
    bundle_name,
    check_destination,
    check_name,
    check_output_dir,
    discard,
    place_bundle,
    staging_dir,
    utc_now,
)
from toolchain.targets import Target

# A target fails when its int8 AUROC (worst runtime and path) is this much below the float model's.
MAX_AUROC_DROP = 0.02


def build_anomaly_bundles(
    model_path: str | Path,
    data: str | Path | Dataset,
    targets: Sequence[Target],
    out_dir: str | Path,
    *,
    threshold_percentile: float = 99.0,
    eval_data: str | Path | Dataset | None = None,
    label: str | None = None,
    version: int = 1,
    name: str | None = None,
    sign_key: str | Path | None = None,
    allow_accuracy_drop: bool = False,
    progress: bool = True,
    unsupported: Sequence[str] = (),
) -> dict[str, Any]:
    """Build one anomaly bundle per target into ``out_dir/<target>/``; return the report (also written).

    ``unsupported`` names flags the caller got that anomaly builds refuse (``--prune`` ...).
    Raises ToolchainError (one line) on bad input before any work, and BuildError (with the report)
    when a target fails.
    """
    from toolchain.build import BuildError, _check_sign_key, _sign
    from toolchain.report import REPORT_SCHEMA, write_report
    from toolchain.steps.inputs import min_calibration

    t_start = time.perf_counter()
    if unsupported:
        raise AnomalyError(
            f"{', '.join(unsupported)} is not available for --task anomaly yet; build with --quantize ptq"
            " and no --prune/--cluster"
        )
    percentile = check_percentile(threshold_percentile)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ToolchainError(f"--version {version!r} must be a positive integer")
    model_path = Path(model_path)
    out = check_output_dir(out_dir)
    name = (
        check_name(name)
        if name
        else bundle_name(model_path.stem if model_path.is_file() else model_path.name)
    )
    if sign_key is not None:
        _check_sign_key(Path(sign_key))
    if model_path.suffix.lower() == ".onnx":
        raise ModelError(
            "--task anomaly builds Keras autoencoders; ONNX anomaly models are not supported yet"
        )
    lm = load_model(model_path)
    meta = read_model_meta(model_path)
    task = model_task(meta)
    if lm.n_outputs != 1 or task not in ("anomaly", "classification"):
        raise ModelError(
            f"model {str(model_path)!r} gives {lm.n_outputs} values per sample ({task} model); --task anomaly"
            " needs a model whose one output is the anomaly score (edgefleet train --task anomaly"
            " --arch autoencoder)"
        )
    ds = data if isinstance(data, Dataset) else load_dataset(data, label, require_labels=False)
    check_fits(ds, lm.input_shape, None)
    ds = normal_rows(ds, "--data")
    if eval_data is None:
        calib, evald = ds.split()
        eval_note = "held out from --data (normal samples only: no AUROC)"
    else:
        calib = ds
        evald = (
            eval_data
            if isinstance(eval_data, Dataset)
            else load_dataset(eval_data, label, require_labels=False)
        )
        check_fits(evald, lm.input_shape, None, what="eval data")
        eval_note = evald.source
    # the held-out part of --data is all normal: no AUROC, but its false-positive rate is measured
    truth = np.zeros(evald.n, dtype=np.int64) if eval_data is None else anomaly_truth(evald)
    if calib.n < min_calibration():
        raise DataError(
            f"--data {ds.source!r} has {calib.n} normal samples for calibration and the threshold; need at"
            f" least {min_calibration()}"
        )
    for t in targets:
        check_destination(out / t.name, name, version, t.name)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".edgefleet-build-", dir=out))

    results: dict[str, dict[str, Any]] = {}
    float_doc: dict[str, Any] = {}
    try:
        # the float model: normalisation folded into the manifest (raw values on the device)
        tf_model: Any = lm.model if lm.kind == "tf_keras" else None
        preprocessing = None
        if tf_model is not None:
            tf_model, preprocessing = fold_input_normalization(tf_model)
        source = tf_model if tf_model is not None else lm.conversion_source(work)
        float_calib = lm.predict(calib.x)[:, 0]
        float_eval = lm.predict(evald.x)[:, 0]
        float_threshold = pick_threshold(float_calib, percentile)
        float_doc = {
            "auroc": auroc(float_eval, truth) if truth is not None else None,
            "threshold": float_threshold,
            **_detection(float_eval, truth, float_threshold),
        }
        model_calib = apply_preprocessing(calib.x, preprocessing)
        for i, t in enumerate(targets):
            if progress and sys.stderr.isatty():
                print(f"target {t.name} ({i + 1}/{len(targets)})", file=sys.stderr)
            results[t.name] = _build_target(
                t,
                source=source,
                model_calib=model_calib,
                calib=calib,
                evald=evald,
                truth=truth,
                float_doc=float_doc,
                percentile=percentile,
                preprocessing=preprocessing,
                name=name,
                version=version,
                out=out,
                work=work,
                sign=(lambda staging: _sign(staging, Path(sign_key))) if sign_key is not None else None,
                allow_drop=allow_accuracy_drop,
                progress=progress,
            )
    finally:
        discard(work)
    report = finite(
        {
            "schema": REPORT_SCHEMA,
            "name": name,
            "version": version,
            "created_at": utc_now(),
            "task": {"type": "anomaly", "score": SCORE, "threshold_percentile": percentile},
            "model": {
                "path": str(model_path),
                "kind": lm.kind,
                "input_shape": list(lm.input_shape),
                "outputs": lm.n_outputs,
            },
            "data": {
                "path": ds.source,
                "samples": ds.n,
                "calibration_samples": calib.n,
                "eval": {
                    "source": eval_note,
                    "samples": evald.n,
                    "anomalies": int(truth.sum()) if truth is not None else None,
                },
            },
            "options": {
                "quantize": "ptq",
                "allow_accuracy_drop": allow_accuracy_drop,
                "max_auroc_drop": MAX_AUROC_DROP,
                "signed": sign_key is not None,
            },
            "labels": list(LABELS),
            "labels_source": "task",
            "float": float_doc,
            "targets": results,
            "build_s": round(time.perf_counter() - t_start, 2),
        }
    )
    if preprocessing is not None:
        report["preprocessing"] = preprocessing
    write_report(out, report)
    failures = [f"{n}: {r['error']}" for n, r in results.items() if r["status"] != "ok"]
    if failures:
        head = (
            failures[0] if len(failures) == 1 else f"{len(failures)} targets failed: " + "; ".join(failures)
        )
        raise BuildError(head, report)
    return report


def _detection(scores: np.ndarray, truth: np.ndarray | None, threshold: float) -> dict[str, Any]:
    """Return precision, recall, false-positive rate (and flagged count) at ``threshold``, or Nones."""
    if truth is None:
        flagged = int((np.asarray(scores) > threshold).sum())
        return {"precision": None, "recall": None, "false_positive_rate": None, "flagged": flagged}
    return detection(scores, truth, threshold).to_dict()


def _build_target(
    t: Target,
    *,
    source: Any,
    model_calib: np.ndarray,
    calib: Dataset,
    evald: Dataset,
    truth: np.ndarray | None,
    float_doc: dict[str, Any],
    percentile: float,
    preprocessing: dict[str, Any] | None,
    name: str,
    version: int,
    out: Path,
    work: Path,
    sign: Any,
    allow_drop: bool,
    progress: bool,
) -> dict[str, Any]:
    """Convert, measure on the agent, pick the threshold and ship one target; a failure is recorded."""
    from toolchain.steps.convert import convert_for_target

    t0 = time.perf_counter()
    entry: dict[str, Any] = {"status": "failed", "error": None, "bundle": None, "format": t.format.value}
    entry["float_auroc"] = float_doc["auroc"]
    staging: Path | None = None
    try:
        tdir = work / t.name
        artifact = convert_for_target(source, t, model_calib, tdir, progress=progress)
        entry["size_bytes"] = artifact.size_bytes
        if artifact.size_bytes > t.limits.max_model_bytes:
            raise ToolchainError(
                f"model is {artifact.size_bytes} bytes, over the {t.name} limit of {t.limits.max_model_bytes}"
            )

        def fields(threshold: float, baseline: dict[str, Any]) -> dict[str, Any]:
            return {
                "name": name,
                "version": version,
                "target": t.name,
                "model_file": artifact.path,
                "model_format": artifact.format,
                "runtimes": list(artifact.runtimes),
                "inputs": artifact.inputs,
                "outputs": artifact.outputs,
                "labels": list(LABELS),
                "baseline": baseline,
                "threads": t.threads,
                "preprocessing": preprocessing or {"type": "none"},
                "task": _task(threshold, percentile),
            }

        # A scratch bundle with the float threshold: the scores do not depend on it.
        scratch = tdir / "scratch-bundle"
        assemble_bundle(scratch, **fields(float_doc["threshold"], _baseline(calib, np.zeros(calib.n), 0.0)))
        per_runtime, calib_scores = _measure_runtimes(scratch, artifact.runtimes, calib.x, evald.x, truth)
        discard(scratch)
        preferred = artifact.runtimes[0]
        threshold = pick_threshold(calib_scores[preferred], percentile)
        for fig in per_runtime.values():
            fig.update(_detection(fig.pop("_eval_scores"), truth, threshold))
        pref = per_runtime[preferred]
        aurocs = [f["auroc"] for f in per_runtime.values() if f["auroc"] is not None]
        entry.update(
            {
                "threshold": threshold,
                "threshold_percentile": percentile,
                "float_threshold": float_doc["threshold"],
                "auroc": min(aurocs) if aurocs else None,
                "auroc_drop": (float_doc["auroc"] - min(aurocs))
                if aurocs and float_doc["auroc"] is not None
                else None,
                "max_auroc_drop": MAX_AUROC_DROP,
                "precision": pref["precision"],
                "recall": pref["recall"],
                "false_positive_rate": pref["false_positive_rate"],
                "float_precision": float_doc["precision"],
                "float_recall": float_doc["recall"],
                "calibration_flagged": int((calib_scores[preferred] > threshold).sum()),
                "preferred_runtime": preferred,
                "runtimes": list(artifact.runtimes),
                "latency_ms_p50": pref.get("latency_ms_p50"),
                "latency_ms_p95": pref.get("latency_ms_p95"),
                "per_runtime": per_runtime,
                "inputs": [s.to_dict() for s in artifact.inputs],
                "outputs": [s.to_dict() for s in artifact.outputs],
                "checks": artifact.checks,
            }
        )
        drop = entry["auroc_drop"]
        if drop is not None and drop > MAX_AUROC_DROP + 1e-9:
            msg = (
                f"int8 AUROC {entry['auroc']:.4f} is {drop:.4f} below float {float_doc['auroc']:.4f};"
                f" the budget is {MAX_AUROC_DROP}"
            )
            if not allow_drop:
                raise ToolchainError(
                    msg + " (try more --data, or pass --allow-accuracy-drop to ship it anyway)"
                )
            entry["accuracy_budget"] = "exceeded, allowed by --allow-accuracy-drop: " + msg
        else:
            entry["accuracy_budget"] = "ok"
        dest = out / t.name
        staging = staging_dir(dest)
        metrics = {
            k: entry[k]
            for k in (
                "auroc",
                "float_auroc",
                "precision",
                "recall",
                "threshold",
                "size_bytes",
                "preferred_runtime",
            )
        }
        metrics["eval_samples"] = evald.n
        metrics["quantize"] = "ptq"
        assemble_bundle(
            staging,
            **dict(
                fields(threshold, _baseline(calib, calib_scores[preferred], threshold)),
                metrics=finite(metrics),
            ),
        )
        if sign is not None:
            sign(staging)
        entry["bundle_action"] = place_bundle(staging, dest)
        staging = None
        entry["bundle"] = t.name
        entry["bundle_bytes"] = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
        entry["status"] = "ok"
    except USER_ERRORS as e:
        entry["error"] = str(e)
    finally:
        discard(staging)
        entry["build_s"] = round(time.perf_counter() - t0, 2)
    return entry


def _task(threshold: float, percentile: float) -> dict[str, Any]:
    return {
        "type": "anomaly",
        "score": SCORE,
        "threshold": float(threshold),
        "threshold_percentile": percentile,
    }


def _baseline(calib: Dataset, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The bundle's baseline: ``--data``'s inputs and the int8 model's decisions on it (class counts)."""
    prof = build_baseline(
        calib.x, decision_probs(scores, threshold), LABELS, feature_names=calib.feature_names
    )
    return baseline_to_dict(prof, source={"data": Path(calib.source).name, "samples": calib.n})


def _measure_runtimes(
    bundle: Path, runtimes: Sequence[str], calib_x: np.ndarray, eval_x: np.ndarray, truth: np.ndarray | None
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Run ``--data`` and the eval data through the agent in each runtime; return figures and calib scores.

    Each runtime's eval scores come one sample at a time (the daemon's path) and in the agent CLI's
    batches; its ``auroc`` is the worse of the two paths. The calibration scores (for the threshold)
    are the batch-1 path's.
    """
    from toolchain.steps.parity import agent_batch_sizes, run_on_agent

    per_rt: dict[str, dict[str, Any]] = {}
    calib_scores: dict[str, np.ndarray] = {}
    for rt in runtimes:
        fig: dict[str, Any] = {"paths": {}}
        one: np.ndarray | None = None
        for b in agent_batch_sizes():
            scores, times, settings = run_on_agent(bundle, rt, np.ascontiguousarray(eval_x, np.float32), b)
            s = scores[:, 0].astype(np.float64)
            fig.update(settings)
            fig["paths"][f"batch_{b}"] = {"auroc": auroc(s, truth) if truth is not None else None}
            if b == 1:
                one = s
                assert times is not None
                fig["latency_ms_p50"] = round(float(np.percentile(times, 50)), 4)
                fig["latency_ms_p95"] = round(float(np.percentile(times, 95)), 4)
            elif one is not None:
                fig["paths"][f"batch_{b}"]["max_score_diff_vs_batch_1"] = float(np.max(np.abs(s - one)))
        assert one is not None
        paths = [p["auroc"] for p in fig["paths"].values() if p["auroc"] is not None]
        fig["auroc"] = min(paths) if paths else None
        fig["_eval_scores"] = one
        cs, _, _ = run_on_agent(bundle, rt, np.ascontiguousarray(calib_x, np.float32), 1)
        calib_scores[rt] = cs[:, 0].astype(np.float64)
        per_rt[rt] = fig
    return per_rt, calib_scores


def evaluate_anomaly_bundle(
    bundle: str | Path, data: Dataset, runtimes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Re-measure an anomaly bundle on labelled data (``y``: 1 = anomaly) through the agent, per runtime.

    ``edgefleet evaluate`` on an anomaly bundle: AUROC (worse of the batch-1 and batch paths),
    precision, recall and false-positive rate at the manifest's threshold (batch-1 scores), and the
    agent's per-sample latency, beside the figures the build recorded.
    """
    from device_agent.formats.manifest import VerifyPolicy, verify_bundle

    bundle = Path(bundle)
    m = verify_bundle(bundle, VerifyPolicy(allow_unsigned=True))
    threshold = m.anomaly_threshold
    if threshold is None:
        raise AnomalyError(f"bundle {str(bundle)!r} is a {m.task_type} bundle, not an anomaly detector")
    check_fits(data, m.inputs[0].shape[1:], None, what="eval data")
    truth = anomaly_truth(data, "--data")
    listed = [r.value for r in m.model.runtimes]
    chosen = list(runtimes or listed)
    unknown = [r for r in chosen if r not in listed]
    if unknown:
        raise AnomalyError(f"runtime {unknown[0]!r} is not in bundle {m.name!r}. Listed: {', '.join(listed)}")
    per_runtime, _ = _measure_runtimes(bundle, chosen, data.x[:1], data.x, truth)
    for fig in per_runtime.values():
        fig.update(_detection(fig.pop("_eval_scores"), truth, threshold))
    return finite(
        {
            "name": m.name,
            "version": m.version,
            "target": m.target,
            "task": dict(m.task or {}),
            "threshold": threshold,
            "data": data.source,
            "samples": data.n,
            "anomalies": int(truth.sum()) if truth is not None else None,
            "preferred_runtime": chosen[0],
            "per_runtime": per_runtime,
            "build_auroc": m.metrics.get("auroc"),
        }
    )
