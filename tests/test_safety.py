"""Nothing outside a run is deleted, and no loader runs code from a `.pt` file."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.pyfunc import PythonModelContext

from fewshot.config import resolved_yaml
from fewshot.errors import CheckpointError
from fewshot.safety import remove_inside

FEWSHOT = [sys.executable, "-m", "fewshot.cli"]


def fewshot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FEWSHOT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


class Payload:
    """Unpickled with weights_only=False, this creates `marker`: the stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.fixture
def evil(tmp_path):
    """(path of a .pt whose pickle would create a file, that file)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": Payload(marker), "model": {}}, path)
    return path, marker


def canaries(root: Path) -> list[Path]:
    files = [root / "data" / "store" / "keep", root / "mlflow.db", root / "runs" / "other" / "keep"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("canary")
    return files


@pytest.mark.parametrize("name", ["..", "."])
def test_restart_with_a_dot_name_deletes_nothing(tmp_path, name):
    files = canaries(tmp_path)
    result = fewshot("train", "--restart", "--set", f"name={name}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: name: use 1 to 100 letters"), result.stderr
    assert f"(got '{name}')" in result.stderr and result.stderr.count("\n") == 1
    assert all(file.read_text() == "canary" for file in files)


def test_only_a_directory_strictly_inside_the_root_is_deleted(tmp_path):
    files = canaries(tmp_path)
    runs = tmp_path / "runs"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("canary")
    (runs / "link").symlink_to(outside)
    for path in (runs / "..", runs / ".", runs, runs / "link", runs / "other" / ".." / ".."):
        with pytest.raises(CheckpointError, match="refusing to delete"):
            remove_inside(path, runs)
    assert all(file.read_text() == "canary" for file in files)
    assert (outside / "keep").is_file()
    remove_inside(runs / "other", runs)
    assert not (runs / "other").exists() and (tmp_path / "mlflow.db").is_file()


def test_restart_checks_data_before_deleting_the_previous_run(workdir, tiny_config):
    good = tiny_config("name=keep", "train.steps=2", "train.eval_every=2", "tracking.enabled=false")
    run_dir = good.train.output_dir / "keep"
    run_dir.mkdir(parents=True)
    (run_dir / "model.pt").write_text("the previous run's model")
    from fewshot.errors import DataError
    from fewshot.train.runner import train

    missing = tiny_config("name=keep", "data.path=nowhere", "tracking.enabled=false")
    with pytest.raises(DataError, match="dataset nowhere: it does not exist"):
        train(missing, restart=True)
    assert (run_dir / "model.pt").read_text() == "the previous run's model"


# Every loader of weights refuses the file, and the file its pickle would create is not there.


def test_evaluate_refuses_a_pickle_that_runs_code(evil):
    path, marker = evil
    result = fewshot("evaluate", "--run", str(path), cwd=path.parent)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}: refused, it holds code"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_that_runs_code(workdir, tiny_config, evil):
    from fewshot.train.runner import train

    path, marker = evil
    config = tiny_config("name=resume", "train.steps=2", "tracking.enabled=false")
    run_dir = config.train.output_dir / "resume"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(resolved_yaml(config))
    os.replace(path, run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt: refused, it holds code"):
        train(config)
    assert not marker.exists()
    assert (run_dir / "checkpoint.pt").is_file()  # a refused resume keeps the run


def test_register_refuses_a_logged_model_that_runs_code(workdir, evil):
    from fewshot.registry.versions import current, register

    path, marker = evil
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    model = path.with_name("model.pt")
    os.replace(path, model)
    with current(uri), mlflow.start_run() as run:  # finished, as a training run logs its model
        mlflow.log_metric("test_acc", 0.9)
        mlflow.log_artifact(str(model), "model")
    with pytest.raises(CheckpointError, match="model.pt: refused, it holds code"):
        register(run.info.run_id, "evil", uri=uri)
    assert not marker.exists()


def test_the_pyfunc_refuses_an_artifact_that_runs_code(evil):
    from fewshot.registry.pyfunc import FewShotModel

    path, marker = evil
    with pytest.raises(CheckpointError, match="refused, it holds code"):
        FewShotModel().load_context(PythonModelContext({"model": str(path)}, {}))
    assert not marker.exists()


def test_ray_and_tune_checkpoints_that_run_code_are_refused(tmp_path, evil):
    from fewshot.model_file import RAY_STATE, load_ray_checkpoint
    from fewshot.tune.search import best_model, checkpoint_model

    path, marker = evil
    checkpoint = tmp_path / "checkpoint_000001"
    checkpoint.mkdir()
    (checkpoint / RAY_STATE).write_bytes(path.read_bytes())
    trial = tmp_path / "search" / "s-1"
    trial.mkdir(parents=True)
    (trial / "model.pt").write_bytes(path.read_bytes())
    loaders = [
        lambda: load_ray_checkpoint(checkpoint),  # Ray Train resume and the driver's final model
        lambda: checkpoint_model(str(checkpoint)),  # Tune: a trial stopped early
        lambda: best_model({"trial": "s-1", "checkpoint_path": None}, tmp_path / "search"),
    ]
    for load in loaders:
        with pytest.raises(CheckpointError, match="refused, it holds code"):
            load()
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"garbage" * 10])
def test_an_empty_truncated_or_garbage_file_is_one_line(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    result = fewshot("evaluate", "--run", "bad.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: bad.pt: not a readable weights file"), result.stderr
    assert result.stderr.count("\n") == 1 and "Aborted" not in result.stderr
