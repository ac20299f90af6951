"""Captured samples and their labels into the fleet store (the collector's ``+/samples`` topic).

Two message types share the topic (``device_agent.formats.samples.decode_samples`` and
``device_agent.formats.samplelabels.decode_sample_labels``, both strict: a refused payload raises
``TelemetryError`` and the ingestor quarantines and counts it like a bad window). Rows go in the
ingestor's transaction, before the broker is acknowledged:

* ``samples``: unique per ``(fleet, device_id, sample_id)`` (the prediction id), so a redelivered or
  resent message stores nothing new; every sample not stored because it is there is counted
  (``samples_duplicate``) and logged in one rate-limited line.
* ``sample_labels``: unique per ``(fleet, device_id, sample_id)``; the first label wins. A label may
  name a sample the store does not have (the device dropped it at its disk cap): it is kept, and
  ``fleet samples list`` counts such labels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from device_agent.formats.samplelabels import LABELS_TYPE, decode_sample_labels, payload_type
from device_agent.formats.samples import decode_samples
from device_agent.formats.telemetry import TelemetryError
from toolchain.fleet.ratelog import Throttle
from toolchain.fleet.rows import COUNTER_SQL, CounterRow, insert_sql

if TYPE_CHECKING:
    from toolchain.fleet.storage import Store

log = logging.getLogger("edgefleet.fleet.collector")
DUPLICATE_LOG_EVERY_S = 60.0


class SampleRow(NamedTuple):
    """One captured input (``samples``)."""

    fleet: str
    device_id: str
    sample_id: str
    stream: str
    seq: int
    pos: int  # its place in the samples message
    ts: float
    received_at: float
    model_sha256: str
    model_version: str | None
    predicted: int
    scores: bytes  # float64 little-endian
    dtype: str
    shape: str  # JSON list
    data: bytes  # the raw C-order input, bit-exact


class LabelRow(NamedTuple):
    """The true class of one captured sample (``sample_labels``)."""

    fleet: str
    device_id: str
    sample_id: str
    label: str
    label_index: int
    ts: float
    received_at: float


SAMPLE_SQL = (
    insert_sql("samples", SampleRow._fields) + " ON CONFLICT (fleet, device_id, sample_id) DO NOTHING"
)
LABEL_SQL = (
    insert_sql("sample_labels", LabelRow._fields) + " ON CONFLICT (fleet, device_id, sample_id) DO NOTHING"
)


@dataclass
class _Batch:
    samples: list[SampleRow] = field(default_factory=list)
    labels: list[LabelRow] = field(default_factory=list)
    stored: tuple[int, int, int, int] = (0, 0, 0, 0)  # samples new, dup; labels new, dup


class SampleIngest:
    """The samples part of one ``Ingestor`` batch: ``begin``, ``judge`` each message, ``store``, ``count``."""

    def __init__(self) -> None:
        self._b = _Batch()
        self.duplicate_log = Throttle(log, DUPLICATE_LOG_EVERY_S)

    def begin(self) -> None:
        """Forget the rows of a previous (committed or failed) batch."""
        self._b = _Batch()

    def judge(self, m: Any, fleet: str, device: str) -> None:
        """Decode one samples-topic message (an ``ingest.Incoming``) into rows; raise TelemetryError
        when it is refused."""
        if payload_type(m.payload) == LABELS_TYPE:
            lm = decode_sample_labels(m.payload, topic_device=device, topic_fleet=fleet)
            for x in lm.labels:
                self._b.labels.append(LabelRow(fleet, device, x.id, x.label, x.index, x.ts, m.received_at))
            return
        msg = decode_samples(m.payload, topic_device=device, topic_fleet=fleet)
        rows = []
        for i, s in enumerate(msg.samples):
            if len(s.scores) and s.label >= len(s.scores):
                raise TelemetryError(f"samples[{i}].label {s.label} is outside its {len(s.scores)} scores")
            rows.append(
                SampleRow(
                    fleet,
                    device,
                    s.id,
                    msg.stream,
                    msg.seq,
                    i,
                    s.ts,
                    m.received_at,
                    s.model_sha256,
                    s.model_version,
                    s.label,
                    np.asarray(s.scores, dtype="<f8").tobytes(),
                    s.dtype,
                    json.dumps(list(s.shape)),
                    s.data,
                )
            )
        self._b.samples += rows  # only once every sample of the message is valid

    def store(self, store: Store, now: float) -> None:
        """Insert the batch's rows (in the caller's open transaction) and their counters."""
        b = self._b
        if not (b.samples or b.labels):
            return
        s_new = sum(store.insert_each(SAMPLE_SQL, b.samples))
        l_new = sum(store.insert_each(LABEL_SQL, b.labels))
        b.stored = (s_new, len(b.samples) - s_new, l_new, len(b.labels) - l_new)
        names = ("samples_stored", "samples_duplicate", "sample_labels_stored", "sample_labels_duplicate")
        store.executemany(
            COUNTER_SQL, [CounterRow(k, n, now) for k, n in zip(names, b.stored, strict=True) if n]
        )

    def count(self, c: Any) -> None:
        """Add a committed batch to the collector's ``ingest.Counters``; log duplicates (rate-limited)."""
        s_new, s_dup, l_new, l_dup = self._b.stored
        c.samples_stored += s_new
        c.samples_duplicate += s_dup
        c.sample_labels_stored += l_new
        c.sample_labels_duplicate += l_dup
        if s_dup or l_dup:
            self.duplicate_log.log(
                logging.INFO,
                "%d captured sample(s) and %d sample label(s) not stored because they already are"
                " (same device and prediction id: redelivered or resent)",
                s_dup,
                l_dup,
                events=s_dup + l_dup,
            )
        self._b = _Batch()
