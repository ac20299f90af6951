"""Compaction into hourly rollups (exact merges, transparent reads) and drift from stored evaluations."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.formats.stats import Profile
from toolchain.cli import main
from toolchain.fleet.alerts import Evaluator
from toolchain.fleet.compact import HOUR_S, compact
from toolchain.fleet.ingest import Incoming, Ingestor
from toolchain.fleet.queries import drift_from_evaluations, drift_table
from toolchain.fleet.registry import BaselineCache, register_bundle
from toolchain.fleet.sim import stats_payload
from toolchain.fleet.status import status_rows
from toolchain.fleet.storage import Layout, merge_packed, open_store

DEVICES = ["cam-1", "cam-2", "cam-3"]
WINDOW_S = 600.0
N_WINDOWS = 24  # 4 hours of 10-minute windows


class ListSink:
    """An AlertSink that keeps what is published (the collector publishes on its MQTT connection)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, object]]] = []

    def publish_alert(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, json.loads(payload)))


@pytest.fixture
def filled(db_url, bundle, model_ref, make_window) -> tuple[str, float, dict]:
    """Three devices, 24 windows each over the last four hours (cam-3 drifts), one heartbeat each."""
    register_bundle(db_url, bundle[0])
    t0 = (np.floor(time.time() / HOUR_S) - 5) * HOUR_S + 120.0  # windows start 2 min past the hour
    profiles = {}
    msgs = []
    for d, dev in enumerate(DEVICES):
        for seq in range(N_WINDOWS):
            shift = (lambda x: x * 0.5) if dev == "cam-3" and seq >= 6 else None
            prof = make_window(40 + 7 * seq, seed=100 * d + seq, transform=shift)
            if seq == 3:
                prof.add_violation("shape", 2)
            profiles[(dev, seq)] = prof
            msgs.append(stats_payload(dev, seq, model_ref, prof, t0=t0, window_s=WINDOW_S))
        empty = make_window(1).spec.new_profile()  # a heartbeat: no predictions
        msgs.append(stats_payload(dev, N_WINDOWS, model_ref, empty, t0=t0, window_s=WINDOW_S))
    with open_store(db_url) as s:
        Ingestor(s, BaselineCache(s)).process(
            [Incoming(t, p, i, 1, 0, time.time()) for i, (t, p) in enumerate(msgs)]
        )
    return db_url, t0, profiles


def _comparable(rows: list[dict]) -> dict:
    return {
        (r["scope"], r["device_id"]): (r["state"], r["count"], r["windows"], round(r["max_psi"], 9))
        for r in rows
    }


