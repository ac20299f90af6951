"""Fixtures for the OTA tests: signing keys and small signed bundles (v1, v2, ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.ota.bundles import fit_softmax, onnx_softmax_model, repackage, write_bundle


@pytest.fixture(scope="session")
def ota_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trusted key pair and a second, untrusted one."""
    from toolchain.signing import create_keys

    d = tmp_path_factory.mktemp("keys")
    priv, pub = create_keys(d, "fleet")
    other_priv, other_pub = create_keys(d, "other")
    return {"key": priv, "pub": pub, "other_key": other_priv, "other_pub": other_pub}


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, np.ndarray]) -> Path:
    """An unsigned v1 x86 bundle with a real ONNX model trained on the digits."""
    w, b = fit_softmax(digits["x"], digits["y"])
    d = tmp_path_factory.mktemp("bundles") / "base"
    return write_bundle(d, onnx_softmax_model(w, b), digits["x"][:300])


@pytest.fixture(scope="session")
def make_version(
    tmp_path_factory: pytest.TempPathFactory, base_bundle: Path, ota_keys: dict[str, Path]
) -> Callable[..., Path]:
    """Return ``make(version, key="key"|"other_key"|None, target=None, labels=None) -> bundle dir`` (fresh copy)."""
    root = tmp_path_factory.mktemp("versions")
    counter = [0]

    def make(version: int, key: str | None = "key", target: str | None = None, labels: list[str] | None = None) -> Path:
        counter[0] += 1
        dst = root / f"v{version}-{counter[0]}"
        return repackage(base_bundle, dst, version=version, key=ota_keys[key] if key else None, target=target,
                         labels=labels)

    return make
