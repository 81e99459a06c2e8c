"""The episode sampler: (stream, seed, step, task) -> one N-way K-shot Q-query episode.

Episodes are a pure function of their key, so
- the same seed gives the same episodes on any number of workers: the meta-batch
  of step s is tasks 0..B-1, and the worker of rank r among W takes tasks
  r, r + W, r + 2W, ... (`tasks_for_rank`); different ranks get different tasks;
- resuming at step s needs no sampler state: the key says where it is;
- test episodes use their own stream and seed, so every method and every run
  is evaluated on the same episodes and comparisons are paired.

Images are decoded once (`reader.load_split`) and an episode only indexes the uint8
tensor and normalises the few images it uses; or, for a set too large to hold
decoded (`data.decode`), an episode decodes just its own images. Both give the same
episode for the same key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fewshot.data.decode import normalise
from fewshot.data.reader import ImageSet
from fewshot.errors import DataError
from fewshot.streams import Stream


@dataclass
class Episode:
    """One task. Labels are 0..N-1 in the order of `classes`.

    support_x: float [N*K, C, H, W]    support_y: int64 [N*K]
    query_x:   float [N*Q, C, H, W]    query_y:   int64 [N*Q]
    classes:   int64 [N] (labels of the dataset the episode came from)
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def n_way(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device, memory_format=torch.contiguous_format) -> Episode:
        def move(x: torch.Tensor) -> torch.Tensor:
            x = to_device(x, device)
            return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x

        return Episode(
            *(
                move(t)
                for t in (self.support_x, self.support_y, self.query_x, self.query_y, self.classes)
            )
        )


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device`. To a GPU the copy starts from pinned memory and
    does not block, so the host samples the next task while the GPU still computes."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def tasks_for_rank(meta_batch: int, rank: int, world_size: int) -> range:
    """The task indices of one step that the worker of `rank` computes."""
    return range(rank, meta_batch, world_size)


class EpisodeSampler:
    """Samples episodes from an `ImageSet` (decoded or encoded).

    within_group: all N classes of an episode come from one group (alphabet).
    class_pool: restrict classes to these labels (DATG clusters, few-base-class runs).
    jitter: (float pixels [B, C, H, W], torch generator) -> the same, applied to every
        image before standardisation with a generator drawn from the episode's key
        (augment/images.py `AffineJitter`); the classes and images drawn do not change.
    """

    def __init__(
        self,
        images: ImageSet,
        n_way: int,
        k_shot: int,
        q_query: int,
        *,
        within_group: bool = False,
        class_pool: list[int] | None = None,
        jitter: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.images = images
        self.jitter = jitter
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        pool = list(range(images.n_classes)) if class_pool is None else sorted(class_pool)
        self.pools = self._pools(pool, within_group)
        images.require_images_per_class(k_shot + q_query, "k_shot + q_query")
        counts = np.array([len(i) for i in images.by_class])
        # [C, max_count] image indices padded with -1, so one argsort samples every class.
        self.counts = counts
        self.table = np.full((len(counts), counts.max()), -1, dtype=np.int64)
        for label, idx in enumerate(images.by_class):
            self.table[label, : len(idx)] = idx.numpy()

    def _pools(self, pool: list[int], within_group: bool) -> list[np.ndarray]:
        if not within_group:
            pools = [np.array(pool)]
        else:
            in_pool = set(pool)
            groups = self.images.groups()
            pools = [np.array([c for c in members if c in in_pool]) for members in groups.values()]
            pools = [p for p in pools if len(p) >= self.n_way]
        if not pools or max(len(p) for p in pools) < self.n_way:
            where = "any single group" if within_group else "the split"
            raise DataError(
                f"episode.n_way = {self.n_way} but {where} has fewer classes; lower n_way"
                + (" or turn off within_group" if within_group else "")
            )
        return pools

    def sample_indices(self, rng: np.random.Generator, classes: np.ndarray | None = None):
        """classes [N] (dataset labels), image indices [N, K+Q] (support first)."""
        if classes is None:
            # Groups are drawn in proportion to their size: every class equally likely.
            sizes = np.array([len(p) for p in self.pools], dtype=np.float64)
            pool = self.pools[rng.choice(len(self.pools), p=sizes / sizes.sum())]
            classes = rng.choice(pool, size=self.n_way, replace=False)
        keys = rng.random((len(classes), self.table.shape[1]))
        keys[self.table[classes] < 0] = 2.0  # padding sorts last
        order = np.argsort(keys, axis=1)[:, : self.k_shot + self.q_query]
        return classes, np.take_along_axis(self.table[classes], order, axis=1)

    def build(
        self, classes: np.ndarray, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> Episode:
        n = len(classes)
        k = self.k_shot
        support = torch.from_numpy(indices[:, :k].reshape(-1))
        query = torch.from_numpy(indices[:, k:].reshape(-1))
        labels = torch.arange(n)
        generator = None
        if self.jitter is not None and rng is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return Episode(
            support_x=self.pixels(support, generator),
            support_y=labels.repeat_interleave(k),
            query_x=self.pixels(query, generator),
            query_y=labels.repeat_interleave(indices.shape[1] - k),
            classes=torch.from_numpy(np.asarray(classes, dtype=np.int64)),
        )

    def pixels(self, indices: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standardised images [B, C, H, W] of `indices`, jittered when a generator is given."""
        x = self.images.images[indices]
        if generator is not None:
            x = self.jitter(x.float(), generator)
        return normalise(x, self.images.mean, self.images.std)

    def episode(self, stream: Stream, seed: int, step: int, task: int = 0) -> Episode:
        rng = np.random.default_rng([stream, seed, step, task])
        return self.build(*self.sample_indices(rng), rng)

    def episode_of_classes(
        self, classes: list[int], stream: Stream, seed: int, step: int, task: int = 0
    ) -> Episode:
        """An episode over the given classes, fresh images (MTL's hard tasks)."""
        rng = np.random.default_rng([stream, seed, step, task])
        return self.build(*self.sample_indices(rng, np.asarray(classes)), rng)

    def fixed_episodes(
        self, count: int, seed: int, stream: Stream = Stream.TEST
    ) -> Iterator[Episode]:
        """The evaluation episodes, built one at a time: the same for every method and run."""
        return (self.episode(stream, seed, 0, i) for i in range(count))
