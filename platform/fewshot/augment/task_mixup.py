"""Task mixup: DATG (diverse and authentic task generation), with MLTI as its ablation.

For a training task T_i, a partner task T_j is drawn, a layer l uniformly from
{0 (the images), ..., L} (L = the method's `mixup_layers`) and lambda ~ Beta(alpha, beta);
the hidden representations of both tasks at layer l are mixed,

    H_mix = lambda * H_i + (1 - lambda) * H_j     (support with support, query with query),

class r of T_i paired with class r of T_j, keeping T_i's label r, and the method's
usual loss is computed from layer l on. The four strategies of `task_mixup.strategy`
differ only in how T_j is drawn and in one term:

    none     no mixup (vanilla)
    mlti     T_j from all base classes (random pairing)
    cluster  T_i from one cluster of base classes, T_j from another
    datg     cluster pairing, plus w_mmd * MMD^2(mixed task, real tasks)

Clusters: k-means (k = `clusters`) over per-class mean features; every cluster keeps
at least n_way classes. Features are raw pixels when clustering once without
pre-training, else the current backbone's embeddings, re-clustered every
`recluster_every` steps.

Decisions: the MMD compares each mixed task's final embeddings (support and query)
with those of its two real tasks (multi-bandwidth RBF, biased estimate, so a set
against itself gives exactly 0); per task rather than per batch, so it does not
depend on how tasks are split over workers. The real embeddings are a target without
gradient, continued from the layer-l representations already computed: the MMD then
costs one forward of the remaining layers, not a forward and backward of two tasks.
Every draw (partner task, layer, lambda) is keyed by (seed, step, task), like the
episodes themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fewshot.config import TaskMixupConfig
from fewshot.data.decode import normalise
from fewshot.data.episodes import Episode, EpisodeSampler
from fewshot.errors import ConfigError
from fewshot.methods.base import FewShotMethod, Loss
from fewshot.streams import Stream

RBF_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def mix(first: torch.Tensor, second: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * first + (1.0 - lam) * second


def mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between samples x [n, D] and y [m, D], Gaussian kernels at
    bandwidths RBF_SCALES times the mean pairwise squared distance of x and y."""
    z = torch.cat([x, y]).float()
    d2 = torch.cdist(z, z).pow(2)
    base = d2.detach().mean().clamp_min(1e-12)
    kernel = sum(torch.exp(-d2 / (base * s)) for s in RBF_SCALES)
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def kmeans(features: np.ndarray, k: int, seed: int, iterations: int = 100) -> np.ndarray:
    """Cluster labels [C] of features [C, D]; k-means++ start, Lloyd iterations."""
    rng = np.random.default_rng(seed)
    centres = [features[rng.integers(len(features))]]
    for _ in range(k - 1):
        d2 = np.min([((features - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(features[rng.choice(len(features), p=d2 / d2.sum())])
    centres = np.stack(centres)
    labels = np.full(len(features), -1, dtype=np.int64)
    for _ in range(iterations):
        new = ((features[:, None] - centres[None]) ** 2).sum(2).argmin(1)
        if (new == labels).all():
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                centres[c] = features[labels == c].mean(0)
    return labels


def balance(
    labels: np.ndarray, features: np.ndarray, centres: np.ndarray, min_size: int
) -> np.ndarray:
    """Move classes into clusters smaller than min_size: each time the class nearest
    to the small cluster's centre among clusters that can spare one."""
    labels = labels.copy()
    k = len(centres)
    while True:
        sizes = np.bincount(labels, minlength=k)
        small = np.flatnonzero(sizes < min_size)
        if len(small) == 0:
            return labels
        c = small[0]
        donors = np.isin(labels, np.flatnonzero(sizes > min_size))
        d2 = ((features - centres[c]) ** 2).sum(1)
        d2[~donors] = np.inf
        labels[int(d2.argmin())] = c


class TaskMixup:
    """The training tasks of one worker under `task_mixup` (strategy != none)."""

    def __init__(
        self,
        settings: TaskMixupConfig,
        sampler: EpisodeSampler,
        seed: int,
        method: FewShotMethod,
    ) -> None:
        if method.mixup_layers() is None:
            raise ConfigError(
                f"task_mixup.strategy: {method.name} cannot continue from a hidden layer, so "
                f"it cannot train on mixed tasks; use protonet or maml, or strategy none"
            )
        self.settings, self.sampler, self.seed = settings, sampler, seed
        self.by_cluster = settings.strategy in ("cluster", "datg")
        n_classes, n_way = sampler.images.n_classes, sampler.n_way
        if self.by_cluster and settings.clusters * n_way > n_classes:
            raise ConfigError(
                f"task_mixup.clusters: {settings.clusters} clusters of at least "
                f"episode.n_way = {n_way} classes need {settings.clusters * n_way} base classes, "
                f"the training data has {n_classes}; lower task_mixup.clusters or n_way"
            )
        self.clusters: list[list[int]] | None = None
        self.cluster_samplers: list[EpisodeSampler] = []

    # -- clusters ---------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the clusters must be (re)computed before the tasks of `step`."""
        every = self.settings.recluster_every
        return self.by_cluster and (self.clusters is None or (every and step % every == 0))

    @torch.no_grad()
    def cluster(self, features: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Cluster the base classes on `features` of their images (None: pixels)."""
        images = self.sampler.images
        means = []
        for idx in images.by_class:
            x = normalise(images.images[idx], images.mean, images.std)
            z = x.flatten(1) if features is None else features(x)
            means.append(z.float().mean(0).cpu().numpy())
        means = np.stack(means).astype(np.float64)
        labels = kmeans(means, self.settings.clusters, self.seed)
        centres = np.stack([means[labels == c].mean(0) for c in range(self.settings.clusters)])
        labels = balance(labels, means, centres, min_size=self.sampler.n_way)
        self.set_clusters([np.flatnonzero(labels == c).tolist() for c in range(len(centres))])

    def set_clusters(self, clusters: list[list[int]]) -> None:
        s = self.sampler
        self.clusters = clusters
        self.cluster_samplers = [
            EpisodeSampler(s.images, s.n_way, s.k_shot, s.q_query, class_pool=pool)
            for pool in clusters
        ]

    def state_dict(self) -> dict:
        return {"clusters": self.clusters}

    def load_state_dict(self, state: dict) -> None:
        if state["clusters"] is not None:
            self.set_clusters(state["clusters"])

    # -- tasks ------------------------------------------------------------------------

    def pair(self, step: int, task: int) -> tuple[Episode, Episode | None]:
        """T_i and its partner T_j (None when this task is not mixed)."""
        step_rng = np.random.default_rng([Stream.MIX, self.seed, step])
        rng = np.random.default_rng([Stream.MIX, self.seed, step, task])
        if rng.random() >= self.settings.probability:
            return self.sampler.episode(Stream.TRAIN, self.seed, step, task), None
        if not self.by_cluster:
            first = self.sampler.episode(Stream.TRAIN, self.seed, step, task)
            return first, self.sampler.episode(Stream.MIX, self.seed, step, task)
        # The meta-batch's tasks come from one cluster, each partner from another.
        k = len(self.cluster_samplers)
        home = int(step_rng.integers(k))
        other = (home + 1 + int(rng.integers(k - 1))) % k
        first = self.cluster_samplers[home].episode(Stream.TRAIN, self.seed, step, task)
        return first, self.cluster_samplers[other].episode(Stream.MIX, self.seed, step, task)

    def draws(self, step: int, task: int, top_layer: int) -> tuple[int, float]:
        """The layer l in 0..top_layer and lambda of a mixed task."""
        rng = np.random.default_rng([Stream.MIX, self.seed, step, task, 1])
        layer = int(rng.integers(top_layer + 1))
        return layer, float(rng.beta(self.settings.alpha, self.settings.beta))

    def loss(
        self,
        method: FewShotMethod,
        step: int,
        task: int,
        to_device: Callable[[Episode], Episode],
    ) -> tuple[Loss, Episode]:
        """The loss of training task (step, task), and the real task whose labels it uses."""
        first, second = self.pair(step, task)
        first = to_device(first)
        with_mmd = self.settings.strategy == "datg"
        if second is None:
            loss = method.loss(first)
            if with_mmd:  # every task reports the same parts, mixed or not
                loss.parts["mmd"] = loss.total.new_zeros(())
            return loss, first
        second = to_device(second)
        top = method.mixup_layers()
        layer, lam = self.draws(step, task, top)
        support_i, query_i = method.hidden(first, layer)
        support_j, query_j = method.hidden(second, layer)
        mixed = Episode(
            support_x=mix(support_i, support_j, lam),
            support_y=first.support_y,
            query_x=mix(query_i, query_j, lam),
            query_y=first.query_y,
            classes=first.classes,
        )
        loss = method.loss(mixed, start=layer)
        if with_mmd:
            fake = loss.embeddings
            if fake is None:
                fake = method.embed(torch.cat([mixed.support_x, mixed.query_x]), layer)
            with torch.no_grad():  # the real tasks are the target, not moved towards the mix
                real = method.embed(torch.cat([support_i, query_i, support_j, query_j]), layer)
            mmd = mmd2(fake, real)
            loss.parts["mmd"] = mmd
            loss.total = loss.total + self.settings.mmd_weight * mmd
        return loss, first
