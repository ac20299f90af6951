"""``edgefleet build --task regression``: one verified int8 bundle per target for a regression model.

The same conversion, verification and packaging as a classifier (``toolchain.steps.convert``,
``toolchain.steps.package``), with what regression needs instead of accuracy:

- the manifest's ``task`` carries each target's ``scale`` and ``offset`` (the training targets'
  std and mean, from the model's sidecar), so the agent returns values in the user's units while
  the int8 output quantizes the standardised value; the output step per target
  (``output scale * std``) is reported;
- the baseline profiles the float model's predictions (``Profile.values``), so the fleet watches
  prediction drift;
- ``mae``, ``rmse``, ``r2`` per target are measured through the agent itself (``device_agent.agent``,
  one sample at a time, every runtime of the bundle) beside the float model's ``float_mae`` ...;
- the error budget: a target's MAE may exceed the float MAE by ``max_error_increase`` percent
  (default 5); ``allow_error_increase`` ships it anyway with the verdict saying so.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from device_agent.formats.stats import baseline_to_dict, build_baseline
from toolchain.errors import USER_ERRORS, ToolchainError
from toolchain.report import REPORT_SCHEMA, merge_previous
from toolchain.steps.convert import convert_for_target
from toolchain.steps.data import DataError
from toolchain.steps.models import apply_preprocessing, fold_input_normalization, load_model
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
from toolchain.steps.regression import RegressionData, error_metrics, load_regression_data, regression_meta
from toolchain.targets import Target, resolve_targets

DEFAULT_MAX_ERROR_INCREASE = 5.0  # percent of the float model's MAE, per target
HOLDOUT = 0.2
MIN_CALIBRATION = 20


class RegressionBuildError(ToolchainError):
    """One or more targets failed; ``report`` holds what was built and why the rest failed."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


