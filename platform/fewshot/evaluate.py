"""Fixed test episodes -> mean accuracy and 95% confidence interval.

CI = 1.96 * std / sqrt(n) over per-episode accuracies (population std, as the
few-shot literature reports it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError
from fewshot.methods.base import FewShotMethod


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
    method: FewShotMethod,
    episodes: Iterable[Episode],
    runtime=None,
) -> list[float]:
    """Per-episode query accuracy; the method is put in eval mode and restored.

    runtime: a `fewshot.runtime.Runtime` (device, autocast dtype, memory format); CPU fp32
    when None.
    """
    device = runtime.device if runtime else torch.device("cpu")
    amp = runtime.amp if runtime else None
    memory_format = runtime.memory_format if runtime else torch.contiguous_format
    was_training = method.training
    method.eval()
    accuracies = []
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None),
        ):
            for episode in episodes:
                episode = episode.to(device, memory_format)
                logits = method.predict(episode.support_x, episode.support_y, episode.query_x)
                accuracies.append((logits.argmax(1) == episode.query_y).float().mean().item())
    finally:
        method.train(was_training)
    return accuracies
