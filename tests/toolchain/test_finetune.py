"""`edgefleet train --init-from`: fine-tuning keeps the model's class names and preprocessing, learns a
shift, remembers the old data when it replays it, builds, and refuses bad input in one line.

Data is made in code and unlike the shipped digits: a tabular set of two unbalanced classes (75/25)
in units from 0.001 to 4000 whose NEW regime (one feature moved by 4 standard deviations) follows
another rule, and small [0, 1] images of three unbalanced classes whose NEW copies are inverted.
NEW files have the form of `edgefleet fleet samples export`: x, y with -1 where nobody labelled the
sample, class names under `labels` (here in another order than the model's), and extra keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.formats.manifest import load_manifest
from tests.fabricate import shifted_images as _images
from tests.fabricate import shifted_regime as _regime
from toolchain.cli import main
from toolchain.steps.data import DataError, Dataset
from toolchain.steps.trainset import combine, load_labelled

NAMES = ["ok", "fault"]
SHAPES = ["bar", "column", "cross"]
EPOCHS = 100  # the default: the most per fine-tune; early stopping may end sooner


def _export(path: Path, x: np.ndarray, y: np.ndarray, names: list[str], unlabelled: int) -> Path:
    """Write ``x, y`` as a samples export: class names under ``labels`` in reversed order, -1 rows first."""
    order = list(reversed(names))
    y_exp = np.array([order.index(names[c]) for c in y], dtype=np.int64)
    rng = np.random.default_rng(9)
    xu = x[rng.integers(0, x.shape[0], unlabelled)] * 1.01
    n = x.shape[0] + unlabelled
    np.savez(
        path,
        x=np.concatenate([xu, x]),
        y=np.r_[np.full(unlabelled, -1, np.int64), y_exp],
        labels=np.array(order),
        predicted=np.zeros(n, np.int64),
        scores=np.zeros((n, len(names)), np.float32),
        device=np.array(["pi-shifted"] * n),
        ts=np.arange(n, dtype=np.float64),
        model_version=np.ones(n, np.int64),
        id=np.array([f"p{i}" for i in range(n)]),
    )
    return path


def _acc(model: object, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(model.predict(x, verbose=0)).argmax(1) == y))  # type: ignore[attr-defined]


def _run(*args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deployed model (mlp trained on OLD), OLD as .npz, NEW as an export with 40 unlabelled rows."""
    from toolchain.steps.train import train_model

    d = tmp_path_factory.mktemp("tabular")
    x, y = _regime(0, 600, new=False)
    np.savez(d / "old.npz", x=x, y=y, class_names=np.array(NAMES))
    xn, yn = _regime(1, 200, new=True)
    _export(d / "new.npz", xn, yn, NAMES, unlabelled=40)
    train_model(Dataset(x, y, None, NAMES, "old"), "mlp", 60, d / "m1.keras", progress=False)
    return {"dir": d, "m1": d / "m1.keras", "old": d / "old.npz", "new": d / "new.npz"}


# ------------------------------------------------------------------------------------------ reading NEW


def test_export_rows_without_label_are_dropped_and_classes_read_by_name(tmp_path: Path) -> None:
    x, y = _regime(1, 50, new=True)
    part = load_labelled(_export(tmp_path / "e.npz", x, y, NAMES, unlabelled=7))
    assert part.unlabelled == 7 and part.data.n == 50
    assert part.data.class_names == ["fault", "ok"]  # the file's order; fine-tuning maps them by name
    assert [part.data.class_names[c] for c in part.data.y] == [NAMES[c] for c in y]
    np.testing.assert_array_equal(part.data.x, x)  # labelled rows bit-exact, in the file's order
    both = combine([Dataset(x, y, None, NAMES, "a"), part.data])
    assert both.class_names == NAMES and both.n == 100
    assert [both.class_names[c] for c in both.y[50:]] == [NAMES[c] for c in y]


def test_exports_nobody_labelled_or_with_stray_labels_are_refused(tmp_path: Path) -> None:
    x, y = _regime(1, 20, new=True)
    np.savez(tmp_path / "none.npz", x=x, y=np.full(20, -1), labels=np.array(NAMES))
    with pytest.raises(DataError, match="none is labelled"):
        load_labelled(tmp_path / "none.npz")
    np.savez(tmp_path / "stray.npz", x=x, y=np.r_[y[:-1], 2], labels=np.array(NAMES))
    with pytest.raises(DataError, match="label 2 is neither -1"):
        load_labelled(tmp_path / "stray.npz")
    # Without class names -1 is a class of its own (labels -1/1), as `train` always read it.
    np.savez(tmp_path / "pm.npz", x=x, y=np.where(y == 1, 1, -1))
    pm = load_labelled(tmp_path / "pm.npz")
    assert pm.unlabelled == 0 and pm.data.n == 20 and pm.data.class_names == ["-1", "1"]
    with pytest.raises(DataError, match="shape"):
        combine([Dataset(x, y, None, NAMES, "a"), Dataset(x[:, :3], y, None, NAMES, "b")])


