"""Over-the-air updates on the device: the deploy command (schema 1) and a persisted state machine.

An update runs these states, each persisted in ``state_dir/bundles/update.json`` before it starts::

    downloading -> verifying -> writing -> switching -> checking -> committed
                                                                \\-> failed (previous model serving)

* ``downloading``: fetch into ``staging/`` (HTTP(S) with resume, a size cap and a stall timeout, chunks
  over MQTT, or a local drop from ``edgefleet flash``). The manifest comes first and is checked (hash
  named by the command, signature, target, version, size cap) before any model byte is fetched.
* ``verifying``: ``verify_bundle`` on the staged copy with the device's policy.
* ``writing``: copy into the inactive slot (``.partial``, fsync, rename) and verify the slot again.
* ``switching``: point ``active.json`` at the new slot (atomic) and hand it to the serving process.
* ``checking``: smoke inference, then a health window; any failure rolls back.
* ``committed`` emits ``deployed``; ``failed`` points back at the previous bundle and emits
  ``deploy_failed`` with the reason.

Crash and power-loss safety: ``recover()`` runs at start-up before any model is loaded. An update that
stopped before ``switching`` never touched the pointer; one that stopped in ``switching`` or
``checking`` is rolled back (the new model never passed its health window). Either way the staging
area and partial slot are removed and ``deploy_failed`` is reported. Serving reads only complete,
verified slots, so no half-written model is ever loaded.

The deploy command (``type: deploy``, schema 1), on ``edgefleet/<fleet>/<device_id>/cmd`` or the
fleet-wide ``edgefleet/<fleet>/cmd``::

    {"schema": 1, "type": "deploy", "deployment_id": "d-...",
     "bundle": {"name": "digits", "version": 7, "sha256": "<sha256 of manifest.json>",
                "size_bytes": <sum of the manifest's file sizes>},
     "source": {"kind": "http", "url": "http://host:8765/"}            # base URL of the bundle folder
            |  {"kind": "mqtt", "topic": "edgefleet/<fleet>/bundles/<sha256>", "chunks": N,
                "chunk_bytes": 65536, "manifest_bytes": M, "signature_bytes": S},
     "devices": ["dev-1", ...] | null}                                   # optional filter (fleet topic)

Over MQTT the bundle is one byte stream (manifest.json, manifest.sig, then the files in manifest
order), cut into ``chunks`` retained messages on ``<topic>/<index>`` of ``chunk_bytes`` each (the last
may be shorter). The device decides how a bundle is verified; the command only says where it is.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import queue
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_agent.bundle import (
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    SIGNATURE_FILE,
    BundleError,
    Manifest,
    VerifyPolicy,
    check_manifest_policy,
    load_manifest,
    manifest_sha256,
    verify_bundle,
)
from device_agent.errors import AgentError
from device_agent.store import (
    ActiveRef,
    BundleId,
    BundleStore,
    RollbackError,
    RollbackFloor,
    StoreError,
    atomic_write_json,
    read_json,
    remove_tree,
)
from device_agent.telemetry import TelemetryError, check_id, load_json

log = logging.getLogger(__name__)

COMMAND_SCHEMA = 1
UPDATE_SCHEMA = 1
DEPLOYMENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SIGNATURE_MAX_BYTES = 4096
MQTT_CHUNK_MAX_BYTES = 256 * 1024
MQTT_BUNDLE_MAX_BYTES = 32 * 1024 * 1024  # chunked-over-MQTT is for small bundles; use HTTP(S) above this

# Tunables (module constants so tests can patch them).
DOWNLOAD_STALL_S = 30.0  # no byte for this long: the connection is dropped and the download resumed
DOWNLOAD_ATTEMPTS = 5  # connection attempts per file (each resumes where the last one stopped)
DOWNLOAD_RETRY_S = 1.0
DOWNLOAD_CHUNK_BYTES = 64 * 1024
HEALTH_WINDOW_S = 10.0
HEALTH_POLL_S = 0.5
INCOMING_POLL_S = 1.0
QUEUE_MAX = 8  # deploy commands waiting behind the running one; more are refused (command_rejected)
DISK_MARGIN_BYTES = 1 << 20

STATES = ("idle", "downloading", "verifying", "writing", "switching", "checking", "committed", "failed")
TERMINAL = ("idle", "committed", "failed")


class UpdateError(AgentError):
    """A deployment failed; the message is the reason reported in ``deploy_failed``."""


class CommandError(AgentError):
    """A command payload does not follow the deploy command schema."""


# --------------------------------------------------------------------------------------------------
# The deploy command (schema 1)


@dataclass(frozen=True)
class HttpSource:
    """Fetch the bundle's files under a base URL (``edgefleet serve`` or any web server)."""

    url: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "http", "url": self.url}


@dataclass(frozen=True)
class MqttSource:
    """Fetch the bundle as retained chunks on ``<topic>/<index>``."""

    topic: str
    chunks: int
    chunk_bytes: int
    manifest_bytes: int
    signature_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "mqtt",
            "topic": self.topic,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "manifest_bytes": self.manifest_bytes,
            "signature_bytes": self.signature_bytes,
        }


@dataclass(frozen=True)
class LocalSource:
    """A complete bundle folder already on the device (``edgefleet flash`` to a path or ssh://)."""

    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "local", "path": self.path}


Source = HttpSource | MqttSource | LocalSource


@dataclass(frozen=True)
class DeployCommand:
    """A decoded deploy command."""

    deployment_id: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    source: Source
    devices: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": COMMAND_SCHEMA,
            "type": "deploy",
            "deployment_id": self.deployment_id,
            "bundle": {
                "name": self.name,
                "version": self.version,
                "sha256": self.sha256,
                "size_bytes": self.size_bytes,
            },
            "source": self.source.to_dict(),
            "devices": list(self.devices) if self.devices is not None else None,
        }

    def encode(self) -> bytes:
        """Return the wire payload."""
        import json

        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    def applies_to(self, device_id: str | None) -> bool:
        """True when the command names no device filter or includes ``device_id``."""
        return self.devices is None or device_id is None or device_id in self.devices


