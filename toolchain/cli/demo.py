"""``edgefleet demo``: the README's main command, the whole loop on the shipped digits data."""

from __future__ import annotations

import json
import sys

import click


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the model, bundles, fleet database and reports.",
)
@click.option(
    "--epochs",
    default=30,
    show_default=True,
    type=click.IntRange(1, 500),
    help="Training epochs (early stopping usually ends sooner).",
)
@click.option("--fresh", is_flag=True, help="Delete the output folder first (retrain from scratch).")
@click.option(
    "--loop",
    is_flag=True,
    help="After the drift alert: capture on pi-shifted, label, fine-tune, build v2, canary it (--gate drift).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (progress on stderr)."
)
def demo_cmd(out_dir: str, epochs: int, fresh: bool, loop: bool, as_json: bool) -> None:
    """Train a digits CNN, build every target, run two agents and a collector, and flag drift.

    Everything is embedded: an in-process MQTT broker, SQLite, LiteRT. One agent sees held-out
    digits, the other sees them with lower contrast and noise; the collector flags the second.
    With --loop it then closes the loop on the second: capture, label, fine-tune, canary, promote.
    """
    from toolchain.demo import run_demo

    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    obj = click.get_current_context().find_root().obj or {}
    summary = run_demo(
        out_dir,
        epochs=epochs,
        echo=echo,
        progress=sys.stderr.isatty(),
        fresh=fresh,
        loop=loop,
        debug=bool(obj.get("debug")),
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    if not summary.get("ok"):
        sys.exit(1)
