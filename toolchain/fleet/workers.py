"""The collector's worker processes: decoding windows, and drift evaluation.

On the collector's path a window costs about as much CPU in Python to decode and validate
(``fastpath.decode_window``: JSON, schema checks, packing) as everything else together (paho's
network thread, SQL, acknowledgements, drift evaluation), and one process runs Python on one core at
a time. ``DecodePool`` hands each batch's raw stats payloads to ``workers`` spawned processes, so the
collector's process spends its time on MQTT and the database while the next batch is decoded on
another core.

Workers only *decode*: they open the database read-only for the baselines' layouts and return, per
message, a ``FastWindow`` or None ("not accepted by the fast path"). Storing, acknowledging and
quarantining stay in the collector, which judges every None with the contract decoders, exactly as
without a pool. A worker that dies (or a pool that cannot start) makes the pool fall back to decoding
in the collector's process, with a log line; nothing is lost or acknowledged early.

``EvalWorker`` runs drift evaluations (``alerts.Evaluator.evaluate_many``: read the new windows,
merge, compare, hysteresis, store the verdicts) in one more process with its own database connection,
so evaluations never hold up ingestion. It returns the alerts to publish and the log records it made;
the collector publishes them on its MQTT connection and logs them. One evaluation runs at a time; the
devices that come due meanwhile wait for the next. If the process dies, the collector evaluates in
its own process from then on and the devices of the lost evaluation are evaluated again (the database
decides what is new, so nothing is evaluated twice).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from device_agent.formats.telemetry import parse_topic
from toolchain.fleet.fastpath import FastWindow, Refused, decode_window

log = logging.getLogger("edgefleet.fleet.workers")

_cache: Any = None  # the worker's BaselineCache
PARENT_CHECK_S = 0.5


def _worker_setup() -> None:
    """What every worker process does first: leave SIGINT to the collector, exit with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the collector decides when workers stop
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _init_worker(db_url: str) -> None:
    global _cache
    from toolchain.fleet.registry import BaselineCache
    from toolchain.fleet.storage import open_store

    _worker_setup()
    _cache = BaselineCache(open_store(db_url, migrate=False))


