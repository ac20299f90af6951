"""The build's second step: the float model, its scores, the model to convert, the baseline.

``prepare_reference`` fills a ``BuildContext`` with what every target compares against: the float
model's accuracy and per-class figures on the evaluation data; the model that gets converted (a
tf_keras model with its input normalisation folded into the manifest's preprocessing, pruned and
QAT fine-tuned when asked); the float outputs of that deployed model (what quantization is scored
against); the baseline profile of the calibration data that every bundle ships; and one plain float
reference file per format for size and latency comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import ModelFormat
from device_agent.formats.stats import baseline_to_dict, build_baseline
from toolchain.steps.context import BuildContext, FloatReference
from toolchain.steps.evaluate import gzip_size
from toolchain.steps.inputs import model_input
from toolchain.steps.isolate import ModelFile
from toolchain.steps.models import LoadedModel, fold_input_normalization
from toolchain.steps.per_class import accuracy, class_report, predicted_classes

# Repeats for the float reference's latency (the artifacts use the converter's default).
FLOAT_LATENCY_REPEATS = 200


def float_outputs(lm: LoadedModel, tf_model: Any | None, x: np.ndarray) -> np.ndarray:
    """Return the float model's outputs (n, K) on ``x``: ``tf_model`` when given, else the model as loaded."""
    if tf_model is None:
        return lm.predict(x)
    from toolchain.steps.data import batch_rows
    from toolchain.steps.models import PREDICT_BATCH

    step = batch_rows(x.shape[1:], PREDICT_BATCH)
    outs = [np.asarray(tf_model(x[i : i + step], training=False)) for i in range(0, len(x), step)]
    out = np.concatenate(outs, axis=0)
    return out.reshape(len(out), -1).astype(np.float32)


