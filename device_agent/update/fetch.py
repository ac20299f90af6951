"""Fetching a bundle for an update: HTTP(S) with resume, retained chunks over MQTT, and unpacking.

Every fetch checks the manifest first (``check_manifest``: the hash the command names, the signature,
target, version and size) before any model byte arrives, caps sizes, and gives up after
``DOWNLOAD_STALL_S`` without progress. Errors are ``UpdateError`` with the reason the deployment
reports in ``deploy_failed``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError
from device_agent.formats.broker import BrokerSettings, new_client
from device_agent.formats.deploy import (
    SIGNATURE_MAX_BYTES,
    DeployCommand,
    HttpSource,
    LocalSource,
    MqttSource,
)
from device_agent.formats.manifest import (
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    SIGNATURE_FILE,
    BundleError,
    Manifest,
    VerifyPolicy,
    check_manifest_policy,
)
from device_agent.store import remove_tree

log = logging.getLogger(__name__)

# Tunables (module constants so tests can patch them).
DOWNLOAD_STALL_S = 30.0  # no byte for this long: the connection is dropped and the download resumed
DOWNLOAD_ATTEMPTS = 5  # connection attempts per file (each resumes where the last one stopped)
DOWNLOAD_RETRY_S = 1.0
DOWNLOAD_CHUNK_BYTES = 64 * 1024
DISK_MARGIN_BYTES = 1 << 20  # free space kept beyond the bundle's size


class UpdateError(AgentError):
    """A deployment failed; the message is the reason reported in ``deploy_failed``."""


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


def disk_full(e: OSError) -> bool:
    """True when a write failed because the disk (or the user's quota) is full."""
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
                if disk_full(e):
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


def mqtt_fetch(
    settings: BrokerSettings, src: MqttSource, size_bytes: int, dest: Path, stall_s: float | None = None
) -> Path:
    """Collect a bundle's retained chunks into ``dest/stream.bin`` and return that file.

    Each chunk must have its declared size (all but the last exactly ``chunk_bytes``); the stream ends
    exactly at manifest + signature + files. Nothing new for ``stall_s`` seconds fails the download.
    """
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
                    if disk_full(e)
                    else f"cannot write chunk ({e.strerror})"
                )
                progress.notify_all()
        except UpdateError as e:
            with lock:
                problems.append(str(e))
                progress.notify_all()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        client.subscribe(prefix + "+", qos=1)

    client = new_client(settings)
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


def fetch_bundle(
    src: HttpSource | MqttSource | LocalSource,
    cmd: DeployCommand | None,
    policy: VerifyPolicy,
    staging: Path,
    *,
    mqtt: BrokerSettings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    quota_bytes: int | None = None,
) -> Path:
    """Fetch a deployment's bundle into ``staging`` (a local drop is checked in place); return its folder."""
    if isinstance(src, LocalSource):
        path = Path(src.path)
        raw = (path / MANIFEST_FILE).read_bytes()[: MANIFEST_MAX_BYTES + 1]
        sig_p = path / SIGNATURE_FILE
        check_manifest(
            raw, sig_p.read_bytes()[:SIGNATURE_MAX_BYTES] if sig_p.is_file() else None, policy, None
        )
        return path
    assert cmd is not None
    check_space(staging.parent, cmd.size_bytes, quota_bytes)
    if isinstance(src, HttpSource):
        man = staging / MANIFEST_FILE
        http_fetch(src.url + MANIFEST_FILE, man, None, MANIFEST_MAX_BYTES, ssl_context=ssl_context)
        sig_p = staging / SIGNATURE_FILE
        has_sig = http_fetch(
            src.url + SIGNATURE_FILE,
            sig_p,
            None,
            SIGNATURE_MAX_BYTES,
            ssl_context=ssl_context,
            missing_ok=True,
        )
        m = check_manifest(man.read_bytes(), sig_p.read_bytes() if has_sig else None, policy, cmd)
        for f in m.files:
            url = src.url + urllib.parse.quote(f.path)
            http_fetch(url, staging / f.path, f.size_bytes, f.size_bytes, ssl_context=ssl_context)
        return staging
    if mqtt is None:
        raise UpdateError(
            "this agent has no broker settings to fetch chunks over MQTT; use an HTTP(S) source"
        )
    stream = mqtt_fetch(mqtt, src, cmd.size_bytes, staging / ".chunks")
    out = staging / "bundle"
    out.mkdir(exist_ok=True)
    unpack_stream(stream, src, out, policy, cmd)
    remove_tree(staging / ".chunks")
    return out


def check_space(staging_dir: Path, size_bytes: int, quota_bytes: int | None) -> None:
    """Refuse a bundle above the staging quota or larger than the free space (less a margin)."""
    if quota_bytes is not None and size_bytes > quota_bytes:
        raise UpdateError(f"bundle of {size_bytes} bytes exceeds the staging quota of {quota_bytes} bytes")
    try:
        free = shutil.disk_usage(staging_dir).free
    except OSError:
        return
    if free < size_bytes + DISK_MARGIN_BYTES:
        raise UpdateError(f"disk full in staging: {free} bytes free, the bundle needs {size_bytes}")


__all__ = [
    "UpdateError",
    "check_manifest",
    "disk_full",
    "http_fetch",
    "mqtt_fetch",
    "unpack_stream",
    "fetch_bundle",
    "check_space",
]
