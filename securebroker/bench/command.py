"""The ``securebroker bench`` command (registered by securebroker/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from securebroker.bench.runner import SB_CLIENTS, TARGETS, WORKLOADS, run_all


@click.command("bench")
@click.option("--quick", is_flag=True, help="small counts: the whole run takes under 2 minutes")
@click.option(
    "--targets",
    default=",".join(TARGETS),
    show_default=True,
    help="comma-separated: " + ", ".join(TARGETS),
)
@click.option(
    "--workloads",
    default=",".join(WORKLOADS),
    show_default=True,
    help="comma-separated: W1 latency, W2 ingest, W3 work queue (saturation), "
    "W3r (5,000 msg/s offered), W4 fan-out, W5 backlog drain",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="where the JSON and markdown results go",
)
@click.option(
    "--auth",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="securebroker with bound JWTs and a 50-rule policy (on), or certificates and one "
    "allow-all rule (off): the two runs give the cost of ACLs",
)
@click.option(
    "--encryption",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="securebroker with payloads sealed at rest under a file keyring (on), or stored in "
    "plaintext (off): the two runs give the cost of encryption",
)
@click.option(
    "--audit",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="securebroker writing its hash-chained audit trail (on) or none (off): the two runs "
    "give the cost of auditing",
)
@click.option(
    "--sb-client",
    type=click.Choice(SB_CLIENTS),
    default="node",
    show_default=True,
    help="securebroker's load generator: the Node driver of the native protocol "
    "(bench/peers/securebroker.mjs, as light as the peers' Node clients) or the Python SDK "
    "driver (more client CPU on the same cores, so lower numbers)",
)
@click.option(
    "--sql-stats",
    is_flag=True,
    help="load pg_stat_statements into securebroker's embedded PostgreSQL (a restart at "
    "startup) and report, per workload, which statements took its execution time",
)
def bench(
    quick: bool,
    targets: str,
    workloads: str,
    out: Path,
    auth: str,
    encryption: str,
    audit: str,
    sb_client: str,
    sql_stats: bool,
) -> None:
    """Run the benchmark workloads against securebroker and its peers on this machine."""
    chosen_targets = [t.strip() for t in targets.split(",") if t.strip()]
    chosen_workloads = [w.strip() for w in workloads.split(",") if w.strip()]
    for t in chosen_targets:
        if t not in TARGETS:
            raise click.BadParameter(f"unknown target {t!r}", param_hint="--targets")
    for w in chosen_workloads:
        if w not in WORKLOADS:
            raise click.BadParameter(f"unknown workload {w!r}", param_hint="--workloads")
    path = run_all(
        quick=quick,
        targets=chosen_targets,
        workloads=chosen_workloads,
        out_dir=out,
        auth=auth,
        encryption=encryption,
        audit=audit,
        sb_client=sb_client,
        sql_stats=sql_stats,
    )
    click.echo(path.with_suffix(".md").read_text())
    click.echo(f"results: {path}")
