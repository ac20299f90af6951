"""``edgefleet fleet report``: one self-contained HTML page with inline SVG plots (no scripts, no CDN).

Sections: a summary, the fleet map (one tile per device coloured by its drift state), drift over time
(max PSI per device and PSI of the worst features per time bucket), baseline vs current histograms of
the worst features, the drift table, recent alerts and the quarantine count.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

from device_agent.formats.telemetry import utc_iso
from toolchain.fleet.queries import drift_series, drift_table, merge_groups
from toolchain.fleet.registry import load_baseline
from toolchain.fleet.rollouts import gate_events
from toolchain.fleet.status import quarantine_summary, recent_alerts, status_rows
from toolchain.fleet.storage import Store, open_store

COLOURS = {
    "ok": "#2e7d32",
    "warn": "#f9a825",
    "alert": "#c62828",
    "insufficient": "#9e9e9e",
    "unknown": "#bdbdbd",
}
SERIES = [
    "#1565c0",
    "#c62828",
    "#2e7d32",
    "#6a1b9a",
    "#ef6c00",
    "#00838f",
    "#ad1457",
    "#4e342e",
    "#283593",
    "#9e9d24",
]
MAX_SERIES = 10
HIST_FEATURES = 6


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def svg_lines(
    series: dict[str, list[float | None]],
    x_labels: list[str],
    title: str,
    y_label: str,
    thresholds: tuple[float, ...] = (),
    width: int = 720,
    height: int = 260,
) -> str:
    """Return an SVG line chart; ``None`` values break a line."""
    pad_l, pad_r, pad_t, pad_b = 56, 170, 28, 40
    vals = [v for s in series.values() for v in s if v is not None] + list(thresholds)
    ymax = max(vals) * 1.1 if vals else 1.0
    ymax = ymax if ymax > 0 else 1.0
    n = max((len(s) for s in series.values()), default=0)
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad_l + (pw * i / (n - 1) if n > 1 else pw / 2)
        return x, pad_t + ph * (1 - v / ymax)

    out = [
        f'<svg class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{pad_l}" y="18" class="t">{_e(title)}</text>',
        f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" stroke="#444"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + ph}" stroke="#444"/>',
        f'<text x="12" y="{pad_t + ph / 2}" class="a" transform="rotate(-90 12 {pad_t + ph / 2})">'
        f"{_e(y_label)}</text>",
    ]
    for k in range(5):
        v = ymax * k / 4
        _, y = xy(0, v)
        out.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" class="a" text-anchor="end">{v:.2f}</text>')
    for th in thresholds:
        _, y = xy(0, th)
        out.append(
            f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + pw}" y2="{y:.1f}" stroke="#c62828" '
            f'stroke-dasharray="4 3"/><text x="{pad_l + pw - 4}" y="{y - 3:.1f}" class="a" '
            f'text-anchor="end">{th:g}</text>'
        )
    if x_labels and n:
        for i in sorted({0, n - 1, (n - 1) // 2}):
            x, _ = xy(i, 0)
            lbl = x_labels[min(i, len(x_labels) - 1)]
            out.append(
                f'<text x="{x:.1f}" y="{pad_t + ph + 16}" class="a" text-anchor="middle">{_e(lbl)}</text>'
            )
    for s_i, (name, vs) in enumerate(list(series.items())[:MAX_SERIES]):
        colour = SERIES[s_i % len(SERIES)]
        seg: list[str] = []
        segs: list[list[str]] = []
        for i, val in enumerate(vs):
            if val is None:
                if seg:
                    segs.append(seg)
                seg = []
                continue
            x, y = xy(i, val)
            seg.append(f"{x:.1f},{y:.1f}")
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"><title>{_e(name)}: {val:.3f}'
                "</title></circle>"
            )
        if seg:
            segs.append(seg)
        for sg in segs:
            out.append(
                f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.8" '
                f'points="{" ".join(sg)}"/>'
            )
        ly = pad_t + 4 + 16 * s_i
        out.append(
            f'<rect x="{pad_l + pw + 12}" y="{ly}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{pad_l + pw + 26}" y="{ly + 9}" class="a">{_e(name[:24])}</text>'
        )
    if not series:
        out.append(
            f'<text x="{pad_l + pw / 2}" y="{pad_t + ph / 2}" class="a" text-anchor="middle">'
            "not enough data yet</text>"
        )
    out.append("</svg>")
    return "".join(out)


def svg_histogram(
    name: str,
    edges: list[float],
    base: list[int],
    cur: list[int],
    psi: float,
    width: int = 340,
    height: int = 200,
) -> str:
    """Return an SVG of baseline vs current bin shares (underflow and overflow bins at the ends)."""
    pad_l, pad_r, pad_t, pad_b = 36, 8, 28, 34
    nb = len(base)
    tb, tc = max(sum(base), 1), max(sum(cur), 1)
    pb = [c / tb for c in base]
    pc = [c / tc for c in cur]
    ymax = max(pb + pc + [1e-9]) * 1.1
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    bw = pw / nb
    out = [
        f'<svg class="hist" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram {_e(name)}">',
        f'<text x="{pad_l}" y="16" class="t">{_e(name)} (PSI {psi:.3f})</text>',
        f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" stroke="#444"/>',
    ]
    for i in range(nb):
        x = pad_l + i * bw
        for k, (p, colour) in enumerate(((pb[i], "#90a4ae"), (pc[i], "#c62828"))):
            h = ph * p / ymax
            out.append(
                f'<rect x="{x + 1 + k * (bw - 2) / 2:.1f}" y="{pad_t + ph - h:.1f}" '
                f'width="{max((bw - 2) / 2, 0.5):.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{'baseline' if k == 0 else 'current'} bin {i}: {p:.3f}</title></rect>"
            )
    out.append(
        f'<text x="{pad_l}" y="{height - 18}" class="a">&lt;{edges[0]:g}</text>'
        f'<text x="{pad_l + pw}" y="{height - 18}" class="a" text-anchor="end">&gt;{edges[-1]:g}</text>'
        f'<rect x="{pad_l}" y="{height - 12}" width="9" height="9" fill="#90a4ae"/>'
        f'<text x="{pad_l + 12}" y="{height - 4}" class="a">baseline</text>'
        f'<rect x="{pad_l + 80}" y="{height - 12}" width="9" height="9" fill="#c62828"/>'
        f'<text x="{pad_l + 92}" y="{height - 4}" class="a">current</text></svg>'
    )
    return "".join(out)


def svg_fleet_map(devices: list[dict[str, Any]], width: int = 720) -> str:
    """Return an SVG grid with one tile per device, coloured by drift state, outlined when offline."""
    tile, gap = 26, 4
    per_row = max((width - 20) // (tile + gap), 1)
    rows = max((len(devices) + per_row - 1) // per_row, 1)
    height = 30 + rows * (tile + gap) + 24
    out = [
        f'<svg class="map" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="fleet map">',
        '<text x="10" y="18" class="t">Fleet map: one tile per device (colour: drift state; hollow:'
        " offline)</text>",
    ]
    for i, d in enumerate(devices):
        x = 10 + (i % per_row) * (tile + gap)
        y = 28 + (i // per_row) * (tile + gap)
        state = d.get("map_state") or d["drift_state"]
        colour = COLOURS.get(state, COLOURS["unknown"])
        online = d["state"] == "online"
        fill = colour if online else "#ffffff"
        model = d["model"]["name"] + " v" + str(d["model"]["version"]) if d.get("model") else "no model"
        out.append(
            f'<rect class="device" data-device="{_e(d["device_id"])}" data-state="{_e(state)}" '
            f'x="{x}" y="{y}" width="{tile}" height="{tile}" rx="4" fill="{fill}" stroke="{colour}" '
            f'stroke-width="3"><title>{_e(d["fleet"])}/{_e(d["device_id"])}: {_e(d["state"])}, drift '
            f"{_e(state)}, {_e(model)}</title></rect>"
        )
    ly = height - 10
    for k, (state, colour) in enumerate(COLOURS.items()):
        out.append(
            f'<rect x="{10 + k * 110}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{24 + k * 110}" y="{ly}" class="a">{state}</text>'
        )
    out.append("</svg>")
    return "".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5}.t{font-size:13px;font-weight:600}.a{font-size:11px;fill:#444}
.state-alert{color:#c62828;font-weight:600}.state-warn{color:#b28704;font-weight:600}.state-ok{color:#2e7d32}
.hists{display:flex;flex-wrap:wrap;gap:12px}.summary span{margin-right:20px}
"""


