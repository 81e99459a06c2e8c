"""Cluster jobs through Ray's Jobs API (`fewshot submit`, `fewshot jobs ...`).

A job runs `jobs/<command>.py` on the cluster with this repository as its working
directory; the entrypoint puts the shipped `platform/` first on sys.path and the
training driver ships that package to its Ray workers, so the job and its workers
run the submitted code. What is uploaded follows the repository's .gitignore (Ray
reads it), so local datasets, runs and the MLflow database stay behind; an
`excludes` list here would also apply to the shipped package and drop parts of it.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from fewshot.errors import FewShotError


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


def submit(
    command: str,
    args: list[str],
    address: str,
    *,
    working_dir: Path = Path("."),
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    entry = Path(working_dir) / "jobs" / f"{command}.py"
    if not entry.is_file():
        raise FewShotError(f"{entry} not found; run from the repository root or pass --working-dir")
    entrypoint = " ".join(
        [
            shlex.quote(python or default_python(address)),
            f"jobs/{command}.py",
            *map(shlex.quote, args),
        ]
    )
    runtime_env = {
        "working_dir": str(working_dir),
        "env_vars": env or {},
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
