"""``edgefleet fleet ...``: collect device statistics, register baselines, watch drift, write the report.

One module per group of sub-commands: ``collect`` (the daemon), ``manage`` (register, compact),
``views`` (status, drift, report), ``deploy`` (canary rollouts), ``brokerconf`` (broker-config),
``samples`` (captured inputs: list, export).
Never imports TensorFlow: the fleet side needs numpy, paho-mqtt and (for PostgreSQL) psycopg only.
"""

from __future__ import annotations

import click

from toolchain.cli.fleet.brokerconf import broker_config_cmd
from toolchain.cli.fleet.collect import collect_cmd
from toolchain.cli.fleet.deploy import fleet_deploy_cmd
from toolchain.cli.fleet.manage import compact_cmd, register_cmd
from toolchain.cli.fleet.samples import samples_cmd
from toolchain.cli.fleet.views import drift_cmd, report_cmd, status_cmd


@click.group("fleet")
def fleet_cmd() -> None:
    """Collect fleet telemetry and watch data drift, training/serving skew and model decay."""


for _cmd in (
    collect_cmd,
    register_cmd,
    status_cmd,
    drift_cmd,
    compact_cmd,
    report_cmd,
    fleet_deploy_cmd,
    broker_config_cmd,
    samples_cmd,
):
    fleet_cmd.add_command(_cmd)
