"""Cluster jobs through the Ray Jobs API: `fewshot submit` and `fewshot jobs`
(status, logs, stop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fewshot.jobs import COMMANDS

jobs_app = typer.Typer(no_args_is_help=True, help="Follow and control cluster jobs.")

AddressOpt = Annotated[
    str, typer.Option(envvar="RAY_API_SERVER_ADDRESS", help="The Ray dashboard (Jobs API) address.")
]
DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"


# COMMAND's own arguments follow it; submit's options may go before or after it.
SUBMIT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def submit(
    ctx: typer.Context,
    command: Annotated[
        str,
        typer.Argument(
            metavar="COMMAND [ARGS]...",
            help=f"What the job runs ({', '.join(COMMANDS)}), with that command's own "
            "options (paths relative to --working-dir).",
        ),
    ],
    address: AddressOpt = DEFAULT_JOBS_ADDRESS,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow server the job logs to."),
    ] = None,
    working_dir: Annotated[Path, typer.Option(help="Shipped folder the job runs in.")] = Path("."),
    python: Annotated[
        str | None,
        typer.Option(
            help="Python on the cluster (default: this one for a local head, else python)."
        ),
    ] = None,
) -> None:
    """Submit `fewshot COMMAND [ARGS]` as a Ray job running this package's code; prints
    the job id. Its arguments are checked here first (and a train config or tune file
    loaded): a mistake is one line, with nothing submitted."""
    from fewshot import jobs

    command, args = jobs.split_command([command, *ctx.args])
    check_locally(command, parsed(ctx, command, args), working_dir)
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    job_id = jobs.submit(command, args, address, working_dir=working_dir, python=python, env=env)
    print(job_id)
    if follow:
        final = jobs.follow(address, job_id, lambda lines: print(lines, end=""))
        print(f"job {job_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


def parsed(ctx: typer.Context, command: str, args: list[str]) -> dict:
    """`fewshot COMMAND ARGS`'s parameters, parsed as that command parses them (without
    running it): an unknown option, a missing one or a bad value is one line here."""
    from fewshot.errors import FewShotError

    target = ctx.find_root().command
    for word in command.split():
        target = target.commands[word]
    try:
        return target.make_context(f"fewshot {command}", list(args)).params
    except typer.TyperException as exc:  # typer's own click: its usage errors
        raise FewShotError(f"fewshot {command}: {exc.format_message()}") from None


def check_locally(command: str, params: dict, working_dir: Path) -> None:
    """Load what the job would load first, as the job sees it (relative to the working
    dir): a train config, a tune file."""
    overrides = list(params.get("set_") or [])
    if command == "train":
        from fewshot.config import load_config

        load_config(params["config"] and working_dir / params["config"], overrides)
    elif command == "tune" and params["config"]:
        from fewshot.tune.space import read_tune_file

        read_tune_file(working_dir / params["config"], overrides)


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