def device_values(bundle: Path, runtime: str, x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Run ``x`` through the agent on ``bundle`` in ``runtime``, one sample at a time; return the
    values (n, T) in the user's units and each call's wall time in ms."""
    from device_agent.agent import Agent

    agent = Agent(bundle, allow_unsigned=True, runtime=runtime, threads=1)
    out = np.empty((x.shape[0], len(agent.labels)), dtype=np.float64)
    times = []
    for i in range(x.shape[0]):
        t0 = time.perf_counter()
        out[i] = agent.predict(x[i : i + 1]).outputs[0]
        times.append((time.perf_counter() - t0) * 1000.0)
    return out, times


def output_quantization(artifact: Any) -> tuple[float, int, int, int] | None:
    """The int8 quantization of the model's output values as (scale, zero point, qmin, qmax): the
    output tensor's own, or (float outputs) that of the tensor the final dequantize reads; None when
    the output is not quantized at all."""
    q = artifact.outputs[0].quantization
    if q is not None:
        info = np.iinfo(np.dtype(artifact.outputs[0].dtype.value))
        return float(q.scale), int(q.zero_point), int(info.min), int(info.max)
    try:
        if artifact.format.value == "tflite":
            from device_agent.runtimes import load_runtime_model

            model: Any = load_runtime_model(artifact.path, "litert", threads=1)
            tensors = {int(t["index"]): t for t in model.tensors()}
            out_idx = next(i for i, t in tensors.items() if t["name"] == artifact.outputs[0].name)
            for op in model.ops():
                if op["op_name"] == "DEQUANTIZE" and out_idx in [int(i) for i in op["outputs"]]:
                    src = tensors[int(op["inputs"][0])]
                    scale, zp = src["quantization"]
                    info = np.iinfo(np.dtype(src["dtype"]))
                    return (float(scale), int(zp), int(info.min), int(info.max)) if scale else None
            return None
        import onnx
        from onnx import numpy_helper

        g = onnx.load(str(artifact.path)).graph
        inits = {i.name: i for i in g.initializer}
        outs = {o.name for o in g.output}
        for n in g.node:
            if n.op_type == "DequantizeLinear" and set(n.output) & outs and n.input[1] in inits:
                zp = (
                    numpy_helper.to_array(inits[n.input[2]])
                    if len(n.input) > 2 and n.input[2] in inits
                    else None
                )
                info = np.iinfo(zp.dtype if zp is not None else np.uint8)
                return (
                    float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0]),
                    int(zp.reshape(-1)[0]) if zp is not None else 0,
                    int(info.min),
                    int(info.max),
                )
    except (StopIteration, KeyError, IndexError, OSError, ValueError, TypeError):
        return None
    return None


def _verdict(
    metrics: dict[str, dict[str, float]], floats: dict[str, dict[str, float]], budget: float
) -> list[str]:
    """Return one line per target whose MAE exceeds the float MAE by more than ``budget`` percent."""
    over = []
    for name, m in metrics.items():
        f = floats[name]["mae"]
        limit = f * (1 + budget / 100.0)
        if m["mae"] > limit + 1e-12:
            inc = 100.0 * (m["mae"] - f) / f if f > 0 else float("inf")
            over.append(f"{name}: MAE {m['mae']:.4g} is {inc:.1f}% above float {f:.4g} (budget {budget:g}%)")
    return over


def build_regression_bundles(
    model_path: str | Path,
    data: str | Path | RegressionData,
    targets: Sequence[str],
    out_dir: str | Path,
    *,
    eval_data: str | Path | RegressionData | None = None,
    label: str | None = None,
    version: int = 1,
    name: str | None = None,
    sign_key: str | Path | None = None,
    max_error_increase: float = DEFAULT_MAX_ERROR_INCREASE,
    allow_error_increase: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build one regression bundle per target into ``out_dir/<target>/``; return the report."""
    t_start = time.perf_counter()
    if not (0 <= max_error_increase < float("inf")):
        raise ToolchainError(f"--max-error-increase must be a percentage >= 0, got {max_error_increase}")
    model_path = Path(model_path)
    out = check_output_dir(out_dir)
    name = (
        check_name(name)
        if name
        else bundle_name(model_path.stem if model_path.is_file() else model_path.name)
    )
    target_list: list[Target] = resolve_targets(list(targets))
    if sign_key is not None:
        from toolchain.build import _check_sign_key

        _check_sign_key(Path(sign_key))
    lm = load_model(model_path)
    reg = regression_meta(model_path, lm.n_outputs)
    names = [str(n) for n in reg["targets"]]
    mean, std = np.asarray(reg["mean"], dtype=np.float64), np.asarray(reg["std"], dtype=np.float64)
    ds = data if isinstance(data, RegressionData) else load_regression_data(data, label)
    _check_fits(ds, lm.input_shape, names, "data")
    if eval_data is None:
        calib, evald = ds.split(HOLDOUT, seed=0)
        eval_note = "held out from --data"
    else:
        calib = ds
        evald = eval_data if isinstance(eval_data, RegressionData) else load_regression_data(eval_data, label)
        _check_fits(evald, lm.input_shape, names, "eval data")
        eval_note = evald.source
    if calib.n < MIN_CALIBRATION or evald.n == 0:
        raise DataError(
            f"{calib.n} calibration and {evald.n} evaluation samples; need at least {MIN_CALIBRATION} and 1"
            " (pass more --data or --eval-data)"
        )
    for t in target_list:
        check_destination(out / t.name, name, version, t.name)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".edgefleet-build-", dir=out))
    results: dict[str, dict[str, Any]] = {}
    try:
        source: Any
        pre: dict[str, Any] | None = None
        if lm.kind == "tf_keras":
            source, pre = fold_input_normalization(lm.model)
        else:
            source = lm.conversion_source(work)
        float_eval = lm.predict(evald.x).astype(np.float64) * std + mean
        float_metrics = error_metrics(evald.y, float_eval, names)
        calib_values = lm.predict(calib.x).astype(np.float64) * std + mean
        baseline = baseline_to_dict(
            build_baseline(
                calib.x, None, names, feature_names=ds.feature_names, values=calib_values, value_names=names
            ),
            source={"data": Path(ds.source).name, "samples": calib.n, "model": model_path.name},
        )
        task = {"type": "regression", "scale": [float(v) for v in std], "offset": [float(v) for v in mean]}
        calib_m = apply_preprocessing(calib.x, pre)
        for t in target_list:
            results[t.name] = _build_target(
                t,
                source=source,
                calib_m=calib_m,
                evald=evald,
                names=names,
                std=std,
                mean=mean,
                task=task,
                baseline=baseline,
                pre=pre,
                float_metrics=float_metrics,
                work=work / t.name,
                dest=out / t.name,
                name=name,
                version=version,
                sign_key=Path(sign_key) if sign_key else None,
                budget=max_error_increase,
                allow=allow_error_increase,
                progress=progress,
            )
    finally:
        discard(work)
    report = {
        "schema": REPORT_SCHEMA,
        "task": "regression",
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
            "quantize": "ptq",
            "version": version,
            "max_error_increase": max_error_increase,
            "allow_error_increase": allow_error_increase,
        },
        "labels": names,
        "regression": {"targets": names, "mean": task["offset"], "std": task["scale"]},
        "float": {"metrics": float_metrics},
        "targets": results,
        "build_s": round(time.perf_counter() - t_start, 2),
    }
    if pre is not None:
        report["preprocessing"] = pre
    # targets built into this folder earlier (same bundle name, bundle still there) stay in the report
    report = _finite(merge_previous(out, report))
    write_regression_report(out, report)
    failures = [f"{n}: {r['error']}" for n, r in results.items() if r["status"] != "ok"]
    if failures:
        head = (
            failures[0] if len(failures) == 1 else f"{len(failures)} targets failed: " + "; ".join(failures)
        )
        raise RegressionBuildError(head, report)
    return report


