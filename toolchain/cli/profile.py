"""``edgefleet profile``: bench a bundle on a device (ssh:// or local) and keep the result beside it."""

from __future__ import annotations

import click

from toolchain.cli.options import json_option, public_key_option, ssh_option


@click.command("profile")
@click.argument("bundle")
@click.option(
    "--on",
    "on",
    required=True,
    help="Where to run the bench: ssh://user@host[:port]/DIR (a writable folder there) or 'local'.",
)
@click.option("--eval-data", default=None, help="Labelled data (.npz with x, y; .npy; .csv with --label).")
@click.option("--label", default=None, help="Label array (.npz, default y) or column (.csv) of --eval-data.")
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True, help="Timed predictions.")
@click.option(
    "--runtime",
    type=click.Choice(["litert", "onnxruntime", "openvino"]),
    help="Runtime on the device (default: the bundle's first one installed there).",
)
@public_key_option("Public key (.pub) the signature must verify with.")
@ssh_option
@click.option(
    "--agent-command",
    default="edgefleet-agent",
    show_default=True,
    help="ssh:// only: how to start the agent on the device (e.g. '/opt/edgefleet/bin/edgefleet-agent').",
)
@click.option(
    "--no-budget-check", is_flag=True, help="Only record; do not fail when over the target's [budget]."
)
@json_option("Print device_profile.json to stdout.")
def profile_cmd(
    bundle: str,
    on: str,
    eval_data: str | None,
    label: str | None,
    runs: int,
    runtime: str | None,
    key: str | None,
    ssh_options: tuple[str, ...],
    agent_command: str,
    no_budget_check: bool,
    as_json: bool,
) -> None:
    """Run 'edgefleet-agent bench' for BUNDLE on a device; write BUNDLE/device_profile.json and the report."""
    from toolchain.cli.output import emit_json
    from toolchain.profile import profile_bundle
    from toolchain.report import device_profile_line
    from toolchain.steps.budget import BudgetError

    try:
        res = profile_bundle(
            bundle,
            on,
            eval_data=eval_data,
            label=label,
            runs=runs,
            runtime=runtime,
            public_key=key,
            ssh_options=ssh_options,
            agent_command=agent_command,
            check_budget=not no_budget_check,
        )
    except BudgetError:
        if as_json:
            from pathlib import Path

            from device_agent.formats.manifest import DEVICE_PROFILE_FILE

            p = Path(bundle) / DEVICE_PROFILE_FILE
            if p.is_file():
                import json

                emit_json(json.loads(p.read_text()))
        raise
    if as_json:
        emit_json(res.doc)
        return
    b = res.doc["bench"]
    click.echo(device_profile_line(res.doc))
    flags = " ".join(b["cpu"].get("numeric_flags") or []) or "-"
    click.echo(f"CPU flags that numerics depend on: {flags}")
    budget = res.doc["budget"]
    if budget.get("checked"):
        v = budget["max_latency_ms"]
        click.echo(f"budget max_latency_ms {v['budget']:g} ms (p95): ok, measured {v['measured']:.3f} ms")
    elif budget.get("reason"):
        click.echo(f"budget: not checked ({budget['reason']})")
    click.echo(f"wrote {res.profile_path}" + (f" and {res.report_path}" if res.report_path else ""))
