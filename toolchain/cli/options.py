"""Click options that several commands share, each written once.

A command that connects to the broker takes ``broker_options``; one that reads the fleet database
takes ``db_option``; ``--json``, ``--key`` (a public key that checks a bundle's signature) and
``--since`` keep their meaning everywhere and only their help says what the command does with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from toolchain.cli.passwords import password_options

Command = Callable[..., Any]
Decorator = Callable[[Command], Command]

DB_HELP = "Fleet database: sqlite:///PATH (default sqlite:///fleet.db) or postgresql://user@host:port/db."
SINCE_HELP = "Start: 30m, 2h, 7d, an ISO time, or 'all'."


def _apply(f: Command, options: list[Decorator]) -> Command:
    """Apply decorators so the options show in ``--help`` in list order."""
    for option in reversed(options):
        f = option(f)
    return f


def broker_options(*, client_cert: bool = False) -> Decorator:
    """``--broker`` (required), ``--username``, ``--password``/``--password-file`` and ``--tls-ca``.

    With ``client_cert`` also ``--tls-cert``, ``--tls-key`` and ``--tls-insecure`` (the collector,
    a long-running client that may authenticate with a certificate).
    """

    def decorate(f: Command) -> Command:
        options: list[Decorator] = [
            click.option(
                "--broker",
                "broker_url",
                required=True,
                envvar="EDGEFLEET_BROKER",
                help="MQTT broker: mqtt://HOST:PORT or mqtts://HOST:PORT (TLS).",
            ),
            click.option(
                "--username", default=None, envvar="EDGEFLEET_MQTT_USERNAME", help="MQTT user name."
            ),
            password_options,
            click.option(
                "--tls-ca",
                type=click.Path(dir_okay=False),
                default=None,
                help="CA certificate file (enables TLS).",
            ),
        ]
        if client_cert:
            options += [
                click.option(
                    "--tls-cert",
                    type=click.Path(dir_okay=False),
                    default=None,
                    help="Client certificate file.",
                ),
                click.option(
                    "--tls-key",
                    type=click.Path(dir_okay=False),
                    default=None,
                    help="Client private key file.",
                ),
                click.option(
                    "--tls-insecure", is_flag=True, help="Do not check the broker's host name (testing only)."
                ),
            ]
        return _apply(f, options)

    return decorate


def db_option(f: Command) -> Command:
    """``--db URL`` (``EDGEFLEET_DB``, default ``sqlite:///fleet.db``)."""
    return click.option(
        "--db", "db_url", default="sqlite:///fleet.db", envvar="EDGEFLEET_DB", show_default=True, help=DB_HELP
    )(f)


def json_option(help: str) -> Decorator:
    """``--json`` (``as_json``): print the result as JSON for scripts."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def public_key_option(help: str) -> Decorator:
    """``--key FILE.pub`` (``key``): the public key a bundle's signature must verify with."""
    return click.option("--key", "key", type=click.Path(dir_okay=False), help=help)


def since_option(default: str) -> Decorator:
    """``--since``: the start of the time range (a duration back from now, an ISO time, or 'all')."""
    return click.option("--since", default=default, show_default=True, help=SINCE_HELP)


def ssh_option(f: Command) -> Command:
    """``--ssh-option`` (repeatable): extra ``ssh -o`` options for ssh:// destinations."""
    return click.option(
        "--ssh-option",
        "ssh_options",
        multiple=True,
        help="ssh:// only: an extra 'ssh -o' option (repeatable).",
    )(f)


def task_option(f: Command) -> Command:
    """``--task classification|regression|anomaly`` (train, build, evaluate; issue 15)."""
    from device_agent.formats.manifest import TASKS

    return click.option(
        "--task",
        type=click.Choice(TASKS),
        default="classification",
        show_default=True,
        help="What the model does: classes, a number (regression) or normal/anomaly.",
    )(f)
