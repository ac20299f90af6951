"""report.json / report.html rendering: self-contained HTML with inline SVG charts, terminal table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from toolchain.report import (
    ReportError,
    load_report,
    merge_previous,
    render_html,
    summary_table,
    write_report,
)


def _entry(acc: float, size: int, p50: float, **kw: object) -> dict:
    d = {
        "status": "ok",
        "error": None,
        "accuracy": acc,
        "float_accuracy": 0.95,
        "size_bytes": size,
        "float_size_bytes": 4 * size,
        "sparsity": 0.01,
        "top1_agreement": 0.99,
        "sqnr_db": 30.0,
        "latency_ms_p50": p50,
        "float_latency_ms_p50": 2 * p50,
        "preferred_runtime": "litert",
        "build_s": 1.5,
        "latency": {
            "litert": {
                "threads_1": {"p50_ms": p50, "p95_ms": p50},
                "threads_N": {"p50_ms": p50, "p95_ms": p50, "threads": 4},
            }
        },
    }
    d.update(kw)
    return d


def _report() -> dict:
    return {
        "schema": 1,
        "name": "demo",
        "version": 3,
        "created_at": "2026-11-27T12:00:00Z",
        "model": {"path": "m.keras", "kind": "tf_keras"},
        "data": {"path": "d.npz", "calibration_samples": 100, "eval": {"source": "t.npz", "samples": 50}},
        "options": {"quantize": "ptq"},
        "float": {"accuracy": 0.95},
        "targets": {
            "mobile": _entry(0.947, 20_480, 0.01),
            "coral": _entry(
                0.94,
                20_000,
                0.02,
                edgetpu={
                    "ops_total": 5,
                    "ops_mapped": 4,
                    "unmapped": [
                        {
                            "index": 4,
                            "op": "EXP",
                            "version": 1,
                            "reason": "Operation not supported",
                            "detail": "<x>",
                        }
                    ],
                    "message": "compiler not found",
                },
            ),
            "x86": {
                "status": "failed",
                "error": "accuracy 0.5 is 45 points below float",
                "float_accuracy": 0.95,
            },
        },
    }


def test_html_is_self_contained_with_three_charts() -> None:
    page = render_html(_report())
    assert page.count("<svg") == 3
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page
    assert "20.0 KB" in page and "94.70%" in page  # table values
    assert "EXP" in page and "&lt;x&gt;" in page  # Edge TPU table, escaped
    assert "45 points below float" in page
    # Bars scale with values: mobile's size bar is the widest int8 size bar... and float bars are 4x.
    widths = [
        float(w)
        for w in re.findall(r'<rect x="110" y="\d+" width="([\d.]+)" height="12" fill="#2b6cb0"', page)
    ]
    assert widths and max(widths) < 380


def test_summary_table_lists_targets_and_failures() -> None:
    text = summary_table(_report())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["target", "status", "accuracy"]
    assert any(ln.startswith("mobile") and "94.70%" in ln and "20.0 KB" in ln for ln in lines)
    assert "x86: FAILED: accuracy 0.5 is 45 points below float" in text
    assert "coral: Edge TPU: 4/5 ops mappable" in text


def test_write_and_load_roundtrip(tmp_path: Path) -> None:
    pj, ph = write_report(tmp_path, _report())
    assert json.loads(pj.read_text())["version"] == 3 and ph.read_text().startswith("<!DOCTYPE html>")
    assert load_report(tmp_path)["name"] == "demo"
    assert load_report(pj)["name"] == "demo"


def test_load_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not a readable report"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"schema": 99, "targets": {}}')
    with pytest.raises(ReportError, match="not an edgefleet build report"):
        load_report(tmp_path)


def test_merge_keeps_earlier_targets_whose_bundles_remain(tmp_path: Path) -> None:
    old = _report()
    write_report(tmp_path, old)
    (tmp_path / "coral").mkdir()
    (tmp_path / "coral" / "manifest.json").write_text("{}")
    new = dict(_report(), targets={"mobile": _entry(0.9, 1, 0.1)})
    merged = merge_previous(tmp_path, new)
    assert set(merged["targets"]) == {
        "coral",
        "mobile",
    }  # mobile rebuilt, coral kept, x86 (failed, no bundle) dropped
    assert merged["targets"]["mobile"]["accuracy"] == 0.9
    assert merged["targets"]["coral"]["from_earlier_build"] == "2026-11-27T12:00:00Z"
    other = dict(new, name="other")
    assert set(merge_previous(tmp_path, other)["targets"]) == {"mobile"}


@pytest.mark.slow
@pytest.mark.browser
def test_real_report_renders_in_chromium(digits_bundles: Path, chromium: str, tmp_path: Path) -> None:
    from tests.conftest import render_page

    page = tmp_path / "report.html"
    page.write_text((digits_bundles / "report.html").read_text())  # a copy with no neighbours: self-contained
    png = tmp_path / "report.png"
    dom = render_page(chromium, page, png)
    assert png.stat().st_size > 10_000
    assert dom.count("<svg") == 3 and "digits_cnn" in dom
    for target in ("coral", "mobile", "raspberry-pi", "x86"):
        assert f"<td>{target}</td>" in dom
