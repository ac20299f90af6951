"""``edgefleet fleet status | drift | report``: what the fleet database shows, as tables, JSON or HTML."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from toolchain.cli.options import db_option, json_option, since_option
from toolchain.cli.terminal import safe_text
from toolchain.report import text_table

STATUS_TABLE_MAX = 200  # `fleet status` in a terminal lists every device up to this many
STATUS_NOTABLE_ROWS = 50  # beyond: a summary and this many devices that need a look
STATUS_GATE_ROWS = 10  # `fleet status`: the latest canary gate decisions
STORED_DRIFT_ROWS = 50  # `fleet drift` in a terminal: the worst rows (all of them with --json)


def echo_json(doc: Any) -> None:
    """Print ``doc`` as indented JSON (orjson when installed: 100,000 rows in a fraction of a second)."""
    try:
        import orjson
    except ImportError:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())


def _ago(ts: float, now: float) -> str:
    s = max(now - ts, 0)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _first_five(rows: list[dict[str, Any]]) -> str:
    """Name the first five devices of ``rows`` (fleet/device_id), then how many more."""
    names = ", ".join(safe_text(f"{r['fleet']}/{r['device_id']}") for r in rows[:5])
    return names + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


@click.command("status")
@db_option
@json_option("Print JSON (for scripts).")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help=f"List every device (fleets over {STATUS_TABLE_MAX} devices show a summary and the devices"
    " that need a look).",
)
def status_cmd(db_url: str, as_json: bool, show_all: bool) -> None:
    """Devices: online/offline, last seen, model, windows received, dropped windows, drift state."""
    from toolchain.fleet.brokerdrops import SESSION_PREFIX, describe
    from toolchain.fleet.rollouts import gate_events
    from toolchain.fleet.status import (
        broker_counters,
        broker_sessions,
        collector_counters,
        quarantine_summary,
        status_rows,
        status_summary,
    )
    from toolchain.fleet.storage import open_store, sqlite_path_exists

    if not sqlite_path_exists(db_url):
        from toolchain.fleet.storage import StorageError

        raise StorageError(
            f"database {db_url!r} does not exist yet; start 'edgefleet fleet collect --db {db_url}'"
        )
    now = time.time()
    with open_store(db_url) as store:
        summary = None if as_json or show_all else status_summary(store, now)
        large = summary is not None and summary["devices"] > STATUS_TABLE_MAX
        rows = status_rows(store, now, notable_limit=STATUS_NOTABLE_ROWS if large else None)
        q = quarantine_summary(store)
        brokers = broker_counters(store)
        sessions = broker_sessions(store)
        totals = collector_counters(store)
        gates = gate_events(store, STATUS_GATE_ROWS)
    if as_json:
        doc = {
            "devices": rows,
            "quarantined": q["count"],
            "quarantine": {k: q[k] for k in ("count", "total", "evicted")},
            "collector": totals,
            "broker_drops": brokers,
            "broker_sessions": sessions,
            "canary_gates": gates,
        }
        echo_json(doc)
        return
    show_dep = any(r["deployment_state"] for r in rows)
    headers = [
        "fleet",
        "device",
        "state",
        "last seen",
        "model",
        "agent",
        "windows",
        "dropped",
        "dups",
        "restarts",
        "drift",
    ]
    show_missing = any(r["missing_windows"] for r in rows)
    if show_missing:
        headers.insert(headers.index("dups"), "missing")
    show_acc = any(r["labelled"] for r in rows)
    if show_acc:
        headers.append("accuracy (labelled)")
    if show_dep:
        headers.append("deployment")
    out = []
    for r in rows:
        model = f"{r['model']['name']} v{r['model']['version']}" if r["model"] else None
        line = [
            r["fleet"],
            r["device_id"],
            r["state"],
            _ago(r["last_seen"], now),
            model,
            r["agent_version"],
            r["windows"],
            r["dropped_windows"],
            *([r["missing_windows"]] if show_missing else []),
            r["duplicates"],
            r["stream_changes"],
            r["drift_state"],
        ]
        if show_acc:
            line.append(accuracy_cell(r))
        if show_dep:
            line.append(r["deployment_state"])
        out.append([safe_text(v) for v in line])  # agent_version, deployment: device-reported text
    if large:
        assert summary is not None
        drift = ", ".join(f"{v:,} {k}" for k, v in sorted(summary["drift"].items())) or "none evaluated"
        click.echo(
            f"{summary['devices']:,} devices: {summary['online']:,} online, {summary['stale']:,} stale,"
            f" {summary['offline']:,} offline or unknown; drift: {drift}; {summary['windows']:,} windows,"
            f" {summary['predictions']:,} predictions, {summary['duplicates']:,} duplicates,"
            f" {summary['missing_windows']:,} missing; {summary['restarted']:,} restarted with lost state\n"
        )
        click.echo(f"devices that need a look (at most {STATUS_NOTABLE_ROWS}; --all lists every device):")
    click.echo(text_table(headers, out) if rows else ("none" if large else "no devices yet"))
    if q["count"]:
        kept = f" ({q['count']} kept, {q['evicted']} oldest removed)" if q["evicted"] else ""
        click.echo(
            f"\n{q['total']} message(s) quarantined{kept}; latest: {safe_text(q['latest'][0]['reason'])}"
        )
    restarted = [r for r in rows if r["stream_changes"]]
    if restarted and not large:
        click.echo(
            f"\n{len(restarted)} device(s) restarted with lost state (new stream): {_first_five(restarted)};"
            " their new windows are stored"
        )
    gaps = [r for r in rows if r["missing_windows"]]
    if gaps and not large:
        click.echo(
            f"\n{sum(r['missing_windows'] for r in gaps):,} window(s) missing from the seq of {len(gaps)}"
            f" device(s): {_first_five(gaps)}; lost between the device and the database (the broker dropped or"
            " lost them) unless they are still on their way (docs/fleet.md, 'Missing windows')"
        )
    if gates:
        click.echo(f"\ncanary gates (latest {STATUS_GATE_ROWS}, newest first):")
        click.echo(text_table(*gate_table(gates, now)))
    for b in brokers:
        if b["dropped_seen"]:
            what = describe(b["counter"], b["dropped_seen"])
            click.echo(f"\nbroker {b['broker']} {what} ({b['counter']} = {b['value']})")
    for se in sessions:
        if se["lost"]:
            what = describe(SESSION_PREFIX + se["client_id"], se["lost"])
            click.echo(f"\nbroker {se['broker']} {what} ({se['connections']} connections)")
    if totals.get("samples_stored"):
        click.echo(
            f"\ncaptured samples: {totals['samples_stored']:,} stored"
            f" ({totals.get('samples_duplicate', 0):,} resent and not stored again),"
            f" {totals.get('sample_labels_stored', 0):,} label(s) from feedback; see 'edgefleet fleet samples list'"
        )


def gate_table(gates: list[dict[str, Any]], now: float) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the canary gate decisions (``fleet status``)."""
    rows = []
    for g in gates:
        nums = "; ".join(f"{d['device_id']}: {d['reason']}" for d in g["detail"].get("devices", []))
        model = f"{g['model']['name']} v{g['model']['version']}"
        line = [
            _ago(g["ts"], now),
            g["fleet"],
            model,
            g["gate"],
            g["windows"],
            g["outcome"],
            g["action"],
            nums,
        ]
        rows.append([safe_text(v) for v in line])
    return [
        "when",
        "fleet",
        "model",
        "gate",
        "windows",
        "outcome",
        "action",
        "canaries: before -> after",
    ], rows


