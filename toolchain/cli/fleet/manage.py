"""``edgefleet fleet register | compact``: the fleet database's baselines and its old windows."""

from __future__ import annotations

import json
import sys
import time

import click

from toolchain.cli.options import db_option, json_option


@click.command("register")
@click.argument("bundle", type=click.Path(file_okay=False))
@db_option
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="Drift threshold for this model, e.g. --set psi_alert=0.25 (repeatable).",
)
@json_option("Print the result as JSON.")
def register_cmd(bundle: str, db_url: str, settings: tuple[str, ...], as_json: bool) -> None:
    """Store BUNDLE's baseline (keyed by its model sha256) so its devices' windows can be judged."""
    from toolchain.fleet.drift import DriftConfig
    from toolchain.fleet.registry import register_bundle

    overrides = {
        k: v
        for k, v in DriftConfig().with_overrides(list(settings)).to_dict().items()
        if any(s.partition("=")[0].strip() == k for s in settings)
    }
    info = register_bundle(db_url, bundle, overrides)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    verb = "registered" if info["created"] else "updated"
    click.echo(
        f"{verb} {info['name']} v{info['version']} ({info['target']}), model {info['model_sha256'][:12]},"
        f" {info['features']} features"
    )
    if info["pending_packed"] or info["pending_quarantined"]:
        click.echo(
            f"  {info['pending_packed']} waiting window(s) now judged, {info['pending_quarantined']}"
            " quarantined"
        )


@click.command("compact")
@db_option
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    help="Fold raw windows that ended more than AGE ago (30m, 36h, 7d) into hourly rollups.",
)
@json_option("Print what was done as JSON.")
def compact_cmd(db_url: str, older_than: str, as_json: bool) -> None:
    """Fold old raw windows into hourly per-device rollups and delete them (statistics merge exactly)."""
    from toolchain.fleet.compact import compact
    from toolchain.fleet.queries import QueryError, parse_age
    from toolchain.fleet.storage import StorageError, open_store, sqlite_path_exists

    try:
        age_s = parse_age(older_than)
    except QueryError as e:
        click.echo(f"Error: --older-than: {e}", err=True)
        sys.exit(2)
    if not sqlite_path_exists(db_url):
        raise StorageError(f"database {db_url!r} does not exist")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty() and (time.monotonic() - last[0] > 0.2 or done == total):
            last[0] = time.monotonic()
            click.echo(f"\rcompacting: {done}/{total} devices", err=True, nl=done == total)

    with open_store(db_url) as store:
        out = compact(store, time.time() - age_s, progress=progress)
    if as_json:
        click.echo(json.dumps(out.as_dict(), indent=2))
        return
    if not out.windows:
        click.echo(f"nothing to compact: no window ended more than {older_than} ago")
        return
    ratio = f" ({out.bytes_before / out.bytes_after:.0f}x smaller)" if out.bytes_after else ""
    click.echo(
        f"compacted {out.windows} window(s) of {out.devices} device(s) into {out.rollups} hourly rollup(s);"
        f" packed statistics {out.bytes_before:,} -> {out.bytes_after:,} bytes{ratio}"
    )
