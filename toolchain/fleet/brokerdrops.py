"""Watch the broker's own drop counters ($SYS) so a message lost after its PUBACK is not silent.

Mosquitto counts messages it dropped after acknowledging them to the publisher (usually a full queue
of an offline persistent session) in ``$SYS/broker/publish/messages/dropped``. The collector
subscribes to it (QoS 0, beside the fleet's topics); every rise is counted, logged (rate-limited),
stored per broker in ``broker_counters`` and published as a ``broker_drops`` alert to each fleet.

paho's network thread calls ``note``; the collector's worker calls ``flush`` between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from toolchain.fleet.ratelog import Throttle
from toolchain.fleet.storage import Store, dumps

log = logging.getLogger("edgefleet.fleet.collector")

BROKER_DROP_LOG_EVERY_S = 10.0
# Broker counters of messages dropped after they were acknowledged to the publisher (Mosquitto).
SYS_DROP_TOPICS = ("$SYS/broker/publish/messages/dropped",)


class BrokerDrops:
    """The drop counters of one broker (``host:port``): last values, rises to store, alerts to publish."""

    def __init__(self, broker_key: str, on_rise: Callable[[int], None]) -> None:
        self.broker_key = broker_key
        self.on_rise = on_rise  # called with each rise (the collector's counter)
        self.log = Throttle(log, BROKER_DROP_LOG_EVERY_S)
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}  # $SYS topic -> last value seen (from the database at start)
        self._updates: dict[str, tuple[int, int]] = {}  # $SYS topic -> (value, rise) to store
        self._alerts: list[dict[str, Any]] = []  # waiting for a fleet to publish them to

    def load(self, store: Store) -> None:
        """Start from the values this broker's counters had when a collector last stored them."""
        rows = store.query("SELECT topic, value FROM broker_counters WHERE broker = ?", (self.broker_key,))
        self._last = {str(t): int(v) for t, v in rows}

    def note(self, topic: str, payload: bytes) -> None:
        """Note a counter's value ($SYS message); log a rise (rate-limited) for ``flush`` to store and alert."""
        try:
            value = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            log.warning("broker counter %s has a non-integer value %r; ignored", topic, payload[:40])
            return
        with self._lock:
            last = self._last.get(topic)
            # A counter below the last value means the broker restarted (Mosquitto's $SYS counters
            # start from 0): every drop since counts. The first value ever seen counts whole.
            rise = value if last is None or value < last else value - last
            self._last[topic] = value
            if rise > 0 or last is None:
                prev = self._updates.get(topic, (0, 0))[1]
                self._updates[topic] = (value, prev + rise)
        if rise > 0:
            self.on_rise(rise)
            self.log.log(
                logging.WARNING,
                "the broker at %s dropped %d message(s) (%s is now %d): acknowledged messages were"
                " lost, usually a full queue of an offline persistent session; raise"
                " max_queued_messages (see docs/fleet.md)",
                self.broker_key,
                rise,
                topic,
                value,
                events=rise,
            )

    def flush(self, store: Store, fleet: str, publish: Callable[[str, bytes], None]) -> int:
        """Store the counters noted since the last call; publish an alert for each rise.

        ``fleet`` is the collector's fleet, or ``+`` for every fleet in the database. Returns the
        number of alerts published.
        """
        with self._lock:
            updates, self._updates = self._updates, {}
        if not updates and not self._alerts:
            return 0
        now = time.time()
        try:
            with store.transaction():
                store.executemany(
                    "INSERT INTO broker_counters (broker, topic, value, rises, first_seen, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (broker, topic) DO UPDATE SET"
                    " value = excluded.value, rises = broker_counters.rises + excluded.rises,"
                    " updated_at = excluded.updated_at",
                    [(self.broker_key, t, v, r, now, now) for t, (v, r) in sorted(updates.items())],
                )
                fleets = (
                    [fleet]
                    if fleet != "+"
                    else [str(r[0]) for r in store.query("SELECT DISTINCT fleet FROM devices")]
                )
        except Exception as e:  # noqa: BLE001 - keep them for the next round
            log.error("storing the broker's drop counters failed: %s", str(e)[:200])
            with self._lock:
                for t, (v, r) in updates.items():
                    prev = self._updates.get(t, (v, 0))
                    self._updates[t] = (prev[0], prev[1] + r)
            return 0
        from device_agent.formats.telemetry import fleet_topic, utc_iso

        for topic, (value, rise) in sorted(updates.items()):
            if rise > 0:
                self._alerts.append(
                    {
                        "schema": 1,
                        "type": "broker_drops",
                        "broker": self.broker_key,
                        "counter": topic,
                        "value": value,
                        "rise": rise,
                        "ts": utc_iso(now),
                        "message": f"the broker dropped {rise} acknowledged message(s);"
                        " raise max_queued_messages (docs/fleet.md)",
                    }
                )
        if not fleets:
            return 0  # no fleet known yet (a new database): publish once the first device is stored
        alerts, self._alerts = self._alerts, []
        published = 0
        for alert in alerts:
            for f in fleets:
                try:
                    publish(fleet_topic(f, "alerts"), dumps(alert).encode())
                    published += 1
                except Exception as e:  # noqa: BLE001 - stored and logged; publishing is best effort
                    log.error("could not publish the broker-drops alert for fleet %s: %s", f, e)
        return published
