"""What `fewshot train` does end to end: train and test (train/), then, when the config
asks, register the model (registry/). Training knows nothing of the registry; this is
the one place that puts the two in order."""

from __future__ import annotations

from fewshot.config import Config
from fewshot.errors import ConfigError
from fewshot.registry.versions import register
from fewshot.train import runner
from fewshot.train.runner import RunResult


def train(config: Config, *, restart: bool = False, progress: bool = False) -> RunResult:
    """`runner.train`; with `registry.register`, the model is then registered as a new
    version of `registry.name` (default: the run's name), alias `challenger`."""
    check_registrable(config)
    result = runner.train(config, restart=restart, progress=progress)
    registered(result)
    return result


def ensemble(sources: list[str], overrides: list[str], *, restart: bool = False) -> RunResult:
    """`runner.combine` (the trained models at `sources` as one model, tested); registered
    like a trained run's when `overrides` ask (`registry.register=true`): a member's own
    registration settings are not the ensemble's (`runner.ensemble_model`)."""
    config, model = runner.ensemble_model(sources, overrides)
    check_registrable(config)
    result = runner.combine(config, model, sources, restart=restart)
    registered(result)
    return result


def check_registrable(config: Config) -> None:
    """Refuse, before anything is written, a run that asks to be registered but would
    have no MLflow run to register."""
    if config.registry.register and not config.tracking.enabled:
        raise ConfigError(
            "registry.register: needs tracking.enabled=true (the registry is MLflow); "
            "set tracking.enabled=true or registry.register=false"
        )


def registered(result: RunResult) -> None:
    """With `registry.register`, the run's model as a new version of `registry.name`
    (default: the run's name), alias `challenger`."""
    config = result.config
    if config.registry.register:
        register(result.run_id, config.registry.name or config.name, uri=config.tracking.uri)
