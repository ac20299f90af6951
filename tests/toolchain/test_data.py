"""Data loading: .npz, CSV with a label column, image folders; errors name the value and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.data import DataError, Dataset, check_fits, conform, load_dataset

REPO = Path(__file__).resolve().parents[2]


def test_shipped_digits_load_as_images() -> None:
    ds = load_dataset(REPO / "calibration_data" / "digits.npz")
    assert ds.x.shape[1:] == (8, 8, 1) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and set(np.unique(ds.y)) == set(range(10))
    assert ds.class_names == [str(i) for i in range(10)]
    assert 0 <= ds.x.min() and ds.x.max() <= 16  # raw values, no normalisation


def test_npz_with_string_labels_and_names(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    np.savez(
        p, x=x, y=np.array(["cat", "dog", "cat", "emu", "dog", "cat"]), feature_names=np.array(["a", "b"])
    )
    ds = load_dataset(p)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.y.tolist() == [0, 1, 0, 2, 1, 0]
    assert ds.feature_names == ["a", "b"] and ds.x.dtype == np.float32


def test_npz_missing_arrays_names_them(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, features=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"must hold arrays 'x' and 'y'.*features"):
        load_dataset(p)


def test_corrupt_npz(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(p)


def test_nan_and_inf_are_refused_with_the_sample(tmp_path: Path) -> None:
    x = np.ones((30, 3), dtype=np.float32)
    x[7, 1] = np.nan
    x[9, 0] = np.inf
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=np.arange(30) % 2)
    with pytest.raises(DataError, match=r"2 NaN or infinite.*first in sample 7"):
        load_dataset(p)


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


def test_csv_with_label_column(tmp_path: Path) -> None:
    p = _csv(tmp_path, "temp,label,vib\n20.5,ok,0.1\n80,hot,0.3\n21,ok,0.2\n")
    ds = load_dataset(p, label="label")
    assert ds.feature_names == ["temp", "vib"]
    assert ds.class_names == ["hot", "ok"]
    assert ds.y.tolist() == [1, 0, 1]
    np.testing.assert_allclose(ds.x[:, 0], [20.5, 80, 21])


def test_csv_integer_labels_keep_their_numbers(tmp_path: Path) -> None:
    ds = load_dataset(_csv(tmp_path, "a,y\n1,0\n2,2\n3,1\n"), label="y")
    assert ds.class_names == ["0", "1", "2"] and ds.y.tolist() == [0, 2, 1]


def test_csv_missing_label_column_lists_columns(tmp_path: Path) -> None:
    p = _csv(tmp_path, "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"label column 'target' is not in .*columns: a, b"):
        load_dataset(p, label="target")
    with pytest.raises(DataError, match=r"needs --label COLUMN"):
        load_dataset(p)


def test_csv_non_numeric_feature_names_line_and_column(tmp_path: Path) -> None:
    p = _csv(tmp_path, "a,b,y\n1,2,x\n1,high,y\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': 'high' is not a number"):
        load_dataset(p, label="y")


def test_image_folder(tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    for ci, cls in enumerate(["cats", "dogs"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            img = pil.new("L", (6, 5), color=40 * ci + i)
            img.save(tmp_path / cls / f"{i}.png")
    pil.new("L", (12, 10), color=1).save(tmp_path / "dogs" / "big.png")  # resized to the common size
    ds = load_dataset(tmp_path)
    assert ds.x.shape == (7, 5, 6, 1)
    assert ds.class_names == ["cats", "dogs"]
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert ds.x[3, 0, 0, 0] == 40  # raw pixel values


def test_image_folder_without_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(tmp_path)


def test_unknown_format_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown format"):
        load_dataset(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")


def _ds(n: int = 100, k: int = 4) -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset(
        rng.normal(size=(n, 3)).astype(np.float32), np.arange(n) % k, None, [str(i) for i in range(k)], "mem"
    )


def test_split_is_stratified_and_disjoint() -> None:
    ds = _ds()
    rest, held = ds.split(0.2)
    assert rest.n + held.n == ds.n and held.n == 20
    assert np.bincount(held.y).tolist() == [5, 5, 5, 5]
    rows = {tuple(r) for r in rest.x.tolist()}
    assert not any(tuple(r) in rows for r in held.x.tolist())


def test_check_fits_shape_and_classes() -> None:
    ds = _ds()
    check_fits(ds, (3,), 4)
    with pytest.raises(DataError, match=r"shape \(3,\) but the model takes \(8, 8, 1\)"):
        check_fits(ds, (8, 8, 1), 4)
    with pytest.raises(DataError, match="4 classes but the model has 2 outputs"):
        check_fits(ds, (3,), 2)


def test_conform_reindexes_to_model_labels() -> None:
    ds = Dataset(np.zeros((3, 1), np.float32), np.array([0, 1, 0]), None, ["b", "c"], "t")
    out = conform(ds, ["a", "b", "c"])
    assert out.y.tolist() == [1, 2, 1]
    with pytest.raises(DataError, match="'z'"):
        conform(Dataset(ds.x, ds.y, None, ["z", "b"], "t"), ["a", "b"])
