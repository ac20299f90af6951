"""Conversions in a child process (toolchain.steps.isolate): same artifacts and report, one-line failures.

Real conversions in both paths: a tabular mlp whose Normalization the build folds out (so the child
must fold it again) with columns from 0.001 to 4000, built for one TFLite and one ONNX target in a
child process and in the build's own process.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolchain.build import build_bundles
from toolchain.steps import isolate
from toolchain.steps.artifact import ConversionError
from toolchain.steps.isolate import ModelFile

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["mobile", "x86"]
# Report figures that must be the same whichever process converted (timings are left out).
SAME = (
    "status",
    "size_bytes",
    "gzip_size_bytes",
    "float_size_bytes",
    "float_gzip_size_bytes",
    "accuracy",
    "float_accuracy",
    "top1_agreement",
    "sqnr_db",
    "sparsity",
    "inputs",
    "outputs",
    "checks",
    "arena_bytes",
)


def crash(model: Any, *args: Any) -> None:
    """A back end that dies the way an out-of-memory kill does."""
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An mlp (Normalization first) fitted briefly on 3 columns in units from 0.001 to 4000; the data."""
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.models import save_model

    d = tmp_path_factory.mktemp("isolate")
    rng = np.random.default_rng(3)
    n = 400
    x = np.stack(
        [rng.normal(0.004, 0.001, n), rng.normal(2500, 800, n), rng.uniform(0, 1, n)], axis=1
    ).astype(np.float32)
    y = ((x[:, 0] > 0.004) ^ (x[:, 1] > 2600)).astype(np.int64) + 2 * (x[:, 2] > 0.7)  # 4 classes, uneven
    net = build_architecture("mlp", x, 4)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    net.fit(x, y, epochs=5, verbose=0)
    save_model(net, d / "mlp.keras")
    np.savez(d / "data.npz", x=x, y=y)
    return d / "mlp.keras", d / "data.npz"


def _build(model: Path, data: Path, out: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv(isolate.CHILD_ENV, mode)
    # int8_search off: x86 then converts through the back end (the search ships a form it wrote itself
    # from the float reference, test_int8_forms.py), so each conversion is one child here
    return build_bundles(
        model, data, TARGETS, out, progress=False, allow_accuracy_drop=True, int8_search=False
    )


def test_child_conversion_gives_the_same_artifacts_and_report(
    mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = mlp
    children: list[str] = []
    real = isolate.run_backend

    def counted(spec: str, *args: Any) -> None:
        children.append(spec)
        real(spec, *args)

    monkeypatch.setattr(isolate, "run_backend", counted)
    here = _build(model, data, tmp_path / "here", "never", monkeypatch)
    assert children == []
    child = _build(model, data, tmp_path / "child", "always", monkeypatch)
    # two float references and two int8 artifacts, each in its own child
    assert sorted(children) == sorted(
        [
            "toolchain.steps.convert_tflite:convert_float",
            "toolchain.steps.convert_onnx:convert_float",
            "toolchain.steps.convert_tflite:convert",
            "toolchain.steps.convert_onnx:convert",
        ]
    )
    assert child["preprocessing"] == here["preprocessing"] and here["preprocessing"]["type"] == "affine"
    assert child["float"]["accuracy"] == here["float"]["accuracy"]
    tfl = "mobile/model.tflite"
    assert (tmp_path / "here" / tfl).read_bytes() == (tmp_path / "child" / tfl).read_bytes()
    # tf2onnx writes "converted from <TF function name>" into the graph's doc string and names the
    # dynamic batch axis "unk__<n>", both from per-process counters: the ONNX files differ there only.
    onnx_here, doc_here = _onnx_without_doc(tmp_path / "here" / "x86/model.onnx")
    onnx_child, doc_child = _onnx_without_doc(tmp_path / "child" / "x86/model.onnx")
    assert onnx_here == onnx_child
    for t in TARGETS:
        a, b = here["targets"][t], child["targets"][t]
        assert a["status"] == "ok", a.get("error")
        assert set(a) == set(b)
        sizes = {k for k in SAME if "size" in k} if t == "x86" else set()
        assert {k: a.get(k) for k in SAME if k not in sizes} == {k: b.get(k) for k in SAME if k not in sizes}
        if sizes:  # the counters' digits change the sizes by a few bytes, nothing else does
            assert a["size_bytes"] == (tmp_path / "here" / "x86/model.onnx").stat().st_size
            assert b["size_bytes"] == (tmp_path / "child" / "x86/model.onnx").stat().st_size
            for k in sizes:
                assert abs(a[k] - b[k]) <= 0.01 * a[k], (k, a[k], b[k], doc_here, doc_child)


def _onnx_without_doc(path: Path) -> tuple[bytes, str]:
    import onnx

    m = onnx.load(str(path))
    doc = m.graph.doc_string
    assert doc.startswith("converted from")
    m.graph.doc_string = ""
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:  # tf2onnx's "unk__<counter>" names of the dynamic batch axis
                assert d.dim_param.startswith("unk__")
                d.dim_param = "batch"
    return m.SerializeToString(), doc


def test_a_child_error_comes_back_as_the_same_one_line_error(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    from toolchain.targets import resolve_targets

    model, _ = mlp
    (mobile,) = resolve_targets(["mobile"])
    wrong = np.zeros((30, 5), np.float32)  # the mlp takes 3 columns
    with pytest.raises(ConversionError) as e:
        isolate.run_backend(
            "toolchain.steps.convert_tflite:convert",
            ModelFile(model, True, 1),
            (mobile, wrong, tmp_path / "m.tflite"),
            {"qat": False, "progress": False},
            "mobile",
        )
    assert "calibration data has sample shape (5,)" in str(e.value) and "\n" not in str(e.value)
    assert "Traceback" not in str(e.value)


def test_a_child_that_dies_gives_one_line_naming_the_signal(
    mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = mlp
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with pytest.raises(ConversionError) as e:
        isolate.run_backend(
            "tests.toolchain.test_isolate:crash", ModelFile(model, False, 1), (), {}, "target mobile"
        )
    msg = str(e.value)
    assert msg.startswith("the child process converting target mobile was killed by SIGKILL (out of memory?)")
    assert "\n" not in msg and isolate.CHILD_ENV + "=never" in msg


def test_child_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    big, small = (
        ModelFile(Path("m.keras"), False, isolate.CHILD_MIN_PARAMS),
        ModelFile(Path("m.keras"), False, 10),
    )
    monkeypatch.delenv(isolate.CHILD_ENV, raising=False)
    assert isolate.in_child(big) and not isolate.in_child(small) and not isolate.in_child(object())
    monkeypatch.setenv(isolate.CHILD_ENV, "never")
    assert not isolate.in_child(big)
    monkeypatch.setenv(isolate.CHILD_ENV, "always")
    assert isolate.in_child(small)
    monkeypatch.setenv(isolate.CHILD_ENV, "sometimes")
    with pytest.raises(Exception, match="EDGEFLEET_BUILD_CHILD='sometimes' is unknown. Known: auto"):
        isolate.in_child(big)
