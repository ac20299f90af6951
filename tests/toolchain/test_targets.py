"""`edgefleet targets list|show`: the shipped profiles, user-added profiles without code, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolchain.cli import main

SHIPPED = ["coral", "mobile", "raspberry-pi", "x86"]


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, list(args), env=env)
    return res.exit_code, res.stdout, res.stderr


def test_list_json_has_the_four_profiles() -> None:
    code, out, _ = _run("targets", "list", "--json")
    assert code == 0
    doc = json.loads(out)
    names = [t["name"] for t in doc]
    assert set(SHIPPED) <= set(names)
    x86 = next(t for t in doc if t["name"] == "x86")
    assert x86["format"] == "onnx" and x86["runtimes"] == ["onnxruntime", "openvino"]
    coral = next(t for t in doc if t["name"] == "coral")
    assert coral["quantization"]["input_dtype"] == "uint8" and "CONV_2D" in coral["edgetpu"]["supported_ops"]


def test_list_table_and_show() -> None:
    code, out, _ = _run("targets", "list")
    assert code == 0 and all(n in out for n in SHIPPED)
    code, out, _ = _run("targets", "show", "raspberry-pi")
    assert code == 0 and "int8" in out and "litert" in out
    code, out, _ = _run("targets", "show", "coral", "--json")
    assert json.loads(out)["edgetpu"]["static_batch"] is True


def test_show_unknown_target_is_one_line_exit_1() -> None:
    code, out, err = _run("targets", "show", "rpi")
    assert code == 1
    assert err.startswith("Error: unknown target 'rpi'. Known: coral, mobile, raspberry-pi, x86")
    assert len(err.strip().splitlines()) == 1


def test_user_adds_a_target_with_a_toml_file(tmp_path: Path) -> None:
    (tmp_path / "jetson-cpu.toml").write_text(
        'name = "jetson-cpu"\nformat = "onnx"\nruntimes = ["onnxruntime"]\nthreads = 6\n'
        '[quantization]\nscheme = "int8"\ninput_dtype = "float32"\noutput_dtype = "float32"\n'
        "[limits]\nmax_model_bytes = 1000000\nmax_accuracy_drop = 0.02\n"
    )
    code, out, _ = _run("targets", "show", "jetson-cpu", "--json", env={"EDGEFLEET_TARGETS": str(tmp_path)})
    assert code == 0 and json.loads(out)["threads"] == 6


def test_invalid_user_target_is_refused_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(
        'name = "bad"\nformat = "tflite"\nruntimes = ["litert"]\nspeed = "fast"\n'
        '[quantization]\nscheme = "int8"\ninput_dtype = "int8"\noutput_dtype = "int8"\n'
        "[limits]\nmax_model_bytes = 1\nmax_accuracy_drop = 0.01\n"
    )
    code, _, err = _run("targets", "list", env={"EDGEFLEET_TARGETS": str(tmp_path)})
    assert code == 1 and "unknown key(s) ['speed']" in err and "Traceback" not in err


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_profile_loads(name: str) -> None:
    from toolchain.targets import load_target

    t = load_target(name)
    assert t.name == name and t.limits.max_accuracy_drop > 0
