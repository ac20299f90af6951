"""The telemetry wire format: topics and versioned JSON payloads, encoded and decoded strictly.

Topics (lowercase, no leading slash)::

    edgefleet/<fleet>/<device_id>/stats    QoS 1, one closed window (or an empty-window heartbeat)
    edgefleet/<fleet>/<device_id>/status   retained; birth "online" with the model, Last Will "offline"
    edgefleet/<fleet>/<device_id>/events   model loaded, errors, deployments
    edgefleet/<fleet>/<device_id>/cmd      commands to the device (deployments)
    edgefleet/<fleet>/<device_id>/samples  QoS 1, captured inputs (opt-in ``[capture]``), see device_agent.formats.samples
    edgefleet/<fleet>/cmd                  fleet-wide commands
    edgefleet/<fleet>/alerts               drift alerts published by the collector

Every payload carries ``schema`` (integer) and ``type``. ``stats`` is at schema 2 (``stream``
added: the outbox's random id, so windows of a device that lost its state are not mistaken for
duplicates); schema 1 stats (older agents) still decode, with ``stream`` None. A window in which
ground-truth labels arrived (``POST /v1/feedback``) is sent at schema 3: schema 2 plus a required
``feedback`` object (``labelled``, ``correct``, ``confusion``); windows without labels stay at
schema 2, so a collector that predates labels keeps taking them (and refuses, counts and
quarantines the labelled ones by their schema). ``status`` and
``event`` are at schema 1. Decoding checks, in order: size limit,
UTF-8 JSON without NaN/Infinity, nesting depth, schema, known keys, types and finite numbers.
The profile's histogram lengths are checked later against the registered baseline
(``StatsMessage.profile``), because only the baseline knows them. Captured samples and their labels
ride the ``samples`` topic in their own formats: ``device_agent.formats.samples`` and
``device_agent.formats.samplelabels``, which decode with this module's public helpers.

Over 600 lines on purpose: this is one cohesive thing, the telemetry wire format. The topics, the
strict JSON reader and field checks, and the three payloads (stats, status, event) with their
encoders and decoders change together (a field or a schema bump touches the payload, its decoder
and often a check), so they stay in one file to read top to bottom.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from device_agent.errors import AgentError
from device_agent.formats.stats import (
    CONFUSION_MAX_LABELS,
    FeatureSetProfile,
    Feedback,
    Profile,
    ProfileSpec,
    StatsError,
)
from device_agent.formats.strict import bounded_int, check_keys

SCHEMA = 1  # status and event payloads
STATS_SCHEMA = 2  # stats payloads: 2 added the required ``stream``
STATS_SCHEMA_FEEDBACK = 3  # a window that carries ground-truth counts: schema 2 plus ``feedback``
STATS_SCHEMAS = (1, 2, 3)  # what decode_stats accepts (1: older agents, no stream)
TOPIC_ROOT = "edgefleet"
DEFAULT_WINDOW_S = (
    60.0  # a device closes a stats window this often unless [telemetry] window_s says otherwise
)
MAX_PAYLOAD_BYTES = 96 * 1024  # well under AWS IoT's 128 KB and Azure's 256 KB message limits
MAX_DEPTH = 8
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
STREAM_RE = re.compile(r"^[0-9a-f]{16}$")
KINDS = ("stats", "status", "events", "cmd", "samples")
EVENT_NAMES_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class TelemetryError(AgentError):
    """A payload or topic does not follow the wire schema."""


# --------------------------------------------------------------------------------------------------
# Topics


def check_id(value: Any, what: str) -> str:
    """Return ``value`` if it is a valid fleet or device id (lowercase, digits, ``_.-``; 1-63 chars)."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise TelemetryError(
            f"{what} {str(value)[:70]!r} is invalid: use 1-63 lowercase letters, digits, '_', '.' or '-'"
        )
    return value


def check_stream(value: Any) -> str:
    """Return ``value`` if it is a stream id (16 lowercase hex digits, ``Outbox.stream``)."""
    if not isinstance(value, str) or not STREAM_RE.match(value):
        raise TelemetryError(f"stream {str(value)[:40]!r} is invalid: want 16 lowercase hex digits")
    return value


