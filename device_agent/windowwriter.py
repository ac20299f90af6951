"""The telemetry writer: closed statistics windows into the disk outbox, captured samples to disk.

It runs on the daemon's ``telemetry-writer`` thread. The Agent hands every closed window to
``WindowWriter.put`` (from the predict path, so that call only queues); the thread closes windows on
time, encodes each closed window as a stats payload and commits many in one outbox transaction, then
wakes the MQTT publisher. Windows the outbox cannot store are counted and reported in the next stored
window's ``dropped_windows``, so the fleet sees every loss.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from device_agent.agent import agent_version
from device_agent.formats.telemetry import TelemetryError, encode_stats, topic
from device_agent.outbox import Outbox, OutboxError
from device_agent.windows import ClosedWindow

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.capture import Capturer

log = logging.getLogger(__name__)

WRITER_TICK_S = 0.5
WRITE_BATCH_MAX = 256  # closed windows committed to the outbox in one transaction at most
_STOP = object()


class WindowWriter:
    """Store closed windows in the outbox (one commit for many) and flush captured samples."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        fleet: str,
        device_id: str,
        capturer: Capturer | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.outbox, self.capturer = outbox, capturer
        self.fleet, self.device_id = fleet, device_id
        self.stats_topic = topic(fleet, device_id, "stats")
        self.wake = wake  # the publisher's: rows are waiting
        self._queue: queue.Queue[Any] = queue.Queue()
        self.windows_written = 0
        self.window_errors = 0  # closed windows the outbox could not store (disk full, I/O error)
        self._unreported_errors = 0  # ... not yet reported in a stored window's dropped_windows
        self.last_window_bytes = 0

    def put(self, w: ClosedWindow) -> None:
        """Queue a closed window (``Agent.on_window``; returns at once)."""
        self._queue.put(w)

    def stop(self) -> None:
        """Ask ``run`` to store what is queued and return."""
        self._queue.put(_STOP)

    def flush_capture(self) -> None:
        """Store the captured samples waiting in memory; a failure is logged, never raised."""
        if self.capturer is None:
            return
        try:
            if self.capturer.flush() and self.wake is not None:
                self.wake()
        except Exception:  # noqa: BLE001 - a full disk must not stop the windows
            log.exception("storing captured samples failed")

    def run(self, agent: Agent, stopping: threading.Event) -> None:
        """The writer loop: close ``agent``'s windows on time and store them, until ``stop()``."""
        while True:
            self.flush_capture()
            timeout = max(0.0, min(agent.window_due_in(), WRITER_TICK_S))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                rest = []  # what closed before the stop
                while True:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is not _STOP:
                        rest.append(nxt)
                if rest:
                    self.write(rest)
                return
            if item is not None:
                # Every window closed meanwhile goes in the same transaction: one commit for many, so
                # the windows waiting in memory (lost on a kill) stay few however fast they close.
                batch = [item]
                while len(batch) < WRITE_BATCH_MAX:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        self._queue.put(_STOP)  # handled on the next turn, after this batch
                        break
                    batch.append(nxt)
                self.write(batch)
            if not stopping.is_set():
                try:
                    agent.poll_window()
                except Exception:
                    log.exception("closing a window failed")

    def write(self, ws: list[ClosedWindow]) -> None:
        """Encode ``ws`` as stats payloads and store them in one outbox transaction."""
        sizes: list[int] = []

        def encoder(w: ClosedWindow, first: bool) -> Callable[[int, int], bytes]:
            def encode(seq: int, dropped: int) -> bytes:
                raw = encode_stats(
                    device_id=self.device_id,
                    fleet=self.fleet,
                    seq=seq,
                    window_start=w.window_start,
                    window_end=w.window_end,
                    model=w.model,
                    profile=w.profile,
                    # Windows lost before the outbox (it could not store them) are reported like the
                    # ones it dropped when full, so the fleet sees them in dropped_windows.
                    dropped_windows=dropped + (self._unreported_errors if first else 0),
                    agent_version=agent_version(),
                    stream=self.outbox.stream,
                )
                sizes.append(len(raw))
                return raw

            return encode

        try:
            seqs = self.outbox.add_many(self.stats_topic, [encoder(w, i == 0) for i, w in enumerate(ws)])
        except (OutboxError, TelemetryError) as e:
            self.window_errors += len(ws)
            self._unreported_errors += len(ws)
            log.error(
                "%d window(s) (%d predictions) not stored (%d so far; the next stored window reports"
                " them): %s",
                len(ws),
                sum(w.count for w in ws),
                self.window_errors,
                e,
            )
            return
        self._unreported_errors = 0
        self.windows_written += len(ws)
        self.last_window_bytes = sizes[-1]
        log.debug("windows seq %d-%d stored (%d predictions)", seqs[0], seqs[-1], sum(w.count for w in ws))
        if self.wake is not None:
            self.wake()
