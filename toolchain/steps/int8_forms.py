"""Pick the fastest int8 form of an ONNX target that keeps the default form's accuracy (issue 16).

ONNX Runtime writes an int8 model in several forms (``toolchain.steps.convert_onnx.FORMS``: QDQ or
QOperator, per-channel or per-tensor weight scales, full or reduced weight range), and which one runs
fastest depends on the CPU, the runtime and the model: on the build host of BENCHMARKS.md the
per-channel QDQ model every build used to ship is slower than the float model. ``search_forms``
writes each form of ``SEARCH_FORMS`` from one float export, checks its structure against the target's
promise, times it in every runtime of the target (``toolchain.steps.latency``: the agent's runtime
adapters, one sample, the target's threads) and measures its accuracy the way the device runs it
(``device_agent.Agent`` on a scratch bundle, one sample at a time). ``choose_form`` then keeps the
default unless another form

* runs in every runtime of the target (the bundle lists them all),
* loses at most ``ACCURACY_TOLERANCE`` against the default form in each runtime, and stays inside the
  target's accuracy budget against the float model when the default does, and
* is at least ``MIN_SPEEDUP`` times as fast in its fastest runtime as the default in its fastest one
  (latency on a shared host jitters by more than a few per cent; a near tie keeps the default).

The candidates and the reason land in report.json as ``int8_form_choice``. ``edgefleet build
--no-int8-search`` skips the search and ships the default form.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.targets import Target

# The forms a build tries, the default first. QOperator forms are left out: OpenVINO cannot read
# their com.microsoft QGemm (so the x86 target could not list it) and ONNX Runtime runs them slower
# than QDQ with int8 activations (benchmarks/x86_int8_bench.py measures all eight).
# Reduced range is left out too: it trades a bit of weight precision for safety from int16 overflow
# in the u8s8 kernels of CPUs without VNNI and runs at the same speed (measured there as well), so it
# could only win on timing noise.
SEARCH_FORMS: tuple[str, ...] = ("qdq-per-channel", "qdq-per-tensor")
# A form may lose at most this much accuracy (share, 0.005 = 0.5 point) against the default form in
# the same runtime, measured one sample at a time through the agent.
ACCURACY_TOLERANCE = 0.005
# Another form must be at least this many times as fast as the default to replace it.
MIN_SPEEDUP = 1.10
# Timing: every candidate (form x runtime) runs SEARCH_RUNS_PER_ROUND times in turn, SEARCH_ROUNDS
# times over (the shipped artifact is timed again by the build's usual latency step).
SEARCH_ROUNDS = 10
SEARCH_RUNS_PER_ROUND = 20


@dataclass
class Candidate:
    """One form in one runtime: p50 latency (runtime call, target threads) and batch-1 agent accuracy."""

    form: str
    runtime: str
    p50_ms: float | None = None
    accuracy: float | None = None
    agent_p50_ms: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the report.json view."""
        return {
            "form": self.form,
            "runtime": self.runtime,
            "p50_ms": self.p50_ms,
            "accuracy": self.accuracy,
            "agent_p50_ms": self.agent_p50_ms,
            "error": self.error,
        }


