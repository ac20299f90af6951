"""``DIR/report.html`` of a tuning run: Pareto plots (inline SVG, no internet) and the trial table.

Two scatter plots, accuracy against model size and against p95 latency: candidates within budget in
blue, over budget in red, the Pareto front joined by a line, the best candidate ringed. The table lists
every trial with its settings, figures and, for the ones that did not count, the reason.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from toolchain.report import FAIL_COLOR, INT8_COLOR
from toolchain.report import format_value as fmt

BEST_COLOR = "#2f855a"


def _scatter(title: str, xkey: str, xunit: str, xscale: float, doc: dict[str, Any]) -> str:
    """Return an SVG scatter of accuracy (y, %) against ``xkey`` (x, scaled by ``xscale``)."""
    w, h, left, bottom, top, right = 560, 340, 60, 40, 30, 20
    pts = [
        c
        for c in doc["candidates"]
        if c.get("accuracy") is not None and c.get(xkey) is not None and c["status"] != "failed"
    ]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    if not pts:
        parts.append(f'<text x="{left}" y="{h // 2}" font-size="12">no measured candidate</text></svg>')
        return "\n".join(parts)
    xs = [float(c[xkey]) * xscale for c in pts]
    ys = [100 * float(c["accuracy"]) for c in pts]
    x0, x1 = 0.0, max(xs) * 1.08 or 1.0
    y0, y1 = max(0.0, min(ys) - 5), min(100.0, max(ys) + 2)
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float) -> float:
        return left + (w - left - right) * (x - x0) / (x1 - x0)

    def py(y: float) -> float:
        return h - bottom - (h - bottom - top) * (y - y0) / (y1 - y0)

    parts.append(
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#4a5568"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#4a5568"/>'
    )
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{px(xv):.1f}" y="{h - bottom + 14}" font-size="10" text-anchor="middle">{xv:.3g}</text>'
            f'<text x="{left - 4}" y="{py(yv) + 3:.1f}" font-size="10" text-anchor="end">{yv:.1f}</text>'
        )
    parts.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 6}" font-size="11" text-anchor="middle">'
        f"{html.escape(xunit)}</text>"
        f'<text x="12" y="{(top + h - bottom) / 2}" font-size="11" transform="rotate(-90 12 '
        f'{(top + h - bottom) / 2})" text-anchor="middle">accuracy % (selection part)</text>'
    )
    front = sorted(
        (c for c in pts if c["trial"] in set(doc.get("pareto_front", []))), key=lambda c: float(c[xkey])
    )
    if len(front) > 1:
        line = " ".join(
            f"{px(float(c[xkey]) * xscale):.1f},{py(100 * float(c['accuracy'])):.1f}" for c in front
        )
        parts.append(f'<polyline points="{line}" fill="none" stroke="{INT8_COLOR}" stroke-dasharray="4 3"/>')
    best = (doc.get("best") or {}).get("trial")
    for c, x, y in zip(pts, xs, ys, strict=True):
        color = INT8_COLOR if c["within_budget"] else FAIL_COLOR
        tip = html.escape(
            f"trial {c['trial']}: {c['settings'].get('arch')} {y:.2f}% {x:.4g} {xunit}"
            + ("" if c["within_budget"] else f" - {c.get('reason')}")
        )
        parts.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"><title>{tip}</title></circle>'
        )
        if c["trial"] == best:
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="8" fill="none" stroke="{BEST_COLOR}" '
                'stroke-width="2"/>'
            )
    parts.append("</svg>")
    return "\n".join(parts)


def settings_text(s: dict[str, Any]) -> str:
    """Return a candidate's settings in one short line."""
    opts = " ".join(f"{k}={v}" for k, v in (s.get("arch_options") or {}).items())
    prune = f" prune={s['sparsity']}" if s.get("sparsity") else ""
    lr = s.get("learning_rate")
    lr_text = f"{float(lr):.2g}" if lr is not None else "-"
    return f"{s.get('arch')} {opts} lr={lr_text} epochs={s.get('epochs')}{prune} {s.get('quantize')}"


