"""Ground truth for captured samples: the ``sample_labels`` message on the samples topic.

When ``POST /v1/feedback`` labels a prediction whose input was captured (``[capture]``), the agent
queues a small label record beside the samples and sends it, batched, on the same topic and outbox
(``edgefleet/<fleet>/<device_id>/samples``, QoS 1, same stream and seq numbering), so the fleet
store can give the exported sample its ``y``. A payload is told from a samples message by its
``type``::

    {"schema": 1, "type": "sample_labels", "device_id": ..., "fleet": ..., "stream": ..., "seq": ...,
     "labels": [{"id": "<prediction id>", "label": "<class name>", "index": 3, "ts": "...Z"}, ...]}

``index`` is the class's position in the labels of the model that made the prediction (the agent
refuses feedback once another model serves, so it is the captured sample's model). The first label
of an id wins, on the device (a second one is refused) and in the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from device_agent.formats import telemetry as wire  # the strict JSON reader and field checks
from device_agent.formats.samples import SAMPLE_ID_RE

LABELS_SCHEMA = 1
LABELS_TYPE = "sample_labels"
MAX_LABELS_PER_MESSAGE = 512
MAX_LABELS_PACKET_BYTES = 64 * 1024
LABEL_MAX_CHARS = 128


@dataclass(frozen=True)
class SampleLabel:
    """The true class of one captured sample, named by its prediction id."""

    id: str
    label: str
    index: int
    ts: float


@dataclass
class SampleLabelsMessage:
    """A batch of sample labels from one device and outbox stream, numbered by ``seq``."""

    device_id: str
    fleet: str
    stream: str
    seq: int
    labels: list[SampleLabel]


def payload_type(raw: bytes) -> str | None:
    """The ``type`` a samples-topic payload declares, read cheaply (None: not found in the head)."""
    head = raw[:200]
    for t in (LABELS_TYPE, "samples"):
        if b'"type":"' + t.encode() + b'"' in head:
            return t
    return None


def encode_sample_labels(
    *, device_id: str, fleet: str, stream: str, seq: int, labels: list[SampleLabel]
) -> bytes:
    """Encode one sample_labels message (1..MAX_LABELS_PER_MESSAGE labels)."""
    if not 1 <= len(labels) <= MAX_LABELS_PER_MESSAGE:
        raise wire.TelemetryError(f"a sample_labels message holds 1..{MAX_LABELS_PER_MESSAGE} labels")
    doc = {
        "schema": LABELS_SCHEMA,
        "type": LABELS_TYPE,
        "device_id": wire.check_id(device_id, "device_id"),
        "fleet": wire.check_id(fleet, "fleet"),
        "stream": wire.check_stream(stream),
        "seq": wire.int_field(seq, "seq"),
        "labels": [_doc(x) for x in labels],
    }
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_LABELS_PACKET_BYTES:
        raise wire.TelemetryError(
            f"sample_labels message of {len(raw)} bytes exceeds {MAX_LABELS_PACKET_BYTES}"
        )
    return raw


def decode_sample_labels(
    raw: bytes, topic_device: str | None = None, topic_fleet: str | None = None
) -> SampleLabelsMessage:
    """Decode an untrusted sample_labels payload strictly."""
    d = wire.load_json(raw, max_bytes=MAX_LABELS_PACKET_BYTES, schemas=(LABELS_SCHEMA,))
    if d.get("type") != LABELS_TYPE:
        raise wire.TelemetryError(f"payload type {str(d.get('type'))[:20]!r} is not {LABELS_TYPE!r}")
    wire.require_keys(
        d, {"schema", "type", "device_id", "fleet", "stream", "seq", "labels"}, set(), LABELS_TYPE
    )
    device, fleet = wire.check_origin(d, topic_device, topic_fleet)
    items = d["labels"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_LABELS_PER_MESSAGE:
        raise wire.TelemetryError(f"labels must be a list of 1..{MAX_LABELS_PER_MESSAGE} labels")
    out = []
    for i, it in enumerate(items):
        where = f"labels[{i}]"
        wire.require_keys(it, {"id", "label", "index", "ts"}, set(), where)
        sid = wire.str_field(it["id"], f"{where}.id", 64)
        if not SAMPLE_ID_RE.match(sid):
            raise wire.TelemetryError(f"{where}.id must be 1..64 of A-Z a-z 0-9 _ -")
        label = wire.str_field(it["label"], f"{where}.label", LABEL_MAX_CHARS)
        out.append(
            SampleLabel(
                sid,
                label,
                wire.int_field(it["index"], f"{where}.index"),
                wire.parse_utc(it["ts"], f"{where}.ts"),
            )
        )
    return SampleLabelsMessage(
        device, fleet, wire.check_stream(d["stream"]), wire.int_field(d["seq"], "seq"), out
    )


def pack_labels(labels: list[SampleLabel]) -> list[list[SampleLabel]]:
    """Split labels, in order, into batches whose message stays under MAX_LABELS_PACKET_BYTES."""
    out: list[list[SampleLabel]] = []
    cur: list[SampleLabel] = []
    size = 512  # envelope
    for x in labels:
        n = len(json.dumps(_doc(x))) + 1
        if cur and (size + n > MAX_LABELS_PACKET_BYTES or len(cur) >= MAX_LABELS_PER_MESSAGE):
            out.append(cur)
            cur, size = [], 512
        cur.append(x)
        size += n
    if cur:
        out.append(cur)
    return out


def _doc(x: SampleLabel) -> dict[str, Any]:
    return {"id": x.id, "label": x.label, "index": int(x.index), "ts": wire.utc_iso(x.ts)}


__all__ = [
    "LABELS_SCHEMA",
    "LABELS_TYPE",
    "SampleLabel",
    "SampleLabelsMessage",
    "decode_sample_labels",
    "encode_sample_labels",
    "pack_labels",
    "payload_type",
]
