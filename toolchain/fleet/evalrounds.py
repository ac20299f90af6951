"""When the collector evaluates drift: devices with enough new predictions, in rounds and chunks.

The collector adds each stored batch's predictions per device (``add``). A device is due once it has
``min_count`` new predictions under its baseline's settings. Due devices are evaluated at most every
``EVAL_EVERY_S``, in chunks of ``EVAL_CHUNK`` devices (the next chunk follows as soon as one
finishes), in the evaluation worker process when there is one, else in the collector's worker
thread. The in-memory counts only say when to look; the database decides what is evaluated (the
collectors of a shared group each store part of a device's windows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from toolchain.fleet.alerts import Evaluator
from toolchain.fleet.ingest import Counters
from toolchain.fleet.registry import BaselineCache
from toolchain.fleet.workers import EvalWorker

log = logging.getLogger("edgefleet.fleet.collector")

EVAL_EVERY_S = 1.0  # a round of evaluations starts at most this often
EVAL_CHUNK = 200  # devices per evaluation (short transactions; the next chunk follows at once)
STOP_EVAL_WAIT_S = 10.0  # on stop, wait this long for a running evaluation to publish its alerts

Due = list[tuple[tuple[str, str], tuple[int, str]]]  # [((fleet, device), (predictions, model sha))]


class EvalRounds:
    """The devices waiting for an evaluation and the evaluation running for some of them."""

    def __init__(
        self,
        evaluator: Evaluator,
        baselines: BaselineCache,
        worker: EvalWorker | None,
        counters: Counters,
        publish: Callable[[str, bytes], None],
    ) -> None:
        self.evaluator = evaluator
        self.baselines = baselines
        self.worker = worker
        self.counters = counters
        self.publish = publish
        self._pending: dict[tuple[str, str], tuple[int, str]] = {}
        self._last = 0.0
        self._more = False
        self._left = 0
        self._job: tuple[Due, Future[Any]] | None = None

    def add(self, key: tuple[str, str], n: int, sha: str) -> None:
        """Count ``n`` new predictions of a device under model ``sha`` (a new model starts over)."""
        prev_n, prev_sha = self._pending.get(key, (0, sha))
        self._pending[key] = (prev_n + n if prev_sha == sha else n, sha)

    @property
    def backlog(self) -> int:
        """Devices due for evaluation that are not evaluated yet (running or waiting; 0 when idle)."""
        job = self._job
        return self._left + (len(job[0]) if job is not None else 0)

    def step(self) -> None:
        """Collect a finished evaluation; start the next one when devices are due."""
        if not self._collect():
            return
        if not self._pending:
            return
        if not self._more and time.monotonic() - self._last <= EVAL_EVERY_S:
            return
        due = self._take_due()
        if not due:
            return
        self._last = time.monotonic()
        worker = self.worker
        job_fut: Future[Any] | None = worker.submit([key for key, _ in due]) if worker is not None else None
        if job_fut is not None:
            self._job = (due, job_fut)
            return
        try:
            done = self.evaluator.evaluate_many([key for key, _ in due])
        except Exception as e:  # noqa: BLE001 - evaluation is best effort; ingestion goes on
            log.error("evaluating %d device(s) failed: %s", len(due), e)
            return
        self.counters.evaluations += len(done)
        self.counters.alerts += sum(ev.changed for ev in done.values())

    def finish(self) -> None:
        """On stop: wait for a running evaluation, so its alerts are published before the collector leaves."""
        if self._job is not None:
            wait([self._job[1]], timeout=STOP_EVAL_WAIT_S)
            self._collect()

    def _collect(self) -> bool:
        """Take a finished evaluation's alerts and counts; False while one is still running."""
        job = self._job
        if job is None:
            return True
        due, fut = job
        if not fut.done():
            return False
        self._job = None
        assert self.worker is not None
        out = self.worker.outcome(fut)
        if out is None:  # the worker failed or the database was down: evaluate them again
            for key, (n, sha) in due:
                self.add(key, n, sha)
            return True
        for level, name, message in out.records:
            logging.getLogger(name).log(level, "%s", message)
        for topic, payload in out.alerts:
            try:
                self.publish(topic, payload)
            except Exception as e:  # noqa: BLE001 - the alert is stored; publishing is best effort
                log.error("could not publish an alert on %s: %s", topic, e)
        self.counters.evaluations += out.evaluated
        self.counters.alerts += out.changed
        return True

    def _take_due(self) -> Due:
        """Remove and return up to EVAL_CHUNK devices with at least min_count new predictions."""
        due: Due = []
        left = 0
        for key, (n, sha) in list(self._pending.items()):
            try:
                base = self.baselines.get(sha)
            except Exception as e:  # noqa: BLE001 - database down: try again at the next round
                log.error("reading baseline %s failed: %s", sha[:12], e)
                break
            if base is not None and n >= base.config.min_count:
                if len(due) >= EVAL_CHUNK:
                    left += 1
                    continue
                self._pending.pop(key, None)
                due.append((key, (n, sha)))
        self._more = left > 0
        self._left = left
        return due
