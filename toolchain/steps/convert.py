"""Convert a Keras model into a target's int8 artifact, verify it in the device runtimes, time it.

The neutral part lives here: calibration checks, the ``Artifact`` record, the back-end registry and
the order of work. Each model format has one small back end (``convert_tflite``, ``convert_onnx``)
named in ``BACKENDS`` and imported on first use, so adding a format adds a module, not an ``if``.

Conversion never trusts the converter's flags: every artifact is re-read in the runtimes the device
will use (LiteRT, ONNX Runtime, OpenVINO; never TensorFlow) and checked against the target's promise
(``toolchain.steps.verify``), and its latency is measured in each candidate runtime
(``toolchain.steps.latency``). The ``Artifact`` record and the errors live in
``toolchain.steps.artifact``, which those two modules share with this one (and import nothing back).
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import ModelFormat
from toolchain.steps.artifact import Artifact, ConversionError, VerificationError, read_io_specs
from toolchain.steps.latency import measure_runtimes
from toolchain.steps.verify import inspect_artifact
from toolchain.targets import Target

# How many calibration samples PTQ uses (drawn with a fixed seed when more are given), and the
# fewest it accepts: below ~20 samples min/max ranges follow single outliers and accuracy drops.
CALIBRATION_SAMPLES = 300
MIN_CALIBRATION_SAMPLES = 20
CALIBRATION_SEED = 0
# Batch size used to feed calibration data to ONNX Runtime's calibrator (TFLite takes one sample at a time).
CALIBRATION_BATCH = 32

# format -> "module:function" of the back end; loaded on first use.
BACKENDS: dict[ModelFormat, str] = {
    ModelFormat.TFLITE: "toolchain.steps.convert_tflite:convert",
    ModelFormat.ONNX: "toolchain.steps.convert_onnx:convert",
}
FLOAT_BACKENDS: dict[ModelFormat, str] = {
    ModelFormat.TFLITE: "toolchain.steps.convert_tflite:convert_float",
    ModelFormat.ONNX: "toolchain.steps.convert_onnx:convert_float",
}
MODEL_FILES: dict[ModelFormat, str] = {ModelFormat.TFLITE: "model.tflite", ModelFormat.ONNX: "model.onnx"}

# A tf_keras model (maybe a tfmot QAT model or a pruning-stripped one) or a SavedModel directory
# (how Keras 3 ``.keras`` files arrive: the pipeline exports them with ``model.export(dir)`` first),
# or a ``toolchain.steps.isolate.ModelFile`` that large models convert from in a child process.
ModelSource = Any


# --------------------------------------------------------------------------------------------------
# Calibration data


def check_calibration(calib_x: Any, sample_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Return float32 calibration samples (at most ``CALIBRATION_SAMPLES``) or raise ConversionError.

    ``calib_x`` holds raw inputs ``(n, *sample_shape)``, the values the device will see. More than
    ``CALIBRATION_SAMPLES`` rows are subsampled with a fixed seed so builds are reproducible.
    """
    try:
        arr = np.asarray(calib_x)
    except Exception as e:  # ragged lists and the like
        raise ConversionError(
            f"calibration data is not an array ({e}); pass (n, *input_shape) numbers"
        ) from None
    if arr.dtype.kind not in "fiub":
        raise ConversionError(f"calibration data has dtype {arr.dtype}; it must be numeric (--data)")
    if arr.ndim < 2:
        raise ConversionError(
            f"calibration data has shape {arr.shape}; need (n, *input_shape) samples (--data)"
        )
    n = int(arr.shape[0])
    if n < MIN_CALIBRATION_SAMPLES:
        raise ConversionError(
            f"calibration data has {n} samples; need at least {MIN_CALIBRATION_SAMPLES} (--data)"
        )
    if sample_shape is not None and tuple(arr.shape[1:]) != tuple(sample_shape):
        want = "x".join(str(d) for d in sample_shape)
        raise ConversionError(
            f"calibration data has sample shape {tuple(arr.shape[1:])}; the model takes ({want}) (--data)"
        )
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr.reshape(n, -1)).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        first = int(np.flatnonzero(~finite)[0])
        raise ConversionError(
            f"calibration data holds NaN or infinite values in {bad} of {n} samples (first: row {first});"
            " clean or drop them (--data)"
        )
    if n > CALIBRATION_SAMPLES:
        idx = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(n, CALIBRATION_SAMPLES, replace=False))
        arr = arr[idx]
    return np.ascontiguousarray(arr)


def calibration_batches(calib: np.ndarray, batch: int, progress: bool, desc: str) -> Iterator[np.ndarray]:
    """Yield calibration batches with a tqdm bar (quiet when ``progress`` is False or not a TTY).

    Large samples go in smaller batches (``toolchain.steps.data.batch_rows``): the calibrators hold a
    batch's activations, and min/max ranges do not depend on how the samples are batched.
    """
    from tqdm.auto import tqdm

    from toolchain.steps.data import batch_rows
    from toolchain.tfenv import terminal_stderr

    batch = batch_rows(calib.shape[1:], batch)

    bar = tqdm(
        total=len(calib),
        desc=desc,
        unit="sample",
        disable=None if progress else True,
        leave=False,
        file=terminal_stderr(),
    )
    try:
        for i in range(0, len(calib), batch):
            chunk = calib[i : i + batch]
            bar.update(len(chunk))
            yield chunk
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# Registry and entry points


