"""``edgefleet fleet deploy``: roll a bundle out over MQTT in waves, canaries first (``toolchain.shipping.deploy``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolchain.cli.flash import existing_bundle
from toolchain.cli.options import broker_options, json_option, public_key_option
from toolchain.cli.passwords import resolve_password
from toolchain.cli.terminal import safe_text


@click.command("deploy")
@click.argument("bundle")
@broker_options()
@click.option(
    "--device", "devices", multiple=True, help="Device id (repeatable); needs --fleet for the topic root."
)
@click.option(
    "--fleet", "fleet", required=True, help="Fleet name; without --device: every online device of the fleet."
)
@click.option(
    "--canary",
    type=click.IntRange(0, None),
    default=1,
    show_default=True,
    help="Devices in the first wave; the rest follow only when they report deployed and healthy.",
)
@click.option(
    "--wave-size", type=click.IntRange(1, None), default=None, help="Devices per later wave (default: all)."
)
@click.option(
    "--max-failures",
    type=click.IntRange(0, None),
    default=0,
    show_default=True,
    help="Stop the rollout when more devices than this fail.",
)
@click.option("--url", help="Devices fetch the bundle from this HTTP(S) URL instead of retained MQTT chunks.")
@public_key_option("Check the signature with this .pub first.")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to wait for each wave's answers.",
)
@json_option("Print the rollout result as JSON.")
def fleet_deploy_cmd(
    bundle: str,
    broker_url: str,
    devices: tuple[str, ...],
    fleet: str,
    canary: int,
    wave_size: int | None,
    max_failures: int,
    url: str | None,
    key: str | None,
    timeout_s: float,
    username: str | None,
    password: str | None,
    password_file: str | None,
    tls_ca: str | None,
    as_json: bool,
) -> None:
    """Roll a bundle out in waves: canaries first, stop when failures pass --max-failures."""
    import sys
    from urllib.parse import urlsplit

    from toolchain.shipping.deploy import DeployError, deploy
    from toolchain.shipping.flash import MqttDest

    password = resolve_password(password, password_file)
    parts = urlsplit(broker_url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise DeployError(f"--broker {broker_url!r} must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise DeployError(f"--broker {broker_url!r} has an invalid port") from None
    dest = MqttDest(parts.hostname, port, parts.scheme == "mqtts", username, password, fleet, None, tls_ca)
    b = existing_bundle(bundle)
    roll = deploy(
        b,
        dest,
        devices=list(devices) or None,
        canary=canary,
        wave_size=wave_size,
        max_failures=max_failures,
        url=url,
        public_key=Path(key) if key else None,
        wave_timeout_s=timeout_s,
        on_progress=None if as_json else (lambda s: click.echo(s, err=True)),
    )
    if as_json:
        click.echo(json.dumps(roll.to_dict(), indent=2))
    else:
        click.echo(f"deployment {roll.deployment_id}: {roll.name} v{roll.version}")
        width = max(len(d) for d in roll.results) if roll.results else 6
        for d, r in sorted(roll.results.items(), key=lambda kv: (kv[1].wave or 99, kv[0])):
            wave = "-" if r.wave is None else str(r.wave)
            click.echo(f"  {d:<{width}}  wave {wave:>2}  {safe_text(r.state):<11}  {safe_text(r.reason)}")
        if roll.stopped:
            click.echo(f"rollout STOPPED: {safe_text(roll.stop_reason)}")
    if not roll.ok:
        sys.exit(1)
