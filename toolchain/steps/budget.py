"""Device budgets: measure what a budget constrains (arena, Edge TPU op share) and check ``[budget]``.

``measure_arena`` returns the peak tensor memory a model needs, for every format:

- ``.tflite``: the arena LiteRT's memory planner lays out. The model is loaded with the builtin
  kernels (no default delegate) and its tensors allocated; the span from the lowest to the highest
  byte of every non-constant tensor (inputs, op outputs, kernel scratch tensors) is the part of the
  arena in use, measured from the tensors' own addresses (method ``litert-arena``). Delegates such
  as XNNPACK keep their own workspace and packed weights besides: ``edgefleet-agent bench`` reports
  the device's peak RSS, which includes them.
- ``.onnx``: neither ONNX Runtime nor OpenVINO reports its arena, so the measure is the graph's
  peak of live activations at batch 1: shapes inferred by ONNX, each tensor live from the node that
  makes it to the last node that reads it, the largest sum over the execution order (method
  ``onnx-liveness``). A planner that reuses memory perfectly needs this much; real arenas add
  alignment and fragmentation on top.

``check_budget`` compares the measurements a build recorded with a target's ``[budget]`` and raises
``BudgetError`` with one line naming the key, the measured value and what to try.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.context import TargetResult
from toolchain.targets import Budget, Target

ARENA_LITERT = "litert-arena"
ARENA_ONNX = "onnx-liveness"

# ONNX TensorProto element types -> bytes per element (onnx.TensorProto.DataType numbers).
_ONNX_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


class BudgetError(ToolchainError):
    """A build is over one of its target's ``[budget]`` keys, or a budget cannot be measured.

    ``verdict`` holds every key's ``{"budget", "measured", "ok"}`` (see ``check_budget``).
    """

    def __init__(self, message: str, verdict: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict or {}


# --------------------------------------------------------------------------------------------------
# Measurements


def measure_arena(path: Path) -> dict[str, Any]:
    """Return ``{"arena_bytes", "arena_method", "arena_tensors"}`` for a .tflite or .onnx model file."""
    path = Path(path)
    if path.suffix == ".tflite":
        return _tflite_arena(path)
    if path.suffix == ".onnx":
        return _onnx_arena(path)
    raise BudgetError(f"cannot measure the arena of {path.name!r}: not a .tflite or .onnx file")


def _tflite_arena(path: Path) -> dict[str, Any]:
    from device_agent.runtimes.litert import interpreter_module
    from toolchain.steps.edgetpu import read_tflite

    model = read_tflite(path)
    constant = {t.index for t in model.tensors if t.is_constant}
    mod = interpreter_module()
    kwargs: dict[str, Any] = {}
    resolver = getattr(getattr(mod, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)
    if resolver is not None:
        kwargs["experimental_op_resolver_type"] = resolver
    try:
        interp = mod.Interpreter(model_path=str(path), num_threads=1, **kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise BudgetError(f"LiteRT cannot allocate {path.name} ({str(e).splitlines()[0]})") from None
    lo, hi, n, scalars = None, 0, 0, 0
    for d in interp.get_tensor_details():
        i = int(d["index"])
        if i in constant:
            continue
        try:
            a = interp.tensor(i)()
        except (ValueError, RuntimeError):  # no data (optional, unallocated or dynamic tensors)
            continue
        if a.nbytes == 0:
            continue
        if not isinstance(a, np.ndarray):
            # LiteRT hands a 0-d tensor back as a numpy scalar (a copy): its address is unknown. It
            # lies inside the planned span unless it sits at one end, so the span can be short by at
            # most its few bytes; counted so the report says so.
            scalars += 1
            continue
        addr = int(a.ctypes.data)
        lo = addr if lo is None else min(lo, addr)
        hi = max(hi, addr + int(a.nbytes))
        n += 1
        del a
    out: dict[str, Any] = {
        "arena_bytes": 0 if lo is None else hi - lo,
        "arena_method": ARENA_LITERT,
        "arena_tensors": n,
    }
    if scalars:
        out["arena_scalar_tensors"] = scalars  # 0-d tensors whose address LiteRT does not expose
    return out


def liveness_peak(
    sizes: Mapping[str, int],
    steps: Sequence[tuple[Sequence[str], Sequence[str]]],
    graph_outputs: Sequence[str],
) -> int:
    """Return the peak of live tensor bytes over ``steps`` (each: the node's inputs, its outputs).

    A tensor in ``sizes`` is live from the step that makes it (before the first step for graph
    inputs) to the last step that reads it; graph outputs stay live to the end. Tensors not in
    ``sizes`` (constants) are ignored.
    """
    n = len(steps)
    start = {name: -1 for name in sizes}
    end = {name: -1 for name in sizes}
    for i, (ins, outs) in enumerate(steps):
        for name in outs:
            if name in sizes:
                start[name] = i
                end[name] = max(end[name], i)
        for name in ins:
            if name in sizes:
                end[name] = max(end[name], i)
    for name in graph_outputs:
        if name in sizes:
            end[name] = n
    # One sweep over a difference array: +size where a tensor becomes live, -size after its last step.
    delta = [0] * (n + 2)
    for name, size in sizes.items():
        first, last = max(start[name], 0), min(end[name], n - 1)
        if last < first:
            continue  # never live during a step (an unused graph input)
        delta[first] += size
        delta[last + 1] -= size
    peak = live = 0
    for i in range(n):
        live += delta[i]
        peak = max(peak, live)
    return peak


def _onnx_arena(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends
        raise BudgetError(f"cannot read {path.name} ({str(e).splitlines()[0] if str(e) else e})") from None
    g = model.graph
    init = {t.name for t in g.initializer}
    for inp in g.input:  # batch 1, as the agent runs single samples
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
    except Exception as e:
        raise BudgetError(f"ONNX cannot infer the tensor shapes of {path.name} ({e})") from None
    infos = list(inferred.input) + list(inferred.value_info) + list(inferred.output)
    sizes: dict[str, int] = {}
    unknown = 0
    for vi in infos:
        if vi.name in init or vi.name in sizes:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        item = _ONNX_ITEM_BYTES.get(tt.elem_type)
        if item is None or any(d < 0 for d in dims):
            unknown += 1
            continue
        sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * item
    steps = [(list(node.input), list(node.output)) for node in inferred.node]
    peak = liveness_peak(sizes, steps, [o.name for o in inferred.output])
    out: dict[str, Any] = {"arena_bytes": int(peak), "arena_method": ARENA_ONNX, "arena_tensors": len(sizes)}
    if unknown:
        out["arena_unknown_tensors"] = unknown
    return out


def edgetpu_op_share(edgetpu_entry: Mapping[str, Any]) -> float | None:
    """Return the share of ops mapped to the Edge TPU: the compiler's count when it ran, else predicted."""
    total = edgetpu_entry.get("compiler_ops_total") or edgetpu_entry.get("ops_total")
    mapped = edgetpu_entry.get("compiler_ops_mapped")
    if mapped is None or not edgetpu_entry.get("compiler_ops_total"):
        mapped = edgetpu_entry.get("ops_mapped")
    if not total or mapped is None:
        return None
    return float(mapped) / float(total)


def cpu_ops_warning(edgetpu_entry: Mapping[str, Any]) -> str | None:
    """Return one line when ops stay on the CPU (naming the first one and why), None when all map."""
    total, mapped = edgetpu_entry.get("ops_total"), edgetpu_entry.get("ops_mapped")
    if edgetpu_entry.get("compiler_ops_total"):
        total, mapped = edgetpu_entry["compiler_ops_total"], edgetpu_entry.get("compiler_ops_mapped")
    if not total or mapped is None or mapped >= total:
        return None
    first = (edgetpu_entry.get("unmapped") or [{}])[0]
    cause = ""
    if first:
        cause = f"; the first is {first.get('op')} (op #{first.get('index')}): {first.get('reason')}"
    return (
        f"{total - mapped} of {total} ops run on the CPU, not the Edge TPU ({mapped} mapped){cause}."
        " Replace that op (e.g. GELU -> ReLU) or set [budget] min_edgetpu_op_share to fail such builds"
    )


# --------------------------------------------------------------------------------------------------
# The check


def budget_measurements(entry: Mapping[str, Any]) -> dict[str, float | int | None]:
    """Return the values the budget keys constrain, from a report's target entry."""
    et = entry.get("edgetpu")
    return {
        "max_model_bytes": entry.get("size_bytes"),
        "max_arena_bytes": entry.get("arena_bytes"),
        "max_latency_ms": entry.get("latency_ms_p95"),
        "min_edgetpu_op_share": edgetpu_op_share(et) if et else None,
    }


# What to try per key. Pruning is not among them for size and latency: it zeroes weights but the
# int8 .tflite/.onnx stores them all the same (only the gzip size, what an OTA download costs,
# shrinks), and none of the runtimes skips zeros, so it makes the model neither smaller nor faster.
ADVICE = {
    "max_model_bytes": (
        "use a smaller architecture (fewer filters or units) or fewer input features; --prune does not"
        " shrink the model file (only its gzip size for OTA)"
    ),
    "max_arena_bytes": "use a smaller input size or fewer filters in the early layers (they hold the largest tensors)",
    "max_latency_ms": (
        "use a smaller architecture or input size, or raise the target's threads; --prune does not make"
        " it faster (the runtimes compute the zeros too)"
    ),
    "min_edgetpu_op_share": "replace the first unmapped op (see the Edge TPU table in report.html; e.g. GELU -> ReLU)",
}


def check_budget(
    target: Target, measured: Mapping[str, Any], where: str = "on the build host"
) -> dict[str, Any]:
    """Compare ``measured`` (``budget_measurements``) with the target's budget; raise on the first breach.

    Returns ``{key: {"budget", "measured", "ok"}}`` for every key the budget sets (empty without a
    budget). A key whose value could not be measured fails: a budget nobody checked is no budget.
    """
    budget = target.budget or Budget()
    verdict: dict[str, Any] = {}
    breach: str | None = None
    for key, limit in budget.to_dict().items():
        if limit is None:
            continue
        value = measured.get(key)
        if value is None:
            ok = False
            msg = (
                f"[budget] {key} = {_show(key, limit)} of target {target.name!r} cannot be checked:"
                " nothing measured it"
            )
        else:
            ok = value >= limit if key.startswith("min_") else value <= limit
            over = "below" if key.startswith("min_") else "over"
            at = f" {where}" if key == "max_latency_ms" else ""
            msg = (
                f"{key}: measured {_show(key, value)}{at} is {over} the {target.name} budget of"
                f" {_show(key, limit)}; {ADVICE[key]}"
            )
        verdict[key] = {"budget": limit, "measured": value, "ok": ok}
        if not ok and breach is None:
            breach = msg
    if breach is not None:
        raise BudgetError(breach, verdict)
    return verdict


def _show(key: str, v: Any) -> str:
    if key.endswith("_bytes"):
        return f"{int(v)} bytes"
    if key.endswith("_ms"):
        return f"{float(v):.3f} ms (p95)"
    return f"{100 * float(v):.1f}% of ops"


# --------------------------------------------------------------------------------------------------
# The build's two calls (toolchain.steps.target.apply_gates, once per target)


def record_measurements(model_path: Path, result: TargetResult) -> None:
    """Record ``arena_bytes`` (+ method), the Edge TPU op share and CPU-op warnings in a target's result."""
    result.arena = measure_arena(model_path)
    et = result.edgetpu
    if et:
        result.edgetpu_op_share = edgetpu_op_share(et)
        warning = cpu_ops_warning(et)
        if warning:
            result.warnings.append(warning)


def enforce(target: Target, result: TargetResult) -> None:
    """Check the result against the target's ``[budget]``; record the verdict in ``result.budget``."""
    try:
        result.budget = check_budget(target, budget_measurements(result.raw_dict()))
    except BudgetError as e:
        result.budget = e.verdict
        raise
