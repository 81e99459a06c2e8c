"""Nothing outside a run is deleted, and no loader runs code from a `.pt` file."""

from __future__ import annotations

import builtins
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.pyfunc import PythonModelContext

from fewshot.config import resolved_yaml
from fewshot.errors import CheckpointError
from fewshot.safety import remove_inside

FEWSHOT = [sys.executable, "-m", "fewshot.cli"]


def fewshot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FEWSHOT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


class Payload:
    """Unpickled with weights_only=False, this calls `code(*args)`: the stand-in for any code."""

    def __init__(self, code, *args) -> None:
        self.code, self.args = code, args

    def __reduce__(self):
        return self.code, self.args


class Evil(NamedTuple):
    path: Path  # a .pt whose pickle would create `marker`
    marker: Path
    refusal: str  # the start of the one line that refuses it, naming the global it asks for


# torch words the two refusals differently: "Unsupported global: GLOBAL io.open was not an
# allowed global" (builtins.open is io.open), and "unsupported GLOBAL posix.system whose
# module posix is blocked" (os.system is posix.system, nt.system on Windows).
PAYLOADS = {
    "open": lambda marker: (Payload(builtins.open, str(marker), "w"), "io.open"),
    "system": lambda marker: (
        Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        f"{os.system.__module__}.system",
    ),
}


@pytest.fixture(params=PAYLOADS)
def evil(tmp_path, request) -> Evil:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload, name = PAYLOADS[request.param](marker)
    torch.save({"config": {}, "state_dict": payload, "model": {}}, path)
    return Evil(path, marker, f"refused, it asks to run code that is not allowed ({name}); ")


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


@pytest.mark.parametrize(
    "command", [["evaluate", "--run", "evil.pt"], ["ensemble", "evil.pt", "evil.pt", "--name", "e"]]
)
def test_evaluate_and_ensemble_refuse_a_pickle_that_runs_code_naming_it(evil, command):
    result = fewshot(*command, cwd=evil.path.parent)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: evil.pt: {evil.refusal}"), result.stderr
    assert result.stderr.count("\n") == 1
    # Nothing ran and nothing was written: no run directory, no MLflow store.
    assert sorted(os.listdir(evil.path.parent)) == ["evil.pt"]


def test_resume_refuses_a_checkpoint_that_runs_code(workdir, tiny_config, evil):
    from fewshot.train.runner import train

    config = tiny_config("name=resume", "train.steps=2", "tracking.enabled=false")
    run_dir = config.train.output_dir / "resume"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(resolved_yaml(config))
    os.replace(evil.path, run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint.pt: {re.escape(evil.refusal)}"):
        train(config)
    assert not evil.marker.exists()
    assert (run_dir / "checkpoint.pt").is_file()  # a refused resume keeps the run


def test_register_refuses_a_logged_model_that_runs_code(workdir, evil):
    from fewshot.registry.versions import current, register

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    model = evil.path.with_name("model.pt")
    os.replace(evil.path, model)
    with current(uri), mlflow.start_run() as run:  # finished, as a training run logs its model
        mlflow.log_metric("test_acc", 0.9)
        mlflow.log_artifact(str(model), "model")
    with pytest.raises(CheckpointError, match=f"model.pt: {re.escape(evil.refusal)}"):
        register(run.info.run_id, "evil", uri=uri)
    assert not evil.marker.exists()
    assert MlflowClient(uri).search_registered_models() == []


def test_the_pyfunc_refuses_an_artifact_that_runs_code(evil):
    from fewshot.registry.pyfunc import FewShotModel

    with pytest.raises(CheckpointError, match=f"evil.pt: {re.escape(evil.refusal)}"):
        FewShotModel().load_context(PythonModelContext({"model": str(evil.path)}, {}))
    assert not evil.marker.exists()


def test_ray_and_tune_checkpoints_that_run_code_are_refused(tmp_path, evil):
    from fewshot.model_file import RAY_STATE, load_ray_checkpoint
    from fewshot.tune.search import best_model, checkpoint_model

    checkpoint = tmp_path / "checkpoint_000001"
    checkpoint.mkdir()
    (checkpoint / RAY_STATE).write_bytes(evil.path.read_bytes())
    trial = tmp_path / "search" / "s-1"
    trial.mkdir(parents=True)
    (trial / "model.pt").write_bytes(evil.path.read_bytes())
    loaders = [
        lambda: load_ray_checkpoint(checkpoint),  # Ray Train resume and the driver's final model
        lambda: checkpoint_model(str(checkpoint)),  # Tune: a trial stopped early
        lambda: best_model({"trial": "s-1", "checkpoint_path": None}, tmp_path / "search"),
    ]
    for load in loaders:
        with pytest.raises(CheckpointError, match=re.escape(evil.refusal)):
            load()
    assert not evil.marker.exists()


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


NOT_A_MODEL = {
    "empty": b"",
    "truncated": b"PK\x03\x04 truncated",
    "garbage": b"garbage" * 10,
    "text": b"hello world\nthis is text\n",  # torch.load: KeyError
    "text-c": b"config: 1\n",  # "c" is pickle's GLOBAL: torch reports a global "onfig: 1."
    "other-weights": saved([torch.zeros(2)]),
    "checkpoint": saved({"step": 3, "optimizer": {}}),
}
NOT_A_MODEL_LINE = (
    "error: bad.pt: not a fewshot model file, it is truncated, corrupt or of another kind ("
)


@pytest.mark.parametrize("content", NOT_A_MODEL.values(), ids=NOT_A_MODEL)
def test_a_file_that_is_not_a_model_file_is_one_line_and_nothing_is_written(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    result = fewshot("evaluate", "--run", "bad.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(NOT_A_MODEL_LINE), result.stderr
    assert result.stderr.count("\n") == 1 and "Aborted" not in result.stderr
    assert os.listdir(tmp_path) == ["bad.pt"]


def test_an_ensemble_member_that_is_a_text_file_is_one_line_and_nothing_is_written(tmp_path):
    (tmp_path / "bad.pt").write_text("hello world\nthis is text\n")
    result = fewshot("ensemble", "bad.pt", "bad.pt", "--name", "e", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(NOT_A_MODEL_LINE), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["bad.pt"]
