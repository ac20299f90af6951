"""Captured samples in the fleet store: a per-device summary and the export to ``.npz`` or ``.csv``.

The export lists samples in capture order: by capture time (the device's clock, millisecond
precision), then device, then the samples message's ``seq`` and the sample's place in it, so the
samples of one request keep their order. ``x`` keeps the dtype and shape the device received,
bit-exact; ``y`` is the true class index sent through ``POST /v1/feedback`` or -1.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.fleet.queries import parse_time
from toolchain.fleet.storage import Store

FETCH_ROWS = 500  # samples read per query while exporting (bounded memory besides the output)
ORDER = "s.ts, s.fleet, s.device_id, s.seq, s.pos"


class SamplesError(ToolchainError):
    """The samples cannot be listed or exported as asked (nothing matches, mixed shapes, bad --out)."""


@dataclass(frozen=True)
class Selection:
    """Which samples: one device (``fleet/device`` or ``device``), since a time, alerting devices only."""

    device: str | None = None
    since: str | float | None = None
    only_alerting: bool = False

    def where(self, store: Store) -> tuple[str, list[Any]]:
        """The WHERE clause (on ``samples s``) and its arguments."""
        sql: list[str] = ["1 = 1"]
        args: list[Any] = []
        t0 = parse_time(self.since)
        if t0 is not None:
            sql.append("s.ts >= ?")
            args.append(t0)
        if self.device:
            if "/" in self.device:
                fleet, dev = self.device.split("/", 1)
                sql.append("s.fleet = ? AND s.device_id = ?")
                args += [fleet, dev]
            else:
                sql.append("s.device_id = ?")
                args.append(self.device)
        if self.only_alerting:
            sql.append(
                "EXISTS (SELECT 1 FROM drift_state d WHERE d.fleet = s.fleet AND d.device_id = s.device_id"
                " AND d.state = 'alert')"
            )
        return " AND ".join(sql), args

    def describe(self) -> str:
        parts = []
        if self.device:
            parts.append(f"device {self.device}")
        if self.since not in (None, "", "all"):
            parts.append(f"since {self.since}")
        if self.only_alerting:
            parts.append("devices in drift alert")
        return ", ".join(parts) or "any device, any time"


def summary(store: Store, sel: Selection) -> list[dict[str, Any]]:
    """One row per device: samples, labelled, first/last capture time, model versions."""
    where, args = sel.where(store)
    rows = store.query(
        "SELECT s.fleet, s.device_id, COUNT(*), COUNT(l.sample_id), MIN(s.ts), MAX(s.ts)"
        " FROM samples s LEFT JOIN sample_labels l ON l.fleet = s.fleet AND l.device_id = s.device_id"
        f" AND l.sample_id = s.sample_id WHERE {where} GROUP BY s.fleet, s.device_id"
        " ORDER BY s.fleet, s.device_id",
        args,
    )
    versions: dict[tuple[str, str], list[str]] = {}
    for f, d, v in store.query(
        f"SELECT DISTINCT s.fleet, s.device_id, s.model_version FROM samples s WHERE {where}", args
    ):
        versions.setdefault((f, d), []).append("-" if v is None else str(v))
    orphans = {
        (str(f), str(d)): int(n)
        for f, d, n in store.query(
            "SELECT l.fleet, l.device_id, COUNT(*) FROM sample_labels l WHERE NOT EXISTS (SELECT 1 FROM"
            " samples s WHERE s.fleet = l.fleet AND s.device_id = l.device_id AND s.sample_id = l.sample_id)"
            " GROUP BY l.fleet, l.device_id"
        )
    }
    return [
        {
            "fleet": str(f),
            "device_id": str(d),
            "samples": int(n),
            "labelled": int(nl),
            "first_ts": float(t0),
            "last_ts": float(t1),
            "model_versions": sorted(versions.get((f, d), []), key=_version_key),
            "labels_without_sample": orphans.get((str(f), str(d)), 0),
        }
        for f, d, n, nl, t0, t1 in rows
    ]


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (1 << 60, v)


@dataclass
class Exported:
    """What an export wrote."""

    path: str
    samples: int
    labelled: int
    devices: list[str]
    dtype: str
    shape: list[int]
    labels: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export(
    store: Store, sel: Selection, out: str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> Exported:
    """Write the selected samples to ``out`` (``.npz``, or ``.csv`` for 1-D inputs); raise SamplesError."""
    path = Path(out)
    kind = path.suffix.lower()
    if kind not in (".npz", ".csv"):
        raise SamplesError(f"--out {str(out)!r} must end in .npz (any input) or .csv (1-D inputs only)")
    if not path.parent.is_dir():
        raise SamplesError(f"directory {str(path.parent)!r} for --out does not exist; create it")
    where, args = sel.where(store)
    meta = store.query(
        f"SELECT s.id, s.dtype, s.shape, s.model_sha256 FROM samples s WHERE {where} ORDER BY {ORDER}",
        args,
    )
    if not meta:
        raise SamplesError(
            f"no captured samples match ({sel.describe()}); see 'edgefleet fleet samples list'"
        )
    kinds = sorted({(str(dt), str(sh)) for _, dt, sh, _ in meta})
    if len(kinds) > 1:
        shown = ", ".join(f"{dt}{tuple(json.loads(sh))}" for dt, sh in kinds[:4])
        raise SamplesError(
            f"the selected samples have {len(kinds)} input types ({shown}); one export needs one,"
            " so narrow it with --device or --since"
        )
    dtype, shape = kinds[0][0], tuple(int(d) for d in json.loads(kinds[0][1]))
    if kind == ".csv" and len(shape) != 1:
        raise SamplesError(
            f"CSV holds 1-D (tabular) inputs only; these are {dtype}{shape}: use --out FILE.npz"
        )
    labels = _class_names(store, sorted({str(m) for *_, m in meta}))
    ids = [int(r[0]) for r in meta]
    n = len(ids)
    x = np.empty((n, *shape), dtype=np.dtype(dtype))
    cols: dict[str, list[Any]] = {
        k: [] for k in ("id", "fleet", "device", "ts", "model_version", "predicted", "y")
    }
    scores: list[np.ndarray] = []
    at = 0
    for rows in _chunks(store, ids):
        for sid, fleet, dev, ts, ver, pred, sc, data, y in rows:
            x[at] = np.frombuffer(bytes(data), dtype=x.dtype).reshape(shape)
            cols["id"].append(str(sid))
            cols["fleet"].append(str(fleet))
            cols["device"].append(str(dev))
            cols["ts"].append(float(ts))
            cols["model_version"].append("" if ver is None else str(ver))
            cols["predicted"].append(int(pred))
            cols["y"].append(-1 if y is None else int(y))
            scores.append(np.frombuffer(bytes(sc), dtype="<f8"))
            at += 1
        if progress is not None:
            progress(len(rows))
    width = max((len(s) for s in scores), default=0)
    sc_arr = np.full((n, width), np.nan)
    for i, s in enumerate(scores):
        sc_arr[i, : len(s)] = s
    y_arr = np.asarray(cols["y"], dtype=np.int64)
    arrays = {
        "x": x,
        "y": y_arr,
        "labels": np.asarray(labels, dtype=str),
        "predicted": np.asarray(cols["predicted"], dtype=np.int64),
        "scores": sc_arr,
        "fleet": np.asarray(cols["fleet"], dtype=str),
        "device": np.asarray(cols["device"], dtype=str),
        "ts": np.asarray(cols["ts"], dtype=np.float64),
        "model_version": np.asarray(cols["model_version"], dtype=str),
        "id": np.asarray(cols["id"], dtype=str),
    }
    _write(path, kind, arrays, labels)
    return Exported(
        str(path),
        n,
        int((y_arr >= 0).sum()),
        sorted({f"{f}/{d}" for f, d in zip(cols["fleet"], cols["device"], strict=True)}),
        dtype,
        list(shape),
        labels,
    )


def _chunks(store: Store, ids: list[int]) -> Iterator[list[tuple[Any, ...]]]:
    """The export's rows in ``ids`` order, FETCH_ROWS at a time."""
    for i in range(0, len(ids), FETCH_ROWS):
        part = ids[i : i + FETCH_ROWS]
        got = store.query(
            "SELECT s.id, s.sample_id, s.fleet, s.device_id, s.ts, s.model_version, s.predicted, s.scores,"
            " s.data, l.label_index FROM samples s LEFT JOIN sample_labels l ON l.fleet = s.fleet AND"
            " l.device_id = s.device_id AND l.sample_id = s.sample_id"
            f" WHERE s.id IN ({', '.join('?' * len(part))})",
            part,
        )
        by_id = {int(r[0]): r[1:] for r in got}
        yield [by_id[k] for k in part]


