"""``report.json`` and a self-contained ``report.html`` (inline SVG charts, no scripts, no CDN).

The report is plain data written by ``toolchain.build``; this module renders it: the terminal summary
table, the HTML page with a table and three charts (size, accuracy, latency of each target against
its float reference; a fourth, gzip size against the float file, when the build clustered) and per target the float and int8 confusion matrices as heatmap tables, and
``edgefleet report DIR`` re-renders both from ``report.json``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError
from toolchain.steps.per_class import MIN_LOST_SAMPLES

REPORT_SCHEMA = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
INT8_COLOR = "#2b6cb0"
FLOAT_COLOR = "#a0aec0"
FAIL_COLOR = "#c53030"
# Above this many classes the terminal (`edgefleet evaluate`) prints no confusion matrix.
MAX_TEXT_MATRIX_CLASSES = 20
# Above this many classes the HTML shows the per-class table but not the K x K matrices (in report.json).
MAX_MATRIX_CLASSES = 40


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


def format_value(v: Any, kind: str = "") -> str:
    """Return ``v`` as a report cell: "-" for None; ``kind`` pct (a fraction as %), kb (bytes as KB),
    kb_num (the same without the unit), ms, db; other floats to 3 significant digits. Not escaped."""
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * float(v):.2f}%"
    if kind in ("kb", "kb_num"):
        return f"{float(v) / 1024:.1f}" + (" KB" if kind == "kb" else "")
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
    ("arena", "arena_bytes", "kb"),
    ("sparsity", "sparsity", "pct"),
    ("agree", "top1_agreement", "pct"),
    ("SQNR dB", "sqnr_db", "db"),
    ("p50 ms", "latency_ms_p50", "ms"),
    ("float p50", "float_latency_ms_p50", "ms"),
    ("runtime", "preferred_runtime", ""),
    ("build s", "build_s", ""),
)


# The summary of an anomaly build (``task.type`` anomaly; docs/anomaly.md).
ANOMALY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("target", "target", ""),
    ("status", "status", ""),
    ("AUROC", "auroc", ""),
    ("float AUROC", "float_auroc", ""),
    ("threshold", "threshold", ""),
    ("precision", "precision", "pct"),
    ("recall", "recall", "pct"),
    ("size", "size_bytes", "kb"),
    ("p50 ms", "latency_ms_p50", "ms"),
    ("runtime", "preferred_runtime", ""),
    ("build s", "build_s", ""),
)


def summary_columns(report: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """Return the summary table's (header, report key, format) columns for the report's task."""
    return ANOMALY_COLUMNS if (report.get("task") or {}).get("type") == "anomaly" else SUMMARY_COLUMNS


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Return the summary table's rows (one per target) as strings."""
    rows = []
    for name, e in report.get("targets", {}).items():
        row = []
        for _, key, kind in summary_columns(report):
            row.append(name if key == "target" else format_value(e.get(key), kind))
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
    out = [text_table([c[0] for c in summary_columns(report)], summary_rows(report))]
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
        line = worst_class_line(e)
        if line:
            out.append(f"{name}: {line}")
        if e.get("class_drop_budget", "ok") != "ok":
            out.append(f"{name}: {e['class_drop_budget']}")
        for w in e.get("warnings") or []:
            out.append(f"{name}: WARNING: {w}")
        dp = e.get("device_profile")
        if dp:
            out.append(f"{name}: on device {device_profile_line(dp)}")
        for rt, why in (e.get("runtimes_excluded") or {}).items():
            out.append(f"{name}: runtime {rt} left out of the bundle (as the device runs it): {why}")
        line = compression_line(e.get("compression"))
        if line:
            out.append(f"{name}: {line}")
    return "\n".join(out)


def compression_line(c: dict[str, Any] | None) -> str | None:
    """Return ``clustered to 8: gzip 12.3 KB = 0.139x ...`` for a clustered target, or None."""
    if not c or not c.get("clusters"):
        return None
    uw = c.get("unique_weights_per_channel") or {}
    line = (
        f"clustered to {c['clusters']}: gzip {format_value(c.get('gzip_size_bytes'), 'kb')} ="
        f" {c.get('gzip_ratio')}x the float .{c.get('float_format')} file; at most {uw.get('max')} values"
        " per channel in the shipped file"
    )
    if c.get("ota_bytes") is not None:
        line += (
            f"; an update sends {format_value(c['ota_bytes'], 'kb')} uncompressed"
            f" ({format_value(c.get('ota_gzip_bytes'), 'kb')} if gzip-compressed)"
        )
    return line


