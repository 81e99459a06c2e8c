"""What `fewshot train` and `fewshot ensemble` do end to end: a run (train/runner.py's
`Lifecycle`: trained or combined, tested, saved), then, when the config asks, its model
registered (registry/). Training knows nothing of the registry; this is the one place
that gives the lifecycle its registration."""

from __future__ import annotations

from fewshot.config import Config
from fewshot.registry.versions import connect, register
from fewshot.train import runner
from fewshot.train.runner import RunResult


def train(config: Config, *, restart: bool = False, progress: bool = False) -> RunResult:
    """`runner.train`; with `registry.register`, the model is then registered as a new
    version of `registry.name` (default: the run's name), alias `challenger`."""
    return runner.train(config, restart=restart, progress=progress, register=registered)


def ensemble(sources: list[str], overrides: list[str], *, restart: bool = False) -> RunResult:
    """`runner.combine` (the trained models at `sources` as one model, tested); registered
    like a trained run's when `overrides` ask (`registry.register=true`): a member's own
    registration settings are not the ensemble's (`runner.ensemble_model`)."""
    config, model = runner.ensemble_model(sources, overrides)
    return runner.combine(config, model, sources, restart=restart, register=registered)


def registered(run_id: str, config: Config) -> str:
    """The version of `registry.name` (default: the run's name) that holds MLflow run
    `run_id`'s model: registered now (alias `challenger`) unless it was before, so a
    command stopped between a run's end and its registration registers it once when
    run again."""
    name = config.registry.name or config.name
    client = connect(config.tracking.uri)
    mine = [
        str(v.version) for v in client.search_model_versions(f"name='{name}'") if v.run_id == run_id
    ]
    if mine:
        return max(mine, key=int)
    return str(register(run_id, name, uri=config.tracking.uri).version)
