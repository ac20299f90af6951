"""Builds the optional C kernels of the device agent; all metadata lives in pyproject.toml.

``optional=True``: without a C compiler or the Python headers the install still succeeds and the
agent uses its numpy fallbacks (``device_agent.kernels.NATIVE`` is False then).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "device_agent._kernels",
            sources=["device_agent/_kernels.c"],
            optional=True,
            # No fused multiply-add (ARM contracts by default): sums must match numpy's to the bit.
            extra_compile_args=["-O3", "-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off"],
        )
    ]
)
