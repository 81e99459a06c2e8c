"""A run's directory: what a training run, an ensemble, a Tune trial or a search keeps
on disk. One lifecycle writes it (train/runner.py, `Lifecycle`).

DIR/config.yaml       the resolved config; a run started again must have the same
DIR/starts            one line per start of the run (time, process id): a resumed run
                      has more than one
DIR/checkpoint.pt     the last round's state, in-process runs (Ray runs keep theirs
                      in Ray's storage)
DIR/model.pt          the final model file (model_file.py); its presence marks the run
                      finished
DIR/mlflow_run_id     the MLflow run the directory's run logs to, so a continued run
                      logs into the same one
DIR/result.json       a Tune trial's last round of metrics, written last: its presence
                      marks the trial finished, and a restored search reports it again
                      instead of training
"""

from __future__ import annotations

import json
import os
import time
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

    @property
    def starts(self) -> Path:
        return self.path / "starts"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

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

    def record_start(self) -> None:
        with open(self.starts, "a") as starts:
            starts.write(f"{time.time():.3f} pid {os.getpid()}\n")

    def result(self) -> dict[str, float] | None:
        """A finished trial's last round of metrics; None before it finished."""
        return json.loads(self.result_file.read_text()) if self.result_file.is_file() else None

    def write_result(self, metrics: dict[str, float]) -> None:
        # Written whole or not at all: a half-written file would read as a finished trial.
        tmp = self.path / f".{self.result_file.name}.tmp"
        tmp.write_text(json.dumps(metrics))
        os.replace(tmp, self.result_file)

    def start(self, config: Config, restart: bool, root: Path) -> None:
        """Make the directory of a run of `config` (trained, combined or a Tune trial):
        empty it first with `restart` (only inside `root`); refuse a directory that holds
        another config's run or a finished one, or a path through a file."""
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
