"""The host build pipeline: model + calibration data -> one verified int8 bundle per target + a report.

``build_bundles`` is the Python API; ``edgefleet build`` is a thin layer over it. Order of work:

1. check options and targets, load the model and data (bad input fails here, before any work);
2. check every destination (``DIR/<target>``) may receive the bundle;
3. optional pruning (tfmot, measured), optional QAT fine-tuning (prune-preserving when pruned);
4. float references (.tflite/.onnx) for size, accuracy and latency comparisons;
5. per target: convert, verify in the device runtimes, measure accuracy/size/sparsity/latency, Edge
   TPU analysis and compile (coral), accuracy budget, per-class recall gate (``--max-class-drop``,
   ``toolchain.steps.per_class``), assemble the bundle in a staging folder next to
   its destination, sign it (``sign_key``), and rename it into place;
6. write ``DIR/report.json`` and ``DIR/report.html``.

A target that fails (conversion, verification, accuracy budget, size limit) leaves no bundle; the
others still build, and ``BuildError`` (carrying the report) is raised at the end.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import ModelFormat
from device_agent.stats import baseline_to_dict, build_baseline
from toolchain.errors import USER_ERRORS, ToolchainError
from toolchain.report import REPORT_SCHEMA, merge_previous, write_report
from toolchain.steps.data import DataError, Dataset, check_finite, check_fits, conform, load_dataset
from toolchain.steps.evaluate import accuracy, artifact_sparsity, gzip_size
from toolchain.steps.models import (
    LoadedModel,
    apply_preprocessing,
    fold_input_normalization,
    load_model,
    read_model_meta,
)
from toolchain.steps.package import (
    EDGETPU_LOG_FILE,
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
from toolchain.steps.per_class import (
    DEFAULT_MAX_CLASS_DROP_POINTS,
    class_report,
    predicted_classes,
    target_class_evaluation,
)
from toolchain.targets import Target, resolve_targets

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("ptq", "qat")
# Repeats for the float reference's latency (the artifacts use the converter's default).
FLOAT_LATENCY_REPEATS = 200


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


def _check_options(quantize: str, prune: float | None, version: int) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ToolchainError(f"--quantize {quantize!r} is unknown. Known: {', '.join(QUANTIZE_MODES)}")
    if prune is not None and not 0 < prune < 1:
        raise ToolchainError(f"--prune {prune} must be between 0 and 1 (0.5 prunes half the weights)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ToolchainError(f"--version {version!r} must be a positive integer")


def _check_max_class_drop(points: float) -> None:
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not 0 <= points <= 100:
        raise ToolchainError(
            f"--max-class-drop {points!r} must be between 0 and 100 percentage points (100 turns the gate off)"
        )


def _min_calibration() -> int:
    from toolchain.steps import convert

    return int(getattr(convert, "MIN_CALIBRATION_SAMPLES", 20))


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


def _float_outputs(lm: LoadedModel, tf_model: Any | None, x: np.ndarray) -> np.ndarray:
    if tf_model is None:
        return lm.predict(x)
    outs = [np.asarray(tf_model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)]
    out = np.concatenate(outs, axis=0)
    return out.reshape(len(out), -1).astype(np.float32)


def build_bundles(
    model_path: str | Path,
    data: str | Path | Dataset,
    targets: Sequence[str] | Sequence[Target],
    out_dir: str | Path,
    *,
    quantize: str = "ptq",
    prune: float | None = None,
    eval_data: str | Path | Dataset | None = None,
    label: str | None = None,
    version: int = 1,
    name: str | None = None,
    sign_key: str | Path | None = None,
    allow_accuracy_drop: bool = False,
    progress: bool = True,
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP_POINTS,
) -> dict[str, Any]:
    """Build one bundle per target into ``out_dir/<target>/``; return the report (also in report.json)."""
    t_start = time.perf_counter()
    _check_options(quantize, prune, version)
    _check_max_class_drop(max_class_drop)
    resolved = [t if isinstance(t, Target) else None for t in targets]
    target_list: list[Target] = (
        list(targets) if all(resolved) else resolve_targets([str(t) for t in targets])  # type: ignore[arg-type]
    )
    if sign_key is not None:
        _check_sign_key(Path(sign_key))
    model_path = Path(model_path)
    out = check_output_dir(out_dir)  # before loading anything: a bad --out fails in one line, at once
    name = (
        check_name(name)
        if name
        else bundle_name(model_path.stem if model_path.is_file() else model_path.name)
    )

    lm = load_model(model_path)
    meta = read_model_meta(model_path)
    # Calibration data needs only x; labels are needed only where accuracy is measured.
    ds = data if isinstance(data, Dataset) else load_dataset(data, label, require_labels=False)
    check_finite(ds.x, f"data {ds.source!r}")
    check_fits(ds, lm.input_shape, lm.n_outputs)
    if eval_data is None:
        if not ds.labelled:
            raise DataError(
                f"data {ds.source!r} has no labels (no 'y'), so nothing can be held out to measure accuracy;"
                " pass labelled test data with --eval-data"
            )
        calib, evald = ds.split()
        eval_note = "held out from --data"
    else:
        calib = ds
        evald = eval_data if isinstance(eval_data, Dataset) else load_dataset(eval_data, label)
        check_fits(evald, lm.input_shape, lm.n_outputs, what="eval data")
        eval_note = evald.source
    labels, labels_source = _model_labels(meta, ds, evald, lm.n_outputs)
    evald = conform(evald, labels) if evald.class_names != labels else evald
    minimum = _min_calibration()
    if calib.n < minimum:
        raise DataError(
            f"calibration data {ds.source!r} has {calib.n} samples"
            + (" after holding out 20% for evaluation" if eval_data is None else "")
            + f"; need at least {minimum} (pass more data with --data)"
        )
    if evald.n == 0:
        raise DataError("no evaluation samples; pass --eval-data TEST or more --data")

    # Fail before any long work when a destination cannot take the bundle.
    for t in target_list:
        check_destination(out / t.name, name, version, t.name)
    out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix=".edgefleet-build-", dir=out))
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "name": name,
        "version": version,
        "created_at": utc_now(),
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
            "eval": {"source": eval_note, "samples": evald.n},
        },
        "options": {
            "quantize": quantize,
            "prune": prune,
            "allow_accuracy_drop": allow_accuracy_drop,
            "max_class_drop": float(max_class_drop),
            "signed": sign_key is not None,
        },
        "labels": labels,
        "labels_source": labels_source,
        "float": {},
        "targets": {},
    }
    failures: list[str] = []
    try:
        # ---- reference float model and its scores
        float_eval = lm.predict(evald.x)
        float_acc = accuracy(float_eval, evald.y)
        report["float"]["accuracy"] = float_acc
        report["float"].update(class_report(evald.y, predicted_classes(float_eval), labels))

        # ---- a tf_keras model for pruning/QAT (Keras 3 rebuilt) and for folding the input normalisation
        tf_model: Any = None
        source_model: Any = None
        if prune is not None or quantize == "qat":
            purpose = "pruning" if prune is not None else "QAT"
            tf_model = lm.as_tf_keras(purpose)
        elif lm.kind == "tf_keras":
            tf_model = lm.model
        preprocessing: dict[str, Any] | None = None
        if tf_model is not None:
            tf_model, preprocessing = fold_input_normalization(tf_model)
        if preprocessing is not None:
            report["preprocessing"] = preprocessing
        # Float reference for size/latency: the model as given, or, when its input normalisation was
        # folded into the manifest, the folded float model (same weights, standardised input).
        reference_model = tf_model if preprocessing is not None else None
        # What the converted model takes: raw values, or standardised ones when normalisation was folded out.
        calib_m = _model_input(calib, preprocessing)
        eval_m = _model_input(evald, preprocessing)
        if prune is not None:
            from toolchain.steps.prune import prune_model

            pr = prune_model(tf_model, calib_m, prune, progress=progress)
            tf_model = pr.model
            report["prune"] = pr.to_dict()
            report["float"]["pruned_accuracy"] = accuracy(_float_outputs(lm, tf_model, eval_m.x), evald.y)
        deployed_float = tf_model  # the float model that gets quantized (pruned or the original)
        if quantize == "qat":
            from toolchain.steps.qat import qat_finetune

            source_model = qat_finetune(tf_model, calib_m, pruned=prune is not None, progress=progress)
        else:
            source_model = tf_model if tf_model is not None else lm.conversion_source(work)

        float_calib = _float_outputs(lm, deployed_float, calib_m.x)
        deployed_eval = (
            _float_outputs(lm, deployed_float, eval_m.x) if deployed_float is not None else float_eval
        )
        baseline = baseline_to_dict(
            build_baseline(calib.x, float_calib, labels, feature_names=ds.feature_names),
            source={"data": Path(ds.source).name, "samples": calib.n, "model": model_path.name},
        )

        # ---- float references per format
        float_refs: dict[ModelFormat, dict[str, Any]] = {}
        if reference_model is not None:
            original_source = reference_model
        else:
            original_source = lm.model if lm.kind == "tf_keras" else lm.conversion_source(work)
        for fmt in sorted({t.format for t in target_list}, key=lambda f: f.value):
            float_refs[fmt] = _float_reference(original_source, fmt, work, report)

        bar = _bar(len(target_list), "targets", progress)
        for t in target_list:
            bar.set_description(f"target {t.name}")
            entry = _build_target(
                t,
                source_model=source_model,
                qat=quantize == "qat",
                calib=calib_m,
                evald=eval_m,
                preprocessing=preprocessing,
                float_eval=float_eval,
                deployed_eval=deployed_eval,
                raw_eval=evald,
                float_acc=float_acc,
                float_ref=float_refs[t.format],
                baseline=baseline,
                labels=labels,
                name=name,
                version=version,
                out=out,
                work=work,
                sign_key=Path(sign_key) if sign_key else None,
                allow_accuracy_drop=allow_accuracy_drop,
                progress=progress,
                max_class_drop=max_class_drop,
            )
            report["targets"][t.name] = entry
            if entry["status"] != "ok":
                failures.append(f"{t.name}: {entry['error']}")
            bar.update(1)
        bar.close()
        for fmt, ref in float_refs.items():
            # "runtime@threads" -> latency of the float reference, as measured beside the artifacts
            report["float"][fmt.value]["latency"] = dict(sorted(ref["latency"].items()))
    finally:
        discard(work)
    report["build_s"] = round(time.perf_counter() - t_start, 2)
    merged = merge_previous(out, report)
    write_report(out, merged)
    if failures:
        head = (
            failures[0] if len(failures) == 1 else f"{len(failures)} targets failed: " + "; ".join(failures)
        )
        raise BuildError(head, merged)
    return merged


def _model_input(ds: Dataset, preprocessing: dict[str, Any] | None) -> Dataset:
    """Return ``ds`` as the converted model sees it (the manifest's preprocessing applied)."""
    if preprocessing is None:
        return ds
    return Dataset(
        apply_preprocessing(ds.x, preprocessing), ds.y, ds.feature_names, ds.class_names, ds.source, ds.kind
    )


def _model_labels(
    meta: dict[str, Any] | None, ds: Dataset, evald: Dataset, n_outputs: int
) -> tuple[list[str], str]:
    """Return the bundle's class names and where they came from: the model, the data, or indices.

    The names ``edgefleet train`` stored beside the model win; then the names of labelled --data,
    then of the eval data; else the output indices "0".."K-1".
    """
    names = (meta or {}).get("class_names")
    if names:
        if len(names) != n_outputs:
            raise DataError(
                f"the model's metadata names {len(names)} classes but the model has {n_outputs} outputs;"
                " re-run 'edgefleet train' or delete the stale .edgefleet.json beside the model"
            )
        return list(names), "model"
    if ds.labelled:
        return _labels(ds, n_outputs), "data"
    if evald.labelled:
        return _labels(evald, n_outputs), "eval data"
    return [str(i) for i in range(n_outputs)], "indices"


def _labels(ds: Dataset, n_outputs: int) -> list[str]:
    if len(ds.class_names) == n_outputs:
        return list(ds.class_names)
    if len(ds.class_names) < n_outputs and all(c.isdigit() for c in ds.class_names):
        return [str(i) for i in range(n_outputs)]
    raise DataError(
        f"data {ds.source!r} names {len(ds.class_names)} classes but the model has {n_outputs} outputs;"
        " pass data labelled for this model (or class_names for every output)"
    )


def _float_reference(source: Any, fmt: ModelFormat, work: Path, report: dict[str, Any]) -> dict[str, Any]:
    from toolchain.steps.convert import convert_float

    path = convert_float(source, fmt, work / f"float.{fmt.value}")
    ref = {"path": path, "size_bytes": path.stat().st_size, "gzip_size_bytes": gzip_size(path), "latency": {}}
    report["float"][fmt.value] = {
        "size_bytes": ref["size_bytes"],
        "gzip_size_bytes": ref["gzip_size_bytes"],
        "latency": {},
    }
    return ref


def _float_latency(
    ref: dict[str, Any], runtimes: Sequence[str], sample: np.ndarray, threads: int, report_fmt: dict[str, Any]
) -> dict[str, Any]:
    from toolchain.steps.convert import measure_latency

    out: dict[str, Any] = {}
    for rt in runtimes:
        key = f"{rt}@{threads}"
        if key not in ref["latency"]:
            one = ref["latency"].get(f"{rt}@1") or measure_latency(
                ref["path"], rt, sample, 1, FLOAT_LATENCY_REPEATS
            )
            ref["latency"][f"{rt}@1"] = one
            many = (
                one
                if threads == 1
                else measure_latency(ref["path"], rt, sample, threads, FLOAT_LATENCY_REPEATS)
            )
            ref["latency"][key] = many
        out[rt] = {
            "threads_1": ref["latency"][f"{rt}@1"],
            "threads_N": dict(ref["latency"][key], threads=threads),
        }
        report_fmt["latency"][rt] = out[rt]
    return out


def _build_target(
    t: Target,
    *,
    source_model: Any,
    qat: bool,
    calib: Dataset,
    evald: Dataset,
    preprocessing: dict[str, Any] | None,
    float_eval: np.ndarray,
    deployed_eval: np.ndarray,
    float_acc: float,
    float_ref: dict[str, Any],
    raw_eval: Dataset | None = None,
    baseline: dict[str, Any],
    labels: list[str],
    name: str,
    version: int,
    out: Path,
    work: Path,
    sign_key: Path | None,
    allow_accuracy_drop: bool,
    progress: bool,
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP_POINTS,
) -> dict[str, Any]:
    from toolchain.steps import budget
    from toolchain.steps.convert import convert_for_target, predict_artifact, verify_artifact

    t0 = time.perf_counter()
    entry: dict[str, Any] = {
        "status": "failed",
        "error": None,
        "bundle": None,
        "format": t.format.value,
        "float_accuracy": float_acc,
        "float_size_bytes": float_ref["size_bytes"],
        "float_gzip_size_bytes": float_ref["gzip_size_bytes"],
    }
    dest = out / t.name
    staging: Path | None = None
    try:
        tdir = work / t.name
        artifact = convert_for_target(source_model, t, calib.x, tdir, qat=qat, progress=progress)
        ver = verify_artifact(artifact, t, evald.x, deployed_eval)
        per_rt: dict[str, Any] = {}
        rt_pred: dict[str, np.ndarray] = {}  # top-1 class per eval sample, for the per-class metrics
        for rt in artifact.runtimes:
            scores = predict_artifact(artifact, rt, evald.x)
            rt_pred[rt] = predicted_classes(scores)
            per_rt[rt] = {"accuracy": accuracy(scores, evald.y), "latency": artifact.latency.get(rt)}
        # Each runtime as the device runs it (the agent, one sample at a time and in its batches);
        # runtimes that disagree beyond the budget leave the manifest.
        parity = _runtime_parity(
            t,
            artifact,
            raw_eval if raw_eval is not None else evald,
            deployed_eval,
            per_rt,
            ver,
            float_acc=float_acc,
            bundle_fields=_bundle_fields(t, artifact, name, version, labels, baseline, preprocessing),
            tdir=tdir,
            allow_accuracy_drop=allow_accuracy_drop,
        )
        artifact.runtimes = parity.kept
        preferred = artifact.runtimes[0]
        acc = per_rt[preferred]["accuracy"]
        lat = artifact.latency.get(preferred, {}).get("threads_N", {})
        float_lat = _float_latency(float_ref, artifact.runtimes, calib.x[:1], t.threads, {"latency": {}})
        entry.update(
            {
                "accuracy": acc,
                "accuracy_drop": float_acc - acc,
                "max_accuracy_drop": t.limits.max_accuracy_drop,
                "size_bytes": artifact.size_bytes,
                "gzip_size_bytes": gzip_size(artifact.path),
                "size_ratio": artifact.size_bytes / float_ref["size_bytes"],
                "sparsity": artifact_sparsity(artifact.path),
                "top1_agreement": ver["top1_agreement"],
                "sqnr_db": ver["sqnr_db"],
                "preferred_runtime": preferred,
                "runtimes": artifact.runtimes,
                "latency_ms_p50": lat.get("p50_ms"),
                "latency_ms_p95": lat.get("p95_ms"),
                "threads": t.threads,
                "latency": artifact.latency,
                "float_latency": float_lat,
                "per_runtime": {rt: dict(v, **ver["per_runtime"].get(rt, {})) for rt, v in per_rt.items()},
                "inputs": [s.to_dict() for s in artifact.inputs],
                "outputs": [s.to_dict() for s in artifact.outputs],
                "checks": artifact.checks,
            }
        )
        _record_parity(entry, parity, float_acc)
        fl = float_lat.get(preferred, {}).get("threads_N", {})
        entry["float_latency_ms_p50"] = fl.get("p50_ms")
        # per class as the device runs it (one sample at a time) where the agent ran it, and only
        # for the runtimes the manifest keeps
        rt_pred = {rt: parity.batch_1_classes.get(rt, rt_pred[rt]) for rt in artifact.runtimes}
        class_fields, class_failure = target_class_evaluation(
            evald.y, predicted_classes(float_eval), rt_pred, preferred, labels, max_class_drop
        )
        entry.update(class_fields)

        accelerated: Path | None = None
        extra: dict[str, Path] = {}
        edgetpu_manifest: dict[str, Any] | None = None
        if t.edgetpu is not None:
            accelerated, edgetpu_manifest, extra = _edgetpu(artifact.path, t, tdir, entry)
        budget.record_measurements(artifact.path, entry)

        if acc + 1e-9 < float_acc - t.limits.max_accuracy_drop:
            msg = (
                f"accuracy {acc:.4f} is {100 * (float_acc - acc):.2f} points below float {float_acc:.4f};"
                f" the {t.name} budget is {100 * t.limits.max_accuracy_drop:.2f} points"
            )
            if not allow_accuracy_drop:
                raise ToolchainError(
                    msg + " (pass --allow-accuracy-drop to ship it anyway, or try --quantize qat)"
                )
            entry["accuracy_budget"] = "exceeded, allowed by --allow-accuracy-drop: " + msg
        else:
            entry["accuracy_budget"] = "ok"
        if class_failure is not None:
            if not allow_accuracy_drop:
                raise ToolchainError(class_failure + " (or pass --allow-accuracy-drop to ship it anyway)")
            entry["class_drop_budget"] = "exceeded, allowed by --allow-accuracy-drop: " + class_failure
        else:
            entry["class_drop_budget"] = "ok"
        if artifact.size_bytes > t.limits.max_model_bytes:
            raise ToolchainError(
                f"model is {artifact.size_bytes} bytes, over the {t.name} limit of "
                f"{t.limits.max_model_bytes};"
                " prune it (--prune) or use a smaller architecture"
            )
        budget.enforce(t, entry)
        metrics = {
            k: entry[k]
            for k in (
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
        }
        metrics["eval_samples"] = evald.n
        metrics["quantize"] = "qat" if qat else "ptq"
        staging = staging_dir(dest)
        assemble_bundle(
            staging,
            **_bundle_fields(t, artifact, name, version, labels, baseline, preprocessing),
            metrics=_finite(metrics),
            accelerated_file=accelerated,
            edgetpu=edgetpu_manifest,
            extra_files=extra,
        )
        if sign_key is not None:
            _sign(staging, sign_key)
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
    return _finite(entry)


def _bundle_fields(
    t: Target,
    artifact: Any,
    name: str,
    version: int,
    labels: list[str],
    baseline: dict[str, Any],
    preprocessing: dict[str, Any] | None,
) -> dict[str, Any]:
    """Return the ``assemble_bundle`` arguments a target's bundle and its parity scratch copy share."""
    return {
        "name": name,
        "version": version,
        "target": t.name,
        "model_file": artifact.path,
        "model_format": artifact.format,
        "runtimes": list(artifact.runtimes),
        "inputs": artifact.inputs,
        "outputs": artifact.outputs,
        "labels": labels,
        "baseline": baseline,
        "threads": t.threads,
        "preprocessing": preprocessing or {"type": "none"},
    }


def _runtime_parity(
    t: Target,
    artifact: Any,
    raw_eval: Dataset,
    deployed_eval: np.ndarray,
    per_rt: dict[str, Any],
    ver: dict[str, Any],
    *,
    float_acc: float,
    bundle_fields: dict[str, Any],
    tdir: Path,
    allow_accuracy_drop: bool,
) -> Any:
    """Check every runtime of ``artifact`` through the agent on a scratch bundle (toolchain.steps.parity).

    Folds the whole-batch figures measured before into each runtime's paths, so a runtime's
    ``accuracy`` in ``per_rt`` becomes its worst over the whole batch, one sample at a time and the
    agent's batch size. Raises ParityError (one line) when no runtime is left.
    """
    from toolchain.steps.parity import check_parity, scratch_bundle

    scratch = tdir / "parity-bundle"
    try:
        assemble_bundle(scratch, **bundle_fields)
        result = check_parity(
            scratch,
            artifact.runtimes,
            raw_eval.x,
            raw_eval.y,
            deployed_eval,
            float_accuracy=float_acc,
            max_accuracy_drop=t.limits.max_accuracy_drop,
            apply_budget=not allow_accuracy_drop,
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


def _record_parity(entry: dict[str, Any], parity: Any, float_acc: float) -> None:
    """Write the parity figures into a target's report entry (``per_runtime.<name>``, the kept and
    excluded runtimes); accuracy and agreement of the target are those of the kept runtimes'
    worst paths."""
    for rt, dev in parity.per_runtime.items():
        entry["per_runtime"].setdefault(rt, {}).update(dev)
    kept = parity.kept
    for rt, why in parity.excluded.items():
        log.warning("runtime %s left out of the bundle: %s", rt, why)
    entry["runtimes"] = list(kept)
    entry["runtimes_excluded"] = dict(parity.excluded)
    entry["parity_batch_sizes"] = list(parity.batch_sizes)
    entry["accuracy"] = entry["per_runtime"][kept[0]]["accuracy"]
    entry["accuracy_drop"] = float_acc - entry["accuracy"]
    entry["top1_agreement"] = min(entry["per_runtime"][rt]["top1_agreement"] for rt in kept)
    entry["precision"] = {rt: entry["per_runtime"][rt].get("precision") for rt in kept}


def _edgetpu(
    tflite: Path, t: Target, tdir: Path, entry: dict[str, Any]
) -> tuple[Path | None, dict[str, Any], dict[str, Path]]:
    """Analyse the int8 model for the Edge TPU and compile it when the compiler is installed."""
    from toolchain import edgetpu

    assert t.edgetpu is not None
    rep = edgetpu.analyze(tflite, t.edgetpu)
    result = edgetpu.compile(tflite, tdir / "edgetpu", t.edgetpu)
    rep = rep.with_compiler(result)
    d = rep.to_dict()
    compiled = result.status == "compiled" and result.compiled_path is not None
    summary = {
        "ops_total": d["ops_total"],
        "ops_mapped": d["ops_mapped"],
        "unmapped": d["unmapped"],
        "compiled": compiled,
        "compiler_status": result.status,
        "message": result.message
        if not compiled
        else f"{result.message}; model_edgetpu.tflite runs on the Edge TPU, model.tflite is the CPU fallback",
        "compiler_version": result.compiler_version,
    }
    if compiled and result.ops_total is not None:
        summary["compiler_ops_total"] = result.ops_total
        summary["compiler_ops_mapped"] = result.ops_mapped
    entry["edgetpu"] = dict(
        summary, notes=d["notes"], on_chip_bytes_estimate=d["on_chip_bytes_estimate"], compiler=d["compiler"]
    )
    extra: dict[str, Path] = {}
    if compiled and result.log_path is not None and Path(result.log_path).is_file():
        extra[EDGETPU_LOG_FILE] = Path(result.log_path)
    accelerated = Path(result.compiled_path) if compiled and result.compiled_path is not None else None
    return accelerated, _finite(summary), extra


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively; numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
