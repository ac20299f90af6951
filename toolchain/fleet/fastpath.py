"""A fast, equally strict decoder for stats windows whose model has a registered baseline.

``device_agent.telemetry.decode_stats`` + ``StatsMessage.profile`` walk every value of a 5 KB window
in Python (depth, finite numbers, per-feature profile rebuild) and cost several milliseconds per
message; the collector's goal is more than a thousand windows a second on two shared cores. This
module checks the same rules with C-level JSON parsing, list comparisons and numpy, and returns the
packed arrays the database stores directly.

Rules (those of the contract): size limit; UTF-8 JSON without NaN/Infinity; an object with
``schema`` 1 and ``type`` "stats"; exactly the known keys; ids valid and equal to the topic's;
ISO-8601 UTC times, end not before start; integers where integers belong (no booleans, no floats);
finite numbers; every histogram as long as the baseline's and summing to its count; per-feature
lists of the right length; non-negative M2; class counts summing to ``count``. Nesting depth needs no
walk: the parser raises on runaway nesting, and every value must sit in its known place.

The collector uses it as a filter, not as the judge of bad messages: anything it refuses is decoded
again with the contract decoders, whose error message becomes the quarantine reason (and if they
accept it after all, the message is stored through them). ``tests/fleet/test_fleet_fastpath.py``
checks the two paths agree on accepted windows and on many corruptions of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from typing import Any

import numpy as np

from device_agent.telemetry import ID_RE, MAX_PAYLOAD_BYTES, SCHEMA, STATS_REQUIRED
from toolchain.fleet.storage import Layout

SHA_RE = re.compile(r"[0-9a-f]{64}")
FSP_KEYS = frozenset({"count", "nan", "min", "max", "mean", "m2", "hist"})


class Refused(Exception):
    """The fast path does not accept this payload (the contract decoder gives the reason)."""


@dataclass
class FastWindow:
    """A validated window, packed in its baseline's layout."""

    device_id: str
    fleet: str
    seq: int
    window_start: float
    window_end: float
    model_sha256: str
    model_name: str
    model_version: int
    spec_hash: str
    count: int
    dropped_windows: int
    agent_version: str
    schema_violations: dict[str, int]
    ints: bytes | None
    floats: bytes | None


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _int(v: Any, minimum: int = 0) -> int:
    if type(v) is not int or v < minimum or v > 2**63 - 1:
        raise Refused("integer")
    return v


def _time(v: Any) -> float:
    if type(v) is not str or len(v) > 40:
        raise Refused("time")
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise Refused("time") from None
    if dt.tzinfo is None or dt.utcoffset() != timezone.utc.utcoffset(None):
        raise Refused("time")
    return dt.timestamp()


def _floats(vals: list[Any], fill: float) -> np.ndarray:
    # Booleans were ruled out for the whole payload; strings or nested lists give a non-numeric dtype.
    a = np.array([fill if v is None else v for v in vals] if None in vals else vals)
    if a.dtype.kind not in "if" or a.ndim != 1:
        raise Refused("float")
    a = a.astype(np.float64)
    if not np.isfinite(a[np.array([v is not None for v in vals])] if None in vals else a).all():
        raise Refused("float")
    return a


def _ints(vals: list[Any]) -> np.ndarray:
    try:
        a = np.array(vals)
    except (ValueError, OverflowError):
        raise Refused("ints") from None
    if a.dtype.kind != "i" or a.ndim != 1:
        raise Refused("ints")
    return a.astype(np.int64)


@dataclass(frozen=True)
class _Plan:
    """Where the three feature sets' values go in the packed vectors (cached per layout)."""

    sizes: tuple[int, ...]  # features per set
    want: list[int]  # histogram length of every feature of every set, in order
    seg_starts: np.ndarray  # start of each histogram in the flattened histograms
    pos_hist: np.ndarray  # positions of the flattened histograms in the ints vector
    pos_count: np.ndarray
    pos_nan: np.ndarray
    pos_class: np.ndarray
    pos_floats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # min, max, mean, m2
    n_ints: int
    n_floats: int


_PLANS: dict[int, tuple[Layout, _Plan]] = {}


def _plan(layout: Layout) -> _Plan:
    got = _PLANS.get(id(layout))
    if got is not None and got[0] is layout:
        return got[1]
    sizes: list[int] = []
    want: list[int] = []
    pos_hist: list[int] = []
    pos_count: list[int] = []
    pos_nan: list[int] = []
    pos_f: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    io = fo = 0
    for name, f, w in layout.parts:
        fp = getattr(layout.template, name)
        lengths = (fp.nedges + 1).tolist()
        sizes.append(f)
        want += lengths
        for j, n in enumerate(lengths):
            pos_hist += range(io + j * w, io + j * w + n)
        io += f * w
        pos_count += range(io, io + f)
        io += f
        pos_nan += range(io, io + f)
        io += f
        for k in range(4):
            pos_f[k].extend(range(fo + k * f, fo + (k + 1) * f))
        fo += 4 * f
    plan = _Plan(
        tuple(sizes),
        want,
        np.r_[0, np.cumsum(want)[:-1]].astype(np.int64),
        np.array(pos_hist),
        np.array(pos_count),
        np.array(pos_nan),
        np.arange(io, io + layout.n_classes),
        tuple(np.array(p) for p in pos_f),  # type: ignore[arg-type]
        layout.n_ints,
        layout.n_floats,
    )
    _PLANS[id(layout)] = (layout, plan)
    return plan


