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
    if config.registry.register and not config.tracking.enabled:
        raise ConfigError("registry.register: needs tracking.enabled=true (the registry is MLflow)")
    result = runner.train(config, restart=restart, progress=progress)
    registered(result)
    return result


def ensemble(sources: list[str], overrides: list[str], *, restart: bool = False) -> RunResult:
    """`runner.combine` (the trained models at `sources` as one model, tested); registered
    like a trained run's when its config (the first member's with `overrides`) asks."""
    result = runner.combine(sources, overrides, restart=restart)
    registered(result)
    return result


def registered(result: RunResult) -> None:
    """With `registry.register`, the run's model as a new version of `registry.name`
    (default: the run's name), alias `challenger`."""
    config = result.config
    if config.registry.register:
        register(result.run_id, config.registry.name or config.name, uri=config.tracking.uri)
