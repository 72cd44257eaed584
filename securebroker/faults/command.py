"""``securebroker faults``: the fault-injection harness from the command line (the soak mode)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from securebroker.faults.harness import HarnessError, HarnessSettings, run_harness


@click.group("faults")
def faults() -> None:
    """Crash the broker, PostgreSQL and the services of a payment flow; account for every order."""


@faults.command("run")
@click.option(
    "--cycles",
    type=click.IntRange(1, 100_000),
    default=20,
    show_default=True,
    help="broker SIGKILL cycles (CI runs 20; a soak runs 200 or more)",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="seeds every random choice: kill points, fault schedule, orders",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(0.5, 24 * 60),
    default=120.0,
    show_default=True,
    help="bound on the whole run; cycles stop early past it",
)
@click.option(
    "--rate",
    type=click.FloatRange(1, 2000),
    default=100.0,
    show_default=True,
    help="orders per second written by the order service",
)
@click.option(
    "--postgres-restarts",
    type=click.IntRange(0),
    default=None,
    help="PostgreSQL restarts under load [default: cycles/10, at least 1]",
)
@click.option(
    "--keep",
    is_flag=True,
    help="keep the working directory (logs, configs, data) and print where it is",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def run(
    cycles: int,
    seed: int,
    max_minutes: float,
    rate: float,
    postgres_restarts: int | None,
    keep: bool,
    as_json: bool,
) -> None:
    """Run the payment flow under faults and print the report.

    Exit status 1 when any confirmed order was lost, took effect twice, or an effect appeared
    for an order never confirmed (or the run could not complete or drain); 0 otherwise.
    """
    settings = HarnessSettings(
        seed=seed,
        cycles=cycles,
        postgres_restarts=postgres_restarts,
        max_seconds=max_minutes * 60,
        order_rate=rate,
        keep=keep,
    )
    # The harness's own pools see PostgreSQL restart on purpose; asyncpg warns with a traceback
    # each time. The workers' and the broker's logs keep theirs (``--keep``).
    logging.getLogger("asyncpg").setLevel(logging.ERROR)
    try:
        report = asyncio.run(run_harness(settings))
    except HarnessError as exc:
        click.echo(f"error: faults: {exc}", err=True)
        sys.exit(1)
    click.echo(report.to_json() if as_json else report.summary())
    if report.workdir:
        click.echo(f"working directory kept: {Path(report.workdir)}", err=True)
    if not report.clean:
        sys.exit(1)