def test_compaction_folds_old_windows_into_exact_hourly_rollups(filled, digits_model) -> None:
    url, t0, profiles = filled
    base, _ = digits_model
    with open_store(url) as s:
        before_drift = drift_table(s, since="all")
        before_status = status_rows(s)
        raw_before = int(s.query("SELECT COUNT(*) FROM windows")[0][0])
        cutoff = t0 + 2 * HOUR_S + 1  # the first two hours (6 windows each per hour) and no more
        out = compact(s, cutoff)
        # Windows that *ended* before the cutoff: seq 0..10 (the 12th ends 2 min after it).
        folded = sum(1 for seq in range(N_WINDOWS) if t0 + (seq + 1) * WINDOW_S < cutoff) * len(DEVICES)
        assert out.windows == folded and out.devices == 3
        assert int(s.query("SELECT COUNT(*) FROM windows")[0][0]) == raw_before - folded
        rollups = s.query(
            "SELECT device_id, hour, windows, count, violations_json, ints, floats FROM window_rollups"
            " ORDER BY device_id, hour"
        )
        assert len(rollups) == out.rollups == 2 * 3  # two hours per device
        layout = Layout.of(base.spec)
        for dev, hour, n, count, viol, ints, floats in rollups:
            seqs = [
                q
                for q in range(N_WINDOWS)
                if t0 + (q + 1) * WINDOW_S < cutoff
                and np.floor((t0 + q * WINDOW_S) / HOUR_S) * HOUR_S == hour
            ]
            assert n == len(seqs) and count == sum(profiles[(dev, q)].count for q in seqs)
            # The rollup equals device_agent.formats.stats merging the raw windows one by one (as sent: the
            # wire format rounds means and M2 to 10 significant digits).
            sent = [Profile.from_state(base.spec, profiles[(dev, q)].state_dict()) for q in seqs]
            expect = sent[0]
            for p in sent[1:]:
                expect = expect.merge(p)
            got = merge_packed(layout, [(bytes(ints), bytes(floats))])
            for name in ("inputs", "confidence", "latency_ms"):
                a, b = getattr(got, name), getattr(expect, name)
                assert np.array_equal(a.counts, b.counts) and np.array_equal(a.count, b.count)
                assert np.array_equal(a.nan_count, b.nan_count)
                assert np.array_equal(a.min, b.min) and np.array_equal(a.max, b.max)
                assert np.allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
                assert np.allclose(a.m2, b.m2, rtol=1e-9, atol=1e-9)
            assert np.array_equal(got.class_counts, expect.class_counts)
            assert json.loads(viol) == ({"shape": 2} if 3 in seqs else {})
        # Readers see the same fleet: status counters, drift rows (counts, windows, PSI, verdicts).
        assert status_rows(s) == before_status
        assert _comparable(drift_table(s, since="all")) == _comparable(before_drift)
        # Again later: new windows of an hour already rolled up merge into its rollup.
        out2 = compact(s, t0 + 4 * HOUR_S)
        assert out2.windows > 0 and int(s.query("SELECT COUNT(*) FROM window_rollups")[0][0]) == 4 * 3
        assert _comparable(drift_table(s, since="all")) == _comparable(before_drift)
        assert (
            int(s.query("SELECT SUM(windows) FROM window_rollups")[0][0])
            + int(s.query("SELECT COUNT(*) FROM windows")[0][0])
            == raw_before
        )


def test_fleet_drift_reads_the_stored_evaluations(filled) -> None:
    url, _, _ = filled
    with open_store(url) as s:
        ev = Evaluator(s, BaselineCache(s), sink=ListSink())
        done = ev.evaluate_many([("lab", d) for d in DEVICES])
        assert set(done) == {("lab", d) for d in DEVICES}
        rows = drift_from_evaluations(s, since="all")
        recomputed = {r["device_id"]: r for r in drift_table(s, since="all") if r["scope"] == "device"}
    by_dev = {r["device_id"]: r for r in rows if r["scope"] == "device"}
    # The evaluation covered every window stored, so it agrees with a full recompute.
    for dev in DEVICES:
        assert by_dev[dev]["state"] == recomputed[dev]["state"]
        assert by_dev[dev]["count"] == recomputed[dev]["count"]
        assert by_dev[dev]["max_psi"] == pytest.approx(recomputed[dev]["max_psi"], rel=1e-5)
        assert by_dev[dev]["worst_feature"] == recomputed[dev]["worst_feature"]
    assert rows[0]["state"] == "alert" and rows[0]["device_id"] in ("cam-3", "*")
    (fleet,) = [r for r in rows if r["scope"] == "fleet"]
    assert fleet["devices"] == 3 and fleet["worst_device"] == "cam-3"
    assert fleet["devices_by_state"]["alert"] == 1
    r = CliRunner().invoke(main, ["fleet", "drift", "--db", url, "--since", "all"])
    assert r.exit_code == 0 and "latest stored evaluation" in r.stdout and "cam-3" in r.stdout
    # The terminal shows the worst rows only; the database sorts and counts.
    limited = drift_from_evaluations(url, since="all", limit=1)
    (top,) = [r for r in limited if r["scope"] == "device"]
    assert top == by_dev["cam-3"] and [r for r in limited if r["scope"] == "fleet"] == [fleet]
    r = CliRunner().invoke(main, ["fleet", "drift", "--db", url, "--since", "all", "--recompute", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)[0]["features"]) == 64


