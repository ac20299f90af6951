"""``edgefleet fleet deploy``: roll a bundle out over MQTT in waves, canaries first (``toolchain.shipping.deploy``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolchain.cli.flash import existing_bundle
from toolchain.cli.options import broker_options, db_option, json_option, public_key_option
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
@click.option(
    "--gate",
    type=click.Choice(["drift", "confidence", "accuracy"]),
    default=None,
    help="Promote past the canaries only when this model metric on them is no worse than before the"
    " install (read from --db); otherwise roll them back and stop (docs/ota.md).",
)
@db_option
@click.option(
    "--gate-windows",
    type=click.IntRange(1, None),
    default=3,
    show_default=True,
    help="Windows each canary must send on the new model before the gate decides.",
)
@click.option(
    "--gate-timeout",
    "gate_timeout_s",
    type=click.FloatRange(0, None, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds to wait for those windows; then the gate fails safe (rollback).",
)
@click.option(
    "--rollback-bundle",
    default=None,
    help="Bundle deployed to the canaries when the gate fails: the old model under a higher version.",
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
    gate: str | None,
    db_url: str,
    gate_windows: int,
    gate_timeout_s: float,
    rollback_bundle: str | None,
    as_json: bool,
) -> None:
    """Roll a bundle out in waves: canaries first, stop when failures pass --max-failures.

    With --gate, the canaries must also keep a model metric no worse than before the install.
    """
    import sys
    from urllib.parse import urlsplit

    from toolchain.shipping.deploy import DeployError, deploy
    from toolchain.shipping.flash import MqttDest

    if gate is None and rollback_bundle is not None:
        raise click.UsageError("--rollback-bundle needs --gate (it is deployed when the gate fails)")
    if gate is not None and canary < 1:
        raise click.UsageError("--gate needs canaries: pass --canary N with N >= 1")
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
    say = None if as_json else (lambda s: click.echo(safe_text(s), err=True))
    check = None
    if gate is not None:
        from toolchain.shipping.canary import GateOptions, MetricGate

        opts = GateOptions(
            gate,
            db_url,
            gate_windows,
            gate_timeout_s,
            existing_bundle(rollback_bundle) if rollback_bundle else None,
        )
        # The gate's progress goes to stderr with --json too: its wait can last minutes.
        check = MetricGate(
            opts,
            b,
            dest,
            public_key=Path(key) if key else None,
            wave_timeout_s=timeout_s,
            say=lambda s: click.echo(safe_text(s), err=True),
        )
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
        on_progress=say,
        gate=check,
    )
    if as_json:
        click.echo(json.dumps(roll.to_dict(), indent=2))
    else:
        click.echo(f"deployment {roll.deployment_id}: {roll.name} v{roll.version}")
        width = max(len(d) for d in roll.results) if roll.results else 6
        for d, r in sorted(roll.results.items(), key=lambda kv: (kv[1].wave or 99, kv[0])):
            wave = "-" if r.wave is None else str(r.wave)
            click.echo(f"  {d:<{width}}  wave {wave:>2}  {safe_text(r.state):<11}  {safe_text(r.reason)}")
        if roll.gate is not None:
            click.echo(f"{safe_text(roll.gate['message'])}; {roll.gate['action']}")
        if roll.stopped:
            click.echo(f"rollout STOPPED: {safe_text(roll.stop_reason)}")
    if not roll.ok:
        sys.exit(1)