def topic(fleet: str, device_id: str, kind: str) -> str:
    """Return ``edgefleet/<fleet>/<device_id>/<kind>``."""
    if kind not in KINDS:
        raise TelemetryError(f"unknown topic kind {kind!r}. Known: {', '.join(KINDS)}")
    return f"{TOPIC_ROOT}/{check_id(fleet, 'fleet')}/{check_id(device_id, 'device_id')}/{kind}"


def fleet_topic(fleet: str, kind: str) -> str:
    """Return a fleet-wide topic: ``edgefleet/<fleet>/cmd`` or ``edgefleet/<fleet>/alerts``."""
    if kind not in ("cmd", "alerts"):
        raise TelemetryError(f"unknown fleet topic kind {kind!r}. Known: cmd, alerts")
    return f"{TOPIC_ROOT}/{check_id(fleet, 'fleet')}/{kind}"


def parse_topic(name: str) -> tuple[str, str, str]:
    """Split a device topic into ``(fleet, device_id, kind)`` or raise TelemetryError."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[3] not in KINDS:
        raise TelemetryError(f"topic {name[:120]!r} is not edgefleet/<fleet>/<device_id>/<kind>")
    return check_id(parts[1], "fleet"), check_id(parts[2], "device_id"), parts[3]


# --------------------------------------------------------------------------------------------------
# Timestamps


def utc_iso(ts: float) -> str:
    """Format a POSIX time as ``2026-11-27T11:00:00.000Z``."""
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{int(ts * 1000) % 1000:03d}Z"
    )


def parse_utc(value: Any, what: str) -> float:
    """Parse an ISO-8601 UTC timestamp (``...Z`` or ``+00:00``) to POSIX seconds."""
    if not isinstance(value, str) or len(value) > 40:
        raise TelemetryError(f"{what} must be an ISO-8601 UTC timestamp string")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TelemetryError(f"{what} {value!r} is not an ISO-8601 timestamp") from None
    if dt.tzinfo is None or dt.utcoffset() != timezone.utc.utcoffset(None):
        raise TelemetryError(f"{what} {value!r} must be in UTC (end with 'Z')")
    return dt.timestamp()


# --------------------------------------------------------------------------------------------------
# Decoding helpers


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e999 parses to inf
        raise ValueError(f"{text[:20]} is not a finite number")
    return v


def _depth(obj: Any, limit: int) -> int:
    """Return the nesting depth of containers (scalars are not visited), stopping past ``limit``."""
    stack = [(obj, 1)]
    deepest = 0
    containers = (dict, list)
    while stack:
        o, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        children = o.values() if type(o) is dict else o
        stack.extend((v, d + 1) for v in children if isinstance(v, containers))
    return deepest


def load_json(
    raw: bytes, max_bytes: int = MAX_PAYLOAD_BYTES, schemas: tuple[int, ...] = (SCHEMA,)
) -> dict[str, Any]:
    """Parse an untrusted payload: size limit, UTF-8, no NaN/Infinity, bounded nesting, an object
    whose integer ``schema`` is one of ``schemas``."""
    if len(raw) > max_bytes:
        raise TelemetryError(f"payload of {len(raw)} bytes exceeds the {max_bytes}-byte limit")
    # Deep nesting: the C parser stops with RecursionError long before the size limit could hurt, and
    # anything it accepts is measured below (containers only, so a 5 KB window costs microseconds).
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise TelemetryError("payload is not UTF-8") from None
    except RecursionError:
        raise TelemetryError(f"payload nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise TelemetryError(f"payload is not valid JSON ({str(e)[:80]})") from None
    if isinstance(doc, (dict, list)) and _depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise TelemetryError(f"payload nests deeper than {MAX_DEPTH} levels")
    if not isinstance(doc, dict):
        raise TelemetryError("payload must be a JSON object")
    if type(doc.get("schema")) is not int or doc["schema"] not in schemas:
        want = " or ".join(str(v) for v in schemas)
        raise TelemetryError(f"payload schema {str(doc.get('schema'))[:20]!r} is not supported (want {want})")
    return doc


def require_keys(d: Any, required: set[str], optional: set[str], where: str) -> None:
    check_keys(d, sorted(required), sorted(optional), where, error=TelemetryError)


def int_field(v: Any, what: str, minimum: int = 0) -> int:
    return bounded_int(
        v,
        what,
        minimum,
        error=TelemetryError,
        message="{what} must be an integer >= {minimum}, got {value!r}",
    )


def str_field(v: Any, what: str, max_len: int = 256) -> str:
    if not isinstance(v, str) or len(v) > max_len:
        raise TelemetryError(f"{what} must be a string of at most {max_len} characters")
    return v


def check_origin(d: Mapping[str, Any], topic_device: str | None, topic_fleet: str | None) -> tuple[str, str]:
    """Return the payload's (device_id, fleet), which must equal the topic's when it is known."""
    device = check_id(d["device_id"], "device_id")
    fleet = check_id(d["fleet"], "fleet")
    if topic_device is not None and device != topic_device:
        raise TelemetryError(
            f"payload device_id {device!r} does not match the topic's {topic_device!r} (spoofed?)"
        )
    if topic_fleet is not None and fleet != topic_fleet:
        raise TelemetryError(f"payload fleet {fleet!r} does not match the topic's {topic_fleet!r}")
    return device, fleet


# --------------------------------------------------------------------------------------------------
# Model identity


@dataclass(frozen=True)
class ModelRef:
    """Which model a device runs: bundle name, version and the sha256 of its manifest."""

    name: str
    version: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> ModelRef:
        require_keys(d, {"name", "version", "sha256"}, set(), where)
        sha = str_field(d["sha256"], f"{where}.sha256", 64)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise TelemetryError(f"{where}.sha256 must be 64 lowercase hex digits")
        return cls(
            str_field(d["name"], f"{where}.name", 64), int_field(d["version"], f"{where}.version", 1), sha
        )


# --------------------------------------------------------------------------------------------------
# stats


STATS_REQUIRED = {
    "schema",
    "stream",
    "type",
    "device_id",
    "fleet",
    "seq",
    "window_start",
    "window_end",
    "model",
    "spec_hash",
    "count",
    "inputs",
    "outputs",
    "latency_ms",
    "schema_violations",
    "dropped_windows",
    "agent_version",
}
STATS_REQUIRED_V1 = STATS_REQUIRED - {"stream"}
STATS_REQUIRED_V3 = STATS_REQUIRED | {"feedback"}


@dataclass
class StatsMessage:
    """One decoded stats window (structure validated; histogram lengths checked by ``profile``)."""

    device_id: str
    fleet: str
    seq: int
    window_start: float
    window_end: float
    model: ModelRef
    spec_hash: str
    count: int
    inputs: dict[str, Any] | None
    outputs: dict[str, Any] | None
    latency_ms: dict[str, Any] | None
    schema_violations: dict[str, int]
    dropped_windows: int
    agent_version: str
    stream: str | None = None  # the outbox's id (schema 2); None for schema 1 payloads
    feedback: Feedback | None = None  # ground-truth counts (schema 3); None: no labels arrived

    @property
    def heartbeat(self) -> bool:
        """True for an empty window (no predictions): it carries no profile."""
        return self.inputs is None

    def profile(self, spec: ProfileSpec) -> Profile:
        """Rebuild the window's Profile against the baseline spec, checking every histogram length."""
        if spec.spec_hash() != self.spec_hash:
            raise TelemetryError(
                f"window spec_hash {self.spec_hash[:12]} does not match the registered baseline {spec.spec_hash()[:12]}"
            )
        prof = spec.new_profile()
        prof.schema_violations = dict(self.schema_violations)
        if self.feedback is not None:
            self.check_feedback(len(spec.labels))
        if self.heartbeat:
            prof.feedback = self.feedback
            return prof
        assert self.outputs is not None and self.latency_ms is not None
        try:
            state = {
                "inputs": self.inputs,
                "class_counts": self.outputs["class_counts"],
                "confidence": self.outputs["confidence"],
                "latency_ms": self.latency_ms,
                "schema_violations": self.schema_violations,
            }
            if "values" in self.outputs:
                state["values"] = self.outputs["values"]
            prof = Profile.from_state(spec, state)
        except StatsError as e:
            raise TelemetryError(f"stats profile does not fit the baseline: {e}") from None
        if prof.count != self.count:
            raise TelemetryError(f"stats count {self.count} != {prof.count} predictions in the class counts")
        prof.feedback = self.feedback
        return prof

    def check_feedback(self, n_labels: int) -> None:
        """The confusion matrix must be K x K for the baseline's K labels (or absent above the limit)."""
        fb = self.feedback
        assert fb is not None
        want = n_labels <= CONFUSION_MAX_LABELS
        if (fb.confusion is not None) != want or (
            fb.confusion is not None and fb.confusion.shape[0] != n_labels
        ):
            shape = f"{n_labels} x {n_labels}" if want else "null"
            raise TelemetryError(f"feedback.confusion must be {shape} for the baseline's {n_labels} labels")