def build_report(
    db: str | Store,
    since: str | float | None = None,
    now: float | None = None,
    timeline: list[tuple[float, str, str]] | None = None,
) -> str:
    """Return the report page as a string; ``timeline`` (time, step, detail) adds a Timeline table."""
    now = time.time() if now is None else now
    store = open_store(db) if isinstance(db, str) else db
    try:
        devices = status_rows(store, now)
        table = drift_table(store, since=since)
        series = drift_series(store, since=since)
        alerts = recent_alerts(store, 30)
        quarantine = quarantine_summary(store)
        gates = gate_events(store, 30)
        # The map shows the alerting state (with hysteresis) when the collector evaluated the device,
        # otherwise the verdict of the drift table over the report's time range.
        verdicts = {(r["fleet"], r["device_id"]): r["state"] for r in table if r["scope"] == "device"}
        for d in devices:
            d["map_state"] = (
                d["drift_state"]
                if d["drift_state"] != "unknown"
                else verdicts.get((d["fleet"], d["device_id"]), "unknown")
            )
        hist_html = []
        # Histograms of the worst device's worst features (the fleet-wide merge dilutes one bad device).
        worst_rows = [r for r in table if r["scope"] == "device"][:1] or [
            r for r in table if r["scope"] == "fleet"
        ][:1]
        for wr in worst_rows:
            base = load_baseline(store, wr["model"]["sha256"])
            if base is None:
                continue
            devs, fleets, _ = merge_groups(store, _since(since), None, None, wr["fleet"])
            g = next(
                (
                    x
                    for x in devs + fleets
                    if x.device_id == wr["device_id"] and x.model_sha256 == wr["model"]["sha256"]
                ),
                None,
            )
            if g is None:
                continue
            names = base.profile.inputs.names
            for f in wr["features"][:HIST_FEATURES]:
                j = names.index(f["name"])
                hist_html.append(
                    svg_histogram(
                        f"{wr['device_id']}: {f['name']}",
                        base.profile.inputs.edge_list(j),
                        [int(v) for v in base.profile.inputs.hist(j)],
                        [int(v) for v in g.profile.inputs.hist(j)],
                        f["psi"] or 0.0,
                    )
                )
            bv, cv, pred = base.profile.values, g.profile.values, wr.get("prediction")
            if bv is not None and cv is not None and pred:  # regression/anomaly: the predictions too
                for j, vname in enumerate(bv.names):
                    hist_html.append(
                        svg_histogram(
                            f"{wr['device_id']}: prediction {vname}",
                            bv.edge_list(j),
                            [int(v) for v in bv.hist(j)],
                            [int(v) for v in cv.hist(j)],
                            pred["psi"][j] or 0.0,
                        )
                    )
    finally:
        if isinstance(db, str):
            store.close()
    edges = series["edges"]
    x_labels = [utc_iso(e)[5:16].replace("T", " ") for e in edges[1:]] if edges else []
    dev_series = dict(
        sorted(series["devices"].items(), key=lambda kv: -max([v for v in kv[1] if v is not None] or [0]))[
            :MAX_SERIES
        ]
    )
    n_alert = sum(d["map_state"] == "alert" for d in devices)
    n_online = sum(d["state"] == "online" for d in devices)
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        "<title>edgefleet fleet report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>edgefleet fleet report</h1>",
        f'<p class="summary"><span>generated {_e(utc_iso(now))}</span><span id="n-devices">{len(devices)}'
        " devices"
        f'</span><span>{n_online} online</span><span id="n-alert">{n_alert} in alert</span>'
        f"<span>{quarantine['count']} quarantined messages</span></p>",
        "<h2>Fleet map</h2>",
        svg_fleet_map(devices),
        "<h2>Drift over time</h2>",
        svg_lines(dev_series, x_labels, "Max feature PSI per device", "PSI", thresholds=(0.1, 0.2)),
        svg_lines(
            series["features"],
            x_labels,
            "PSI of the worst features, fleet-wide",
            "PSI",
            thresholds=(0.1, 0.2),
        ),
        "<h2>Baseline vs current: worst features of the worst device</h2>",
        '<div class="hists">' + ("".join(hist_html) or "<p>No drift data yet.</p>") + "</div>",
        "<h2>Drift table (worst first)</h2>",
        _drift_table_html(table),
        "<h2>Devices</h2>",
        _devices_html(devices, now),
        "<h2>Recent alerts</h2>",
        _alerts_html(alerts),
        "<h2>Canary gates</h2>",
        _gates_html(gates),
        *(["<h2>Timeline</h2>", _timeline_html(timeline)] if timeline else []),
        "</body></html>",
    ]
    return "\n".join(parts)


