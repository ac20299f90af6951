"""Captured samples in the fleet store (issue 14 item 3): real agents capturing at rate 1.0, real
Mosquitto, the real collector (SQLite and PostgreSQL) and `edgefleet fleet samples list|export`.

Export order and bit-exact inputs (float32 images in [0,1], tabular float32 from 0.001 to 4000,
uint8, float64), labels sent to /v1/feedback attached as ``y``, redelivery storing nothing new,
malformed payloads quarantined and counted while the collector keeps storing."""

from __future__ import annotations

import csv
import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import device_agent.daemon as daemon_mod
import device_agent.mqtt as mqtt_mod
from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.formats.samplelabels import SampleLabel, encode_sample_labels
from device_agent.formats.samples import Sample, encode_samples
from tests.device_agent.agent_bundles import cached_onnx_bundle
from tests.device_agent.agent_helpers import http, write_config
from tests.fabricate import tabular_data, tabular_onnx_bundle
from tests.helpers import wait_for
from toolchain.cli import main
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.sim import Publisher
from toolchain.fleet.storage import open_store

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]
STREAM = "00112233aabbccdd"


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_mod, "RECONNECT_MIN_S", 0.1)
    monkeypatch.setattr(mqtt_mod, "RECONNECT_MAX_S", 0.5)
    monkeypatch.setattr(daemon_mod, "SHUTDOWN_FLUSH_S", 1.0)


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["fleet", "samples", *args])


def _daemon(tmp_path: Path, url: str, bundle: Path, device: str, fleet: str, capture: str) -> Daemon:
    cfg = write_config(
        tmp_path / f"{device}.toml",
        bundle=bundle,
        state_dir=tmp_path / f"state-{device}",
        url=url,
        device_id=device,
        fleet=fleet,
    )
    cfg.write_text(cfg.read_text() + capture)
    return Daemon(load_config(cfg)).start()


