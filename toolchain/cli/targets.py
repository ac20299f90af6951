"""``edgefleet targets list | show``: the hardware target profiles (targets/*.toml, ``toolchain.targets``)."""

from __future__ import annotations

import click

from toolchain.cli.output import emit_json


@click.group("targets")
def targets_cmd() -> None:
    """List and show hardware target profiles (targets/*.toml)."""


@targets_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON on stdout.")
def targets_list(as_json: bool) -> None:
    """List the target profiles found."""
    from toolchain.report import text_table
    from toolchain.targets import list_targets

    found = list_targets()
    if as_json:
        emit_json([t.to_dict() for t in found.values()])
        return
    rows = [
        [
            t.name,
            t.format.value,
            f"{t.quantization.input_dtype.value}/{t.quantization.output_dtype.value}",
            ", ".join(r.value for r in t.runtimes),
            str(t.threads),
            f"{100 * t.limits.max_accuracy_drop:.2f}",
            t.description,
        ]
        for t in found.values()
    ]
    click.echo(
        text_table(["name", "format", "I/O", "runtimes", "threads", "max drop (pts)", "description"], rows)
    )


@targets_cmd.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON on stdout.")
def targets_show(name: str, as_json: bool) -> None:
    """Show one target profile in full."""
    from toolchain.targets import load_target

    t = load_target(name)
    d = t.to_dict()
    if as_json:
        emit_json(d)
        return
    for k in ("name", "description", "format", "runtimes", "threads", "quantization", "limits", "path"):
        v = d[k]
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        click.echo(f"{k:13} {v}")
    if d.get("budget"):
        set_keys = {k: v for k, v in d["budget"].items() if v is not None}
        click.echo(f"{'budget':13} " + (", ".join(f"{k}={v}" for k, v in set_keys.items()) or "none set"))
    if d["edgetpu"]:
        e = d["edgetpu"]
        click.echo(
            f"{'edgetpu':13} compiler={e['compiler']}, static_batch={e['static_batch']}, "
            f"max_on_chip_bytes={e['max_on_chip_bytes']}"
        )
        ops = e["supported_ops"]
        click.echo(
            f"{'':13} supported ops: " + ", ".join(f"{k}" + (f"<=v{v}" if v else "") for k, v in ops.items())
        )
