"""What the collector accepts in size, and what it keeps of a message it refuses (the quarantine).

A message that fails validation can never succeed later: it is stored in ``quarantine`` with its
reason and first ``QUARANTINE_HEAD_BYTES`` bytes, counted, logged (rate-limited) and acknowledged. The
table keeps the newest ``QUARANTINE_MAX_ROWS`` rows; the evicted ones are counted too.
"""

from __future__ import annotations

import logging

from toolchain.fleet.ratelog import Throttle
from toolchain.fleet.rows import QUARANTINE_SQL, QUARANTINE_TRIM_SQL, QuarantineRow
from toolchain.fleet.storage import Store

log = logging.getLogger("edgefleet.fleet.collector")

QUARANTINE_HEAD_BYTES = 512
QUARANTINE_MAX_ROWS = 10_000  # `fleet collect --quarantine-max-rows`: the oldest rows go first
QUARANTINE_LOG_EVERY_S = 10.0  # at most one "quarantined" line this often (the rest are counted)
REASON_MAX_CHARS = 500
# MQTT 5 Maximum Packet Size the collector announces on connect: the broker does not send it larger
# packets (Mosquitto drops them and logs "Dropping too large outgoing PUBLISH"). The stats payload
# limit (device_agent.formats.telemetry.MAX_PAYLOAD_BYTES, 96 KiB) plus room for the topic and properties,
# so payloads just over the payload limit still arrive and are quarantined and counted. Broker
# configurations (`edgefleet fleet broker-config`) set Mosquitto's `max_packet_size` to this value.
MAX_PACKET_BYTES = 128 * 1024


def quarantine_row(
    topic: str, payload: bytes, received_at: float, error: Exception, *, ours: bool
) -> QuarantineRow:
    """The quarantine row of a refused message.

    ``ours``: the error is a bug of the collector, not a bad message: keep the payload (up to the
    packet limit) so it can be replayed.
    """
    if ours:
        reason = f"unexpected {type(error).__name__}: {error}"[:REASON_MAX_CHARS]
        head = payload[:MAX_PACKET_BYTES].decode("utf-8", "replace")
    else:
        reason = str(error)[:REASON_MAX_CHARS]
        head = payload[:QUARANTINE_HEAD_BYTES].decode("utf-8", "replace")
    return QuarantineRow(received_at, topic[:300], reason, head, len(payload))


class Quarantine:
    """Stores refused messages (in the caller's transaction) and logs them at most every few seconds."""

    def __init__(self, max_rows: int = QUARANTINE_MAX_ROWS) -> None:
        self.max_rows = max_rows
        self.log = Throttle(log, QUARANTINE_LOG_EVERY_S)

    def note(self, topic: str, payload: bytes, reason: str) -> None:
        """Log one refused message (rate-limited; every one is counted by the caller)."""
        self.log.log(
            logging.WARNING,
            "quarantined message on %r (%d bytes): %s; payload starts %r",
            topic[:120],
            len(payload),
            reason,
            payload[:80],
        )

    def store(self, store: Store, rows: list[QuarantineRow]) -> int:
        """Insert ``rows`` and trim the table to ``max_rows``; return how many old rows were evicted."""
        if not rows:
            return 0
        store.executemany(QUARANTINE_SQL, rows)
        return max(int(store.execute(QUARANTINE_TRIM_SQL, (self.max_rows,)).rowcount), 0)
