"""OpenVINO's pinned precision on CPUs without bf16 (issue 11): the agent, and the tests that force bf16.

An AVX2-only CPU is made of this one by capping oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA=AVX2``,
read once per process, so in a subprocess): there a compile with the bf16 hint fails inside oneDNN,
while OpenVINO still lists BF16 among the CPU's capabilities. The agent must run its f32 bundles
there as anywhere, refuse a bf16 bundle in one line, and the bf16-forcing tests must skip with the
reason while the f32 checks in the same tests still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.runtimes import is_installed
from tests.cpu_precision import bf16_unavailable, cpu_flags

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(not is_installed("openvino"), reason="openvino not installed")


def _avx2_env() -> dict[str, str]:
    if "avx2" not in cpu_flags():
        pytest.skip("this CPU has no AVX2 to cap oneDNN to")
    return dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(REPO))


AGENT_ON_AVX2 = r"""
import json, shutil, sys
from pathlib import Path
import numpy as np
from device_agent.agent import Agent
from device_agent.errors import AgentError
from device_agent.runtimes.openvino import precision_problem
from tests.cpu_precision import bf16_unavailable
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits

out = {"f32_problem": precision_problem("f32"), "bf16_reason": bf16_unavailable()}
x = digits()["x_test"][:40]
bundle = Path(sys.argv[1])
shutil.copytree(cached_onnx_bundle(), bundle)
ov = Agent(bundle, runtime="openvino")
ort = Agent(bundle, runtime="onnxruntime")
out["precision"] = ov.model.predictor.model.precision
alone = np.concatenate([ov.predict(x[i]).outputs for i in range(len(x))])
out["max_diff_vs_ort"] = float(np.abs(alone - ort.predict(x).outputs).max())
doc = json.loads((bundle / "manifest.json").read_text())
doc.update(schema=2, model=dict(doc["model"], precision="bf16"))
(bundle / "manifest.json").write_text(json.dumps(doc))
try:
    Agent(bundle, runtime="openvino")
    out["bf16_error"] = None
except AgentError as e:
    out["bf16_error"] = str(e)
print(json.dumps(out))
"""


def test_this_machine_answers_the_probe() -> None:
    """f32 always computes in f32; bf16 is either really computed or has a reason naming the CPU."""
    from device_agent.runtimes.openvino import precision_problem

    assert precision_problem("f32") is None
    reason = bf16_unavailable()
    assert reason is None or ("bf16" in reason and "CPU flags" in reason)
    assert precision_problem("int4") == "precision 'int4' is unknown"


def test_agent_on_an_avx2_only_cpu_runs_f32_and_refuses_bf16_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", AGENT_ON_AVX2, str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
        env=_avx2_env(),
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["f32_problem"] is None
    assert got["bf16_reason"] is not None and "oneDNN capped to AVX2" in got["bf16_reason"]
    # f32 pinned: the agent runs, one sample at a time, what ONNX Runtime computes
    assert got["precision"] == "f32"
    assert got["max_diff_vs_ort"] < 1e-4
    # a bundle that asks for bf16: one line saying what and what to do, not oneDNN's message
    err = got["bf16_error"]
    assert err is not None and "\n" not in err
    assert "cannot compute 'model.onnx' in bf16 on this CPU" in err and "verified in f32" in err
    assert "Exception from" not in err and "ONEDNN_VERBOSE" not in err


def test_bf16_forcing_tests_skip_on_an_avx2_only_cpu_and_the_f32_checks_run() -> None:
    """The tests as `./run test` runs them, on an AVX2-only CPU: no failure, the skip says why."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/device_agent/test_predict.py::test_openvino_runs_in_the_manifest_precision_alone_and_in_batches",
        ],
        capture_output=True,
        text=True,
        env=_avx2_env(),
        timeout=TIMEOUT_S,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 skipped" in proc.stdout and "OpenVINO cannot compute in bf16 on this CPU" in proc.stdout
    assert "oneDNN capped to AVX2" in proc.stdout
