"""`edgefleet train`: repeatable (same seed, same weights, in separate processes), trustworthy defaults
(class weights, early stopping on validation loss), the metadata sidecar, and --out errors before work.

Data is made in code and unlike the shipped digits: tabular columns from 0.001 to 4000, two
unbalanced classes, named features.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toolchain.cli import main
from toolchain.steps.data import Dataset, load_dataset
from toolchain.steps.models import load_model, model_meta_path, read_model_meta
from toolchain.steps.train import TrainError, check_out_path, class_weights, train_model

EDGEFLEET = [sys.executable, "-c", "from toolchain.cli import main; main(prog_name='edgefleet')"]
CLI_TIMEOUT_S = 300


def _machines_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 300
    temp = rng.normal(60, 15, n)
    vib = rng.normal(0.5, 0.2, n)
    label = np.where(temp + 40 * vib > 80, "hot", "ok")
    p = tmp_path / "machines.csv"
    p.write_text(
        "temp_c,vibration,state\n"
        + "".join(f"{a:.3f},{b:.4f},{c}\n" for a, b, c in zip(temp, vib, label, strict=True))
    )
    return p


def _rare_fault(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """About 5 % 'fault' rows, told apart by one weak feature in units of 0.001 among columns up to 4000.

    The unweighted optimum predicts 'ok' nearly everywhere (a fault needs 19x the likelihood of 'ok').
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.05).astype(np.int64)
    signal = rng.normal(size=n) + 1.0 * y
    x = np.c_[
        signal * 0.001,
        rng.normal(size=n) * 4000 + 2000,
        rng.normal(size=n),
        rng.normal(size=n) * 50,
    ]
    return x.astype(np.float32), y


# ------------------------------------------------------------------------------------ --out, before work


