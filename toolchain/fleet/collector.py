"""The collector daemon: MQTT 5 in, SQLite or PostgreSQL out, acknowledged only after the commit.

Flow: paho's network thread puts every message on a queue *without* acknowledging it
(``manual_ack=True``). The worker thread takes a batch (up to ``BATCH_MAX`` messages or
``BATCH_WAIT_S``), decodes and validates each message, stores the batch in one transaction, and only
after the commit returns sends the PUBACKs (``client.ack(mid, qos)``). A collector killed at any
moment has therefore acknowledged only what is committed; the broker redelivers the rest to the
persistent session (``clean_start=False`` with a session expiry), and ``UNIQUE (fleet, device_id,
seq)`` makes the redelivery a no-op.

Validation and storage of a batch is ``toolchain.fleet.ingest`` (rows: ``rows``; refused messages:
``quarantine``); the broker's $SYS drop counters are ``brokerdrops``. This module is the daemon
around them: the MQTT session, the worker loop, acknowledgements, evaluation and compaction rounds
(about 600 lines: the session and the worker share the acknowledgement generation and the stop).

Subscriptions: ``stats``, ``events`` and ``samples`` through ``$share/<group>/...`` when a shared group is set, so
several collectors split them; ``status`` always directly, because brokers do not send retained
messages to shared subscriptions and every collector should know every device's state.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from device_agent.formats.broker import BrokerSettings, new_client
from device_agent.formats.telemetry import TelemetryError
from toolchain.errors import ToolchainError
from toolchain.fleet.alertcmds import CommandTally, is_alert_command_topic
from toolchain.fleet.alerts import Evaluator
from toolchain.fleet.brokerdrops import SYS_DROP_TOPICS, BrokerDrops
from toolchain.fleet.evalrounds import EvalRounds
from toolchain.fleet.fastpath import FastWindow
from toolchain.fleet.ingest import Counters, Incoming, Ingestor
from toolchain.fleet.quarantine import MAX_PACKET_BYTES, QUARANTINE_MAX_ROWS
from toolchain.fleet.registry import BaselineCache, BundleDirectory, RegistryError, register_bundle
from toolchain.fleet.storage import StorageError, Store, open_store
from toolchain.fleet.workers import DecodePool, EvalWorker, default_workers

log = logging.getLogger("edgefleet.fleet.collector")

BATCH_MAX = 500
BATCH_WAIT_S = 0.05
RECEIVE_MAXIMUM = 1000  # MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send us
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our subscriptions and queued windows this long
KEEPALIVE_S = 30
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
PROBE_TIMEOUT_S = 5.0  # how long to wait for a CONNACK when finding out the broker's MQTT version
COMPACT_EVERY_S = 600.0  # `fleet collect --compact-after`: a compaction round at most this often
QUEUE_MAX_MESSAGES = 2 * RECEIVE_MAXIMUM  # received, not yet stored; paho's thread waits when full
MQTT_ERR_NO_CONN = 4  # paho: not connected; a QoS 1 message is queued and sent on reconnect


class CollectorFailure(ToolchainError):
    """The collector stopped because its worker failed (the CLI exits 1; a supervisor restarts it)."""


class CollectorConfigError(ToolchainError):
    """The collector's configuration is invalid (the CLI exits 78, EX_CONFIG)."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: host, port and whether to use TLS."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
    u = urlparse(url or "")
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
        raise CollectorConfigError(
            f"broker URL {url[:80]!r} is invalid; use mqtt://HOST:PORT or mqtts://HOST:PORT"
        )
    tls = u.scheme in ("mqtts", "ssl")
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError:
        raise CollectorConfigError(f"broker URL {url[:80]!r} has an invalid port") from None
    return BrokerAddress(u.hostname, port, tls)


