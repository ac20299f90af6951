"""Builds the optional C kernels of the device agent; all metadata lives in pyproject.toml.

``optional=True``: without a C compiler or the Python headers the install still succeeds and the
agent uses its numpy fallbacks (``device_agent.kernels.NATIVE`` is False then).

The kernels are built against numpy's C API (numpy >= 2 is a build requirement, so pip's build
isolation always has its headers). Built against numpy 2, the extension runs with numpy 1.23 and
later; where that import fails, ``device_agent.kernels`` falls back to numpy. A build without
build isolation in an environment without numpy leaves the kernels out (numpy fallbacks).
"""

import sys

from setuptools import Extension, setup

ext_modules: list[Extension] = []
try:
    import numpy
except ImportError:
    print("warning: numpy is not importable at build time; building without the C kernels", file=sys.stderr)
else:
    ext_modules.append(
        Extension(
            "device_agent._kernels",
            sources=["device_agent/_kernels.c"],
            optional=True,
            include_dirs=[numpy.get_include()],
            # No fused multiply-add (ARM contracts by default): sums must match numpy's to the bit.
            extra_compile_args=["-O3", "-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off"],
        )
    )

setup(ext_modules=ext_modules)
