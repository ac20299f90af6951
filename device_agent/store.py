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
      update.json        the updater's persisted state machine (``device_agent.update.machine``)
      floor.json         the anti-rollback floor: the highest version ever activated (``RollbackFloor``)

Every pointer and state file is replaced atomically: write a temporary file, fsync it, rename it over
the old one, fsync the directory. A reader therefore sees the old or the new file, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError
from device_agent.formats.files import (
    FLOOR_FILE,
    FLOOR_SCHEMA,
    PARTIAL_SUFFIX,
    BundleId,
    StoreError,
    copy_file_synced,
    floor_doc,
    floor_version,
    fsync_dir,
    read_json,
)
from device_agent.formats.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, manifest_sha256

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
STALE_PARTIAL_S = 600.0  # a `.partial` drop untouched this long is a dead copy (a flash killed mid-way)
SLOTS = ("a", "b")


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


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if present (symlinks are unlinked, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


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

    def remove_stale_partials(self, max_age_s: float | None = None) -> list[Path]:
        """Remove ``incoming/*.partial`` drops nothing has written for ``max_age_s``; return them.

        A flash (local or ssh) killed mid-copy leaves its ``.partial`` folder behind, and nothing else
        ever removes it. A copy still in progress touches its files, so its newest mtime is recent.
        """
        age = STALE_PARTIAL_S if max_age_s is None else max_age_s
        if not self.incoming_dir.is_dir():
            return []
        now = time.time()
        removed = []
        for p in self.incoming_dir.iterdir():
            if not p.name.endswith(PARTIAL_SUFFIX) or p.is_symlink():
                continue
            if now - _newest_mtime(p) >= age:
                remove_tree(p)
                removed.append(p)
        if removed:
            fsync_dir(self.incoming_dir)
        return removed

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


def _newest_mtime(path: Path) -> float:
    """The newest modification time of a file or of anything inside a folder (0 when unreadable)."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    try:
                        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                    except OSError:
                        continue
        return newest
    except OSError:
        return 0.0


# --------------------------------------------------------------------------------------------------
# The anti-rollback floor


class RollbackError(AgentError):
    """A bundle below the anti-rollback floor was offered; the message says which and how to fix it."""


class RollbackFloor:
    """The highest bundle version this device ever activated, kept in ``bundles/floor.json``.

    Every activation path asks ``check`` before a bundle is installed or served (OTA, a local or ssh
    drop, the watched ``[agent] bundle`` path, SIGHUP) and calls ``raise_to`` once it serves. The floor
    only rises, and survives a damaged slot: the device then serves its configured bundle (the
    fallback, recorded in ``fallback`` when it was activated), but nothing below the floor is
    installed afterwards. The file is replaced atomically and fsynced like every store file.

    Refusals are counted (``refused_total``), logged at WARNING once per refused bundle and source
    (then at DEBUG), and kept for /v1/health and the status message. Thread-safe.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / FLOOR_FILE
        self._lock = threading.Lock()
        self.refused_total = 0
        self.last_refused: dict[str, Any] | None = None
        self.serving_below_floor = False
        self._logged: set[tuple[str, str]] = set()
        self._doc: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any]:
        if self._doc is None:
            try:
                doc = read_json(self.path)
            except StoreError as e:
                # A damaged floor file must not unlock rollbacks: the other store files still say
                # which versions were active (the caller raises the floor from them again).
                log.error("anti-rollback floor unreadable (%s); rebuilding it from the bundle store", e)
                doc = None
            self._doc = floor_doc(doc)
        return self._doc

    @property
    def exists(self) -> bool:
        """True when a floor was ever recorded on this device."""
        with self._lock:
            return bool(self._read())

    @property
    def version(self) -> int:
        """The floor (0 when nothing was activated yet)."""
        with self._lock:
            return floor_version(self._read())

    @property
    def fallback(self) -> BundleId | None:
        """The configured bundle last activated from ``[agent] bundle`` (the only one served below the floor)."""
        with self._lock:
            return BundleId.from_dict(self._read().get("fallback"))

    def raise_to(self, bundle: BundleId, *, fallback: bool = False) -> bool:
        """Record that ``bundle`` was activated; True when the floor rose. ``fallback``: it is the configured one."""
        with self._lock:
            doc = dict(self._read())
            cur = BundleId.from_dict(doc.get("highest"))
            changed = False
            if cur is None or bundle.version > cur.version:
                doc["highest"] = bundle.to_dict()
                changed = True
            if fallback and BundleId.from_dict(doc.get("fallback")) != bundle:
                doc["fallback"] = bundle.to_dict()
                changed = True
            if changed:
                doc["schema"] = FLOOR_SCHEMA
                doc["updated_at"] = time.time()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.path, doc)
                self._doc = doc
            rose = cur is None or bundle.version > cur.version
        if rose:
            log.info(
                "anti-rollback floor is now v%d (%s, sha256 %s)",
                bundle.version,
                bundle.name,
                bundle.sha256[:12],
            )
        return rose

    def record_fallback(self, bundle: BundleId) -> None:
        """Record the configured bundle as the fallback without raising the floor (first start, upgrades)."""
        with self._lock:
            doc = dict(self._read())
            if BundleId.from_dict(doc.get("fallback")) == bundle:
                return
            doc.update(schema=FLOOR_SCHEMA, fallback=bundle.to_dict(), updated_at=time.time())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, doc)
            self._doc = doc

    def allows(self, version: int) -> bool:
        """True when a bundle of ``version`` may be installed (at or above the floor)."""
        return version >= self.version

    def check(self, bundle: BundleId | None, version: int, source: str) -> None:
        """Raise RollbackError (counted, logged once) when ``version`` is below the floor.

        ``bundle`` identifies it when known (the sha256 makes the log-once key); ``source`` says which
        path offered it (``ota``, ``flash``, ``bundle path``, ``sighup``).
        """
        floor = self.version
        if version >= floor:
            return
        sha = bundle.sha256 if bundle else ""
        name = bundle.name if bundle else "?"
        msg = (
            f"bundle {name} v{version} is below this device's anti-rollback floor v{floor} (the highest"
            f" version it ever activated); refused. To roll back, re-sign the old model under a version"
            f" above {floor}"
        )
        with self._lock:
            self.refused_total += 1
            self.last_refused = {
                "version": version,
                "sha256": sha or None,
                "source": source,
                "ts": time.time(),
            }
            key = (source, sha or str(version))
            first = key not in self._logged
            if first:
                self._logged.add(key)
        (log.warning if first else log.debug)("%s: %s", source, msg)
        raise RollbackError(msg)

    def status(self) -> dict[str, Any]:
        """The floor for /v1/health and the status message (JSON-ready)."""
        with self._lock:
            doc = self._read()
            highest = BundleId.from_dict(doc.get("highest"))
            fb = BundleId.from_dict(doc.get("fallback"))
            return {
                "version": highest.version if highest else 0,
                "name": highest.name if highest else None,
                "sha256": highest.sha256 if highest else None,
                "fallback_version": fb.version if fb else None,
                "serving_below_floor": self.serving_below_floor,
                "refused_total": self.refused_total,
                "last_refused": dict(self.last_refused) if self.last_refused else None,
            }


__all__ = [
    "STORE_SCHEMA",
    "RollbackFloor",
    "RollbackError",
    "SLOTS",
    "ActiveRef",
    "BundleStore",
    "atomic_write_bytes",
    "atomic_write_json",
    "remove_tree",
]
