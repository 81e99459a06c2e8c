"""The model file and the checkpoints: written here and read here, nowhere else.

    model file (runs/NAME/model.pt, a registered model's artifact, a search's best model)
        {"config": the resolved config as a dict,
         "channels": image channels the backbone takes,
         "state_dict": the method's weights, on the CPU}
      or, for an ensemble (methods/ensemble.py),
        {"config": its run's config (the first member's, renamed, registry settings its own),
         "channels": as above, the same for every member,
         "members": [the members' model files]}

    in-process checkpoint (runs/NAME/checkpoint.pt)
        the training worker's state (`train.loop.Worker.state_dict`)

    Ray Train checkpoint (a directory holding state.pt)
        {"worker": the worker's state, "model": the model file at that step}

A model file holds everything needed to rebuild the method: the config names the method
and backbone, `channels` the input. Every file is written atomically (a temporary name,
then a rename) and read as weights only (`safety.load_weights`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from fewshot.config import Config, as_dict, parse_overrides, validate
from fewshot.errors import CheckpointError
from fewshot.methods import FewShotMethod, build_method
from fewshot.methods.ensemble import Ensemble
from fewshot.run_dir import RunDir
from fewshot.safety import load_weights, unreadable
from fewshot.tracking import download_artifact

RAY_STATE = "state.pt"  # the file inside a Ray Train checkpoint directory
RUN_ARTIFACT = "model/model.pt"  # where a training run logs its model file in MLflow


def contents(config: Config, method: FewShotMethod) -> dict:
    """The model file of `method`, trained under `config`."""
    return {
        "config": as_dict(config),
        "channels": method.shape.channels,
        "state_dict": {k: v.cpu() for k, v in method.state_dict().items()},
    }


def write_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(model: dict, path: Path) -> None:
    write_atomic(model, path)


def ensemble_contents(config: Config, members: list[dict], sources: list[str]) -> dict:
    """The model file of an ensemble of the model files `members` (read from `sources`,
    named in errors), run under `config`. Members must take the same input: what the
    registry packs as preprocessing (dataset, image size, channels) comes from `config`."""
    first = members[0]
    for member, source in zip(members, sources, strict=True):
        if "members" in member:
            raise CheckpointError(
                f"{source}: is an ensemble already; give its members instead of it"
            )
    for member, source in zip(members[1:], sources[1:], strict=True):
        data = config_of(member).data
        for key, value, want in [
            ("channels", member["channels"], first["channels"]),
            ("data.image_size", data.image_size, config.data.image_size),
            ("data.path", str(data.path), str(config.data.path)),
        ]:
            if value != want:
                raise CheckpointError(
                    f"{source}: {key} is {value} but {sources[0]}'s is {want}; an ensemble's "
                    "members must take the same input, so leave this one out"
                )
    return {"config": as_dict(config), "channels": first["channels"], "members": members}


def read(path: str | Path, what: str = "a fewshot model file") -> dict:
    """The model file at `path`, checked to be one: anything else (a text file, a
    truncated copy, a checkpoint, a pickle of other data) is one line naming it."""
    model = load_weights(path, what)
    problem = not_a_model(model)
    if problem:
        raise unreadable(path, what, problem)
    return model


def not_a_model(model: object) -> str | None:
    """What makes `model`, read from a weights file, no model file (None: it is one), so
    that a wrong file is refused where it is read, not by a KeyError further on."""
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        return "weights without a config"
    if "members" in model:
        members = model["members"]
        if not isinstance(members, list) or not members:
            return "an ensemble without members"
        return next(filter(None, map(not_a_model, members)), None)
    if not isinstance(model.get("state_dict"), dict) or not isinstance(model.get("channels"), int):
        return "a config without channels and weights"
    return None


def config_of(model: dict) -> Config:
    return validate(model["config"])


def build(model: dict) -> tuple[Config, FewShotMethod | Ensemble]:
    """The trained method of a model file (an `Ensemble` of the members' for an
    ensemble), and the config it was trained or combined under."""
    config = config_of(model)
    if "members" in model:
        return config, Ensemble([build(member)[1] for member in model["members"]])
    method = build_method(config, model["channels"])
    method.load_state_dict(model["state_dict"])
    return config, method


def load(path: str | Path, what: str = "a fewshot model file") -> tuple[Config, FewShotMethod]:
    return build(read(path, what))


def from_run(source: str | Path, tracking_uri: str | None = None) -> tuple[Config, FewShotMethod]:
    """A trained method from a model file, a run directory, or an MLflow run id."""
    return load(locate(source, tracking_uri))


def predictor(sources: list[str], tracking_uri: str | None = None) -> FewShotMethod | Ensemble:
    """The trained model of one source (`from_run`'s), or the ensemble of several."""
    methods = [from_run(s, tracking_uri)[1] for s in sources]
    return methods[0] if len(methods) == 1 else Ensemble(methods)


def locate(source: str | Path, tracking_uri: str | None = None) -> Path:
    """The model file of a model file, a run directory, or an MLflow run id (fetched)."""
    path = Path(source)
    if path.is_dir():
        path = RunDir(path).model
    if not path.is_file():
        if path.suffix or os.sep in str(source):
            raise CheckpointError(
                f"{source}: no such model file or run directory; pass "
                "runs/NAME, a .pt file or an MLflow run id"
            )
        try:
            path = download_artifact(str(source), RUN_ARTIFACT, tracking_uri)
        except Exception as exc:  # MLflow raises several types for an unknown run id
            raise CheckpointError(
                f"{source}: not a run directory, file or MLflow run id with "
                f"a model ({type(exc).__name__}); check the id"
            ) from None
    return path


def with_settings(config: Config, method: FewShotMethod, overrides: list[str]):
    """`config` with `--set` overrides, and the trained `method` rebuilt under it, so a
    test-time setting of the method (`method.test_views`, MAML's eval steps) applies."""
    if isinstance(method, Ensemble):
        raise CheckpointError(
            f"--set {' '.join(overrides)}: an ensemble takes no settings of its own; set them "
            "on its members' runs and build the ensemble again"
        )
    changed = config.updated(parse_overrides(overrides))
    rebuilt = build_method(changed, method.shape.channels)
    rebuilt.load_state_dict(method.state_dict())
    return changed, rebuilt


def save_checkpoint(worker_state: dict, path: Path) -> None:
    write_atomic(worker_state, path)


def load_checkpoint(path: Path) -> dict:
    return load_weights(path, "a fewshot checkpoint", "use another copy, or --restart")


def save_ray_checkpoint(directory: str | Path, worker_state: dict, model: dict) -> None:
    torch.save({"worker": worker_state, "model": model}, Path(directory) / RAY_STATE)


class RayCheckpoint(NamedTuple):
    worker: dict  # the worker's state
    model: dict  # the model file at that step


def load_ray_checkpoint(directory: str | Path) -> RayCheckpoint:
    """A Ray Train checkpoint: on shared storage anyone with write access could have put it
    there, so it is read as weights only."""
    state = load_weights(Path(directory) / RAY_STATE, "a Ray Train checkpoint of this run")
    return RayCheckpoint(state["worker"], state["model"])