def encode_stats(
    *,
    device_id: str,
    fleet: str,
    seq: int,
    window_start: float,
    window_end: float,
    model: ModelRef,
    profile: Profile,
    dropped_windows: int = 0,
    agent_version: str = "",
    stream: str,
) -> bytes:
    """Encode a closed window; an empty one becomes a heartbeat without profile fields.

    ``stream`` is the outbox's id (``Outbox.stream``, 16 lowercase hex digits): ``seq`` counts
    within it, so a device whose state was wiped starts a new stream instead of reusing old seqs.
    """
    check_stream(stream)
    empty = profile.count == 0 and int(profile.inputs.count.sum()) == 0
    state = profile.state_dict()
    fb = state.get("feedback")
    doc = {
        "schema": STATS_SCHEMA if fb is None else STATS_SCHEMA_FEEDBACK,
        "type": "stats",
        "device_id": check_id(device_id, "device_id"),
        "fleet": check_id(fleet, "fleet"),
        "stream": stream,
        "seq": int(seq),
        "window_start": utc_iso(window_start),
        "window_end": utc_iso(window_end),
        "model": model.to_dict(),
        "spec_hash": profile.spec.spec_hash(),
        "count": profile.count,
        "inputs": None if empty else state["inputs"],
        "outputs": None if empty else _outputs(state),
        "latency_ms": None if empty else state["latency_ms"],
        "schema_violations": state["schema_violations"],
        "dropped_windows": int(dropped_windows),
        "agent_version": agent_version,
    }
    if fb is not None:
        doc["feedback"] = fb
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise TelemetryError(
            f"stats payload of {len(raw)} bytes exceeds {MAX_PAYLOAD_BYTES}; profile fewer features"
        )
    return raw


