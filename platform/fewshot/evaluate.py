"""Fixed test episodes -> mean accuracy and 95% confidence interval.

CI = 1.96 * std / sqrt(n) over per-episode accuracies (population std, as the
few-shot literature reports it). The test episodes of a config depend only on its test
split, evaluation shape and `evaluate.seed`, so every method is scored on the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fewshot.config import Config
from fewshot.data.episodes import Episode, EpisodeSampler
from fewshot.data.reader import load_split, split_census
from fewshot.errors import ConfigError, DataError
from fewshot.methods.base import Predictor
from fewshot.runtime import Runtime, using_threads
from fewshot.streams import Stream


@dataclass
class Accuracy:
    mean: float
    ci95: float
    episodes: int

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.ci95:.2f}% ({self.episodes} episodes)"


def episode_count(requested: int | None, default: int) -> int:
    """How many fixed test episodes to score: `requested` (--episodes), else `default`.
    0 is an error, not "the default", and a negative count would score nothing."""
    if requested is None:
        return default
    if requested < 1:
        raise ConfigError(f"--episodes {requested}: score at least 1 test episode, e.g. 600")
    return requested


def mean_ci(accuracies: Iterable[float]) -> Accuracy:
    values = np.asarray(list(accuracies), dtype=np.float64)
    ci = 1.96 * values.std() / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return Accuracy(float(values.mean()), float(ci), len(values))


def episode_accuracies(
    method: Predictor,
    episodes: Iterable[Episode],
    runtime: Runtime | None = None,
    transductive: bool = False,
) -> list[float]:
    """Per-episode query accuracy; the method is put in eval mode and restored.

    runtime: where and how the episodes are computed (`Runtime.predict`: device,
    precision, memory format), with its threads while they are; CPU fp32 on the
    process's threads when None. transductive: the queries of an episode classified
    together (`predict_transductive`, evaluate.transductive), else each on its own.
    """
    runtime = runtime or Runtime.here()
    was_training = method.training
    method.eval()
    accuracies = []
    try:
        with using_threads(runtime.threads):
            for e in episodes:
                logits = runtime.predict(method, e.support_x, e.support_y, e.query_x, transductive)
                accuracies.append((logits.argmax(1) == e.query_y).float().mean().item())
    finally:
        method.train(was_training)
    return accuracies


def check_test_split(config: Config, split: str | None = None) -> None:
    """Refuse, before anything trains or loads, a test split that cannot give the fixed
    test episodes (missing, too few classes or images, unreadable parts), naming the
    setting to change."""
    split = split or config.data.test_split
    e = config.eval_episode()
    counts, per_group = split_census(config.data.path, split)
    setting = "evaluate.n_way" if config.evaluate.n_way else "episode.n_way"
    within = config.eval_within_group()
    largest = max(per_group.values()) if within else len(counts)
    if largest < e.n_way:
        where = f"its largest group has {largest}" if within else f"it has {largest}"
        raise DataError(
            f"{setting}: {e.n_way} classes per test episode, but split {split!r} of "
            f"{config.data.path} cannot give them ({where}); lower {setting}"
            + (" or set evaluate.within_group=false" if within else "")
        )
    needed = e.k_shot + e.q_query
    if min(counts) < needed:
        raise DataError(
            f"split {split!r} of {config.data.path} has a class of {min(counts)} images, fewer "
            f"than the test episodes' k_shot + q_query = {needed}; lower evaluate.k_shot or "
            "evaluate.q_query"
        )


def evaluate_method(
    method: Predictor, config: Config, episodes: int | None = None, split: str | None = None
) -> Accuracy:
    """Accuracy on the fixed test episodes of `config` (test split, eval shape, eval seed),
    computed where and how the config trains (device, precision, memory format, threads)."""
    check_test_split(config, split)
    runtime = Runtime.of(config.train)
    method.to(runtime.device, memory_format=runtime.memory_format)
    e = config.eval_episode()
    test = load_split(config.data.path, split or config.data.test_split, config.data.image_size)
    sampler = EpisodeSampler(
        test, e.n_way, e.k_shot, e.q_query, within_group=config.eval_within_group()
    )
    count = episode_count(episodes, config.evaluate.episodes)
    fixed = sampler.fixed_episodes(count, config.evaluate.seed, Stream.TEST)
    return mean_ci(episode_accuracies(method, fixed, runtime, config.evaluate.transductive))


def evaluation_row(config: Config, accuracy: Accuracy) -> dict:
    e = config.eval_episode()
    return {
        "method": config.method.name,
        "backbone": config.backbone.name,
        "dataset": str(config.data.path),
        "split": config.data.test_split,
        "task": f"{e.n_way}-way {e.k_shot}-shot",
        "within_group": config.eval_within_group(),
        "transductive": config.evaluate.transductive,
        "episodes": accuracy.episodes,
        "accuracy": round(accuracy.mean, 4),
        "ci95": round(accuracy.ci95, 4),
    }
