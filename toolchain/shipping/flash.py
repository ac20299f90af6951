"""``edgefleet flash BUNDLE --to DEST``: put a verified bundle where an agent installs it.

DEST is one of:

* a local path: an agent's ``state_dir`` (on this machine, a mounted SD card or a device's root file
  system). The bundle is copied into ``<state_dir>/bundles/incoming/<drop>.partial`` (fsync) and renamed
  to ``<drop>``; a running agent notices the complete drop within about a second and deploys it through
  the same verified, atomic path as an over-the-air update (an agent that is not running does so at
  its next start).
* ``ssh://user@host[:port]/path/to/state_dir``: the same drop made with the system's ``ssh`` and ``scp``
  (``rsync`` when present on both ends): copy into ``.partial``, then ``mv`` on the device, which is
  the agent's signal to deploy.
* ``mqtt://[user:pass@]broker[:port]/<fleet>/<device_id>`` (or ``/<fleet>`` for the whole fleet; ``mqtts://``
  for TLS): a deploy command over the air. The bundle travels as retained chunks on the broker, or
  from ``--url`` (a web server that serves the bundle folder, e.g. ``edgefleet serve``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from device_agent.formats.deploy import DeployCommand, HttpSource, MqttSource, bundle_stream, bundle_topic
from device_agent.formats.files import PARTIAL_SUFFIX, copy_file_synced, fsync_dir, read_floor_version
from device_agent.formats.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    VerifyPolicy,
    manifest_sha256,
    verify_bundle,
)
from device_agent.formats.telemetry import TelemetryError, check_id, decode_event, fleet_topic, topic
from toolchain.errors import ToolchainError

CHUNK_BYTES = 64 * 1024
SSH_TIMEOUT_S = 120.0
WAIT_POLL_S = 0.25
MQTT_CONNECT_TIMEOUT_S = 10.0


class FlashError(ToolchainError):
    """A bundle cannot be flashed to the destination."""


@dataclass(frozen=True)
class LocalDest:
    state_dir: Path


@dataclass(frozen=True)
class SshDest:
    user: str | None
    host: str
    port: int | None
    path: str

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class MqttDest:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    fleet: str
    device_id: str | None
    ca_file: str | None = None


Dest = LocalDest | SshDest | MqttDest


def parse_destination(dest: str) -> Dest:
    """Parse ``--to``: a local path, ``ssh://user@host[:port]/path`` or ``mqtt://broker[:port]/<fleet>[/<device>]``."""
    if dest.startswith("ssh://"):
        parts = urlsplit(dest)
        if not parts.hostname or not parts.path or parts.path == "/":
            raise FlashError(f"--to {dest!r}: use ssh://user@host[:port]/path/to/state_dir")
        try:
            port = parts.port
        except ValueError:
            raise FlashError(f"--to {dest!r} has an invalid port") from None
        return SshDest(
            unquote(parts.username) if parts.username else None, parts.hostname, port, unquote(parts.path)
        )
    if dest.startswith(("mqtt://", "mqtts://")):
        parts = urlsplit(dest)
        segs = [s for s in parts.path.split("/") if s]
        if not parts.hostname or len(segs) not in (1, 2):
            raise FlashError(
                f"--to {dest!r}: use mqtt://broker[:port]/<fleet>/<device_id> (or /<fleet> for all)"
            )
        try:
            fleet = check_id(segs[0], "fleet")
            device = check_id(segs[1], "device_id") if len(segs) == 2 else None
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except TelemetryError as e:
            raise FlashError(f"--to {dest!r}: {e}") from None
        except ValueError:
            raise FlashError(f"--to {dest!r} has an invalid port") from None
        return MqttDest(
            parts.hostname,
            port,
            parts.scheme == "mqtts",
            parts.username and unquote(parts.username),
            parts.password and unquote(parts.password),
            fleet,
            device,
        )
    if "://" in dest:
        raise FlashError(
            f"--to {dest!r}: unknown scheme. Use a path, ssh://user@host/path or mqtt://broker/fleet/device"
        )
    return LocalDest(Path(dest))


