"""Write bundles: model file(s), baseline.json, labels.txt, and manifest.json last; place them atomically.

A bundle is assembled in a staging folder next to its destination (same file system), verified with
``device_agent.formats.manifest.verify_bundle``, optionally signed, and only then renamed into place. What may
already be at the destination decides whether we may replace it (``check_destination``):

* nothing, or an empty folder: the new bundle goes in;
* a bundle of the same name and target with a LOWER version: replaced (an upgrade);
* the same name, target and version with byte-identical files (model, baseline, labels): replaced
  (re-running the same build is allowed; only the manifest's ``created_at`` and measured metrics change);
* anything else (a different bundle of the same version, a higher version, another model's bundle, a
  folder that is not a bundle): refused with a one-line error, and nothing already there is touched.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from device_agent.formats.manifest import (
    MANIFEST_FILE,
    NAME_RE,
    BundleError,
    FileEntry,
    Manifest,
    ModelEntry,
    ModelFormat,
    RuntimeName,
    TensorSpec,
    VerifyPolicy,
    file_entry,
    load_manifest,
    verify_bundle,
)
from toolchain.errors import ToolchainError

LABELS_FILE = "labels.txt"
BASELINE_FILE = "baseline.json"
ACCELERATED_FILE = "model_edgetpu.tflite"
EDGETPU_LOG_FILE = "edgetpu_compiler.log"


class PackageError(ToolchainError):
    """A bundle cannot be written or would overwrite a different bundle."""


def bundle_name(text: str) -> str:
    """Return a valid bundle name from free text (a model file stem): lowercase, [a-z0-9._-], <= 64 chars."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    s = s[:64] or "model"
    if not NAME_RE.match(s):
        s = "m" + s[:63]
    return s


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid bundle name, else raise PackageError."""
    if not NAME_RE.match(name):
        raise PackageError(
            f"bundle name {name!r} is invalid; use 1-64 lowercase letters, digits, '.', '_' or '-' (--name)"
        )
    return name


def utc_now() -> str:
    """Return the current UTC time as ``2026-11-27T11:00:00Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, doc: Any) -> None:
    """Write JSON (no NaN/Infinity) atomically."""
    _atomic_write(Path(path), (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())


def check_destination(dest: Path, name: str, version: int, target: str) -> str:
    """Decide before building whether ``dest`` may receive bundle ``name`` v``version`` for ``target``.

    Returns ``"new"``, ``"upgrade"`` (a lower version is there) or ``"same-version"`` (the final
    content check happens in ``place_bundle``). Raises PackageError when the destination holds
    something else.
    """
    dest = Path(dest)
    if not dest.exists():
        return "new"
    if not dest.is_dir():
        raise PackageError(f"output {str(dest)!r} exists and is not a folder; choose another --out")
    if not (dest / MANIFEST_FILE).exists():
        if any(dest.iterdir()):
            raise PackageError(
                f"output folder {str(dest)!r} is not empty and holds no bundle; choose another --out or "
                "empty it"
            )
        return "new"
    try:
        old = load_manifest(dest)
    except BundleError as e:
        raise PackageError(
            f"output {str(dest)!r} holds an unreadable bundle ({e}); choose another --out"
        ) from None
    if old.name != name or old.target != target:
        raise PackageError(
            f"output {str(dest)!r} holds bundle {old.name!r} for target {old.target!r}, not {name!r} for "
            f"{target!r};"
            " choose another --out"
        )
    if old.version > version:
        raise PackageError(
            f"output {str(dest)!r} holds {name!r} version {old.version}, newer than --version {version};"
            f" versions only increase: pass --version {old.version + 1} or another --out"
        )
    return "upgrade" if old.version < version else "same-version"


def _content(manifest: Manifest) -> dict[str, str]:
    return {f.path: f.sha256 for f in manifest.files}


def assemble_bundle(
    staging: Path,
    *,
    name: str,
    version: int,
    target: str,
    model_file: Path,
    model_format: ModelFormat,
    runtimes: Sequence[str],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    labels: Sequence[str],
    baseline: Mapping[str, Any],
    threads: int,
    metrics: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    accelerated_file: Path | None = None,
    edgetpu: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    input_layout: Mapping[str, str] | None = None,
    task: Mapping[str, Any] | None = None,
) -> Manifest:
    """Fill ``staging`` with the bundle's files and write manifest.json last; return the manifest."""
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    model_rel = "model." + model_format.value
    if Path(model_file).resolve() != (staging / model_rel).resolve():
        shutil.copyfile(model_file, staging / model_rel)
    rels = [model_rel]
    accel_rel = None
    if accelerated_file is not None:
        accel_rel = ACCELERATED_FILE
        if Path(accelerated_file).resolve() != (staging / accel_rel).resolve():
            shutil.copyfile(accelerated_file, staging / accel_rel)
        rels.append(accel_rel)
    for rel, src in (extra_files or {}).items():
        if Path(src).resolve() != (staging / rel).resolve():
            shutil.copyfile(src, staging / rel)
        rels.append(rel)
    write_json(staging / BASELINE_FILE, dict(baseline))
    _atomic_write(staging / LABELS_FILE, ("\n".join(labels) + "\n").encode())
    rels += [BASELINE_FILE, LABELS_FILE]
    files: list[FileEntry] = [file_entry(staging, rel) for rel in rels]
    manifest = Manifest(
        name=name,
        version=int(version),
        target=target,
        created_at=utc_now(),
        files=files,
        model=ModelEntry(model_rel, model_format, tuple(RuntimeName(r) for r in runtimes), accel_rel),
        inputs=list(inputs),
        outputs=list(outputs),
        labels=list(labels),
        preprocessing=dict(preprocessing or {"type": "none"}),
        baseline=BASELINE_FILE,
        metrics=dict(metrics or {}),
        threads=int(threads),
        edgetpu=dict(edgetpu) if edgetpu is not None else None,
        input_layout=dict(input_layout) if input_layout is not None else None,
        task=dict(task) if task is not None else None,
    )
    # Round-trip through the device's own parser so a bundle the agent would refuse never ships.
    Manifest.from_dict(json.loads(manifest.to_bytes()))
    _atomic_write(staging / MANIFEST_FILE, manifest.to_bytes())
    verify_bundle(staging, VerifyPolicy(allow_unsigned=True))
    return manifest


def staging_dir(dest: Path) -> Path:
    """Return a fresh hidden staging folder next to ``dest`` (same file system, so rename is atomic)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    os.chmod(path, 0o755)  # mkdtemp makes 0700; a bundle is meant to be read by the agent's user too
    return path


def place_bundle(staging: Path, dest: Path) -> str:
    """Move a finished bundle from ``staging`` to ``dest``; return ``new``, ``upgraded`` or ``rebuilt``.

    Re-checks the destination (another build may have finished meanwhile); a same-version bundle is
    replaced only when every listed file is byte-identical.
    """
    staging, dest = Path(staging), Path(dest)
    new = load_manifest(staging)
    mode = check_destination(dest, new.name, new.version, new.target)
    if mode == "same-version":
        old = load_manifest(dest)
        if _content(old) != _content(new):
            changed = sorted(
                p
                for p in set(_content(old)) | set(_content(new))
                if _content(old).get(p) != _content(new).get(p)
            )
            raise PackageError(
                f"output {str(dest)!r} holds a different {new.name!r} version {new.version} for {new.target}"
                f" (differs in {', '.join(changed)}); pass --version {new.version + 1} or another --out"
            )
    if dest.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / "bundle")
        try:
            os.replace(staging, dest)
        except OSError:
            os.replace(trash / "bundle", dest)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, dest)
    return {"new": "new", "upgrade": "upgraded", "same-version": "rebuilt"}[mode]


def discard(path: Path | None) -> None:
    """Remove a staging folder (quietly)."""
    if path is not None and Path(path).exists():
        shutil.rmtree(path, ignore_errors=True)


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Check before any work that folder ``path`` exists or can be created, and takes new files.

    Probes for real (creates the missing folders and a temporary file, then removes what it made), so
    read-only file systems, ``/proc`` and permissions are caught even when running as root. Raises
    PackageError with one line naming ``flag``, the path and the fix.
    """
    out = Path(path)
    shown = str(path)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == out:
            raise PackageError(
                f"{flag} {shown!r} is a file, not a folder; choose a folder (it is created if missing)"
            )
        raise PackageError(
            f"{flag} {shown!r} lies under {str(probe)!r}, which is a file, not a folder; choose another {flag}"
        )
    created: list[Path] = []
    stage = "created"
    try:
        missing = [out, *out.parents]
        missing = [p for p in missing if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
        stage = "written"
        fd, tmp = tempfile.mkstemp(prefix=".edgefleet-probe-", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise PackageError(
            f"{flag} {shown!r} cannot be {stage} ({why}); choose a folder you can write to"
        ) from None
    finally:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
    return out
