"""The options of ``edgefleet fleet ...``, ``keys``, ``verify``, ``flash``, ``serve``, ``profile`` and ``tune`` stay what they were.

The list below was captured from the commands before their shared option groups became one decorator
each (issue #13); a command that loses, renames or gains an option, or changes its environment
variable, required or flag nature, fails here. Each row: (option strings, envvar, required, multiple,
is_flag); arguments are listed by their upper-case name.
"""

from __future__ import annotations

import click
import pytest

from toolchain.cli import main

EXPECTED: dict[str, list[tuple[str, str | None, bool, bool, bool]]] = {
    "fleet": [],
    "fleet broker-config": [
        ("--out", None, True, False, False),
        ("--fleet", None, True, False, False),
        ("--device", None, False, True, False),
        ("--port", None, False, False, False),
        ("--host", None, False, False, False),
        ("--bind", None, False, False, False),
        ("--cafile", None, False, False, False),
        ("--certfile", None, False, False, False),
        ("--keyfile", None, False, False, False),
        ("--run-as", None, False, False, False),
        ("--window-s", None, False, False, False),
        ("--days", None, False, False, False),
        ("--json", None, False, False, True),
    ],
    "fleet collect": [
        ("--broker", "EDGEFLEET_BROKER", True, False, False),
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--fleet", None, False, False, False),
        ("--shared-group", None, False, False, False),
        ("--client-id", None, False, False, False),
        ("--username", "EDGEFLEET_MQTT_USERNAME", False, False, False),
        ("--password", "EDGEFLEET_MQTT_PASSWORD", False, False, False),
        ("--password-file", "EDGEFLEET_MQTT_PASSWORD_FILE", False, False, False),
        ("--tls-ca", None, False, False, False),
        ("--tls-cert", None, False, False, False),
        ("--tls-key", None, False, False, False),
        ("--tls-insecure", None, False, False, True),
        ("--bundle-dir", None, False, False, False),
        ("--no-alerts", None, False, False, True),
        ("--mqtt-version", None, False, False, False),
        ("--batch-size", None, False, False, False),
        ("--worker-processes", None, False, False, False),
        ("--quarantine-max-rows", None, False, False, False),
        ("--max-packet-size", None, False, False, False),
        ("--compact-after", None, False, False, False),
        ("--no-broker-drops", None, False, False, True),
    ],
    "fleet samples": [],
    "fleet samples list": [
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--device", None, False, False, False),
        ("--since", None, False, False, False),
        ("--only-alerting", None, False, False, True),
        ("--json", None, False, False, True),
    ],
    "fleet samples export": [
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--device", None, False, False, False),
        ("--since", None, False, False, False),
        ("--only-alerting", None, False, False, True),
        ("--out", None, True, False, False),
        ("--json", None, False, False, True),
    ],
    "fleet compact": [
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--older-than", None, True, False, False),
        ("--json", None, False, False, True),
    ],
    "fleet deploy": [
        ("BUNDLE", None, True, False, False),
        ("--broker", "EDGEFLEET_BROKER", True, False, False),
        ("--device", None, False, True, False),
        ("--fleet", None, True, False, False),
        ("--canary", None, False, False, False),
        ("--wave-size", None, False, False, False),
        ("--max-failures", None, False, False, False),
        ("--url", None, False, False, False),
        ("--key", None, False, False, False),
        ("--timeout", None, False, False, False),
        ("--username", "EDGEFLEET_MQTT_USERNAME", False, False, False),
        ("--password", "EDGEFLEET_MQTT_PASSWORD", False, False, False),
        ("--password-file", "EDGEFLEET_MQTT_PASSWORD_FILE", False, False, False),
        ("--tls-ca", None, False, False, False),
        ("--gate", None, False, False, False),
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--gate-windows", None, False, False, False),
        ("--gate-timeout", None, False, False, False),
        ("--rollback-bundle", None, False, False, False),
        ("--json", None, False, False, True),
    ],
    "fleet drift": [
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--device", None, False, False, False),
        ("--feature", None, False, False, False),
        ("--since", None, False, False, False),
        ("--until", None, False, False, False),
        ("--json", None, False, False, True),
        ("--recompute", None, False, False, True),
    ],
    "fleet register": [
        ("BUNDLE", None, True, False, False),
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--set", None, False, True, False),
        ("--json", None, False, False, True),
    ],
    "fleet report": [
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--out", None, False, False, False),
        ("--since", None, False, False, False),
    ],
    "fleet status": [
        ("--db", "EDGEFLEET_DB", False, False, False),
        ("--json", None, False, False, True),
        ("--all", None, False, False, True),
    ],
    "keys": [],
    "keys create": [
        ("--out", None, True, False, False),
        ("--name", None, False, False, False),
        ("--force", None, False, False, True),
    ],
    "verify": [
        ("BUNDLE", None, True, False, False),
        ("--key", None, False, False, False),
        ("--target", None, False, False, False),
        ("--json", None, False, False, True),
    ],
    "flash": [
        ("BUNDLE", None, True, False, False),
        ("--to", None, True, False, False),
        ("--key", None, False, False, False),
        ("--wait", None, False, False, False),
        ("--url", None, False, False, False),
        ("--ssh-option", None, False, True, False),
        ("--chunk-bytes", None, False, False, False),
        ("--password-file", "EDGEFLEET_MQTT_PASSWORD_FILE", False, False, False),
    ],
    "profile": [
        ("BUNDLE", None, True, False, False),
        ("--on", None, True, False, False),
        ("--eval-data", None, False, False, False),
        ("--label", None, False, False, False),
        ("--runs", None, False, False, False),
        ("--runtime", None, False, False, False),
        ("--key", None, False, False, False),
        ("--ssh-option", None, False, True, False),
        ("--agent-command", None, False, False, False),
        ("--no-budget-check", None, False, False, True),
        ("--json", None, False, False, True),
    ],
    "tune": [
        ("--data", None, True, False, False),
        ("--eval-data", None, True, False, False),
        ("--target", None, True, False, False),
        ("--max-model-bytes", None, False, False, False),
        ("--max-arena-bytes", None, False, False, False),
        ("--max-latency-ms", None, False, False, False),
        ("--trials", None, True, False, False),
        ("--workers", None, False, False, False),
        ("--out", None, True, False, False),
        ("--resume", None, False, False, True),
        ("--storage", None, False, False, False),
        ("--study", None, False, False, False),
        ("--arch", None, False, True, False),
        ("--epochs", None, False, False, False),
        ("--label", None, False, False, False),
        ("--seed", None, False, False, False),
        ("--sign-key", None, False, False, False),
        ("--json", None, False, False, True),
    ],
    "serve": [
        ("BUNDLE_DIR", None, True, False, False),
        ("--host", None, False, False, False),
        ("--port", None, False, False, False),
        ("--verbose", None, False, False, True),
    ],
}


def _params(cmd: click.Command) -> list[tuple[str, str | None, bool, bool, bool]]:
    out = []
    for p in cmd.params:
        if isinstance(p, click.Option):
            envvar = p.envvar if isinstance(p.envvar, str) or p.envvar is None else str(p.envvar)
            out.append(
                (" ".join(sorted(p.opts + p.secondary_opts)), envvar, p.required, p.multiple, p.is_flag)
            )
        else:
            out.append((str(p.name).upper(), None, p.required, p.multiple, False))
    return out


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    found: dict[str, click.Command] = {}

    def walk(cmd: click.Command, path: list[str]) -> None:
        found[" ".join(path)] = cmd
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name])

    for top in ("fleet", "keys", "verify", "flash", "serve", "profile", "tune"):
        cmd = main.get_command(ctx, top)
        assert cmd is not None, top
        walk(cmd, [top])
    return found


def test_the_same_commands() -> None:
    assert sorted(_commands()) == sorted(EXPECTED)


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_the_same_options(path: str) -> None:
    # Order may change (a shared group of options sits together); names, env vars and kinds may not.
    assert sorted(_params(_commands()[path])) == sorted(EXPECTED[path])
