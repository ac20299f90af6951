"""``edgefleet --help`` keeps its commands and options when the CLI modules move (issue #13).

The tree below was read from the CLI before ``toolchain/cli/build.py`` was split by command group. A
command or option added on purpose is added here in the same commit; one that disappears is a bug.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from toolchain.cli import main

# command path -> its arguments and options (every spelling of an option, sorted), as captured
EXPECTED: dict[str, list[str]] = {
    "edgefleet": [
        "option:--debug",
        "option:--version",
    ],
    "edgefleet build": [
        "argument:model",
        "option:--allow-accuracy-drop",
        "option:--cluster",
        "option:--data",
        "option:--eval-data",
        "option:--int8-search/--no-int8-search",
        "option:--json",
        "option:--label",
        "option:--max-class-drop",
        "option:--max-error-increase",
        "option:--name",
        "option:--out",
        "option:--prune",
        "option:--quantize",
        "option:--sign-key",
        "option:--target",
        "option:--task",
        "option:--threshold-percentile",
        "option:--version",
    ],
    "edgefleet demo": [
        "option:--epochs",
        "option:--fresh",
        "option:--json",
        "option:--loop",
        "option:--out",
    ],
    "edgefleet evaluate": [
        "argument:bundle",
        "option:--data",
        "option:--json",
        "option:--label",
        "option:--runtime",
        "option:--task",
    ],
    "edgefleet flash": [
        "argument:bundle",
        "option:--chunk-bytes",
        "option:--key",
        "option:--password-file",
        "option:--ssh-option",
        "option:--to",
        "option:--url",
        "option:--wait",
    ],
    "edgefleet fleet": [],
    "edgefleet fleet broker-config": [
        "option:--bind",
        "option:--cafile",
        "option:--certfile",
        "option:--days",
        "option:--device",
        "option:--fleet",
        "option:--host",
        "option:--json",
        "option:--keyfile",
        "option:--out",
        "option:--port",
        "option:--run-as",
        "option:--window-s",
    ],
    "edgefleet fleet collect": [
        "option:--batch-size",
        "option:--broker",
        "option:--bundle-dir",
        "option:--client-id",
        "option:--compact-after",
        "option:--db",
        "option:--fleet",
        "option:--max-packet-size",
        "option:--mqtt-version",
        "option:--no-alerts",
        "option:--no-broker-drops",
        "option:--password",
        "option:--password-file",
        "option:--quarantine-max-rows",
        "option:--shared-group",
        "option:--tls-ca",
        "option:--tls-cert",
        "option:--tls-insecure",
        "option:--tls-key",
        "option:--username",
        "option:--worker-processes",
    ],
    "edgefleet fleet compact": [
        "option:--db",
        "option:--json",
        "option:--older-than",
    ],
    "edgefleet fleet deploy": [
        "argument:bundle",
        "option:--broker",
        "option:--canary",
        "option:--db",
        "option:--device",
        "option:--fleet",
        "option:--gate",
        "option:--gate-timeout",
        "option:--gate-windows",
        "option:--json",
        "option:--key",
        "option:--max-failures",
        "option:--password",
        "option:--password-file",
        "option:--rollback-bundle",
        "option:--timeout",
        "option:--tls-ca",
        "option:--url",
        "option:--username",
        "option:--wave-size",
    ],
    "edgefleet fleet drift": [
        "option:--db",
        "option:--device",
        "option:--feature",
        "option:--json",
        "option:--recompute",
        "option:--since",
        "option:--until",
    ],
    "edgefleet fleet register": [
        "argument:bundle",
        "option:--db",
        "option:--json",
        "option:--set",
    ],
    "edgefleet fleet report": [
        "option:--db",
        "option:--out",
        "option:--since",
    ],
    "edgefleet fleet samples": [],
    "edgefleet fleet samples export": [
        "option:--db",
        "option:--device",
        "option:--json",
        "option:--only-alerting",
        "option:--out",
        "option:--since",
    ],
    "edgefleet fleet samples list": [
        "option:--db",
        "option:--device",
        "option:--json",
        "option:--only-alerting",
        "option:--since",
    ],
    "edgefleet fleet status": [
        "option:--all",
        "option:--db",
        "option:--json",
    ],
    "edgefleet keys": [],
    "edgefleet keys create": [
        "option:--force",
        "option:--name",
        "option:--out",
    ],
    "edgefleet profile": [
        "argument:bundle",
        "option:--agent-command",
        "option:--eval-data",
        "option:--json",
        "option:--key",
        "option:--label",
        "option:--no-budget-check",
        "option:--on",
        "option:--runs",
        "option:--runtime",
        "option:--ssh-option",
    ],
    "edgefleet report": [
        "argument:out_dir",
        "option:--json",
    ],
    "edgefleet serve": [
        "argument:bundle_dir",
        "option:--host",
        "option:--port",
        "option:--verbose",
    ],
    "edgefleet targets": [],
    "edgefleet targets list": [
        "option:--json",
    ],
    "edgefleet targets show": [
        "argument:name",
        "option:--json",
    ],
    "edgefleet train": [
        "option:--arch",
        "option:--class-weight",
        "option:--data",
        "option:--epochs",
        "option:--init-from",
        "option:--json",
        "option:--label",
        "option:--learning-rate",
        "option:--out",
        "option:--replay",
        "option:--seed",
        "option:--task",
        "option:--workers",
    ],
    "edgefleet tune": [
        "option:--arch",
        "option:--data",
        "option:--epochs",
        "option:--eval-data",
        "option:--json",
        "option:--label",
        "option:--max-arena-bytes",
        "option:--max-latency-ms",
        "option:--max-model-bytes",
        "option:--out",
        "option:--resume",
        "option:--seed",
        "option:--sign-key",
        "option:--storage",
        "option:--study",
        "option:--target",
        "option:--trials",
        "option:--workers",
    ],
    "edgefleet verify": [
        "argument:bundle",
        "option:--json",
        "option:--key",
        "option:--target",
    ],
}


def command_tree(cmd: click.Command, path: list[str], parent: click.Context | None) -> dict[str, list[str]]:
    """Return command path -> sorted ``argument:NAME`` / ``option:--a/--b`` entries, recursively."""
    params = sorted(
        f"argument:{p.name}"
        if isinstance(p, click.Argument)
        else "option:" + "/".join(sorted([*p.opts, *p.secondary_opts]))
        for p in cmd.params
    )
    out = {" ".join(path): params}
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path[-1], parent=parent)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name!r} but cannot load it"
            out.update(command_tree(sub, [*path, name], ctx))
    return out


def test_every_command_keeps_its_options() -> None:
    tree = command_tree(main, ["edgefleet"], None)
    assert sorted(tree) == sorted(EXPECTED), "commands added or lost"
    for path, params in EXPECTED.items():
        assert tree[path] == params, path


@pytest.mark.parametrize("path", sorted(p for p in EXPECTED if p.count(" ") == 1))
def test_help_of_each_top_level_command_shows_its_options(path: str) -> None:
    res = CliRunner().invoke(main, [*path.split()[1:], "--help"])
    assert res.exit_code == 0, res.output
    for p in EXPECTED[path]:
        if p.startswith("option:"):
            assert any(o in res.output for o in p[len("option:") :].split("/")), (path, p)