@contextlib.contextmanager
def _unwritable(d: Path) -> Iterator[None]:
    """Make folder ``d`` unwritable, also for root (immutable attribute), for the duration."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True, timeout=30).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True, timeout=30)
    else:
        d.chmod(0o555)
        try:
            yield
        finally:
            d.chmod(0o755)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("proc", "cannot create folder '/proc/nope'"),
        ("existing-dir", "is a directory"),
        ("parent-is-file", "is a file, not a folder"),
        ("suffix", "must end in .keras or .h5"),
        ("unwritable", "cannot write in"),
    ],
)
def test_out_path_problems_fail_in_one_line_before_reading_data(
    tmp_path: Path, case: str, fragment: str
) -> None:
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    out = {
        "proc": "/proc/nope/m.keras",
        "existing-dir": str(tmp_path / "a_dir"),
        "parent-is-file": str(tmp_path / "a_file" / "m.keras"),
        "suffix": str(tmp_path / "m.onnx"),
        "unwritable": str(ro / "m.keras"),
    }[case]
    # The data does not exist: an --out check that ran after loading would report the data instead.
    with _unwritable(ro):
        res = CliRunner().invoke(
            main, ["train", "--data", str(tmp_path / "missing.npz"), "--arch", "mlp", "--out", out]
        )
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --out "), res.stderr
    assert fragment in lines[0] and "Traceback" not in res.stderr
    assert not list(ro.iterdir()) and (tmp_path / "a_file").read_text() == "x"


def test_out_path_check_runs_before_tensorflow_is_imported(tmp_path: Path, cli_env: dict[str, str]) -> None:
    code = (
        "import sys\nfrom toolchain.cli import main\n"
        "try:\n    main(['train', '--data', sys.argv[1], '--arch', 'cnn', '--out', '/proc/nope/m.keras'])\n"
        "except SystemExit as e:\n    print(e.code, 'tensorflow' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d.npz")],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=CLI_TIMEOUT_S,
    )
    assert res.stdout.split() == ["1", "False"], res.stderr


def test_check_out_path_creates_missing_folders_and_leaves_no_probe(tmp_path: Path) -> None:
    out = check_out_path(tmp_path / "new" / "deeper" / "m.h5")
    assert out.parent.is_dir() and not list(out.parent.iterdir())
    (tmp_path / "m.keras.edgefleet.json").mkdir()
    with pytest.raises(TrainError, match="metadata file .* is a directory"):
        check_out_path(tmp_path / "m.keras")


def test_class_weights_only_for_unbalanced_labels() -> None:
    assert class_weights(np.array([0] * 50 + [1] * 40), 2) is None  # 1.25x: plain accuracy is the target
    w = class_weights(np.array([0] * 63 + [1] * 37), 2)
    assert w is not None and w[1] / w[0] == pytest.approx(63 / 37)
    # A class absent from the data (integer labels 0..2 with no 1) gets weight 1 and does not skew the rest.
    w = class_weights(np.array([0] * 90 + [2] * 10), 3, "balanced")
    assert w == {0: pytest.approx(100 / 180), 1: 1.0, 2: pytest.approx(5.0)}
    assert class_weights(np.array([0] * 90 + [1] * 10), 2, "none") is None
    with pytest.raises(TrainError, match="unknown"):
        class_weights(np.array([0, 1]), 2, "inverse")


# --------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_same_seed_same_weights_in_separate_processes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Two `edgefleet train` processes with the same seed give bit-identical weights; --seed 1 does not."""
    csv = tmp_path / "cells.csv"
    x, y = _rare_fault(3, n=300)
    names = np.array(["ok", "fault"])[y]
    csv.write_text(
        "radius_mm,area_um2,texture,perimeter,diagnosis\n"
        + "".join(",".join(f"{v:.6g}" for v in row) + f",{c}\n" for row, c in zip(x, names, strict=True))
    )
    docs = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        cmd = ["train", "--data", str(csv), "--label", "diagnosis", "--arch", "mlp", "--epochs", "12"]
        res = subprocess.run(
            [*EDGEFLEET, *cmd, "--seed", str(seed), "--out", str(tmp_path / f"{run}.keras"), "--json"],
            capture_output=True,
            text=True,
            env=cli_env,
            timeout=CLI_TIMEOUT_S,
        )
        assert res.returncode == 0, res.stderr
        docs.append(json.loads(res.stdout))
    w = [load_model(tmp_path / f"{run}.keras").model.get_weights() for run in "abc"]
    assert len(w[0]) == len(w[1]) and all(np.array_equal(p, q) for p, q in zip(w[0], w[1], strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(w[0], w[2], strict=True))
    assert docs[0]["seed"] == 0 and docs[2]["seed"] == 1
    assert docs[0]["val_accuracy"] == docs[1]["val_accuracy"]
    # The sidecar carries what `build` needs without the data: class names in index order, features, seed.
    meta = read_model_meta(tmp_path / "a.keras")
    assert meta is not None and docs[0]["metadata"] == str(model_meta_path(tmp_path / "a.keras"))
    assert meta["class_names"] == ["fault", "ok"] == docs[0]["classes"]
    assert meta["feature_names"] == ["radius_mm", "area_um2", "texture", "perimeter"]
    assert meta["arch"] == "mlp" and meta["seed"] == 0 and meta["input_shape"] == [4]
    assert meta["data"]["samples"] == 300 and sum(meta["data"]["class_counts"]) == 300
    assert meta["training"]["epochs_max"] == 12 and meta["training"]["class_weight"]["fault"] > 1
    assert meta["data"]["sha256"] == read_model_meta(tmp_path / "c.keras")["data"]["sha256"]  # type: ignore[index]


@pytest.mark.slow
def test_class_weights_give_the_rare_class_a_voice(tmp_path: Path) -> None:
    """Unweighted training on 5 % faults never predicts one (the old default did the same); auto weights do."""
    x, y = _rare_fault(0)
    xt, yt = _rare_fault(1)
    ds = Dataset(x, y, None, ["ok", "fault"], "rare-fault")
    recall = {}
    for mode in ("none", "auto"):
        res = train_model(ds, "mlp", 40, tmp_path / f"{mode}.keras", class_weight=mode, progress=False)
        pred = res.model.predict(xt, verbose=0).argmax(1)
        recall[mode] = (float(np.mean(pred[yt == 1] == 1)), float(np.mean(pred[yt == 0] == 0)))
        assert (res.class_weight is None) == (mode == "none")
    assert recall["none"][0] < 0.15  # the majority-class answer
    assert recall["auto"][0] > 0.4 and recall["auto"][1] > 0.6  # both classes recognised
    assert read_model_meta(tmp_path / "auto.keras")["training"]["class_weight_mode"] == "auto"  # type: ignore[index]


@pytest.mark.slow
def test_mlp_on_csv_learns_from_raw_values(tmp_path: Path) -> None:
    ds = load_dataset(_machines_csv(tmp_path), label="state")
    res = train_model(ds, "mlp", 30, tmp_path / "m.keras", progress=False)
    assert res.path.is_file() and res.epochs_run >= 10  # the minimum before early stopping
    assert 1 <= res.best_epoch <= res.epochs_run
    assert res.val_accuracy > 0.85 and res.train_accuracy > 0.85  # chance is ~0.5
    assert set(res.val_recall) == {"hot", "ok"}
    lm = load_model(res.path)
    assert lm.kind == "tf_keras" and lm.input_shape == (2,) and lm.n_outputs == 2
    # The built-in mlp standardises inside the model with statistics of the training split.
    norm = lm.model.get_layer("normalize")
    assert np.asarray(norm.mean).reshape(-1)[0] == pytest.approx(60, abs=5)
    assert read_model_meta(res.path)["feature_names"] == ["temp_c", "vibration"]  # type: ignore[index]


@pytest.mark.slow
def test_early_stopping_stops_before_the_epoch_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = rng.integers(0, 2, 120)  # pure noise: the validation loss stops improving
    res = train_model(
        Dataset(x, y, None, ["a", "b"], "noise"), "mlp", 60, tmp_path / "n.h5", patience=2, progress=False
    )
    assert 10 <= res.epochs_run < 60  # never before MIN_EPOCHS, then early
    assert res.best_epoch < res.epochs_run


def test_bad_training_requests(tmp_path: Path, digits: dict) -> None:
    ds = Dataset(digits["x"][:5], digits["y"][:5], None, [str(i) for i in range(10)], "tiny")
    with pytest.raises(TrainError, match="5 samples; need at least 10"):
        train_model(ds, "cnn", 1, tmp_path / "m.keras", progress=False)
    big = Dataset(digits["x"], digits["y"], None, [str(i) for i in range(10)], "d")
    with pytest.raises(TrainError, match=r"must end in .keras or .h5"):
        train_model(big, "cnn", 1, tmp_path / "m.onnx", progress=False)
    one = Dataset(digits["x"][:20], np.zeros(20, np.int64), None, ["0", "1"], "one class")
    with pytest.raises(TrainError, match="1 class with samples"):
        train_model(one, "mlp", 1, tmp_path / "m.keras", progress=False)