def prepare_reference(ctx: BuildContext) -> None:
    """Score the float model, make the model to convert and the baseline, convert the float references."""
    lm, opts, evald, calib = ctx.model, ctx.options, ctx.evald, ctx.calib
    float_eval = lm.predict(evald.x)
    ctx.float_eval = float_eval
    ctx.float_accuracy = accuracy(float_eval, evald.y)
    ctx.float_classes = class_report(evald.y, predicted_classes(float_eval), ctx.labels)

    # a tf_keras model for pruning/QAT (Keras 3 rebuilt) and for folding the input normalisation
    tf_model: Any = None
    if opts.prune is not None or opts.cluster is not None or opts.qat:
        purpose = "pruning" if opts.prune is not None else "clustering" if opts.cluster else "QAT"
        tf_model = lm.as_tf_keras(purpose)
    elif lm.kind == "tf_keras":
        tf_model = lm.model
    if tf_model is not None:
        tf_model, ctx.preprocessing = fold_input_normalization(tf_model)
    # A tf_keras model PTQ converts as loaded (no fine-tune) can be loaded again by a child process.
    tuned = opts.prune is not None or opts.cluster is not None or opts.qat
    from_file = (
        None if tuned or lm.kind != "tf_keras" else ModelFile(lm.path, False, int(lm.model.count_params()))
    )
    # Float reference for size/latency: the model as given, or, when its input normalisation was
    # folded into the manifest, the folded float model (same weights, standardised input).
    reference_model = tf_model if ctx.preprocessing is not None else None
    # What the converted model takes: raw values, or standardised ones when normalisation was folded out.
    calib_m = ctx.model_calib = model_input(calib, ctx.preprocessing)
    eval_m = ctx.model_eval = model_input(evald, ctx.preprocessing)
    weights: dict[int, float] | None = None
    if opts.prune is not None or opts.qat or opts.cluster is not None:
        from toolchain.steps.classweights import finetune_class_weights
        from toolchain.steps.models import read_model_meta

        # the weighting train used, so the fine-tunes do not undo it on unbalanced labels
        weights, weight_mode = finetune_class_weights(
            calib_m, len(ctx.labels), read_model_meta(ctx.model_path)
        )
    if opts.prune is not None:
        from toolchain.steps.prune import prune_model

        pr = prune_model(tf_model, calib_m, opts.prune, progress=opts.progress, class_weight=weights)
        tf_model = pr.model
        ctx.prune_report = dict(
            pr.to_dict(),
            class_weight_mode=weight_mode,
            class_weight={ctx.labels[k]: v for k, v in weights.items()} if weights else None,
        )
        ctx.pruned_accuracy = accuracy(float_outputs(lm, tf_model, eval_m.x), evald.y)
    if opts.cluster is not None:
        from toolchain.steps.cluster import cluster_model

        cr = cluster_model(
            tf_model,
            calib_m,
            opts.cluster,
            preserve_sparsity=opts.prune is not None,
            progress=opts.progress,
            class_weight=weights,
        )
        tf_model = cr.model
        ctx.cluster_report = cr.to_dict()
        ctx.clustered_accuracy = accuracy(float_outputs(lm, tf_model, eval_m.x), evald.y)
    deployed_float = tf_model  # the float model that gets quantized (pruned/clustered or the original)
    if opts.qat:
        from toolchain.steps.qat import qat_finetune

        ctx.source_model = qat_finetune(
            tf_model,
            calib_m,
            pruned=opts.prune is not None,
            clustered=opts.cluster is not None,
            progress=opts.progress,
            class_weight=weights,
        )
    elif from_file is not None:
        # the model to convert is the file's (normalisation folded out): large ones convert in a child
        ctx.source_model = ModelFile(from_file.path, True, from_file.params, live=tf_model)
    else:
        ctx.source_model = tf_model if tf_model is not None else lm.conversion_source(ctx.work)

    float_calib = float_outputs(lm, deployed_float, calib_m.x)
    ctx.deployed_eval = (
        float_outputs(lm, deployed_float, eval_m.x) if deployed_float is not None else float_eval
    )
    ctx.baseline = baseline_to_dict(
        build_baseline(calib.x, float_calib, ctx.labels, feature_names=ctx.data.feature_names),
        source={"data": Path(ctx.data.source).name, "samples": calib.n, "model": ctx.model_path.name},
    )

    # float references per format
    if from_file is not None:
        folded = reference_model is not None
        live = reference_model if folded else lm.model
        original_source = ModelFile(from_file.path, folded, from_file.params, live=live)
    elif reference_model is not None:
        original_source = reference_model
    else:
        original_source = lm.model if lm.kind == "tf_keras" else lm.conversion_source(ctx.work)
    ctx.float_source = original_source
    for fmt in sorted({t.format for t in ctx.targets}, key=lambda f: f.value):
        ctx.float_refs[fmt] = float_reference(original_source, fmt, ctx.work)


def float_reference(source: Any, fmt: ModelFormat, work: Path) -> FloatReference:
    """Convert the plain float32 model to ``fmt`` in ``work``; return it with its sizes."""
    from toolchain.steps.convert import convert_float

    path = convert_float(source, fmt, work / f"float.{fmt.value}")
    return FloatReference(fmt, path, path.stat().st_size, gzip_size(path))


def float_latency(
    ref: FloatReference, runtimes: Sequence[str], sample: np.ndarray, threads: int
) -> dict[str, Any]:
    """Return ``{runtime: {"threads_1", "threads_N"}}`` of the float reference, timing each pair once.

    The measurements stay in ``ref.latency`` (``"runtime@threads"``) for the next target of the format.
    """
    from toolchain.steps.latency import measure_latency

    out: dict[str, Any] = {}
    for rt in runtimes:
        key = f"{rt}@{threads}"
        if key not in ref.latency:
            one = ref.latency.get(f"{rt}@1") or measure_latency(
                ref.path, rt, sample, 1, FLOAT_LATENCY_REPEATS
            )
            ref.latency[f"{rt}@1"] = one
            many = (
                one if threads == 1 else measure_latency(ref.path, rt, sample, threads, FLOAT_LATENCY_REPEATS)
            )
            ref.latency[key] = many
        out[rt] = {
            "threads_1": ref.latency[f"{rt}@1"],
            "threads_N": dict(ref.latency[key], threads=threads),
        }
    return out