def _need(d: Any, required: set[str], optional: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise CommandError(f"{where} must be an object")
    extra = set(d) - required - optional
    if extra:
        raise CommandError(f"{where} has unknown key(s) {sorted(extra)[:5]}")
    missing = required - set(d)
    if missing:
        raise CommandError(f"{where} is missing key(s) {sorted(missing)}")
    return d


def _int(v: Any, what: str, minimum: int = 0, maximum: int = 2**53) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
        raise CommandError(f"{what} must be an integer in [{minimum}, {maximum}], got {str(v)[:20]!r}")
    return v


def decode_command(raw: bytes) -> DeployCommand:
    """Decode an untrusted deploy command strictly: size, JSON, schema, type, known keys, types, ranges."""
    try:
        d = load_json(raw)
    except TelemetryError as e:
        raise CommandError(f"deploy command rejected: {e}") from None
    if d.get("type") != "deploy":
        raise CommandError(f"command type {str(d.get('type'))[:20]!r} is unknown. Known: deploy")
    _need(d, {"schema", "type", "deployment_id", "bundle", "source"}, {"devices"}, "deploy command")
    dep_id = d["deployment_id"]
    if not isinstance(dep_id, str) or not DEPLOYMENT_ID_RE.match(dep_id):
        raise CommandError(f"deployment_id {str(dep_id)[:70]!r} must match {DEPLOYMENT_ID_RE.pattern}")
    b = _need(d["bundle"], {"name", "version", "sha256", "size_bytes"}, set(), "bundle")
    if not isinstance(b["name"], str) or not 0 < len(b["name"]) <= 64:
        raise CommandError("bundle.name must be a string of 1-64 characters")
    sha = b["sha256"]
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise CommandError("bundle.sha256 must be 64 lowercase hex digits (sha256 of manifest.json)")
    version = _int(b["version"], "bundle.version", 1)
    size = _int(b["size_bytes"], "bundle.size_bytes", 1)
    s = d["source"]
    if not isinstance(s, Mapping) or s.get("kind") not in ("http", "mqtt"):
        raise CommandError(
            f"source.kind {str(s.get('kind') if isinstance(s, Mapping) else s)[:20]!r} is unknown."
            " Known: http, mqtt"
        )
    source: Source
    if s["kind"] == "http":
        _need(s, {"kind", "url"}, set(), "source")
        url = s["url"]
        if not isinstance(url, str) or len(url) > 2048:
            raise CommandError("source.url must be a string of at most 2048 characters")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CommandError(f"source.url {url[:100]!r} must be an http:// or https:// URL")
        source = HttpSource(url if url.endswith("/") else url + "/")
    else:
        _need(
            s,
            {"kind", "topic", "chunks", "chunk_bytes", "manifest_bytes", "signature_bytes"},
            set(),
            "source",
        )
        topic = s["topic"]
        if not isinstance(topic, str) or not 0 < len(topic) <= 200 or any(c in topic for c in "#+\x00"):
            raise CommandError(
                "source.topic must be a plain MQTT topic (no wildcards) of at most 200 characters"
            )
        chunk_bytes = _int(s["chunk_bytes"], "source.chunk_bytes", 1, MQTT_CHUNK_MAX_BYTES)
        manifest_bytes = _int(s["manifest_bytes"], "source.manifest_bytes", 1, MANIFEST_MAX_BYTES)
        signature_bytes = _int(s["signature_bytes"], "source.signature_bytes", 0, SIGNATURE_MAX_BYTES)
        chunks = _int(s["chunks"], "source.chunks", 1, MQTT_BUNDLE_MAX_BYTES)
        total = manifest_bytes + signature_bytes + size
        if total > MQTT_BUNDLE_MAX_BYTES:
            raise CommandError(
                f"bundle of {total} bytes is too large for chunks over MQTT; serve it over HTTP(S)"
            )
        if chunks != -(-total // chunk_bytes):
            raise CommandError(
                f"source.chunks {chunks} does not cover {total} bytes in chunks of {chunk_bytes}"
            )
        source = MqttSource(topic, chunks, chunk_bytes, manifest_bytes, signature_bytes)
    devices = d.get("devices")
    devs: tuple[str, ...] | None = None
    if devices is not None:
        if not isinstance(devices, list) or len(devices) > 10000:
            raise CommandError("devices must be a list of device ids or null")
        try:
            devs = tuple(check_id(x, "devices[]") for x in devices)
        except TelemetryError as e:
            raise CommandError(str(e)) from None
    return DeployCommand(dep_id, b["name"], version, sha, size, source, devs)


def bundle_topic(fleet: str, sha256: str) -> str:
    """Return the topic prefix under which a bundle's chunks are retained: ``edgefleet/<fleet>/bundles/<sha>``."""
    return f"edgefleet/{check_id(fleet, 'fleet')}/bundles/{sha256}"


def bundle_stream(bundle_dir: Path) -> tuple[list[Path], int, int]:
    """Return the files of a bundle's MQTT byte stream in order, with manifest and signature sizes."""
    m = load_manifest(bundle_dir)
    files = [bundle_dir / MANIFEST_FILE]
    sig = bundle_dir / SIGNATURE_FILE
    sig_bytes = 0
    if sig.is_file():
        files.append(sig)
        sig_bytes = sig.stat().st_size
    files += [bundle_dir / f.path for f in m.files]
    return files, (bundle_dir / MANIFEST_FILE).stat().st_size, sig_bytes


# --------------------------------------------------------------------------------------------------
# Manifest pre-check: reject before downloading model bytes


def check_manifest(
    raw: bytes, sig: bytes | None, policy: VerifyPolicy, cmd: DeployCommand | None
) -> Manifest:
    """Check a fetched manifest against the command and the device policy before fetching any file."""
    if cmd is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != cmd.sha256:
            raise UpdateError(
                f"manifest.json has sha256 {got[:12]}..., the command names {cmd.sha256[:12]}..."
            )
    try:
        m = check_manifest_policy(raw, sig, policy, "bundle")
    except BundleError as e:
        raise UpdateError(str(e)) from None
    total = sum(f.size_bytes for f in m.files)
    if cmd is not None and (m.name, m.version, total) != (cmd.name, cmd.version, cmd.size_bytes):
        raise UpdateError(
            f"manifest says {m.name} v{m.version} ({total} bytes), the command says"
            f" {cmd.name} v{cmd.version} ({cmd.size_bytes} bytes)"
        )
    return m


# --------------------------------------------------------------------------------------------------
# HTTP(S) downloads: resume, size cap, stall timeout


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def http_fetch(
    url: str,
    dest: Path,
    size_bytes: int | None,
    max_bytes: int,
    *,
    stall_s: float | None = None,
    attempts: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    missing_ok: bool = False,
) -> bool:
    """Download ``url`` into ``dest``, resuming a partial file with a Range request.

    ``size_bytes`` is the declared size (the download must end exactly there); without it, at most
    ``max_bytes`` are accepted. A connection that delivers nothing for ``stall_s`` is dropped and
    resumed, up to ``attempts`` connections. Returns False when ``missing_ok`` and the server says 404.
    """
    stall = DOWNLOAD_STALL_S if stall_s is None else stall_s
    tries = DOWNLOAD_ATTEMPTS if attempts is None else attempts
    cap = size_bytes if size_bytes is not None else max_bytes
    dest.parent.mkdir(parents=True, exist_ok=True)
    last_error = "no attempt made"
    for _attempt in range(tries):
        have = dest.stat().st_size if dest.exists() else 0
        if size_bytes is not None and have == size_bytes:
            return True
        if have > cap:
            dest.unlink()
            have = 0
        req = urllib.request.Request(url, headers={"User-Agent": "edgefleet-agent"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=stall, context=ssl_context)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404 and missing_ok:
                return False
            if e.code == 416 and have and size_bytes is None:
                return True
            if e.code == 416 and have:
                raise UpdateError(
                    f"download of {url[:200]} ends at {have} bytes, the manifest declares {size_bytes} bytes"
                ) from None
            raise UpdateError(f"download of {url[:200]} failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise UpdateError(
                    f"download of {url[:200]} refused: the server's TLS certificate does not verify"
                    f" ({reason.verify_message}); set [update] ca_file for a private CA"
                ) from None
            last_error = str(reason)[:120]
            time.sleep(DOWNLOAD_RETRY_S)
            continue
        with resp:
            mode = "ab"
            if have and resp.status != 206:
                have, mode = 0, "wb"  # the server ignored Range: start over
            elif have:
                rng = resp.headers.get("Content-Range", "")
                m = re.match(r"bytes (\d+)-", rng)
                if not m or int(m.group(1)) != have:
                    have, mode = 0, "wb"
                    resp.close()
                    dest.unlink(missing_ok=True)
                    last_error = f"server answered Range with {rng[:60]!r}"
                    continue
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and have + int(length) > cap:
                raise UpdateError(
                    f"download of {url[:200]} announces {have + int(length)} bytes, more than the declared {cap}"
                )
            try:
                with open(dest, mode) as fh:
                    got = have
                    while True:
                        chunk = resp.read(min(DOWNLOAD_CHUNK_BYTES, cap - got + 1))
                        if not chunk:
                            break
                        got += len(chunk)
                        if got > cap:
                            raise UpdateError(
                                f"download of {url[:200]} sent more than the declared {cap} bytes; stopped there"
                            )
                        fh.write(chunk)
                    fh.flush()
            except OSError as e:
                if _disk_full(e):
                    raise UpdateError(
                        f"disk full in staging while downloading {url[:200]} ({e.strerror})"
                    ) from None
                if isinstance(e, (socket.timeout, TimeoutError)) or isinstance(e, ConnectionError):
                    last_error = (
                        f"stalled for more than {stall:g} s"
                        if isinstance(e, (socket.timeout, TimeoutError))
                        else str(e)[:120]
                    )
                    continue
                raise UpdateError(f"cannot write {str(dest)!r} ({e.strerror})") from None
            except http.client.HTTPException as e:
                last_error = f"connection broken ({type(e).__name__})"
                continue
        size_now = dest.stat().st_size
        if size_bytes is None or size_now == size_bytes:
            return True
        last_error = f"connection closed after {size_now} of {size_bytes} bytes"
    raise UpdateError(f"download of {url[:200]} failed after {tries} attempts: {last_error}")


# --------------------------------------------------------------------------------------------------
# Chunks over MQTT


@dataclass(frozen=True)
class MqttSettings:
    """How the updater reaches the device's broker to fetch chunked bundles."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = None


def mqtt_fetch(
    settings: MqttSettings, src: MqttSource, size_bytes: int, dest: Path, stall_s: float | None = None
) -> Path:
    """Collect a bundle's retained chunks into ``dest/stream.bin`` and return that file.

    Each chunk must have its declared size (all but the last exactly ``chunk_bytes``); the stream ends
    exactly at manifest + signature + files. Nothing new for ``stall_s`` seconds fails the download.
    """
    import paho.mqtt.client as mqtt

    stall = DOWNLOAD_STALL_S if stall_s is None else stall_s
    total = src.manifest_bytes + src.signature_bytes + size_bytes
    last = src.chunks - 1
    last_size = total - last * src.chunk_bytes
    stream = dest / "stream.bin"
    dest.mkdir(parents=True, exist_ok=True)
    with open(stream, "wb") as fh:
        fh.truncate(0)
    received: set[int] = set()
    problems: list[str] = []
    lock = threading.Lock()
    progress = threading.Condition(lock)
    prefix = src.topic + "/"

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            if not msg.topic.startswith(prefix):
                return
            idx_s = msg.topic[len(prefix) :]
            if not idx_s.isdigit() or int(idx_s) > last:
                raise UpdateError(f"chunk topic {msg.topic[:120]!r} is outside 0..{last}")
            idx = int(idx_s)
            want = last_size if idx == last else src.chunk_bytes
            if len(msg.payload) != want:
                raise UpdateError(f"chunk {idx} has {len(msg.payload)} bytes, expected {want}")
            with lock:
                if idx in received:
                    return
                with open(stream, "r+b") as fh:
                    fh.seek(idx * src.chunk_bytes)
                    fh.write(msg.payload)
                received.add(idx)
                progress.notify_all()
        except OSError as e:
            with lock:
                problems.append(
                    f"disk full in staging ({e.strerror})"
                    if _disk_full(e)
                    else f"cannot write chunk ({e.strerror})"
                )
                progress.notify_all()
        except UpdateError as e:
            with lock:
                problems.append(str(e))
                progress.notify_all()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        client.subscribe(prefix + "+", qos=1)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id or "")
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file)
    client.on_message = on_message
    client.on_connect = on_connect
    try:
        client.connect(settings.host, settings.port, keepalive=30)
    except OSError as e:
        raise UpdateError(f"cannot reach broker {settings.host}:{settings.port} for chunks ({e})") from None
    client.loop_start()
    try:
        with lock:
            seen = -1
            deadline = time.monotonic() + stall
            while len(received) < src.chunks and not problems:
                if len(received) != seen:
                    seen = len(received)
                    deadline = time.monotonic() + stall
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UpdateError(
                        f"chunk download stalled: {len(received)} of {src.chunks} chunks after {stall:g} s without progress"
                    )
                progress.wait(min(left, 0.5))
            if problems:
                raise UpdateError(problems[0])
    finally:
        client.loop_stop()
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - best effort on a connection we are dropping anyway
            pass
    if stream.stat().st_size != total:
        raise UpdateError(f"chunk stream has {stream.stat().st_size} bytes, expected {total}")
    return stream


def unpack_stream(
    stream: Path, src: MqttSource, out: Path, policy: VerifyPolicy, cmd: DeployCommand
) -> Manifest:
    """Split a chunk stream into a bundle folder (manifest checked before any file is written)."""
    with open(stream, "rb") as fh:
        raw = fh.read(src.manifest_bytes)
        sig = fh.read(src.signature_bytes) if src.signature_bytes else None
        m = check_manifest(raw, sig, policy, cmd)
        (out / MANIFEST_FILE).write_bytes(raw)
        if sig is not None:
            (out / SIGNATURE_FILE).write_bytes(sig)
        for f in m.files:
            p = out / f.path
            p.parent.mkdir(parents=True, exist_ok=True)
            left = f.size_bytes
            with open(p, "wb") as fo:
                while left:
                    chunk = fh.read(min(left, DOWNLOAD_CHUNK_BYTES))
                    if not chunk:
                        raise UpdateError(f"chunk stream ends inside {f.path!r}")
                    fo.write(chunk)
                    left -= len(chunk)
        if fh.read(1):
            raise UpdateError("chunk stream holds bytes after the last listed file")
    stream.unlink()
    return m


# --------------------------------------------------------------------------------------------------
# Smoke inference


def smoke_inference(bundle_dir: Path) -> None:
    """Load a bundle in its runtime and run one all-zero sample; raise UpdateError when that fails."""
    from device_agent.inference import Predictor

    try:
        pred = Predictor(bundle_dir)
    except AgentError as e:
        raise UpdateError(f"smoke inference failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - any runtime failure means the model cannot serve
        raise UpdateError(f"smoke inference failed: {type(e).__name__}: {str(e)[:200]}") from None
    smoke_predictor(pred)


def smoke_predictor(pred: Any) -> None:
    """Run one all-zero sample through a loaded ``Predictor``; raise UpdateError on failure or bad scores."""
    import numpy as np

    try:
        shape = tuple(1 if d < 0 else d for d in pred.sample_shape)
        scores = pred.predict(np.zeros((1, *shape), dtype=np.float32))
    except AgentError as e:
        raise UpdateError(f"smoke inference failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - any runtime failure means the model cannot serve
        raise UpdateError(f"smoke inference failed: {type(e).__name__}: {str(e)[:200]}") from None
    if not np.isfinite(scores).all():
        raise UpdateError("smoke inference returned NaN or infinite scores")
    if scores.shape[1] != len(pred.labels):
        raise UpdateError(
            f"smoke inference returned {scores.shape[1]} scores but the bundle has {len(pred.labels)} labels"
        )


# --------------------------------------------------------------------------------------------------
# The state machine


Emit = Callable[[str, str, Mapping[str, Any]], None]


@dataclass
class UpdaterConfig:
    """Device policy for updates (from the agent's config; never from a command or a bundle)."""

    state_dir: Path
    policy: VerifyPolicy = field(default_factory=VerifyPolicy)
    fallback_bundle: Path | None = None  # the config's bundle, served while the store holds none
    health_window_s: float | None = None
    health_poll_s: float | None = None
    staging_quota_bytes: int | None = None  # refuse downloads larger than this (None: free disk space)
    device_id: str | None = None
    mqtt: MqttSettings | None = None
    ssl_context: ssl.SSLContext | None = None


def _noop_emit(event: str, message: str, detail: Mapping[str, Any]) -> None:
    log.info("%s: %s %s", event, message, dict(detail))


class Updater:
    """Run deployments one at a time through the persisted state machine.

    The serving process provides four callables: ``switch(bundle_dir) -> bool`` (load and serve a
    bundle; False when it refused), ``smoke(bundle_dir)`` (raise when the served bundle cannot
    predict), ``health() -> bool`` (polled during the health window) and ``emit(event, message,
    detail)``. ``on_state(status)`` is called with the deployment status after every state change.
    """

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        switch: Callable[[Path], bool],
        smoke: Callable[[Path], None] = smoke_inference,
        health: Callable[[], bool] = lambda: True,
        emit: Emit = _noop_emit,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.store = BundleStore(config.state_dir)
        self.floor = RollbackFloor(self.store.root)
        self.switch = switch
        self.smoke = smoke
        self.health = health
        self.emit = emit
        self.on_state = on_state
        self._queue: queue.Queue[DeployCommand | LocalSource | None] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._doc: dict[str, Any] = {}
        self._startup_events: list[tuple[str, str, dict[str, Any]]] = []
        self.stale_partials_removed = 0

    # ------------------------------------------------------------------ persisted state

    def _load(self) -> dict[str, Any]:
        try:
            doc = read_json(self.store.update_path)
        except StoreError as e:
            log.error("update state unreadable, starting from idle: %s", e)
            return {}
        if not isinstance(doc, dict) or doc.get("schema") != UPDATE_SCHEMA or doc.get("state") not in STATES:
            return {}
        return doc

    def _persist(self, **changes: Any) -> None:
        with self._lock:
            self._doc.update(changes)
            self._doc["schema"] = UPDATE_SCHEMA
            self._doc["updated_at"] = time.time()
            self.store.ensure()
            atomic_write_json(self.store.update_path, self._doc)
            status = self.status()
        if self.on_state is not None:
            try:
                self.on_state(status)
            except Exception:  # noqa: BLE001 - a status publisher must not break an update
                log.exception("on_state callback failed")

    def status(self) -> dict[str, Any]:
        """Return the deployment state for status messages and ``/v1/health`` (JSON-ready)."""
        with self._lock:
            d = self._doc or self._load()
        if not d:
            return {"state": "idle"}
        new = d.get("new") or {}
        return {
            "id": d.get("deployment_id"),
            "state": d.get("state"),
            "name": new.get("name"),
            "version": new.get("version"),
            "sha256": new.get("sha256"),
            "reason": d.get("reason"),
            "updated_at": d.get("updated_at"),
        }

    # ------------------------------------------------------------------ what is served

    def store_bundle(self) -> Path | None:
        """Return the store's active slot, or None (also when the pointer is unreadable: logged)."""
        try:
            return self.store.active_dir()
        except StoreError as e:
            log.error("bundle store pointer unreadable, serving the configured bundle: %s", e)
            return None

    def serving_dir(self) -> Path | None:
        """Return the bundle to serve: the store's active slot, else the configured fallback bundle."""
        return self.store_bundle() or self.config.fallback_bundle

    def _serving_manifest(self) -> Manifest | None:
        d = self.serving_dir()
        if d is None:
            return None
        try:
            return load_manifest(d)
        except BundleError:
            return None

    # ------------------------------------------------------------------ recovery

    def recover(self, report: bool = True) -> None:
        """Make the store consistent after a crash or power loss; call before loading any model.

        An interrupted update before ``switching`` is dropped; one in ``switching`` or ``checking`` is
        rolled back to the previous pointer. Staging and partial slots are removed. A terminal result
        that was never reported is reported now (``emit`` must be usable).
        """
        self.store.ensure()
        with self._lock:
            self._doc = self._load()
        d = self._doc
        state = d.get("state")
        if state in ("switching", "checking"):
            prev = d.get("previous")
            ref = ActiveRef.from_dict(prev) if prev else None
            self.store.set_active(ref)
            target = d.get("target_slot")
            if target and (ref is None or ref.slot != target):
                remove_tree(self.store.slot_path(target))
            self._persist(
                state="failed",
                failed_in=state,
                reported=False,
                reason=f"agent restarted during '{state}' before the new model passed its health window;"
                " rolled back to the previous model",
            )
        elif state in ("downloading", "verifying", "writing"):
            target = d.get("target_slot")
            active = self.store.active()
            if target and (active is None or active.slot != target):
                remove_tree(self.store.slot_path(target))
            self._persist(
                state="failed",
                failed_in=state,
                reported=False,
                reason=f"agent restarted during '{state}'; the previous model kept serving",
            )
        self.store.clear_staging()
        if report:
            self._report_pending()

    def report_pending(self) -> None:
        """Report a finished deployment whose event was not sent yet (after ``recover(report=False)``)."""
        with self._lock:
            self._doc = self._doc or self._load()
        self._report_pending()
        for event, message, detail in self._startup_events:
            try:
                self.emit(event, message, detail)
            except Exception:  # noqa: BLE001
                log.exception("could not emit %s", event)
        self._startup_events.clear()

    def check_active_slot(self) -> bool:
        """Verify the active slot at start-up; when it is damaged, fall back to the configured bundle.

        A committed slot can still rot on a worn SD card. Serving the configured bundle keeps the device
        useful; the event ``store_fallback`` says why. Returns False when it fell back.
        """
        try:
            ref = self.store.active()
        except StoreError:
            ref = None
        if ref is not None:  # a committed slot was activated: it is part of the floor even if it rotted
            self.floor.raise_to(BundleId(ref.name, ref.version, ref.sha256))
        active = self.store_bundle()
        if active is None:
            return True
        try:
            verify_bundle(active, replace(self.config.policy, min_version_exclusive=None))
            return True
        except (BundleError, OSError) as e:
            reason = f"the active bundle in {str(active)!r} is damaged ({e}); serving the configured bundle"
            log.error("%s", reason)
            self.store.set_active(None)
            self._startup_events.append(("store_fallback", reason[:900], {"path": str(active)}))
            return False

    def seed_floor(self) -> None:
        """Start a floor on a device that has none (first start, or an upgrade from an agent without one).

        The versions the store says were committed raise it; the configured bundle becomes the
        fallback (trust on first use), so a device with a damaged slot still starts after the upgrade.
        """
        if self.floor.exists:
            return
        with self._lock:
            d = self._doc or self._load()
        new = d.get("new") or {}
        if d.get("state") == "committed" and isinstance(new.get("version"), int) and new.get("sha256"):
            b = BundleId.from_dict({**new, "name": new.get("name") or "?"})
            if b is not None:
                self.floor.raise_to(b)
        fb = self.config.fallback_bundle
        if fb is not None:
            try:
                m = load_manifest(fb)
                self.floor.record_fallback(BundleId(m.name, m.version, manifest_sha256(fb)))
            except (BundleError, OSError):
                pass  # the daemon reports an unloadable configured bundle itself

    def startup_bundle(self) -> Path | None:
        """Return what to serve at start-up: the active slot, else the configured bundle if the floor allows.

        The configured bundle is served below the floor only when it is the recorded fallback (the
        configured bundle this device activated before): the device keeps serving after a slot rots,
        but a bundle path pointed at an older bundle is not activated by a restart. Raises
        RollbackError (the daemon exits 78) otherwise.
        """
        slot = self.store_bundle()
        if slot is not None:
            return slot
        fb = self.config.fallback_bundle
        if fb is None:
            return None
        try:
            m = load_manifest(fb)
            me = BundleId(m.name, m.version, manifest_sha256(fb))
        except (BundleError, OSError):
            return fb  # not loadable: the Agent says why
        if self.floor.allows(m.version):
            return fb
        if self.floor.fallback == me:
            self.floor.serving_below_floor = True
            log.warning(
                "serving the configured bundle %s v%d below the anti-rollback floor v%d (the fallback);"
                " only v%d or newer will be installed",
                me.name,
                me.version,
                self.floor.version,
                self.floor.version,
            )
            return fb
        self.floor.check(me, m.version, "bundle path")
        return fb  # pragma: no cover - check raised

    def _report_pending(self) -> None:
        d = self._doc
        if not d or d.get("reported", True) or d.get("state") not in ("committed", "failed"):
            return
        self._report(d["state"] == "committed")
        self._persist(reported=True)

    def _report(self, ok: bool) -> None:
        d = self._doc
        new = d.get("new") or {}
        detail = {
            "deployment_id": d.get("deployment_id"),
            "name": new.get("name"),
            "version": new.get("version"),
            "sha256": new.get("sha256"),
        }
        try:
            if ok:
                detail["previous_version"] = (d.get("previous_served") or {}).get("version")
                self.emit("deployed", f"now serving {new.get('name')} v{new.get('version')}", detail)
            else:
                detail["state"] = d.get("failed_in")
                detail["reason"] = d.get("reason")
                self.emit("deploy_failed", str(d.get("reason")), detail)
        except Exception:  # noqa: BLE001 - reporting must not turn a finished update into a crash
            log.exception("could not emit the deployment result")

    # ------------------------------------------------------------------ entry points

    def handle_command(self, payload: bytes) -> DeployCommand | None:
        """Decode a ``cmd`` payload and queue it; return None when it does not apply to this device.

        Raises CommandError for a malformed payload (the caller logs and counts it).
        """
        cmd = decode_command(payload)
        if not cmd.applies_to(self.config.device_id):
            return None
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            raise CommandError(
                f"deploy command {cmd.deployment_id!r} dropped: {QUEUE_MAX} deployments are already waiting"
            ) from None
        return cmd

    def submit(self, item: DeployCommand | LocalSource) -> None:
        """Queue a deployment for the worker thread (blocks while the queue is full)."""
        self._queue.put(item)

    def start(self) -> None:
        """Start the worker thread (runs queued deployments and polls the incoming drop box)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, name="edgefleet-updater", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker thread after the deployment in progress."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the worker checks the stop flag before taking the next item
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=INCOMING_POLL_S)
            except queue.Empty:
                item = None
            if self._stop.is_set():
                break
            try:
                if item is not None:
                    self.deploy(item)
                else:
                    self.poll_incoming()
            except Exception:  # noqa: BLE001 - the worker must never die on one deployment
                log.exception("deployment crashed")

    def poll_incoming(self) -> bool:
        """Deploy the oldest complete drop in ``incoming/`` (from ``edgefleet flash``); True if one ran."""
        stale = self.store.remove_stale_partials()
        if stale:
            self.stale_partials_removed += len(stale)
            log.warning("removed %d stale .partial drop(s) (a flash stopped mid-copy)", len(stale))
        drops = self.store.pending_incoming()
        if not drops:
            return False
        self.deploy(LocalSource(str(drops[0])))
        return True

    # ------------------------------------------------------------------ one deployment

    def deploy(self, item: DeployCommand | LocalSource) -> bool:
        """Run one deployment to its end; return True when the new bundle is committed and serving."""
        with self._lock:
            self._doc = self._doc or self._load()
        if isinstance(item, DeployCommand):
            last = self._doc
            if last.get("deployment_id") == item.deployment_id and last.get("state") in (
                "committed",
                "failed",
            ):
                self._report(last["state"] == "committed")  # a retry: answer again, do not redo
                return last["state"] == "committed"
            dep_id = item.deployment_id
            src: Source = item.source
            cmd: DeployCommand | None = item
            new = {"name": item.name, "version": item.version, "sha256": item.sha256}
        else:
            dep_id = (
                "local-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{Path(item.path).name[:24]}"
            )
            src, cmd = item, None
            try:
                m0 = load_manifest(item.path)
                new = {"name": m0.name, "version": m0.version, "sha256": manifest_sha256(item.path)}
            except BundleError:
                new = {"name": None, "version": None, "sha256": None}
        served = self._serving_manifest()
        try:
            served_ref = self.store.active()
        except StoreError:
            served_ref = None
        self._doc = {}
        self._persist(
            deployment_id=dep_id,
            state="downloading",
            new=new,
            source=src.to_dict(),
            previous=served_ref.to_dict() if served_ref else None,
            previous_served={"name": served.name, "version": served.version} if served else None,
            target_slot=None,
            reason=None,
            failed_in=None,
            reported=False,
            started_at=time.time(),
        )
        if (
            cmd is not None
            and served is not None
            and served_ref is not None
            and served_ref.sha256 == cmd.sha256
        ):
            self._persist(state="committed", reason="already active")
            self._report_pending()
            return True
        policy = replace(self.config.policy, min_version_exclusive=served.version if served else None)
        source = "ota" if cmd is not None else "flash"
        # The policy refuses what is not newer than the served bundle; the floor matters when the
        # device serves below it (the configured fallback after a damaged slot).
        check_floor = served is None or served.version < self.floor.version
        staging = self.store.staging_for(dep_id)
        try:
            offered = new.get("version")
            if check_floor and isinstance(offered, int):  # before any byte is fetched
                self.floor.check(BundleId.from_dict(new), offered, source)
            bundle_dir = self._fetch(src, cmd, policy, staging)
            self._persist(state="verifying")
            manifest = verify_bundle(bundle_dir, policy)
            sha = manifest_sha256(bundle_dir)
            if check_floor:  # again on the verified manifest
                self.floor.check(BundleId(manifest.name, manifest.version, sha), manifest.version, source)
            if cmd is not None and sha != cmd.sha256:
                raise UpdateError("the verified manifest is not the one the command names")
            self._doc["new"] = {
                "name": manifest.name,
                "version": manifest.version,
                "sha256": manifest_sha256(bundle_dir),
            }
            slot = self.store.inactive_slot()
            self._persist(state="writing", target_slot=slot)
            slot_dir = self.store.write_slot(slot, bundle_dir, manifest)
            verify_bundle(slot_dir, policy)
            ref = self.store.ref_for(slot, manifest)
        except RollbackError as e:
            self._fail(str(e), switched=False, logged=True)
            return False
        except (UpdateError, BundleError, StoreError) as e:
            self._fail(str(e), switched=False)
            return False
        except OSError as e:
            reason = f"disk full in staging ({e.strerror})" if _disk_full(e) else f"I/O error: {e}"
            self._fail(reason, switched=False)
            return False
        finally:
            if isinstance(src, LocalSource):
                remove_tree(Path(src.path))
        self._persist(state="switching")
        loaded = False
        try:
            self.store.set_active(ref)
            if not self.switch(slot_dir):
                raise UpdateError("the agent refused to serve the new bundle (see its reload_failed event)")
            loaded = True
            self._persist(state="checking")
            self.smoke(slot_dir)
            self._health_window()
        except (UpdateError, BundleError, StoreError) as e:
            self._fail(str(e), switched=True, reload_previous=loaded)
            return False
        except Exception as e:  # noqa: BLE001 - anything going wrong after the switch means roll back
            self._fail(f"{type(e).__name__}: {str(e)[:200]}", switched=True, reload_previous=loaded)
            return False
        self.floor.raise_to(BundleId(ref.name, ref.version, ref.sha256))
        self.floor.serving_below_floor = False
        self._persist(state="committed")
        self.store.clear_staging()
        self._report_pending()
        return True

    def _fetch(self, src: Source, cmd: DeployCommand | None, policy: VerifyPolicy, staging: Path) -> Path:
        if isinstance(src, LocalSource):
            path = Path(src.path)
            raw = (path / MANIFEST_FILE).read_bytes()[: MANIFEST_MAX_BYTES + 1]
            sig_p = path / SIGNATURE_FILE
            check_manifest(
                raw, sig_p.read_bytes()[:SIGNATURE_MAX_BYTES] if sig_p.is_file() else None, policy, None
            )
            return path
        assert cmd is not None
        self._check_space(cmd.size_bytes)
        if isinstance(src, HttpSource):
            man = staging / MANIFEST_FILE
            http_fetch(
                src.url + MANIFEST_FILE, man, None, MANIFEST_MAX_BYTES, ssl_context=self.config.ssl_context
            )
            sig_p = staging / SIGNATURE_FILE
            has_sig = http_fetch(
                src.url + SIGNATURE_FILE,
                sig_p,
                None,
                SIGNATURE_MAX_BYTES,
                ssl_context=self.config.ssl_context,
                missing_ok=True,
            )
            m = check_manifest(man.read_bytes(), sig_p.read_bytes() if has_sig else None, policy, cmd)
            for f in m.files:
                url = src.url + urllib.parse.quote(f.path)
                http_fetch(
                    url, staging / f.path, f.size_bytes, f.size_bytes, ssl_context=self.config.ssl_context
                )
            return staging
        if self.config.mqtt is None:
            raise UpdateError(
                "this agent has no broker settings to fetch chunks over MQTT; use an HTTP(S) source"
            )
        stream = mqtt_fetch(self.config.mqtt, src, cmd.size_bytes, staging / ".chunks")
        out = staging / "bundle"
        out.mkdir(exist_ok=True)
        unpack_stream(stream, src, out, policy, cmd)
        remove_tree(staging / ".chunks")
        return out

    def _check_space(self, size_bytes: int) -> None:
        quota = self.config.staging_quota_bytes
        if quota is not None and size_bytes > quota:
            raise UpdateError(f"bundle of {size_bytes} bytes exceeds the staging quota of {quota} bytes")
        try:
            free = shutil.disk_usage(self.store.staging_dir).free
        except OSError:
            return
        if free < size_bytes + DISK_MARGIN_BYTES:
            raise UpdateError(f"disk full in staging: {free} bytes free, the bundle needs {size_bytes}")

    def _health_window(self) -> None:
        window = HEALTH_WINDOW_S if self.config.health_window_s is None else self.config.health_window_s
        poll = HEALTH_POLL_S if self.config.health_poll_s is None else self.config.health_poll_s
        deadline = time.monotonic() + window
        while True:
            if not self.health():
                raise UpdateError(f"health check failed within the {window:g} s health window")
            if time.monotonic() >= deadline:
                return
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _fail(self, reason: str, switched: bool, reload_previous: bool = True, logged: bool = False) -> None:
        failed_in = self._doc.get("state")
        if not logged:  # ``logged``: the anti-rollback floor already logged it (once per bundle)
            log.warning("deployment %s failed in %s: %s", self._doc.get("deployment_id"), failed_in, reason)
        if switched:
            prev = self._doc.get("previous")
            ref = ActiveRef.from_dict(prev) if prev else None
            try:
                self.store.set_active(ref)
                back = self.serving_dir()
                if reload_previous and back is not None and not self.switch(back):
                    reason += "; and the previous bundle failed to load again (check the agent)"
            except Exception as e:  # noqa: BLE001
                reason += f"; rollback error: {e}"
        target = self._doc.get("target_slot")
        active = self.store.active()
        if target and (active is None or active.slot != target):
            remove_tree(self.store.slot_path(target))
        self.store.clear_staging()
        self._persist(state="failed", failed_in=failed_in, reason=reason[:900])
        self._report_pending()


# --------------------------------------------------------------------------------------------------
# The agent daemon's side: the optional [update] config table and the wiring into device_agent.daemon

UPDATE_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "health_window_s": (int, float),
    "max_bundle_bytes": (int,),
    "staging_quota_bytes": (int,),
    "ca_file": (str,),
}


def parse_update_section(sec: Any) -> dict[str, Any]:
    """Validate the agent config's optional ``[update]`` table; raise ConfigError naming the key and the fix."""
    from device_agent.errors import ConfigError

    if sec is None:
        return {}
    if not isinstance(sec, Mapping):
        raise ConfigError("[update] must be a table")
    extra = set(sec) - set(UPDATE_CONFIG_KEYS)
    if extra:
        raise ConfigError(
            f"unknown key(s) {', '.join(sorted(extra))} in [update]. Known: {', '.join(UPDATE_CONFIG_KEYS)}"
        )
    out: dict[str, Any] = {}
    for key, types in UPDATE_CONFIG_KEYS.items():
        if key not in sec:
            continue
        raw = sec[key]
        if isinstance(raw, bool) or not isinstance(raw, types):
            raise ConfigError(f"[update] {key} must be a number, got {str(raw)[:40]!r}")
        if key == "ca_file":
            if not Path(str(raw)).is_file():
                raise ConfigError(
                    f"[update] ca_file {raw!r} does not exist; give the CA certificate (PEM) of your"
                    " bundle server"
                )
            out[key] = str(raw)
            continue
        v = float(raw)  # type: ignore[arg-type]  # an int or float, checked just above
        if key == "health_window_s" and not 0 <= v <= 3600:
            raise ConfigError(f"[update] health_window_s must be between 0 and 3600 seconds, got {raw}")
        if key != "health_window_s" and v < 1024:
            raise ConfigError(f"[update] {key} must be at least 1024 bytes, got {raw}")
        out[key] = v if key == "health_window_s" else int(v)
    return out


def _not_attached(bundle_dir: Path) -> bool:
    raise UpdateError("the updater is not attached to a running agent yet")


def updater_for_agent(config: Any, trusted_keys: tuple[bytes, ...]) -> Updater:
    """Build the agent's updater from its ``AgentConfig`` and recover the store (before any model loads)."""
    upd = (getattr(config, "extra", None) or {}).get("update", {})
    mq = None
    if config.mqtt is not None:
        m = config.mqtt
        mq = MqttSettings(
            host=m.host,
            port=m.port,
            username=m.username,
            password=m.password(),
            tls=m.tls,
            ca_file=str(m.ca_file) if m.ca_file else None,
            cert_file=str(m.cert_file) if m.cert_file else None,
            key_file=str(m.key_file) if m.key_file else None,
            client_id=f"{m.client_id or 'edgefleet-' + config.device_id}-ota"[
                :128
            ],  # never the daemon's own id
        )
    ucfg = UpdaterConfig(
        state_dir=Path(config.state_dir),
        policy=VerifyPolicy(
            trusted_keys=tuple(trusted_keys),
            allow_unsigned=bool(config.allow_unsigned),
            target=config.target,
            max_bytes=upd.get("max_bundle_bytes"),
        ),
        fallback_bundle=Path(config.bundle),
        health_window_s=upd.get("health_window_s"),
        staging_quota_bytes=upd.get("staging_quota_bytes"),
        device_id=config.device_id,
        mqtt=mq,
        ssl_context=ssl.create_default_context(cafile=upd["ca_file"]) if upd.get("ca_file") else None,
    )
    up = Updater(ucfg, switch=_not_attached)
    up.recover(report=False)
    up.seed_floor()
    up.check_active_slot()
    stale = up.store.remove_stale_partials()
    up.stale_partials_removed = len(stale)
    if stale:
        log.warning(
            "removed %d stale .partial drop(s) from %s (a flash stopped mid-copy): %s",
            len(stale),
            up.store.incoming_dir,
            ", ".join(p.name for p in stale[:5]),
        )
    return up


def attach_to_daemon(up: Updater, daemon: Any) -> None:
    """Wire the updater into a started ``device_agent.daemon.Daemon`` and start its worker.

    Switching goes through ``daemon.switch_bundle`` (verify, smoke inference, atomic swap); events through
    ``daemon.publish_event``; the deployment state goes into the retained status; deploy commands arrive
    through the daemon's cmd handler. Health during the window: the agent still serves the new slot.
    """

    def smoke(bundle_dir: Path) -> None:
        served = Path(daemon.agent.model.path)
        if served != Path(bundle_dir):
            raise UpdateError(f"the agent serves {str(served)!r}, not the new bundle, after the switch")
        smoke_inference(bundle_dir)  # an independent load from the slot on disk, besides the agent's own

    def health() -> bool:
        active = up.store.active_dir()
        return active is not None and Path(daemon.agent.model.path) == active

    def on_state(status: dict[str, Any]) -> None:
        daemon.status_deployment = status
        if daemon.publisher is not None:
            daemon.publisher.republish_status()

    def on_command(topic: str, payload: bytes) -> None:
        try:
            up.handle_command(payload)
        except CommandError as e:
            daemon.publish_event("command_rejected", str(e)[:500], {"topic": topic[:200]})
            raise  # the MQTT layer logs it with the payload cut short and counts it

    # The updater checks the anti-rollback floor itself (and must be able to roll back to the fallback).
    up.switch = lambda bundle_dir: daemon.switch_bundle(bundle_dir, enforce_floor=False)
    up.smoke = smoke
    up.health = health
    up.emit = lambda event, message, detail: daemon.publish_event(event, message, detail)
    up.on_state = on_state
    daemon.status_deployment = None if up.status()["state"] == "idle" else up.status()
    daemon.set_command_handler(on_command)
    up.report_pending()
    up.start()


__all__ = [
    "parse_update_section",
    "updater_for_agent",
    "attach_to_daemon",
    "smoke_predictor",
    "COMMAND_SCHEMA",
    "STATES",
    "UpdateError",
    "CommandError",
    "DeployCommand",
    "HttpSource",
    "MqttSource",
    "LocalSource",
    "MqttSettings",
    "UpdaterConfig",
    "Updater",
    "decode_command",
    "bundle_topic",
    "bundle_stream",
    "check_manifest",
    "http_fetch",
    "mqtt_fetch",
    "smoke_inference",
]