def check_bundle(bundle: Path, public_key: Path | None) -> Manifest:
    """Verify the bundle on the host before sending it (every hash; the signature with ``public_key``)."""
    from toolchain.shipping.signing import load_public_key

    keys = (load_public_key(public_key),) if public_key else ()
    return verify_bundle(bundle, VerifyPolicy(trusted_keys=keys, allow_unsigned=not keys))


def drop_name(bundle: Path, m: Manifest) -> str:
    """Return a drop folder name: ``<name>-v<version>-<sha12>``."""
    return f"{m.name}-v{m.version}-{manifest_sha256(bundle)[:12]}"


def _bundle_files(bundle: Path, m: Manifest) -> list[str]:
    names = [MANIFEST_FILE] + ([SIGNATURE_FILE] if (bundle / SIGNATURE_FILE).is_file() else [])
    return names + [f.path for f in m.files]


def copy_clean(bundle: Path, m: Manifest, out: Path) -> None:
    """Copy only manifest.json, manifest.sig and the listed files (fsynced) into ``out``."""
    out.mkdir(parents=True)
    dirs = {out}
    for rel in _bundle_files(bundle, m):
        dst = out / rel
        if dst.parent not in dirs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(dst.parent)
        copy_file_synced(bundle / rel, dst)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


# --------------------------------------------------------------------------------------------------
# local path


def flash_local(bundle: Path, m: Manifest, state_dir: Path) -> Path:
    """Drop the bundle into ``state_dir/bundles/incoming`` atomically; return the drop's path."""
    if not state_dir.is_dir():
        raise FlashError(
            f"--to {str(state_dir)!r} is not a directory; pass the agent's [agent] state_dir (create it first)"
        )
    incoming = state_dir / "bundles" / "incoming"
    floor = read_floor_version(state_dir / "bundles")  # the agent refuses it too; say so now
    if m.version < floor:
        raise FlashError(
            f"bundle {m.name} v{m.version} is below the device's anti-rollback floor v{floor} (the highest"
            f" version it ever activated); re-sign the model under a version of at least {floor}"
        )
    try:
        incoming.mkdir(parents=True, exist_ok=True)
        name = drop_name(bundle, m)
        final = incoming / name
        partial = incoming / (name + PARTIAL_SUFFIX)
        for p in (partial, final):
            if p.exists():
                shutil.rmtree(p)
        copy_clean(bundle, m, partial)
        os.rename(partial, final)
        fsync_dir(incoming)
    except OSError as e:
        raise FlashError(
            f"cannot write into {str(incoming)!r} ({e.strerror}); check permissions and free space"
        ) from None
    return final


def wait_local(state_dir: Path, sha256: str, drop: Path, timeout_s: float) -> dict[str, Any]:
    """Wait until the agent consumed the drop; return the update state it recorded."""
    deadline = time.monotonic() + timeout_s
    update = state_dir / "bundles" / "update.json"
    while time.monotonic() < deadline:
        if not drop.exists():
            doc = _read_json(update)
            if (
                doc
                and doc.get("state") in ("committed", "failed")
                and (doc.get("new") or {}).get("sha256") == sha256
            ):
                return doc
        time.sleep(WAIT_POLL_S)
    raise FlashError(
        f"no agent installed the bundle within {timeout_s:g} s; is edgefleet-agent running with state_dir {str(state_dir)!r}?"
    )


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --------------------------------------------------------------------------------------------------
# ssh://


def _ssh_base(dest: SshDest, options: Sequence[str]) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes"]
    if dest.port:
        cmd += ["-p", str(dest.port)]
    for o in options:
        cmd += ["-o", o]
    return cmd + [dest.login]


def _run(cmd: list[str], what: str) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=SSH_TIMEOUT_S)
    except FileNotFoundError:
        raise FlashError(f"{cmd[0]!r} is not installed; install openssh-client") from None
    except subprocess.TimeoutExpired:
        raise FlashError(f"{what} timed out after {SSH_TIMEOUT_S:g} s") from None
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        hint = ""
        if "Permission denied" in err or "Host key verification failed" in err:
            hint = "; set up key-based login (see docs/ota.md)"
        raise FlashError(f"{what} failed: {err}{hint}")
    return r.stdout


