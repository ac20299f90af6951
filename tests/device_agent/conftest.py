"""Fixtures of the device agent's tests."""

from __future__ import annotations

import pytest

from device_agent import kernels


@pytest.fixture(params=["native", "numpy"])
def kernel_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C kernels, then with their numpy fallbacks (``device_agent.kernels``).

    The native case is skipped when the kernels are off (not built, or EDGEFLEET_NATIVE_KERNELS=0);
    ``test_kernels.py::test_native_kernels_are_built`` fails when they were not built.
    """
    if request.param == "native":
        if not kernels.NATIVE:
            pytest.skip("device_agent._kernels not built or turned off")
        return "native"
    monkeypatch.setattr(kernels, "NATIVE", False)
    monkeypatch.setattr(kernels, "summary", kernels.summary_numpy)
    monkeypatch.setattr(kernels, "quantize", kernels.quantize_numpy)
    monkeypatch.setattr(kernels, "store_row", kernels.store_row_numpy)
    monkeypatch.setattr(kernels, "decode_row", kernels.decode_row_numpy)
    monkeypatch.setattr(kernels, "Runner", None)
    monkeypatch.setattr(kernels, "fold_outputs", None)
    return "numpy"
