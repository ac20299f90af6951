"""Rollout events (migration 7) and what a canary gate reads from the fleet database; SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from toolchain.cli import main
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.rollouts import gate_events, measure, record_gate, window_count
from toolchain.fleet.storage import open_store


def test_a_migration_missing_below_the_highest_is_applied_later(db_url, monkeypatch) -> None:
    """A database migrated to 1-5 and 7 (two branches added 6 and 7 at once) later gets 6."""
    import toolchain.fleet.migrations as migrations
    import toolchain.fleet.storage as storage_mod

    real = list(migrations.MIGRATIONS)
    six = [m for m in real if m[0] == 6] or [(6, "probe", ["CREATE TABLE gap_probe (x INTEGER)"])]
    without = [m for m in real if m[0] != 6]
    assert max(m[0] for m in without) >= 7  # 7 is applied without 6
    monkeypatch.setattr(storage_mod, "MIGRATIONS", without)
    with open_store(db_url) as s:
        assert sorted(r[0] for r in s.query("SELECT version FROM schema_migrations")) == [
            m[0] for m in sorted(without)
        ]
        s.execute(
            "INSERT INTO rollout_events (ts, fleet, deployment_id, model_name, model_version, model_sha256,"
            " gate, outcome, action, windows, message, detail_json) VALUES"
            " (1, 'lab', 'd', 'm', 2, 'x', 'drift', 'passed', 'promoted', 3, 'kept across the migration', '{}')"
        )
    monkeypatch.setattr(storage_mod, "MIGRATIONS", sorted(without + six))
    with open_store(db_url) as s:
        got = sorted(r[0] for r in s.query("SELECT version FROM schema_migrations"))
        assert got == sorted(m[0] for m in without + six)
        if six[0][1] == "probe":
            assert s.query("SELECT COUNT(*) FROM gap_probe") == [(0,)]
        assert [e["message"] for e in gate_events(s)] == ["kept across the migration"]
    with open_store(db_url) as s:  # a third open applies nothing
        assert len(s.query("SELECT version FROM schema_migrations")) == len(got)


def test_measure_reads_the_newest_or_the_first_windows_of_one_model(
    db_url, bundle, model_ref, make_window
) -> None:
    from toolchain.fleet.ingest import Incoming, Ingestor
    from toolchain.fleet.registry import BaselineCache
    from toolchain.fleet.sim import stats_payload

    register_bundle(db_url, bundle[0])
    fade = lambda x: x * 0.3  # noqa: E731
    profs = [make_window(150, seed=s) for s in range(3)] + [make_window(150, seed=9, transform=fade)]
    msgs = [stats_payload("cam-1", s, model_ref, p) for s, p in enumerate(profs)]
    with open_store(db_url) as s:
        Ingestor(s, BaselineCache(s)).process([Incoming(t, p, i, 1, 0, 0.0) for i, (t, p) in enumerate(msgs)])
        sha = bundle[1]
        assert window_count(s, "lab", "cam-1", sha) == 4
        assert window_count(s, "lab", "cam-1", sha, labelled_only=True) == 0
        first = measure(s, "drift", "lab", "cam-1", sha, 2, newest=False)
        newest = measure(s, "drift", "lab", "cam-1", sha, 2, newest=True)
        assert first is not None and newest is not None
        assert first.windows == newest.windows == 2 and first.count == 300
        assert first.state in ("ok", "warn") and newest.state == "alert"  # the faded window is the newest
        assert first.value is not None and newest.value is not None and newest.value > first.value
        conf = measure(s, "confidence", "lab", "cam-1", sha, 3, newest=False)
        assert conf is not None and 0.0 < (conf.value or 0) <= 1.0
        assert measure(s, "accuracy", "lab", "cam-1", sha, 3, newest=True) is None  # no labels
        assert measure(s, "drift", "lab", "cam-2", sha, 3, newest=True) is None
        with pytest.raises(LookupError, match="fleet register"):
            s.execute("DELETE FROM baselines")
            measure(s, "drift", "lab", "cam-1", sha, 2, newest=True)


def test_gate_events_in_status_and_report(db_url) -> None:
    from toolchain.fleet.report import build_report

    detail = {
        "devices": [
            {"device_id": "cam-1", "reason": "drift ok -> alert, max PSI 0.050 -> 0.900", "passed": False}
        ],
        "rollback": {"version": 3, "devices": {"cam-1": "deployed"}},
    }
    with open_store(db_url) as s:
        for i, (outcome, action) in enumerate([("passed", "promoted"), ("failed", "rolled_back")]):
            record_gate(
                s,
                fleet="lab",
                deployment_id=f"dep-{i}",
                name="digits",
                version=2 + i,
                sha256="ab" * 32,
                gate="drift",
                outcome=outcome,
                action=action,
                windows=3,
                message=f"gate drift {outcome}",
                detail=detail,
                ts=1000.0 + i,
            )
        events = gate_events(s)
    assert [e["action"] for e in events] == ["rolled_back", "promoted"]  # newest first
    assert events[0]["detail"]["rollback"]["version"] == 3 and events[0]["model"]["version"] == 3
    r = CliRunner().invoke(main, ["fleet", "status", "--db", db_url, "--json"])
    assert r.exit_code == 0, r.output
    assert [g["outcome"] for g in json.loads(r.output)["canary_gates"]] == ["failed", "passed"]
    r = CliRunner().invoke(main, ["fleet", "status", "--db", db_url])
    assert r.exit_code == 0, r.output
    assert "canary gates" in r.output and "rolled_back" in r.output and "0.050 -> 0.900" in r.output
    page = build_report(db_url)
    assert 'id="canary-gates"' in page and "digits v3" in page and "0.050 -&gt; 0.900" in page
