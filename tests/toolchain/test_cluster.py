"""``edgefleet build --cluster K``: at most K values per channel in the weights that ship, smaller after gzip.

Real builds on data unlike the digits: 12x12 single-channel images in [0, 1], two classes, 80/20
unbalanced (class 1 carries a bright bar). The shipped .tflite and .onnx files are read back to count
the distinct stored values per output channel; the accuracy gate still compares against the
unclustered float model; bad K is a one-line exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toolchain.cli import main
from toolchain.errors import ToolchainError
from toolchain.steps.cluster import (
    ClusterError,
    check_clusters,
    cluster_model,
    kernel_unique_per_channel,
    max_unique_per_channel,
    unique_weights,
)
from toolchain.steps.context import BuildOptions

TARGETS = ("mobile", "x86")


def run(*args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


# ------------------------------------------------------------------------------------------- fast, no TF


@pytest.mark.parametrize("k", [1, 257, 300, 0, -4, 2.5, "8", True, None])
def test_bad_k_is_refused_in_one_line(k: object) -> None:
    with pytest.raises(ClusterError) as e:
        check_clusters(k)
    msg = str(e.value)
    assert msg.startswith(f"--cluster {k!r} must be a whole number of clusters from 2 to 256")
    assert "\n" not in msg


@pytest.mark.parametrize("k", [2, 16, 256])
def test_good_k(k: int) -> None:
    assert check_clusters(k) == k
    BuildOptions(cluster=k).check()


def test_options_check_names_the_flag() -> None:
    with pytest.raises(ToolchainError, match=r"^--cluster 1 must be"):
        BuildOptions(cluster=1).check()
    assert BuildOptions(cluster=8).to_dict()["cluster"] == 8
    assert BuildOptions().to_dict()["cluster"] is None


def test_unique_per_channel_counts_each_output_channel() -> None:
    w = np.zeros((3, 3, 2, 4), np.float32)
    w[..., 0] = np.arange(18).reshape(3, 3, 2)  # 18 distinct values in channel 0
    w[..., 1] = 5.0
    assert max_unique_per_channel(w, 3) == 18
    assert max_unique_per_channel(w, 0) == 8  # rows along axis 0 mix channels: a different count


@pytest.mark.parametrize("k", ["1", "300", "2.5", "eight"])
def test_bad_k_on_the_command_line_exits_2(tmp_path: Path, k: str) -> None:
    code, _, err = run(
        "build", tmp_path / "m.keras", "--data", tmp_path / "d.npz", "--target", "mobile", "--cluster", k
    )
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--cluster" in errors[0], err
    assert not (tmp_path / "bundles").exists()


# ------------------------------------------------------------------------------------------ real builds


def _bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y): 12x12x1 images in [0, 1], 20 % class 1 with a bright horizontal bar."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int64)
    x = rng.uniform(0, 0.6, size=(n, 12, 12, 1)).astype(np.float32)
    for i in np.flatnonzero(y):
        row = rng.integers(2, 10)
        x[i, row : row + 2, 1:11, 0] = rng.uniform(0.85, 1.0)
    return x, y


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    d = tmp_path_factory.mktemp("bars")
    x, y = _bars(700, 1)
    xt, yt = _bars(300, 2)
    np.savez(d / "train.npz", x=x, y=y, class_names=np.array(["plain", "bar"]))
    np.savez(d / "test.npz", x=xt, y=yt, class_names=np.array(["plain", "bar"]))
    train_model(load_dataset(d / "train.npz"), "cnn", 8, d / "bars.keras", progress=False)
    return {"model": d / "bars.keras", "data": d / "train.npz", "test": d / "test.npz", "dir": d}


def _build(bars: dict[str, Path], tag: str, *flags: object) -> tuple[int, str, dict]:
    out = bars["dir"] / tag
    args: list[object] = ["build", bars["model"], "--data", bars["data"], "--eval-data", bars["test"]]
    for t in TARGETS:
        args += ["--target", t]
    code, _, err = run(*args, "--out", out, *flags)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    report["_out"] = str(out)
    return code, err, report


@pytest.fixture(scope="module")
def plain(bars: dict[str, Path]) -> dict:
    code, err, report = _build(bars, "plain", "--allow-accuracy-drop")
    assert code == 0, err
    return report


@pytest.fixture(scope="module")
def clustered(bars: dict[str, Path]) -> dict:
    code, err, report = _build(bars, "c4", "--cluster", "4", "--allow-accuracy-drop")
    assert code == 0, err
    return report


@pytest.mark.slow
def test_cluster_model_leaves_k_values_per_channel_and_the_original_alone(bars: dict[str, Path]) -> None:
    from toolchain.steps.data import load_dataset
    from toolchain.steps.models import load_model

    lm = load_model(bars["model"])
    before = kernel_unique_per_channel(lm.model)
    res = cluster_model(lm.model, load_dataset(bars["data"]), 5, epochs=1, progress=False)
    assert before > 5  # the trained model had many distinct values
    assert kernel_unique_per_channel(res.model) <= 5
    assert kernel_unique_per_channel(lm.model) == before  # the caller's model is untouched
    assert not any("cluster" in layer.name for layer in res.model.layers)  # wrappers stripped
    assert res.clustered_layers


@pytest.mark.slow
def test_shipped_files_keep_at_most_k_values_per_channel(clustered: dict, plain: dict) -> None:
    assert clustered["options"]["cluster"] == 4
    assert clustered["cluster"]["unique_per_channel_max_in_keras"] <= 4
    for t in TARGETS:
        entry = clustered["targets"][t]
        comp = entry["compression"]
        assert comp["clusters"] == 4
        # read back from the bundle on disk, not taken from the report
        model_file = next(
            p for p in (Path(clustered["_out"]) / t).iterdir() if p.suffix in (".tflite", ".onnx")
        )
        uw = unique_weights(model_file)
        assert uw == comp["unique_weights_per_channel"]
        assert uw["kernels"] >= 3 and uw["max"] <= 4
        assert plain["targets"][t]["compression"]["unique_weights_per_channel"]["max"] > 16


@pytest.mark.slow
def test_clustering_compresses_better_and_ota_cost_is_reported(clustered: dict, plain: dict) -> None:
    for t in TARGETS:
        c, p = clustered["targets"][t]["compression"], plain["targets"][t]["compression"]
        assert c["gzip_ratio"] < p["gzip_ratio"] * 0.8, (t, c, p)
        assert c["gzip_size_bytes"] == clustered["targets"][t]["gzip_size_bytes"]
        assert c["float_size_bytes"] == clustered["float"][c["float_format"]]["size_bytes"]
        assert c["ota_compressed"] is False
        bundle = Path(clustered["_out"]) / t
        assert c["ota_bytes"] == sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
        assert c["ota_gzip_bytes"] < c["ota_bytes"]
        # the gate compares with the float model as given, not with the clustered one
        assert clustered["targets"][t]["float_accuracy"] == clustered["float"]["accuracy"]
        assert "clustered_accuracy" in clustered["float"]


@pytest.mark.slow
def test_prune_cluster_qat_keeps_zeros_and_clusters(bars: dict[str, Path]) -> None:
    code, err, report = _build(
        bars, "pcqat", "--prune", "0.5", "--cluster", "6", "--quantize", "qat", "--allow-accuracy-drop"
    )
    assert code == 0, err
    assert report["options"] == {**report["options"], "prune": 0.5, "cluster": 6, "quantize": "qat"}
    assert report["cluster"]["preserve_sparsity"] is True
    for t in TARGETS:
        e = report["targets"][t]
        assert e["sparsity"] >= 0.45, (t, e["sparsity"])
        assert e["compression"]["unique_weights_per_channel"]["max"] <= 6
        assert e["accuracy"] >= 0.9  # 80 % is what always answering "plain" scores


@pytest.mark.slow
def test_accuracy_budget_still_fails_a_target_clustered_too_far(
    digits_cnn_path: Path, tmp_path: Path
) -> None:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "k2"
    code, _, err = run(
        "build",
        digits_cnn_path,
        "--data",
        repo / "calibration_data" / "digits.npz",
        "--eval-data",
        repo / "calibration_data" / "digits_test.npz",
        "--target",
        "mobile",
        "--cluster",
        "2",
        "--out",
        out,
    )
    report = json.loads((out / "report.json").read_text())
    entry = report["targets"]["mobile"]
    assert code == 1 and entry["status"] == "failed", err
    # measured against the float model as given (not the clustered one), and refused
    assert f"points below float {report['float']['accuracy']:.4f}" in entry["error"], entry["error"]
    assert report["float"]["clustered_accuracy"] < report["float"]["accuracy"]
    assert "--allow-accuracy-drop" in entry["error"]
    assert not (out / "mobile" / "manifest.json").exists()
    assert "Traceback" not in err


def test_onnx_models_refuse_clustering_in_one_line(tmp_path: Path) -> None:
    from toolchain.steps.inputs import check_onnx_options
    from toolchain.targets import resolve_targets

    with pytest.raises(ToolchainError) as e:
        check_onnx_options(tmp_path / "m.onnx", BuildOptions(cluster=8), resolve_targets(["x86"]))
    assert "clustering (--cluster)" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_summary_and_html_show_the_compression(clustered: dict, plain: dict) -> None:
    from toolchain.report import render_html, summary_table

    text = summary_table(clustered)
    for t in TARGETS:
        assert f"{t}: clustered to 4: gzip " in text and "uncompressed" in text
    assert "clustered to" not in summary_table(plain)
    assert "Model size after gzip" in render_html(clustered)
    assert "Model size after gzip" not in render_html(plain)
