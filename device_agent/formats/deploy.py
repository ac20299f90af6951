"""The OTA deploy command (schema 1) and its sources' wire format: what ``edgefleet deploy`` and
``edgefleet flash`` send and what the device's updater (``device_agent.update``) decodes.

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

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError
from device_agent.formats.manifest import MANIFEST_FILE, MANIFEST_MAX_BYTES, SIGNATURE_FILE, load_manifest
from device_agent.formats.strict import bounded_int, check_keys
from device_agent.formats.telemetry import TelemetryError, check_id, load_json

COMMAND_SCHEMA = 1
DEPLOYMENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SIGNATURE_MAX_BYTES = 4096
MQTT_CHUNK_MAX_BYTES = 256 * 1024
MQTT_BUNDLE_MAX_BYTES = 32 * 1024 * 1024  # chunked-over-MQTT is for small bundles; use HTTP(S) above this


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
    return check_keys(d, sorted(required), sorted(optional), where, error=CommandError)


def _int(v: Any, what: str, minimum: int = 0, maximum: int = 2**53) -> int:
    return bounded_int(v, what, minimum, maximum, error=CommandError)


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


__all__ = [
    "COMMAND_SCHEMA",
    "CommandError",
    "DeployCommand",
    "HttpSource",
    "MqttSource",
    "LocalSource",
    "Source",
    "decode_command",
    "bundle_topic",
    "bundle_stream",
]
