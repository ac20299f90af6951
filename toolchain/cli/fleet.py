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
) -> None:
    """Run the collector daemon: MQTT stats/status/events into the database, drift alerts out."""
    from toolchain.fleet.collector import Collector, CollectorConfigError

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
def status_cmd(db_url: str, as_json: bool) -> None:
    """Devices: online/offline, last seen, model, windows received, dropped windows, drift state."""
    from toolchain.fleet.queries import quarantine_summary, status_rows
    from toolchain.fleet.storage import open_store, sqlite_path_exists

    if not sqlite_path_exists(db_url):
        from toolchain.fleet.storage import StorageError

        raise StorageError(
            f"database {db_url!r} does not exist yet; start 'edgefleet fleet collect --db {db_url}'"
        )
    now = time.time()
    with open_store(db_url) as store:
        rows = status_rows(store, now)
        q = quarantine_summary(store)
    if as_json:
        click.echo(json.dumps({"devices": rows, "quarantined": q["count"]}, indent=2))
        return
    show_dep = any(r["deployment_state"] for r in rows)
    headers = ["fleet", "device", "state", "last seen", "model", "agent", "windows", "dropped", "drift"]
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
            r["drift_state"],
        ]
        if show_dep:
            line.append(r["deployment_state"])
        out.append([safe_text(v) for v in line])  # agent_version, deployment: device-reported text
    click.echo(text_table(headers, out) if rows else "no devices yet")
    if q["count"]:
        click.echo(f"\n{q['count']} message(s) quarantined; latest: {safe_text(q['latest'][0]['reason'])}")


@fleet_cmd.command("drift")
@db_option
@click.option("--device", default=None, help="Only this device.")
@click.option("--feature", default=None, help="Show this input feature's metrics (PSI, JS, KS, mean shift).")
@click.option("--since", default="24h", show_default=True, help="Start: 30m, 2h, 7d, an ISO time, or 'all'.")
@click.option("--until", default=None, help="End: a duration back from now or an ISO time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON with every feature's metrics.")
def drift_cmd(
    db_url: str, device: str | None, feature: str | None, since: str, until: str | None, as_json: bool
) -> None:
    """The drift table, worst first: per device and fleet-wide per model."""
    from toolchain.fleet.queries import drift_table
    from toolchain.fleet.storage import StorageError, sqlite_path_exists

    if not sqlite_path_exists(db_url):
        raise StorageError(
            f"database {db_url!r} does not exist yet; start 'edgefleet fleet collect --db {db_url}'"
        )
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

    from device_agent.config import DEFAULT_WINDOW_S
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
