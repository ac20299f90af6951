"""``edgefleet fleet collect``: the collector daemon (exits 78 on a bad configuration, 1 when it fails)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any

import click

from toolchain.cli.options import broker_options, db_option
from toolchain.cli.passwords import resolve_password

EX_CONFIG = 78


@click.command("collect")
@broker_options(client_cert=True)
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
    from toolchain.fleet.collector import Collector, CollectorConfigError
    from toolchain.fleet.quarantine import MAX_PACKET_BYTES
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
    done = {**collector.counters.as_dict(), "alert_commands": collector.alert_commands.as_dict()}
    click.echo(f"collector stopped: {json.dumps(done)}", err=True)
