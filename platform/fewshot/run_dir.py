"""A run's directory: what a training run, a Tune trial or a search keeps on disk.

DIR/config.yaml       the resolved config
DIR/checkpoint.pt     the last round's state, in-process runs (Ray runs keep theirs
                      in Ray's storage)
DIR/model.pt          the final model file (model_file.py); its presence marks the run
                      finished
DIR/mlflow_run_id     the MLflow run the directory's run logs to, so a continued run
                      logs into the same one
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.config import Config, read_yaml, resolved_yaml
from fewshot.errors import CheckpointError, ConfigError
from fewshot.safety import remove_inside


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, config: Config) -> RunDir:
        """The directory of a training run: train.output_dir/NAME."""
        return cls(config.train.output_dir / config.name)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def run_id_file(self) -> Path:
        return self.path / "mlflow_run_id"

    def finished(self) -> bool:
        return self.model.is_file()

    def saved_config(self) -> dict[str, Any] | None:
        """The config the run started with, as written; None before it started."""
        return read_yaml(self.config_file) if self.config_file.is_file() else None

    def run_id(self) -> str | None:
        """The MLflow run to continue, if the directory has one."""
        return self.run_id_file.read_text().strip() if self.run_id_file.is_file() else None

    def record_run_id(self, run_id: str | None) -> None:
        if run_id:
            self.path.mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(run_id)

    def start(self, config: Config, restart: bool, root: Path) -> None:
        """Make the directory of a training run of `config`: empty it first with `restart`
        (only inside `root`); refuse a directory that holds another config's run or a
        finished one, or a path through a file."""
        # Checked before anything is deleted or written: mkdir would fail with a traceback.
        blocking = [p for p in (*reversed(self.path.parents), self.path) if p.is_file()]
        if blocking:
            raise ConfigError(
                f"train.output_dir: {blocking[0]} is a file, not a directory; set "
                f"train.output_dir to a directory (this run goes to {self.path})"
            )
        if restart:
            remove_inside(self.path, root)
        if self.config_file.is_file() and self.config_file.read_text() != resolved_yaml(config):
            raise CheckpointError(
                f"{self.path} holds run {config.name!r} with a different config; choose another "
                "name (--set name=...) or pass --restart to discard it"
            )
        if self.finished():
            raise CheckpointError(
                f"run {config.name!r} already finished in {self.path}; choose another "
                "name or pass --restart"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(resolved_yaml(config))
