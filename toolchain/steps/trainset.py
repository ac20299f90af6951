"""Read the labelled training data of one or more ``--data`` paths into one ``Dataset``.

Besides what ``load_dataset`` reads, an ``.npz`` may be an export of captured device samples
(``edgefleet fleet samples export``): ``x``, ``y`` with ``-1`` for a sample nobody has labelled yet,
the class names under ``labels`` (or ``class_names``), and extra per-sample arrays (``predicted``,
``scores``, ``device``, ``ts``, ``model_version``, ``id``) that training ignores. Unlabelled rows are
dropped and counted (the caller says how many, once); a file with no labelled row is refused.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.steps.data import DataError, Dataset, check_finite, load_dataset

UNLABELLED = -1  # the label of a captured sample without feedback in an export


@dataclass
class Labelled:
    """One ``--data`` path read for training: its labelled samples and how many unlabelled were dropped."""

    data: Dataset
    unlabelled: int = 0


def load_labelled(path: str | Path, label: str | None = None) -> Labelled:
    """Load ``path`` as ``load_dataset`` does, dropping the unlabelled rows (``y == -1``) of an ``.npz``.

    -1 means unlabelled in an ``.npz`` that names its classes (``labels`` as an export writes it, or
    ``class_names``); without names -1 stays a class label, as ``load_dataset`` reads it.

    Raises DataError (one line) when nothing labelled is left, or for anything ``load_dataset`` refuses.
    """
    p = Path(path)
    if p.suffix.lower() != ".npz" or not p.is_file():
        return Labelled(load_dataset(p, label))
    ykey = label or "y"
    try:
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            y_raw = np.asarray(z[ykey]).reshape(-1) if ykey in files else None
            names = None
            for key in ("class_names", "labels"):
                if key in files and key != ykey:
                    names = [str(v) for v in np.asarray(z[key]).reshape(-1).tolist()]
                    break
            x = z["x"] if (y_raw is not None and "x" in files) else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"cannot read {str(p)!r} as .npz ({str(e)[:80]}); save it with numpy.savez(x=..., y=...)"
        ) from None
    # -1 means "unlabelled" only in a file that names its classes (an export: ``labels``): without
    # names, -1 is a class of its own (labels -1/1 are common), as load_dataset reads it.
    exported = names is not None and (
        "labels" in files or (y_raw is not None and y_raw.dtype.kind in "iu" and bool((y_raw < 0).any()))
    )
    if x is None or y_raw is None or names is None or not exported:
        return Labelled(load_dataset(p, label))  # a plain training file (or one load_dataset explains)
    if y_raw.dtype.kind not in "iu":
        raise DataError(
            f"{str(p)!r}: {ykey!r} has dtype {y_raw.dtype}; an export's labels are class indices (-1 = unlabelled)"
        )
    if x.dtype.kind not in "fiub" or x.ndim < 2 or x.shape[0] != y_raw.shape[0]:
        raise DataError(
            f"{str(p)!r}: x has dtype {x.dtype} and shape {x.shape} for {y_raw.shape[0]} labels; want numbers"
            " (n, ...) with one label each"
        )
    keep = y_raw != UNLABELLED
    bad = y_raw[keep]
    bad = bad[(bad < 0) | (bad >= len(names))]
    if bad.size:
        raise DataError(
            f"{str(p)!r}: label {int(bad[0])} is neither -1 (unlabelled) nor a class index 0..{len(names) - 1}"
            f" of its class names {names[:10]}"
        )
    dropped = int((~keep).sum())
    if not keep.any():
        raise DataError(
            f"{str(p)!r} holds {dropped} samples and none is labelled (y is -1 everywhere); label some"
            " (POST /v1/feedback on the device, or set y in the file) before training on it"
        )
    y = y_raw[keep].astype(np.int64)
    ds = Dataset(x[keep].astype(np.float32), y, None, names, str(p), "array")
    check_finite(ds.x, str(p))
    return Labelled(ds, dropped)


def combine(parts: Sequence[Dataset], what: str = "--data") -> Dataset:
    """Concatenate data sets of the same sample shape; classes are matched by name (union, first seen first).

    Data labelled with bare indices ("0".."K-1") against named classes is read as those indices.
    """
    if not parts:
        raise DataError(f"no {what} given")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for d in parts[1:]:
        if d.sample_shape != first.sample_shape:
            raise DataError(
                f"{what} {d.source!r} has samples of shape {d.sample_shape} but {first.source!r} has"
                f" {first.sample_shape}; every {what} must hold samples of one shape"
            )
    names: list[str] = []
    for d in parts:
        names += [c for c in d.class_names if c not in names]
    ys = [_reindex(d, names) for d in parts]
    features = first.feature_names if all(d.feature_names == first.feature_names for d in parts) else None
    kinds = {d.kind for d in parts}
    return Dataset(
        np.concatenate([d.x for d in parts]),
        np.concatenate(ys),
        features,
        names,
        " + ".join(d.source for d in parts),
        kinds.pop() if len(kinds) == 1 else "array",
    )


def _reindex(d: Dataset, names: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(names)}
    lut = np.array([index[c] for c in d.class_names], dtype=np.int64)
    return lut[d.y]