def _pack_sets(states: tuple[Any, Any, Any], cc: Any, layout: Layout) -> tuple[bytes, bytes]:
    """Validate the three feature-set states and class counts together; return the packed blobs."""
    plan = _plan(layout)
    lists: dict[str, list[Any]] = {k: [] for k in ("count", "nan", "min", "max", "mean", "m2", "hist")}
    for d, f in zip(states, plan.sizes, strict=True):
        if type(d) is not dict or d.keys() != FSP_KEYS:
            raise Refused("fsp keys")
        for k, acc in lists.items():
            v = d[k]
            if type(v) is not list or len(v) != f:
                raise Refused("fsp length")
            acc += v
    hist = lists["hist"]
    if [len(h) if type(h) is list else -1 for h in hist] != plan.want:
        raise Refused("hist length")
    flat = _ints(list(chain.from_iterable(hist)))
    count = _ints(lists["count"])
    nan = _ints(lists["nan"])
    if type(cc) is not list or len(cc) != layout.n_classes:
        raise Refused("class counts")
    classes = _ints(cc) if cc else np.zeros(0, dtype=np.int64)
    if flat.min() < 0 or count.min() < 0 or nan.min() < 0 or (classes.size and classes.min() < 0):
        raise Refused("negative")
    if not np.array_equal(np.add.reduceat(flat, plan.seg_starts), count):
        raise Refused("hist sum")
    m2 = _floats(lists["m2"], 0.0)
    if m2.min() < 0:
        raise Refused("m2")
    ints = np.zeros(plan.n_ints, dtype="<i8")
    ints[plan.pos_hist] = flat
    ints[plan.pos_count] = count
    ints[plan.pos_nan] = nan
    ints[plan.pos_class] = classes
    floats = np.empty(plan.n_floats, dtype="<f8")
    floats[plan.pos_floats[0]] = _floats(lists["min"], np.inf)
    floats[plan.pos_floats[1]] = _floats(lists["max"], -np.inf)
    floats[plan.pos_floats[2]] = _floats(lists["mean"], 0.0)
    floats[plan.pos_floats[3]] = m2
    return ints.tobytes(), floats.tobytes()


def decode_window(
    raw: bytes, topic_fleet: str, topic_device: str, lookup: Callable[[str], tuple[Layout, str] | None]
) -> FastWindow:
    """Decode and validate a stats payload; raise Refused when unsure.

    ``lookup(model_sha256)`` returns the registered baseline's (layout, spec hash), or None when the
    model has no baseline (refused: the contract path stores such windows as pending).
    """
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise Refused("size")
    if b"true" in raw or b"false" in raw:
        raise Refused("booleans")  # a valid window holds none; numpy would take them for 0 and 1
    try:
        d = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused("json") from None
    if type(d) is not dict or d.keys() != STATS_REQUIRED:
        raise Refused("keys")
    if type(d["schema"]) is not int or d["schema"] != SCHEMA or d["type"] != "stats":
        raise Refused("schema")
    device, fleet = d["device_id"], d["fleet"]
    if type(device) is not str or type(fleet) is not str or not ID_RE.match(device) or not ID_RE.match(fleet):
        raise Refused("ids")
    if device != topic_device or fleet != topic_fleet:
        raise Refused("spoofed")
    start, end = _time(d["window_start"]), _time(d["window_end"])
    if end < start:
        raise Refused("times")
    m = d["model"]
    if type(m) is not dict or m.keys() != {"name", "version", "sha256"}:
        raise Refused("model")
    if type(m["sha256"]) is not str or not SHA_RE.fullmatch(m["sha256"]):
        raise Refused("model sha")
    found = lookup(m["sha256"])
    if found is None:
        raise Refused("no baseline")
    layout, spec_hash = found
    sh = d["spec_hash"]
    if type(sh) is not str or sh != spec_hash:
        raise Refused("spec hash")
    if type(m["name"]) is not str or len(m["name"]) > 64:
        raise Refused("model name")
    version = _int(m["version"], 1)
    sv = d["schema_violations"]
    if type(sv) is not dict or len(sv) > 32:
        raise Refused("violations")
    for k, v in sv.items():
        if len(k) > 64:
            raise Refused("violations")
        _int(v)
    agent = d["agent_version"]
    if type(agent) is not str or len(agent) > 40:
        raise Refused("agent")
    count = _int(d["count"])
    seq = _int(d["seq"])
    dropped = _int(d["dropped_windows"])
    nulls = [d[k] is None for k in ("inputs", "outputs", "latency_ms")]
    ints_b = floats_b = None
    if all(nulls):
        if count != 0:
            raise Refused("heartbeat")
    elif any(nulls):
        raise Refused("nulls")
    else:
        out = d["outputs"]
        if type(out) is not dict or out.keys() != {"class_counts", "confidence"}:
            raise Refused("outputs")
        cc = out["class_counts"]
        ints_b, floats_b = _pack_sets((d["inputs"], out["confidence"], d["latency_ms"]), cc, layout)
        if sum(cc) != count:
            raise Refused("count")
    return FastWindow(
        device,
        fleet,
        seq,
        start,
        end,
        m["sha256"],
        m["name"],
        version,
        sh,
        count,
        dropped,
        agent,
        dict(sv),
        ints_b,
        floats_b,
    )