def _load(spec: str) -> Callable[..., Any]:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def backend_for(fmt: ModelFormat, float_model: bool = False) -> Callable[..., Any]:
    """Return the back-end function for a format (int8 by default, the float reference otherwise)."""
    table = FLOAT_BACKENDS if float_model else BACKENDS
    if fmt not in table:
        raise ConversionError(
            f"no converter for format {fmt.value!r}. Known: {', '.join(f.value for f in table)}"
        )
    return _load(table[fmt])


def convert_for_target(
    model: ModelSource,
    target: Target,
    calib_x: np.ndarray,
    out_dir: Path,
    *,
    qat: bool = False,
    progress: bool = True,
    prebuilt: Path | None = None,
) -> Artifact:
    """Convert ``model`` to ``target``'s int8 artifact in ``out_dir``, check it and time it.

    ``prebuilt``: an int8 file already written for this target (the form ``toolchain.steps.int8_forms``
    chose); it is copied in place of converting again, then checked and timed like a fresh one.

    ``calib_x`` holds raw float inputs ``(n, *sample_shape)``. With ``qat=True`` the model is a tfmot
    quantization-aware model and its learned ranges are used (see docs/conversion.md for ONNX).
    Raises ConversionError (conversion failed, bad calibration data) or VerificationError (the
    artifact breaks the target's promise, e.g. a float op left in a full-int8 model).
    """
    calib = check_calibration(calib_x)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILES[target.format]
    if prebuilt is not None:
        shutil.copyfile(prebuilt, path)
    else:
        run_backend(
            BACKENDS,
            target.format,
            model,
            (target, calib, path),
            {"qat": qat, "progress": progress},
            target.name,
        )
    if not path.is_file() or path.stat().st_size == 0:
        raise ConversionError(f"the {target.format.value} converter wrote no model to {path}")
    runtimes = usable_runtimes(target)
    inputs, outputs = read_io_specs(path, target.format)
    artifact = Artifact(
        path=path,
        format=target.format,
        inputs=inputs,
        outputs=outputs,
        runtimes=runtimes,
        size_bytes=path.stat().st_size,
    )
    try:
        artifact.checks = inspect_artifact(artifact, target, qat=qat)
    except VerificationError:
        remove_quietly(
            path
        )  # never leave an artifact that breaks the promise where a bundle could pick it up
        raise
    sample = calib[:1]
    artifact.latency = measure_runtimes(path, runtimes, sample, target.threads)
    if len(runtimes) > 1:
        artifact.runtimes = sorted(runtimes, key=lambda r: artifact.latency[r]["threads_N"]["p50_ms"])
    return artifact


def run_backend(
    table: dict[ModelFormat, str],
    fmt: ModelFormat,
    model: ModelSource,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    what: str,
) -> None:
    """Run the back end of ``fmt`` from ``table`` on ``model``: in a child process when ``model`` is a
    large ``ModelFile`` (``toolchain.steps.isolate``), here otherwise."""
    from toolchain.steps import isolate

    backend_for(fmt, float_model=table is FLOAT_BACKENDS)  # an unknown format fails here, in one line
    if isolate.in_child(model):
        isolate.run_backend(table[fmt], model, args, kwargs, what)
    else:
        _load(table[fmt])(isolate.resolve(model), *args, **kwargs)


def convert_float(model: ModelSource, fmt: ModelFormat, out_path: Path) -> Path:
    """Write the plain float32 model (.tflite or .onnx, dynamic batch) used as the reference."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    run_backend(FLOAT_BACKENDS, fmt, model, (out_path,), {}, f"the float {fmt.value} reference")
    if not out_path.is_file() or out_path.stat().st_size == 0:
        raise ConversionError(f"the float {fmt.value} converter wrote no model to {out_path}")
    return out_path


def usable_runtimes(target: Target) -> list[str]:
    """Return the target's runtimes, all of which must be installed on the build host to verify."""
    from device_agent.runtimes import is_installed

    names = [r.value for r in target.runtimes]
    missing = [r for r in names if not is_installed(r)]
    if missing:
        raise ConversionError(
            f"target {target.name!r} is verified in {', '.join(names)} but {', '.join(missing)}"
            " is not installed here; pip install 'edgefleet[host]'"
        )
    return names


def remove_quietly(path: Path) -> None:
    """Delete a file or folder left behind by a failed conversion."""
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def first_line(e: BaseException, limit: int = 300) -> str:
    """Return the most telling single line of a converter's (often huge) error message."""
    text = str(e) or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error:" in low and "loc(" not in low[:5]:
            return ln[:limit]
    return (lines[0] if lines else type(e).__name__)[:limit]
