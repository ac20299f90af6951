"""``edgefleet-agent bench``: one sample at a time through the agent, without TensorFlow or the toolchain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent import bench
from device_agent.cli import main
from tests.device_agent.agent_bundles import cached_onnx_bundle, cached_tflite_bundle, digits
from tests.device_agent.test_footprint import run_blocked

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 1
Features\t: fp asimd evtstrm crc32 cpuid asimdrdm lrcpc dcpop asimddp

Hardware\t: BCM2835
Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
"""


def test_cpu_info_reads_arm_boards_and_x86(tmp_path: Path) -> None:
    arm, x86 = tmp_path / "arm", tmp_path / "x86"
    arm.write_text(ARM_CPUINFO)
    x86.write_text(X86_CPUINFO)
    a = bench.cpu_info(arm)
    assert a["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert "asimddp" in a["flags"] and a["numeric_flags"] == ["asimd", "asimddp"]
    b = bench.cpu_info(x86)
    assert b["model"] == "AMD EPYC 9R14 96-Core Processor"
    assert b["numeric_flags"] == ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    none = bench.cpu_info(tmp_path / "missing")
    assert none["source"] == "platform" and none["flags"] == [] and none["count"] >= 1


def test_truth_labels_accept_names_and_indices_and_refuse_others() -> None:
    labels = ["cat", "dog"]
    assert bench.truth_labels(["dog", 0, np.int64(1)], labels) == ["dog", "cat", "dog"]
    with pytest.raises(bench.BenchError, match="label 2 is not a class index"):
        bench.truth_labels([2], labels)
    with pytest.raises(bench.BenchError, match=r"labels \['bird'\] are not classes"):
        bench.truth_labels(["bird"], labels)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("bench") / "test.npz"
    d = digits()
    np.savez(p, x=d["x_test"][:120], y=d["y_test"][:120])
    return p


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_bench_accuracy_is_what_predict_reports_one_sample_at_a_time(labelled: Path, runtime: str) -> None:
    b = str(cached_onnx_bundle())
    code, out, err = _cli(
        "bench",
        "--bundle",
        b,
        "--input",
        str(labelled),
        "--label",
        "y",
        "--runs",
        "50",
        "--runtime",
        runtime,
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    code, pout, _ = _cli(
        "predict", "--bundle", b, "--input", str(labelled), "--label", "y", "--runtime", runtime, "--json"
    )
    assert code == 0
    assert doc["accuracy"] == json.loads(pout)["accuracy"] and doc["accuracy"] > 0.85
    assert doc["runtime"] == runtime and doc["runtime_version"]
    assert doc["samples"] == 120 and doc["runs"] == 120  # at least one timed run per input
    assert 0 < doc["latency_ms_p50"] <= doc["latency_ms_p95"] <= doc["latency_ms_max"]
    assert doc["peak_rss_bytes"] >= doc["rss_before_load_bytes"] > 0
    assert doc["bundle"]["target"] == "x86" and len(doc["bundle"]["sha256"]) == 64
    assert doc["cpu"]["count"] >= 1 and doc["threads"] >= 1


@pytest.mark.timeout(120)
def test_bench_goes_through_the_agents_predict_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from device_agent.agent import Agent

    seen: list[tuple[int, ...]] = []
    real = Agent.predict

    def spy(self: Agent, x: np.ndarray):  # type: ignore[no-untyped-def]
        seen.append(tuple(np.asarray(x).shape))
        return real(self, x)

    monkeypatch.setattr(Agent, "predict", spy)
    doc = bench.run_bench(cached_onnx_bundle(), runs=40, warmup=5)
    assert seen == [(1, 8, 8, 1)] * 45  # every call one sample, warm-up included
    assert doc["runs"] == 40 and doc["warmup_runs"] == 5
    assert (
        doc["input"] == "synthetic" and doc["samples"] == bench.SYNTHETIC_SAMPLES and doc["accuracy"] is None
    )


@pytest.mark.timeout(120)
def test_synthetic_inputs_stay_within_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    from device_agent.agent import Agent

    agent = Agent(cached_onnx_bundle(), allow_unsigned=True)
    x = bench.synthetic_inputs(agent, 64)
    prof = agent.model.spec.new_profile().inputs
    lo = np.asarray([prof.edge_list(j)[0] for j in range(prof.n_features)]).reshape(8, 8, 1)
    hi = np.asarray([prof.edge_list(j)[-1] for j in range(prof.n_features)]).reshape(8, 8, 1)
    assert x.shape == (64, 8, 8, 1) and x.dtype == np.float32
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all() and x.std() > 0


@pytest.mark.timeout(60)
def test_bench_bad_input_is_one_line(tmp_path: Path) -> None:
    b = str(cached_onnx_bundle())
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 3), np.float32), y=np.zeros(4))
    code, out, err = _cli("bench", "--bundle", b, "--input", str(bad), "--label", "y")
    assert code == 1 and err.strip().splitlines()[-1].startswith("Error: inputs have shape (4, 3, 3)"), err
    few = tmp_path / "few.npz"
    np.savez(few, x=np.zeros((4, 8, 8, 1), np.float32), y=np.array([12, 0, 1, 2]))
    code, out, err = _cli("bench", "--bundle", b, "--input", str(few), "--label", "y")
    assert code == 1 and "label 12 is not a class index" in err
    code, out, err = _cli("bench", "--bundle", b, "--label", "y")
    assert code == 2 and "--label needs --input" in err
    code, out, err = _cli("bench", "--bundle", str(tmp_path / "nope"))
    assert code == 1 and err.count("\n") <= 2 and "Error:" in err


@pytest.mark.timeout(180)
def test_bench_runs_without_tensorflow_or_the_toolchain(labelled: Path) -> None:
    code = (
        "from device_agent.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'tensorflow' not in sys.modules and 'toolchain' not in sys.modules\n"
    )
    args = [
        "bench",
        "--bundle",
        str(cached_tflite_bundle()),
        "--input",
        str(labelled),
        "--label",
        "y",
        "--json",
    ]
    r = run_blocked(code, *args, "--runs", "40")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["runtime"] == "litert" and doc["accuracy"] > 0.85
