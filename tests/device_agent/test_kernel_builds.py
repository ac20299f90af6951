"""The kernels' other builds: the numpy fallback (``EDGEFLEET_NATIVE_KERNELS=0``), a build without
the x86-64 target clones, and an aarch64 compile of the same source (NEON).

``test_kernels.py`` holds the installed build to its numpy definitions; these tests build and run
what an install on another machine would get, on data unlike the digits (tabular columns from
0.001 to 4000 with NaN and infinities, [0, 1] images, two unbalanced classes).
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from device_agent import kernels

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "device_agent" / "_kernels.c"
AARCH64_CC = "aarch64-linux-gnu-gcc"


def _compile_args() -> list[str]:
    """The extension's ``extra_compile_args`` as setup.py lists them (one source of truth)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extra_compile_args":
            return [str(v) for v in ast.literal_eval(node.value)]
    raise AssertionError("setup.py lists no extra_compile_args")


def _includes() -> list[str]:
    return ["-I", sysconfig.get_paths()["include"], "-I", np.get_include()]


def _tabular(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Five columns on scales from 0.001 to 4000 (one constant) and two unbalanced classes' scores."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(0.001, 0.0004, n),
            rng.lognormal(3, 1.5, n),
            rng.uniform(-4000, 4000, n),
            np.full(n, 17.25),
            rng.integers(0, 3, n) * 1000.0,
        ]
    )
    p1 = np.clip(rng.beta(0.3, 4, n), 0, 1)  # class "rare" seldom wins
    return x, np.column_stack([1 - p1, p1]).astype(np.float32)


def window_states(seed: int = 0) -> dict[str, np.ndarray]:
    """Feed two windows through ``device_agent.kernels`` as it loaded (native or numpy) and return
    their profiles' arrays: a tabular one (batches and single samples, NaN and infinities in the
    inputs) and a one-channel [0, 1] image one (single samples with their one-pass summaries)."""
    from device_agent.formats.stats import build_baseline
    from device_agent.formats.telemetry import ModelRef
    from device_agent.windows import Window

    ref = ModelRef("m", 1, "0" * 64)
    out: dict[str, np.ndarray] = {}
    x, probs = _tabular(seed, 1500)
    spec = build_baseline(x[:300], probs[:300], ["common", "rare"]).spec
    w = Window(spec, ref, 0.0, 0.0)
    x = x.copy()
    x[[5, 400, 1200], [1, 2, 0]] = [np.nan, np.inf, -np.inf]
    w.record(x[:700], probs[:700], 7.0)
    for i in range(700, 1500):
        w.record_one(x[i : i + 1], probs[i : i + 1].copy(), 0.25)
    images = np.random.default_rng(seed + 1).random((400, 24, 24, 1)).astype(np.float32)
    img_probs = np.random.default_rng(seed + 2).dirichlet([0.2, 3.0], 400).astype(np.float32)
    ispec = build_baseline(images[:100], img_probs[:100], ["a", "b"]).spec
    wi = Window(ispec, ref, 0.0, 0.0)
    for i in range(400):
        summ = kernels.summary(images[i].reshape(-1))
        wi.record_one(images[i : i + 1], img_probs[i : i + 1].copy(), 0.5, summ)
    for name, win in (("tab", w), ("img", wi)):
        p = win.close(1.0).profile
        for field in ("counts", "count", "nan_count", "min", "max", "mean", "m2"):
            out[f"{name}.inputs.{field}"] = np.asarray(getattr(p.inputs, field))
        out[f"{name}.class_counts"] = np.asarray(p.class_counts)
        out[f"{name}.confidence.counts"] = np.asarray(p.confidence.counts)
        out[f"{name}.latency.counts"] = np.asarray(p.latency_ms.counts)
    return out


