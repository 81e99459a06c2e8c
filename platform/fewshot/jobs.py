"""Cluster jobs through Ray's Jobs API (`fewshot submit`, `fewshot jobs ...`).

A job runs `python -m fewshot.cli COMMAND ARGS` on the cluster, in a copy of the
working directory (runtime_env `working_dir`: configs and relative paths as here),
with the imported `fewshot` package shipped as the job's `py_modules`: the job's driver
imports the submitted code ahead of whatever version a node has installed, wherever
the package lives here (a checkout or an install). That is the rule
`ray_cluster.connect` applies to the workers a driver starts, and inside the job it
names the same package again (the job's copy). Ray refuses a field that a job and its
driver both set unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1 lets the driver's win, so the
job sets it. (PYTHONPATH into the shipped working directory would work too, but only
for a working directory that holds the package.)

What is uploaded follows the working directory's .gitignore (Ray reads it), so local
datasets, runs and the MLflow database stay behind; an `excludes` list here would also
apply to the shipped package and drop parts of it.

The scripts in the repository's jobs/ run the same commands for `ray job submit --
python jobs/X.py`; `fewshot submit` does not need them.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import fewshot
from fewshot.errors import FewShotError

# The `fewshot` commands a job can run; jobs/ has a script for each (`bench methods`:
# jobs/bench_methods.py) for `ray job submit` itself.
COMMANDS = ("train", "tune", "evaluate", "promote", "omniglot", "bench methods")


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FewShotError(
            f"no Ray Jobs server at {address} ({type(exc).__name__}); start one with "
            "`ray start --head` or pass the dashboard address, e.g. http://127.0.0.1:8265"
        ) from None


def default_python(address: str) -> str:
    """This interpreter for a head on this machine (the project's venv), else `python`
    as the cluster's setup commands installed it."""
    host = urlparse(address).hostname or ""
    return sys.executable if host in ("127.0.0.1", "localhost", "::1") else "python"


def split_command(words: list[str]) -> tuple[str, list[str]]:
    """`["bench", "methods", "--only", "x"]` -> `("bench methods", ["--only", "x"])`: the
    job command the words start with, and its arguments."""
    for command in COMMANDS:
        size = len(command.split())
        if words[:size] == command.split():
            return command, words[size:]
    raise unknown_command(words[0] if words else "")


def unknown_command(given: str) -> FewShotError:
    hint = f"; a config goes after the command: train --config {given}"
    return FewShotError(
        f"no job runs {given!r}; submit one of: {', '.join(COMMANDS)}"
        + (hint if given.endswith((".yaml", ".yml")) else "")
    )


def submit(
    command: str,
    args: list[str],
    address: str,
    *,
    working_dir: Path = Path("."),
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Submit `fewshot COMMAND ARGS` (a command of COMMANDS) as a job; returns its id."""
    if command not in COMMANDS:
        raise unknown_command(command)
    if not Path(working_dir).is_dir():
        raise FewShotError(f"--working-dir {working_dir} is not a directory; pass the one to ship")
    python = python or default_python(address)
    entrypoint = shlex.join([python, "-m", "fewshot.cli", *command.split(), *args])
    runtime_env = {
        "working_dir": str(working_dir),
        "py_modules": [str(Path(fewshot.__file__).parent)],
        "env_vars": {**(env or {}), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"},
    }
    return client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id))


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def follow(address: str, job_id: str, write: Callable[[str], None]) -> str:
    """Stream a job's log lines to `write` until it ends; returns its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in client(address).tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    return status(address, job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
