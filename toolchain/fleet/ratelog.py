"""Rate-limited log lines: a flood of bad messages must not become a flood of log lines.

``Throttle`` lets the first line of a category through, then at most one line every ``every_s``
seconds; each line that gets through says how many were held back since the previous one, so every
event is still counted in the log even when most lines are not written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any


class Throttle:
    """At most one log line per ``every_s`` seconds for one category; held-back lines are counted."""

    def __init__(
        self, logger: logging.Logger, every_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None
        self._held = 0
        self._held_events = 0
        self._lock = threading.Lock()
        self.lines = 0  # lines written (tests and health read it)

    def log(self, level: int, msg: str, *args: Any, events: int = 1) -> bool:
        """Write ``msg % args`` unless a line went out less than ``every_s`` ago; return True if written.

        ``events`` is how many occurrences this line stands for (a batch of 25 duplicates is one line
        for 25 events): the next line that gets through reports the held-back events.
        """
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.every_s:
                self._held += 1
                self._held_events += events
                return False
            held, held_events = self._held, self._held_events
            self._last, self._held, self._held_events = now, 0, 0
            self.lines += 1
        if held:
            msg += " (and %d more since the previous such line: %d line(s) held back)"
            args = (*args, held_events, held)
        self.logger.log(level, msg, *args)
        return True
