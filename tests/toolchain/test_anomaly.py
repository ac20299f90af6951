"""Anomaly detection (issue 15): train --task anomaly --arch autoencoder -> build -> the real agent.

Data made in code, unlike the digits (tests/fabricate.py): 8 tabular columns in units from 0.001 to
4000 whose normal rows follow two hidden factors (anomalies break the structure or spike one
column), and 16x16 [0, 1] images of smooth blobs (anomalies: stripes and speckle). The bundles are
real conversions (mobile: LiteRT float I/O, raspberry-pi: full int8, x86: ONNX QDQ in ONNX Runtime
and OpenVINO); the agent is the real one (``edgefleet-agent predict --json`` in a child process,
``device_agent.Agent`` in this one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.agent import Agent
from device_agent.formats.manifest import BundleError, Manifest, load_manifest
from tests.fabricate import anomaly_images, anomaly_tabular
from toolchain.cli import main
from toolchain.steps.anomaly import (
    AnomalyError,
    anomaly_truth,
    auroc,
    check_percentile,
    detection,
    normal_rows,
    pick_threshold,
)
from toolchain.steps.data import Dataset

AGENT = [sys.executable, "-c", "from device_agent.cli import main; main(prog_name='edgefleet-agent')"]
TIMEOUT_S = 120
TAB_EPOCHS = 30
IMG_EPOCHS = 25


# ------------------------------------------------------------------------------------------ unit


def test_auroc_matches_pairwise_counting_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 200).astype(float)  # many ties, as quantized scores have
    t = (rng.random(200) < 0.3).astype(int)
    pos, neg = s[t == 1], s[t == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(s, t) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert auroc(s, np.zeros(200)) is None
    assert auroc(-s, t) == pytest.approx(1 - pairs / (len(pos) * len(neg)))


def test_threshold_and_detection_at_it() -> None:
    normal = np.arange(1, 101, dtype=float)
    assert pick_threshold(normal, 99) == pytest.approx(np.percentile(normal, 99))
    scores = np.array([0.1, 0.2, 0.9, 0.95, 0.3])
    truth = np.array([0, 0, 1, 0, 1])
    d = detection(scores, truth, 0.5)  # flags 0.9 (anomaly) and 0.95 (normal)
    assert (d.precision, d.recall, d.false_positive_rate, d.flagged) == (0.5, 0.5, 1 / 3, 2)
    for bad in (0, 100, -1, 101.5, True, "99"):
        with pytest.raises(AnomalyError, match="--threshold-percentile"):
            check_percentile(bad)  # type: ignore[arg-type]


def test_labels_given_to_anomaly_data_are_ignored_when_normal_and_refused_otherwise() -> None:
    x = np.zeros((4, 3), np.float32)
    normal = Dataset(x, np.zeros(4, np.int64), None, ["normal"], "n.npz")
    assert not normal_rows(normal).labelled
    mixed = Dataset(x, np.array([0, 1, 0, 1]), None, ["0", "1"], "m.npz")
    with pytest.raises(AnomalyError, match="2 samples labelled as anomalies.*normal samples only"):
        normal_rows(mixed)
    classes = Dataset(x, np.array([0, 1, 2, 2]), None, ["cat", "dog", "fox"], "c.npz")
    with pytest.raises(AnomalyError, match="labels"):
        normal_rows(classes)
    assert anomaly_truth(mixed).tolist() == [0, 1, 0, 1]  # type: ignore[union-attr]
    with pytest.raises(AnomalyError, match="0 \\(normal\\) or 1 \\(anomaly\\)"):
        anomaly_truth(classes)


@pytest.mark.slow
def test_manifest_anomaly_task_is_checked(anomaly_bundles: dict[str, Path]) -> None:
    doc = load_manifest(anomaly_bundles["tab"] / "mobile").to_dict()
    assert doc["task"]["type"] == "anomaly" and doc["labels"] == ["normal", "anomaly"]
    for key, bad in (
        ("threshold", -1.0),
        ("threshold", float("nan")),
        ("threshold_percentile", 100),
        ("score", "l1"),
        ("extra", 1),
    ):
        d = json.loads(json.dumps(doc))
        d["task"][key] = bad
        with pytest.raises(BundleError, match="task"):
            Manifest.from_dict(d)
    d = json.loads(json.dumps(doc))
    d["labels"] = ["ok", "bad"]
    with pytest.raises(BundleError, match="anomaly bundle's labels"):
        Manifest.from_dict(d)


# ------------------------------------------------------------------------------------------ e2e


@pytest.fixture(scope="module")
def anomaly_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("anomaly-data")
    x, _ = anomaly_tabular(300, 0.0, seed=0)
    xe, ye = anomaly_tabular(200, 0.25, seed=1)
    np.savez(d / "tab.npz", x=x, y=np.zeros(len(x), np.int64))  # all-normal labels: ignored
    np.savez(d / "tab_eval.npz", x=xe, y=ye)
    xi, _ = anomaly_images(200, 0.0, seed=0)
    xie, yie = anomaly_images(120, 0.25, seed=1)
    np.savez(d / "img.npz", x=xi)
    np.savez(d / "img_eval.npz", x=xie, y=yie)
    return d


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def anomaly_bundles(anomaly_data: Path) -> dict[str, Path]:
    """Train both autoencoders with the CLI and build mobile + x86 (+ raspberry-pi for tabular)."""
    out: dict[str, Path] = {}
    for kind, epochs, targets in (
        ("tab", TAB_EPOCHS, ["mobile", "x86", "raspberry-pi"]),
        ("img", IMG_EPOCHS, ["mobile", "x86"]),
    ):
        model = anomaly_data / f"{kind}.keras"
        res = _invoke(
            [
                "train",
                "--task",
                "anomaly",
                "--arch",
                "autoencoder",
                "--data",
                str(anomaly_data / f"{kind}.npz"),
            ]
            + ["--epochs", str(epochs), "--out", str(model), "--json"]
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["task"] == "anomaly"
        bundles = anomaly_data / f"{kind}-bundles"
        args = ["build", str(model), "--task", "anomaly", "--data", str(anomaly_data / f"{kind}.npz")]
        args += ["--eval-data", str(anomaly_data / f"{kind}_eval.npz"), "--out", str(bundles), "--json"]
        for t in targets:
            args += ["--target", t]
        res = _invoke(args)
        assert res.exit_code == 0, res.output
        out[kind] = bundles
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tab", "img"])
def test_int8_keeps_the_ranking_and_the_report_measures_the_device_path(
    anomaly_bundles: dict[str, Path], kind: str
) -> None:
    report = json.loads((anomaly_bundles[kind] / "report.json").read_text())
    assert report["task"]["type"] == "anomaly" and report["labels"] == ["normal", "anomaly"]
    assert report["float"]["auroc"] > 0.97
    assert "<th>AUROC</th>" in (anomaly_bundles[kind] / "report.html").read_text()
    for name, e in report["targets"].items():
        assert e["status"] == "ok", (name, e["error"])
        assert e["auroc"] > 0.95 and abs(e["auroc"] - e["float_auroc"]) <= 0.02, (name, e)
        assert e["recall"] > 0.8 and e["precision"] > 0.7, (name, e)
        # every runtime, one sample at a time and in the agent's batches
        assert set(e["per_runtime"]) == set(e["runtimes"])
        for rt, fig in e["per_runtime"].items():
            assert set(fig["paths"]) == {"batch_1", "batch_64"}, rt
        m = load_manifest(anomaly_bundles[kind] / name)
        assert m.task == {
            "type": "anomaly",
            "score": "reconstruction_mse",
            "threshold": pytest.approx(e["threshold"]),
            "threshold_percentile": 99.0,
        }
        assert m.metrics["auroc"] == pytest.approx(e["auroc"])


@pytest.mark.slow
def test_threshold_is_the_percentile_of_the_int8_scores_on_the_device_path(
    anomaly_bundles: dict[str, Path], anomaly_data: Path
) -> None:
    x = np.load(anomaly_data / "tab.npz")["x"]
    for target in ("raspberry-pi", "x86"):
        bundle = anomaly_bundles["tab"] / target
        m = load_manifest(bundle)
        agent = Agent(bundle, allow_unsigned=True, runtime=m.model.runtimes[0].value)
        scores = np.array([agent.predict(row).scores[0] for row in x])
        assert m.task is not None
        assert m.task["threshold"] == pytest.approx(float(np.percentile(scores, 99)), rel=1e-6)
        report = json.loads((anomaly_bundles["tab"] / "report.json").read_text())
        assert report["targets"][target]["calibration_flagged"] == int((scores > m.task["threshold"]).sum())


@pytest.mark.slow
def test_agent_predict_json_gives_label_and_score_and_windows_count_anomalies(
    anomaly_bundles: dict[str, Path], anomaly_data: Path
) -> None:
    ev = np.load(anomaly_data / "tab_eval.npz")
    for target in ("mobile", "x86"):
        bundle = anomaly_bundles["tab"] / target
        proc = subprocess.run(
            [*AGENT, "predict", "--bundle", str(bundle), "--input", str(anomaly_data / "tab_eval.npz")]
            + ["--label", "y", "--json"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        threshold = load_manifest(bundle).anomaly_threshold
        assert doc["task"] == "anomaly" and doc["threshold"] == pytest.approx(threshold)
        preds = doc["predictions"]
        assert len(preds) == len(ev["y"])
        for p in preds:
            assert p["label"] == ("anomaly" if p["score"] > threshold else "normal")
            assert p["scores"] == [p["score"]] and p["score"] >= 0
        flagged = np.array([p["label"] == "anomaly" for p in preds])
        assert flagged[ev["y"] == 1].mean() > 0.8 and flagged[ev["y"] == 0].mean() < 0.1
        assert doc["accuracy"] == pytest.approx(float(np.mean(flagged == (ev["y"] == 1))))
    # the window's class counts are the decisions: the anomaly rate per device is the class share
    agent = Agent(anomaly_bundles["tab"] / "raspberry-pi", allow_unsigned=True)
    labels = [agent.predict(row).labels[0] for row in ev["x"][:50]]
    labels += agent.predict(ev["x"][50:]).labels
    counts = agent.close_window().profile.class_counts.tolist()
    assert counts == [labels.count("normal"), labels.count("anomaly")]


@pytest.mark.slow
def test_image_bundle_on_the_agent(anomaly_bundles: dict[str, Path], anomaly_data: Path) -> None:
    ev = np.load(anomaly_data / "img_eval.npz")
    agent = Agent(anomaly_bundles["img"] / "mobile", allow_unsigned=True)
    got = [agent.predict(img) for img in ev["x"]]
    scores = np.array([g.scores[0] for g in got])
    assert auroc(scores, ev["y"]) > 0.95
    threshold = agent.model.manifest.anomaly_threshold
    assert [g.labels[0] for g in got] == ["anomaly" if s > threshold else "normal" for s in scores]


# ------------------------------------------------------------------------------------------ refusals


def _one_line_error(res: Any, code: int, pattern: str) -> None:
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) >= 1 and any(pattern in ln for ln in lines), res.output
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), res.output


def test_training_refuses_anomalies_and_mismatched_task_or_arch(tmp_path: Path) -> None:
    x, y = anomaly_tabular(60, 0.2, seed=3)
    np.savez(tmp_path / "mixed.npz", x=x, y=y)
    out = str(tmp_path / "m.keras")
    base = ["train", "--data", str(tmp_path / "mixed.npz"), "--out", out]
    res = CliRunner().invoke(main, [*base, "--task", "anomaly", "--arch", "autoencoder"])
    _one_line_error(res, 1, "labelled as anomalies")
    res = CliRunner().invoke(main, [*base, "--arch", "autoencoder"])
    _one_line_error(res, 1, "--task anomaly")
    res = CliRunner().invoke(main, [*base, "--task", "anomaly", "--arch", "mlp"])
    _one_line_error(res, 1, "--arch autoencoder")
    assert not Path(out).exists()


@pytest.mark.slow
def test_build_refuses_bad_percentiles_anomalous_data_and_the_wrong_task(
    anomaly_bundles: dict[str, Path], anomaly_data: Path, tmp_path: Path
) -> None:
    model = str(anomaly_data / "tab.keras")
    base = ["build", model, "--task", "anomaly", "--target", "x86", "--out", str(tmp_path / "b")]
    for bad in ("100", "0", "150", "abc"):
        res = CliRunner().invoke(
            main, [*base, "--data", str(anomaly_data / "tab.npz"), "--threshold-percentile", bad]
        )
        _one_line_error(res, 2, "--threshold-percentile")
    res = CliRunner().invoke(main, [*base, "--data", str(anomaly_data / "tab_eval.npz")])
    _one_line_error(res, 1, "labelled as anomalies")
    res = CliRunner().invoke(
        main, ["build", model, "--data", str(anomaly_data / "tab.npz"), "--target", "x86"]
    )
    _one_line_error(res, 1, "build it with --task anomaly")
    res = CliRunner().invoke(main, [*base, "--data", str(anomaly_data / "tab.npz"), "--prune", "0.5"])
    _one_line_error(res, 1, "--prune is not available for --task anomaly")
    assert not (tmp_path / "b" / "x86").exists()


@pytest.mark.slow
def test_evaluate_remeasures_an_anomaly_bundle_like_the_build(
    anomaly_bundles: dict[str, Path], anomaly_data: Path
) -> None:
    res = _invoke(
        [
            "evaluate",
            str(anomaly_bundles["tab"] / "x86"),
            "--data",
            str(anomaly_data / "tab_eval.npz"),
            "--json",
        ]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    built = json.loads((anomaly_bundles["tab"] / "report.json").read_text())["targets"]["x86"]
    assert doc["threshold"] == pytest.approx(built["threshold"]) and doc["anomalies"] > 0
    for rt, fig in doc["per_runtime"].items():
        for k in ("auroc", "precision", "recall", "false_positive_rate"):
            assert fig[k] == pytest.approx(built["per_runtime"][rt][k]), (rt, k)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_http_api_labels_scores_and_feedback_follow_the_decision(
    anomaly_bundles: dict[str, Path], anomaly_data: Path
) -> None:
    from device_agent.api import ApiServer
    from tests.device_agent.agent_helpers import http

    ev = np.load(anomaly_data / "tab_eval.npz")
    srv = ApiServer(Agent(anomaly_bundles["tab"] / "x86", allow_unsigned=True), "127.0.0.1:0")
    srv.start()
    try:
        base = "http://" + srv.address
        code, out = http(base, "/v1/predict", {"inputs": ev["x"][:20].tolist()})
        assert code == 200
        threshold = srv.agent.model.manifest.anomaly_threshold
        assert out["labels"] == ["anomaly" if s > threshold else "normal" for s in out["scores"]]
        assert [row[0] for row in out["outputs"]] == pytest.approx(out["scores"])
        truth = ["anomaly" if v else "normal" for v in ev["y"][:20]]
        code, res = http(
            base,
            "/v1/feedback",
            {"items": [{"id": i, "label": t} for i, t in zip(out["ids"], truth, strict=True)]},
        )
        assert code == 200 and res["counted"] == 20
        right = sum(p == t for p, t in zip(out["labels"], truth, strict=True))
        assert [r["outcome"] for r in res["results"]].count("correct") == right
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_anomaly_rate_drift_alerts_on_a_faulty_sensor_and_stays_silent_on_clean_data(
    anomaly_bundles: dict[str, Path],
) -> None:
    """The fleet's class-prior PSI watches the anomaly rate: windows of a device whose sensor gain
    went wrong (one column x1.5) alert; windows of clean normal data stay silent."""
    from device_agent.formats.stats import baseline_from_dict
    from toolchain.fleet.drift import compare

    bundle = anomaly_bundles["tab"] / "raspberry-pi"
    baseline = baseline_from_dict(json.loads((bundle / "baseline.json").read_text()))
    assert baseline.class_counts[1] / baseline.count < 0.03  # about 1 % above the 99th percentile
    agent = Agent(bundle, allow_unsigned=True)
    clean, _ = anomaly_tabular(400, 0.0, seed=5)
    faulty = clean.copy()
    faulty[:, 5] *= 1.5
    for row in clean:
        agent.predict(row)
    quiet = compare(baseline, agent.close_window().profile)
    for row in faulty:
        agent.predict(row)
    window = agent.close_window().profile
    loud = compare(baseline, window)
    assert window.class_counts[1] / window.count > 0.2  # the anomaly rate of the faulty device
    assert quiet.class_psi is not None and quiet.class_psi < 0.1 and quiet.output_state == "ok"
    assert loud.class_psi is not None and loud.class_psi > 0.2 and loud.output_state == "alert"


@pytest.mark.slow
def test_build_without_eval_data_holds_out_normal_samples(
    anomaly_bundles: dict[str, Path], anomaly_data: Path, tmp_path: Path
) -> None:
    """No --eval-data: 20 % of the normal --data is held out; no AUROC (no anomalies), but the share
    of held-out normal samples above the threshold is measured, and the threshold still comes from
    the rest on the device path."""
    res = _invoke(
        [
            "build",
            str(anomaly_data / "tab.keras"),
            "--task",
            "anomaly",
            "--data",
            str(anomaly_data / "tab.npz"),
        ]
        + ["--target", "x86", "--threshold-percentile", "95", "--out", str(tmp_path / "b"), "--json"]
    )
    assert res.exit_code == 0, res.output
    e = json.loads(res.stdout)["targets"]["x86"]
    assert e["status"] == "ok" and e["auroc"] is None and e["recall"] is None
    assert 0 <= e["false_positive_rate"] < 0.25
    assert e["threshold_percentile"] == 95.0
    assert load_manifest(tmp_path / "b" / "x86").task["threshold_percentile"] == 95.0  # type: ignore[index]
    # 5 % of the 240 calibration rows are above the 95th percentile of their own scores
    assert 6 <= e["calibration_flagged"] <= 18
