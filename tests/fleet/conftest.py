"""Fixtures for the fleet tests: the digits baseline, a registered bundle, a database, a collector."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.formats.stats import Profile
from device_agent.formats.telemetry import ModelRef
from toolchain.fleet.sim import digits_baseline, load_digits, window_profile, write_bundle


@pytest.fixture(scope="session")
def digits_model() -> tuple[Profile, Any]:
    """(baseline profile of the digits training split, a small numpy classifier with ``predict``)."""
    return digits_baseline()


@pytest.fixture(scope="session")
def digits_data() -> dict[str, np.ndarray]:
    return load_digits()


@pytest.fixture
def bundle(tmp_path: Path, digits_model: tuple[Profile, Any]) -> tuple[Path, str]:
    """A bundle folder with the digits baseline; returns (path, model sha256)."""
    return write_bundle(tmp_path / "bundle", digits_model[0])


@pytest.fixture
def model_ref(bundle: tuple[Path, str]) -> ModelRef:
    return ModelRef("digits", 1, bundle[1])


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.timeout(120)])]
)
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A fresh database URL: SQLite, then the PostgreSQL server (tests that take it run on both)."""
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_window(
    digits_model: tuple[Profile, Any], digits_data: dict[str, np.ndarray]
) -> Callable[..., Profile]:
    """Return ``make(n, seed, transform=None)``: a window profile of n held-out digits."""
    base, model = digits_model

    def make(
        n: int = 100, seed: int = 0, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> Profile:
        rng = np.random.default_rng(seed)
        x = digits_data["x_test"][rng.choice(len(digits_data["x_test"]), n)]
        if transform is not None:
            x = transform(x)
        return window_profile(base.spec, x, model.predict(x))

    return make


@pytest.fixture
def count_rows() -> Callable[[str, str], int]:
    """Return ``count(db_url, table)``: rows in a table (opens a fresh connection each time)."""
    from toolchain.fleet.storage import open_store

    def count(url: str, tbl: str) -> int:
        with open_store(url, migrate=False) as s:
            return int(s.query(f"SELECT COUNT(*) FROM {tbl}")[0][0])

    return count


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Any]]:
    """Start in-process collectors that are stopped at the end of the test."""
    from toolchain.fleet.collector import Collector

    started: list[Collector] = []

    def make(db_url: str, broker_url: str, **kw: Any) -> Collector:
        c = Collector(db_url, broker_url, **kw).start()
        started.append(c)
        assert c.wait_ready(15), "collector did not connect and subscribe"
        return c

    yield make
    for c in started:
        c.stop()
