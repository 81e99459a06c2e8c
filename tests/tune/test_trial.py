"""A Tune trial's run directory goes through the same lifecycle as a training run's:
this needs no Ray, as the refusal comes before any training."""

from __future__ import annotations

import pytest

from fewshot.config import resolved_yaml
from fewshot.errors import CheckpointError
from fewshot.run_dir import RunDir
from fewshot.tune.search import train_trial


def test_a_trial_directory_started_with_another_config_is_refused_in_one_line(workdir, tiny_config):
    config = tiny_config("name=search-t1", "distributed.workers=1")
    run_dir = RunDir(workdir / "runs" / "search" / "search-t1")
    run_dir.path.mkdir(parents=True)
    other = resolved_yaml(config.updated({"train.lr": 0.5}))  # the trial's, other values
    run_dir.config_file.write_text(other)
    with pytest.raises(CheckpointError) as refused:
        train_trial(config, run_dir, {}, callbacks=[])
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{run_dir.path} holds run 'search-t1' with a different config")
    # Refused before its MLflow run or a start was recorded; the other run is kept as is.
    assert not (workdir / "mlflow.db").exists() and not run_dir.starts.exists()
    assert run_dir.config_file.read_text() == other