def choose_form(
    candidates: Sequence[Candidate],
    default: str,
    *,
    float_accuracy: float,
    max_accuracy_drop: float,
    tolerance: float = ACCURACY_TOLERANCE,
    min_speedup: float = MIN_SPEEDUP,
) -> dict[str, Any]:
    """Return the choice: ``form``, ``runtime`` and ``p50_ms`` (its fastest), ``reason``, ``forms``.

    ``forms`` maps each form to ``{"p50_ms", "runtime", "accuracy" (worst runtime), "status"}`` where
    status is ``chosen``, ``qualified`` or ``rejected: <why>``. Pure: the search's numbers go in.
    """
    runtimes = sorted({c.runtime for c in candidates})
    by_form: dict[str, dict[str, Candidate]] = {}
    for c in candidates:
        by_form.setdefault(c.form, {})[c.runtime] = c
    if default not in by_form:
        raise ValueError(f"the default form {default!r} is not among the candidates")
    ref = by_form[default]
    forms: dict[str, dict[str, Any]] = {}
    for form, rts in by_form.items():
        fastest = min(
            (c for c in rts.values() if c.p50_ms is not None and c.error is None),
            key=lambda c: c.p50_ms or 0.0,
            default=None,
        )
        accs = [c.accuracy for c in rts.values() if c.accuracy is not None and c.error is None]
        forms[form] = {
            "p50_ms": fastest.p50_ms if fastest else None,
            "runtime": fastest.runtime if fastest else None,
            "accuracy": min(accs) if accs else None,
            "status": _rejection(form, rts, ref, runtimes, float_accuracy, max_accuracy_drop, tolerance),
        }
    if forms[default]["status"] != "qualified":
        forms[default]["status"] = "chosen"
        return _choice(default, forms, "the default form could not be measured here; it ships unchanged")
    qualified = [f for f, v in forms.items() if v["status"] == "qualified"]
    best = min(qualified, key=lambda f: (forms[f]["p50_ms"], f != default))
    base_ms = forms[default]["p50_ms"]
    best_ms = forms[best]["p50_ms"]
    if best == default:
        reason = f"{default} is the fastest form that keeps accuracy ({base_ms:.4g} ms)"
    elif best_ms * min_speedup > base_ms:
        reason = (
            f"{best} ({best_ms:.4g} ms) is not {min_speedup:.2f}x as fast as {default}"
            f" ({base_ms:.4g} ms); the default ships"
        )
        best = default
    else:
        reason = (
            f"{best} runs {base_ms / best_ms:.2f}x as fast as {default} ({best_ms:.4g} vs {base_ms:.4g} ms"
            f" in {forms[best]['runtime']}) and keeps accuracy within {100 * tolerance:.2g} point"
            f" ({_pct(forms[best]['accuracy'])} vs {_pct(forms[default]['accuracy'])})"
        )
    forms[best]["status"] = "chosen"
    return _choice(best, forms, reason)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _choice(form: str, forms: dict[str, dict[str, Any]], reason: str) -> dict[str, Any]:
    return {
        "form": form,
        "runtime": forms[form]["runtime"],
        "p50_ms": forms[form]["p50_ms"],
        "accuracy": forms[form]["accuracy"],
        "reason": reason,
        "forms": forms,
    }


def _rejection(
    form: str,
    rts: dict[str, Candidate],
    ref: dict[str, Candidate],
    runtimes: list[str],
    float_accuracy: float,
    max_accuracy_drop: float,
    tolerance: float,
) -> str:
    """Return ``qualified`` or ``rejected: <why>`` for one form (see the module's rules)."""
    for rt in runtimes:
        c = rts.get(rt)
        if c is not None and c.error is not None and c.error.startswith("not scored"):
            return f"rejected: {c.error}"
        if c is None or c.error is not None or c.p50_ms is None or c.accuracy is None:
            why = c.error if c is not None and c.error else "not measured"
            return f"rejected: {rt} cannot run it ({why})"
    for rt in runtimes:
        c, base = rts[rt], ref.get(rt)
        if base is None or base.accuracy is None or base.error is not None:
            continue
        assert c.accuracy is not None
        if c.accuracy + 1e-9 < base.accuracy - tolerance:
            return (
                f"rejected: {rt} accuracy {_pct(c.accuracy)} is more than {100 * tolerance:.2g} point"
                f" below the default form's {_pct(base.accuracy)}"
            )
        floor = float_accuracy - max_accuracy_drop
        if c.accuracy + 1e-9 < floor <= base.accuracy + 1e-9:
            return f"rejected: {rt} accuracy {_pct(c.accuracy)} is outside the target's budget"
    return "qualified"