@pytest.mark.skipif(not kernels.NATIVE, reason="device_agent._kernels not built or turned off")
def test_numpy_fallback_process_gives_the_native_profiles(tmp_path: Path) -> None:
    """A process started with EDGEFLEET_NATIVE_KERNELS=0 (what an install without a compiler gets)
    runs numpy only and profiles the same windows: histograms, counts, NaN counts, min/max and the
    tabular moments to the bit; the image features made from the summaries' sums (C adds float32
    partial sums into doubles, numpy's dot accumulates in float32) within rounding."""
    dump = tmp_path / "numpy.npz"
    script = (
        "import numpy as np; from device_agent import kernels; "
        "assert not kernels.NATIVE and kernels.Runner is None and kernels.profile_update is None; "
        "assert kernels.summary is kernels.summary_numpy; "
        "from tests.device_agent.test_kernel_builds import window_states; "
        f"np.savez({str(dump)!r}, **window_states())"
    )
    env = dict(os.environ, EDGEFLEET_NATIVE_KERNELS="0", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", script], env=env, cwd=str(REPO), check=True, timeout=300)
    numpy_states = dict(np.load(dump))
    native_states = window_states()
    assert numpy_states.keys() == native_states.keys()
    assert native_states["tab.inputs.nan_count"].sum() == 3
    assert native_states["tab.class_counts"].tolist()[1] < native_states["tab.class_counts"].tolist()[0] / 5
    for key, got in native_states.items():
        if key.startswith("img.inputs.") and key.rsplit(".", 1)[1] in ("min", "max", "mean", "m2"):
            assert np.allclose(got, numpy_states[key], rtol=1e-5, atol=1e-9), key
        else:
            assert np.array_equal(got, numpy_states[key]), key


def _load(path: Path) -> ModuleType:
    """Import an extension file under the name its init function expects, beside the installed one."""
    loader = importlib.machinery.ExtensionFileLoader("device_agent._kernels", str(path))
    spec = importlib.util.spec_from_file_location("device_agent._kernels", path, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _build(tmp_path: Path, *defines: str) -> Path:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}); the install would use the numpy fallbacks")
    out = tmp_path / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [cc, "-shared", "-fPIC", *_compile_args(), *defines, *_includes(), str(SOURCE), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    return out


def _symbols(path: Path) -> str:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to list the clones")
    return subprocess.run([nm, str(path)], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.skipif(kernels._native is None, reason="device_agent._kernels not built")
@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 clones only")
def test_build_without_target_clones_imports_and_matches_to_the_bit(tmp_path: Path) -> None:
    """EDGEFLEET_NO_CLONES builds only the baseline (SSE2) loops, the code an x86-64 CPU without
    AVX2 runs: it builds without warnings, imports, and gives the installed build's results to the
    bit (no FMA, the same order of operations in both), on wide ranges, NaN and infinities."""
    plain = _build(tmp_path, "-DEDGEFLEET_NO_CLONES")
    assert ".avx2" not in _symbols(plain)
    assert ".avx2" in _symbols(Path(kernels._native.__file__)), "the installed build has its AVX2 clones"
    mod = _load(plain)
    assert mod.NUMPY_API == 1 and mod is not kernels._native
    rng = np.random.default_rng(21)
    x32 = (rng.normal(0, 1, 10_001) * np.float32(10.0) ** rng.integers(-3, 4, 10_001)).astype(np.float32)
    assert mod.summary(x32) == kernels._native.summary(x32)
    bad = x32.copy()
    bad[77] = np.inf
    assert np.isnan(mod.summary(bad)[:2]).all()
    q1, q2 = np.empty(x32.size, np.uint8), np.empty(x32.size, np.uint8)
    assert mod.quantize(x32, np.float32(0.37), np.float32(3), 0, 255, q1) == kernels._native.quantize(
        x32, np.float32(0.37), np.float32(3), 0, 255, q2
    )
    assert np.array_equal(q1, q2)
    x, _ = _tabular(22, 999)
    x[[3, 500], [2, 4]] = [np.nan, -np.inf]
    edges = np.sort(rng.uniform(-10, 4000, (x.shape[1], 9)), axis=1)
    nedges = np.full(x.shape[1], 9, np.int64)
    states = []
    for k in (mod, kernels._native):
        f = x.shape[1]
        st = [np.zeros((f, 10), np.int64), np.zeros(f, np.int64), np.zeros(f, np.int64)]
        st += [np.full(f, np.inf), np.full(f, -np.inf), np.zeros(f), np.zeros(f)]
        k.profile_update(x, edges, nedges, *st)
        states.append(st)
    for a, b in zip(*states, strict=True):
        assert np.array_equal(a, b)
    assert states[0][2].sum() == 2  # the NaN and the infinity, counted apart
    probs = np.random.default_rng(23).dirichlet([0.3, 5.0], 300)
    c1, c2 = np.zeros(2, np.int64), np.zeros(2, np.int64)
    f1, f2 = np.empty(300), np.empty(300)
    assert mod.fold_outputs(probs, c1, f1) and kernels._native.fold_outputs(probs, c2, f2)
    assert np.array_equal(c1, c2) and np.array_equal(f1, f2)


def test_aarch64_compile_uses_neon(tmp_path: Path) -> None:
    """Debian's cross compiler builds the kernels for aarch64 (as on a Raspberry Pi 4/5 with a
    64-bit OS) without warnings, and the statistics loops come out as NEON vector instructions.
    Compiled only, not run (no ARM machine here)."""
    if shutil.which(AARCH64_CC) is None:
        pytest.skip(f"{AARCH64_CC} not installed (Debian: apt-get install gcc-aarch64-linux-gnu)")
    obj = tmp_path / "kernels-aarch64.o"
    cmd = [AARCH64_CC, "-c", "-fPIC", *_compile_args(), *_includes(), str(SOURCE), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump not installed (binutils-aarch64-linux-gnu)")
    head = subprocess.run([objdump, "-f", str(obj)], capture_output=True, text=True, timeout=60).stdout
    assert "aarch64" in head
    dis: Any = subprocess.run([objdump, "-d", str(obj)], capture_output=True, text=True, timeout=120).stdout
    # four-lane float adds and compares on the 128-bit registers (fadd v0.4s, fcmgt v1.4s, ...)
    assert ".4s" in dis and "fadd\tv" in dis and ("fcmgt\tv" in dis or "fcmge\tv" in dis)
