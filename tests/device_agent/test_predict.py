"""Every runtime adapter on real bundles: float in, labels out, the same answers across runtimes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.formats.manifest import load_manifest
from device_agent.runtimes import is_installed
from tests.cpu_precision import bf16_unavailable
from tests.device_agent.agent_bundles import cached_onnx_bundle, cached_tflite_bundle, digits


def accuracy(agent: Agent, x: np.ndarray, y: np.ndarray) -> float:
    pred = agent.predict(x)
    return float(np.mean(np.array(pred.labels) == y.astype(str)))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return digits()


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_bundle_in_each_runtime(runtime: str, data: dict[str, np.ndarray]) -> None:
    if not is_installed(runtime):
        pytest.skip(f"{runtime} not installed")
    agent = Agent(cached_onnx_bundle(), runtime=runtime)
    assert agent.model.runtime == runtime
    assert accuracy(agent, data["x_test"], data["y_test"]) > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["litert", "openvino"])
def test_int8_tflite_bundle_in_each_runtime(runtime: str, data: dict[str, np.ndarray]) -> None:
    """The adapter quantizes float inputs with the manifest's scale/zero point and dequantizes scores."""
    agent = Agent(cached_tflite_bundle(), runtime=runtime)
    m = load_manifest(cached_tflite_bundle())
    assert m.inputs[0].dtype.value == "int8" and m.inputs[0].quantization is not None
    pred = agent.predict(data["x_test"][:100])
    assert pred.outputs.dtype == np.float32 and np.all((pred.outputs >= 0) & (pred.outputs <= 1))
    assert accuracy(agent, data["x_test"], data["y_test"]) > 0.9
    float_agent = Agent(cached_onnx_bundle())
    agree = np.mean(np.array(pred.labels) == np.array(float_agent.predict(data["x_test"][:100]).labels))
    assert agree > 0.95  # int8 and float models answer alike


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("target", ["x86", "raspberry-pi", "mobile", "coral"])
def test_pipeline_bundles_in_every_installed_runtime(target: str, digits_bundles: Path, data) -> None:
    """The build pipeline's bundles run in each runtime their manifest lists (and is installed here)."""
    bundle = digits_bundles / target
    if not bundle.is_dir():
        pytest.skip(f"the build produced no {target} bundle")
    manifest = load_manifest(bundle)
    runtimes = [r.value for r in manifest.model.runtimes if is_installed(r.value)]
    assert runtimes, f"no runtime of {manifest.model.runtimes} installed"
    labels = {}
    for rt in runtimes:
        agent = Agent(bundle, runtime=rt)
        assert agent.model.runtime == rt
        labels[rt] = np.array(agent.predict(data["x_test"][:200]).labels)
        assert np.mean(labels[rt] == data["y_test"][:200].astype(str)) > 0.8, (target, rt)
        if manifest.model.accelerated_path:  # no libedgetpu here: the CPU model runs, with a warning
            assert agent.model.predictor.model.accelerated is False
    first = next(iter(labels.values()))
    for rt, lab in labels.items():
        assert np.mean(lab == first) > 0.95, rt


def test_agent_module_does_not_import_tensorflow_or_toolchain() -> None:
    import device_agent.agent
    import device_agent.daemon  # noqa: F401

    src = Path(device_agent.agent.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert (
            "import tensorflow" not in text
            and "from toolchain" not in text
            and "import toolchain" not in text
        ), f


def test_openvino_runs_in_the_manifest_precision_alone_and_in_batches(
    tmp_path: Path, data: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent pins the manifest's precision (schema 1: f32) even where the machine's default is
    bf16, and a sample alone (static batch-1 model) scores as it does in a batch (dynamic model)."""
    import json
    import shutil

    import openvino as ov

    if not is_installed("openvino"):
        pytest.skip("openvino not installed")
    real = ov.Core.compile_model

    def bf16_machine(self, model, device="CPU", config=None):  # type: ignore[no-untyped-def]
        return real(self, model, device, {"INFERENCE_PRECISION_HINT": "bf16", **dict(config or {})})

    monkeypatch.setattr(ov.Core, "compile_model", bf16_machine)
    bundle = tmp_path / "b"
    shutil.copytree(cached_onnx_bundle(), bundle)
    doc = json.loads((bundle / "manifest.json").read_text())
    assert doc["schema"] == 1 and "precision" not in doc["model"]
    agent = Agent(bundle, runtime="openvino")
    assert agent.model.predictor.model.precision == "f32"  # type: ignore[attr-defined]
    x = data["x_test"][:50]
    alone = np.concatenate([agent.predict(x[i]).outputs for i in range(len(x))])
    np.testing.assert_allclose(alone, agent.predict(x).outputs, atol=1e-5)
    reason = bf16_unavailable()
    if reason is not None:  # AVX2-only CPUs (see tests/device_agent/test_openvino_precision.py)
        pytest.skip(reason)
    doc.update(schema=2, model=dict(doc["model"], precision="bf16"))
    (bundle / "manifest.json").write_text(json.dumps(doc))
    got = Agent(bundle, runtime="openvino").model.predictor.model.precision  # type: ignore[attr-defined]
    assert got == "bf16"
