"""The fleet database: one small interface over SQLite (default) and PostgreSQL (psycopg 3).

URLs: ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works) or
``postgresql://user@host:port/db``. Both run the same versioned migrations
(``toolchain.fleet.migrations``) and the same SQL; only column types and the placeholder style differ.

SQLite runs in WAL mode with ``synchronous=FULL``, because the collector acknowledges a message to
the broker only after the commit that stored it returns.

Windows are stored as two packed arrays (``ints``: histograms and counts as little-endian int64;
``floats``: min/max/mean/M2 as float64) in the baseline's layout, so a fleet-wide query merges
thousands of windows with a few numpy sums instead of parsing JSON.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.stats import FeatureSetProfile, Profile, ProfileSpec
from toolchain.errors import ToolchainError
from toolchain.fleet.migrations import MIGRATIONS, Only, render

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_MIGRATION_LOCK = 4_711_042  # advisory lock id: two collectors starting together migrate once


class StorageError(ToolchainError):
    """The database URL is wrong, the database cannot be opened, or a query failed."""


def parse_db_url(url: str) -> tuple[str, str]:
    """Return ``("sqlite", path)`` or ``("postgresql", url)`` for a database URL."""
    if not isinstance(url, str) or not url:
        raise StorageError("database URL is empty; use sqlite:///fleet.db or postgresql://user@host/db")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise StorageError(f"database URL {url!r} names no file; use sqlite:///fleet.db")
        return "sqlite", path
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise StorageError(
        f"database URL {url[:80]!r} is not supported; use sqlite:///PATH (for example sqlite:///fleet.db)"
        " or postgresql://user@host:port/dbname"
    )


class Store:
    """One connection to the fleet database. Not shared between threads: open one per thread."""

    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = url
        self.dialect, target = parse_db_url(url)
        self._lock = threading.RLock()
        if self.dialect == "sqlite":
            path = Path(target)
            if path.parent and not path.parent.exists():
                raise StorageError(
                    f"directory {str(path.parent)!r} for database {target!r} does not exist; create it"
                )
            try:
                self.conn: Any = sqlite3.connect(
                    str(path),
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                )
                self.conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                raise StorageError(f"cannot open SQLite database {target!r}: {e}") from None
        else:
            try:
                import psycopg
            except ImportError:
                raise StorageError("PostgreSQL needs psycopg 3: pip install 'psycopg[binary]'") from None
            try:
                self.conn = psycopg.connect(target, autocommit=True, connect_timeout=10)
            except psycopg.Error as e:
                raise StorageError(
                    f"cannot connect to PostgreSQL at {_redact(target)!r}: {str(e).strip()[:200]}"
                ) from None
        if migrate:
            self.migrate()

    # ---------------------------------------------------------------------------------------------
    # Plumbing

    def _sql(self, sql: str) -> str:
        if self.dialect == "postgresql":
            return sql.replace("?", "%s")
        return sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement with ``?`` placeholders; return the cursor."""
        return self.conn.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement for many parameter rows; return the number of rows changed."""
        if not rows:
            return 0
        if self.dialect == "sqlite":
            return int(self.conn.executemany(sql, rows).rowcount)
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)
            return int(cur.rowcount)

    def insert_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[bool]:
        """Run an ``INSERT ... ON CONFLICT DO NOTHING`` per row; return which rows were inserted.

        SQLite: one statement per row in this process (microseconds each). PostgreSQL: one pipelined
        ``executemany`` with ``RETURNING``; a row that hit the conflict returns an empty result.
        """
        if not rows:
            return []
        if self.dialect == "sqlite":
            return [self.conn.execute(sql, r).rowcount > 0 for r in rows]
        out: list[bool] = []
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql + " RETURNING 1"), rows, returning=True)
            while True:
                out.append(cur.rowcount > 0)
                if not cur.nextset():
                    break
        return out

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query and return every row."""
        if self.dialect == "postgresql":
            # Binary results: packed windows arrive as bytes instead of hex text to parse.
            return list(self.conn.execute(self._sql(sql), tuple(params), binary=True).fetchall())
        return list(self.execute(sql, params).fetchall())

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the body in one transaction (committed on success, rolled back on error)."""
        with self._lock:
            if self.dialect == "sqlite":
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            else:
                with self.conn.transaction():
                    yield

    def greatest(self, a: str, b: str) -> str:
        """Return the dialect's two-argument maximum of SQL expressions."""
        return f"max({a}, {b})" if self.dialect == "sqlite" else f"GREATEST({a}, {b})"

    def least(self, a: str, b: str) -> str:
        """Return the dialect's two-argument minimum of SQL expressions."""
        return f"min({a}, {b})" if self.dialect == "sqlite" else f"LEAST({a}, {b})"

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
            pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------
    # Migrations

    def schema_version(self) -> int:
        """Return the highest applied migration (0 for an empty database)."""
        try:
            rows = self.query("SELECT MAX(version) FROM schema_migrations")
        except Exception:  # noqa: BLE001 - the table does not exist yet (autocommit: nothing to roll back)
            return 0
        return int(rows[0][0] or 0)

    def migrate(self) -> int:
        """Apply every pending migration, each in its own transaction; return the resulting version."""
        with self.transaction():
            if self.dialect == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK,))
            self.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at "
                + ("REAL" if self.dialect == "sqlite" else "DOUBLE PRECISION")
                + " NOT NULL)"
            )
            applied = {int(r[0]) for r in self.query("SELECT version FROM schema_migrations")}
            known = max(v for v, _, _ in MIGRATIONS)
            newer = sorted(v for v in applied if v > known)
            if newer:
                raise StorageError(
                    f"database {_redact(self.url)!r} has schema version {newer[-1]}, newer than this"
                    " edgefleet"
                    f" ({known}); upgrade edgefleet"
                )
            for version, name, statements in sorted(MIGRATIONS):
                if version in applied:
                    continue
                for st in statements:
                    if isinstance(st, Only):
                        if st.dialect != self.dialect or (st.guard and not self.query(st.guard)):
                            continue
                        st = st.sql
                    self.execute(render(st, self.dialect))
                self.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
        return self.schema_version()


