"""Registration: from a run by hand or at the end of training; aliases, tags, refusals."""

from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient

from fewshot.config import load_config
from fewshot.errors import ConfigError, RegistryError
from fewshot.pipeline import train
from fewshot.registry.versions import current, register, versions
from fewshot.tracking import tracking_uri


def test_training_registers_its_model_when_asked(workdir, synthetic_store, tiny):
    config = load_config(
        None,
        [f"data.path={synthetic_store}", *tiny, "name=auto", "registry.register=true"],
    )
    result = train(config)
    client = MlflowClient(tracking_uri())  # absolute: MLflow caches stores by URI string
    version = client.get_model_version_by_alias("auto", "challenger")
    assert str(version.version) == "1" and version.run_id == result.run_id
    run = client.get_run(result.run_id)
    assert version.tags["fewshot.config_hash"] == run.data.tags["fewshot.config_hash"]
    assert version.tags["fewshot.method"] == "protonet"
    assert version.tags["fewshot.test_acc"] == f"{result.test.mean:.4f}"
    assert version.tags["fewshot.test_task"] == "5-way 1-shot, split test, 20 episodes"
    # A second registration is a new version; the alias follows it.
    register(result.run_id, "auto", data=synthetic_store)
    assert [str(v.version) for v in versions("auto")] == ["2", "1"]
    assert versions("auto")[0].aliases == ["challenger"]
    # Registering leaves MLflow's process-wide URI and the environment as it found them.
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_current_tracking_uri_is_scoped_and_keeps_the_users_variable(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'users.db'}")
    with current(f"sqlite:///{tmp_path / 'registry.db'}"):
        assert mlflow.get_tracking_uri().endswith("registry.db")
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("users.db")
    assert mlflow.get_tracking_uri().endswith("users.db")


def test_registering_without_tracking_is_refused_before_training(workdir, synthetic_store, tiny):
    config = load_config(
        None,
        [f"data.path={synthetic_store}", *tiny, "registry.register=true", "tracking.enabled=false"],
    )
    with pytest.raises(ConfigError, match="registry.register: needs tracking.enabled=true"):
        train(config)
    assert not (workdir / "runs").exists()


def test_registry_name_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="registry.name: use 1 to 100 letters"):
        load_config(None, ["registry.name=a/b"])


def test_unknown_and_unfinished_runs_and_missing_data_are_refused(tiny_runs, tmp_path):
    uri = tiny_runs.uri
    with pytest.raises(RegistryError, match="run nope: no such MLflow run"):
        register("nope", "refusals", uri=uri)
    client = MlflowClient(uri)
    running = client.create_run(client.get_experiment_by_name("fewshot").experiment_id)
    with pytest.raises(RegistryError, match="is RUNNING without a test_acc"):
        register(running.info.run_id, "refusals", uri=uri)
    with pytest.raises(RegistryError, match=r"dataset .*moved is not here; pass --data DIR"):
        register(tiny_runs.ids["tiny"], "refusals", data=tmp_path / "moved", uri=uri)
    with pytest.raises(RegistryError, match="model name 'a b': use 1 to 100 letters"):
        register(tiny_runs.ids["tiny"], "a b", uri=uri)
    with pytest.raises(RegistryError, match="registered model 'refusals' does not exist"):
        versions("refusals", uri=uri)
