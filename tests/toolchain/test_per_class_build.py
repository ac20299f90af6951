"""A real build that kills a minority class: the per-class gate catches it, overall accuracy does not.

Data unlike the shipped digits: two tabular columns of very different scales (pressure 0..4000 Pa,
leak rate 0.001..0.01) and two classes at 95/5. The model (set by hand, so the result is the same
on every CPU) says "leak" when the leak rate is above 0.0055 and ignores the pressure. Without
input normalisation an int8 model quantizes both columns with one per-tensor input scale (about 16
Pa per step), so every leak rate becomes 0 and the int8 model never says "leak": 5 points of
overall accuracy, 100 points of the minority's recall.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from toolchain.build import BuildError, build_bundles
from toolchain.steps.data import load_dataset
from toolchain.targets import resolve_targets

pytestmark = pytest.mark.slow

N_OK, N_LEAK = 380, 20  # 95/5 in each file


def _csv(path: Path, seed: int, n_ok: int = N_OK, n_leak: int = N_LEAK) -> Path:
    rng = np.random.default_rng(seed)
    pressure = rng.uniform(0.0, 4000.0, n_ok + n_leak)
    rate = np.concatenate([rng.uniform(0.001, 0.005, n_ok), rng.uniform(0.006, 0.01, n_leak)])
    state = ["ok"] * n_ok + ["leak"] * n_leak
    rows = "".join(f"{p:.2f},{r:.5f},{s}\n" for p, r, s in zip(pressure, rate, state, strict=True))
    path.write_text("pressure_pa,leak_rate,state\n" + rows)
    return path


def _model(path: Path, leak_index: int) -> Path:
    import tf_keras as keras

    model = keras.Sequential([keras.layers.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    ok_index = 1 - leak_index
    # logit(leak) = 200 * rate - 0.55 + 0.01 * pressure, logit(ok) = 0.55 + 0.01 * pressure: "leak" above a
    # rate of 0.0055. The pressure term cancels between the classes; it keeps the logits' range wide
    # enough for XNNPACK's int8 fully-connected kernel (which refuses output rescales of 256 and more).
    kernel = np.full((2, 2), 0.01, np.float32)
    kernel[1, leak_index], kernel[1, ok_index] = 200.0, 0.0
    bias = np.zeros(2, np.float32)
    bias[leak_index], bias[ok_index] = -0.55, 0.55
    model.layers[-1].set_weights([kernel, bias])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def leak_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("leaks")
    calib, test = _csv(d / "calib.csv", 1), _csv(d / "test.csv", 2)
    names = load_dataset(test, label="state").class_names
    model = _model(d / "leaks.keras", names.index("leak"))
    # A lenient overall budget (6 points), as a user who only watched overall accuracy would set.
    targets = [
        dataclasses.replace(t, limits=dataclasses.replace(t.limits, max_accuracy_drop=0.06))
        for t in resolve_targets(["mobile", "x86"])
    ]
    return {"dir": d, "calib": calib, "test": test, "model": model, "targets": targets, "names": names}


def _build(case: dict, out: Path, **kw: object) -> dict:
    return build_bundles(
        case["model"],
        case["calib"],
        case["targets"],
        out,
        eval_data=case["test"],
        label="state",
        progress=False,
        **kw,
    )


def test_the_gate_fails_a_build_that_silently_kills_the_minority_class(leak_case: dict) -> None:
    out = leak_case["dir"] / "gated"
    with pytest.raises(BuildError) as info:
        _build(leak_case, out)
    rep = info.value.report
    assert rep is not None and rep == json.loads((out / "report.json").read_text())
    assert rep["float"]["accuracy"] == 1.0
    assert rep["options"]["max_class_drop"] == 10.0
    for name in ("mobile", "x86"):
        e = rep["targets"][name]
        assert e["status"] == "failed" and not (out / name).exists()
        # The overall budget passed: 5 points inside the 6-point budget. Only the class gate caught it.
        assert e["accuracy"] == pytest.approx(0.95) and e["accuracy_budget"] == "ok"
        assert e["error"].startswith("class 'leak' recall 100.00% (float) -> 0.00% (int8, ")
        assert "100.00 points, 20 of 20 samples" in e["error"] and "--quantize qat" in e["error"]
        assert e["per_class"]["leak"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": N_LEAK}
        assert e["float_per_class"]["leak"]["recall"] == 1.0
        assert e["class_drop"]["failing"] == ["leak"]
        assert e["class_drop"]["worst"]["lost_samples"] == N_LEAK
        # every runtime the manifest would list was checked
        assert set(e["class_drop"]["per_runtime"]) == set(e["runtimes"])
    head = str(info.value)
    assert "\n" not in head and "class 'leak'" in head and "2 targets failed" in head
    page = (out / "report.html").read_text()
    assert page.count('<table class="cm">') == 4 and '<tr class="failed"><td>leak</td>' in page


def test_keys_and_values_are_consistent_and_the_gate_can_be_opened(leak_case: dict) -> None:
    out = leak_case["dir"] / "open"
    rep = _build(leak_case, out, max_class_drop=100)
    names = leak_case["names"]
    y = load_dataset(leak_case["test"], label="state").y
    n = len(y)
    assert rep["labels"] == names
    assert sum(m["support"] for m in rep["float"]["per_class"].values()) == n
    for name in ("mobile", "x86"):
        e = rep["targets"][name]
        assert (
            e["status"] == "ok"
            and e["class_drop_budget"] == "ok"
            and (out / name / "manifest.json").is_file()
        )
        for pc_key, cm_key in (
            ("per_class", "confusion_matrix"),
            ("float_per_class", "float_confusion_matrix"),
        ):
            pc, cm = e[pc_key], np.array(e[cm_key])
            assert list(pc) == names and cm.shape == (2, 2)
            assert sum(m["support"] for m in pc.values()) == n == cm.sum()
            for i, label in enumerate(names):
                assert cm[i].sum() == pc[label]["support"] == np.sum(y == i)
                assert pc[label]["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
            assert np.trace(cm) / n == pytest.approx(
                e["accuracy" if pc_key == "per_class" else "float_accuracy"]
            )
        assert e["float_per_class"] == rep["float"]["per_class"]
        leak, ok = names.index("leak"), names.index("ok")
        killed = [0, 0]
        killed[ok] = N_LEAK  # every leak answered "ok"
        assert e["confusion_matrix"][leak] == killed and e["confusion_matrix"][ok][ok] == N_OK
    # the evaluation of a shipped bundle reports the same per-class numbers
    from toolchain.steps.evaluate import evaluate_bundle

    ev = evaluate_bundle(
        out / "mobile", load_dataset(leak_case["test"], label="state"), repeats=3, progress=False
    )
    assert ev["per_class"] == rep["targets"]["mobile"]["per_class"]
    assert ev["confusion_matrix"] == rep["targets"]["mobile"]["confusion_matrix"]
    assert ev["per_runtime"][ev["preferred_runtime"]]["per_class"] == ev["per_class"]
    # and on the terminal: the per-class table and the matrix
    from click.testing import CliRunner

    from toolchain.cli import main

    res = CliRunner().invoke(
        main, ["evaluate", str(out / "x86"), "--data", str(leak_case["test"]), "--label", "state"]
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(ln.split()[:5] == ["leak", "20", "-", "0.00%", "0.00%"] for ln in lines), res.stdout
    assert "confusion matrix (rows true, columns predicted):" in res.stdout
    assert any(ln.split() == ["leak", *map(str, killed)] for ln in lines), res.stdout


def test_the_cli_fails_in_one_line_where_overall_accuracy_moves_half_a_point(leak_case: dict) -> None:
    """99.5/0.5 evaluation data and the stock raspberry-pi profile (1-point budget): only the class gate fails."""
    from click.testing import CliRunner

    from toolchain.cli import main

    d = leak_case["dir"]
    test = _csv(d / "test_rare.csv", 3, n_ok=1990, n_leak=10)
    out = d / "cli"
    args = ["build", str(leak_case["model"]), "--data", str(leak_case["calib"]), "--eval-data", str(test)]
    args += ["--label", "state", "--target", "raspberry-pi", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr
    assert err[0].startswith(
        "Error: raspberry-pi: class 'leak' recall 100.00% (float) -> 0.00% (int8, litert): 100.00 points,"
        " 10 of 10 samples, over the 10-point limit of --max-class-drop; try --quantize qat"
    ), err[0]
    assert "raspberry-pi: worst class 'leak'" in res.stdout
    assert "under 20 eval samples" in res.stdout  # 10 samples of 'leak': said so
    rep = json.loads((out / "report.json").read_text())
    e = rep["targets"]["raspberry-pi"]
    assert e["accuracy_budget"] == "ok" and e["float_accuracy"] - e["accuracy"] == pytest.approx(0.005)
    assert not (out / "raspberry-pi").exists()