def _exit_with_parent(parent: int) -> None:
    """A collector killed with SIGKILL cannot stop its workers: they notice and exit by themselves."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _lookup(sha: str) -> Any:
    base = _cache.get(sha)
    return (base.layout, base.spec_hash) if base is not None else None


def decode_batch(items: list[tuple[str, bytes]]) -> list[FastWindow | None]:
    """Fast-path decode each (topic, payload) of stats; None where the fast path does not accept it."""
    out: list[FastWindow | None] = []
    for topic, payload in items:
        try:
            fleet, device, kind = parse_topic(topic)
            out.append(decode_window(payload, fleet, device, _lookup) if kind == "stats" else None)
        except Refused:
            out.append(None)
        except Exception:  # noqa: BLE001 - a database hiccup or a bug: the collector judges it itself
            out.append(None)
    return out


def default_workers(cpus: int | None) -> int:
    """One decode worker on a machine with two or more cores; none on a single core."""
    return 1 if (cpus or 1) >= 2 else 0


class _Workers:
    """Spawned worker processes, and the switch to the collector's own process when they fail."""

    def __init__(self, db_url: str, workers: int, initializer: Callable[[str], None], failure: str) -> None:
        self.db_url = db_url
        self.workers = workers
        self._initializer = initializer
        self._failure = failure  # "the ... failed (%s); ... in the collector's process"
        self._pool: ProcessPoolExecutor | None = None
        self.failed = False

    def start(self) -> Any:
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context("spawn"),  # the collector has threads: never fork it
                initializer=self._initializer,
                initargs=(self.db_url,),
            )
        return self

    @property
    def usable(self) -> bool:
        return self._pool is not None and not self.failed

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        if self._pool is None or self.failed:
            return None
        try:
            return self._pool.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError) as e:
            self._broken(e)
            return None

    def _broken(self, e: BaseException) -> None:
        if not self.failed:
            log.error(self._failure, e)
        self.failed = True

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        procs = getattr(self._pool, "_processes", None) or {}
        return sorted(procs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class DecodePool(_Workers):
    """``workers`` decode processes; ``submit`` returns a future of per-message results or None."""

    def __init__(self, db_url: str, workers: int) -> None:
        super().__init__(
            db_url,
            workers,
            _init_worker,
            "the decode worker pool failed (%s); decoding in the collector's process",
        )

    def submit(self, batch: Sequence[Any]) -> Future[list[FastWindow | None]] | None:
        """Start decoding a batch of messages (``.topic``, ``.payload``) in a worker; None when there
        is no working pool."""
        if not self.usable:
            return None
        # Only stats go through the fast path: other payloads (samples: up to 64 KB) are not shipped.
        return self._submit(
            decode_batch, [(m.topic, m.payload if m.topic.endswith("/stats") else b"") for m in batch]
        )

    def result(self, fut: Future[list[FastWindow | None]] | None) -> list[FastWindow | None] | None:
        """The decoded batch, or None (decode in the collector's process) when the pool failed."""
        if fut is None:
            return None
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - a dead worker: decode in process instead
            self._broken(e)
            return None


# --------------------------------------------------------------------------------------------------
# Drift evaluation


class _Captured(logging.Handler):
    """Keeps the evaluation's log records so the collector can log them in its own process."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.name, record.getMessage()))


class _Alerts:
    """AlertSink of the worker: the alerts are published by the collector."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish_alert(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))


_evaluator: Any = None
_captured: _Captured | None = None
_alerts: _Alerts | None = None


def _init_eval_worker(db_url: str) -> None:
    global _evaluator, _captured, _alerts
    from toolchain.fleet.alerts import Evaluator
    from toolchain.fleet.registry import BaselineCache
    from toolchain.fleet.storage import open_store

    _worker_setup()
    store = open_store(db_url, migrate=False)
    _captured, _alerts = _Captured(), _Alerts()
    logger = logging.getLogger("edgefleet")
    logger.addHandler(_captured)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _evaluator = Evaluator(store, BaselineCache(store), sink=_alerts)


@dataclass
class EvalOutcome:
    """What one evaluation in the worker did."""

    evaluated: int
    changed: int
    alerts: list[tuple[str, bytes]]  # (topic, payload) to publish
    records: list[tuple[int, str, str]]  # (level, logger, message) to log


def evaluate_keys(keys: list[tuple[str, str]], forget: list[str]) -> EvalOutcome:
    """Evaluate the devices ``keys`` (after dropping cached baselines ``forget``)."""
    assert _evaluator is not None and _captured is not None and _alerts is not None
    for sha in forget:
        _evaluator.baselines.forget(sha)
    _captured.records, _alerts.published = [], []
    done = _evaluator.evaluate_many(keys)
    return EvalOutcome(
        len(done), sum(ev.changed for ev in done.values()), _alerts.published, _captured.records
    )


class EvalWorker(_Workers):
    """One process that evaluates drift; ``submit`` starts an evaluation, ``outcome`` collects it."""

    def __init__(self, db_url: str) -> None:
        super().__init__(
            db_url,
            1,
            _init_eval_worker,
            "the drift evaluation worker failed (%s); evaluating in the collector's process",
        )
        self._forget: list[str] = []

    def forget(self, sha: str) -> None:
        """A baseline was (re)registered: the worker drops its cached copy before the next evaluation."""
        self._forget.append(sha)

    def submit(self, keys: list[tuple[str, str]]) -> Future[EvalOutcome] | None:
        if not self.usable:
            return None
        forget, self._forget = self._forget, []
        return self._submit(evaluate_keys, keys, forget)

    def outcome(self, fut: Future[EvalOutcome]) -> EvalOutcome | None:
        """The finished evaluation, or None when the worker failed (evaluate those devices again)."""
        try:
            return fut.result()
        except BrokenProcessPool as e:
            self._broken(e)
            return None
        except Exception as e:  # noqa: BLE001 - an evaluation error (database down): report, retry later
            log.error("drift evaluation failed: %s", e)
            return None
