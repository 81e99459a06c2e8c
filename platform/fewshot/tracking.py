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
from pathlib import Path
from typing import Any

from fewshot.config import Config, as_dict, config_hash, flatten, resolved_yaml

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(config_uri: str | None = None) -> str:
    return config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


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

    import fewshot

    return {
        "fewshot": fewshot.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
    }


class Tracker:
    """Logs one training run. `enabled=False` (other ranks, tracking off) logs nothing."""

    def __init__(self, config: Config, enabled: bool = True) -> None:
        self.config = config
        self.enabled = enabled and config.tracking.enabled
        self.run_id: str | None = None

    def start(self, resume_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(self.config.tracking.uri))
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)
        else:
            mlflow.set_experiment(self.config.tracking.experiment)
            run = mlflow.start_run(run_name=self.config.name)
            params = {k: str(v)[:500] for k, v in flatten(as_dict(self.config)).items()}
            mlflow.log_params(params)
            mlflow.set_tags(
                {
                    "fewshot.method": self.config.method.name,
                    "fewshot.backbone": self.config.backbone.name,
                    "fewshot.dataset": str(self.config.data.path),
                    "fewshot.config_hash": config_hash(self.config),
                    "git.commit": git_commit(),
                    **{f"version.{k}": v for k, v in versions().items()},
                }
            )
            mlflow.log_text(resolved_yaml(self.config), "config.yaml")
        self.run_id = run.info.run_id
        return self.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_text(json.dumps(rows, indent=2), f"{name}.json")

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def text(self, content: str, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_text(content, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)


def download_artifact(run_id: str, path: str, uri: str | None = None) -> Path:
    """Fetch one artifact of a run into a temporary folder."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    target = tempfile.mkdtemp(prefix="fewshot-")
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=target)
    )
