"""Ground truth for earlier predictions: a bounded book of recent prediction ids (``/v1/feedback``).

``POST /v1/predict`` gives every sample an id (``device_agent.agent.prediction_ids``) and notes it
here with the predicted label index and the model that ran. ``POST /v1/feedback`` looks the id up
and, when the model is still the one serving, counts the true label in the open statistics window
(``Agent.record_label``). The book holds at most ``max_ids`` ids, oldest dropped first; it also
remembers as many dropped ids, so a label that comes too late is told apart from an id this agent
never issued. Nothing here survives a restart: ids from before it are unknown (404). Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple


class Outcome(str, Enum):
    """What became of one label sent to ``/v1/feedback``."""

    CORRECT = "correct"  # counted; the prediction was right
    INCORRECT = "incorrect"  # counted; the prediction was wrong
    UNKNOWN = "unknown_id"  # 404: not an id this agent issued since it started
    EXPIRED = "expired"  # 409: issued, but dropped from the book (more than max_ids predictions ago)
    ALREADY = "already_labelled"  # 409: labelled before (the first label stays)
    MODEL_CHANGED = "model_changed"  # 409: made by a model that no longer serves
    BAD_LABEL = "bad_label"  # 400: not one of the model's labels


HTTP_CODE = {
    Outcome.CORRECT: 200,
    Outcome.INCORRECT: 200,
    Outcome.UNKNOWN: 404,
    Outcome.EXPIRED: 409,
    Outcome.ALREADY: 409,
    Outcome.MODEL_CHANGED: 409,
    Outcome.BAD_LABEL: 400,
}


class Issued(NamedTuple):
    """A prediction the book can label: its top-1 label index and the model's manifest sha256."""

    predicted: int
    model_sha256: str
    labelled: bool = False


class FeedbackBook:
    """The ``max_ids`` most recent prediction ids and the outcome counts of labels sent for them."""

    def __init__(self, max_ids: int) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        self.max_ids = int(max_ids)
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, Issued] = OrderedDict()
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self.counts: dict[str, int] = {o.value: 0 for o in Outcome}

    def __len__(self) -> int:
        return len(self._ids)

    def remember(self, ids: Sequence[str], predicted: Sequence[int], model_sha256: str) -> None:
        """Note a batch's ids with their top-1 label indices; the oldest ids beyond ``max_ids`` go."""
        with self._lock:
            book, dropped = self._ids, self._dropped
            for pid, p in zip(ids, predicted, strict=True):
                book[pid] = Issued(int(p), model_sha256)
            while len(book) > self.max_ids:
                old, _ = book.popitem(last=False)
                dropped[old] = None
                if len(dropped) > self.max_ids:
                    dropped.popitem(last=False)

    def claim(self, pid: str, serving_sha256: str) -> tuple[Outcome | None, Issued | None]:
        """Mark ``pid`` labelled and return ``(None, issued)``; or ``(outcome, None)`` when it cannot be.

        The refusal is counted here; the caller counts the accepted outcome with ``count``.
        """
        with self._lock:
            got = self._ids.get(pid)
            if got is None:
                outcome = Outcome.EXPIRED if pid in self._dropped else Outcome.UNKNOWN
            elif got.labelled:
                outcome = Outcome.ALREADY
            elif got.model_sha256 != serving_sha256:
                outcome = Outcome.MODEL_CHANGED
            else:
                self._ids[pid] = got._replace(labelled=True)
                return None, got
            self.counts[outcome.value] += 1
            return outcome, None

    def release(self, pid: str) -> None:
        """Undo ``claim`` (the label could not be counted after all: the model switched meanwhile)."""
        with self._lock:
            got = self._ids.get(pid)
            if got is not None:
                self._ids[pid] = got._replace(labelled=False)

    def count(self, outcome: Outcome) -> None:
        """Count one outcome decided outside ``claim`` (correct, incorrect, bad label)."""
        with self._lock:
            self.counts[outcome.value] += 1

    def snapshot(self) -> dict[str, int]:
        """The outcome counts since start, and how many ids the book holds."""
        with self._lock:
            return {**self.counts, "ids_held": len(self._ids), "max_ids": self.max_ids}


__all__ = ["FeedbackBook", "HTTP_CODE", "Issued", "Outcome"]
