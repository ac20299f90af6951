"""Builds the optional C kernels of the device agent; all metadata lives in pyproject.toml.

``optional=True``: without a C compiler or the Python headers the install still succeeds and the
agent uses its numpy fallbacks (``device_agent.kernels.NATIVE`` is False then).

With numpy's headers (numpy >= 2 is a build requirement) the kernels also use numpy's C API:
reading a sample's array fields and making the scores array directly instead of through Python
calls. Built against numpy 2, the extension runs with numpy 1.23 and later; where that import
fails, ``device_agent.kernels`` falls back to numpy.
"""

from setuptools import Extension, setup

include_dirs: list[str] = []
define_macros: list[tuple[str, str | None]] = []
try:
    import numpy

    include_dirs.append(numpy.get_include())
    define_macros.append(("EDGEFLEET_NUMPY_API", None))
except ImportError:  # building without build isolation in an environment without numpy
    pass

setup(
    ext_modules=[
        Extension(
            "device_agent._kernels",
            sources=["device_agent/_kernels.c"],
            optional=True,
            include_dirs=include_dirs,
            define_macros=define_macros,
            # No fused multiply-add (ARM contracts by default): sums must match numpy's to the bit.
            extra_compile_args=["-O3", "-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off"],
        )
    ]
)
