"""Load the data people bring: ``.npz`` arrays, CSV tables with a label column, image folders.

Every loader returns the same ``Dataset``: ``x`` float32 ``(n, *sample_shape)`` holding raw feature
values (exactly what the device will be fed; no normalisation here), ``y`` int64 class indices in
``0..K-1``, optional ``feature_names`` and the ``class_names`` in index order.
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Largest CSV we read (rows); beyond this, convert to .npz first.
CSV_MAX_ROWS = 5_000_000
# Fraction of the data held out for evaluation when no --eval-data is given, and its seed.
HOLDOUT_FRACTION = 0.2
# Largest input batch (bytes of float32 samples) the build runs through a model at once: TensorFlow
# and the runtimes hold every activation of a batch and their arenas grow faster than the batch (ONNX
# Runtime's calibrator: 0.5 GB at 1 image of 224x224x3, 0.7 GB at 3, 1.7 GB at 13), so such images
# go 3 at a time while small samples (the 8x8 digits) still go in batches of 256 (32 to calibrate).
BATCH_INPUT_BYTES = 2 * 2**20
SPLIT_SEED = 0


class DataError(ToolchainError):
    """Data cannot be read or does not fit the model."""


@dataclass
class Dataset:
    """Samples and labels: ``x`` float32 (n, *shape) raw values, ``y`` int64 (n,) in 0..K-1."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str] | None
    class_names: list[str]
    source: str = ""
    kind: str = field(default="array")  # array | csv | images

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def labelled(self) -> bool:
        """False for calibration data loaded without labels (``y`` is all -1, no class names)."""
        return bool(self.class_names)

    def subset(self, idx: np.ndarray, source_note: str = "") -> Dataset:
        """Return the samples at ``idx`` (same names)."""
        return Dataset(
            self.x[idx],
            self.y[idx],
            self.feature_names,
            self.class_names,
            source_note or self.source,
            self.kind,
        )

    def split(self, fraction: float = HOLDOUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[Dataset, Dataset]:
        """Return ``(rest, held_out)``: a stratified split holding out ``fraction`` of every class."""
        if not 0 < fraction < 1:
            raise DataError(f"hold-out fraction must be in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        held: list[np.ndarray] = []
        for c in np.unique(self.y):
            idx = np.flatnonzero(self.y == c)
            rng.shuffle(idx)
            k = int(round(idx.size * fraction))
            if idx.size >= 2:
                k = min(max(k, 1), idx.size - 1)
            else:
                k = 0
            held.append(idx[:k])
        held_idx = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
        mask = np.ones(self.n, dtype=bool)
        mask[held_idx] = False
        return (
            self.subset(np.flatnonzero(mask), f"{self.source} (minus {fraction:.0%} held out)"),
            self.subset(held_idx, f"{self.source} ({fraction:.0%} held out, seed {seed})"),
        )


def load_dataset(path: str | Path, label: str | None = None, *, require_labels: bool = True) -> Dataset:
    """Load ``.npz`` (x, y), ``.csv`` (header + ``label`` column) or an image folder of class sub-folders.

    With ``require_labels=False`` (calibration data) an ``.npz`` may hold only ``x``: the dataset is
    then unlabelled (``labelled`` False, ``y`` all -1, no class names).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data {str(p)!r} does not exist; pass an .npz file, a .csv file or an image folder")
    if p.is_dir():
        if label is not None:
            raise DataError(
                f"--label {label!r} applies to CSV data; {str(p)!r} is an image folder (labels are folder "
                "names)"
            )
        ds = _load_image_folder(p)
    elif p.suffix.lower() == ".npz":
        ds = _load_npz(p, label, require_labels)
    elif p.suffix.lower() in (".csv", ".tsv", ".txt"):
        ds = _load_csv(p, label)
    else:
        raise DataError(
            f"data {str(p)!r} has an unknown format; use .npz (x, y), .csv with --label COLUMN, or an image "
            "folder"
        )
    check_finite(ds.x, str(p))
    if ds.n == 0:
        raise DataError(f"data {str(p)!r} holds no samples")
    return ds


def batch_rows(sample_shape: Sequence[int], most: int) -> int:
    """Return how many samples of ``sample_shape`` to run at once: at most ``most``, and no more than
    ``BATCH_INPUT_BYTES`` of float32 input (at least 1)."""
    sample_bytes = 4 * int(np.prod([int(d) for d in sample_shape], dtype=np.int64))
    return max(1, min(int(most), BATCH_INPUT_BYTES // max(1, sample_bytes)))


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise DataError when ``x`` holds NaN or infinite values, naming the first bad sample."""
    bad = ~np.isfinite(x)
    if bad.any():
        n_bad = int(bad.sum())
        first = int(np.argwhere(bad.reshape(bad.shape[0], -1).any(axis=1))[0][0])
        raise DataError(
            f"{what} holds {n_bad} NaN or infinite value(s) (first in sample {first}); remove or impute them"
        )


def _class_names_for(y_raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map raw labels (ints or strings) to indices 0..K-1 and names."""
    if y_raw.dtype.kind in "iu":
        vals = y_raw.astype(np.int64)
        if vals.size and vals.min() >= 0:
            k = int(vals.max()) + 1
            # Integer labels 0..K-1 keep their meaning even when a class is absent from this file.
            if k <= max(2 * len(np.unique(vals)), 2):
                return vals, [str(i) for i in range(k)]
        uniq = np.unique(vals)
        return np.searchsorted(uniq, vals).astype(np.int64), [str(v) for v in uniq]
    if y_raw.dtype.kind == "f":
        if not np.isfinite(y_raw).all() or not np.all(y_raw == np.round(y_raw)):
            raise DataError(float_labels_message(y_raw))
        return _class_names_for(y_raw.astype(np.int64))
    strs = [str(v) for v in y_raw.tolist()]
    names = sorted(set(strs), key=_natural_key)
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[v] for v in strs], dtype=np.int64), names


def float_labels_message(y: np.ndarray) -> str:
    """The one-line refusal of fractional labels for classification, pointing to ``--task regression``."""
    frac = y[~np.isfinite(y) | (y != np.round(y))]
    shown = f" (e.g. {float(frac[0]):g})" if frac.size else ""
    return (
        f"labels hold fractional numbers{shown}, not class names; to predict a number pass --task regression"
        " (class labels must be integers or strings)"
    )


def _natural_key(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _load_npz(p: Path, label: str | None, require_labels: bool = True) -> Dataset:
    ykey = label or "y"
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"cannot read {str(p)!r} as .npz ({str(e)[:80]}); save it with numpy.savez(x=..., y=...)"
        ) from None
    if "x" in arrays and ykey not in arrays and label is None and not require_labels:
        x = arrays["x"]
        if x.dtype.kind not in "fiub" or x.ndim < 2:
            raise DataError(f"{str(p)!r}: x has dtype {x.dtype} and shape {x.shape}; want numbers (n, ...)")
        unlabelled = np.full(x.shape[0], -1, dtype=np.int64)
        return Dataset(x.astype(np.float32), unlabelled, None, [], str(p), "array")
    if "x" not in arrays or ykey not in arrays:
        raise DataError(
            f"{str(p)!r} must hold arrays 'x' and {ykey!r}; it holds {sorted(arrays)} (use --label NAME for "
            "another label array)"
        )
    x, y_raw = arrays["x"], arrays[ykey]
    if x.dtype.kind not in "fiub":
        raise DataError(f"{str(p)!r}: x has dtype {x.dtype}; features must be numbers")
    if x.ndim < 2:
        raise DataError(
            f"{str(p)!r}: x has shape {x.shape}; want (samples, features...) with at least 2 axes"
        )
    y_raw = np.asarray(y_raw).reshape(-1)
    if y_raw.shape[0] != x.shape[0]:
        raise DataError(f"{str(p)!r}: x has {x.shape[0]} samples but {ykey!r} has {y_raw.shape[0]} labels")
    y, names = _class_names_for(y_raw)
    if "class_names" in arrays:
        given = [str(v) for v in arrays["class_names"].tolist()]
        if y_raw.dtype.kind in "iuf":
            if int(y.max()) >= len(given):
                raise DataError(
                    f"{str(p)!r}: label {int(y.max())} has no entry in class_names ({len(given)} names)"
                )
            y = y_raw.astype(np.int64)
            names = given
        elif set(names) <= set(given):
            index = {v: i for i, v in enumerate(given)}
            y = np.array([index[names[i]] for i in y], dtype=np.int64)
            names = given
    feature_names = None
    if "feature_names" in arrays:
        feature_names = [str(v) for v in arrays["feature_names"].tolist()]
        if len(feature_names) != int(np.prod(x.shape[1:])):
            raise DataError(
                f"{str(p)!r}: {len(feature_names)} feature_names for samples of {int(np.prod(x.shape[1:]))} "
                "values"
            )
    return Dataset(x.astype(np.float32), y, feature_names, names, str(p), "array")


def _load_csv(p: Path, label: str | None) -> Dataset:
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        fh = open(p, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read {str(p)!r} ({e.strerror})") from None
    with fh:
        reader = csv.reader(fh, delimiter=delim)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{str(p)!r} is empty; a CSV needs a header row and one row per sample") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{str(p)!r} is not a readable CSV file ({str(e)[:60]})") from None
        header = [h.strip() for h in header]
        if label is None:
            raise DataError(f"CSV data {str(p)!r} needs --label COLUMN; columns: {', '.join(header)[:200]}")
        if label not in header:
            raise DataError(
                f"label column {label!r} is not in {str(p)!r}; columns: {', '.join(header)[:200]}"
            )
        li = header.index(label)
        feats = [h for i, h in enumerate(header) if i != li]
        if not feats:
            raise DataError(f"{str(p)!r} has no feature columns besides the label {label!r}")
        rows: list[list[float]] = []
        labels: list[str] = []
        try:
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{str(p)!r} line {lineno} has {len(row)} fields, the header has {len(header)}"
                    )
                vals: list[float] = []
                for i, cell in enumerate(row):
                    if i == li:
                        continue
                    try:
                        vals.append(float(cell))
                    except ValueError:
                        raise DataError(
                            f"{str(p)!r} line {lineno}, column {header[i]!r}: {cell[:30]!r} is not a number;"
                            " features must be numeric (encode categories first)"
                        ) from None
                rows.append(vals)
                labels.append(row[li].strip())
                if len(rows) > CSV_MAX_ROWS:
                    raise DataError(f"{str(p)!r} has more than {CSV_MAX_ROWS} rows; convert it to .npz")
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{str(p)!r} is not a readable CSV file ({str(e)[:60]})") from None
    if not rows:
        raise DataError(f"{str(p)!r} has a header but no rows")
    if any(lab == "" for lab in labels):
        raise DataError(f"{str(p)!r}: the label column {label!r} has empty cells; every row needs a label")
    x = np.array(rows, dtype=np.float32)
    lab_arr = np.array(labels)
    try:
        as_num = np.array([float(v) for v in labels])
    except ValueError:
        as_num = None
    if as_num is not None:
        if not np.all(as_num == np.round(as_num)):  # a number per row, not class names
            raise DataError(f"{str(p)!r} column {label!r}: " + float_labels_message(as_num))
        lab_arr = as_num.astype(np.int64)
    y, names = _class_names_for(lab_arr)
    return Dataset(x, y, feats, names, str(p), "csv")


def _load_image_folder(p: Path) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(
            "reading an image folder needs Pillow; pip install 'edgefleet[host]' (or pillow)"
        ) from None
    classes = sorted(
        (d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not classes:
        raise DataError(
            f"image folder {str(p)!r} has no class sub-folders; put each class's images in DIR/<class>/"
        )
    files: list[tuple[Path, int]] = []
    for ci, d in enumerate(classes):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, ci))
    if not files:
        raise DataError(
            f"image folder {str(p)!r} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    images: list[np.ndarray] = []
    modes: list[str] = []
    opened = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                opened.append(im.copy())
                modes.append(im.mode)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {str(f)!r} ({str(e)[:60]}); remove or fix it") from None
    # Grayscale folders stay one channel; anything else becomes RGB. Sizes follow the most common one.
    gray = all(m in ("L", "1", "I;16", "I", "F") for m in modes)
    size = Counter(im.size for im in opened).most_common(1)[0][0]
    for img in opened:
        conv = img.convert("L" if gray else "RGB")
        if conv.size != size:
            conv = conv.resize(size, Image.Resampling.BILINEAR)
        arr = np.asarray(conv, dtype=np.float32)
        images.append(arr[..., None] if gray else arr)
    x = np.stack(images)
    y = np.array([ci for _, ci in files], dtype=np.int64)
    return Dataset(x, y, None, [d.name for d in classes], str(p), "images")


def check_fits(ds: Dataset, input_shape: Sequence[int], n_outputs: int | None, what: str = "data") -> None:
    """Raise DataError unless samples have the model's per-sample input shape and labels fit its outputs."""
    want = tuple(int(d) for d in input_shape)
    if ds.sample_shape != want:
        flat_ok = math.prod(ds.sample_shape) == math.prod(want) if all(d > 0 for d in want) else False
        hint = " (same number of values: reshape the data)" if flat_ok else ""
        raise DataError(
            f"{what} {ds.source!r} has samples of shape {ds.sample_shape} but the model takes {want}{hint};"
            " pass data that matches the model input"
        )
    if n_outputs is not None and ds.n_classes > n_outputs:
        raise DataError(
            f"{what} {ds.source!r} has {ds.n_classes} classes but the model has {n_outputs} outputs;"
            " pass data labelled for this model"
        )


def conform(ds: Dataset, class_names: Sequence[str]) -> Dataset:
    """Re-index ``ds.y`` to ``class_names`` (e.g. test data against the training classes).

    Labels are matched by name; data labelled with bare class indices (0..K-1, no names) against a
    model whose classes have names is read as those indices.
    """
    names = list(class_names)
    if ds.class_names == names:
        return ds
    index = {v: i for i, v in enumerate(names)}
    missing = [c for c in ds.class_names if c not in index]
    if missing and all(c.isdigit() and int(c) < len(names) for c in ds.class_names):
        y = np.array([int(ds.class_names[i]) for i in ds.y], dtype=np.int64)
        return Dataset(ds.x, y, ds.feature_names, names, ds.source, ds.kind)
    if missing:
        raise DataError(
            f"data {ds.source!r} has class(es) {missing[:5]} that the model's labels {names[:10]} do not know;"
            " label it with the model's class names (or their indices 0..K-1)"
        )
    y = np.array([index[ds.class_names[i]] for i in ds.y], dtype=np.int64)
    return Dataset(ds.x, y, ds.feature_names, names, ds.source, ds.kind)
