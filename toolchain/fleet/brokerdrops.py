"""Watch the broker's own drop counters ($SYS) so a message lost after its PUBACK is not silent.

Mosquitto counts messages it dropped after acknowledging them to the publisher (usually a full queue
of an offline persistent session) in ``$SYS/broker/publish/messages/dropped``. The collector
subscribes to it (QoS 0, beside the fleet's topics); every rise is counted, logged (rate-limited),
stored per broker in ``broker_counters`` and published as a ``broker_drops`` alert to each fleet.

A broker can also lose the collector's whole persistent session, queue and all: restarted without
persistence, or with changes not yet saved, or after the session expired while the collector was away.
No ``$SYS`` counter says so; the CONNACK does (``session present`` is false). ``note_session`` counts
every connection of a persistent session as ``session/<client id>`` (value: connections; rises:
sessions found lost), so a loss is counted, logged and alerted like a drop. The first connection a
database has seen for a client id has no session to lose.

paho's network thread calls ``note`` and ``note_session``; the collector's worker calls ``flush``
between batches.
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
SESSION_PREFIX = "session/"  # broker_counters.topic of a collector's session: session/<client id>


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

    def note_session(self, client_id: str, present: bool) -> bool:
        """Note a connection of the persistent session ``client_id``; True when the session was lost.

        Lost: the broker has no session for a client id this database saw connect before.
        """
        topic = SESSION_PREFIX + client_id
        with self._lock:
            last = self._last.get(topic)
            lost = last is not None and not present
            value = (last or 0) + 1
            self._last[topic] = value
            prev = self._updates.get(topic, (0, 0))[1]
            self._updates[topic] = (value, prev + int(lost))
        if lost:
            self.log.log(
                logging.WARNING,
                "the broker at %s had no session for collector %r (connection %d): windows queued for it"
                " while it was away are lost; the broker restarted without saving its sessions"
                " (persistence, autosave) or the session expired (see docs/fleet.md)",
                self.broker_key,
                client_id,
                value,
            )
        return lost

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
                        "type": "broker_session_lost" if topic.startswith(SESSION_PREFIX) else "broker_drops",
                        "broker": self.broker_key,
                        "counter": topic,
                        "value": value,
                        "rise": rise,
                        "ts": utc_iso(now),
                        "message": "the broker " + describe(topic, rise),
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


def describe(counter: str, rise: int) -> str:
    """What a rise of a broker counter means, and the fix, in one line."""
    if counter.startswith(SESSION_PREFIX):
        return (
            f"lost collector {counter[len(SESSION_PREFIX) :]!r}'s session {rise} time(s), with the windows"
            " queued for it; turn on persistence and keep sessions long enough (docs/fleet.md)"
        )
    return f"dropped {rise} message(s) after acknowledging them; raise max_queued_messages (docs/fleet.md)"
