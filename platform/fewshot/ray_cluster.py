"""Joining Ray: one rule for training, searches and serving."""

from __future__ import annotations

import os
from pathlib import Path

import fewshot


def connect(address: str | None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray on this machine,
    with its dashboard on 127.0.0.1 if `dashboard`: Ray Tune over Ray Train needs it
    (the State API behind it is how Train removes the placement group of a run whose
    driver was stopped, as a trial stopped by the scheduler is; without it the run's
    CPUs stay reserved and later trials wait forever)."""
    import ray  # start-up time: most commands never touch Ray

    if ray.is_initialized():
        return
    # Workers and replicas import exactly the driver's code (a submitted job's copy, not
    # whatever version a node has installed).
    code = {"py_modules": [str(Path(fewshot.__file__).parent)]}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=code)
    elif dashboard:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=code)
    else:
        ray.init(include_dashboard=False, runtime_env=code)
