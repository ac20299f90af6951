"""``report.json`` and a self-contained ``report.html`` (inline SVG charts, no scripts, no CDN).

The report is plain data written by ``toolchain.build``; this module renders it: the terminal summary
table, the HTML page with a table and three charts (size, accuracy, latency of each target against
its float reference), and ``edgefleet report DIR`` re-renders both from ``report.json``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError

REPORT_SCHEMA = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
INT8_COLOR = "#2b6cb0"
FLOAT_COLOR = "#a0aec0"
FAIL_COLOR = "#c53030"


class ReportError(ToolchainError):
    """A report folder or file cannot be read."""


def load_report(out_dir: str | Path) -> dict[str, Any]:
    """Read ``DIR/report.json`` (or a path to the file itself)."""
    p = Path(out_dir)
    f = p if p.is_file() else p / REPORT_JSON
    if not f.is_file():
        raise ReportError(f"no {REPORT_JSON} in {str(p)!r}; pass the --out folder of 'edgefleet build'")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(
            f"{str(f)!r} is not a readable report ({str(e)[:80]}); rebuild with 'edgefleet build'"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("schema") != REPORT_SCHEMA
        or not isinstance(doc.get("targets"), dict)
    ):
        raise ReportError(f"{str(f)!r} is not an edgefleet build report (schema {REPORT_SCHEMA}); rebuild it")
    return doc


def merge_previous(out_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Keep earlier entries in ``out_dir`` for other targets of the same model whose bundles remain.

    Building ``--target mobile`` and later ``--target x86`` into one folder gives one report of both.
    """
    try:
        old = load_report(out_dir)
    except ReportError:
        return report
    if old.get("name") != report.get("name"):
        return report
    merged = dict(report)
    targets = dict(report["targets"])
    for name, entry in old.get("targets", {}).items():
        if name in targets or entry.get("status") != "ok":
            continue
        if (Path(out_dir) / name / "manifest.json").is_file():
            targets[name] = dict(entry, from_earlier_build=old.get("created_at"))
    merged["targets"] = dict(sorted(targets.items()))
    return merged


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` atomically; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pj, ph = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    for path, text in ((pj, json.dumps(report, indent=2, allow_nan=False) + "\n"), (ph, render_html(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return pj, ph


# --------------------------------------------------------------------------------------------------
# Terminal


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * float(v):.2f}%"
    if kind == "kb":
        return f"{float(v) / 1024:.1f} KB"
    if kind == "ms":
        return f"{float(v):.3f}"
    if kind == "db":
        return f"{float(v):.1f}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("target", "target", ""),
    ("status", "status", ""),
    ("accuracy", "accuracy", "pct"),
    ("float", "float_accuracy", "pct"),
    ("size", "size_bytes", "kb"),
    ("float size", "float_size_bytes", "kb"),
    ("sparsity", "sparsity", "pct"),
    ("agree", "top1_agreement", "pct"),
    ("SQNR dB", "sqnr_db", "db"),
    ("p50 ms", "latency_ms_p50", "ms"),
    ("float p50", "float_latency_ms_p50", "ms"),
    ("runtime", "preferred_runtime", ""),
    ("build s", "build_s", ""),
)


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Return the summary table's rows (one per target) as strings."""
    rows = []
    for name, e in report.get("targets", {}).items():
        row = []
        for _, key, kind in SUMMARY_COLUMNS:
            row.append(name if key == "target" else _fmt(e.get(key), kind))
        rows.append(row)
    return rows


def text_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """Return an aligned plain-text table; ``None`` cells show as ``-``."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """Return the terminal summary: one row per target, then failures and Edge TPU notes."""
    out = [text_table([c[0] for c in SUMMARY_COLUMNS], summary_rows(report))]
    for name, e in report.get("targets", {}).items():
        if e.get("status") != "ok" and e.get("error"):
            out.append(f"{name}: FAILED: {e['error']}")
        et = e.get("edgetpu")
        if et:
            out.append(
                f"{name}: Edge TPU: {et.get('ops_mapped')}/{et.get('ops_total')} ops mappable; "
                f"{et.get('message')}"
            )
        if e.get("accuracy_budget", "ok") != "ok":
            out.append(f"{name}: {e['accuracy_budget']}")
        for rt, why in (e.get("runtimes_excluded") or {}).items():
            out.append(f"{name}: runtime {rt} left out of the bundle (as the device runs it): {why}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# HTML


def _bar_chart(
    title: str, unit: str, rows: list[tuple[str, float | None, float | None]], scale: float = 1.0
) -> str:
    """Return an inline SVG grouped horizontal bar chart: per row an int8 bar and a float bar."""
    bar_h, gap, label_w, plot_w, pad = 14, 10, 110, 380, 8
    height = pad * 2 + 24 + len(rows) * (2 * bar_h + gap) + 20
    width = label_w + plot_w + 90
    vals = [v * scale for _, a, b in rows for v in (a, b) if v is not None]
    vmax = max(vals) if vals else 1.0
    vmax = vmax or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{pad}" y="{pad + 12}" font-size="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    y = pad + 26
    for label, a, b in rows:
        parts.append(f'<text x="{pad}" y="{y + bar_h + 4}" font-size="12">{html.escape(label)}</text>')
        for v, color, kind in ((a, INT8_COLOR, "int8"), (b, FLOAT_COLOR, "float")):
            if v is None:
                parts.append(
                    f'<text x="{label_w}" y="{y + bar_h - 3}" font-size="11" fill="{FAIL_COLOR}">{kind}: '
                    "n/a</text>"
                )
            else:
                w = max(1.0, plot_w * (v * scale) / vmax)
                parts.append(
                    f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}">'
                    f"<title>{html.escape(label)} {kind}: {v * scale:.4g} {unit}</title></rect>"
                )
                parts.append(
                    f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}" font-size="11">{v * scale:.4g} '
                    f"{unit}</text>"
                )
            y += bar_h
        y += gap
    ly = height - 10
    parts.append(f'<rect x="{label_w}" y="{ly - 9}" width="10" height="10" fill="{INT8_COLOR}"/>')
    parts.append(f'<text x="{label_w + 14}" y="{ly}" font-size="11">int8 bundle</text>')
    parts.append(f'<rect x="{label_w + 100}" y="{ly - 9}" width="10" height="10" fill="{FLOAT_COLOR}"/>')
    parts.append(f'<text x="{label_w + 114}" y="{ly}" font-size="11">float reference</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """Return the self-contained HTML report (inline CSS and SVG; no scripts or external resources)."""
    e = html.escape
    targets = report.get("targets", {})
    ok = {n: t for n, t in targets.items() if t.get("status") == "ok"}
    rows = summary_rows(report)
    head = "".join(f"<th>{e(c[0])}</th>" for c in SUMMARY_COLUMNS)
    body = "".join(
        "<tr"
        + (' class="failed"' if targets[r[0]].get("status") != "ok" else "")
        + ">"
        + "".join(f"<td>{e(c)}</td>" for c in r)
        + "</tr>"
        for r in rows
    )
    charts = [
        _bar_chart(
            "Model size",
            "KB",
            [(n, t.get("size_bytes"), t.get("float_size_bytes")) for n, t in ok.items()],
            1 / 1024,
        ),
        _bar_chart(
            "Accuracy", "%", [(n, t.get("accuracy"), t.get("float_accuracy")) for n, t in ok.items()], 100.0
        ),
        _bar_chart(
            "Latency p50 (preferred runtime, target threads)",
            "ms",
            [(n, t.get("latency_ms_p50"), t.get("float_latency_ms_p50")) for n, t in ok.items()],
        ),
    ]
    notes = []
    for n, t in targets.items():
        if t.get("error"):
            notes.append(f"<li><b>{e(n)}</b> failed: {e(str(t['error']))}</li>")
        if t.get("accuracy_budget", "ok") not in ("ok", None):
            notes.append(f"<li><b>{e(n)}</b>: {e(str(t['accuracy_budget']))}</li>")
    edgetpu_html = ""
    for n, t in targets.items():
        et = t.get("edgetpu")
        if not et:
            continue
        un = "".join(
            f"<tr><td>{u.get('index')}</td><td>{e(str(u.get('op')))}</td><td>{u.get('version')}</td>"
            f"<td>{e(str(u.get('reason')))}</td><td>{e(str(u.get('detail', '')))}</td></tr>"
            for u in et.get("unmapped", [])
        )
        edgetpu_html += (
            f"<h2>Edge TPU ({e(n)})</h2><p>{et.get('ops_mapped')} of {et.get('ops_total')} ops map to the "
            "Edge TPU."
            f" {e(str(et.get('message', '')))}</p>"
        )
        if un:
            edgetpu_html += (
                "<table><tr><th>#</th><th>op</th><th>version</th><th>reason</th><th>detail</th></tr>"
                + un
                + "</table>"
            )
    rt_rows = ""
    for n, t in ok.items():
        for rt, lat in (t.get("latency") or {}).items():
            fl = (t.get("float_latency") or {}).get(rt, {})
            acc = (t.get("per_runtime") or {}).get(rt, {}).get("accuracy")
            rt_rows += (
                f"<tr><td>{e(n)}</td><td>{e(rt)}</td><td>{_fmt(acc, 'pct')}</td>"
                f"<td>{_fmt(lat.get('threads_1', {}).get('p50_ms'), 'ms')}</td>"
                f"<td>{_fmt(lat.get('threads_N', {}).get('p50_ms'), 'ms')} "
                f"({lat.get('threads_N', {}).get('threads', '-')})</td>"
                f"<td>{_fmt(lat.get('threads_N', {}).get('p95_ms'), 'ms')}</td>"
                f"<td>{_fmt(fl.get('threads_1', {}).get('p50_ms'), 'ms')}</td>"
                f"<td>{_fmt(fl.get('threads_N', {}).get('p50_ms'), 'ms')}</td></tr>"
            )
    opts = report.get("options", {})
    data = report.get("data", {})
    prune = report.get("prune")
    prune_html = (
        f"<p>Pruning: requested {_fmt(prune.get('requested'), 'pct')}, reached "
        f"{_fmt(prune.get('reached_in_keras'), 'pct')}"
        " in the Keras kernels (the table shows the sparsity of each shipped artifact).</p>"
        if prune
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>edgefleet build report: {e(str(report.get("name")))} v{e(str(report.get("version")))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1a202c; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #cbd5e0; padding: 4px 8px; text-align: right; }}
th {{ background: #edf2f7; }} td:first-child, th:first-child {{ text-align: left; }}
tr.failed td {{ color: {FAIL_COLOR}; }}
.charts svg {{ display: block; margin: 1em 0; }}
</style></head><body>
<h1>Build report: {e(str(report.get("name")))} version {e(str(report.get("version")))}</h1>
<p>Built {e(str(report.get("created_at")))} from <code>{e(str(report.get("model", {}).get("path")))}</code>
({e(str(report.get("model", {}).get("kind")))}); quantization {e(str(opts.get("quantize")))};
calibration on {data.get("calibration_samples")} samples of <code>{e(str(data.get("path")))}</code>;
evaluated on {data.get("eval", {}).get("samples")} samples ({e(str(data.get("eval", {}).get("source")))});
float accuracy {_fmt(report.get("float", {}).get("accuracy"), "pct")};
total build {report.get("build_s", "-")} s.</p>
{prune_html}
<table><tr>{head}</tr>{body}</table>
{("<ul>" + "".join(notes) + "</ul>") if notes else ""}
<div class="charts">
{"".join(charts)}
</div>
<h2>Latency per runtime on the build host (ms, batch 1)</h2>
<table><tr><th>target</th><th>runtime</th><th>accuracy</th><th>p50 1 thread</th><th>p50 (threads)</th>
<th>p95</th>
<th>float p50 1 thread</th><th>float p50</th></tr>{rt_rows}</table>
{edgetpu_html}
</body></html>
"""
