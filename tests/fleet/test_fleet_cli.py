"""`edgefleet fleet ...` commands, the Python API, and the report page in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tests.conftest import render_page
from toolchain.cli import main
from toolchain.fleet.ingest import Incoming, Ingestor
from toolchain.fleet.registry import BaselineCache, register_bundle
from toolchain.fleet.sim import stats_payload, status_payload
from toolchain.fleet.storage import open_store


@pytest.fixture
def filled_db(sqlite_url, bundle, model_ref, make_window) -> str:
    """A database with three devices: two in distribution, one seeing low-contrast digits."""
    register_bundle(sqlite_url, bundle[0])
    with open_store(sqlite_url) as s:
        ing = Ingestor(s, BaselineCache(s))
        msgs = []
        t0 = time.time() - 3000
        for d, dev in enumerate(["cam-1", "cam-2", "cam-3"]):
            msgs.append(
                status_payload(dev, model_ref, deployment={"state": "active", "version": 1} if d else None)
            )
            for seq in range(8):
                shift = (lambda x: x * 0.5) if dev == "cam-3" and seq >= 4 else None
                msgs.append(
                    stats_payload(
                        dev, seq, model_ref, make_window(150, seed=10 * d + seq, transform=shift), t0=t0
                    )
                )
        ing.process([Incoming(t, p, i, 1, 0, time.time()) for i, (t, p) in enumerate(msgs)])
        ing.process([Incoming("edgefleet/lab/cam-1/stats", b"{broken", 99, 1, 0, time.time())])
    return sqlite_url


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_status_json_and_table(filled_db) -> None:
    code, out, _ = run("fleet", "status", "--db", filled_db, "--json")
    assert code == 0
    doc = json.loads(out)
    assert [d["device_id"] for d in doc["devices"]] == ["cam-1", "cam-2", "cam-3"]
    assert all(d["windows"] == 8 and d["state"] == "online" for d in doc["devices"])
    assert doc["quarantined"] == 1
    code, out, _ = run("fleet", "status", "--db", filled_db)
    assert code == 0 and "deployment" in out.splitlines()[0] and "active" in out
    assert "1 message(s) quarantined" in out


def test_drift_table_worst_first_and_feature_view(filled_db) -> None:
    code, out, _ = run("fleet", "drift", "--db", filled_db, "--json", "--since", "all")
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["state"] == "alert" and rows[0]["device_id"] in ("cam-3", "*")
    by_dev = {r["device_id"]: r for r in rows if r["scope"] == "device"}
    assert by_dev["cam-3"]["state"] == "alert" and by_dev["cam-1"]["state"] == "ok"
    assert len(by_dev["cam-1"]["features"]) == 64
    code, out, _ = run(
        "fleet", "drift", "--db", filled_db, "--device", "cam-3", "--feature", "px_3_3_0", "--since", "2h"
    )
    assert code == 0 and "px_3_3_0" in out and "cam-3" in out and "cam-1" not in out
    code, _, err = run("fleet", "drift", "--db", filled_db, "--feature", "px_9_9_0")
    assert code == 1 and "unknown feature 'px_9_9_0'" in err
    code, _, err = run("fleet", "drift", "--db", filled_db, "--since", "yesterday")
    assert code == 1 and "30m, 2h, 7d" in err


def test_bad_flags_and_config_exit_codes(sqlite_url, tmp_path) -> None:
    assert run("fleet", "collect", "--db", sqlite_url)[0] == 2  # --broker missing
    code, _, err = run("fleet", "collect", "--broker", "http://nope", "--db", sqlite_url)
    assert code == 78 and "mqtt://HOST:PORT" in err
    code, _, err = run("fleet", "collect", "--broker", "mqtt://127.0.0.1:1", "--db", "mysql://x")
    assert code == 78 and "sqlite:///PATH" in err
    code, _, err = run("fleet", "register", str(tmp_path / "missing"), "--db", sqlite_url)
    assert code == 1 and "not a directory" in err
    code, _, err = run("fleet", "status", "--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 1 and "does not exist yet" in err


def test_register_with_settings(sqlite_url, bundle) -> None:
    code, out, _ = run(
        "fleet", "register", str(bundle[0]), "--db", sqlite_url, "--set", "psi_alert=0.3", "--json"
    )
    assert code == 0 and json.loads(out)["config"]["psi_alert"] == 0.3
    code, _, err = run("fleet", "register", str(bundle[0]), "--db", sqlite_url, "--set", "psi_alrt=0.3")
    assert code == 1 and "unknown drift setting" in err


@pytest.mark.timeout(120)
def test_fleet_commands_do_not_import_tensorflow(cli_env) -> None:
    code = (
        "import sys; from click.testing import CliRunner; from toolchain.cli import main;"
        "r = CliRunner().invoke(main, ['fleet', '--help']); assert r.exit_code == 0, r.output;"
        "import toolchain.fleet.collector, toolchain.fleet.report, toolchain.fleet.queries, toolchain.fleet.status;"
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_python_api(filled_db, tmp_path) -> None:
    import toolchain.fleet as fleet

    rows = fleet.drift_table(filled_db, device="cam-3", since="all")
    assert [r["device_id"] for r in rows] == ["cam-3"] and rows[0]["state"] == "alert"
    assert fleet.write_report(filled_db, tmp_path / "r.html").exists()


def test_report_timeline_is_in_time_order_escaped_and_absent_by_default(filled_db, tmp_path) -> None:
    from toolchain.fleet.report import write_report

    plain = write_report(filled_db, tmp_path / "plain.html").read_text()
    assert 'id="timeline"' not in plain
    steps = [(2000.0, "deploy", "v2 to <cam-3>"), (1000.0, "alert", "cam-3 & co"), (3000.0, "gate", "passed")]
    page = write_report(filled_db, tmp_path / "t.html", timeline=steps).read_text()
    table = page[page.index('id="timeline"') :]
    assert table.index("<td>alert</td>") < table.index("<td>deploy</td>") < table.index("<td>gate</td>")
    assert "v2 to &lt;cam-3&gt;" in table and "cam-3 &amp; co" in table and "<cam-3>" not in table
    assert "1970-01-01T00:16:40" in table  # times in UTC ISO, like the other tables


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_report_renders_in_headless_chromium(filled_db, chromium, tmp_path) -> None:
    from toolchain.fleet.report import write_report

    page = write_report(filled_db, tmp_path / "report.html")
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    dom = render_page(chromium, page, tmp_path / "report.png")
    assert dom.count("<svg") >= 4  # map, two time series, histograms
    import re

    tiles = dict(re.findall(r'data-device="([^"]+)" data-state="([^"]+)"', dom))
    assert tiles == {"cam-1": "ok", "cam-2": "ok", "cam-3": "alert"}
    assert "polyline" in dom  # drift over time was plotted
    assert 'class="hist"' in dom and "cam-3" in dom
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_status_of_a_large_fleet_is_a_summary_and_the_devices_that_need_a_look(
    filled_db, monkeypatch
) -> None:
    import toolchain.cli.fleet.views as fleet_cli

    monkeypatch.setattr(fleet_cli, "STATUS_TABLE_MAX", 2)
    with open_store(filled_db) as s:  # cam-3 drifts: its evaluation says so
        s.execute(
            "INSERT INTO drift_state (fleet, device_id, model_sha256, state, candidate, streak, last_window_id,"
            " verdict, updated_at) VALUES ('lab', 'cam-3', 'x', 'alert', 'alert', 2, 1, 'alert', 0)"
        )
    code, out, _ = run("fleet", "status", "--db", filled_db)
    assert code == 0
    assert out.startswith("3 devices: 3 online, 0 stale, 0 offline or unknown; drift: 1 alert;")
    table = out.split("need a look")[1]
    assert "cam-3" in table and "cam-1" not in table and "cam-2" not in table
    code, out, _ = run("fleet", "status", "--db", filled_db, "--all")
    assert code == 0 and all(d in out for d in ("cam-1", "cam-2", "cam-3")) and "need a look" not in out
