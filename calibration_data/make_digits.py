"""Regenerate digits.npz and digits_test.npz from the copy of the UCI digits bundled with scikit-learn.

Writes them here and into toolchain/data/ (the package's copy, which `edgefleet demo` and the fleet
simulator load from an installed wheel).

Run: python calibration_data/make_digits.py   (needs scikit-learn; reads its bundled file, no download)
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

SEED = 20261127
TEST_FRACTION = 0.2


def main() -> None:
    d = load_digits()
    x = d.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1), values 0..16
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):  # stratified split
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=round(len(idx) * TEST_FRACTION), replace=False)] = True
    names = np.array([str(c) for c in range(10)])
    here = Path(__file__).parent
    # here for users, and the package's copy (toolchain/data) for the demo and the simulator
    for out in (here, here.parent / "toolchain" / "data"):
        np.savez_compressed(out / "digits.npz", x=x[~test], y=y[~test], class_names=names)
        np.savez_compressed(out / "digits_test.npz", x=x[test], y=y[test], class_names=names)
    print(f"train {int((~test).sum())}, test {int(test.sum())}")


if __name__ == "__main__":
    main()
