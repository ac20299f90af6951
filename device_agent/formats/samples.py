"""The captured-samples wire format (``edgefleet/<fleet>/<device_id>/samples``, opt-in ``[capture]``).

A samples message carries up to ``MAX_SAMPLES_PER_MESSAGE`` inputs as the device received them
(bit-exact: dtype, shape and base64 of the raw bytes), with the model's scores, the predicted class,
the time, the model and the prediction id; one message stays under ``MAX_SAMPLES_PACKET_BYTES`` so it
fits the collector's packet limit (``pack_samples`` splits a batch). Decoding is as strict as the
telemetry payloads' (``device_agent.formats.telemetry``, whose helpers it uses): size limit, schema,
known keys, types, finite numbers, and the payload's device and fleet equal to the topic's. The
labels sent for captured samples share the topic (``device_agent.formats.samplelabels``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from device_agent.formats.telemetry import (
    TelemetryError,
    check_id,
    check_origin,
    check_stream,
    int_field,
    load_json,
    parse_utc,
    require_keys,
    str_field,
    utc_iso,
)

SAMPLES_SCHEMA = 1  # captured-samples payloads
# A device keeps each samples message under this, below the collector's packet limit
# (toolchain.fleet.quarantine.MAX_PACKET_BYTES) with room for the MQTT header and topic.
MAX_SAMPLES_PACKET_BYTES = 64 * 1024
MAX_SAMPLES_PER_MESSAGE = 256
DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")


@dataclass(frozen=True)
class Sample:
    """One captured input as the device received it (before preprocessing), bit-exact.

    ``data`` is the raw C-order bytes of an array of ``dtype`` and ``shape``; ``scores`` are the
    model's outputs for it and ``label`` the predicted class index."""

    id: str
    ts: float
    model_sha256: str
    model_version: str | None
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    label: int
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TelemetryError(f"sample dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if len(self.shape) > 8 or any(type(d) is not int or d < 0 for d in self.shape):
            raise TelemetryError("sample shape must be at most 8 non-negative integers")
        n = 1
        for d in self.shape:
            n *= d
        size = int(self.dtype.lstrip("uintfloa") or "8") // 8
        if n * size != len(self.data):
            raise TelemetryError(
                f"sample {self.id!r}: {len(self.data)} bytes do not match dtype {self.dtype} shape {self.shape}"
            )


@dataclass
class SamplesMessage:
    """A batch of captured samples from one device and outbox stream, numbered by ``seq``."""

    device_id: str
    fleet: str
    stream: str
    seq: int
    samples: list[Sample]


def _sample_doc(s: Sample) -> dict[str, Any]:
    import base64

    return {
        "id": s.id,
        "ts": utc_iso(s.ts),
        "model_sha256": s.model_sha256,
        "model_version": s.model_version,
        "dtype": s.dtype,
        "shape": list(s.shape),
        "data": base64.b64encode(s.data).decode("ascii"),
        "label": s.label,
        "scores": [float(v) for v in s.scores],
    }


def encode_samples(*, device_id: str, fleet: str, stream: str, seq: int, samples: list[Sample]) -> bytes:
    """Encode one samples message; raise TelemetryError if it exceeds MAX_SAMPLES_PACKET_BYTES
    (split with ``pack_samples``)."""
    if not 1 <= len(samples) <= MAX_SAMPLES_PER_MESSAGE:
        raise TelemetryError(
            f"a samples message holds 1..{MAX_SAMPLES_PER_MESSAGE} samples, got {len(samples)}"
        )
    doc = {
        "schema": SAMPLES_SCHEMA,
        "type": "samples",
        "device_id": check_id(device_id, "device_id"),
        "fleet": check_id(fleet, "fleet"),
        "stream": check_stream(stream),
        "seq": int_field(seq, "seq"),
        "samples": [_sample_doc(s) for s in samples],
    }
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_SAMPLES_PACKET_BYTES:
        raise TelemetryError(
            f"samples message of {len(raw)} bytes exceeds the {MAX_SAMPLES_PACKET_BYTES}-byte packet limit"
        )
    return raw


def sample_fits(s: Sample) -> bool:
    """Whether one sample alone fits in a samples message (a larger input is not captured)."""
    return _sample_size(s) + 512 <= MAX_SAMPLES_PACKET_BYTES


def _sample_json(s: Sample) -> bytes:
    return json.dumps(_sample_doc(s), separators=(",", ":"), allow_nan=False).encode()


def _sample_size(s: Sample) -> int:
    """``len(_sample_json(s))`` without encoding it (the capture path runs this for every sample;
    encoding costs about 30 us, this a few). ``tests/device_agent/test_sample_labels.py`` checks that
    the two agree."""
    if not 0 <= s.ts < 253_402_300_800:  # utc_iso is 24 characters for years 1970..9999
        return len(_sample_json(s))
    n = 4 * ((len(s.data) + 2) // 3)  # base64
    n += sum(len(repr(float(v))) for v in s.scores) + max(len(s.scores) - 1, 0)
    n += _json_len(s.id) + _json_len(s.model_sha256) + _json_len(s.dtype) + len(str(s.label))
    n += 4 if s.model_version is None else _json_len(s.model_version)
    n += sum(len(str(d)) for d in s.shape) + max(len(s.shape) - 1, 0) + 2
    # {"id":,"ts":"<24>","model_sha256":,"model_version":,"dtype":,"shape":,"data":"","label":,"scores":[]}
    return n + 121


def _json_len(v: str) -> int:
    """Length of ``v`` as a JSON string."""
    if v.isascii() and v.isprintable() and '"' not in v and "\\" not in v:
        return len(v) + 2
    return len(json.dumps(v))


def pack_samples(samples: list[Sample]) -> list[list[Sample]]:
    """Group samples, in order, into batches whose encoded message stays under the packet limit.

    A sample never spans two messages: one larger than the limit raises TelemetryError (the agent
    checks ``sample_fits`` before capturing and counts what it skips)."""
    out: list[list[Sample]] = []
    cur: list[Sample] = []
    size = 512  # envelope: schema, type, ids, stream, seq
    for s in samples:
        n = _sample_size(s) + 1
        if n + 512 > MAX_SAMPLES_PACKET_BYTES:
            raise TelemetryError(
                f"sample {s.id!r} of {len(s.data)} bytes does not fit in one samples message"
            )
        if cur and (size + n > MAX_SAMPLES_PACKET_BYTES or len(cur) >= MAX_SAMPLES_PER_MESSAGE):
            out.append(cur)
            cur, size = [], 512
        cur.append(s)
        size += n
    if cur:
        out.append(cur)
    return out


_SAMPLE_KEYS = {"id", "ts", "model_sha256", "model_version", "dtype", "shape", "data", "label", "scores"}
_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
SAMPLE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def decode_samples(
    raw: bytes, topic_device: str | None = None, topic_fleet: str | None = None
) -> SamplesMessage:
    """Decode an untrusted samples payload strictly: every sample's bytes must match its dtype and shape."""
    import base64
    import binascii

    d = load_json(raw, max_bytes=MAX_SAMPLES_PACKET_BYTES, schemas=(SAMPLES_SCHEMA,))
    if d.get("type") != "samples":
        raise TelemetryError(f"payload type {str(d.get('type'))[:20]!r} is not 'samples'")
    require_keys(d, {"schema", "type", "device_id", "fleet", "stream", "seq", "samples"}, set(), "samples")
    device, fleet = check_origin(d, topic_device, topic_fleet)
    items = d["samples"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_SAMPLES_PER_MESSAGE:
        raise TelemetryError(f"samples must be a list of 1..{MAX_SAMPLES_PER_MESSAGE} samples")
    out: list[Sample] = []
    for i, it in enumerate(items):
        where = f"samples[{i}]"
        require_keys(it, _SAMPLE_KEYS, set(), where)
        sid = str_field(it["id"], f"{where}.id", 64)
        if not SAMPLE_ID_RE.match(sid):
            raise TelemetryError(f"{where}.id must be 1..64 of A-Z a-z 0-9 _ -")
        sha = str_field(it["model_sha256"], f"{where}.model_sha256", 64)
        ver = it["model_version"]
        if ver is not None:
            ver = str_field(ver, f"{where}.model_version", 64)
        shape = it["shape"]
        if not isinstance(shape, list):
            raise TelemetryError(f"{where}.shape must be a list of integers")
        data = str_field(it["data"], f"{where}.data", MAX_SAMPLES_PACKET_BYTES)
        if not _B64_RE.match(data):
            raise TelemetryError(f"{where}.data must be base64")
        try:
            blob = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise TelemetryError(f"{where}.data must be base64") from None
        scores = it["scores"]
        if not isinstance(scores, list) or len(scores) > 4096:
            raise TelemetryError(f"{where}.scores must be a list of at most 4096 numbers")
        for v in scores:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TelemetryError(f"{where}.scores must be numbers")
        dtype = it["dtype"]
        if not isinstance(dtype, str):
            raise TelemetryError(f"{where}.dtype must be a string")
        out.append(
            Sample(
                sid,
                parse_utc(it["ts"], f"{where}.ts"),
                sha,
                ver,
                dtype,
                tuple(shape),
                blob,
                int_field(it["label"], f"{where}.label"),
                tuple(float(v) for v in scores),
            )
        )
    return SamplesMessage(device, fleet, check_stream(d["stream"]), int_field(d["seq"], "seq"), out)


__all__ = [
    "SAMPLES_SCHEMA",
    "MAX_SAMPLES_PACKET_BYTES",
    "MAX_SAMPLES_PER_MESSAGE",
    "DTYPES",
    "SAMPLE_ID_RE",
    "Sample",
    "SamplesMessage",
    "encode_samples",
    "decode_samples",
    "pack_samples",
    "sample_fits",
]