@click.command("drift")
@db_option
@click.option("--device", default=None, help="Only this device.")
@click.option("--feature", default=None, help="Show this input feature's metrics (PSI, JS, KS, mean shift).")
@since_option("24h")
@click.option("--until", default=None, help="End: a duration back from now or an ISO time (default: now).")
@json_option("Print JSON with every feature's metrics.")
@click.option(
    "--recompute",
    is_flag=True,
    help="Merge every stored window again (exact fleet-wide rows, every feature) instead of reading the"
    " collector's stored evaluations.",
)
def drift_cmd(
    db_url: str,
    device: str | None,
    feature: str | None,
    since: str,
    until: str | None,
    as_json: bool,
    recompute: bool,
) -> None:
    """The drift table, worst first: per device and fleet-wide per model.

    By default it shows each device's latest evaluation as the collector stored it (fast at any fleet
    size); --device, --feature, --until and --recompute merge the stored windows again.
    """
    from toolchain.fleet.queries import drift_from_evaluations, drift_table, has_evaluations
    from toolchain.fleet.storage import StorageError, open_store, sqlite_path_exists

    if not sqlite_path_exists(db_url):
        raise StorageError(
            f"database {db_url!r} does not exist yet; start 'edgefleet fleet collect --db {db_url}'"
        )
    if not (recompute or device or feature or until):
        with open_store(db_url) as store:
            stored = (
                drift_from_evaluations(store, since=since, limit=None if as_json else STORED_DRIFT_ROWS)
                if has_evaluations(store)
                else None
            )
        if stored is not None:
            _print_stored_drift(stored, as_json, since)
            return
    rows = drift_table(db_url, device=device, feature=feature, since=since, until=until)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(
            f"no windows with a registered baseline since {since}; register bundles with"
            " 'edgefleet fleet register BUNDLE'"
        )
        return
    if feature:
        headers = ["scope", "device", "model", "n", "state", "feature", "PSI", "JS", "KS", "mean shift (sd)"]
        out = []
        for r in rows:
            f = r["features"][0] if r["features"] else {}
            out.append(
                [
                    r["scope"],
                    r["device_id"],
                    f"{r['model']['name']} v{r['model']['version']}",
                    r["count"],
                    r["state"],
                    feature,
                    _f(f.get("psi")),
                    _f(f.get("js")),
                    _f(f.get("ks")),
                    _f(f.get("mean_shift"), "{:+.2f}"),
                ]
            )
    else:
        headers = [
            "scope",
            "device",
            "model",
            "n",
            "state",
            "max PSI",
            "worst feature",
            "in alert",
            "class PSI",
            "conf shift",
            "out of range",
            "violations",
        ]
        out = [
            [
                r["scope"],
                r["device_id"],
                f"{r['model']['name']} v{r['model']['version']}",
                r["count"],
                r["state"],
                _f(r["max_psi"]),
                r["worst_feature"],
                f"{r['alert_share']:.0%}",
                *output_cells(r),
                f"{r['out_of_range_rate']:.1%}",
                f"{r['schema_violation_rate']:.1%}",
            ]
            for r in rows
        ]
    if any(r["labelled"] for r in rows):  # ground truth beside the label-free signals
        headers.append("accuracy (labelled)")
        out = [[*line, accuracy_cell(r)] for line, r in zip(out, rows, strict=True)]
    click.echo(text_table(headers, [[safe_text(v) for v in row] for row in out]))


