"""A fast, equally strict decoder for stats windows whose model has a registered baseline.

``device_agent.formats.telemetry.decode_stats`` + ``StatsMessage.profile`` walk every value of a 5 KB window
in Python (depth, finite numbers, per-feature profile rebuild) and cost several milliseconds per
message; the collector's goal is more than a thousand windows a second on two shared cores. This
module checks the same rules with C-level JSON parsing, list comparisons and numpy, and returns the
packed arrays the database stores directly.

The JSON parser is orjson when it is installed (the ``host`` extra installs it), else ``json``.

Rules (those of the contract): size limit; UTF-8 JSON without NaN/Infinity; an object with
``schema`` 2 (with a ``stream`` id), 3 (2 plus ``feedback``) or 1 (without) and ``type`` "stats"; exactly the known keys; ids valid and equal to the topic's;
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

import array
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from typing import Any

import numpy as np

from device_agent.formats.stats import CONFUSION_MAX_LABELS, Feedback, StatsError
from device_agent.formats.telemetry import (
    ID_RE,
    MAX_PAYLOAD_BYTES,
    STATS_REQUIRED,
    STATS_REQUIRED_V1,
    STATS_REQUIRED_V3,
    STREAM_RE,
)
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
    stream: str | None = None  # None: a schema 1 payload (older agent)
    feedback: Feedback | None = None  # ground-truth counts (schema 3)


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _stdlib_loads(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)


try:  # orjson parses a 5 KB window about 3.5 times faster than json; same strictness for our use
    import orjson  # (no NaN/Infinity, UTF-8 only, a depth limit; ints beyond 64 bit become floats,
except ImportError:  # which the integer checks then refuse and the contract decoder judges)
    _loads: Callable[[bytes], Any] = _stdlib_loads
else:
    _loads = orjson.loads


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


def _floats(vals: list[Any], fills: Sequence[float]) -> np.ndarray:
    """Numbers (ints or floats, finite) as float64, one strict conversion for the whole list.

    A None at position i becomes ``fills[i]`` (what the field of a feature without values is);
    anything else that is not a finite number is refused.
    """
    present = None
    try:
        try:
            a = np.frombuffer(array.array("d", vals))
        except TypeError:  # None (a feature without values) or a string, list, dict
            present = np.array([v is not None for v in vals])
            a = np.frombuffer(
                array.array("d", [f if v is None else v for v, f in zip(vals, fills, strict=True)])
            )
    except (TypeError, OverflowError):  # garbage, or an int beyond the float range
        raise Refused("float") from None
    if not np.isfinite(a if present is None else a[present]).all():
        raise Refused("float")
    return a


def _ints(vals: list[Any]) -> np.ndarray:
    """Python ints as int64; a float, None, string, list or an int beyond 64 bit is refused.

    ``array.array("q")`` converts each item strictly (no float truncation) and about twice as fast
    as ``np.array`` with its dtype inference. Booleans were ruled out for the whole payload.
    """
    try:
        return np.frombuffer(array.array("q", vals), dtype=np.int64)
    except (TypeError, OverflowError):
        raise Refused("ints") from None


@dataclass(frozen=True)
class _Plan:
    """How a window's values map onto the packed vectors of a layout (cached per layout).

    The decoder concatenates the integer lists of a window as ``count + nan + histograms + class
    counts`` (features of the three sets in order) and the float lists as ``min + max + mean + m2``;
    ``int_gather`` and ``float_gather`` pick every packed position's value from those in one numpy
    take. Histogram padding points at one extra zero appended to the integers.
    """

    sizes: tuple[int, ...]  # features per set
    want: list[int]  # histogram length of every feature of every set, in order
    seg_starts: np.ndarray  # start of each histogram in the flattened histograms
    n_features: int
    n_hist: int
    int_gather: np.ndarray
    float_gather: np.ndarray
    float_fills: list[float]  # min, max, mean, m2 of a feature without values, per float position


_PLANS: dict[int, tuple[Layout, _Plan]] = {}


def _plan(layout: Layout) -> _Plan:
    got = _PLANS.get(id(layout))
    if got is not None and got[0] is layout:
        return got[1]
    sizes: list[int] = []
    want: list[int] = []
    for name, f, _w in layout.parts:
        sizes.append(f)
        want += (getattr(layout.template, name).nedges + 1).tolist()
    nf, nh = sum(sizes), sum(want)
    # Source offsets in the concatenated integers: count, nan, flat histograms, classes, one zero.
    src_count, src_nan, src_hist, src_class, zero = 0, nf, 2 * nf, 2 * nf + nh, 2 * nf + nh + layout.n_classes
    ig = np.full(layout.n_ints, zero, dtype=np.int64)
    fg = np.empty(layout.n_floats, dtype=np.int64)
    io = fo = feat = h = 0
    for (_name, f, w), lengths in zip(layout.parts, _split(want, sizes), strict=True):
        for j, n in enumerate(lengths):
            ig[io + j * w : io + j * w + n] = np.arange(src_hist + h, src_hist + h + n)
            h += n
        io += f * w
        ig[io : io + f] = np.arange(src_count + feat, src_count + feat + f)
        io += f
        ig[io : io + f] = np.arange(src_nan + feat, src_nan + feat + f)
        io += f
        for k in range(4):  # min, max, mean, m2 of this set's features
            fg[fo + k * f : fo + (k + 1) * f] = np.arange(k * nf + feat, k * nf + feat + f)
        fo += 4 * f
        feat += f
    ig[io : io + layout.n_classes] = np.arange(src_class, src_class + layout.n_classes)
    fills = [fill for fill in _FILLS for _ in range(nf)]
    plan = _Plan(tuple(sizes), want, np.r_[0, np.cumsum(want)[:-1]].astype(np.int64), nf, nh, ig, fg, fills)
    _PLANS[id(layout)] = (layout, plan)
    return plan


def _split(values: list[int], sizes: list[int]) -> list[list[int]]:
    out, i = [], 0
    for n in sizes:
        out.append(values[i : i + n])
        i += n
    return out


_FILLS = (math.inf, -math.inf, 0.0, 0.0)  # what min, max, mean, m2 of a feature without values are


def _pack_sets(states: tuple[Any, ...], cc: Any, layout: Layout) -> tuple[bytes, bytes]:
    """Validate the feature-set states and class counts together; return the packed blobs."""
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
    try:  # a non-list of the right length (a string, a dict) then fails the integer conversion
        lengths = list(map(len, hist))
    except TypeError:
        raise Refused("hist length") from None
    if lengths != plan.want:
        raise Refused("hist length")
    if type(cc) is not list or len(cc) != layout.n_classes:
        raise Refused("class counts")
    # One conversion for every integer of the window: a float, string, None or nested list anywhere
    # gives a non-integer dtype (booleans were ruled out for the whole payload).
    ints_in = _ints([*lists["count"], *lists["nan"], *chain.from_iterable(hist), *cc, 0])
    if ints_in.size and ints_in.min() < 0:
        raise Refused("negative")
    nf = plan.n_features
    flat = ints_in[2 * nf : 2 * nf + plan.n_hist]
    if not np.array_equal(np.add.reduceat(flat, plan.seg_starts), ints_in[:nf]):
        raise Refused("hist sum")
    floats_in = _floats([*lists["min"], *lists["max"], *lists["mean"], *lists["m2"]], plan.float_fills)
    if floats_in[3 * nf :].min() < 0:
        raise Refused("m2")
    ints = ints_in[plan.int_gather].astype("<i8", copy=False)
    floats = floats_in[plan.float_gather].astype("<f8", copy=False)
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
        d = _loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused("json") from None
    if type(d) is not dict:
        raise Refused("keys")
    schema = d.get("schema")
    if type(schema) is not int or d.get("type") != "stats":
        raise Refused("schema")
    if schema == 2 or schema == 3:
        if d.keys() != (STATS_REQUIRED if schema == 2 else STATS_REQUIRED_V3):
            raise Refused("keys")
        stream = d["stream"]
        if type(stream) is not str or not STREAM_RE.match(stream):
            raise Refused("stream")
    elif schema == 1:
        if d.keys() != STATS_REQUIRED_V1:
            raise Refused("keys")
        stream = None
    else:
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
    feedback = None
    if schema == 3:
        try:
            feedback = Feedback.from_dict(d["feedback"], layout.n_classes)
        except StatsError:
            raise Refused("feedback") from None
        if feedback.labelled == 0 or (feedback.confusion is None) != (
            layout.n_classes > CONFUSION_MAX_LABELS
        ):
            raise Refused("feedback")
    nulls = [d[k] is None for k in ("inputs", "outputs", "latency_ms")]
    ints_b = floats_b = None
    if all(nulls):
        if count != 0:
            raise Refused("heartbeat")
    elif any(nulls):
        raise Refused("nulls")
    else:
        out = d["outputs"]
        has_values = layout.template.values is not None
        keys = {"class_counts", "confidence", "values"} if has_values else {"class_counts", "confidence"}
        if type(out) is not dict or out.keys() != keys:
            raise Refused("outputs")
        cc = out["class_counts"]
        sets = (d["inputs"], out["confidence"], d["latency_ms"])
        ints_b, floats_b = _pack_sets((*sets, out["values"]) if has_values else sets, cc, layout)
        if has_values:  # a scalar-output model counts its predictions in its values, not classes
            v = out["values"]
            predicted = v["count"][0] + v["nan"][0] if v["count"] else 0
        else:
            predicted = sum(cc)
        if predicted != count:
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
        stream,
        feedback,
    )