def _outputs(state: Mapping[str, Any]) -> dict[str, Any]:
    """A window's ``outputs``: class counts and confidence, and ``values`` (the per-sample scalar
    outputs of a regression or anomaly model) only when the profile has them."""
    out = {"class_counts": state["class_counts"], "confidence": state["confidence"]}
    if "values" in state:
        out["values"] = state["values"]
    return out


def _check_fsp(d: Any, where: str) -> dict[str, Any]:
    require_keys(d, {"count", "nan", "min", "max", "mean", "m2", "hist"}, set(), where)
    n = None
    for k in ("count", "nan", "min", "max", "mean", "m2", "hist"):
        if not isinstance(d[k], list):
            raise TelemetryError(f"{where}.{k} must be a list")
        if n is None:
            n = len(d[k])
        elif len(d[k]) != n:
            raise TelemetryError(f"{where}.{k} has {len(d[k])} entries, {where}.count has {n}")
    for h in d["hist"]:
        if not isinstance(h, list) or not all(type(c) is int for c in h) or (h and min(h) < 0):
            raise TelemetryError(f"{where}.hist must hold lists of non-negative integers")
    return dict(d)


def decode_stats(raw: bytes, topic_device: str | None = None, topic_fleet: str | None = None) -> StatsMessage:
    """Decode an untrusted stats payload; when topic ids are given they must match the payload's."""
    d = load_json(raw, schemas=STATS_SCHEMAS)
    if d.get("type") != "stats":
        raise TelemetryError(f"payload type {str(d.get('type'))[:20]!r} is not 'stats'")
    required = {1: STATS_REQUIRED_V1, 2: STATS_REQUIRED, 3: STATS_REQUIRED_V3}[d["schema"]]
    require_keys(d, required, set(), f"stats (schema {d['schema']})")
    feedback = None
    if d["schema"] >= 3:
        try:
            feedback = Feedback.from_dict(d["feedback"])
        except StatsError as e:
            raise TelemetryError(str(e)) from None
        if feedback.labelled == 0:
            raise TelemetryError(
                "feedback.labelled must be > 0 (a window without labels is sent at schema 2)"
            )
    stream = check_stream(d["stream"]) if d["schema"] >= 2 else None
    device, fleet = check_origin(d, topic_device, topic_fleet)
    start = parse_utc(d["window_start"], "window_start")
    end = parse_utc(d["window_end"], "window_end")
    if end < start:
        raise TelemetryError("window_end is before window_start")
    spec_hash = str_field(d["spec_hash"], "spec_hash", 64)
    sv = d["schema_violations"]
    if not isinstance(sv, dict) or len(sv) > 32:
        raise TelemetryError("schema_violations must be an object of at most 32 counters")
    viol = {
        str_field(k, "schema_violations key", 64): int_field(v, f"schema_violations.{k}")
        for k, v in sv.items()
    }
    nulls = [d[k] is None for k in ("inputs", "outputs", "latency_ms")]
    if any(nulls) and not all(nulls):
        raise TelemetryError("inputs, outputs and latency_ms must be all present or all null (heartbeat)")
    inputs = outputs = latency = None
    count = int_field(d["count"], "count")
    if not all(nulls):
        inputs = _check_fsp(d["inputs"], "inputs")
        require_keys(d["outputs"], {"class_counts", "confidence"}, {"values"}, "outputs")
        cc = d["outputs"]["class_counts"]
        if not isinstance(cc, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cc
        ):
            raise TelemetryError("outputs.class_counts must be a list of non-negative integers")
        outputs = {
            "class_counts": cc,
            "confidence": _check_fsp(d["outputs"]["confidence"], "outputs.confidence"),
        }
        if "values" in d["outputs"]:
            outputs["values"] = _check_fsp(d["outputs"]["values"], "outputs.values")
        latency = _check_fsp(d["latency_ms"], "latency_ms")
    elif count != 0:
        raise TelemetryError("a heartbeat (no profile) must have count 0")
    return StatsMessage(
        device_id=device,
        fleet=fleet,
        seq=int_field(d["seq"], "seq"),
        window_start=start,
        window_end=end,
        model=ModelRef.from_dict(d["model"]),
        spec_hash=spec_hash,
        count=count,
        inputs=inputs,
        outputs=outputs,
        latency_ms=latency,
        schema_violations=viol,
        dropped_windows=int_field(d["dropped_windows"], "dropped_windows"),
        agent_version=str_field(d["agent_version"], "agent_version", 40),
        stream=stream,
        feedback=feedback,
    )


