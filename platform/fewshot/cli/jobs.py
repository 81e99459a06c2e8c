"""Cluster jobs through the Ray Jobs API: `fewshot submit` and `fewshot jobs`
(status, logs, stop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fewshot.cli.common import SetOpt

jobs_app = typer.Typer(no_args_is_help=True, help="Follow and control cluster jobs.")

AddressOpt = Annotated[
    str, typer.Option(envvar="RAY_API_SERVER_ADDRESS", help="The Ray dashboard (Jobs API) address.")
]
DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"


def submit(
    config: Annotated[Path, typer.Argument(help="YAML config, relative to the working dir.")],
    address: AddressOpt = DEFAULT_JOBS_ADDRESS,
    set_: SetOpt = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow server the job logs to."),
    ] = None,
    working_dir: Annotated[Path, typer.Option(help="Repository root to ship.")] = Path("."),
    python: Annotated[
        str | None,
        typer.Option(
            help="Python on the cluster (default: this one for a local head, else python)."
        ),
    ] = None,
) -> None:
    """Submit `fewshot train --config CONFIG` as a Ray job; prints the job id."""
    from fewshot import jobs
    from fewshot.config import load_config

    load_config(working_dir / config, set_)  # refuse a bad config before it travels
    args = ["--config", str(config), *[a for item in set_ or [] for a in ("--set", item)]]
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    job_id = jobs.submit("train", args, address, working_dir=working_dir, python=python, env=env)
    print(job_id)
    if follow:
        final = jobs.follow(address, job_id, lambda lines: print(lines, end=""))
        print(f"job {job_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOpt = DEFAULT_JOBS_ADDRESS) -> None:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from fewshot import jobs

    print(jobs.status(address, job_id))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: AddressOpt = DEFAULT_JOBS_ADDRESS,
    follow: Annotated[bool, typer.Option(help="Keep streaming until the job ends.")] = False,
) -> None:
    """Print a job's logs."""
    from fewshot import jobs

    if follow:
        print(f"job {job_id}: {jobs.follow(address, job_id, lambda s: print(s, end=''))}")
    else:
        print(jobs.logs(address, job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOpt = DEFAULT_JOBS_ADDRESS) -> None:
    """Stop a running job."""
    from fewshot import jobs

    print("stopped" if jobs.stop(address, job_id) else "was not running")
