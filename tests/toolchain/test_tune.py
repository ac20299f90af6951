"""``edgefleet tune``: the study, the budget verdicts, the honest split, resume and local workers.

The slow tests run the real command (a real build per trial, SQLite study) on a 2-class [0, 1]
16x16x3 image set made here (unbalanced 60/40), with tiny trials (cnn, at most 2 epochs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolchain.steps.data import Dataset
from toolchain.tune.results import pareto_front, pick_best
from toolchain.tune.run import effective_budget, shares
from toolchain.tune.study import TuneError, storage_url
from toolchain.tune.trial import split_eval, violation

TUNE_TIMEOUT_S = 900


# --------------------------------------------------------------------------------------------------
# Logic (no TensorFlow)


def _ds(y: list[int]) -> Dataset:
    x = np.random.default_rng(0).uniform(0, 1, (len(y), 3)).astype(np.float32)
    return Dataset(x, np.array(y, dtype=np.int64), None, ["a", "b", "c"], "mem")


def test_held_out_split_is_disjoint_stratified_and_seeded() -> None:
    y = [0] * 50 + [1] * 30 + [2] * 7  # unbalanced, a small class
    ds = _ds(y)
    sel, hold, si, hi = split_eval(ds, 0.5, seed=3)
    assert set(si).isdisjoint(hi) and sorted(si + hi) == list(range(len(y)))
    assert sel.n == len(si) and hold.n == len(hi)
    for c in range(3):  # every class on both sides
        assert (sel.y == c).any() and (hold.y == c).any()
    # the samples are the ones the indices name (no reordering of labels against samples)
    np.testing.assert_array_equal(sel.x, ds.x[si])
    np.testing.assert_array_equal(hold.y, ds.y[hi])
    assert split_eval(ds, 0.5, seed=3)[2] == si
    assert split_eval(ds, 0.5, seed=4)[2] != si


def _cand(n: int, acc: float, size: int, lat: float, ok: bool = True) -> dict[str, Any]:
    return {
        "trial": n,
        "within_budget": ok,
        "status": "within_budget" if ok else "over_budget",
        "accuracy": acc,
        "size_bytes": size,
        "latency_ms": lat,
    }


def test_pareto_front_and_best_use_only_candidates_within_budget() -> None:
    cands = [
        _cand(0, 0.90, 1000, 1.0),
        _cand(1, 0.95, 2000, 1.0),
        _cand(2, 0.89, 1500, 2.0),  # dominated by 0
        _cand(3, 0.99, 100, 0.1, ok=False),  # dominates all, but over budget
        _cand(4, 0.95, 2000, 0.5),  # dominates 1
    ]
    assert pareto_front(cands) == [0, 4]
    best = pick_best(cands)
    assert best is not None and best["trial"] == 4
    assert pick_best([_cand(0, 0.9, 1, 1.0, ok=False)]) is None


def test_budget_is_the_tighter_of_target_and_command_line() -> None:
    assert effective_budget(None, {"max_model_bytes": 5000, "max_latency_ms": None}) == {
        "max_model_bytes": 5000
    }
    got = effective_budget(
        {"max_model_bytes": 4000, "max_arena_bytes": 100, "min_edgetpu_op_share": 0.9},
        {"max_model_bytes": 5000, "max_arena_bytes": 50},
    )
    assert got == {"max_model_bytes": 4000, "max_arena_bytes": 50, "min_edgetpu_op_share": 0.9}


def test_trials_are_shared_among_workers_exactly() -> None:
    assert shares(4, 2) == [2, 2] and shares(5, 2) == [3, 2] and shares(1, 3) == [1]
    assert sum(shares(7, 3)) == 7


def test_storage_urls(tmp_path: Path) -> None:
    assert storage_url(None, tmp_path) == f"sqlite:///{(tmp_path / 'study.sqlite3').resolve()}"
    assert storage_url("postgresql://u@h:5432/d", tmp_path) == "postgresql+psycopg://u@h:5432/d"
    for bad in ("mysql://x/y", "study.db", "sqlite://", "postgresql+psycopg://"):
        with pytest.raises(TuneError, match="--storage"):
            storage_url(bad, tmp_path)


def test_violation_measures_how_far_over() -> None:
    assert violation("within_budget", None) == 0.0
    v = {"max_model_bytes": {"budget": 1000, "measured": 1500, "ok": False}}
    assert violation("over_budget", v) == pytest.approx(0.5)
    assert violation("over_budget", {}) == 1.0  # over a gate without a ratio (accuracy drop)


# --------------------------------------------------------------------------------------------------
# The command


def _images(tmp_path: Path) -> tuple[Path, Path]:
    """A 2-class [0, 1] 16x16x3 set: class 0 brighter on top, class 1 at the bottom; 60/40 split."""
    rng = np.random.default_rng(7)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.uniform(size=n) < 0.4).astype(np.int64)
        x = rng.uniform(0, 0.5, (n, 16, 16, 3)).astype(np.float32)
        x[y == 0, :8] += 0.5
        x[y == 1, 8:] += 0.5
        return x, y

    x, y = make(240)
    xt, yt = make(120)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "eval.npz", x=xt, y=yt)
    return tmp_path / "train.npz", tmp_path / "eval.npz"


def _tune(
    args: list[str], env: dict[str, str], timeout: float = TUNE_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    env = {**env, "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "toolchain.cli", "tune", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _common(train: Path, evald: Path, out: Path) -> list[str]:
    return [
        "--data",
        str(train),
        "--eval-data",
        str(evald),
        "--target",
        "mobile",
        "--arch",
        "cnn",
        "--epochs",
        "2",
        "--out",
        str(out),
    ]


def test_bad_input_is_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    train, evald = _images(tmp_path)
    cases = [
        (["--target", "rpi"], "unknown target 'rpi'"),
        (["--storage", "mysql://x/y"], "--storage 'mysql://x/y' is not a study database URL"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the study database"),
        (["--arch", "mlp", "--arch", "cnn", "--data", str(tmp_path / "missing.npz")], "missing.npz"),
    ]
    for extra, msg in cases:
        args = ["--data", str(train), "--eval-data", str(evald), "--target", "mobile", "--trials", "1"]
        args += ["--out", str(tmp_path / "o"), *extra]
        res = _tune(args, cli_env, timeout=120)
        assert res.returncode == 1, (extra, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and msg in lines[0], (extra, res.stderr)
        assert res.stdout == ""
    res = _tune(
        ["--data", str(train), "--eval-data", str(evald), "--target", "mobile", "--trials", "0"], cli_env
    )
    assert res.returncode == 2 and "--trials" in res.stderr


def _check_candidates(out: Path, doc: dict[str, Any]) -> None:
    """Every candidate's figures are its build report's; bundles exist only within budget."""
    for c in doc["candidates"]:
        assert c["status"] in ("within_budget", "over_budget", "failed", "interrupted"), c
        if c["status"] in ("failed", "interrupted"):
            assert c["reason"]
            continue
        entry = json.loads((out / c["report"]).read_text())["targets"]["mobile"]
        assert c["accuracy"] == entry["accuracy"] and c["size_bytes"] == entry["size_bytes"]
        assert c["arena_bytes"] == entry["arena_bytes"] and c["latency_ms"] == entry["latency_ms_p95"]
        assert c["within_budget"] == (entry["status"] == "ok")
        if c["within_budget"]:
            assert (out / c["bundle"] / "manifest.json").is_file()
        else:
            assert c["reason"] == entry["error"]


@pytest.mark.slow
def test_tune_writes_pareto_best_bundle_and_resumes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    train, evald = _images(tmp_path)
    out = tmp_path / "search"
    res = _tune([*_common(train, evald, out), "--trials", "2", "--json"], cli_env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == json.loads((out / "pareto.json").read_text()) | {"search_s": doc["search_s"]}
    assert [c["trial"] for c in doc["candidates"]] == [0, 1]
    assert doc["trials"]["requested"] == 2 and doc["trials"]["total"] == 2
    _check_candidates(out, doc)
    for c in doc["candidates"]:
        s = c["settings"]
        assert s["arch"] == "cnn" and 1 <= s["epochs"] <= 2 and s["quantize"] in ("ptq", "qat")
        assert {"width", "depth", "resolution"} <= set(s["arch_options"])
    # the honest split: selection + held-out = the eval data, the winner measured on the held-out part
    assert doc["selection"]["samples"] + doc["holdout"]["samples"] == 120
    best = doc["best"]
    assert best is not None and best["bundle"] == "best/mobile"
    assert (out / "best" / "mobile" / "manifest.json").is_file()
    assert 0.5 <= best["holdout_accuracy"] <= 1.0
    assert set(doc["pareto_front"]) <= {c["trial"] for c in doc["candidates"] if c["within_budget"]}
    assert best["trial"] in doc["pareto_front"]
    html = (out / "report.html").read_text()
    assert (
        "<svg" in html
        and "held-out" in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    first = {c["trial"]: c for c in doc["candidates"]}
    stamps = {n: (out / first[n]["report"]).stat().st_mtime_ns for n in first}

    # the same command without --resume refuses to touch the study
    res = _tune([*_common(train, evald, out), "--trials", "3"], cli_env)
    assert res.returncode == 1 and "pass --resume" in res.stderr.strip().splitlines()[-1]

    # resume towards 4 and interrupt it (Ctrl-C) while trial 2 trains
    env = {**cli_env, "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "toolchain.cli", "tune", *_common(train, evald, out), "--trials", "4"]
    proc = subprocess.Popen(
        [*args, "--resume"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test run in the background inherits SIGINT ignored; Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + TUNE_TIMEOUT_S
        while not (out / "trials" / "0002").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "tune ended before trial 2"
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TUNE_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    stopped = json.loads((out / "pareto.json").read_text())
    assert [c["status"] for c in stopped["candidates"]][2] == "interrupted"

    # resume again, with two workers: 0 and 1 are not re-run, the interrupted one stays recorded and
    # does not count, so two more trials make the 4
    res = _tune(
        [*_common(train, evald, out), "--trials", "4", "--workers", "2", "--resume", "--json"], cli_env
    )
    assert res.returncode == 0, res.stderr
    doc2 = json.loads(res.stdout)
    assert [c["trial"] for c in doc2["candidates"]] == [0, 1, 2, 3, 4]
    assert doc2["candidates"][2]["status"] == "interrupted" and doc2["trials"]["interrupted"] == 1
    assert doc2["trials"]["total"] - doc2["trials"]["interrupted"] == 4
    # the two new trials were shared by the two local workers, one each, through the one study
    assert sorted(c["worker"] for c in doc2["candidates"][3:]) == [0, 1] and doc2["warnings"] == []
    for n, c in first.items():  # not re-run: same records, same report files
        assert doc2["candidates"][n] == c
        assert (out / c["report"]).stat().st_mtime_ns == stamps[n]
    _check_candidates(out, doc2)


@pytest.mark.slow
def test_impossible_budget_is_one_line_and_keeps_the_trials(tmp_path: Path, cli_env: dict[str, str]) -> None:
    train, evald = _images(tmp_path)
    out = tmp_path / "search"
    res = _tune([*_common(train, evald, out), "--trials", "1", "--max-model-bytes", "100"], cli_env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: none of the 1 trials met every budget"), res.stderr
    assert "max_model_bytes" in lines[0]
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["best"] is None and doc["budget"]["max_model_bytes"] == 100
    (c,) = doc["candidates"]
    assert c["status"] == "over_budget" and "max_model_bytes" in c["reason"] and c["size_bytes"] > 100
    assert not (out / "best").exists()
    _check_candidates(out, doc)
    assert os.path.getsize(out / "report.html") > 0


@pytest.mark.slow
def test_architecture_knobs_change_the_model_as_documented() -> None:
    from toolchain.steps.architectures import build_architecture

    x = np.random.default_rng(0).uniform(0, 1, (10, 16, 16, 3)).astype(np.float32)
    m = build_architecture("cnn", x, 2, width=2.0, depth=3, resolution=0.5)
    convs = [layer for layer in m.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 64, 128]
    assert tuple(m.get_layer("resize").output_shape[1:3]) == (8, 8)
    assert m.input_shape[1:] == (16, 16, 3)  # the device still sends full-size images
    mlp = build_architecture("mlp", x, 2, width=0.5, depth=3)
    assert [d.units for d in mlp.layers if type(d).__name__ == "Dense"] == [32, 16, 8, 2]
    mn = build_architecture("mobilenetv2", x, 2, alpha=0.5, resolution=0.5)
    assert tuple(mn.get_layer("resize").output_shape[1:3]) == (32, 32)  # never below MobileNetV2's 32
    with pytest.raises(Exception, match="resolution"):
        build_architecture("cnn", x, 2, resolution=1.5)


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask/tell here, optimize in tune
def test_study_on_postgresql_is_shared_and_guarded(postgres_url: str, tmp_path: Path) -> None:
    """The many-machines path: a study in PostgreSQL (psycopg 3), joined with --resume, same spec only."""
    import dataclasses

    from toolchain.tune.study import TuneSpec, open_storage, open_study

    url = storage_url(postgres_url, tmp_path)
    assert url.startswith("postgresql+psycopg://")
    spec = TuneSpec("mobile", {"max_model_bytes": 5000}, ["cnn"], 2, 0, 0.5, "a" * 64, "b" * 64, True, "s")
    study = open_study(open_storage(url), "cam", spec, resume=False)
    trial = study.ask()
    trial.set_user_attr("status", "within_budget")
    study.tell(trial, (0.9, 1000.0, 1.0))
    # another machine joins: same spec with --resume sees the trial; without --resume it is refused
    joined = open_study(open_storage(url), "cam", spec, resume=True)
    assert [t.user_attrs["status"] for t in joined.trials] == ["within_budget"]
    with pytest.raises(TuneError, match="pass --resume"):
        open_study(open_storage(url), "cam", spec, resume=False)
    other = dataclasses.replace(spec, data_sha256="c" * 64)
    with pytest.raises(TuneError, match="data_sha256"):
        open_study(open_storage(url), "cam", other, resume=True)