def _since(since: str | float | None) -> float | None:
    from toolchain.fleet.queries import parse_time

    return parse_time(since)


def _drift_table_html(rows: list[dict[str, Any]]) -> str:
    out = [
        '<table id="drift"><tr><th>scope</th><th>device</th><th>model</th><th>predictions</th><th>state</th>'
        "<th>max PSI</th><th>worst feature</th><th>features in alert</th><th>class PSI</th>"
        "<th>confidence shift</th><th>out of range</th><th>violations</th><th>accuracy (labelled)</th></tr>"
    ]
    for r in rows:
        out.append(
            f"<tr><td>{_e(r['scope'])}</td><td>{_e(r['fleet'])}/{_e(r['device_id'])}</td>"
            f"<td>{_e(r['model']['name'])} v{_e(r['model']['version'])}</td><td>{r['count']}</td>"
            f'<td class="state-{_e(r["state"])}">{_e(r["state"])}</td><td>{_fmt(r["max_psi"])}</td>'
            f"<td>{_e(r['worst_feature'])}</td><td>{_fmt(r['alert_share'] * 100, 0)} %</td>"
            + _output_html(r)
            + f"<td>{_fmt(r['out_of_range_rate'] * 100, 1)} %</td>"
            f"<td>{_fmt(r['schema_violation_rate'] * 100, 1)} %</td>"
            f"<td>{_accuracy(r)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _devices_html(devices: list[dict[str, Any]], now: float) -> str:
    out = [
        '<table id="devices"><tr><th>device</th><th>state</th><th>last seen</th><th>model</th><th>agent</th>'
        "<th>windows</th><th>dropped</th><th>drift</th><th>accuracy (labelled)</th><th>deployment</th></tr>"
    ]
    for d in devices:
        model = f"{d['model']['name']} v{d['model']['version']}" if d["model"] else "-"
        out.append(
            f"<tr><td>{_e(d['fleet'])}/{_e(d['device_id'])}</td><td>{_e(d['state'])}</td>"
            f"<td>{_e(utc_iso(d['last_seen']))}</td><td>{_e(model)}</td>"
            f"<td>{_e(d['agent_version'] or '-')}</td>"
            f"<td>{d['windows']}</td><td>{d['dropped_windows']}</td>"
            f'<td class="state-{_e(d["map_state"])}">{_e(d["map_state"])}</td>'
            f"<td>{_accuracy(d)}</td><td>{_e(d['deployment_state'] or '-')}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _accuracy(r: dict[str, Any]) -> str:
    """Accuracy on the labelled predictions with their count (``-``: no ground truth arrived)."""
    if not r.get("labelled"):
        return "-"
    return f"{r['accuracy'] * 100:.1f} % ({r['correct']:,} of {r['labelled']:,})"


def _alerts_html(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return "<p>No alerts.</p>"
    out = ['<table id="alerts"><tr><th>time</th><th>device</th><th>change</th><th>message</th></tr>']
    for a in alerts:
        out.append(
            f"<tr><td>{_e(utc_iso(a['ts']))}</td><td>{_e(a['fleet'])}/{_e(a['device_id'])}</td>"
            f'<td class="state-{_e(a["state"])}">{_e(a["previous"])} &rarr; {_e(a["state"])}</td>'
            f"<td>{_e(a['message'])}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _gates_html(gates: list[dict[str, Any]]) -> str:
    """The canary gate decisions with each canary's metric before and after the install."""
    if not gates:
        return "<p>No gated rollouts.</p>"
    out = [
        '<table id="canary-gates"><tr><th>time</th><th>fleet</th><th>model</th><th>gate</th><th>windows</th>'
        "<th>outcome</th><th>action</th><th>canaries: before &rarr; after</th></tr>"
    ]
    for g in gates:
        state = "ok" if g["outcome"] == "passed" else "alert"
        nums = "<br>".join(f"{_e(d['device_id'])}: {_e(d['reason'])}" for d in g["detail"].get("devices", []))
        out.append(
            f"<tr><td>{_e(utc_iso(g['ts']))}</td><td>{_e(g['fleet'])}</td>"
            f"<td>{_e(g['model']['name'])} v{_e(g['model']['version'])}</td><td>{_e(g['gate'])}</td>"
            f'<td>{_e(g["windows"])}</td><td class="state-{state}">{_e(g["outcome"])}</td>'
            f"<td>{_e(g['action'])}</td><td>{nums}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _timeline_html(rows: list[tuple[float, str, str]]) -> str:
    """Steps in time order (``edgefleet demo --loop``: alert, capture, deploy, gate, cleared)."""
    out = ['<table id="timeline"><tr><th>time</th><th>step</th><th>detail</th></tr>']
    for ts, step, detail in sorted(rows):
        out.append(f"<tr><td>{_e(utc_iso(ts))}</td><td>{_e(step)}</td><td>{_e(detail)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def write_report(
    db_url: str | Store,
    out_path: str | os.PathLike[str],
    since: str | float | None = None,
    timeline: list[tuple[float, str, str]] | None = None,
) -> Path:
    """Write the self-contained HTML report to ``out_path`` (atomically); return the path."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = build_report(db_url, since=since, timeline=timeline)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _output_html(r: dict[str, Any]) -> str:
    """The class PSI and confidence shift cells; for a regression/anomaly model the prediction PSI
    and its largest mean shift (in baseline standard deviations), marked as prediction drift."""
    p = r.get("prediction")
    if not p:
        return f"<td>{_fmt(r['class_psi'])}</td><td>{_fmt(r['confidence_shift'])}</td>"
    shifts = [v for v in p.get("mean_shift") or [] if v is not None]
    worst = max(shifts, key=abs) if shifts else None
    return f"<td>{_fmt(p.get('max_psi'))} (prediction)</td><td>{_fmt(worst)} sd (prediction)</td>"