def worst_class_line(entry: dict[str, Any]) -> str | None:
    """Return ``worst class '1': recall 100.00% -> 40.00% (-60.00 points, ...)`` for one target, or None."""
    cd = entry.get("class_drop")
    if not isinstance(cd, dict) or not isinstance(cd.get("worst"), dict):
        return None
    w = cd["worst"]
    limit = f"limit {float(cd.get('max_points', 0)):g} points"
    if int(w.get("lost_samples") or 0) <= 0:
        return f"no class lost recall from float to int8 ({limit})"
    low = cd.get("low_support") or []
    note = f"; {len(low)} class(es) have under {cd.get('low_support_samples')} eval samples" if low else ""
    return (
        f"worst class {w.get('label')!r}: recall {format_value(w.get('float_recall'), 'pct')} float -> "
        f"{format_value(w.get('recall'), 'pct')} int8 ({w.get('runtime')}), -{float(w['drop_points']):.2f} points"
        f" ({w['lost_samples']} of {w.get('support')} samples; {limit}{note})"
    )


def per_class_rows(per_class: dict[str, Any]) -> list[list[str]]:
    """Return rows ``[class, support, precision, recall, f1]`` (percent) for a ``per_class`` mapping."""
    return [
        [
            label,
            str(m.get("support")),
            format_value(m.get("precision"), "pct"),
            format_value(m.get("recall"), "pct"),
            format_value(m.get("f1"), "pct"),
        ]
        for label, m in per_class.items()
    ]