# --------------------------------------------------------------------------------------------------
# status and events


@dataclass
class StatusMessage:
    """A device's retained status: ``online`` (birth, with its model) or ``offline`` (will or shutdown)."""

    device_id: str
    fleet: str
    state: str
    ts: float
    model: ModelRef | None
    agent_version: str
    target: str | None = None
    deployment: dict[str, Any] | None = None


def encode_status(
    *,
    device_id: str,
    fleet: str,
    state: str,
    ts: float,
    model: ModelRef | None,
    agent_version: str,
    target: str | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode a status message (``state`` is ``online`` or ``offline``)."""
    if state not in ("online", "offline"):
        raise TelemetryError(f"status state {state!r} must be 'online' or 'offline'")
    doc = {
        "schema": SCHEMA,
        "type": "status",
        "device_id": check_id(device_id, "device_id"),
        "fleet": check_id(fleet, "fleet"),
        "state": state,
        "ts": utc_iso(ts),
        "model": model.to_dict() if model else None,
        "agent_version": agent_version,
        "target": target,
        "deployment": dict(deployment) if deployment else None,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode_status(
    raw: bytes, topic_device: str | None = None, topic_fleet: str | None = None
) -> StatusMessage:
    """Decode an untrusted status payload."""
    d = load_json(raw)
    if d.get("type") != "status":
        raise TelemetryError(f"payload type {str(d.get('type'))[:20]!r} is not 'status'")
    require_keys(
        d,
        {"schema", "type", "device_id", "fleet", "state", "ts", "model", "agent_version"},
        {"target", "deployment"},
        "status",
    )
    device, fleet = check_origin(d, topic_device, topic_fleet)
    if d["state"] not in ("online", "offline"):
        raise TelemetryError(f"status state {str(d['state'])[:20]!r} must be 'online' or 'offline'")
    dep = d.get("deployment")
    if dep is not None and not isinstance(dep, dict):
        raise TelemetryError("status.deployment must be an object or null")
    target = d.get("target")
    if target is not None:
        str_field(target, "target", 64)
    return StatusMessage(
        device_id=device,
        fleet=fleet,
        state=d["state"],
        ts=parse_utc(d["ts"], "ts"),
        model=ModelRef.from_dict(d["model"]) if d["model"] is not None else None,
        agent_version=str_field(d["agent_version"], "agent_version", 40),
        target=target,
        deployment=dep,
    )


@dataclass
class EventMessage:
    """Something that happened on a device: ``model_loaded``, ``error``, ``deployed``, ``deploy_failed``..."""

    device_id: str
    fleet: str
    event: str
    ts: float
    message: str
    detail: dict[str, Any]


def encode_event(
    *,
    device_id: str,
    fleet: str,
    event: str,
    ts: float,
    message: str = "",
    detail: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode an event; ``detail`` maps short keys to strings, numbers, booleans or null."""
    if not EVENT_NAMES_RE.match(event):
        raise TelemetryError(f"event name {event!r} must be lowercase snake_case")
    doc = {
        "schema": SCHEMA,
        "type": "event",
        "device_id": check_id(device_id, "device_id"),
        "fleet": check_id(fleet, "fleet"),
        "event": event,
        "ts": utc_iso(ts),
        "message": message[:1000],
        "detail": dict(detail or {}),
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode()


def decode_event(raw: bytes, topic_device: str | None = None, topic_fleet: str | None = None) -> EventMessage:
    """Decode an untrusted event payload."""
    d = load_json(raw)
    if d.get("type") != "event":
        raise TelemetryError(f"payload type {str(d.get('type'))[:20]!r} is not 'event'")
    require_keys(
        d, {"schema", "type", "device_id", "fleet", "event", "ts", "message", "detail"}, set(), "event"
    )
    device, fleet = check_origin(d, topic_device, topic_fleet)
    ev = str_field(d["event"], "event", 41)
    if not EVENT_NAMES_RE.match(ev):
        raise TelemetryError("event name must be lowercase snake_case")
    detail = d["detail"]
    if not isinstance(detail, dict) or len(detail) > 32:
        raise TelemetryError("event.detail must be an object of at most 32 entries")
    for k, v in detail.items():
        if len(k) > 64 or not (v is None or isinstance(v, (str, int, float, bool))):
            raise TelemetryError("event.detail values must be strings, numbers, booleans or null")
    return EventMessage(
        device, fleet, ev, parse_utc(d["ts"], "ts"), str_field(d["message"], "message", 1000), detail
    )


__all__ = [
    "SCHEMA",
    "STATS_SCHEMA",
    "STATS_SCHEMAS",
    "STATS_SCHEMA_FEEDBACK",
    "MAX_PAYLOAD_BYTES",
    "TelemetryError",
    "ModelRef",
    "StatsMessage",
    "StatusMessage",
    "EventMessage",
    "topic",
    "fleet_topic",
    "parse_topic",
    "check_id",
    "check_stream",
    "utc_iso",
    "parse_utc",
    "load_json",
    "require_keys",
    "int_field",
    "str_field",
    "check_origin",
    "encode_stats",
    "decode_stats",
    "encode_status",
    "decode_status",
    "encode_event",
    "decode_event",
    "FeatureSetProfile",
]