def _class_names(store: Store, shas: list[str]) -> list[str]:
    """The class names of the samples' models, from their registered baselines ([] when unknown).

    Models with different class names cannot share one ``y``: refused."""
    from toolchain.fleet.registry import load_baseline

    found: dict[tuple[str, ...], str] = {}
    for sha in shas:
        base = load_baseline(store, sha)
        if base is not None:
            found.setdefault(tuple(base.profile.spec.labels), sha)
    if len(found) > 1:
        raise SamplesError(
            f"the selected samples come from {len(found)} models with different class names; narrow"
            " the export with --device or --since"
        )
    return list(next(iter(found))) if found else []


def _write(path: Path, kind: str, arrays: dict[str, np.ndarray], labels: list[str]) -> None:
    """Write atomically: a temporary file beside ``path``, renamed over it once complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    os.close(fd)
    try:
        if kind == ".npz":
            with open(tmp, "wb") as fb:
                np.savez(fb, **arrays)  # type: ignore[arg-type]
        else:
            with open(tmp, "w", newline="") as ft:
                _write_csv(ft, arrays, labels)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_csv(fh: Any, a: dict[str, np.ndarray], labels: list[str]) -> None:
    """One row per sample: id, fleet, device, ts, model_version, predicted, y, label, score_*, x_*.

    Numbers are written in their shortest exact form (``repr``), so reading the column back as the
    exported dtype gives the same bits."""
    x, sc = a["x"], a["scores"]
    w = csv.writer(fh)
    w.writerow(
        ["id", "fleet", "device", "ts", "model_version", "predicted", "y", "label"]
        + [f"score_{j}" for j in range(sc.shape[1])]
        + [f"x_{j}" for j in range(x.shape[1])]
    )
    as_int = x.dtype.kind in "iu"
    for i in range(len(x)):
        y = int(a["y"][i])
        w.writerow(
            [a["id"][i], a["fleet"][i], a["device"][i], repr(float(a["ts"][i])), a["model_version"][i]]
            + [int(a["predicted"][i]), y, labels[y] if 0 <= y < len(labels) else ""]
            + [repr(float(v)) for v in sc[i]]
            + [int(v) if as_int else repr(float(v)) for v in x[i]]
        )


__all__ = ["Exported", "SamplesError", "Selection", "export", "summary"]
