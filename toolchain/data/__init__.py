"""The digits the demo and the fleet simulator run on, shipped inside the package.

``calibration_data/`` at the top of a checkout holds the same two files for users (with their
source, licence and the script that makes them); this copy is package data, so ``edgefleet demo``
and ``toolchain.fleet.sim`` work from an installed wheel too. A test keeps the copies identical.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

DIGITS_TRAIN = "digits.npz"  # x (1438, 8, 8, 1) float32 in 0..16, y, class_names
DIGITS_TEST = "digits_test.npz"  # x (359, 8, 8, 1), y, class_names
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def digits_path(name: str = DIGITS_TRAIN) -> Path:
    """Return a file system path to a shipped digits file (``DIGITS_TRAIN`` or ``DIGITS_TEST``).

    From a wheel or a checkout this is the installed file itself; from a zipped install it is a
    copy extracted for the life of the process.
    """
    if name not in (DIGITS_TRAIN, DIGITS_TEST):
        raise ValueError(f"unknown shipped data file {name!r}. Known: {DIGITS_TRAIN}, {DIGITS_TEST}")
    res = resources.files(__name__).joinpath(name)
    if isinstance(res, Path):
        return res
    return _extracted.enter_context(resources.as_file(res))
