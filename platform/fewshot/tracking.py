"""MLflow tracking: one MLflow run per training run.

The tracking URI is `tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite file
in the working directory (`sqlite:///mlflow.db`), so a laptop needs no server.
Every run records its resolved config (params and `config.yaml`), the versions
of the libraries that decide its numbers, the git commit, metrics per step and
the final evaluation table.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fewshot
from fewshot.config import Config, as_dict, config_hash, flatten, resolved_yaml
from fewshot.errors import Interrupted
from fewshot.run_dir import RunDir

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(config_uri: str | None = None) -> str:
    """The URI in force, with a relative SQLite path made absolute: Ray workers and
    servers run in other directories and must find the same database."""
    uri = config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def git_commit() -> str:
    """The commit of the working directory's repository, '+dirty' if it has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import mlflow
    import numpy
    import ray
    import torch

    return {
        "fewshot": fewshot.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
    }


class Tracker:
    """Logs into one MLflow run through the client API (no global "active run"), so the
    driver can own the run while the rank-0 worker of a Ray job logs into it.

    `enabled=False` (other ranks, tracking off) logs nothing.
    """

    def __init__(self, config: Config, enabled: bool = True, run_id: str | None = None) -> None:
        self.config = config
        self.enabled = enabled and config.tracking.enabled
        self.run_id = run_id if self.enabled else None
        self.resumed = False  # whether `start` reopened an existing run
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri(self.config.tracking.uri))
        return self._client

    def start(
        self, resume_run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str | None:
        """Create the run (params, tags, config.yaml), or reopen `resume_run_id`. `tags` are
        added to the new run's own (`mlflow.parentRunId` makes it a nested run)."""
        if not self.enabled:
            return None
        if resume_run_id:
            self.client.update_run(resume_run_id, status="RUNNING")
            self.run_id, self.resumed = resume_run_id, True
            return self.run_id

        name = self.config.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else (self.client.create_experiment(name))
        )
        run_tags = {
            "mlflow.runName": self.config.name,
            "fewshot.method": self.config.method.name,
            "fewshot.backbone": self.config.backbone.name,
            "fewshot.dataset": str(self.config.data.path),
            "fewshot.config_hash": config_hash(self.config),
            "git.commit": git_commit(),
            **{f"version.{k}": v for k, v in versions().items()},
            **(tags or {}),
        }
        self.run_id = self.client.create_run(experiment_id, tags=run_tags).info.run_id
        self.params(flatten(as_dict(self.config)))
        self.text(resolved_yaml(self.config), "config.yaml")
        return self.run_id

    def params(self, values: dict[str, Any]) -> None:
        if self.enabled and self.run_id:
            import mlflow

            batch = [mlflow.entities.Param(k, str(v)[:500]) for k, v in values.items()]
            for start in range(0, len(batch), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def tags(self, values: dict[str, str]) -> None:
        if self.enabled and self.run_id:
            import mlflow

            batch = [mlflow.entities.RunTag(k, str(v)) for k, v in values.items()]
            self.client.log_batch(self.run_id, tags=batch)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled and self.run_id:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in values.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.text(json.dumps(rows, indent=2), f"{name}.json")

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, content: str, artifact_file: str) -> None:
        if self.enabled and self.run_id:
            self.client.log_text(self.run_id, content, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status)


@contextmanager
def tracked_run(
    config: Config, run_dir: RunDir, tags: dict[str, str] | None = None
) -> Iterator[Tracker]:
    """The MLflow part of a run's lifecycle (train/runner.py, `Lifecycle`; a search's
    parent run): reopen the MLflow run that `run_dir` names, or create one and write its
    id there; yield its Tracker; end it FINISHED, KILLED (an `Interrupted` job, to be
    continued) or FAILED, never leaving it RUNNING."""
    tracker = Tracker(config)
    run_dir.record_run_id(tracker.start(run_dir.run_id(), tags=tags))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def download_artifact(run_id: str, path: str, uri: str | None = None) -> Path:
    """Fetch one artifact of a run into a temporary folder."""
    import mlflow

    target = tempfile.mkdtemp(prefix="fewshot-")
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=target, tracking_uri=tracking_uri(uri)
        )
    )
