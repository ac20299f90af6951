"""Whether OpenVINO can compute in bf16 on this CPU, for the tests that force it (issue 11).

OpenVINO's CPU plugin computes in bf16 with AVX-512 (natively with AVX512-BF16 or AMX, emulated on
plain AVX-512); on AVX2-only CPUs oneDNN has no bf16 kernels and a compile with the bf16 hint fails
("could not create a primitive descriptor"), or the hint is ignored. Tests that force bf16 skip there
with the reason; the tests that pin f32 run everywhere. ``ONEDNN_MAX_CPU_ISA=AVX2`` makes this machine
behave like an AVX2-only CPU (tests/device_agent/test_openvino_precision.py).
"""

from __future__ import annotations

import os
from pathlib import Path

# The flags that tell which bf16 path a CPU has (reported in the skip reason).
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The flags of /proc/cpuinfo's first ``flags`` line (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bf16_unavailable() -> str | None:
    """Return why OpenVINO cannot compute in bf16 here (a skip reason), or None when it can."""
    from device_agent.runtimes import is_installed

    if not is_installed("openvino"):
        return "openvino is not installed"
    from device_agent.runtimes.openvino import precision_problem

    problem = precision_problem("bf16")
    if problem is None:
        return None
    flags = cpu_flags()
    have = ", ".join(f for f in BF16_FLAGS if f in flags) or "none of " + ", ".join(BF16_FLAGS)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    capped = f", oneDNN capped to {cap}" if cap else ""
    return f"OpenVINO cannot compute in bf16 on this CPU ({problem}; CPU flags: {have}{capped})"