def _check_fits(ds: RegressionData, input_shape: tuple[int, ...], names: list[str], what: str) -> None:
    if tuple(ds.x.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"{what} {ds.source!r} has samples of shape {tuple(ds.x.shape[1:])}; the model takes {tuple(input_shape)}"
        )
    if ds.y.shape[1] != len(names):
        raise DataError(
            f"{what} {ds.source!r} has {ds.y.shape[1]} target(s); the model predicts {len(names)} ({names})"
        )


def _build_target(
    t: Target,
    *,
    source: Any,
    calib_m: np.ndarray,
    evald: RegressionData,
    names: list[str],
    std: np.ndarray,
    mean: np.ndarray,
    task: dict[str, Any],
    baseline: dict[str, Any],
    pre: dict[str, Any] | None,
    float_metrics: dict[str, dict[str, float]],
    work: Path,
    dest: Path,
    name: str,
    version: int,
    sign_key: Path | None,
    budget: float,
    allow: bool,
    progress: bool,
) -> dict[str, Any]:
    """Convert, measure through the agent, check the error budget and place one target's bundle."""
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"target": t.name, "format": t.format.value, "status": "failed", "error": None}
    staging: Path | None = None
    try:
        artifact = convert_for_target(source, t, calib_m, work, progress=progress)
        fields: dict[str, Any] = {
            "name": name,
            "version": version,
            "target": t.name,
            "model_file": artifact.path,
            "model_format": artifact.format,
            "inputs": artifact.inputs,
            "outputs": artifact.outputs,
            "labels": names,
            "baseline": baseline,
            "threads": t.threads,
            "preprocessing": pre or {"type": "none"},
            "task": task,
        }
        scratch = work / "scratch-bundle"
        assemble_bundle(scratch, runtimes=list(artifact.runtimes), **fields)
        per_runtime: dict[str, Any] = {}
        excluded: dict[str, str] = {}
        for rt in artifact.runtimes:
            try:
                values, times = device_values(scratch, rt, evald.x)
            except USER_ERRORS as e:
                excluded[rt] = str(e)
                continue
            m = error_metrics(evald.y, values, names)
            per_runtime[rt] = {
                "metrics": m,
                "agent_ms_p50": float(np.percentile(times, 50)),
                "within_budget": not _verdict(m, float_metrics, budget),
            }
        shutil.rmtree(scratch, ignore_errors=True)
        if not per_runtime:
            raise ToolchainError(
                "no runtime ran the bundle through the agent: " + "; ".join(excluded.values())
            )
        # Runtimes over the budget leave the bundle when another one keeps it.
        kept = [rt for rt in artifact.runtimes if rt in per_runtime and per_runtime[rt]["within_budget"]]
        kept = kept or [rt for rt in artifact.runtimes if rt in per_runtime]
        for rt in artifact.runtimes:
            if rt in per_runtime and rt not in kept:
                excluded[rt] = "error above the budget: " + "; ".join(
                    _verdict(per_runtime[rt]["metrics"], float_metrics, budget)
                )
        preferred = kept[0]
        metrics = per_runtime[preferred]["metrics"]
        oq = output_quantization(artifact)
        step = [float(oq[0] * s) for s in std] if oq is not None else None
        # What the int8 output can express, in the user's units: values beyond it clip to its ends.
        span = None
        if oq is not None:
            scale, zp, qmin, qmax = oq
            span = [
                [float((qmin - zp) * scale * s + m), float((qmax - zp) * scale * s + m)]
                for s, m in zip(std, mean, strict=True)
            ]
        lat = artifact.latency.get(preferred, {}).get("threads_N", {})
        per_target = {
            n: {
                **metrics[n],
                **{f"float_{k}": v for k, v in float_metrics[n].items()},
                "mae_increase_pct": (
                    100.0 * (metrics[n]["mae"] - float_metrics[n]["mae"]) / float_metrics[n]["mae"]
                    if float_metrics[n]["mae"] > 0
                    else None
                ),
                "output_step": step[j] if step is not None else None,
                "output_range": span[j] if span is not None else None,
                "label_range": [float(evald.y[:, j].min()), float(evald.y[:, j].max())],
            }
            for j, n in enumerate(names)
        }
        notes = [
            f"{n}: evaluation values reach {lab[0]:.4g}..{lab[1]:.4g}, the int8 output spans"
            f" {rng[0]:.4g}..{rng[1]:.4g}; predictions beyond it clip (calibrate with data covering the range)"
            for n in names
            if (rng := per_target[n]["output_range"]) is not None
            and ((lab := per_target[n]["label_range"])[0] < rng[0] or lab[1] > rng[1])
        ]
        if notes:
            entry["notes"] = notes
        over = _verdict(metrics, float_metrics, budget)
        entry.update(
            {
                "runtimes": kept,
                "preferred_runtime": preferred,
                "runtimes_excluded": excluded,
                "per_target": per_target,
                "per_runtime": per_runtime,
                "size_bytes": artifact.size_bytes,
                "latency_ms_p50": lat.get("p50_ms"),
                "latency_ms_p95": lat.get("p95_ms"),
                "outputs": [s.to_dict() for s in artifact.outputs],
                "measured_through": "agent, one sample at a time",
            }
        )
        if over:
            msg = "; ".join(over)
            if not allow:
                entry["error_budget"] = "exceeded: " + msg
                raise ToolchainError(
                    msg + " (calibrate with more --data, or pass --allow-accuracy-drop to ship it anyway)"
                )
            entry["error_budget"] = "exceeded, allowed by --allow-accuracy-drop: " + msg
        else:
            entry["error_budget"] = "ok"
        if artifact.size_bytes > t.limits.max_model_bytes:
            raise ToolchainError(
                f"model is {artifact.size_bytes} bytes, over the {t.name} limit of {t.limits.max_model_bytes}"
            )
        manifest_metrics = {
            "task": "regression",
            "eval_samples": evald.n,
            "quantize": "ptq",
            "size_bytes": artifact.size_bytes,
            "latency_ms_p50": lat.get("p50_ms"),
            "preferred_runtime": preferred,
            **{f"{k}_{n}": per_target[n][k] for n in names for k in ("mae", "float_mae", "rmse", "r2")},
        }
        edgetpu_fields: dict[str, Any] = {}
        if t.edgetpu is not None:  # coral: the same Edge TPU analysis and compile as a classifier's
            from types import SimpleNamespace

            from toolchain.steps.target import analyse_edgetpu

            holder = SimpleNamespace(edgetpu=None)
            accelerated, summary, extra = analyse_edgetpu(t, artifact.path, work, cast(Any, holder))
            entry["edgetpu"] = holder.edgetpu
            edgetpu_fields = {"accelerated_file": accelerated, "edgetpu": summary, "extra_files": extra}
        staging = staging_dir(dest)
        fields_final = dict(fields, metrics=_finite(manifest_metrics), **edgetpu_fields)
        assemble_bundle(staging, runtimes=kept, **fields_final)
        if sign_key is not None:
            from toolchain.build import _sign

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
    return entry


