"""``edgefleet fleet broker-config``: a Mosquitto configuration that locks each device to its own topics."""

from __future__ import annotations

import json
import os
import sys

import click

from toolchain.cli.options import json_option


@click.command("broker-config")
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
@json_option("Print what was written as JSON.")
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