def confusion_text(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """Return the confusion matrix as an aligned text table (rows true, columns predicted)."""
    return text_table(
        ["true \\ pred", *labels],
        [[label, *map(str, row)] for label, row in zip(labels, matrix, strict=True)],
    )


def device_profile_line(dp: dict[str, Any]) -> str:
    """Return one line about an ``edgefleet profile`` result (``device_profile.json``)."""
    b = dp.get("bench", {})
    acc = b.get("accuracy")
    mib = (b.get("peak_rss_bytes") or 0) / 2**20
    line = (
        f"{dp.get('host', '?')} ({b.get('cpu', {}).get('model') or '?'}, {b.get('runtime')}"
        f" @{b.get('threads')} threads): p50 {format_value(b.get('latency_ms_p50'), 'ms')} ms,"
        f" p95 {format_value(b.get('latency_ms_p95'), 'ms')} ms, peak RSS {mib:.1f} MiB"
    )
    if acc is not None:
        line += f", accuracy {format_value(acc, 'pct')} on {b.get('samples')} samples"
    verdict = dp.get("budget_error")
    return line + (f"; OVER BUDGET: {verdict}" if verdict else "")


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


def _cell_style(count: int, row_total: int, diagonal: bool) -> str:
    """Return the inline style of one heatmap cell: blue for correct, red for confusions, by row share."""
    if count == 0 or row_total == 0:
        return "color:#a0aec0"
    share = count / row_total
    alpha = max(0.12, share)
    rgb = "43,108,176" if diagonal else "197,48,48"
    text = "#fff" if alpha > 0.55 else "#1a202c"
    return f"background:rgba({rgb},{alpha:.2f});color:{text}"


def _matrix_html(
    title: str, matrix: Sequence[Sequence[int]], labels: Sequence[str], other: Sequence[Sequence[int]] | None
) -> str:
    """Return one confusion matrix as a heatmap table; cells that differ from ``other`` are outlined."""
    e = html.escape
    head = "".join(f"<th>{e(str(lb))}</th>" for lb in labels)
    rows = []
    for i, (label, row) in enumerate(zip(labels, matrix, strict=True)):
        total = int(sum(row))
        cells = []
        for j, v in enumerate(row):
            style = _cell_style(int(v), total, i == j)
            changed = other is not None and int(other[i][j]) != int(v)
            if changed:
                style += ";outline:2px solid #1a202c;outline-offset:-2px;font-weight:bold"
            tip = f"true {label}, predicted {labels[j]}: {int(v)} of {total}"
            if changed and other is not None:
                tip += f" (float: {int(other[i][j])})"
            cells.append(f'<td class="c" style="{style}" title="{e(tip)}">{int(v)}</td>')
        rows.append(f"<tr><th>{e(str(label))}</th>{''.join(cells)}<td>{total}</td></tr>")
    return (
        f'<div><div class="cmt">{e(title)}</div><table class="cm"><tr><th>true \\ predicted</th>{head}'
        f"<th>support</th></tr>{''.join(rows)}</table></div>"
    )


def _per_class_html(name: str, t: dict[str, Any], labels: Sequence[str]) -> str:
    """Return one target's per-class section: float and int8 matrices and a per-class table."""
    e = html.escape
    cm, fcm = t.get("confusion_matrix"), t.get("float_confusion_matrix")
    pc, fpc = t.get("per_class") or {}, t.get("float_per_class") or {}
    if not isinstance(cm, list) or not isinstance(fcm, list) or len(cm) != len(labels):
        return ""
    cd = t.get("class_drop") or {}
    failing = set(cd.get("failing") or [])
    rt = t.get("preferred_runtime") or "-"
    out = [f"<h3>{e(name)}</h3>"]
    line = worst_class_line(t)
    if line:
        out.append(f"<p>{e(line)}</p>")
    if len(labels) <= MAX_MATRIX_CLASSES:
        out.append(
            '<div class="cms">'
            + _matrix_html("float reference", fcm, labels, None)
            + _matrix_html(f"int8 ({rt}); outlined: differs from float", cm, labels, fcm)
            + "</div>"
        )
    else:
        out.append(f"<p>{len(labels)} classes: the matrices are in report.json.</p>")
    rows = []
    for label in labels:
        f, q = fpc.get(label, {}), pc.get(label, {})
        fr, qr = f.get("recall"), q.get("recall")
        change = "-" if fr is None or qr is None else f"{100 * (qr - fr):+.2f}"
        cls = ' class="failed"' if label in failing else ""
        rows.append(
            f"<tr{cls}><td>{e(label)}</td><td>{q.get('support', '-')}</td><td>{format_value(fr, 'pct')}</td>"
            f"<td>{format_value(qr, 'pct')}</td><td>{change}</td><td>{format_value(f.get('precision'), 'pct')}</td>"
            f"<td>{format_value(q.get('precision'), 'pct')}</td><td>{format_value(f.get('f1'), 'pct')}</td>"
            f"<td>{format_value(q.get('f1'), 'pct')}</td></tr>"
        )
    out.append(
        "<table><tr><th>class</th><th>support</th><th>float recall</th><th>int8 recall</th>"
        "<th>change (points)</th><th>float precision</th><th>int8 precision</th><th>float F1</th>"
        f"<th>int8 F1</th></tr>{''.join(rows)}</table>"
    )
    return "".join(out)


def _min_lost(targets: dict[str, Any]) -> int:
    for t in targets.values():
        cd = t.get("class_drop")
        if isinstance(cd, dict) and "min_lost_samples" in cd:
            return int(cd["min_lost_samples"])
    return MIN_LOST_SAMPLES


def _device_profiles_html(targets: dict[str, Any]) -> str:
    """Return the "On the device" table of ``edgefleet profile`` results ("" when there are none)."""
    e = html.escape
    rows = ""
    for n, t in targets.items():
        dp = t.get("device_profile")
        if not dp:
            continue
        b = dp.get("bench", {})
        cpu = b.get("cpu", {})
        peak = b.get("peak_rss_bytes")
        budget = dp.get("budget") or {}
        verdict = (
            "not checked"
            if not budget.get("checked")
            else ("OVER: " + str(dp.get("budget_error")) if dp.get("budget_error") else "ok")
        )
        rows += (
            f"<tr><td>{e(n)}</td><td>{e(str(dp.get('host')))}</td><td>{e(str(cpu.get('model')))}"
            f" ({e(' '.join(cpu.get('numeric_flags') or []))})</td>"
            f"<td>{e(str(b.get('runtime')))} {e(str(b.get('runtime_version') or ''))} @{b.get('threads')}</td>"
            f"<td>{format_value(b.get('latency_ms_p50'), 'ms')}</td><td>{format_value(b.get('latency_ms_p95'), 'ms')}</td>"
            f"<td>{'-' if peak is None else f'{peak / 2**20:.1f}'}</td><td>{format_value(b.get('accuracy'), 'pct')}</td>"
            f"<td>{b.get('samples')}</td><td>{e(verdict)}</td><td>{e(str(dp.get('profiled_at')))}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<h2>On the device (edgefleet profile; one sample at a time through the agent)</h2>"
        "<table><tr><th>target</th><th>device</th><th>CPU (numeric flags)</th><th>runtime @threads</th>"
        "<th>p50 ms</th><th>p95 ms</th><th>peak RSS MiB</th><th>accuracy</th><th>samples</th>"
        "<th>budget</th><th>profiled</th></tr>" + rows + "</table>"
    )


def render_html(report: dict[str, Any]) -> str:
    """Return the self-contained HTML report (inline CSS and SVG; no scripts or external resources)."""
    e = html.escape
    targets = report.get("targets", {})
    ok = {n: t for n, t in targets.items() if t.get("status") == "ok"}
    rows = summary_rows(report)
    head = "".join(f"<th>{e(c[0])}</th>" for c in summary_columns(report))
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
            "Model size after gzip -9 (what a compressed transfer carries)",
            "KB",
            [
                (n, t["compression"].get("gzip_size_bytes"), t["compression"].get("float_size_bytes"))
                for n, t in ok.items()
                if t.get("compression")
            ],
            1 / 1024,
        )
        if (report.get("options") or {}).get("cluster")
        else "",
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
        for w in t.get("warnings") or []:
            notes.append(f"<li><b>{e(n)}</b>: warning: {e(str(w))}</li>")
        if t.get("class_drop_budget", "ok") not in ("ok", None):
            notes.append(f"<li><b>{e(n)}</b>: {e(str(t['class_drop_budget']))}</li>")
    labels = [str(lb) for lb in report.get("labels") or []]
    class_sections = "".join(_per_class_html(n, t, labels) for n, t in targets.items())
    if class_sections:
        class_sections = (
            "<h2>Per-class results on the evaluation data</h2><p>Confusion matrices: rows are the true class,"
            " columns the predicted class, in label order. Blue cells are correct answers, red cells"
            " confusions; the shade is the share of the row. A class fails the build when its recall drops"
            f" more than --max-class-drop points from float to int8 (by {_min_lost(targets)}+ samples).</p>"
            + class_sections
        )
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
                f"<tr><td>{e(n)}</td><td>{e(rt)}</td><td>{format_value(acc, 'pct')}</td>"
                f"<td>{format_value(lat.get('threads_1', {}).get('p50_ms'), 'ms')}</td>"
                f"<td>{format_value(lat.get('threads_N', {}).get('p50_ms'), 'ms')} "
                f"({lat.get('threads_N', {}).get('threads', '-')})</td>"
                f"<td>{format_value(lat.get('threads_N', {}).get('p95_ms'), 'ms')}</td>"
                f"<td>{format_value(fl.get('threads_1', {}).get('p50_ms'), 'ms')}</td>"
                f"<td>{format_value(fl.get('threads_N', {}).get('p50_ms'), 'ms')}</td></tr>"
            )
    device_html = _device_profiles_html(targets)
    opts = report.get("options", {})
    data = report.get("data", {})
    prune = report.get("prune")
    prune_html = (
        f"<p>Pruning: requested {format_value(prune.get('requested'), 'pct')}, reached "
        f"{format_value(prune.get('reached_in_keras'), 'pct')}"
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
.cms {{ display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }}
.cmt {{ font-weight: bold; font-size: 13px; margin-top: 0.5em; }}
table.cm {{ margin: 0.3em 0; }}
table.cm td, table.cm th {{ padding: 2px 5px; text-align: center; }}
table.cm td.c {{ min-width: 1.8em; }}
</style></head><body>
<h1>Build report: {e(str(report.get("name")))} version {e(str(report.get("version")))}</h1>
<p>Built {e(str(report.get("created_at")))} from <code>{e(str(report.get("model", {}).get("path")))}</code>
({e(str(report.get("model", {}).get("kind")))}); quantization {e(str(opts.get("quantize")))};
calibration on {data.get("calibration_samples")} samples of <code>{e(str(data.get("path")))}</code>;
evaluated on {data.get("eval", {}).get("samples")} samples ({e(str(data.get("eval", {}).get("source")))});
float accuracy {format_value(report.get("float", {}).get("accuracy"), "pct")};
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
{class_sections}
{device_html}
</body></html>
"""
