"""The store files the host writes onto a device, and the one bounded small-file read.

``edgefleet flash`` copies a bundle into the device's ``state_dir/bundles/incoming/<name>.partial``,
fsyncs it and renames it (``PARTIAL_SUFFIX``); it reads the anti-rollback floor (``floor.json``) to
refuse early what the agent would refuse anyway. The store itself (``device_agent.store``) uses the
same helpers, so both sides write a drop the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError

PARTIAL_SUFFIX = ".partial"  # a drop or slot being written; never served, removed on recovery
COPY_CHUNK_BYTES = 1 << 20
POINTER_MAX_BYTES = 64 * 1024
FLOOR_FILE = "floor.json"  # under state_dir/bundles
FLOOR_SCHEMA = 1


class StoreError(AgentError):
    """The bundle store cannot be read or written."""


class FileTooLargeError(OSError):
    """A small file (config, key, token, pointer) is larger than its cap; ``max_bytes`` says the cap."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(f"{str(path)!r} is larger than {max_bytes} bytes")
        self.max_bytes = max_bytes


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read a small file whole, reading at most ``max_bytes + 1`` bytes.

    Raises ``FileTooLargeError`` when the file holds more than ``max_bytes``, and the ``OSError`` of
    the open or read otherwise (``FileNotFoundError``, ``IsADirectoryError``...): the caller turns
    them into its own one-line message.
    """
    with open(path, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise FileTooLargeError(Path(path), max_bytes)
    return raw


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file_synced(src: Path, dst: Path) -> None:
    """Copy one regular file and fsync it (refusing symlinks)."""
    if src.is_symlink() or not src.is_file():
        raise StoreError(f"{str(src)!r} is not a regular file")
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(COPY_CHUNK_BYTES):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())


def read_json(path: Path, max_bytes: int = POINTER_MAX_BYTES) -> Any:
    """Read a small JSON store file (pointer, state, floor); None when it does not exist."""
    try:
        raw = read_bounded(path, max_bytes)
    except FileNotFoundError:
        return None
    except FileTooLargeError:
        raise StoreError(f"{str(path)!r} is larger than {max_bytes} bytes; it is not a store file") from None
    except OSError as e:
        raise StoreError(f"cannot read {str(path)!r} ({e.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StoreError(f"{str(path)!r} is not valid JSON; remove it to reset the bundle store") from None


@dataclass(frozen=True)
class BundleId:
    """The identity of a bundle for the floor: name, version and manifest sha256."""

    name: str
    version: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any) -> BundleId | None:
        if not isinstance(d, dict):
            return None
        v, name, sha = d.get("version"), d.get("name"), d.get("sha256")
        if isinstance(v, bool) or not isinstance(v, int) or not isinstance(name, str):
            return None
        if not isinstance(sha, str) or len(sha) != 64:
            return None
        return cls(name, v, sha)


def floor_doc(doc: Any) -> dict[str, Any]:
    """The floor document when ``doc`` is one of this schema, else an empty one (no floor)."""
    return doc if isinstance(doc, dict) and doc.get("schema") == FLOOR_SCHEMA else {}


def floor_version(doc: dict[str, Any]) -> int:
    """The anti-rollback floor a floor document records (0 when nothing was activated yet)."""
    b = BundleId.from_dict(doc.get("highest"))
    return b.version if b else 0


def read_floor_version(bundles_dir: Path) -> int:
    """The floor recorded in ``bundles_dir/floor.json`` (0 when none, or unreadable: the agent then
    rebuilds it from its store and refuses a lower bundle itself)."""
    try:
        return floor_version(floor_doc(read_json(bundles_dir / FLOOR_FILE)))
    except StoreError:
        return 0


__all__ = [
    "PARTIAL_SUFFIX",
    "FLOOR_FILE",
    "FLOOR_SCHEMA",
    "StoreError",
    "FileTooLargeError",
    "BundleId",
    "read_bounded",
    "read_json",
    "fsync_dir",
    "copy_file_synced",
    "floor_doc",
    "floor_version",
    "read_floor_version",
]
