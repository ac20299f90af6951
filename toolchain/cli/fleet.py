"""``edgefleet fleet ...``: collect device statistics, register baselines, watch drift, write the report.

Never imports TensorFlow: the fleet side needs numpy, paho-mqtt and (for PostgreSQL) psycopg only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import click

from toolchain.cli.passwords import password_options, resolve_password
from toolchain.cli.terminal import safe_text
from toolchain.report import text_table

DB_HELP = "Fleet database: sqlite:///PATH (default sqlite:///fleet.db) or postgresql://user@host:port/db."
EX_CONFIG = 78
STATUS_TABLE_MAX = 200  # `fleet status` in a terminal lists every device up to this many
STATUS_NOTABLE_ROWS = 50  # beyond: a summary and this many devices that need a look
STORED_DRIFT_ROWS = 50  # `fleet drift` in a terminal: the worst rows (all of them with --json)


def echo_json(doc: Any) -> None:
    """Print ``doc`` as indented JSON (orjson when installed: 100,000 rows in a fraction of a second)."""
    try:
        import orjson
    except ImportError:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())


def db_option(f: Any) -> Any:
    return click.option(
        "--db", "db_url", default="sqlite:///fleet.db", envvar="EDGEFLEET_DB", show_default=True, help=DB_HELP
    )(f)


@click.group("fleet")
def fleet_cmd() -> None:
    """Collect fleet telemetry and watch data drift, training/serving skew and model decay."""


# --------------------------------------------------------------------------------------------------
# collect


@fleet_cmd.command("collect")
@click.option(
    "--broker",
    "broker_url",
    required=True,
    envvar="EDGEFLEET_BROKER",
    help="MQTT broker: mqtt://HOST:PORT or mqtts://HOST:PORT (TLS).",
)
@db_option
@click.option("--fleet", default=None, help="Only this fleet (default: every fleet on the broker).")
@click.option(
    "--shared-group",
    default=None,
    help="Split stats and events between collectors with an MQTT 5 shared subscription $share/NAME/...",
)
@click.option(
    "--client-id",
    default=None,
    help="MQTT client id (default edgefleet-collector-HOST[-GROUP]); give each collector its own.",
)
@click.option("--username", default=None, envvar="EDGEFLEET_MQTT_USERNAME", help="MQTT user name.")
@password_options
@click.option(
    "--tls-ca", type=click.Path(dir_okay=False), default=None, help="CA certificate file (enables TLS)."
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="Client certificate file.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="Client private key file.")
@click.option("--tls-insecure", is_flag=True, help="Do not check the broker's host name (testing only).")
@click.option(
    "--bundle-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Register baselines automatically from bundles found in this folder.",
)
@click.option("--no-alerts", is_flag=True, help="Store only; do not evaluate drift or publish alerts.")
@click.option(
    "--mqtt-version",
    type=click.Choice(["auto", "5", "3.1.1"]),
    default="auto",
    show_default=True,
    help="MQTT protocol; auto asks the broker (shared groups need 5).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=500,
    show_default=True,
    help="Most messages stored per transaction (acknowledged after its commit).",
)
@click.option(
    "--worker-processes",
    type=click.IntRange(0, 64),
    default=None,
    help="Decode processes beside the collector, plus one for drift evaluation (default: 1 with"
    " 2+ cores; 0: everything in the collector's process).",
)
@click.option(
    "--quarantine-max-rows",
    type=click.IntRange(1, None),
    default=10_000,
    show_default=True,
    help="Keep at most this many quarantined messages (the oldest go first; every one is counted).",
)
@click.option(
    "--max-packet-size",
    type=click.IntRange(1024, 268_435_455),
    default=None,
    help="MQTT 5 Maximum Packet Size announced to the broker, in bytes (default 131072; larger"
    " messages are dropped by the broker, never reach the collector).",
)
@click.option(
    "--compact-after",
    default=None,
    metavar="AGE",
    help="Fold windows older than AGE (e.g. 7d) into hourly per-device rollups every 10 minutes.",
)
@click.option(
    "--no-broker-drops",
    is_flag=True,
    help="Do not watch the broker's $SYS drop counters.",
)
def collect_cmd(
    broker_url: str,
    db_url: str,
    fleet: str | None,
    shared_group: str | None,
    client_id: str | None,
    username: str | None,
    password: str | None,
    password_file: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_insecure: bool,
    bundle_dir: str | None,
    no_alerts: bool,
    mqtt_version: str,
    batch_size: int,
    worker_processes: int | None,
    quarantine_max_rows: int,
    max_packet_size: int | None,
    compact_after: str | None,
    no_broker_drops: bool,
) -> None:
    """Run the collector daemon: MQTT stats/status/events into the database, drift alerts out."""
    from toolchain.fleet.collector import MAX_PACKET_BYTES, Collector, CollectorConfigError
    from toolchain.fleet.queries import QueryError, parse_age

    try:
        compact_after_s = parse_age(compact_after) if compact_after else None
    except QueryError as e:
        click.echo(f"Error: --compact-after: {e}", err=True)
        sys.exit(2)

    password = resolve_password(password, password_file)
    logging.getLogger("edgefleet").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        collector = Collector(
            db_url,
            broker_url,
            fleet=fleet,
            shared_group=shared_group,
            client_id=client_id,
            username=username,
            password=password,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_insecure=tls_insecure,
            bundle_dir=bundle_dir,
            evaluate=not no_alerts,
            batch_max=batch_size,
            protocol=mqtt_version,
            worker_processes=worker_processes,
            quarantine_max_rows=quarantine_max_rows,
            max_packet_bytes=max_packet_size or MAX_PACKET_BYTES,
            watch_broker_drops=not no_broker_drops,
            compact_after_s=compact_after_s,
        )
    except CollectorConfigError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EX_CONFIG)

    def _stop(signum: int, frame: Any) -> None:
        collector.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        collector.run_forever()
    except CollectorConfigError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EX_CONFIG)
    click.echo(f"collector stopped: {json.dumps(collector.counters.as_dict())}", err=True)


# --------------------------------------------------------------------------------------------------
# register


@fleet_cmd.command("register")
@click.argument("bundle", type=click.Path(file_okay=False))
@db_option
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="Drift threshold for this model, e.g. --set psi_alert=0.25 (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def register_cmd(bundle: str, db_url: str, settings: tuple[str, ...], as_json: bool) -> None:
    """Store BUNDLE's baseline (keyed by its model sha256) so its devices' windows can be judged."""
    from toolchain.fleet.drift import DriftConfig
    from toolchain.fleet.registry import register_bundle

    overrides = {
        k: v
        for k, v in DriftConfig().with_overrides(list(settings)).to_dict().items()
        if any(s.partition("=")[0].strip() == k for s in settings)
    }
    info = register_bundle(db_url, bundle, overrides)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    verb = "registered" if info["created"] else "updated"
    click.echo(
        f"{verb} {info['name']} v{info['version']} ({info['target']}), model {info['model_sha256'][:12]},"
        f" {info['features']} features"
    )
    if info["pending_packed"] or info["pending_quarantined"]:
        click.echo(
            f"  {info['pending_packed']} waiting window(s) now judged, {info['pending_quarantined']}"
            " quarantined"
        )


# --------------------------------------------------------------------------------------------------
# status / drift / report


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


@fleet_cmd.command("status")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help=f"List every device (fleets over {STATUS_TABLE_MAX} devices show a summary and the devices"
    " that need a look).",
)
def status_cmd(db_url: str, as_json: bool, show_all: bool) -> None:
    """Devices: online/offline, last seen, model, windows received, dropped windows, drift state."""
    from toolchain.fleet.queries import (
        broker_counters,
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
        totals = collector_counters(store)
    if as_json:
        doc = {
            "devices": rows,
            "quarantined": q["count"],
            "quarantine": {k: q[k] for k in ("count", "total", "evicted")},
            "collector": totals,
            "broker_drops": brokers,
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
            r["duplicates"],
            r["stream_changes"],
            r["drift_state"],
        ]
        if show_dep:
            line.append(r["deployment_state"])
        out.append([safe_text(v) for v in line])  # agent_version, deployment: device-reported text
    if large:
        assert summary is not None
        drift = ", ".join(f"{v:,} {k}" for k, v in sorted(summary["drift"].items())) or "none evaluated"
        click.echo(
            f"{summary['devices']:,} devices: {summary['online']:,} online, {summary['stale']:,} stale,"
            f" {summary['offline']:,} offline or unknown; drift: {drift}; {summary['windows']:,} windows,"
            f" {summary['predictions']:,} predictions, {summary['duplicates']:,} duplicates;"
            f" {summary['restarted']:,} restarted with lost state\n"
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
        names = ", ".join(safe_text(f"{r['fleet']}/{r['device_id']}") for r in restarted[:5])
        more = f" and {len(restarted) - 5} more" if len(restarted) > 5 else ""
        click.echo(
            f"\n{len(restarted)} device(s) restarted with lost state (new stream): {names}{more};"
            " their new windows are stored"
        )
    for b in brokers:
        if b["dropped_seen"]:
            click.echo(
                f"\nbroker {b['broker']} dropped {b['dropped_seen']} message(s) after acknowledging them"
                f" ({b['counter']} = {b['value']}); raise max_queued_messages (docs/fleet.md)"
            )


@fleet_cmd.command("drift")
@db_option
@click.option("--device", default=None, help="Only this device.")
@click.option("--feature", default=None, help="Show this input feature's metrics (PSI, JS, KS, mean shift).")
@click.option("--since", default="24h", show_default=True, help="Start: 30m, 2h, 7d, an ISO time, or 'all'.")
@click.option("--until", default=None, help="End: a duration back from now or an ISO time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON with every feature's metrics.")
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
                _f(r["class_psi"]),
                _f(r["confidence_shift"], "{:+.3f}"),
                f"{r['out_of_range_rate']:.1%}",
                f"{r['schema_violation_rate']:.1%}",
            ]
            for r in rows
        ]
    click.echo(text_table(headers, [[safe_text(v) for v in row] for row in out]))


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
                _f(r.get("class_psi")),
                _f(r.get("confidence_shift"), "{:+.3f}"),
                f"{r['out_of_range_rate']:.1%}" if r.get("out_of_range_rate") is not None else "-",
            ]
        )
    click.echo(text_table(headers, out))
    more = sum(r["devices"] for r in rows if r["scope"] == "fleet") - sum(
        r["scope"] == "device" for r in rows
    )
    if more > 0:
        click.echo(f"... and {more:,} more row(s), less drifted; --json prints them all")
    click.echo("\n(latest stored evaluation per device; --recompute merges every window again)")


@fleet_cmd.command("compact")
@db_option
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    help="Fold raw windows that ended more than AGE ago (30m, 36h, 7d) into hourly rollups.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def compact_cmd(db_url: str, older_than: str, as_json: bool) -> None:
    """Fold old raw windows into hourly per-device rollups and delete them (statistics merge exactly)."""
    from toolchain.fleet.compact import compact
    from toolchain.fleet.queries import QueryError, parse_age
    from toolchain.fleet.storage import StorageError, open_store, sqlite_path_exists

    try:
        age_s = parse_age(older_than)
    except QueryError as e:
        click.echo(f"Error: --older-than: {e}", err=True)
        sys.exit(2)
    if not sqlite_path_exists(db_url):
        raise StorageError(f"database {db_url!r} does not exist")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty() and (time.monotonic() - last[0] > 0.2 or done == total):
            last[0] = time.monotonic()
            click.echo(f"\rcompacting: {done}/{total} devices", err=True, nl=done == total)

    with open_store(db_url) as store:
        out = compact(store, time.time() - age_s, progress=progress)
    if as_json:
        click.echo(json.dumps(out.as_dict(), indent=2))
        return
    if not out.windows:
        click.echo(f"nothing to compact: no window ended more than {older_than} ago")
        return
    ratio = f" ({out.bytes_before / out.bytes_after:.0f}x smaller)" if out.bytes_after else ""
    click.echo(
        f"compacted {out.windows} window(s) of {out.devices} device(s) into {out.rollups} hourly rollup(s);"
        f" packed statistics {out.bytes_before:,} -> {out.bytes_after:,} bytes{ratio}"
    )


@fleet_cmd.command("report")
@db_option
@click.option(
    "--out",
    "out_path",
    default="report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where to write the HTML page.",
)
@click.option("--since", default="all", show_default=True, help="Start: 30m, 2h, 7d, an ISO time, or 'all'.")
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


# --------------------------------------------------------------------------------------------------
# deploy (defined with the OTA commands in toolchain/cli/flash.py)

from toolchain.cli.flash import fleet_deploy_cmd  # noqa: E402

fleet_cmd.add_command(fleet_deploy_cmd, "deploy")


# --------------------------------------------------------------------------------------------------
# broker-config


@fleet_cmd.command("broker-config")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the broker files."
)
@click.option("--fleet", required=True, help="Fleet name (the topic root edgefleet/<fleet>/).")
@click.option(
    "--device",
    "devices",
    multiple=True,
    help="Device id (repeatable). Devices already in --out keep their passwords.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Listener port (default 1883, 8883 with TLS)."
)
@click.option(
    "--host",
    default=None,
    help="Broker host name the devices connect to, for the agent snippets (default: this host's name).",
)
@click.option("--bind", default=None, help="Address the listener binds (default: all interfaces).")
@click.option("--cafile", type=click.Path(dir_okay=False), default=None, help="TLS: CA certificate file.")
@click.option("--certfile", type=click.Path(dir_okay=False), default=None, help="TLS: broker certificate.")
@click.option("--keyfile", type=click.Path(dir_okay=False), default=None, help="TLS: broker private key.")
@click.option(
    "--run-as",
    default=None,
    help="Write 'user NAME' (the account Mosquitto switches to when started as root; default mosquitto).",
)
@click.option(
    "--window-s",
    type=float,
    default=None,
    help="Telemetry window length of the devices, for sizing the queue (default: the agent's, 60).",
)
@click.option(
    "--days",
    type=float,
    default=1.0,
    show_default=True,
    help="How long the collector may be away without the broker dropping windows (sizes the queue).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def broker_config_cmd(
    out_dir: str,
    fleet: str,
    devices: tuple[str, ...],
    port: int | None,
    host: str | None,
    bind: str | None,
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    run_as: str | None,
    window_s: float | None,
    days: float,
    as_json: bool,
) -> None:
    """Write a Mosquitto config that locks each device to its own topics: conf, passwd, acl, credentials."""
    import socket
    from pathlib import Path

    from device_agent.formats.telemetry import DEFAULT_WINDOW_S
    from toolchain.fleet.brokerconf import BrokerConfigError, Tls, write_broker_config

    given = [f for f in (cafile, certfile, keyfile) if f]
    if given and len(given) != 3:
        raise click.UsageError("TLS needs all three of --cafile, --certfile and --keyfile")
    if not devices and not (Path(out_dir) / "credentials.json").exists():
        raise click.UsageError("name at least one --device (a new broker config has no devices yet)")
    tls = (
        Tls(Path(cafile).resolve(), Path(certfile).resolve(), Path(keyfile).resolve())
        if cafile and certfile and keyfile
        else None
    )
    try:
        cfg = write_broker_config(
            out_dir,
            fleet,
            list(devices),
            port=port,
            host=host or socket.getfqdn(),
            bind=bind,
            tls=tls,
            run_as=run_as,
            window_s=window_s if window_s is not None else DEFAULT_WINDOW_S,
            days=days,
        )
    except BrokerConfigError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    o = cfg.out
    click.echo(
        f"broker config of fleet {cfg.fleet!r} in {o}: {len(cfg.devices)} device(s),"
        f" {len(cfg.added)} new ({', '.join(cfg.added) or 'none'})"
    )
    click.echo(
        f"  max_queued_messages {cfg.max_queued_messages} (a {cfg.days:g}-day queue at one window per"
        f" {cfg.window_s:g} s), max_packet_size {cfg.max_packet_size}"
    )
    click.echo(f"  start:     mosquitto -c {o / 'mosquitto.conf'}   (running: kill -HUP to reload)")
    click.echo(
        f"  collector: edgefleet fleet collect --username edgefleet-collector"
        f" --password-file {o / 'collector.password'} --client-id {cfg.collector_client_id}"
    )
    click.echo(f"  devices:   {o / 'agents'}/<id>.toml and <id>.password (secrets: {o / 'credentials.json'})")
    if run_as is None and os.geteuid() == 0:
        click.echo(
            "  note: Mosquitto started as root switches to the user 'mosquitto', which cannot read the 0600"
            " passwd; run again with --run-as mosquitto (makes passwd, acl and data/ its own)",
            err=True,
        )
