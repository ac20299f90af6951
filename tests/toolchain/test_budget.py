"""Device budgets: the ``[budget]`` table, arena measurement, the Edge TPU op share, failing builds.

Fast tests check the schema, the check and the arena measures on graphs made in code; the slow ones
build a model unlike the digits (12x12 RGB in [0, 1], two unbalanced classes, a GELU right after
the first convolution) for coral and x86 and check budgets set just below and at measured values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolchain.steps import budget as B
from toolchain.targets import Budget, TargetError, load_target, parse_target

# ------------------------------------------------------------------------------------------ schema


def _doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t",
        "format": "tflite",
        "runtimes": ["litert"],
        "quantization": {"scheme": "int8", "input_dtype": "uint8", "output_dtype": "uint8"},
        "limits": {"max_model_bytes": 1000, "max_accuracy_drop": 0.01},
    }
    doc.update(extra)
    return doc


EDGETPU = {"compiler": "edgetpu_compiler", "supported_ops": ["CONV_2D"]}


def test_budget_table_is_optional_and_parsed() -> None:
    assert parse_target(_doc()).budget is None
    t = parse_target(
        _doc(
            budget={
                "max_model_bytes": 900,
                "max_arena_bytes": 64_000,
                "max_latency_ms": 2,
                "min_edgetpu_op_share": 1,
            },
            edgetpu=EDGETPU,
        )
    )
    assert t.budget == Budget(900, 64_000, 2.0, 1.0)
    assert t.to_dict()["budget"] == {
        "max_model_bytes": 900,
        "max_arena_bytes": 64_000,
        "max_latency_ms": 2.0,
        "min_edgetpu_op_share": 1.0,
    }


@pytest.mark.parametrize(
    ("budget", "needle"),
    [
        ({"max_ram": 1}, "unknown key(s) ['max_ram']"),
        ({"max_arena_bytes": 0}, "max_arena_bytes must be a positive integer"),
        ({"max_model_bytes": 1.5}, "max_model_bytes must be a positive integer"),
        ({"max_model_bytes": True}, "max_model_bytes must be a positive integer"),
        ({"max_latency_ms": -1}, "max_latency_ms must be a positive number"),
        ({"max_latency_ms": float("inf")}, "max_latency_ms must be a positive number"),
        ({"min_edgetpu_op_share": 0.5}, "needs an [edgetpu] table"),
    ],
)
def test_bad_budget_is_refused_with_the_key(budget: dict[str, Any], needle: str) -> None:
    with pytest.raises(TargetError) as e:
        parse_target(_doc(budget=budget))
    assert needle in str(e.value) and "[budget]" in str(e.value)


def test_op_share_must_be_a_fraction() -> None:
    for bad in (0, 1.5, 90):
        with pytest.raises(TargetError, match=r"min_edgetpu_op_share must be in \(0, 1\]"):
            parse_target(_doc(budget={"min_edgetpu_op_share": bad}, edgetpu=EDGETPU))


# ------------------------------------------------------------------------------------------- check


def _target(**budget: Any) -> Any:
    return dataclasses.replace(load_target("coral"), name="dev", budget=Budget(**budget))


def test_just_below_fails_at_or_above_passes_with_one_line() -> None:
    measured = {
        "max_model_bytes": 5000,
        "max_arena_bytes": 7000,
        "max_latency_ms": 1.25,
        "min_edgetpu_op_share": 0.5,
    }
    for key, value in measured.items():
        below = value - 1 if isinstance(value, int) else value * 0.99
        above = value + 1 if isinstance(value, int) else value * 1.01
        if key.startswith("min_"):
            below, above = above, below  # a minimum fails above the measured share
        with pytest.raises(B.BudgetError) as e:
            B.check_budget(_target(**{key: below}), measured)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{key}: measured ") and "dev budget" in msg, msg
        assert e.value.verdict[key]["ok"] is False and e.value.verdict[key]["measured"] == value
        assert B.check_budget(_target(**{key: value}), measured)[key]["ok"] is True
        assert B.check_budget(_target(**{key: above}), measured)[key]["ok"] is True
    with pytest.raises(B.BudgetError, match="1.250 ms .p95. on the build host is over"):
        B.check_budget(_target(max_latency_ms=1.0), measured)
    with pytest.raises(B.BudgetError, match="50.0% of ops is below the dev budget of 90.0% of ops; replace"):
        B.check_budget(_target(min_edgetpu_op_share=0.9), measured)


def test_a_budget_nothing_measured_fails_and_no_budget_checks_nothing() -> None:
    with pytest.raises(B.BudgetError, match="max_arena_bytes = 10 bytes of target 'dev' cannot be checked"):
        B.check_budget(_target(max_arena_bytes=10), {"max_arena_bytes": None})
    assert B.check_budget(dataclasses.replace(load_target("x86"), budget=None), {"max_model_bytes": 1}) == {}


def test_op_share_prefers_the_compilers_count_and_warns_about_cpu_ops() -> None:
    predicted = {
        "ops_total": 27,
        "ops_mapped": 2,
        "unmapped": [{"index": 2, "op": "GELU", "reason": "Operation not supported"}],
    }
    assert B.edgetpu_op_share(predicted) == pytest.approx(2 / 27)
    w = B.cpu_ops_warning(predicted)
    assert w is not None and w.startswith("25 of 27 ops run on the CPU") and "GELU (op #2)" in w
    compiled = dict(predicted, compiler_ops_total=27, compiler_ops_mapped=27)
    assert B.edgetpu_op_share(compiled) == 1.0 and B.cpu_ops_warning(compiled) is None
    assert B.cpu_ops_warning({"ops_total": 5, "ops_mapped": 5, "unmapped": []}) is None


# ------------------------------------------------------------------------------------------- arena


def test_liveness_peak_frees_tensors_after_their_last_reader() -> None:
    sizes = {"x": 100, "a": 400, "b": 400, "c": 8, "y": 8}
    steps = [(["x", "w"], ["a"]), (["a"], ["b"]), (["b"], ["c"]), (["c"], ["y"])]
    # step 0: x + a; step 1: a + b = 800 (x is dead); then b + c, c + y
    assert B.liveness_peak(sizes, steps, ["y"]) == 800
    # a skip connection keeps x alive to the end
    assert B.liveness_peak(sizes, [*steps[:3], (["c", "x"], ["y"])], ["y"]) == 900


def test_onnx_arena_is_the_live_peak_at_batch_one(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(8, 2)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(2, np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "rgb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        inits,
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    got = B.measure_arena(path)
    # conv and relu outputs (8x16x16 float32 each) are live together; the input is dead by then
    assert got == {"arena_bytes": 2 * 8 * 16 * 16 * 4, "arena_method": "onnx-liveness", "arena_tensors": 6}


def test_measure_arena_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(B.BudgetError, match="not a .tflite or .onnx"):
        B.measure_arena(tmp_path / "model.bin")


# ------------------------------------------------------------------------------- real builds (slow)


def _rgb_two_class(n: int, seed: int) -> dict[str, np.ndarray]:
    """12x12x3 images in [0, 1]; class 'bright' (about 20%) has a brighter red top half."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.6, size=(n, 12, 12, 3)).astype(np.float32)
    y = (rng.random(n) < 0.2).astype(np.int64)
    x[y == 1, :6, :, 0] += 0.4
    return {"x": np.clip(x, 0.0, 1.0), "y": y, "class_names": np.array(["dim", "bright"])}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small tf_keras CNNs trained briefly on the same data: one with a GELU right after its first
    convolution (``gelu``; tf2onnx cannot convert GELU's Erfc, so it builds for TFLite targets), one
    with ReLU there (``relu``); and the data files."""
    from toolchain.tfenv import import_keras

    keras = import_keras()
    root = tmp_path_factory.mktemp("gelu")
    train, test = _rgb_two_class(400, 1), _rgb_two_class(200, 2)
    np.savez(root / "train.npz", **train)
    np.savez(root / "test.npz", **test)
    paths = {"train": root / "train.npz", "test": root / "test.npz"}
    for act in ("gelu", "relu"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.layers.Input((12, 12, 3)),
                keras.layers.Conv2D(8, 3, padding="same"),
                keras.layers.Activation(act),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(train["x"], train["y"], epochs=8, batch_size=32, verbose=0)
        model.save(root / f"{act}.keras")
        paths[act] = root / f"{act}.keras"
    return paths


def x86_ort() -> Any:
    """The x86 profile with ONNX Runtime only: OpenVINO 2026.4's CPU plugin refuses this int8 model on
    the AMX machine these tests were written on ("No suitable implementations"), which would fail
    the whole x86 target; budgets are what these tests are about."""
    from device_agent.formats.manifest import RuntimeName

    return dataclasses.replace(load_target("x86"), name="x86", runtimes=(RuntimeName.ONNXRUNTIME,))


def _build(models: dict[str, Path], model: str, targets: list[Any], out: Path) -> dict[str, Any]:
    from toolchain.build import build_bundles

    return build_bundles(
        models[model],
        models["train"],
        targets,
        out,
        eval_data=models["test"],
        allow_accuracy_drop=True,
        progress=False,
    )


@pytest.fixture(scope="module")
def built(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The GELU model for coral and mobile, the ReLU model for x86 (two build folders)."""
    tflite = tmp_path_factory.mktemp("gelu-out") / "bundles"
    onnx = tmp_path_factory.mktemp("relu-out") / "bundles"
    return {
        "out": tflite,
        "x86_out": onnx,
        "report": _build(models, "gelu", ["coral", "mobile"], tflite),
        "x86_report": _build(models, "relu", [x86_ort()], onnx),
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_target_records_its_arena_and_coral_says_ops_run_on_the_cpu(built: dict[str, Any]) -> None:
    from toolchain.report import summary_table
    from toolchain.steps.edgetpu import read_tflite

    rep = built["report"]
    coral, mobile = rep["targets"]["coral"], rep["targets"]["mobile"]
    x86 = built["x86_report"]["targets"]["x86"]
    for e in (coral, mobile, x86):
        assert e["status"] == "ok", e.get("error")
    assert coral["arena_method"] == mobile["arena_method"] == "litert-arena"
    assert x86["arena_method"] == "onnx-liveness"
    assert mobile["arena_bytes"] > coral["arena_bytes"] // 2  # float I/O tensors add to int8 ones
    assert "edgetpu_op_share" not in mobile and not mobile.get("warnings")
    # The LiteRT arena holds at least what is live at once (the flatbuffer's activations, by liveness)
    # and not wildly more (kernel scratch tensors come on top of the activations).
    model = read_tflite(built["out"] / "coral" / "model.tflite")
    width = {"float32": 4, "int32": 4, "int64": 8, "int16": 2}
    sizes = {
        str(t.index): int(np.prod(t.shape)) * width.get(t.dtype, 1)
        for t in model.tensors
        if not t.is_constant
    }
    steps = [([str(i) for i in o.inputs], [str(j) for j in o.outputs]) for o in model.operators]
    live = B.liveness_peak(sizes, steps, [str(i) for i in model.outputs])
    assert live >= 12 * 12 * 8 * 2  # the first conv's int8 output and the GELU's, live together
    assert live <= coral["arena_bytes"] <= 4 * sum(sizes.values()) + 64 * coral["arena_tensors"]
    # float32 12x12x8 after the first conv (x86 keeps float activations between QDQ pairs)
    assert x86["arena_bytes"] >= 12 * 12 * 8 * 4
    # The GELU cuts the model: most ops stay on the CPU, and the build says so.
    assert coral["edgetpu_op_share"] < 0.5
    assert coral["edgetpu"]["unmapped"][0]["op"] == "GELU"
    assert any("run on the CPU, not the Edge TPU" in w and "GELU" in w for w in coral["warnings"])
    table = summary_table(rep)
    assert "coral: WARNING:" in table and "GELU" in table
    on_disk = json.loads((built["out"] / "report.json").read_text())
    assert on_disk["targets"]["coral"]["warnings"] == coral["warnings"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_budgets_just_below_measured_fail_and_at_measured_pass(
    built: dict[str, Any], models: dict[str, Path], tmp_path: Path
) -> None:
    from toolchain.build import BuildError

    share = built["report"]["targets"]["coral"]["edgetpu_op_share"]
    x86 = built["x86_report"]["targets"]["x86"]
    coral_tight = dataclasses.replace(
        load_target("coral"), name="coral-tight", budget=Budget(min_edgetpu_op_share=0.9)
    )
    with pytest.raises(BuildError) as e:
        _build(models, "gelu", [coral_tight], tmp_path / "coral")
    assert str(e.value).startswith(
        f"coral-tight: min_edgetpu_op_share: measured {100 * share:.1f}% of ops is below"
    )
    assert "\n" not in str(e.value) and not (tmp_path / "coral" / "coral-tight").exists()

    targets = [
        dataclasses.replace(
            x86_ort(), name="x86-tight", budget=Budget(max_arena_bytes=x86["arena_bytes"] - 1)
        ),
        dataclasses.replace(
            x86_ort(),
            name="x86-roomy",
            budget=Budget(
                # tf_keras renames layers when a model is loaded again in one process, so node
                # names (and a few bytes of the file) differ from the first build's
                max_model_bytes=x86["size_bytes"] + 1024,
                max_arena_bytes=x86["arena_bytes"],
                max_latency_ms=60_000.0,
            ),
        ),
    ]
    out = tmp_path / "x86"
    with pytest.raises(BuildError) as e:
        _build(models, "relu", targets, out)
    rep = e.value.report
    assert rep is not None
    tight, roomy = rep["targets"]["x86-tight"], rep["targets"]["x86-roomy"]
    assert tight["status"] == "failed" and not (out / "x86-tight").exists()
    assert tight["error"].startswith(f"max_arena_bytes: measured {x86['arena_bytes']} bytes is over")
    assert tight["budget"]["max_arena_bytes"]["ok"] is False
    assert roomy["status"] == "ok" and (out / "x86-roomy" / "manifest.json").is_file()
    assert all(v["ok"] for v in roomy["budget"].values()) and set(roomy["budget"]) == {
        "max_model_bytes",
        "max_arena_bytes",
        "max_latency_ms",
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_profile_of_a_built_bundle_lands_in_its_report(
    built: dict[str, Any], models: dict[str, Path]
) -> None:
    import shutil

    from click.testing import CliRunner

    from device_agent.formats.manifest import VerifyPolicy, verify_bundle
    from toolchain.cli import main

    out = built["x86_out"].parent / "profiled"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(built["x86_out"], out)
    r = CliRunner().invoke(
        main, ["profile", str(out / "x86"), "--on", "local", "--eval-data", str(models["test"]), "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    bench = doc["bench"]
    entry = built["x86_report"]["targets"]["x86"]
    # one sample at a time through the agent: the same accuracy the build measured for that runtime
    rt = bench["runtime"]
    assert abs(bench["accuracy"] - entry["per_runtime"][rt]["accuracy"]) <= 1 / bench["samples"] + 1e-9
    assert bench["samples"] == 200 and bench["latency_ms_p50"] <= bench["latency_ms_p95"]
    verify_bundle(out / "x86", VerifyPolicy(allow_unsigned=True))  # the unsigned profile file is tolerated
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["x86"]["device_profile"] == doc
    assert "On the device" in (out / "report.html").read_text()


def test_targets_show_prints_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from toolchain.cli import main
    from toolchain.targets import REPO_TARGETS

    text = (REPO_TARGETS / "mobile.toml").read_text().replace('name = "mobile"', 'name = "phone"')
    (tmp_path / "phone.toml").write_text(text + "\n[budget]\nmax_arena_bytes = 2048\n")
    monkeypatch.setenv("EDGEFLEET_TARGETS", str(tmp_path))
    r = CliRunner().invoke(main, ["targets", "show", "phone"])
    assert r.exit_code == 0 and "budget        max_arena_bytes=2048" in r.output, r.output
    r = CliRunner().invoke(main, ["targets", "show", "phone", "--json"])
    assert json.loads(r.output)["budget"]["max_arena_bytes"] == 2048
    (tmp_path / "phone.toml").write_text(text + "\n[budget]\nmax_ram = 3\n")
    r = CliRunner().invoke(main, ["targets", "show", "phone"])
    assert r.exit_code == 1 and "[budget]: unknown key(s) ['max_ram']" in r.output


def test_liveness_peak_matches_the_definition_on_random_graphs() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n_tensors, n_steps = int(rng.integers(1, 12)), int(rng.integers(1, 10))
        sizes = {f"t{i}": int(rng.integers(1, 1000)) for i in range(n_tensors)}
        steps = [
            (
                [f"t{i}" for i in rng.choice(n_tensors, size=int(rng.integers(0, 3)))] + ["const"],
                [f"t{int(rng.integers(n_tensors))}"],
            )
            for _ in range(n_steps)
        ]
        outs = [f"t{int(rng.integers(n_tensors))}"]
        start = {k: -1 for k in sizes}
        end = {k: -1 for k in sizes}
        for i, (ins, o) in enumerate(steps):
            for k in o:
                start[k], end[k] = i, max(end[k], i)
            for k in ins:
                if k in sizes:
                    end[k] = max(end[k], i)
        for k in outs:
            end[k] = n_steps
        want = max(sum(v for k, v in sizes.items() if start[k] <= i <= end[k]) for i in range(n_steps))
        assert B.liveness_peak(sizes, steps, outs) == want
