"""The alert command (schema 1): the fleet tells one device whether it is in drift alert.

The collector publishes it RETAINED (QoS 1) on ``edgefleet/<fleet>/<device_id>/cmd/alert`` when the
device's drift state enters or leaves ``alert`` (including a reset by a model change), so a device
that connects later still gets the latest word. The device (``device_agent.alertfollow``) follows it:
while ``in_alert`` it captures at ``[capture] on_alert_rate`` instead of ``sample_rate``::

    {"schema": 1, "type": "alert_state", "fleet": "lab", "device_id": "pi-001", "in_alert": true,
     "seq": 1796000000123456,            # evaluation time in microseconds: newer commands win
     "ts": "2026-12-06T02:10:00.123Z",  # optional, the same time for people
     "state": "alert",                   # optional: ok | warn | alert (the drift state behind it)
     "reason": "input psi 0.41 > 0.2",   # optional, at most 500 characters
     "score": 0.41,                      # optional: the evaluation's worst PSI (finite or null)
     "model_sha256": "<64 hex>"}         # optional: the model the evaluation judged

Decoding is strict: size limit first, then JSON, ``schema``, known keys, types and finite numbers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from device_agent.formats.strict import bounded_int, check_keys
from device_agent.formats.telemetry import TOPIC_ROOT, TelemetryError, check_id, load_json, utc_iso

ALERT_COMMAND_SCHEMA = 1
ALERT_COMMAND_TYPE = "alert_state"
ALERT_COMMAND_KIND = "cmd/alert"  # the topic's tail under edgefleet/<fleet>/<device_id>/
ALERT_COMMAND_MAX_BYTES = 2048  # a command is a few hundred bytes; anything larger is refused unread
REASON_MAX_CHARS = 500
STATES = ("ok", "warn", "alert")
SEQ_MAX = 253_402_300_799_000_000  # 9999-12-31T23:59:59Z in microseconds (a datetime still formats it)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = ("schema", "type", "fleet", "device_id", "in_alert", "seq")
_OPTIONAL = ("ts", "state", "reason", "score", "model_sha256")


class AlertCommandError(TelemetryError):
    """An alert command payload does not follow schema 1."""


@dataclass(frozen=True)
class AlertCommand:
    """One decoded alert command."""

    fleet: str
    device_id: str
    in_alert: bool
    seq: int  # evaluation time in microseconds since the epoch; a device applies only newer ones
    state: str | None = None
    reason: str | None = None
    score: float | None = None
    model_sha256: str | None = None
    ts: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device_id": self.device_id,
            "in_alert": self.in_alert,
            "seq": self.seq,
            "state": self.state,
            "reason": self.reason,
            "score": self.score,
            "model_sha256": self.model_sha256,
            "ts": self.ts,
        }


def alert_command_topic(fleet: str, device_id: str) -> str:
    """Return ``edgefleet/<fleet>/<device_id>/cmd/alert``."""
    return f"{TOPIC_ROOT}/{check_id(fleet, 'fleet')}/{check_id(device_id, 'device_id')}/{ALERT_COMMAND_KIND}"


def is_alert_command_topic(topic: str) -> bool:
    """True for a topic of the form ``edgefleet/<fleet>/<device_id>/cmd/alert``."""
    parts = topic.split("/")
    return len(parts) == 5 and parts[0] == TOPIC_ROOT and "/".join(parts[3:]) == ALERT_COMMAND_KIND


def seq_for(ts: float) -> int:
    """The command's ``seq`` for an evaluation at POSIX time ``ts`` (microseconds)."""
    return int(round(ts * 1_000_000))


def encode_alert_command(
    *,
    fleet: str,
    device_id: str,
    in_alert: bool,
    seq: int,
    state: str | None = None,
    reason: str | None = None,
    score: float | None = None,
    model_sha256: str | None = None,
) -> bytes:
    """Encode an alert command; the result always decodes (it is checked with ``decode_alert_command``)."""
    bounded_int(seq, "alert command seq", 1, SEQ_MAX, error=_err)
    doc: dict[str, Any] = {
        "schema": ALERT_COMMAND_SCHEMA,
        "type": ALERT_COMMAND_TYPE,
        "fleet": fleet,
        "device_id": device_id,
        "in_alert": bool(in_alert),
        "seq": seq,
        "ts": utc_iso(seq / 1_000_000),
    }
    if state is not None:
        doc["state"] = state
    if reason is not None:
        doc["reason"] = reason[:REASON_MAX_CHARS]
    if score is not None:
        doc["score"] = round(float(score), 6) if math.isfinite(score) else None
    if model_sha256 is not None:
        doc["model_sha256"] = model_sha256
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    decode_alert_command(raw)
    return raw


def _err(message: str) -> AlertCommandError:
    return AlertCommandError(message)


def decode_alert_command(raw: bytes) -> AlertCommand:
    """Decode an untrusted alert command or raise AlertCommandError saying what is wrong."""
    if len(raw) > ALERT_COMMAND_MAX_BYTES:
        raise AlertCommandError(
            f"alert command of {len(raw)} bytes exceeds the {ALERT_COMMAND_MAX_BYTES}-byte limit"
        )
    try:
        doc = load_json(raw, ALERT_COMMAND_MAX_BYTES, (ALERT_COMMAND_SCHEMA,))
    except AlertCommandError:
        raise
    except TelemetryError as e:
        raise AlertCommandError(f"alert command: {e}") from None
    check_keys(doc, _REQUIRED, _OPTIONAL, "alert command", error=_err)
    if doc["type"] != ALERT_COMMAND_TYPE:
        raise AlertCommandError(f"alert command type {str(doc['type'])[:40]!r} is not {ALERT_COMMAND_TYPE!r}")
    try:
        fleet = check_id(doc["fleet"], "fleet")
        device_id = check_id(doc["device_id"], "device_id")
    except TelemetryError as e:
        raise AlertCommandError(f"alert command: {e}") from None
    if not isinstance(doc["in_alert"], bool):
        raise AlertCommandError("alert command in_alert must be true or false")
    seq = bounded_int(doc["seq"], "alert command seq", 1, SEQ_MAX, error=_err)
    state = doc.get("state")
    if state is not None and state not in STATES:
        raise AlertCommandError(f"alert command state {str(state)[:20]!r} is not one of {', '.join(STATES)}")
    reason = doc.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_MAX_CHARS):
        raise AlertCommandError(
            f"alert command reason must be a string of at most {REASON_MAX_CHARS} characters"
        )
    score = doc.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise AlertCommandError(
                f"alert command score must be a finite number or null, got {str(score)[:20]}"
            )
        score = float(score)
    sha = doc.get("model_sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA_RE.match(sha)):
        raise AlertCommandError("alert command model_sha256 must be 64 lowercase hex digits")
    ts = doc.get("ts")
    if ts is not None and (not isinstance(ts, str) or len(ts) > 40):
        raise AlertCommandError("alert command ts must be a string of at most 40 characters")
    return AlertCommand(fleet, device_id, doc["in_alert"], seq, state, reason, score, sha, ts)


__all__ = [
    "ALERT_COMMAND_KIND",
    "ALERT_COMMAND_MAX_BYTES",
    "ALERT_COMMAND_SCHEMA",
    "AlertCommand",
    "AlertCommandError",
    "alert_command_topic",
    "decode_alert_command",
    "encode_alert_command",
    "is_alert_command_topic",
    "seq_for",
]