def _finite(o: Any) -> Any:
    """Replace NaN and infinities by None throughout (strict JSON)."""
    if isinstance(o, float):
        return o if np.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


def write_regression_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and a small ``report.html`` (a table per target) atomically."""
    for path, text in (
        (out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n"),
        (out / "report.html", render_regression_html(report)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def metric_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per (hardware target, regression target): MAE int8 vs float, RMSE, R2, output step."""
    rows = []
    for tname, entry in report["targets"].items():
        if entry.get("status") != "ok":
            rows.append([tname, "-", "failed", entry.get("error") or "", "", "", "", ""])
            continue
        for n, m in entry["per_target"].items():
            rows.append(
                [
                    tname,
                    n,
                    f"{m['mae']:.4g}",
                    f"{m['float_mae']:.4g}",
                    "-" if m["mae_increase_pct"] is None else f"{m['mae_increase_pct']:+.1f}%",
                    f"{m['rmse']:.4g}",
                    "-" if m["r2"] is None else f"{m['r2']:.4f}",
                    "-" if m["output_step"] is None else f"{m['output_step']:.3g}",
                ]
            )
    return rows


METRIC_HEADERS = ["target", "output", "MAE", "float MAE", "change", "RMSE", "R2", "output step"]


def render_regression_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page of the regression report (no scripts, no external resources)."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in METRIC_HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in metric_rows(report))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + e(f"{report['name']} v{report['version']} (regression)")
        + "</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
        + f"</head><body><h1>{e(report['name'])} v{report['version']}: regression</h1>"
        + f"<p>Measured through the agent, one sample at a time, on {report['data']['eval']['samples']} samples"
        + f" ({e(str(report['data']['eval']['source']))}); error budget {report['options']['max_error_increase']:g}%"
        + " MAE increase over float.</p>"
        + f"<table><tr>{head}</tr>{body}</table></body></html>\n"
    )
