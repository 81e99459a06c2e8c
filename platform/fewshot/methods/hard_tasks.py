"""MTL's hard tasks (Sun et al., CVPR 2019): extra tasks from the classes the model fails on.

After each meta-batch every task's failure class, the class with the lowest query
accuracy (`failure_class`), goes into a memory of recent distinct failure classes.
Once it holds n_way of them, an extra meta-batch of `count` tasks follows, each task
n_way of the remembered classes with fresh images (Stream.HARD, keyed by seed, step
and task like every other draw). The memory is the only state, and is checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fewshot.data.episodes import Episode, EpisodeSampler
from fewshot.methods.base import FewShotMethod, Loss
from fewshot.streams import Stream


def failure_class(logits: torch.Tensor, episode: Episode) -> torch.Tensor:
    """The dataset label of the episode's class with the lowest query accuracy."""
    correct = (logits.argmax(1) == episode.query_y).float()
    per_class = torch.zeros(episode.n_way, device=correct.device).index_add(
        0, episode.query_y, correct
    )
    return episode.classes[per_class.argmin()]


class HardTasks:
    """The failure-class memory and the `count` hard tasks of a step drawn from it (a
    task source, train/tasks.py)."""

    def __init__(self, sampler: EpisodeSampler, seed: int, count: int, meta_batch: int) -> None:
        self.sampler, self.seed, self.count = sampler, seed, count
        # Enough classes for one task, and room for one failure per task of a meta-batch.
        self.keep = max(sampler.n_way, meta_batch)
        self.failures: list[int] = []  # recent distinct failure classes, newest first

    def remember(self, failures: list[int]) -> None:
        for label in failures:
            if label in self.failures:
                self.failures.remove(label)
            self.failures.insert(0, label)
        del self.failures[self.keep :]

    def ready(self) -> bool:
        """Whether the memory holds enough classes for a hard task."""
        return len(self.failures) >= self.sampler.n_way

    def loss(
        self,
        method: FewShotMethod,
        step: int,
        task: int,
        to_device: Callable[[Episode], Episode],
    ) -> tuple[Loss, Episode]:
        """A task over n_way of the remembered failure classes, with fresh images."""
        rng = np.random.default_rng([Stream.HARD, self.seed, step, task])
        classes = rng.choice(self.failures, self.sampler.n_way, replace=False)
        episode = self.sampler.episode_of_classes(
            classes.tolist(), Stream.HARD, self.seed, step, task
        )
        episode = to_device(episode)
        return method.loss(episode), episode

    def state_dict(self) -> dict:
        return {"failures": list(self.failures)}

    def load_state_dict(self, state: dict) -> None:
        self.failures = list(state["failures"])