def flash_ssh(bundle: Path, m: Manifest, dest: SshDest, ssh_options: Sequence[str] = ()) -> str:
    """Copy the bundle into the device's drop box over ssh; return the remote drop path."""
    name = drop_name(bundle, m)
    incoming = dest.path.rstrip("/") + "/bundles/incoming"
    partial, final = f"{incoming}/{name}{PARTIAL_SUFFIX}", f"{incoming}/{name}"
    ssh = _ssh_base(dest, ssh_options)
    q = shlex.quote
    _run(
        ssh
        + [
            f"test -d {q(dest.path)} || {{ echo 'no such directory: {dest.path}' >&2; exit 3; }};"
            f" mkdir -p {q(incoming)} && rm -rf {q(partial)} {q(final)}"
        ],
        f"ssh {dest.login}",
    )
    with tempfile.TemporaryDirectory(prefix="edgefleet-flash-") as tmp:
        clean = Path(tmp) / name
        copy_clean(bundle, m, clean)
        if shutil.which("rsync") and _remote_has(ssh, "rsync"):
            rsh = " ".join(shlex.quote(x) for x in ssh[:-1])
            _run(["rsync", "-a", "--partial", "-e", rsh, f"{clean}/", f"{dest.login}:{partial}/"], "rsync")
        else:
            scp = ["scp", "-B", "-q", "-r"] + (["-P", str(dest.port)] if dest.port else [])
            for o in ssh_options:
                scp += ["-o", o]
            _run(scp + [str(clean), f"{dest.login}:{partial}"], "scp")
    _run(ssh + [f"sync; mv {q(partial)} {q(final)} && sync"], f"ssh {dest.login} (rename)")
    return final


def _remote_has(ssh: list[str], prog: str) -> bool:
    try:
        r = subprocess.run(ssh + [f"command -v {prog}"], capture_output=True, timeout=SSH_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def wait_ssh(
    dest: SshDest, sha256: str, remote_drop: str, timeout_s: float, ssh_options: Sequence[str] = ()
) -> dict:
    """Wait until the remote agent consumed the drop; return its update state."""
    ssh = _ssh_base(dest, ssh_options)
    update = dest.path.rstrip("/") + "/bundles/update.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = _run(
            ssh
            + [
                f"test -e {shlex.quote(remote_drop)} && echo PENDING || cat {shlex.quote(update)} 2>/dev/null"
                " || true"
            ],
            f"ssh {dest.login}",
        )
        if not out.startswith("PENDING"):
            try:
                doc = json.loads(out)
            except ValueError:
                doc = None
            if (
                isinstance(doc, dict)
                and doc.get("state") in ("committed", "failed")
                and (doc.get("new") or {}).get("sha256") == sha256
            ):
                return doc
        time.sleep(max(WAIT_POLL_S, 1.0))
    raise FlashError(
        f"the agent on {dest.host} did not install the bundle within {timeout_s:g} s; is it running?"
    )


# --------------------------------------------------------------------------------------------------
# mqtt://