def _redact(url: str) -> str:
    """Hide a password in a URL for messages."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return url


def open_store(url: str, migrate: bool = True) -> Store:
    """Open (and by default migrate) the fleet database at ``url``."""
    return Store(url, migrate=migrate)


def sqlite_path_exists(url: str) -> bool:
    """True when ``url`` is SQLite and its file exists (PostgreSQL URLs: always True)."""
    dialect, target = parse_db_url(url)
    return dialect != "sqlite" or os.path.exists(target)


# --------------------------------------------------------------------------------------------------
# Packing profiles into arrays


@dataclass(frozen=True)
class Layout:
    """Where each part of a profile sits in the packed int64 and float64 vectors of a spec."""

    spec: ProfileSpec
    template: Profile  # an empty profile of the spec (validated once; merges copy its edges)
    parts: tuple[tuple[str, int, int], ...]  # (feature set, features, histogram width)
    n_ints: int
    n_floats: int
    n_classes: int

    @classmethod
    def of(cls, spec: ProfileSpec) -> Layout:
        proto = spec.new_profile()
        parts = []
        n_ints = n_floats = 0
        for name in _sets(proto):
            fp: FeatureSetProfile = getattr(proto, name)
            f, w = fp.counts.shape
            parts.append((name, f, w))
            n_ints += f * w + 2 * f
            n_floats += 4 * f
        k = len(spec.labels)
        return cls(spec, proto, tuple(parts), n_ints + k, n_floats, k)

    def empty(self) -> Profile:
        """Return a new empty profile of this spec without re-validating its edges."""
        t = self.template
        return Profile(
            spec=self.spec,
            inputs=t.inputs.empty_like(),
            class_counts=np.zeros_like(t.class_counts),
            confidence=t.confidence.empty_like(),
            latency_ms=t.latency_ms.empty_like(),
            schema_violations={},
            values=None if t.values is None else t.values.empty_like(),
        )


def _sets(profile: Profile) -> tuple[str, ...]:
    """The feature sets a profile packs, in order (``values`` last, only for scalar-output models)."""
    base = ("inputs", "confidence", "latency_ms")
    return base if profile.values is None else (*base, "values")


def pack_profile(profile: Profile) -> tuple[bytes, bytes]:
    """Return a profile's (ints, floats) blobs in its spec's layout."""
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = []
    for name in _sets(profile):
        fp: FeatureSetProfile = getattr(profile, name)
        ints += [fp.counts.ravel(), fp.count, fp.nan_count]
        floats += [fp.min, fp.max, fp.mean, fp.m2]
    ints.append(profile.class_counts)
    return (np.concatenate(ints).astype("<i8").tobytes(), np.concatenate(floats).astype("<f8").tobytes())


def merge_packed(
    layout: Layout, blobs: Sequence[tuple[bytes, bytes]], violations: Sequence[dict[str, int]] = ()
) -> Profile:
    """Merge many packed windows into one Profile (see ``merge_packed_groups``)."""
    return merge_packed_groups(layout, blobs, [0] * len(blobs), 1, violations)[0]


def merge_packed_groups(
    layout: Layout,
    blobs: Sequence[tuple[bytes, bytes]],
    groups: Sequence[int],
    n_groups: int,
    violations: Sequence[dict[str, int]] = (),
) -> list[Profile]:
    """Merge packed windows by group (``groups[i]`` in ``0..n_groups-1``) into one Profile per group.

    Counts and histograms add exactly. Mean and M2 use the k-way form of Chan et al.'s update:
    ``mean = sum(n_i mean_i) / N`` and ``M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2)``.
    """
    profs = [layout.empty() for _ in range(n_groups)]
    if blobs:
        g0 = np.asarray(groups, dtype=np.int64)
        order = np.argsort(g0, kind="stable")
        g = g0[order]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        if len(starts) != n_groups or g[0] != 0 or g[-1] != n_groups - 1:
            raise ValueError("every group needs at least one window")
        ints = np.frombuffer(b"".join(b[0] for b in blobs), dtype="<i8").reshape(len(blobs), layout.n_ints)[
            order
        ]
        flts = np.frombuffer(b"".join(b[1] for b in blobs), dtype="<f8").reshape(len(blobs), layout.n_floats)[
            order
        ]

        ends = np.r_[starts[1:], len(g)]
        spans = list(zip(starts.tolist(), ends.tolist(), strict=True))

        # A Python loop of slice sums beats ufunc.reduceat along axis 0 by ~10x here.
        singletons = len(spans) == len(g)

        def seg(fn: Any, a: np.ndarray) -> np.ndarray:
            if singletons:  # one window per group (e.g. the latest window of each device): nothing to merge
                return a
            return np.stack([fn(a[i:j], axis=0) for i, j in spans])

        def gsum(a: np.ndarray) -> np.ndarray:
            return seg(np.sum, a)

        isum = gsum(ints)
        io = fo = 0
        for name, f, w in layout.parts:
            counts = isum[:, io : io + f * w].reshape(n_groups, f, w)
            io += f * w
            n_i = ints[:, io : io + f].astype(np.float64)
            n = isum[:, io : io + f]
            io += f
            nan = isum[:, io : io + f]
            io += f
            mins, maxs, means, m2s = (flts[:, fo + k * f : fo + (k + 1) * f] for k in range(4))
            fo += 4 * f
            gmin = seg(np.min, mins)
            gmax = seg(np.max, maxs)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(n > 0, gsum(n_i * means) / np.maximum(n, 1), 0.0)
                m2 = gsum(m2s) + gsum(n_i * (means - mean[g]) ** 2)
            m2 = np.where(n > 0, m2, 0.0)
            for k, p in enumerate(profs):
                fp: FeatureSetProfile = getattr(p, name)
                fp.counts, fp.count, fp.nan_count = counts[k], n[k], nan[k]
                fp.min, fp.max, fp.mean, fp.m2 = gmin[k], gmax[k], mean[k], m2[k]
        cls = isum[:, io : io + layout.n_classes]
        for k, p in enumerate(profs):
            p.class_counts = cls[k]
    for gi, v in zip(groups, violations, strict=False):  # violations may be omitted
        if v:
            tgt = profs[gi].schema_violations
            for key, c in v.items():
                tgt[key] = tgt.get(key, 0) + int(c)
    return profs


def dumps(obj: Any) -> str:
    """Compact JSON for text columns."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)