# ---------------------------------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_finetune_keeps_names_and_preprocessing_learns_the_shift_and_builds(
    tabular: dict[str, Path], tmp_path: Path
) -> None:
    from toolchain.steps.models import fold_input_normalization, load_model, read_model_meta

    m2 = tmp_path / "m2.keras"
    code, out, err = _run(
        "train", "--init-from", tabular["m1"], "--data", tabular["old"], "--data", tabular["new"],
        "--epochs", EPOCHS, "--out", m2, "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert "dropped 40 unlabelled samples" in err and doc["unlabelled_dropped"] == 40
    assert doc["classes"] == NAMES and doc["new_samples"] == 200 and doc["replay"] == 0.5
    assert doc["replay_samples"] == pytest.approx(100, abs=2)  # 0.5 x 200 NEW rows, stratified
    assert doc["validation"]["old"] > 0 and doc["validation"]["new"] > 0
    assert doc["learning_rate"] == 3e-4 and doc["arch"] == "mlp"

    base, tuned = load_model(tabular["m1"]).model, load_model(m2).model
    # The adapted Normalization keeps OLD's statistics: the device's baseline stays comparable.
    for w0, w1 in zip(
        base.get_layer("normalize").get_weights(), tuned.get_layer("normalize").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(w0, w1)
    meta = read_model_meta(m2)
    assert meta is not None and meta["class_names"] == NAMES and meta["arch"] == "mlp"
    assert meta["init_from"]["preprocessing_kept"] == ["normalize"]
    assert meta["data"]["new"]["unlabelled_dropped"] == 40 and meta["data"]["new"]["samples"] == 200

    xt, yt = _regime(3, 600, new=True)
    xo, yo = _regime(2, 600, new=False)
    new_before, new_after = _acc(base, xt, yt), _acc(tuned, xt, yt)
    old_before, old_after = _acc(base, xo, yo), _acc(tuned, xo, yo)
    assert new_after > new_before + 0.1, (new_before, new_after)
    assert old_after > 0.8 and old_after > old_before - 0.12, (old_before, old_after)

    # The fine-tuned model builds as version 2 with the same labels and the same input standardisation.
    np.savez(tmp_path / "calib.npz", x=np.concatenate([xo[:150], xt[:150]]))
    np.savez(tmp_path / "test.npz", x=np.concatenate([xo[150:], xt[150:]]), y=np.r_[yo[150:], yt[150:]])
    code, out, err = _run(
        "build", m2, "--data", tmp_path / "calib.npz", "--eval-data", tmp_path / "test.npz",
        "--target", "raspberry-pi", "--version", 2, "--out", tmp_path / "b", "--json",
    )  # fmt: skip
    assert code == 0, err
    man = load_manifest(tmp_path / "b" / "raspberry-pi")
    assert man.labels == NAMES and man.version == 2
    _, pre = fold_input_normalization(base)
    assert pre is not None and man.preprocessing["type"] == "affine"
    np.testing.assert_allclose(man.preprocessing["scale"], pre["scale"], rtol=1e-6)
    np.testing.assert_allclose(man.preprocessing["offset"], pre["offset"], rtol=1e-6)


@pytest.mark.slow
def test_replay_keeps_the_old_data_and_the_same_seed_repeats(
    tabular: dict[str, Path], tmp_path: Path
) -> None:
    """Replay 0.5 keeps OLD accuracy near the deployed model's; replay 0 loses more (measured)."""
    from toolchain.steps.finetune import finetune_model
    from toolchain.steps.trainset import load_labelled

    old = load_labelled(tabular["old"]).data
    new = load_labelled(tabular["new"]).data
    xo, yo = _regime(2, 600, new=False)
    xt, yt = _regime(3, 600, new=True)
    from toolchain.steps.models import load_model

    base_old = _acc(load_model(tabular["m1"]).model, xo, yo)
    acc = {}
    for replay in (0.0, 0.5):
        res = finetune_model(
            tabular["m1"], old, new, EPOCHS, tmp_path / f"r{replay}.keras", replay=replay, progress=False
        )
        assert res.class_names == NAMES
        assert res.replay_samples == pytest.approx(200 * replay, abs=2)
        acc[replay] = (_acc(res.model, xo, yo), _acc(res.model, xt, yt))
    assert acc[0.5][0] > base_old - 0.12, (base_old, acc)  # no collapse on OLD
    assert acc[0.5][0] >= acc[0.0][0], acc  # forgetting without replay is larger
    assert min(acc[0.0][1], acc[0.5][1]) > 0.8, acc  # both learned NEW

    again = finetune_model(
        tabular["m1"], old, new, EPOCHS, tmp_path / "again.keras", replay=0.5, progress=False
    )
    first = load_model(tmp_path / "r0.5.keras").model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again.model.get_weights(), strict=True))