def mqtt_connect(dest: MqttDest, client_id: str | None = None) -> Any:
    """Connect a paho client to the broker (loop started); raise FlashError when unreachable or refused.

    MQTT 5 first: only in MQTT 5 does a broker say in the PUBACK that it refused a publish (an ACL that
    does not let this user write commands); in MQTT 3.1.1 Mosquitto acknowledges a refused publish like
    an accepted one. A broker that answers "unsupported protocol version" (amqtt) gets MQTT 3.1.1.
    Publish with ``publish_checked``, which turns a refusal into a FlashError.
    """
    from device_agent.formats.broker import BrokerSettings, new_client

    cid = client_id or f"edgefleet-host-{uuid.uuid4().hex[:8]}"
    settings = BrokerSettings(
        dest.host,
        dest.port,
        username=dest.username or None,
        password=dest.password,
        tls=bool(dest.tls or dest.ca_file),
        ca_file=dest.ca_file,
        client_id=cid,
    )
    for proto in ("5", "3.1.1"):
        client = new_client(settings, proto)
        client.user_data_set({"refused": {}})
        connected = threading.Event()
        answer: dict[str, Any] = {}

        def on_connect(
            c: Any,
            u: Any,
            f: Any,
            rc: Any,
            p: Any = None,
            answer: dict[str, Any] = answer,
            ev: Any = connected,
        ) -> None:
            answer["rc"] = rc
            ev.set()

        client.on_connect = on_connect
        client.on_publish = _record_refusal
        try:
            client.connect(dest.host, dest.port, keepalive=30)
        except OSError as e:
            raise FlashError(
                f"cannot reach MQTT broker {dest.host}:{dest.port} ({e}); check the mqtt:// URL"
            ) from None
        client.loop_start()
        connected.wait(MQTT_CONNECT_TIMEOUT_S)
        rc = answer.get("rc")
        if rc is not None and not rc.is_failure:
            return client
        client.loop_stop()
        if proto == "5" and rc is not None and "protocol" in str(rc).lower():
            continue  # an MQTT 3.1.1-only broker
        why = f" ({rc})" if rc is not None else ""
        raise FlashError(
            f"MQTT broker {dest.host}:{dest.port} did not accept the connection{why}; check credentials"
        )
    raise FlashError(f"MQTT broker {dest.host}:{dest.port} speaks neither MQTT 5 nor 3.1.1")


def _record_refusal(client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any = None) -> None:
    if getattr(reason_code, "is_failure", False):
        userdata["refused"][mid] = str(reason_code)


def publish_checked(client: Any, topic_name: str, payload: bytes, retain: bool = False) -> Any:
    """Publish with QoS 1 and wait for the PUBACK; raise FlashError when the broker refused the message."""
    info = client.publish(topic_name, payload, qos=1, retain=retain)
    info.wait_for_publish(30)
    check_published(client, [(topic_name, info)])
    return info


def check_published(client: Any, infos: Sequence[tuple[str, Any]]) -> None:
    """Raise FlashError for the first of ``(topic, info)`` the broker refused (MQTT 5 reason code)."""
    refused = client.user_data_get()["refused"]
    for topic_name, info in infos:
        if info.mid in refused:
            raise FlashError(
                f"the broker refused the message on {topic_name} ({refused[info.mid]}): this MQTT user may not"
                " write there. Use the operator's credentials (the collector user of 'edgefleet fleet"
                " broker-config')"
            )


def publish_chunks(client: Any, fleet: str, bundle: Path, chunk_bytes: int = CHUNK_BYTES) -> MqttSource:
    """Publish a bundle as retained chunks (QoS 1) and return the command's source."""
    files, manifest_bytes, signature_bytes = bundle_stream(bundle)
    sha = manifest_sha256(bundle)
    prefix = bundle_topic(fleet, sha)
    index, buf, infos = 0, b"", []

    def send(data: bytes) -> None:
        nonlocal index
        name = f"{prefix}/{index}"
        infos.append((name, client.publish(name, data, qos=1, retain=True)))
        index += 1

    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(chunk_bytes - len(buf)):
                buf += chunk
                if len(buf) == chunk_bytes:
                    send(buf)
                    buf = b""
    if buf:
        send(buf)
    for _, info in infos:
        info.wait_for_publish(30)
    check_published(client, infos)
    return MqttSource(prefix, index, chunk_bytes, manifest_bytes, signature_bytes)


def clear_chunks(client: Any, src: MqttSource) -> None:
    """Remove a bundle's retained chunks from the broker (an empty retained message deletes one)."""
    infos = [client.publish(f"{src.topic}/{i}", b"", qos=1, retain=True) for i in range(src.chunks)]
    for info in infos:
        info.wait_for_publish(30)


