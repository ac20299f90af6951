"""Opt-in capture of raw inputs for retraining (``[capture]``), off by default.

``Capturer.offer`` runs on the inference path and only decides: one random draw against the
current rate (``on_alert_rate`` while the fleet has told the device it is in alert, else
``sample_rate``), an hourly budget (``max_samples_per_hour``), then a copy of the raw input into a
bounded in-memory queue. ``Capturer.flush`` (the daemon's writer thread) packs queued samples into
samples messages under ``MAX_SAMPLES_PACKET_BYTES`` and stores them in their own outbox
(``state_dir/samples.sqlite3``, capped at ``max_disk_bytes``, oldest dropped first and counted), so
captured samples never evict statistics windows.

Ground truth: ``Capturer.label`` (called when ``POST /v1/feedback`` counted a label) queues a
``sample_labels`` record (``device_agent.formats.samplelabels``) for an id it captured, sent on the
same topic and outbox after the samples; a label for an id it did not capture (not drawn, over the
budget, too old to remember) is only counted (``labels_not_captured``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import prediction_ids
from device_agent.config import CaptureSettings
from device_agent.formats.samplelabels import SampleLabel, encode_sample_labels, pack_labels
from device_agent.formats.samples import Sample, encode_samples, pack_samples, sample_fits
from device_agent.formats.telemetry import TelemetryError, topic
from device_agent.outbox import Outbox

log = logging.getLogger("edgefleet.capture")
QUEUE_MAX = 1024  # samples waiting for the writer; beyond this the newest offer is dropped and counted
LOG_EVERY_S = 60.0
CAPTURED_IDS_MAX = 50_000  # ids of captured samples a later label can name (oldest forgotten first)


class Capturer:
    """Decide cheaply which predictions to capture and hand them to a samples outbox."""

    def __init__(
        self,
        settings: CaptureSettings,
        outbox: Outbox,
        *,
        fleet: str,
        device_id: str,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.fleet = fleet
        self.device_id = device_id
        self.topic = topic(fleet, device_id, "samples")
        self.in_alert = False
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: deque[Sample] = deque()
        self._hour = -1
        self._hour_count = 0
        self.captured_total = 0
        self.skipped_budget = 0  # over max_samples_per_hour
        self.skipped_queue = 0  # the writer fell behind
        self.skipped_too_large = 0  # one sample would not fit in a samples message
        self._last_log = 0.0
        self._captured_ids: OrderedDict[str, None] = OrderedDict()
        self._labels: deque[SampleLabel] = deque()
        self.labels_queued = 0  # labels of captured samples handed to the outbox
        self.labels_not_captured = 0  # labels for ids this capturer did not capture (or forgot)

    @property
    def rate(self) -> float:
        return self.settings.on_alert_rate if self.in_alert else self.settings.sample_rate

    def set_alert(self, on: bool) -> None:
        """The fleet said this device is (or is no longer) in alert: switch to on_alert_rate."""
        self.in_alert = bool(on)

    def offer(
        self,
        raw: np.ndarray,
        outputs: np.ndarray,
        labels: list[int],
        ids: list[str] | None,
        model_sha256: str,
        model_version: str | None,
    ) -> int:
        """Capture some rows of one request; return how many were queued. Never raises.

        ``ids``: the prediction ids the caller got, one per row; None: a fresh id is made for each
        captured row only (``device_agent.agent.prediction_ids``)."""
        rate = self.rate
        if rate <= 0.0:
            return 0
        n = 0
        now = self._clock()
        for i in range(len(labels)):
            if rate < 1.0 and self._rng.random() >= rate:
                continue
            with self._lock:
                hour = int(now // 3600)
                if hour != self._hour:
                    self._hour, self._hour_count = hour, 0
                if self._hour_count >= self.settings.max_samples_per_hour:
                    self.skipped_budget += 1
                    self._note_skip()
                    continue
                if len(self._queue) >= QUEUE_MAX:
                    self.skipped_queue += 1
                    self._note_skip()
                    continue
                row = np.ascontiguousarray(raw[i])
                s = Sample(
                    ids[i] if ids is not None else _new_id(),
                    now,
                    model_sha256,
                    model_version,
                    str(row.dtype),
                    tuple(int(d) for d in row.shape),
                    row.tobytes(),
                    int(labels[i]),
                    tuple(float(v) for v in outputs[i]),
                )
                if not sample_fits(s):
                    self.skipped_too_large += 1
                    self._note_skip()
                    continue
                self._hour_count += 1
                self._queue.append(s)
                self._captured_ids[s.id] = None
                if len(self._captured_ids) > CAPTURED_IDS_MAX:
                    self._captured_ids.popitem(last=False)
                n += 1
        return n

    def label(self, pid: str, label: str, index: int) -> None:
        """Queue the true label of prediction ``pid`` if its sample was captured; else count it."""
        with self._lock:
            if pid not in self._captured_ids or len(self._labels) >= QUEUE_MAX:
                self.labels_not_captured += 1
                return
            del self._captured_ids[pid]  # the device takes one label per id
            self._labels.append(SampleLabel(pid, label, int(index), self._clock()))

    def _note_skip(self) -> None:
        now = self._clock()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("capture skipped samples: %s", self.counts())

    def flush(self) -> int:
        """Store queued samples in the samples outbox (off the inference path); return messages written."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
            labels = list(self._labels)
            self._labels.clear()
        written = self._flush_labels(labels) if not items else 0
        if not items:
            return written
        try:
            batches = pack_samples(items)
        except TelemetryError:  # sample_fits already refused these; keep the rest
            log.exception("capture: cannot pack samples")
            return 0

        def encoder(b: list[Sample]) -> Callable[[int, int], bytes]:
            return lambda seq, _dropped: encode_samples(
                device_id=self.device_id, fleet=self.fleet, stream=self.outbox.stream, seq=seq, samples=b
            )

        self.outbox.add_many(self.topic, [encoder(b) for b in batches])
        with self._lock:
            self.captured_total += len(items)
        return len(batches) + self._flush_labels(labels)

    def _flush_labels(self, labels: list[SampleLabel]) -> int:
        """Store queued labels after the samples they name; return messages written."""
        if not labels:
            return 0

        def encoder(b: list[SampleLabel]) -> Callable[[int, int], bytes]:
            return lambda seq, _dropped: encode_sample_labels(
                device_id=self.device_id, fleet=self.fleet, stream=self.outbox.stream, seq=seq, labels=b
            )

        batches = pack_labels(labels)
        self.outbox.add_many(self.topic, [encoder(b) for b in batches])
        with self._lock:
            self.labels_queued += len(labels)
        return len(batches)

    def counts(self) -> dict[str, Any]:
        rows, nbytes = self.outbox.depth()
        return {
            "rate": self.rate,
            "in_alert": self.in_alert,
            "captured": self.captured_total,
            "queued": len(self._queue),
            "pending_messages": rows,
            "pending_bytes": nbytes,
            "dropped_messages_disk_cap": self.outbox.dropped_total,
            "skipped_hourly_budget": self.skipped_budget,
            "skipped_queue_full": self.skipped_queue,
            "skipped_too_large": self.skipped_too_large,
            "labels_sent": self.labels_queued,
            "labels_not_captured": self.labels_not_captured,
        }


def _new_id() -> str:
    return prediction_ids(1)[0]


def open_samples_outbox(state_dir: Path, settings: CaptureSettings) -> Outbox:
    """The samples outbox: its own file and disk cap, so samples never evict windows."""
    return Outbox(state_dir / "samples.sqlite3", max_rows=1_000_000, max_bytes=settings.max_disk_bytes)
