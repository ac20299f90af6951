"""The device's bundle store: two slots, an atomic active pointer, staging and an incoming drop box.

Layout under the agent's ``state_dir``::

    bundles/
      active.json        the active pointer {"schema", "slot", "name", "version", "sha256"}; slot null means
                         "no store bundle: serve the bundle named in the agent config"
      slots/a/, slots/b/ two complete, verified bundles; one active, the other the previous one
      slots/<x>.partial/ a slot being written (never served; removed on recovery)
      staging/           downloads in progress (removed when a deployment ends, and on recovery)
      incoming/          drop box for ``edgefleet flash`` (local path, ssh://): a writer copies into
                         ``<name>.partial`` and renames it when complete; the agent picks it up
      update.json        the updater's persisted state machine (``device_agent.updater``)

Every pointer and state file is replaced atomically: write a temporary file, fsync it, rename it over
the old one, fsync the directory. A reader therefore sees the old or the new file, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.bundle import MANIFEST_FILE, SIGNATURE_FILE, Manifest, manifest_sha256
from device_agent.errors import AgentError

STORE_SCHEMA = 1
SLOTS = ("a", "b")
PARTIAL_SUFFIX = ".partial"
COPY_CHUNK_BYTES = 1 << 20
POINTER_MAX_BYTES = 64 * 1024


class StoreError(AgentError):
    """The bundle store cannot be read or written."""


@dataclass(frozen=True)
class ActiveRef:
    """What the active pointer names: a slot and the identity of the bundle in it."""

    slot: str
    name: str
    version: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any) -> ActiveRef:
        if not isinstance(d, dict) or d.get("slot") not in SLOTS:
            raise StoreError(f"active pointer {str(d)[:80]!r} names no valid slot")
        v = d.get("version")
        if isinstance(v, bool) or not isinstance(v, int) or not isinstance(d.get("name"), str):
            raise StoreError("active pointer has no valid name/version")
        sha = d.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise StoreError("active pointer has no valid sha256")
        return cls(d["slot"], d["name"], v, sha)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` with a JSON document atomically."""
    atomic_write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())


def read_json(path: Path, max_bytes: int = POINTER_MAX_BYTES) -> Any:
    """Read a small JSON file written by ``atomic_write_json``; None when it does not exist."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read {str(path)!r} ({e.strerror})") from None
    if len(raw) > max_bytes:
        raise StoreError(f"{str(path)!r} is larger than {max_bytes} bytes; it is not a store file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StoreError(f"{str(path)!r} is not valid JSON; remove it to reset the bundle store") from None


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if present (symlinks are unlinked, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def copy_file_synced(src: Path, dst: Path) -> None:
    """Copy one regular file and fsync it (refusing symlinks)."""
    if src.is_symlink() or not src.is_file():
        raise StoreError(f"{str(src)!r} is not a regular file")
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(COPY_CHUNK_BYTES):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())


class BundleStore:
    """The slots, active pointer, staging area and drop box under ``state_dir/bundles``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "bundles"
        self.slots_dir = self.root / "slots"
        self.staging_dir = self.root / "staging"
        self.incoming_dir = self.root / "incoming"
        self.pointer_path = self.root / "active.json"
        self.update_path = self.root / "update.json"

    def ensure(self) -> None:
        """Create the store's folders."""
        try:
            for d in (self.root, self.slots_dir, self.staging_dir, self.incoming_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the bundle store in {str(self.root)!r} ({e.strerror}); check [agent] state_dir"
            ) from None

    # ------------------------------------------------------------------ active pointer

    def active(self) -> ActiveRef | None:
        """Return the active pointer, or None when no store bundle is active."""
        doc = read_json(self.pointer_path)
        if doc is None or doc.get("slot") is None:
            return None
        return ActiveRef.from_dict(doc)

    def slot_path(self, slot: str) -> Path:
        """Return the folder of a slot."""
        if slot not in SLOTS:
            raise StoreError(f"unknown slot {slot!r}. Known: {', '.join(SLOTS)}")
        return self.slots_dir / slot

    def active_dir(self) -> Path | None:
        """Return the folder of the active store bundle, or None."""
        ref = self.active()
        return self.slot_path(ref.slot) if ref else None

    def inactive_slot(self) -> str:
        """Return the slot an update may overwrite (never the active one)."""
        ref = self.active()
        return "b" if ref is not None and ref.slot == "a" else "a"

    def set_active(self, ref: ActiveRef | None) -> None:
        """Point the store at ``ref`` (None: no store bundle), atomically."""
        self.ensure()
        doc: dict[str, Any] = {"schema": STORE_SCHEMA, "slot": None}
        if ref is not None:
            doc.update(ref.to_dict())
        atomic_write_json(self.pointer_path, doc)

    # ------------------------------------------------------------------ slots

    def write_slot(self, slot: str, src: Path, manifest: Manifest) -> Path:
        """Copy a verified bundle into ``slot`` (never the active one): a .partial folder, fsync, rename.

        Only manifest.json, manifest.sig and the files the manifest lists are copied.
        """
        ref = self.active()
        if ref is not None and ref.slot == slot:
            raise StoreError(f"slot {slot!r} is active; an update writes the inactive slot only")
        self.ensure()
        final = self.slot_path(slot)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        remove_tree(partial)
        remove_tree(final)
        fsync_dir(self.slots_dir)
        partial.mkdir()
        names = [MANIFEST_FILE] + ([SIGNATURE_FILE] if (src / SIGNATURE_FILE).is_file() else [])
        names += [f.path for f in manifest.files]
        made: set[Path] = {partial}
        for rel in names:
            dst = partial / rel
            if dst.parent not in made:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made.add(dst.parent)
            copy_file_synced(src / rel, dst)
        for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        os.rename(partial, final)
        fsync_dir(self.slots_dir)
        return final

    def remove_slot(self, slot: str) -> None:
        """Delete an inactive slot's folder."""
        ref = self.active()
        if ref is not None and ref.slot == slot:
            raise StoreError(f"slot {slot!r} is active and cannot be removed")
        remove_tree(self.slot_path(slot))

    def ref_for(self, slot: str, manifest: Manifest) -> ActiveRef:
        """Return the pointer for a written slot."""
        return ActiveRef(slot, manifest.name, manifest.version, manifest_sha256(self.slot_path(slot)))

    # ------------------------------------------------------------------ staging and drop box

    def staging_for(self, key: str) -> Path:
        """Return (and create) a staging folder for one deployment."""
        self.ensure()
        d = self.staging_dir / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def clear_staging(self) -> None:
        """Remove every staging folder and partial slot (after a deployment, and at start-up)."""
        if self.staging_dir.is_dir():
            for p in self.staging_dir.iterdir():
                remove_tree(p)
        for slot in SLOTS:
            remove_tree(self.slots_dir / (slot + PARTIAL_SUFFIX))

    def pending_incoming(self) -> list[Path]:
        """Return complete drops in ``incoming/`` (oldest first); ``*.partial`` ones are still being copied."""
        if not self.incoming_dir.is_dir():
            return []
        found = [
            p
            for p in self.incoming_dir.iterdir()
            if p.is_dir()
            and not p.is_symlink()
            and not p.name.endswith(PARTIAL_SUFFIX)
            and not p.name.startswith(".")
        ]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


__all__ = [
    "STORE_SCHEMA",
    "SLOTS",
    "StoreError",
    "ActiveRef",
    "BundleStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_json",
    "fsync_dir",
    "remove_tree",
    "copy_file_synced",
]
