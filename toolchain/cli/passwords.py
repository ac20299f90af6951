"""MQTT password options shared by the commands that connect to a broker.

A password on the command line is visible to every local user in ``/proc/PID/cmdline`` (``ps -ef``)
and lands in shell history. The commands still accept ``--password`` but warn, and take the password
from ``--password-file FILE`` (``EDGEFLEET_MQTT_PASSWORD_FILE``) or ``EDGEFLEET_MQTT_PASSWORD``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

PASSWORD_FILE_MAX_BYTES = 4096
CMDLINE_WARNING = (
    "Warning: --password on the command line is visible to other users (ps, /proc/PID/cmdline) and in"
    " shell history; use --password-file FILE or the EDGEFLEET_MQTT_PASSWORD environment variable."
)

URL_PASSWORD_WARNING = (
    "Warning: a password in the --to URL is visible to other users (ps, /proc/PID/cmdline) and in shell"
    " history; use mqtt://USER@broker/... with --password-file FILE or EDGEFLEET_MQTT_PASSWORD."
)


PASSWORD_FILE_HELP = "File holding the MQTT password (first line), or EDGEFLEET_MQTT_PASSWORD_FILE."


def password_file_option(
    help: str = PASSWORD_FILE_HELP,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--password-file FILE`` (``EDGEFLEET_MQTT_PASSWORD_FILE``); read it with ``resolve_password``."""
    return click.option(
        "--password-file",
        type=click.Path(dir_okay=False),
        default=None,
        envvar="EDGEFLEET_MQTT_PASSWORD_FILE",
        help=help,
    )


def password_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--password`` (with the env var) and ``--password-file`` to a click command."""
    f = password_file_option()(f)
    return click.option(
        "--password",
        default=None,
        envvar="EDGEFLEET_MQTT_PASSWORD",
        help="MQTT password; prefer EDGEFLEET_MQTT_PASSWORD or --password-file (a flag is visible in ps).",
    )(f)


def resolve_password(password: str | None, password_file: str | None) -> str | None:
    """Return the password from the flag, the env var or the file; warn when it came as a flag."""
    ctx = click.get_current_context()
    if password is not None and ctx.get_parameter_source("password") == ParameterSource.COMMANDLINE:
        click.echo(CMDLINE_WARNING, err=True)
    if password_file is None:
        return password
    if password is not None:
        raise click.UsageError(
            "give the MQTT password one way only: --password-file, or --password / the URL /"
            " EDGEFLEET_MQTT_PASSWORD"
        )
    p = Path(password_file)
    try:
        if p.stat().st_size > PASSWORD_FILE_MAX_BYTES:
            raise click.BadParameter(
                f"{password_file!r} is larger than {PASSWORD_FILE_MAX_BYTES} bytes; is it a password file?",
                param_hint="--password-file",
            )
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(
            f"cannot read {password_file!r} ({getattr(e, 'strerror', None) or e}); pass a readable file",
            param_hint="--password-file",
        ) from None
    return lines[0] if lines else ""
