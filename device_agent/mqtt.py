"""MQTT publisher: drains the disk outbox to the broker in seq order, in its own thread.

One thread owns the paho-mqtt 2 client (``CallbackAPIVersion.VERSION2``) and drives its network loop
itself (``client.loop``), so there is no hidden paho thread and no paho auto-reconnect: every
(re)connection gets a fresh client with a clean session, and everything still in the outbox is sent
again from the oldest row. A row is deleted only when its PUBACK arrives with a success reason code.
Inference never waits on this thread.

MQTT 5 is tried first; a broker that answers "unsupported protocol version" or does not answer an
MQTT 5 CONNECT within ``V5_CONNACK_TIMEOUT_S`` (amqtt never answers one that carries a will) is
retried at once with MQTT 3.1.1, and the agent stays on 3.1.1 while that works.

Status: a retained birth message "online" (model name, version, sha256, agent version) on every
connect, and a retained Last Will "offline". Commands: ``edgefleet/<fleet>/<device_id>/cmd`` and
``edgefleet/<fleet>/cmd`` are subscribed (QoS 1) and passed to the registered handler; the fleet's
retained alert command on ``edgefleet/<fleet>/<device_id>/cmd/alert`` goes to ``alert_handler``
(``device_agent.alertfollow``).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from device_agent.config import MqttSettings, broker_settings
from device_agent.formats.alertcmd import alert_command_topic
from device_agent.formats.broker import new_client
from device_agent.formats.telemetry import fleet_topic, topic, utc_iso
from device_agent.outbox import Outbox, OutboxError

log = logging.getLogger(__name__)

# Tunables (module constants so tests can patch them).
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0  # TCP connect plus CONNACK
V5_CONNACK_TIMEOUT_S = 3.0  # then retry at once with MQTT 3.1.1
LOOP_TIMEOUT_S = 0.05
MAX_INFLIGHT = 20
EVENT_QUEUE_MAX = 100
OFFLINE_ACK_TIMEOUT_S = 2.0

CommandHandler = Callable[[str, bytes], None]
AlertHandler = Callable[[str, bytes], object]  # the follower returns whether it applied the command


class MqttPublisher:
    """Publish outbox rows, status and events to one broker; reconnect with backoff."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        fleet: str,
        device_id: str,
        status_payload: Callable[[str], bytes],
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.fleet = fleet
        self.device_id = device_id
        self.status_payload = status_payload
        self.status_topic = topic(fleet, device_id, "status")
        self.events_topic = topic(fleet, device_id, "events")
        self.cmd_topics = [topic(fleet, device_id, "cmd"), fleet_topic(fleet, "cmd")]
        self.command_handler: CommandHandler | None = None
        self.alert_topic = alert_command_topic(fleet, device_id)
        self.alert_handler: AlertHandler | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flush_deadline = 0.0
        self._events: collections.deque[bytes] = collections.deque(maxlen=EVENT_QUEUE_MAX)
        self._status_dirty = False
        self._state_lock = threading.Lock()
        # connection state (written by the publisher thread, read by health())
        self.connected = False
        self.protocol = "5"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.connects = 0
        self.published = 0
        self.acked = 0
        self.commands = 0
        self.bad_commands = 0
        self.subscribe_refused: list[str] = []  # command topics the broker would not let us read
        self._sub_topics: dict[int, list[str]] = {}
        # per connection
        self._client: Any = None
        self._connecting_since = 0.0
        self._inflight: dict[int, int] = {}
        self._cursor = 0
        # captured samples (device_agent.capture): a second outbox, drained after the windows
        self.samples_outbox: Outbox | None = None
        self._sinflight: dict[int, int] = {}
        self._scursor = 0
        self._more = True
        self._backoff = RECONNECT_MIN_S
        self._next_attempt = 0.0

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        """Start the publisher thread."""
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the publisher that the outbox has new rows."""
        self._wake.set()

    def publish_event(self, payload: bytes) -> None:
        """Queue an event (QoS 1, best effort: kept in memory, the oldest dropped past EVENT_QUEUE_MAX)."""
        self._events.append(payload)
        self._wake.set()

    def republish_status(self) -> None:
        """Send the birth message again (the model changed)."""
        self._status_dirty = True
        self._wake.set()

    def stop(self, flush_timeout_s: float = 3.0) -> None:
        """Try to deliver queued rows for up to ``flush_timeout_s``, publish "offline", disconnect."""
        self._flush_deadline = time.monotonic() + flush_timeout_s
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(flush_timeout_s + OFFLINE_ACK_TIMEOUT_S + CONNECT_TIMEOUT_S + 5)
            self._thread = None

    def health(self) -> dict[str, Any]:
        """Connection state for /v1/health."""
        with self._state_lock:
            return {
                "url": self.settings.safe_url,
                "connected": self.connected,
                "protocol": ("MQTT 5" if self.protocol == "5" else "MQTT 3.1.1"),
                "last_error": self.last_error,
                "last_error_at": utc_iso(self.last_error_at) if self.last_error_at else None,
                "connects": self.connects,
                "published": self.published,
                "acked": self.acked,
                "subscribe_refused": list(self.subscribe_refused),
            }

    # ------------------------------------------------------------------ publisher thread
    def _set_error(self, msg: str) -> None:
        with self._state_lock:
            if msg != self.last_error:
                log.warning("mqtt %s: %s", self.settings.safe_url, msg)
            self.last_error = msg
            self.last_error_at = time.time()

    def _run(self) -> None:
        while True:
            try:
                if self._stop.is_set():
                    self._shutdown()
                    return
                self._step()
            except Exception as e:  # never let the publisher die: log, drop the connection, back off
                log.exception("mqtt publisher error")
                self._set_error(f"internal error: {type(e).__name__}: {e}")
                self._drop_client(backoff=True)

    def _step(self) -> None:
        now = time.monotonic()
        c = self._client
        if c is None:
            if now >= self._next_attempt:
                self._connect()
            else:
                self._wake.wait(min(self._next_attempt - now, 0.2))
                self._wake.clear()
            return
        rc = c.loop(timeout=LOOP_TIMEOUT_S)
        if self._client is None:  # dropped inside a callback
            return
        if rc != 0:
            err = (
                f"connection lost ({_rc_name(rc)})"
                if self.connected
                else f"connection failed ({_rc_name(rc)})"
            )
            self._drop_client(backoff=True, error=err)
            return
        if not self.connected:
            waited = now - self._connecting_since
            if self.protocol == "5" and waited > min(V5_CONNACK_TIMEOUT_S, CONNECT_TIMEOUT_S):
                # Some MQTT 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT with a will.
                log.info(
                    "no MQTT 5 CONNACK from %s after %.1f s; trying MQTT 3.1.1",
                    self.settings.safe_url,
                    waited,
                )
                self.protocol = "3.1.1"
                self._drop_client(backoff=False)
            elif waited > CONNECT_TIMEOUT_S:
                self.protocol = "5"  # neither answered: start from MQTT 5 again next time
                self._drop_client(
                    backoff=True, error=f"no CONNACK within {CONNECT_TIMEOUT_S:g} s (broker not answering)"
                )
            return
        self._send()

    def _new_client(self) -> Any:
        s = self.settings
        c = new_client(broker_settings(s), "5" if self.protocol == "5" else "3.1.1")
        c.connect_timeout = CONNECT_TIMEOUT_S
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.will_set(self.status_topic, self.status_payload("offline"), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        return c

    def _connect(self) -> None:
        s = self.settings
        c = self._new_client()
        self._client = c
        self._connecting_since = time.monotonic()
        self._inflight.clear()
        self._sinflight.clear()
        try:
            if self.protocol == "5":
                c.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=True)
            else:
                c.connect(s.host, s.port, keepalive=s.keepalive_s)
        except Exception as e:  # refused, DNS, TLS handshake, timeout
            self._drop_client(backoff=True, error=f"cannot connect: {type(e).__name__}: {e}")

    def _drop_client(self, backoff: bool, error: str | None = None) -> None:
        if error:
            self._set_error(error)
        c, self._client = self._client, None
        with self._state_lock:
            self.connected = False
        self._inflight.clear()
        self._sinflight.clear()
        self._scursor = 0
        if c is not None:
            try:
                c.on_disconnect = None
                c.disconnect()
                c.loop(timeout=0.01)
            except Exception:
                pass
            try:
                sock = c.socket()
                if sock is not None:
                    sock.close()
            except Exception:
                pass
        if backoff:
            delay = self._backoff * (0.8 + 0.4 * random.random())
            self._next_attempt = time.monotonic() + delay
            self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
        else:
            self._next_attempt = time.monotonic()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            name = str(reason_code)
            if self.protocol == "5" and ("protocol" in name.lower() or int(reason_code.value) == 1):
                log.info("broker %s does not speak MQTT 5; using MQTT 3.1.1", self.settings.safe_url)
                self.protocol = "3.1.1"
                self._drop_client(backoff=False)
                return
            self._drop_client(backoff=True, error=f"broker refused the connection: {name}")
            return
        with self._state_lock:
            self.connected = True
            self.connects += 1
        self._backoff = RECONNECT_MIN_S
        self._cursor = 0
        self._more = True
        self._inflight.clear()
        self._scursor = 0
        self._sinflight.clear()
        wanted = [*self.cmd_topics, self.alert_topic]
        _rc, mid = client.subscribe([(t, 1) for t in wanted])
        self._sub_topics = {mid: wanted}
        self._publish_status("online")
        log.info("mqtt connected to %s (%s)", self.settings.safe_url, self.protocol)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        """A broker that refuses a command topic (an ACL from before ``cmd/alert``): say so, once per topic."""
        topics = self._sub_topics.pop(mid, [])
        for t, rc in zip(topics, reason_codes, strict=False):
            if getattr(rc, "is_failure", False):
                with self._state_lock:
                    new = t not in self.subscribe_refused
                    if new:
                        self.subscribe_refused.append(t)
                if new:
                    log.warning(
                        "the broker refused the subscription to %s (%s): commands there will not arrive;"
                        " allow this device to read it (edgefleet fleet broker-config writes the rule)",
                        t,
                        rc,
                    )

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if client is not self._client:
            return
        if self.connected:
            self._drop_client(backoff=True, error=f"disconnected: {reason_code}")
        elif self.protocol == "5":
            # Closed before CONNACK: TLS refused (no client certificate), or a broker that hangs up on MQTT 5.
            self._set_error(f"connection closed before CONNACK ({reason_code}); see the broker's log")
            self.protocol = "3.1.1"
            self._drop_client(backoff=False)
        else:
            self.protocol = "5"
            self._drop_client(
                backoff=True, error=f"connection closed before CONNACK ({reason_code}); see the broker's log"
            )

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if client is not self._client:
            return
        seq = self._inflight.pop(mid, None)
        box = self.outbox
        if seq is None:
            seq = self._sinflight.pop(mid, None)
            if seq is None or self.samples_outbox is None:
                return  # status or event
            box = self.samples_outbox
        if reason_code.is_failure:
            # The broker refused this window (quota, not authorized): keep it, retry after a backoff.
            self._drop_client(backoff=True, error=f"broker refused stats seq {seq}: {reason_code}")
            return
        try:
            box.ack(seq)
        except OutboxError as e:
            self._set_error(str(e))
        with self._state_lock:
            self.acked += 1

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == self.alert_topic:
            self._on_alert_command(bytes(msg.payload))
            return
        if msg.topic not in self.cmd_topics:
            # Some brokers (amqtt) hand a subscriber retained messages of other topics; never treat
            # those as commands.
            log.debug("ignoring a message on %s, which is not a command topic", msg.topic)
            return
        handler = self.command_handler
        self.commands += 1
        if handler is None:
            log.warning(
                "command on %s ignored: no handler registered (payload %r)",
                msg.topic,
                bytes(msg.payload)[:200],
            )
            return
        try:
            handler(msg.topic, bytes(msg.payload))
        except Exception as e:  # one bad command must not stop telemetry
            self.bad_commands += 1
            log.warning(
                "command handler failed on %s: %s (payload %r)", msg.topic, e, bytes(msg.payload)[:200]
            )

    def _on_alert_command(self, payload: bytes) -> None:
        handler = self.alert_handler
        if handler is None:
            log.debug("alert command ignored: no follower registered")
            return
        try:
            handler(self.alert_topic, payload)
        except Exception as e:  # the follower counts its refusals; a bug in it must not stop telemetry
            self.bad_commands += 1
            log.warning("alert command handler failed: %s (payload %r)", e, payload[:200])

    def _publish_status(self, state: str) -> Any:
        c = self._client
        info = c.publish(self.status_topic, self.status_payload(state), qos=1, retain=True)
        self._status_dirty = False
        return info

    def _send(self) -> None:
        c = self._client
        if self._status_dirty:
            self._publish_status("online")
        while self._events:
            c.publish(self.events_topic, self._events.popleft(), qos=1)
        if self._wake.is_set():
            self._wake.clear()
            self._more = True
        room = MAX_INFLIGHT - len(self._inflight) - len(self._sinflight)
        if room <= 0:
            return
        if not self._more:
            self._send_samples(c, room)
            return
        rows = self.outbox.pending(after_seq=self._cursor, limit=room)
        if len(rows) < room:
            self._more = False
        for row in rows:
            info = c.publish(row.topic, row.payload, qos=1)
            if info.rc != 0:
                self._drop_client(backoff=True, error=f"publish failed: {_rc_name(info.rc)}")
                return
            self._inflight[info.mid] = row.seq
            self._cursor = row.seq
            with self._state_lock:
                self.published += 1
        if not self._more:
            self._send_samples(c, MAX_INFLIGHT - len(self._inflight) - len(self._sinflight))

    def _send_samples(self, c: Any, room: int) -> None:
        """Publish captured samples once every window is sent: windows go first."""
        box = self.samples_outbox
        if box is None or room <= 0:
            return
        for row in box.pending(after_seq=self._scursor, limit=room):
            info = c.publish(row.topic, row.payload, qos=1)
            if info.rc != 0:
                self._drop_client(backoff=True, error=f"publish failed: {_rc_name(info.rc)}")
                return
            self._sinflight[info.mid] = row.seq
            self._scursor = row.seq

    def _shutdown(self) -> None:
        """Flush what the broker will take before the deadline, then publish "offline" and disconnect."""
        self._wake.set()
        while time.monotonic() < self._flush_deadline:
            if self._client is None:
                if time.monotonic() >= self._next_attempt:
                    self._connect()
                else:
                    time.sleep(0.05)
                continue
            self._step()
            if self.connected and not self._inflight and not self._more and self.outbox.depth()[0] == 0:
                break
        c = self._client
        if c is not None and self.connected:
            try:
                info = self._publish_status("offline")
                deadline = time.monotonic() + OFFLINE_ACK_TIMEOUT_S
                while not info.is_published() and time.monotonic() < deadline and self._client is c:
                    c.loop(timeout=LOOP_TIMEOUT_S)
            except Exception as e:
                log.warning("could not publish offline status: %s", e)
        self._drop_client(backoff=False)


def _rc_name(rc: Any) -> str:
    try:
        import paho.mqtt.client as mqtt

        return str(mqtt.error_string(rc))
    except Exception:
        return str(rc)