def render_html(doc: dict[str, Any]) -> str:
    """Return report.html for a pareto.json document."""
    e = html.escape
    best = doc.get("best")
    rows = []
    for c in doc["candidates"]:
        cls = "" if c["within_budget"] else ' class="failed"'
        mark = " &#9733;" if best and c["trial"] == best["trial"] else ""
        front = "yes" if c["trial"] in doc.get("pareto_front", []) else ""
        rows.append(
            f"<tr{cls}><td>{c['trial']}{mark}</td><td>{e(c['status'])}</td>"
            f"<td>{e(settings_text(c['settings']))}</td><td>{fmt(c['accuracy'], 'pct')}</td>"
            f"<td>{fmt(c['size_bytes'], 'kb_num')}</td><td>{fmt(c['arena_bytes'], 'kb_num')}</td>"
            f"<td>{fmt(c['latency_ms'], 'ms')}</td><td>{front}</td><td>{e(fmt(c.get('reason')))}</td></tr>"
        )
    if best:
        best_html = (
            f"<p><b>Best within budget: trial {best['trial']}</b> ({e(settings_text(best['settings']))}):"
            f" held-out accuracy <b>{fmt(best['holdout_accuracy'], 'pct')}</b> on"
            f" {doc['holdout']['samples']} samples no trial saw (selection accuracy"
            f" {fmt(best['selection_accuracy'], 'pct')}, which picked it and is biased upwards);"
            f" {fmt(best['size_bytes'], 'kb_num')} KB, arena {fmt(best['arena_bytes'], 'kb_num')} KB,"
            f" p95 {fmt(best['latency_ms'], 'ms')} ms; bundle <code>{e(fmt(best.get('bundle')))}</code>"
            f"{(' - ' + e(best['note'])) if best.get('note') else ''}.</p>"
        )
    else:
        best_html = f'<p style="color:{FAIL_COLOR}"><b>No candidate met every budget.</b></p>'
    t = doc["trials"]
    budget = ", ".join(f"{k} = {v}" for k, v in doc["budget"].items()) or "none"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>edgefleet tune report: {e(doc["target"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1a202c; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #cbd5e0; padding: 4px 8px; text-align: right; }}
th {{ background: #edf2f7; }} td:nth-child(3), td:last-child {{ text-align: left; }}
tr.failed td {{ color: {FAIL_COLOR}; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1em; }}
</style></head><body>
<h1>Tuning report: target {e(doc["target"])}</h1>
<p>{t["total"]} trials ({t["requested"]} requested): {t["within_budget"]} within budget,
{t["over_budget"]} over budget, {t["failed"]} failed, {t["interrupted"]} interrupted. Budget (the target's
<code>[budget]</code> and the command line, the tighter per key): {e(budget)}; every build also checks the
target's <code>[limits]</code> (model size, accuracy drop from float) and the per-class recall gate.</p>
<p>Honest selection: <code>--eval-data</code> was split (stratified, seed {doc["selection"]["seed"]}) into a
selection part ({doc["selection"]["samples"]} samples) that ranks the candidates and a held-out part
({doc["holdout"]["samples"]} samples) that only measures the winner.</p>
{best_html}
<div class="charts">
{_scatter("Accuracy vs model size", "size_bytes", "model size (KB)", 1 / 1024, doc)}
{_scatter("Accuracy vs latency", "latency_ms", "p95 latency (ms, batch 1)", 1.0, doc)}
</div>
<p>Blue: within budget; red: over budget; dashed line: Pareto front; ringed: the best.</p>
<table><tr><th>trial</th><th>status</th><th>settings</th><th>accuracy</th><th>size KB</th><th>arena KB</th>
<th>p95 ms</th><th>Pareto</th><th>reason</th></tr>
{"".join(rows)}</table>
</body></html>
"""


def write_html(out_dir: Path, doc: dict[str, Any]) -> Path:
    """Write ``DIR/report.html``; return its path."""
    path = out_dir / "report.html"
    tmp = out_dir / ".report.html.tmp"
    tmp.write_text(render_html(doc), encoding="utf-8")
    tmp.replace(path)
    return path