def test_compact_cli(filled) -> None:
    url, _, _ = filled
    r = CliRunner().invoke(main, ["fleet", "compact", "--db", url, "--older-than", "2h", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["windows"] > 0 and out["bytes_after"] < out["bytes_before"]
    r = CliRunner().invoke(main, ["fleet", "compact", "--db", url, "--older-than", "2h"])
    assert r.exit_code == 0 and "nothing to compact" in r.stdout
    r = CliRunner().invoke(main, ["fleet", "compact", "--db", url, "--older-than", "soon"])
    assert r.exit_code == 2 and "30m, 36h, 7d" in r.stderr


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_collector_compacts_after_the_given_age(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory, monkeypatch
) -> None:
    import toolchain.fleet.collector as collector_mod
    from tests.helpers import wait_for
    from toolchain.fleet.sim import Publisher

    monkeypatch.setattr(collector_mod, "COMPACT_EVERY_S", 0.5)
    register_bundle(sqlite_url, bundle[0])
    c = collector_factory(sqlite_url, mosquitto.url, client_id="compact-test", compact_after_s=2 * HOUR_S)
    t0 = time.time() - 5 * HOUR_S
    pub = Publisher(mosquitto.url)
    old = [
        stats_payload("cam-1", q, model_ref, make_window(50, seed=q), t0=t0, window_s=WINDOW_S)
        for q in range(12)
    ]
    recent = stats_payload(
        "cam-1", 99, model_ref, make_window(50, seed=99), t0=time.time() - 700, window_s=600
    )
    pub.publish_all([*old, recent])
    assert pub.wait_acked(30)
    pub.close()

    def rolled() -> tuple[int, int]:
        with open_store(sqlite_url, migrate=False) as s:
            return (
                int(s.query("SELECT COALESCE(SUM(windows), 0) FROM window_rollups")[0][0]),
                int(s.query("SELECT COUNT(*) FROM windows")[0][0]),
            )

    wait_for(lambda: rolled() == (12, 1), 60, "12 old windows rolled up, the recent one kept")
    assert c.counters.stored == 13
    (row,) = status_rows(sqlite_url)
    assert row["windows"] == 13 and row["predictions"] == 13 * 50


def test_compaction_keeps_ground_truth_counts_exactly(db_url, bundle, model_ref, make_window) -> None:
    """Labelled windows folded into rollups: status and drift show the same accuracy after."""
    register_bundle(db_url, bundle[0])
    t0 = (np.floor(time.time() / HOUR_S) - 5) * HOUR_S + 120.0
    msgs = []
    for seq in range(8):
        prof = make_window(20, seed=seq)
        if seq % 2 == 0:  # every other window carries labels; the others are the old format
            for t, p in [(1, 1), (2, 2), (4, 7)][: 1 + seq % 3]:
                prof.add_label(t, p)
        msgs.append(stats_payload("cam-1", seq, model_ref, prof, t0=t0, window_s=WINDOW_S))
    with open_store(db_url) as s:
        Ingestor(s, BaselineCache(s)).process(
            [Incoming(t, p, i, 1, 0, time.time()) for i, (t, p) in enumerate(msgs)]
        )
        before = {k: status_rows(s)[0][k] for k in ("labelled", "correct", "accuracy")}
        drift_before = drift_table(s, since="all")[0]["accuracy"]
        out = compact(s, t0 + 5 * HOUR_S)
        assert out.windows == 8 and int(s.query("SELECT COUNT(*) FROM windows")[0][0]) == 0
        after = {k: status_rows(s)[0][k] for k in ("labelled", "correct", "accuracy")}
        conf = [json.loads(c) for (c,) in s.query("SELECT confusion_json FROM window_rollups") if c]
    # seq 0, 2, 4, 6 carry 1, 3, 2, 1 labels: (1,1) | (1,1),(2,2),(4,7) | (1,1),(2,2) | (1,1)
    assert before == after == {"labelled": 7, "correct": 6, "accuracy": 6 / 7}
    assert drift_before == pytest.approx(6 / 7)
    total = np.sum([np.asarray(c) for c in conf], axis=0)
    assert total[1, 1] == 4 and total[2, 2] == 2 and total[4, 7] == 1 and total.sum() == 7