def search_forms(
    ctx: Any,
    t: Target,
    tdir: Path,
    bundle_fields: Callable[[Any], dict[str, Any]],
    forms: Sequence[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write and measure each int8 form of an ONNX target; return (the chosen file, the choice).

    ``ctx`` is the build's ``BuildContext`` (source model, calibration and evaluation data). The chosen
    file lies in ``tdir/int8-forms``; the caller ships it (``convert_for_target(prebuilt=...)``).
    ``bundle_fields(artifact)`` gives the ``assemble_bundle`` arguments of a candidate's scratch bundle
    (``toolchain.steps.target.bundle_fields``, passed in so this module does not import its caller).
    """
    from toolchain.steps import isolate
    from toolchain.steps.artifact import Artifact, read_io_specs
    from toolchain.steps.convert import check_calibration, remove_quietly, usable_runtimes
    from toolchain.steps.convert_onnx import DEFAULT_FORM, FORMS, export_quantizable, quantize_ptq
    from toolchain.steps.package import assemble_bundle
    from toolchain.steps.verify import inspect_artifact

    names = list(forms or SEARCH_FORMS)
    unknown = [f for f in names if f not in FORMS]
    if unknown:
        raise ToolchainError(f"unknown int8 form {unknown[0]!r}. Known: {', '.join(FORMS)}")
    if DEFAULT_FORM.name not in names:
        names.insert(0, DEFAULT_FORM.name)
    t0 = time.perf_counter()
    calib = check_calibration(ctx.model_calib.x)
    runtimes = usable_runtimes(t)
    out_dir = Path(tdir) / "int8-forms"
    out_dir.mkdir(parents=True, exist_ok=True)
    candidates: list[Candidate] = []
    artifacts: dict[str, Artifact] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-forms-") as tmp:
        ref = ctx.float_refs.get(t.format)
        same = ctx.float_source is ctx.source_model or ctx.float_source == ctx.source_model
        if ref is not None and same and not ctx.options.qat:
            float_path = Path(tmp) / "float.onnx"  # the float reference is this very model: no new export
            shutil.copyfile(ref.path, float_path)
        else:
            source = isolate.resolve(ctx.source_model)  # a ModelFile (toolchain.steps.isolate) loads here
            float_path = export_quantizable(source, calib, Path(tmp), qat=ctx.options.qat)
        for name in names:
            path = out_dir / f"{name}.onnx"
            try:
                quantize_ptq(float_path, path, calib, t, False, FORMS[name])
                inputs, outputs = read_io_specs(path, t.format)
                artifact = Artifact(
                    path, t.format, inputs, outputs, list(runtimes), size_bytes=path.stat().st_size
                )
                inspect_artifact(artifact, t, qat=ctx.options.qat)
            except ToolchainError as e:
                candidates += [Candidate(name, rt, error=str(e)[:200]) for rt in runtimes]
                remove_quietly(path)
                continue
            artifacts[name] = artifact
            candidates += [Candidate(name, rt) for rt in runtimes]
        # Time first: only the default and the forms fast enough to replace it need their accuracy.
        time_interleaved(
            [(c, artifacts[c.form].path) for c in candidates if c.error is None], calib[:1], t.threads
        )
        fastest = _fastest_by_form(candidates)
        base_ms = fastest.get(DEFAULT_FORM.name)
        for name, artifact in artifacts.items():
            ms = fastest.get(name)
            contender = base_ms is None or (ms is not None and ms * MIN_SPEEDUP <= base_ms)
            mine = [c for c in candidates if c.form == name and c.error is None]
            if name != DEFAULT_FORM.name and not contender:
                for c in mine:
                    c.error = f"not scored: not {MIN_SPEEDUP:.2f}x as fast as {DEFAULT_FORM.name}"
                continue
            scratch = Path(tmp) / f"bundle-{name}"
            assemble_bundle(scratch, **bundle_fields(artifact))
            for c in mine:
                score_on_agent(scratch, c, ctx.evald.x, ctx.evald.y)
            shutil.rmtree(scratch, ignore_errors=True)
    choice = choose_form(
        candidates,
        DEFAULT_FORM.name,
        float_accuracy=ctx.float_accuracy,
        max_accuracy_drop=t.limits.max_accuracy_drop,
    )
    choice["candidates"] = [c.to_dict() for c in candidates]
    choice["default_form"] = DEFAULT_FORM.name
    choice["accuracy_path"] = "device_agent.Agent, one sample at a time"
    choice["latency_path"] = (
        f"runtime adapter run(), one sample, {t.threads} threads, {SEARCH_ROUNDS} interleaved rounds"
        f" of {SEARCH_RUNS_PER_ROUND}"
    )
    # wall time of the search; the float export and the default form's file replace work the build
    # would do anyway, so the build grows by less than this
    choice["search_s"] = round(time.perf_counter() - t0, 2)
    return out_dir / f"{choice['form']}.onnx", choice


def _fastest_by_form(candidates: Sequence[Candidate]) -> dict[str, float]:
    """Each form's p50 in its fastest runtime, for forms every runtime timed (None-free)."""
    out: dict[str, float] = {}
    failed = {c.form for c in candidates if c.error is not None or c.p50_ms is None}
    for c in candidates:
        if c.form not in failed and c.p50_ms is not None:
            out[c.form] = min(out.get(c.form, c.p50_ms), c.p50_ms)
    return out


def score_on_agent(bundle: Path, c: Candidate, x: Any, y: Any) -> Candidate:
    """Score one form in one runtime through the agent, one sample at a time (errors are kept)."""
    from toolchain.steps.device_eval import evaluate_on_agent

    try:
        figures, _ = evaluate_on_agent(bundle, c.runtime, x, y, batch_sizes=(1,))
    except Exception as e:  # a runtime that cannot read or run the form rules it out, nothing more
        c.error = _line(e)
        return c
    c.accuracy = figures.get("accuracy")
    c.agent_p50_ms = figures.get("latency_ms_p50")
    return c


def time_interleaved(entries: Sequence[tuple[Candidate, Path]], sample: Any, threads: int) -> None:
    """Set each candidate's ``p50_ms``: its model file timed in the candidate's runtime adapter, in
    rounds that take turns, so a burst of load elsewhere on the host slows every candidate alike.

    ``.onnx`` inputs are quantized as the model file says; other files (OpenVINO IR) take float.
    """
    from device_agent.agent import quantize
    from device_agent.formats.manifest import ModelFormat
    from device_agent.runtimes import load_runtime_model
    from toolchain.steps.artifact import read_io_specs
    from toolchain.steps.latency import WARMUP_RUNS

    loaded: list[tuple[Candidate, Any, np.ndarray]] = []
    for c, path in entries:
        try:
            x = np.ascontiguousarray(np.asarray(sample, dtype=np.float32)[:1])
            if Path(path).suffix == ".onnx":
                inputs, _ = read_io_specs(Path(path), ModelFormat.ONNX)
                x = np.ascontiguousarray(quantize(x, inputs[0]))
            model = load_runtime_model(path, c.runtime, threads=threads)
            for _ in range(WARMUP_RUNS):
                model.run(x)
        except Exception as e:
            c.error = _line(e)
            continue
        loaded.append((c, model, x))
    times: dict[int, list[float]] = {id(c): [] for c, _, _ in loaded}
    for _ in range(SEARCH_ROUNDS):
        for c, model, x in loaded:
            for _ in range(SEARCH_RUNS_PER_ROUND):
                t0 = time.perf_counter_ns()
                model.run(x)
                times[id(c)].append((time.perf_counter_ns() - t0) / 1e6)
    for c, _, _ in loaded:
        c.p50_ms = round(float(np.percentile(times[id(c)], 50)), 4)


def _line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]