@pytest.mark.slow
def test_image_cnn_finetune_keeps_rescaling_and_learns_inverted_images(tmp_path: Path) -> None:
    from toolchain.steps.finetune import finetune_model
    from toolchain.steps.models import read_model_meta
    from toolchain.steps.train import train_model

    x, y = _images(0, 500, new=False)
    m1 = tmp_path / "m1.keras"
    base = train_model(Dataset(x, y, None, SHAPES, "old"), "cnn", 25, m1, progress=False).model
    xn, yn = _images(1, 240, new=True)
    part = load_labelled(_export(tmp_path / "new.npz", xn, yn, SHAPES, unlabelled=10))
    res = finetune_model(
        m1, Dataset(x, y, None, SHAPES, "old"), part.data, 25, tmp_path / "m2.keras", progress=False
    )
    assert res.class_names == SHAPES and read_model_meta(res.path)["class_names"] == SHAPES  # type: ignore[index]
    rescale = res.model.get_layer("rescale").get_config()
    assert rescale["scale"] == base.get_layer("rescale").get_config()["scale"]
    xt, yt = _images(3, 300, new=True)
    xo, yo = _images(2, 300, new=False)
    assert _acc(res.model, xt, yt) > _acc(base, xt, yt) + 0.1
    assert _acc(res.model, xo, yo) > 0.8


# --------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained built-in mlp with its sidecar (no epoch needed to test refusals), and data files."""
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.models import save_model, write_model_meta

    d = tmp_path_factory.mktemp("small")
    x, y = _regime(0, 60, new=False)
    save_model(build_architecture("mlp", x, 2), d / "m.keras")
    write_model_meta(d / "m.keras", {"class_names": NAMES, "arch": "mlp"})
    np.savez(d / "old.npz", x=x, y=y, class_names=np.array(NAMES))
    xn, yn = _regime(1, 40, new=True)
    _export(d / "new.npz", xn, yn, NAMES, unlabelled=3)
    np.savez(d / "unlabelled.npz", x=xn, y=np.full(40, -1), labels=np.array(NAMES))
    np.savez(d / "narrow.npz", x=xn[:, :4], y=yn)
    np.savez(d / "unknown.npz", x=xn, y=np.array(["ok", "fault", "smoke", "ok"] * 10))
    return d  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing", ["--init-from", "does not exist"]),
        ("corrupt", ["--init-from", "not a valid .keras archive"]),
        ("replay-high", ["--replay 1.5 is outside [0, 1]"]),
        ("replay-nan", ["outside [0, 1]"]),
        ("replay-no-old", ["needs old data"]),
        ("replay-no-init", ["--replay applies to fine-tuning"]),
        ("unlabelled", ["none is labelled"]),
        ("shape", ["shape (4,)", "(6,)"]),
        ("unknown-class", ["['smoke']", "fine-tuning keeps the model's classes"]),
        ("arch", ["--arch cnn conflicts", "built-in mlp"]),
        ("same-out", ["is the --init-from model"]),
        ("lr", ["--learning-rate must be a positive number"]),
        ("onnx", ["model", "has an unknown format"]),
    ],
)
def test_bad_fine_tune_requests_fail_in_one_line_before_training(
    small: Path, tmp_path: Path, case: str, fragments: list[str]
) -> None:
    m, old, new, out = small / "m.keras", small / "old.npz", small / "new.npz", tmp_path / "m2.keras"
    args: list[object] = ["train", "--init-from", m, "--data", old, "--data", new, "--out", out]
    if case == "missing":
        args[2] = tmp_path / "nope.keras"
    elif case == "corrupt":
        args[2] = tmp_path / "bad.keras"
        (tmp_path / "bad.keras").write_bytes(m.read_bytes()[:300])
    elif case == "replay-high":
        args += ["--replay", "1.5"]
    elif case == "replay-nan":
        args += ["--replay", "nan"]
    elif case == "replay-no-old":
        args = ["train", "--init-from", m, "--data", new, "--replay", "0.3", "--out", out]
    elif case == "replay-no-init":
        args = ["train", "--arch", "mlp", "--data", old, "--replay", "0.3", "--out", out]
    elif case == "unlabelled":
        args[6] = small / "unlabelled.npz"
    elif case == "shape":
        args[6] = small / "narrow.npz"
    elif case == "unknown-class":
        args[6] = small / "unknown.npz"
    elif case == "arch":
        args += ["--arch", "cnn"]
    elif case == "same-out":
        args[-1] = m
    elif case == "lr":
        args += ["--learning-rate", "0"]
    elif case == "onnx":
        (tmp_path / "m.tflite").write_bytes(b"x")
        args[2] = tmp_path / "m.tflite"
    code, _, err = _run(*args)
    _one_line_error(code, err, *fragments)
    assert not out.exists() or case == "same-out"


def test_train_without_arch_or_init_from_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = _run("train", "--data", tmp_path / "d.npz", "--out", tmp_path / "m.keras")
    assert code == 2 and "--arch" in err and "--init-from" in err


@pytest.mark.slow
def test_train_from_scratch_combines_data_and_drops_unlabelled(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.keras"
    code, stdout, err = _run(
        "train", "--arch", "mlp", "--data", small / "old.npz", "--data", small / "new.npz",
        "--epochs", 1, "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["samples"] == 100 and doc["unlabelled_dropped"] == 3 and doc["classes"] == NAMES
    assert "dropped 3 unlabelled samples" in err