def accuracy_cell(r: dict[str, Any]) -> str:
    """``0.700 (10)``: accuracy on the labelled predictions and how many; ``-`` without labels."""
    return "-" if not r["labelled"] else f"{r['accuracy']:.3f} ({r['labelled']:,})"


def _print_stored_drift(rows: list[dict[str, Any]], as_json: bool, since: str) -> None:
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no evaluation of windows since {since}; try --since all or --recompute")
        return
    headers = ["scope", "device", "model", "n", "verdict", "alert state", "max PSI", "worst feature"]
    headers += ["in alert", "class PSI", "conf shift", "out of range"]
    out = []
    for r in rows:
        model = f"{r['model']['name']} v{r['model']['version']}"
        if r["scope"] == "fleet":
            by = r["devices_by_state"]
            out.append(
                [
                    "fleet",
                    f"* ({r['devices']} devices)",
                    model,
                    r["count"],
                    r["state"],
                    f"{by.get('alert', 0)} alert, {by.get('warn', 0)} warn",
                    _f(r["max_psi"]),
                    f"worst: {r['worst_device']}",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        out.append(
            [
                "device",
                r["device_id"],
                model,
                r["count"],
                r["state"],
                r["alert_state"],
                _f(r["max_psi"]),
                r["worst_feature"],
                f"{r['alert_share']:.0%}" if r.get("alert_share") is not None else "-",
                *output_cells(r),
                f"{r['out_of_range_rate']:.1%}" if r.get("out_of_range_rate") is not None else "-",
            ]
        )
    if any(r["labelled"] for r in rows):  # ground truth beside the label-free signals
        headers.append("accuracy (labelled)")
        out = [[*line, accuracy_cell(r)] for line, r in zip(out, rows, strict=True)]
    click.echo(text_table(headers, out))
    more = sum(r["devices"] for r in rows if r["scope"] == "fleet") - sum(
        r["scope"] == "device" for r in rows
    )
    if more > 0:
        click.echo(f"... and {more:,} more row(s), less drifted; --json prints them all")
    click.echo("\n(latest stored evaluation per device; --recompute merges every window again)")


@click.command("report")
@db_option
@click.option(
    "--out",
    "out_path",
    default="report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where to write the HTML page.",
)
@since_option("all")
def report_cmd(db_url: str, out_path: str, since: str) -> None:
    """Write a self-contained HTML report: fleet map, drift over time, worst-feature histograms."""
    from toolchain.fleet.report import write_report
    from toolchain.fleet.storage import StorageError, sqlite_path_exists

    if not sqlite_path_exists(db_url):
        raise StorageError(
            f"database {db_url!r} does not exist yet; start 'edgefleet fleet collect --db {db_url}'"
        )
    path = write_report(db_url, out_path, since=since)
    click.echo(f"wrote {path}")


def output_cells(r: dict[str, Any]) -> list[str]:
    """The output-drift cells of a drift row: class PSI and confidence shift for a classifier; for
    a regression/anomaly model the prediction PSI and the largest mean shift (in baseline sd),
    marked ``pred``."""
    p = r.get("prediction")
    if not p:
        return [_f(r.get("class_psi")), _f(r.get("confidence_shift"), "{:+.3f}")]
    shifts = [v for v in p.get("mean_shift") or [] if v is not None]
    worst = max(shifts, key=abs) if shifts else None
    return [f"{_f(p.get('max_psi'))} pred", "-" if worst is None else f"{worst:+.2f} sd pred"]
