"""Registered model versions: registration from a training run, aliases, listing, and
loading a model by URI against the right tracking store.

Aliases, not the deprecated stages: `challenger` marks the latest registered
candidate, `champion` the version that is served (`models:/NAME@champion`).
Registration tags every version with what produced it:

    fewshot.method, fewshot.backbone, fewshot.dataset, fewshot.config_hash, git.commit
    fewshot.test_acc, fewshot.test_ci95, fewshot.test_task   (the run's own evaluation)

The promotion gate adds its `gate.*` tags (see `gate.py`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fewshot import model_file
from fewshot.config import NAME_RULE, RUN_NAME, Config
from fewshot.errors import RegistryError
from fewshot.registry.preprocess import Preprocessing
from fewshot.registry.pyfunc import FewShotModel, load_model, log_model
from fewshot.tracking import tracking_uri

CHALLENGER, CHAMPION = "challenger", "champion"
# Copied from the training run's tags onto the version.
RUN_TAGS = (
    "fewshot.method",
    "fewshot.backbone",
    "fewshot.dataset",
    "fewshot.config_hash",
    "git.commit",
)


def connect(uri: str | None = None) -> MlflowClient:
    """A client for the existing tracking store at `uri` (else $MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db)."""
    resolved = tracking_uri(uri)
    database = resolved.removeprefix("sqlite:///")
    if database != resolved and not Path(database).is_file():
        # MLflow would create an empty database here and then find nothing in it.
        raise RegistryError(
            f"no MLflow database at {database}; run where you trained, or set "
            "MLFLOW_TRACKING_URI to the tracking store"
        )
    return MlflowClient(resolved)


@contextmanager
def current(uri: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking URI is `uri` inside the block, and what it was after.
    Logging models and resolving `models:/` and `runs:/` URIs read that setting; setting it
    also exports $MLFLOW_TRACKING_URI, so left set it would send this process's later runs,
    and its child processes, to the registry's store."""
    # MLflow's own scoped setter: the public one has no way back to "not set".
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    exported = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(tracking_uri(uri)):
            yield
    finally:
        if exported is not None:  # leaving, MLflow unsets it when nothing was set before
            os.environ["MLFLOW_TRACKING_URI"] = exported


def load(model_uri: str, uri: str | None = None) -> FewShotModel:
    """A fewshot model by any MLflow model URI (`models:/NAME@champion`, `runs:/ID/fewshot`,
    a folder), resolved against the tracking store at `uri`."""
    with current(uri):
        return load_model(model_uri)


def check_name(name: str) -> None:
    """The run-name rule (config.RUN_NAME), the one `registry.name` is validated with: the
    name goes into `models:/NAME@alias` URIs and filters, and MLflow refuses `.` and `..`."""
    if not RUN_NAME.fullmatch(name):
        raise RegistryError(f"model name {name!r}: {NAME_RULE}")


def register(
    run_id: str, name: str, *, data: Path | None = None, uri: str | None = None
) -> ModelVersion:
    """Log training run `run_id`'s model as a pyfunc (weights plus the preprocessing of its
    dataset, found at `data` or its config's data.path), register it as a new version of
    `name`, tag it and point the alias `challenger` at it."""
    check_name(name)
    client = connect(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(
            f"run {run_id}: no such MLflow run in {tracking_uri(uri)}; check the id"
        ) from None
    if run.info.status != "FINISHED" or "test_acc" not in run.data.metrics:
        raise RegistryError(
            f"run {run_id} is {run.info.status} without a test_acc; "
            "register a finished training run"
        )
    with current(uri), tempfile.TemporaryDirectory(prefix="fewshot-") as scratch:
        path = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=model_file.RUN_ARTIFACT, dst_path=scratch
            )
        )
        config = model_file.config_of(model_file.read(path))
        preprocessing = Preprocessing.of_dataset(data or config.data.path, config.data.image_size)
        model_uri = log_model(run_id, path, config, preprocessing)
        version = mlflow.register_model(model_uri, name, tags=_tags(run, config))
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def _tags(run, config: Config) -> dict[str, str]:
    """What produced a version: the run's tags and its own test evaluation."""
    metrics = run.data.metrics
    e = config.eval_episode()
    return {
        **{key: run.data.tags.get(key, "unknown") for key in RUN_TAGS},
        "fewshot.test_acc": f"{metrics['test_acc']:.4f}",
        "fewshot.test_ci95": f"{metrics.get('test_ci95', float('nan')):.4f}",
        "fewshot.test_task": (
            f"{e.n_way}-way {e.k_shot}-shot, split {config.data.test_split}, "
            f"{config.evaluate.episodes} episodes"
        ),
    }


def require_model(client: MlflowClient, name: str) -> None:
    check_name(name)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(
            f"registered model {name!r} does not exist; create it with "
            f"`fewshot register --run RUN_ID --name {name}`"
        ) from None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` points to, None if it points nowhere."""
    try:
        # str: this call gives an int where every other registry call gives a str.
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def require_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(
            f"{name} has no version {version!r}; see `fewshot models list {name}`"
        ) from None


def versions(name: str, uri: str | None = None) -> list[ModelVersion]:
    """Every version of `name`, newest first, with aliases and tags."""
    client = connect(uri)
    require_model(client, name)
    found = client.search_model_versions(f"name = '{name}'")
    # search results may lack aliases; get_model_version has them.
    return sorted(
        (client.get_model_version(name, v.version) for v in found),
        key=lambda v: int(v.version),
        reverse=True,
    )
