"""``edgefleet fleet samples list | export``: the inputs devices captured (``[capture]``) and their labels."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from toolchain.cli.options import db_option, json_option, since_option


def _common(f: Any) -> Any:
    f = click.option("--only-alerting", is_flag=True, help="Only devices whose drift state is 'alert' now.")(
        f
    )
    f = since_option("all")(f)
    f = click.option("--device", default=None, metavar="ID", help="Only this device (ID or FLEET/ID).")(f)
    return db_option(f)


def _open(db_url: str, since: str, device: str | None, only_alerting: bool) -> tuple[Any, Any]:
    """Check --since (exit 2) and the database (one line, exit 1); return (store, selection)."""
    from toolchain.fleet.queries import QueryError, parse_time
    from toolchain.fleet.samples import Selection
    from toolchain.fleet.storage import StorageError, open_store, sqlite_path_exists

    try:
        parse_time(since)
    except QueryError as e:
        click.echo(f"Error: --since: {e}", err=True)
        sys.exit(2)
    if not sqlite_path_exists(db_url):
        raise StorageError(
            f"database {db_url!r} does not exist yet; start 'edgefleet fleet collect --db {db_url}'"
        )
    return open_store(db_url), Selection(device, since, only_alerting)


@click.group("samples")
def samples_cmd() -> None:
    """Captured device inputs in the fleet store: list them per device, export them for retraining."""


@samples_cmd.command("list")
@_common
@json_option("Print one JSON object per device (for scripts).")
def list_cmd(db_url: str, device: str | None, since: str, only_alerting: bool, as_json: bool) -> None:
    """Per device: captured samples, how many are labelled, first and last capture, model versions."""
    from device_agent.formats.telemetry import utc_iso
    from toolchain.cli.fleet.views import echo_json
    from toolchain.fleet.samples import summary
    from toolchain.report import text_table

    store, sel = _open(db_url, since, device, only_alerting)
    with store:
        rows = summary(store, sel)
    if as_json:
        echo_json({"devices": rows, "samples": sum(r["samples"] for r in rows)})
        return
    if not rows:
        click.echo(f"no captured samples ({sel.describe()}); devices capture with [capture] sample_rate > 0")
        return
    table = [
        [
            f"{r['fleet']}/{r['device_id']}",
            r["samples"],
            r["labelled"],
            utc_iso(r["first_ts"]),
            utc_iso(r["last_ts"]),
            ", ".join(r["model_versions"]),
        ]
        for r in rows
    ]
    click.echo(text_table(["device", "samples", "labelled", "first", "last", "model versions"], table))
    orphans = sum(r["labels_without_sample"] for r in rows)
    if orphans:
        click.echo(f"{orphans} label(s) name samples the store does not have (dropped on the device)")


@samples_cmd.command("export")
@_common
@click.option(
    "--out",
    "out",
    required=True,
    metavar="FILE.npz|FILE.csv",
    help="Write here: .npz (x, y, labels, predicted, scores, device, ts, model_version, id) or .csv"
    " (1-D inputs only).",
)
@json_option("Print what was written as JSON.")
def export_cmd(
    db_url: str, device: str | None, since: str, only_alerting: bool, out: str, as_json: bool
) -> None:
    """Export captured samples in capture order, bit-exact, with labels where feedback arrived.

    Nothing selected: one line and exit 1, and no file is written.
    """
    from toolchain.fleet.samples import export

    if not out.lower().endswith((".npz", ".csv")):
        click.echo(f"Error: --out {out!r} must end in .npz (any input) or .csv (1-D inputs only)", err=True)
        sys.exit(2)
    store, sel = _open(db_url, since, device, only_alerting)
    done = [0]
    last = [0.0]

    def progress(n: int) -> None:
        done[0] += n
        if not as_json and sys.stderr.isatty() and time.monotonic() - last[0] > 0.2:
            last[0] = time.monotonic()
            click.echo(f"\rexporting: {done[0]} samples", err=True, nl=False)

    with store:
        got = export(store, sel, out, progress)
    if not as_json and sys.stderr.isatty() and last[0]:
        click.echo("", err=True)
    if as_json:
        from toolchain.cli.fleet.views import echo_json

        echo_json(got.as_dict())
        return
    classes = f"{len(got.labels)} class names" if got.labels else "class names unknown (register the bundle)"
    click.echo(
        f"wrote {got.samples} samples ({got.labelled} labelled) of {len(got.devices)} device(s) to"
        f" {got.path}: x {got.dtype}{tuple(got.shape)}, {classes}"
    )
