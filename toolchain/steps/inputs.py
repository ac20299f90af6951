"""The build's first step: check and load the model, the data and the labels; make the BuildContext.

Bad input fails here, in one line and before any long work: the options, the output folder, the
model, the calibration and evaluation data (finite, the model's shape, enough samples), the class
names, and every destination ``DIR/<target>`` (it must be able to take this bundle's name and
version). Nothing is written before these checks pass; then ``DIR`` and a work folder inside it are
created.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from device_agent.formats.manifest import ModelFormat
from toolchain.steps.context import BuildContext, BuildOptions
from toolchain.steps.data import DataError, Dataset, check_finite, check_fits, conform, load_dataset
from toolchain.steps.models import (
    ModelError,
    apply_preprocessing,
    load_model,
    onnx_input_layout,
    onnx_keras_only,
    read_model_meta,
)
from toolchain.steps.package import bundle_name, check_destination, check_name, check_output_dir, utc_now
from toolchain.targets import Target


def min_calibration() -> int:
    """Return the fewest calibration samples the converter accepts."""
    from toolchain.steps import convert

    return int(getattr(convert, "MIN_CALIBRATION_SAMPLES", 20))


def load_inputs(
    model_path: str | Path,
    data: str | Path | Dataset,
    targets: list[Target],
    out_dir: str | Path,
    options: BuildOptions,
    *,
    eval_data: str | Path | Dataset | None = None,
    label: str | None = None,
    name: str | None = None,
) -> BuildContext:
    """Check and load everything one build needs; return its context (work folder created, in ``DIR``).

    Without ``eval_data`` the labelled ``data`` is split (80 % calibration, 20 % held out to measure
    accuracy). Raises DataError / ToolchainError (one line) on bad input, before anything is written.
    """
    model_path = Path(model_path)
    out = check_output_dir(out_dir)  # before loading anything: a bad --out fails in one line, at once
    name = (
        check_name(name)
        if name
        else bundle_name(model_path.stem if model_path.is_file() else model_path.name)
    )

    if model_path.suffix.lower() == ".onnx":
        check_onnx_options(model_path, options, targets)
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
    if options.prune is not None or options.qat:
        calib = finetune_data(calib, labels, options)
    minimum = min_calibration()
    if calib.n < minimum:
        raise DataError(
            f"calibration data {ds.source!r} has {calib.n} samples"
            + (" after holding out 20% for evaluation" if eval_data is None else "")
            + f"; need at least {minimum} (pass more data with --data)"
        )
    if evald.n == 0:
        raise DataError("no evaluation samples; pass --eval-data TEST or more --data")

    # Fail before any long work when a destination cannot take the bundle.
    for t in targets:
        check_destination(out / t.name, name, options.version, t.name)
    out.mkdir(parents=True, exist_ok=True)

    return BuildContext(
        options=options,
        targets=targets,
        name=name,
        out=out,
        work=Path(tempfile.mkdtemp(prefix=".edgefleet-build-", dir=out)),
        model_path=model_path,
        model=lm,
        data=ds,
        calib=calib,
        evald=evald,
        eval_note=eval_note,
        labels=labels,
        labels_source=labels_source,
        created_at=utc_now(),
        input_layout=_layout(onnx_input_layout(model_path)) if lm.kind == "onnx" else None,
    )


def finetune_data(calib: Dataset, labels: list[str], options: BuildOptions) -> Dataset:
    """Return the calibration data pruning and QAT fine-tune on, labels in the model's class order.

    Both train on it, so it needs labels (only there: PTQ calibrates on ``x`` alone); refused in one
    line before any work when it has none.
    """
    if not calib.labelled:
        flags = " and ".join(
            f for f, on in (("--prune", options.prune is not None), ("--quantize qat", options.qat)) if on
        )
        raise DataError(
            f"{flags} fine-tune the model on --data, but {calib.source!r} has no labels (no 'y');"
            " pass labelled --data, or build with --quantize ptq and no --prune"
        )
    return conform(calib, labels) if calib.class_names != labels else calib


def check_onnx_options(model_path: Path, options: BuildOptions, targets: list[Target]) -> None:
    """Refuse what an ONNX model cannot do, in one line: pruning, QAT, and TFLite targets.

    TFLite targets would need an ONNX -> TensorFlow converter that installs beside the TensorFlow pin;
    none does today (docs/conversion.md, "ONNX models").
    """
    if options.prune is not None:
        raise ModelError(onnx_keras_only("pruning (--prune)", model_path))
    if options.cluster is not None:
        raise ModelError(onnx_keras_only("clustering (--cluster)", model_path))
    if options.qat:
        raise ModelError(onnx_keras_only("QAT (--quantize qat)", model_path))
    tflite = [t.name for t in targets if t.format is ModelFormat.TFLITE]
    if tflite:
        raise ModelError(
            f"target(s) {', '.join(tflite)} need a TFLite model, which edgefleet cannot make from ONNX"
            f" {model_path.name!r} yet; build ONNX models for x86 only, or pass the Keras model"
            " (see docs/conversion.md)"
        )


def _layout(layout: str | None) -> dict[str, str] | None:
    """The manifest's ``input_layout``: the ONNX path ships the user's graph, so both sides agree."""
    return None if layout is None else {"caller": layout, "model": layout}


def model_input(ds: Dataset, preprocessing: dict[str, Any] | None) -> Dataset:
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
