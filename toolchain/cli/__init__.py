"""The ``edgefleet`` command line. Only this layer prints; domain errors become one line and exit 1.

Sub-commands live in one module each and are registered in ``COMMANDS``; heavy libraries
(TensorFlow, runtimes) are imported inside the commands, so ``edgefleet --help`` starts fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

import click

from toolchain.errors import USER_ERRORS

# module -> names of the click commands/groups it defines
COMMANDS: dict[str, tuple[str, ...]] = {
    "toolchain.cli.train": ("train",),
    "toolchain.cli.build": ("build", "report"),
    "toolchain.cli.evaluate": ("evaluate",),
    "toolchain.cli.targets": ("targets",),
    "toolchain.cli.fleet": ("fleet",),
    "toolchain.cli.flash": ("keys", "verify", "flash", "serve"),
    "toolchain.cli.demo": ("demo",),
    "toolchain.cli.profile": ("profile",),
    "toolchain.cli.tune": ("tune",),
}


class EdgefleetGroup(click.Group):
    """A group that loads sub-commands lazily and turns user errors into one line and exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [n for mod, cmds in COMMANDS.items() for n in cmds if _module_exists(mod)]
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for mod, cmds in COMMANDS.items():
            if cmd_name in cmds and _module_exists(mod):
                module = importlib.import_module(mod)
                cmd = getattr(module, cmd_name.replace("-", "_") + "_cmd", None)
                return cmd if isinstance(cmd, click.Command) else None
        return None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from toolchain.cli.terminal import safe_text  # messages may quote device-reported text

            click.echo(f"Error: {safe_text(str(e))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Aborted.", err=True)
            sys.exit(130)


def _module_exists(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@click.group(cls=EdgefleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="edgefleet")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """edgefleet: build int8 model bundles for edge targets, deploy them, and watch the fleet."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug or os.environ.get("EDGEFLEET_DEBUG") == "1"
    if ctx.obj["debug"]:
        os.environ["EDGEFLEET_DEBUG"] = "1"
    logging.basicConfig(
        level=logging.DEBUG if ctx.obj["debug"] else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