def make_command(
    bundle: Path,
    m: Manifest,
    source: HttpSource | MqttSource,
    devices: Sequence[str] | None = None,
    deployment_id: str | None = None,
) -> DeployCommand:
    """Build the deploy command for a bundle."""
    dep = deployment_id or f"d-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    return DeployCommand(
        dep,
        m.name,
        m.version,
        manifest_sha256(bundle),
        sum(f.size_bytes for f in m.files),
        source,
        tuple(devices) if devices is not None else None,
    )


class EventWatch:
    """Collect ``deployed``/``deploy_failed`` events for one deployment from a fleet's events topics."""

    def __init__(self, client: Any, fleet: str, deployment_id: str) -> None:
        self.deployment_id = deployment_id
        self.results: dict[str, tuple[str, dict[str, Any]]] = {}
        self.cond = threading.Condition()
        self.fleet = fleet
        self.subscribed = threading.Event()
        granted: list[Any] = []

        def on_subscribe(c: Any, u: Any, mid: int, codes: Any, p: Any = None) -> None:
            granted.extend(codes)
            self.subscribed.set()

        client.on_subscribe = on_subscribe
        client.message_callback_add(f"edgefleet/{fleet}/+/events", self._on_event)
        client.subscribe(f"edgefleet/{fleet}/+/events", qos=1)
        if not self.subscribed.wait(MQTT_CONNECT_TIMEOUT_S):
            raise FlashError("the MQTT broker did not confirm the subscription to device events")
        if any(getattr(rc, "is_failure", False) for rc in granted):
            raise FlashError(
                f"the broker refused the subscription to edgefleet/{fleet}/+/events ({granted[0]}): this MQTT"
                " user may not read device events. Use the operator's credentials"
            )

    def _on_event(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            ev = decode_event(bytes(msg.payload))
        except TelemetryError:
            return
        if (
            ev.event not in ("deployed", "deploy_failed")
            or ev.detail.get("deployment_id") != self.deployment_id
        ):
            return
        with self.cond:
            self.results[ev.device_id] = (ev.event, dict(ev.detail, message=ev.message))
            self.cond.notify_all()

    def wait(
        self,
        devices: Sequence[str],
        timeout_s: float,
        stop: Callable[[dict[str, tuple[str, dict[str, Any]]]], bool] | None = None,
    ) -> dict:
        """Wait until every device answered, ``stop(results)`` is true, or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                got = {d: self.results[d] for d in devices if d in self.results}
                if len(got) == len(devices) or (stop is not None and stop(got)):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return got
                self.cond.wait(min(left, 0.5))


def flash_mqtt(
    bundle: Path,
    m: Manifest,
    dest: MqttDest,
    url: str | None = None,
    wait_s: float | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Publish a deploy command (with retained chunks unless ``url``); wait for the result when asked."""
    client = mqtt_connect(dest)
    try:
        src: HttpSource | MqttSource
        if url:
            src = HttpSource(url if url.endswith("/") else url + "/")
        else:
            src = publish_chunks(client, dest.fleet, bundle, chunk_bytes)
        cmd = make_command(bundle, m, src, devices=None)
        watch = EventWatch(client, dest.fleet, cmd.deployment_id) if wait_s and dest.device_id else None
        t = topic(dest.fleet, dest.device_id, "cmd") if dest.device_id else fleet_topic(dest.fleet, "cmd")
        publish_checked(client, t, cmd.encode())
        out: dict[str, Any] = {"deployment_id": cmd.deployment_id, "topic": t, "source": src.to_dict()}
        if watch is not None and dest.device_id:
            got = watch.wait([dest.device_id], float(wait_s or 0))
            if dest.device_id not in got:
                raise FlashError(
                    f"device {dest.device_id!r} did not report within {wait_s:g} s (deployment {cmd.deployment_id});"
                    " is it online? See 'edgefleet fleet status'"
                )
            out["result"] = got[dest.device_id]
            if isinstance(src, MqttSource):
                clear_chunks(client, src)
        return out
    finally:
        client.loop_stop()
        client.disconnect()