def _post(base: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    req = urllib.request.Request(base + "/v1/predict", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@pytest.mark.parametrize("db_kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_agents_capture_and_the_export_is_bit_exact_in_order_with_labels(
    db_kind: str, request: pytest.FixtureRequest, mosquitto, collector_factory, tmp_path: Path
) -> None:
    db = request.getfixturevalue("sqlite_url" if db_kind == "sqlite" else "postgres_url")
    tab = tabular_onnx_bundle(tmp_path / "pump")
    register_bundle(db, tab)
    col = collector_factory(db, mosquitto.url, evaluate=False, worker_processes=0)
    # pump-1: tabular float32 from 0.001 to 4000, at most 12 captured an hour (the rest: not captured)
    pump = _daemon(
        tmp_path,
        mosquitto.url,
        tab,
        "pump-1",
        "plant",
        "\n[capture]\nsample_rate = 1.0\nmax_samples_per_hour = 12\n",
    )
    # cam-1: digits images, float32 in [0,1] and uint8 (raw tensor bytes)
    cam = _daemon(
        tmp_path, mosquitto.url, cached_onnx_bundle(), "cam-1", "plant", "\n[capture]\nsample_rate = 1.0\n"
    )
    try:
        assert pump.api is not None and cam.api is not None
        pbase, cbase = "http://" + pump.api.address, "http://" + cam.api.address
        x1, _ = tabular_data(5, seed=3)
        x2, _ = tabular_data(7, seed=4)
        code, r1 = http(pbase, "/v1/predict", {"inputs": x1.tolist()})  # JSON: float32 on the device
        assert code == 200
        r2 = _post(pbase, _npy(x2), {"Content-Type": "application/x-npy"})
        x3, _ = tabular_data(3, seed=5)  # over the hourly budget: predicted, not captured
        code, r3 = http(pbase, "/v1/predict", {"inputs": x3.tolist()})
        assert code == 200
        ids = r1["ids"] + r2["ids"]
        labels = r1["labels"] + r2["labels"]
        flip = {"normal": "fault", "fault": "normal"}
        items = [
            {"id": pid, "label": lab if i % 3 else flip[lab]}
            for i, (pid, lab) in enumerate(zip(ids, labels, strict=True))
        ]
        items = items[:9] + [{"id": r3["ids"][0], "label": "fault"}]  # the last names an uncaptured id
        code, fb = http(pbase, "/v1/feedback", {"items": items})
        assert code == 200 and fb["counted"] == 10

        rng = np.random.default_rng(11)
        img = rng.random((4, 8, 8, 1), dtype=np.float32)  # [0,1]
        rc = _post(cbase, _npy(img), {"Content-Type": "application/x-npy"})
        u8 = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
        ru = _post(
            cbase,
            u8.tobytes(),
            {"Content-Type": "application/octet-stream", "X-Shape": "2,8,8,1", "X-Dtype": "uint8"},
        )
        wait_for(lambda: col.counters.samples_stored >= 12 + 6, 60, "18 samples stored")
        wait_for(lambda: col.counters.sample_labels_stored >= 9, 60, "9 labels stored")
        cap = pump.health()["capture"]
        assert cap["captured"] == 12 and cap["skipped_hourly_budget"] == 3
        assert cap["labels_sent"] == 9 and cap["labels_not_captured"] == 1
    finally:
        pump.stop()
        cam.stop()
    assert col.counters.quarantined == 0 and col.counters.samples_duplicate == 0

    # list: one row per device
    r = cli("list", "--db", db, "--json")
    assert r.exit_code == 0, r.output
    rows = {d["device_id"]: d for d in json.loads(r.stdout)["devices"]}
    assert (rows["pump-1"]["samples"], rows["pump-1"]["labelled"]) == (12, 9)
    assert (rows["cam-1"]["samples"], rows["cam-1"]["labelled"]) == (6, 0)
    assert rows["pump-1"]["model_versions"] == ["1"]
    table = cli("list", "--db", db)
    assert table.exit_code == 0 and "plant/pump-1" in table.output and "plant/cam-1" in table.output

    # tabular: .npz and .csv, bit-exact, in capture order, y where feedback came
    out = tmp_path / "pump.npz"
    r = cli("export", "--db", db, "--device", "pump-1", "--out", str(out))
    assert r.exit_code == 0, r.output
    got = np.load(out)
    want = np.concatenate([x1, x2])
    assert got["x"].dtype == np.float32 and got["x"].shape == (12, 4)
    assert got["x"].tobytes() == want.tobytes()
    assert list(got["id"]) == ids
    assert list(got["labels"]) == ["normal", "fault"]
    true = [items[i]["label"] for i in range(9)]
    assert list(got["y"]) == [["normal", "fault"].index(t) for t in true] + [-1, -1, -1]
    assert list(got["predicted"]) == [["normal", "fault"].index(lab) for lab in labels]
    assert np.array_equal(got["scores"].argmax(axis=1), got["predicted"])
    assert set(got["device"]) == {"pump-1"} and set(got["model_version"]) == {"1"}
    assert np.all(np.diff(got["ts"]) >= 0)
    csv_out = tmp_path / "pump.csv"
    assert cli("export", "--db", db, "--device", "plant/pump-1", "--out", str(csv_out)).exit_code == 0
    with open(csv_out, newline="") as fh:
        table_rows = list(csv.DictReader(fh))
    back = np.array([[float(row[f"x_{j}"]) for j in range(4)] for row in table_rows], dtype=np.float32)
    assert back.tobytes() == want.tobytes()
    assert [int(row["y"]) for row in table_rows] == list(got["y"])
    assert table_rows[0]["label"] in ("normal", "fault") and table_rows[-1]["label"] == ""

    # images: float32 and uint8 cannot share one x: refused in one line; each exports bit-exact
    r = cli("export", "--db", db, "--device", "cam-1", "--out", str(tmp_path / "cam.npz"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "2 input types" in r.output
    assert not (tmp_path / "cam.npz").exists()
    with open_store(db, migrate=False) as s:
        cam_rows = s.query(
            "SELECT sample_id, dtype FROM samples WHERE device_id = 'cam-1' ORDER BY ts, seq, pos"
        )
    assert [sid for sid, _ in cam_rows] == rc["ids"] + ru["ids"]
    assert [dt for _, dt in cam_rows] == ["float32"] * 4 + ["uint8"] * 2
    r = cli("export", "--db", db, "--device", "cam-1", "--since", "all", "--out", str(tmp_path / "both.csv"))
    assert r.exit_code == 1 and "Error:" in r.output
    with open_store(db, migrate=False) as s:
        blobs = s.query("SELECT data FROM samples WHERE device_id = 'cam-1' ORDER BY ts, seq, pos")
    assert [bytes(b[0]) for b in blobs] == [row.tobytes() for row in img] + [row.tobytes() for row in u8]


def _msg(device: str, seq: int, samples: list[Sample], fleet: str = "lab") -> tuple[str, bytes]:
    t = f"edgefleet/{fleet}/{device}/samples"
    return t, encode_samples(device_id=device, fleet=fleet, stream=STREAM, seq=seq, samples=samples)


def _samples(prefix: str, x: np.ndarray, t0: float) -> list[Sample]:
    return [
        Sample(
            f"{prefix}{i}",
            t0 + i * 0.001,
            "cd" * 32,
            "3",
            str(r.dtype),
            tuple(r.shape),
            r.tobytes(),
            1,
            (0.25, 0.75),
        )
        for i, r in enumerate(x)
    ]


@pytest.mark.parametrize("db_kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_redelivery_stores_nothing_new_and_bad_payloads_are_quarantined(
    db_kind: str, request: pytest.FixtureRequest, mosquitto, collector_factory, tmp_path: Path
) -> None:
    db = request.getfixturevalue("sqlite_url" if db_kind == "sqlite" else "postgres_url")
    # SQLite: with a decode worker process, as the collector runs on two or more cores
    col = collector_factory(
        db, mosquitto.url, evaluate=False, worker_processes=1 if db_kind == "sqlite" else 0
    )
    rng = np.random.default_rng(2)
    wide = rng.random((9, 6)) * np.geomspace(0.001, 4000, 6)  # float64 tabular, 0.001..4000
    t0 = 1_790_000_000.0
    good = [_msg("t-1", 1, _samples("a", wide[:4], t0)), _msg("t-1", 2, _samples("b", wide[4:], t0 + 1))]
    bad_len = json.loads(good[0][1])
    bad_len["samples"][0]["shape"] = [7]  # 48 bytes are not 7 float64
    forged = _msg("t-2", 1, _samples("c", wide[:1], t0))[1]
    labels = encode_sample_labels(
        device_id="t-1",
        fleet="lab",
        stream=STREAM,
        seq=3,
        labels=[SampleLabel("a1", "fault", 1, t0 + 5), SampleLabel("gone", "ok", 0, t0 + 5)],
    )
    pub = Publisher(mosquitto.url)
    pub.publish_all(
        [
            *good,
            good[0],  # redelivered
            ("edgefleet/lab/t-1/samples", json.dumps(bad_len).encode()),
            ("edgefleet/lab/t-1/samples", forged),  # names t-2 on t-1's topic
            ("edgefleet/lab/t-1/samples", b'{"schema": 1, "type": "sample_labels", "labels": 3}'),
            ("edgefleet/lab/t-1/samples", labels),
            ("edgefleet/lab/t-1/samples", labels),  # the same labels again
            _msg("t-1", 4, _samples("z", wide[:1], t0 + 9)),  # after the bad ones: still stored
        ]
    )
    assert pub.wait_acked(30)
    pub.close()
    wait_for(
        lambda: col.counters.samples_stored >= 10 and col.counters.quarantined >= 3, 30, "everything judged"
    )
    wait_for(lambda: col.counters.sample_labels_duplicate >= 2, 30, "the repeated labels")
    c = col.counters
    assert (c.samples_stored, c.samples_duplicate, c.quarantined) == (10, 4, 3)
    assert (c.sample_labels_stored, c.sample_labels_duplicate) == (2, 2)
    with open_store(db, migrate=False) as s:
        reasons = [r[0] for r in s.query("SELECT reason FROM quarantine ORDER BY id")]
        counters = dict(s.query("SELECT name, value FROM collector_counters"))
    assert "do not match dtype float64" in reasons[0]
    assert "does not match the topic" in reasons[1]
    assert counters["samples_stored"] == 10 and counters["samples_duplicate"] == 4

    status = CliRunner().invoke(main, ["fleet", "status", "--db", db])
    assert (
        "captured samples: 10 stored (4 resent and not stored again), 2 label(s) from feedback"
        in status.output
    )
    assert (
        json.loads(CliRunner().invoke(main, ["fleet", "status", "--db", db, "--json"]).stdout)["collector"][
            "samples_duplicate"
        ]
        == 4
    )
    r = cli("list", "--db", db, "--json")
    dev = json.loads(r.stdout)["devices"]
    assert [(d["device_id"], d["samples"], d["labelled"], d["labels_without_sample"]) for d in dev] == [
        ("t-1", 10, 1, 1)
    ]
    out = tmp_path / "t.csv"
    r = cli("export", "--db", db, "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["samples"] == 10
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([[float(row[f"x_{j}"]) for j in range(6)] for row in rows])
    assert x.tobytes() == np.concatenate([wide, wide[:1]]).tobytes()
    assert [row["id"] for row in rows] == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(5)] + ["z0"]
    assert [row["y"] for row in rows][:2] == ["-1", "1"]
    npz = tmp_path / "t.npz"
    assert cli("export", "--db", db, "--since", "2026-09-01T00:00:00Z", "--out", str(npz)).exit_code == 0
    got = np.load(npz)
    assert got["x"].dtype == np.float64 and got["x"].tobytes() == np.concatenate([wide, wide[:1]]).tobytes()
    assert list(got["labels"]) == []  # model not registered: class names unknown, y still set
    assert list(got["y"][:2]) == [-1, 1] and got["scores"].shape == (10, 2)


def test_cli_refuses_bad_input_in_one_line(tmp_path: Path, sqlite_url: str) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    r = cli("list", "--db", missing)
    assert r.exit_code == 1 and r.output.startswith("Error: database") and r.output.count("\n") == 1
    r = cli("export", "--db", "mysql://x", "--out", str(tmp_path / "a.npz"))
    assert r.exit_code == 1 and r.output.startswith("Error:") and r.output.count("\n") == 1
    with open_store(sqlite_url):
        pass
    r = cli("list", "--db", sqlite_url, "--since", "yesterday-ish")
    assert r.exit_code == 2 and r.output.startswith("Error: --since") and r.output.count("\n") == 1
    r = cli("export", "--db", sqlite_url, "--out", str(tmp_path / "a.parquet"))
    assert r.exit_code == 2 and "must end in .npz" in r.output and r.output.count("\n") == 1
    r = cli("export", "--db", sqlite_url, "--out", str(tmp_path / "a.npz"))
    assert r.exit_code == 1 and "no captured samples match" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "a.npz").exists()
    r = cli("list", "--db", sqlite_url)
    assert r.exit_code == 0 and r.output.startswith("no captured samples")
    assert json.loads(cli("list", "--db", sqlite_url, "--json").stdout) == {"devices": [], "samples": 0}


def test_only_alerting_and_missing_out_directory(tmp_path: Path, sqlite_url: str) -> None:
    """--only-alerting keeps the devices whose drift state is 'alert' (rows written as the collector
    writes them); an --out in a missing directory is one line, exit 1, with samples to export."""
    from toolchain.fleet.sampleingest import SAMPLE_SQL, SampleRow

    x = np.arange(8, dtype=np.uint8).reshape(2, 4)
    with open_store(sqlite_url) as s, s.transaction():
        for dev, t in (("a-1", 10.0), ("b-1", 20.0)):
            for i, r in enumerate(x):
                s.execute(
                    SAMPLE_SQL,
                    SampleRow("lab", dev, f"{dev}-{i}", STREAM, 1, i, t + i, t, "ee" * 32, "2", 0,
                              np.zeros(2).tobytes(), "uint8", "[4]", r.tobytes()),
                )  # fmt: skip
        s.execute(
            "INSERT INTO drift_state (fleet, device_id, model_sha256, state, candidate, streak, last_window_id,"
            " verdict, updated_at) VALUES ('lab', 'b-1', ?, 'alert', 'alert', 3, 1, 'alert', 0)",
            ("ee" * 32,),
        )
    r = cli("export", "--db", sqlite_url, "--only-alerting", "--out", str(tmp_path / "al.csv"))
    assert r.exit_code == 0, r.output
    with open(tmp_path / "al.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["device"] for row in rows] == ["b-1", "b-1"]
    assert [[int(row[f"x_{j}"]) for j in range(4)] for row in rows] == x.tolist()
    r = cli("export", "--db", sqlite_url, "--out", str(tmp_path / "no" / "a.npz"))
    assert r.exit_code == 1 and "does not exist" in r.output and r.output.count("\n") == 1
    with open_store(sqlite_url) as s, s.transaction():  # a 2-D input: .npz only
        s.execute(
            SAMPLE_SQL,
            SampleRow("lab", "d-1", "d-1-0", STREAM, 1, 0, 30.0, 30.0, "ee" * 32, "2", 0, np.zeros(2).tobytes(),
                      "uint8", "[2, 2]", x[0].tobytes()),
        )  # fmt: skip
    r = cli("export", "--db", sqlite_url, "--device", "d-1", "--out", str(tmp_path / "d.csv"))
    assert (
        r.exit_code == 1 and "CSV holds 1-D (tabular) inputs only" in r.output and r.output.count("\n") == 1
    )
    assert not (tmp_path / "d.csv").exists()
    assert (
        cli("export", "--db", sqlite_url, "--device", "d-1", "--out", str(tmp_path / "d.npz")).exit_code == 0
    )
    assert np.load(tmp_path / "d.npz")["x"].tolist() == [[[0, 1], [2, 3]]]
    r = cli("export", "--db", sqlite_url, "--device", "c-1", "--out", str(tmp_path / "c.npz"))
    assert r.exit_code == 1 and "no captured samples match (device c-1)" in r.output
    assert not (tmp_path / "c.npz").exists()


def test_samples_are_shared_like_stats_when_the_collector_is_in_a_group() -> None:
    from toolchain.fleet.collector import Collector

    shared = Collector("sqlite:///unused.db", "mqtt://127.0.0.1:1", shared_group="g").topics()
    assert "$share/g/edgefleet/+/+/samples" in shared and "edgefleet/+/+/status" in shared
    alone = Collector("sqlite:///unused.db", "mqtt://127.0.0.1:1", fleet="lab").topics()
    assert "edgefleet/lab/+/samples" in alone