class Collector:
    """The collector daemon as an object: ``start()`` runs it in background threads, ``stop()`` ends it.

    ``fleet`` limits the subscription to one fleet (default: every fleet). ``shared_group`` splits
    stats and events between the collectors of one group (MQTT 5 shared subscription). With
    ``bundle_dir``, models named in status messages or windows are registered automatically when their
    bundle is found there.
    """

    def __init__(
        self,
        db_url: str,
        broker_url: str,
        *,
        fleet: str | None = None,
        shared_group: str | None = None,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_insecure: bool = False,
        bundle_dir: str | None = None,
        evaluate: bool = True,
        protocol: str = "auto",
        batch_max: int = BATCH_MAX,
        batch_wait_s: float = BATCH_WAIT_S,
        worker_processes: int | None = None,
        quarantine_max_rows: int = QUARANTINE_MAX_ROWS,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        watch_broker_drops: bool = True,
        compact_after_s: float | None = None,
    ) -> None:
        self.db_url = db_url
        if quarantine_max_rows < 1:
            raise CollectorConfigError(f"quarantine max rows must be 1 or more, not {quarantine_max_rows}")
        if not 1024 <= max_packet_bytes <= 268_435_455:  # MQTT's largest packet is 256 MiB - 1
            raise CollectorConfigError(
                f"max packet size {max_packet_bytes} must be between 1024 and 268435455 bytes"
            )
        if compact_after_s is not None and compact_after_s < 3600:
            raise CollectorConfigError("--compact-after must be at least 1h (rollups are hourly)")
        self.quarantine_max_rows = quarantine_max_rows
        self.max_packet_bytes = max_packet_bytes
        self.watch_broker_drops = watch_broker_drops
        self.compact_after_s = compact_after_s
        self._last_compact = 0.0
        self._sys_mid = -1
        self.broker = parse_broker_url(broker_url)
        if fleet is not None and fleet != "+":
            from device_agent.formats.telemetry import check_id

            try:
                check_id(fleet, "fleet")
            except TelemetryError as e:
                raise CollectorConfigError(str(e)) from None
        self.fleet = fleet or "+"
        if shared_group is not None and (not shared_group or any(c in shared_group for c in "/+#")):
            raise CollectorConfigError(
                f"shared group {shared_group!r} must be a non-empty name without '/', '+', '#'"
            )
        self.shared_group = shared_group
        host = socket.gethostname().lower().replace(".", "-")[:40]
        self.client_id = client_id or f"edgefleet-collector-{host}" + (
            f"-{shared_group}" if shared_group else ""
        )
        self.username, self.password = username, password
        self.tls = (tls_ca, tls_cert, tls_key, tls_insecure)
        for p in (tls_ca, tls_cert, tls_key):
            if p and not Path(p).is_file():
                raise CollectorConfigError(f"TLS file {p!r} does not exist")
        self.bundles = None
        if bundle_dir:
            try:
                self.bundles = BundleDirectory(bundle_dir)
            except RegistryError as e:
                raise CollectorConfigError(str(e)) from None
        self.evaluate_enabled = evaluate
        if protocol not in ("auto", "5", "3.1.1"):
            raise CollectorConfigError(f"MQTT protocol {protocol!r} is unknown; use auto, 5 or 3.1.1")
        self.protocol = protocol
        self._connect_kw: dict[str, Any] = {}
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        if worker_processes is not None and worker_processes < 0:
            raise CollectorConfigError(f"worker processes must be 0 or more, not {worker_processes}")
        self.worker_processes = (
            default_workers(os.cpu_count()) if worker_processes is None else worker_processes
        )
        self.counters = Counters()
        self.alert_commands = CommandTally()
        self.drops = BrokerDrops(self.broker_key, self._count_broker_drops)
        self._q: queue.Queue[Incoming] = queue.Queue(QUEUE_MAX_MESSAGES)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._generation = 0
        self._worker: threading.Thread | None = None
        self._client: Any = None
        self._store: Store | None = None
        self._fatal: BaseException | None = None
        self._stopped = False
        self._rounds: EvalRounds | None = None
        self.decode_pool: DecodePool | None = None
        self.eval_worker: EvalWorker | None = None

    # ---------------------------------------------------------------------------------------------
    # MQTT

    def topics(self) -> list[str]:
        """The subscriptions this collector makes."""
        share = f"$share/{self.shared_group}/" if self.shared_group else ""
        f = self.fleet
        return [
            f"{share}edgefleet/{f}/+/stats",
            f"{share}edgefleet/{f}/+/events",
            f"edgefleet/{f}/+/status",
            f"{share}edgefleet/{f}/+/samples",  # captured inputs and their labels (sampleingest)
        ]

    def probe_protocol(self, timeout_s: float = PROBE_TIMEOUT_S) -> str:
        """Return "5" or "3.1.1": what the broker speaks (MQTT 5 when it cannot be told).

        A throwaway clean connection under another client id: amqtt, for one, answers an MQTT 5
        CONNECT with "unsupported protocol version".
        """
        for version in ("5", "3.1.1"):
            got: dict[str, Any] = {}
            done = threading.Event()

            def on_connect(
                c: Any,
                u: Any,
                f: Any,
                rc: Any,
                p: Any,
                got: dict[str, Any] = got,
                done: threading.Event = done,
            ) -> None:
                got["rc"] = rc
                done.set()

            c = self._new_client(f"{self.client_id}-probe"[:60], version, persistent=False)
            c.on_connect = on_connect
            try:
                c.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
            except OSError:
                return "5"  # broker not reachable now: the daemon retries with MQTT 5
            c.loop_start()
            done.wait(timeout_s)
            c.loop_stop()
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001 - a probe connection that is already gone
                pass
            rc = got.get("rc")
            if rc is not None and not rc.is_failure:
                return version
            if rc is None or "protocol" not in str(rc).lower():
                return "5"
        return "5"

    def _new_client(self, client_id: str, protocol: str, *, persistent: bool) -> Any:
        """A paho client with the collector's auth, TLS and MQTT version ("5" or "3.1.1").

        ``persistent``: the collector's own session, acknowledged by hand after each commit; else
        a throwaway connection (the protocol probe).
        """
        ca, cert, key, insecure = self.tls
        settings = BrokerSettings(
            host=self.broker.host,
            port=self.broker.port,
            username=self.username or None,
            password=self.password,
            tls=self.broker.tls,
            ca_file=ca,
            cert_file=cert,
            key_file=key,
            client_id=client_id,
            tls_insecure=insecure,
        )
        return new_client(settings, protocol, persistent=persistent)

    def _make_client(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = self._new_client(self.client_id, self.protocol, persistent=True)
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            props.MaximumPacketSize = self.max_packet_bytes
            self._connect_kw = {"clean_start": False, "properties": props}
        else:
            self._connect_kw = {}
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(1, 30)
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection: %s", reason)
            return
        self._generation += 1
        client.subscribe([(t, 1) for t in self.topics()])
        if self.watch_broker_drops:
            # Separately: a broker that refuses $SYS (ACL, no such topics) must not stop collection.
            self._sys_mid = client.subscribe([(t, 0) for t in SYS_DROP_TOPICS])[1]
        self._connected.set()
        present = bool(getattr(flags, "session_present", False))
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.broker.host,
            self.broker.port,
            self.client_id,
            present,
        )
        if self.drops.note_session(self.client_id, present):
            self.counters.broker_sessions_lost += 1

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [r for r in reasons if getattr(r, "is_failure", False)]
        if mid == self._sys_mid:
            if bad:
                log.warning(
                    "the broker refused the drop counters %s (%s): drops by the broker will not be seen;"
                    " allow the collector to read $SYS/# (see docs/fleet.md)",
                    ", ".join(SYS_DROP_TOPICS),
                    bad[0],
                )
            return
        if bad:
            log.error("broker refused subscription(s): %s", bad)
        else:
            self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.startswith("$SYS/"):
            self.drops.note(msg.topic, bytes(msg.payload))
            return
        # Blocks while QUEUE_MAX_MESSAGES wait: the broker then holds the rest (QoS 1 is bounded by
        # Receive Maximum anyway; a flood of QoS 0 meets TCP back-pressure instead of our memory).
        self._q.put(Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation, time.time()))

    def _count_broker_drops(self, rise: int) -> None:
        self.counters.broker_dropped += rise

    def publish_alert(self, topic: str, payload: bytes) -> None:
        """AlertSink: publish an alert with QoS 1 on the collector's connection (a device's alert
        command retained, counted in ``alert_commands``; see ``toolchain.fleet.alertcmds``)."""
        if not is_alert_command_topic(topic):
            if self._client is not None:
                self._client.publish(topic, payload, qos=1)
            return
        if self._client is None:
            self.alert_commands.note_unsent(topic, "the collector has no MQTT client")
            return
        rc = self._client.publish(topic, payload, qos=1, retain=True).rc
        if rc in (0, MQTT_ERR_NO_CONN):  # NO_CONN: queued in the client, sent on reconnect
            self.alert_commands.note_sent(queued_offline=rc != 0)
        else:
            self.alert_commands.note_unsent(topic, f"the MQTT client refused it (rc {rc})")

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> Collector:
        """Open and migrate the database, connect to the broker, and start ingesting in the background."""
        try:
            self._store = open_store(self.db_url)
            self.drops.load(self._store)
        except StorageError as e:
            raise CollectorConfigError(str(e)) from None
        if self.protocol == "auto":
            self.protocol = self.probe_protocol()
            log.info("broker %s:%d speaks MQTT %s", self.broker.host, self.broker.port, self.protocol)
        if self.protocol != "5" and self.shared_group:
            raise CollectorConfigError(
                f"the broker at {self.broker.host}:{self.broker.port} speaks only MQTT {self.protocol};"
                " --shared-group needs MQTT 5 (use Mosquitto 2 or another MQTT 5 broker)"
            )
        self._client = self._make_client()
        try:
            self._client.connect_async(
                self.broker.host, self.broker.port, keepalive=KEEPALIVE_S, **self._connect_kw
            )
        except (OSError, ValueError) as e:
            raise CollectorConfigError(
                f"cannot connect to broker {self.broker.host}:{self.broker.port}: {e}"
            ) from None
        self._worker = threading.Thread(target=self._run, name="edgefleet-collector", daemon=True)
        self._worker.start()
        self._client.loop_start()
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Block until connected and subscribed (True) or the timeout passed (False)."""
        return self._subscribed.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current batch, acknowledge it, disconnect and close the database (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout_s)
        if self._client is not None:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        if self._store is not None:
            self._store.close()

    def run_forever(self) -> None:
        """Start and block until ``stop()`` is called (from a signal handler) or the worker fails."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                if self._worker is not None and not self._worker.is_alive():
                    break
        finally:
            self.stop()
        if self._fatal is not None:
            raise self._fatal

    def request_stop(self) -> None:
        """Ask a running collector to stop (safe from a signal handler)."""
        self._stop.set()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------
    # Worker

    def _take(self, wait_s: float = 0.2) -> list[Incoming]:
        try:
            first = self._q.get(timeout=wait_s) if wait_s > 0 else self._q.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            left = deadline - time.monotonic()
            try:
                batch.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        pool = self.decode_pool = DecodePool(self.db_url, self.worker_processes)
        evalw = None
        if self.worker_processes > 0 and self.evaluate_enabled:
            evalw = self.eval_worker = EvalWorker(self.db_url)
        try:
            pool.start()
            if evalw is not None:
                evalw.start()
            self._run_loop(pool)
        except BaseException as e:  # noqa: BLE001 - report it; run_forever turns it into an exit code
            log.exception("the collector's worker failed")
            self._fatal = CollectorFailure(f"the collector's worker failed: {type(e).__name__}: {e}")
            self._stop.set()
        finally:
            pool.close()
            if evalw is not None:
                evalw.close()

    def _run_loop(self, pool: DecodePool) -> None:
        """Take batches; while one is stored and acknowledged here, the next is decoded in the pool.

        On stop the batch in hand is finished and acknowledged; a batch still being decoded and
        whatever is queued stay unacknowledged and are redelivered by the broker to this client id.
        A running evaluation is waited for, so its alerts are published before the collector leaves.
        """
        assert self._store is not None
        store = self._store
        baselines = BaselineCache(store)
        ingestor = self.ingestor = Ingestor(
            store, baselines, self.counters, quarantine_max_rows=self.quarantine_max_rows
        )
        rounds = None
        if self.evaluate_enabled:
            evaluator = Evaluator(store, baselines, sink=self)
            rounds = self._rounds = EvalRounds(
                evaluator, baselines, self.eval_worker, self.counters, self.publish_alert
            )
        # Batches taken and being decoded in the pool, oldest first; one more than the pool has workers.
        ahead: deque[tuple[list[Incoming], Any]] = deque()
        depth = max(1, pool.workers)
        while not self._stop.is_set():
            # With batches in the pool, only look for more without waiting; store the oldest when the
            # pipeline is full or nothing new came.
            batch = self._take(0.0 if ahead else 0.2)
            if batch:
                ahead.append((batch, pool.submit(batch)))
            if ahead and (len(ahead) > depth or not batch or pool.failed):
                taken, fut = ahead.popleft()
                if not self._store_batch(ingestor, store, baselines, taken, pool.result(fut)):
                    break
            if rounds is not None:
                rounds.step()
            self._flush_broker_counters(store)
            self._maybe_compact(store)
        if rounds is not None:
            rounds.finish()
        self._flush_broker_counters(store)

    def _store_batch(
        self,
        ingestor: Ingestor,
        store: Store,
        baselines: BaselineCache,
        batch: list[Incoming],
        decoded: list[FastWindow | None] | None,
    ) -> bool:
        """Store and acknowledge a batch; False when stopped while the database is down."""
        attempt = 0
        while True:
            try:
                res = ingestor.process(batch, decoded)
                break
            except Exception as e:  # noqa: BLE001 - a database outage must not lose the batch
                self.counters.db_errors += 1
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.error(
                    "storing a batch of %d failed (%s); retrying in %.1f s",
                    len(batch),
                    str(e)[:200],
                    delay,
                )
                attempt += 1
                if self._stop.wait(delay):
                    return False  # unacknowledged: the broker redelivers them to the next collector
        gen = self._generation
        for m in batch:
            if m.qos > 0 and m.generation == gen:
                self._client.ack(m.mid, m.qos)
        for model in res.unknown_models:
            self._auto_register(store, baselines, model)
        if self._rounds is not None:
            for key, (n, sha) in res.touched.items():
                self._rounds.add(key, n, sha)
        return True

    @property
    def broker_key(self) -> str:
        """The broker as ``host:port`` (the key of its counters in ``broker_counters``)."""
        return f"{self.broker.host}:{self.broker.port}"

    def _flush_broker_counters(self, store: Store) -> None:
        """Store the broker drop counters seen since the last call; publish an alert for each rise."""
        self.counters.alerts += self.drops.flush(store, self.fleet, self.publish_alert)

    def _maybe_compact(self, store: Store) -> None:
        """Fold windows older than ``compact_after_s`` into hourly rollups, at most every COMPACT_EVERY_S."""
        if self.compact_after_s is None or time.monotonic() - self._last_compact < COMPACT_EVERY_S:
            return
        self._last_compact = time.monotonic()
        from toolchain.fleet.compact import compact

        try:
            out = compact(store, time.time() - self.compact_after_s)
        except Exception as e:  # noqa: BLE001 - compaction is housekeeping; ingestion goes on
            log.error("compaction failed: %s", str(e)[:300])
            return
        if out.windows:
            log.info(
                "compacted %d window(s) of %d device(s) into %d hourly rollup(s)",
                out.windows,
                out.devices,
                out.rollups,
            )

    @property
    def evaluation_backlog(self) -> int:
        """Devices due for evaluation that are not evaluated yet (running or waiting; 0 when idle)."""
        rounds = self._rounds
        return rounds.backlog if rounds is not None else 0

    def _auto_register(self, store: Store, baselines: BaselineCache, sha: str) -> None:
        if self.bundles is None:
            return
        path = self.bundles.find(sha)
        if path is None:
            return
        try:
            info = register_bundle(store, path)
            baselines.forget(sha)
            if self.eval_worker is not None:
                self.eval_worker.forget(sha)
            log.info("registered bundle %s (%s v%s) from %s", sha[:12], info["name"], info["version"], path)
        except (RegistryError, StorageError) as e:
            log.error("auto-registration of %s failed: %s", path, e)
        except Exception as e:  # noqa: BLE001 - a bad bundle in the directory must not stop the collector
            log.error("auto-registration of %s failed: %s", path, e)
