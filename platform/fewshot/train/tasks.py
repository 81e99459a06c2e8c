"""Where a training step's tasks come from.

An optimiser step takes `count` tasks and asks a task source for each one's loss: the
loop does not know whether a task is a plain episode (`Episodes`), a mixed one (task
mixup, augment/task_mixup.py) or one built from remembered failure classes (MTL's hard
tasks, methods/hard_tasks.py). A source keys everything it draws by (seed, step, task),
so a task is the same on whichever worker computes it, and keeps any state it needs
across steps itself (with `state_dict`/`load_state_dict` for checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fewshot.data.episodes import Episode, EpisodeSampler
from fewshot.methods import FewShotMethod, Loss
from fewshot.streams import Stream

ToDevice = Callable[[Episode], Episode]


class TaskSource(Protocol):
    def loss(
        self, method: FewShotMethod, step: int, task: int, to_device: ToDevice
    ) -> tuple[Loss, Episode]:
        """The loss of task `task` of step `step`, and the real episode whose labels
        (query_y, classes) it is scored against."""
        ...


class Episodes:
    """Plain training episodes: task `task` of step `step` is the sampler's episode
    (Stream.TRAIN, seed, step, task)."""

    def __init__(self, sampler: EpisodeSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def loss(
        self, method: FewShotMethod, step: int, task: int, to_device: ToDevice
    ) -> tuple[Loss, Episode]:
        episode = to_device(self.sampler.episode(Stream.TRAIN, self.seed, step, task))
        return method.loss(episode), episode
