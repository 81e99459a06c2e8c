"""Whole-class pre-training: the backbone learns ordinary classification over all base
classes before meta-training (CFN's step 1, MTL's phase 1; any method may use it).

A linear classifier over the backbone's features is trained with the backbone by
Adam on cross-entropy, `pretrain.steps` steps of `pretrain.batch_size` images, and
dropped afterwards. Batches are a pure function of (seed, step), split over the
workers like meta-batches, and the gradients are summed in the loop's one
all-reduce, so W workers pre-train exactly as one does.

Decision: no augmentation (CFN's paper random-crops 92 -> 80 px); at Omniglot's 28 px
a crop removes strokes. The backbone's batch-norm statistics come from these batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.config import PretrainConfig
from fewshot.data.decode import normalise
from fewshot.data.episodes import to_device
from fewshot.data.reader import ImageSet
from fewshot.streams import Stream
from fewshot.train.comm import all_reduce_gradients


def batch_indices(n_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The images of pre-training step `step`: [batch_size] indices, with replacement
    across steps, none repeated within one."""
    rng = np.random.default_rng([Stream.PRETRAIN, seed, step])
    return rng.choice(n_images, size=min(batch_size, n_images), replace=False)


def pretrain(
    worker,
    settings: PretrainConfig,
    images: ImageSet,
    on_log: Callable[[int, dict[str, float]], None],
) -> None:
    """Pre-train `worker.method.backbone` in place (a `train.loop.Worker`)."""
    method, comm, runtime = worker.method, worker.comm, worker.runtime
    backbone = method.backbone
    channels, size = images.images.shape[1], images.images.shape[2]
    classifier = nn.Linear(backbone.feature_dim(channels, size), images.n_classes)
    classifier.to(runtime.device)
    # A method that freezes its backbone for meta-training still pre-trains all of it.
    trainable = list(backbone.parameters())
    had_grad = [p.requires_grad for p in trainable]
    for p in trainable:
        p.requires_grad_(True)
    params = trainable + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    backbone.train()
    for step in range(settings.steps):
        chosen = batch_indices(len(images.labels), settings.batch_size, worker.config.seed, step)
        mine = torch.from_numpy(chosen[comm.rank :: comm.world_size])
        x = normalise(images.images[mine], images.mean, images.std)
        x = to_device(x, runtime.device).contiguous(memory_format=runtime.memory_format)
        y = to_device(images.labels[mine], runtime.device)
        optimizer.zero_grad(set_to_none=True)
        with worker.autocast():
            logits = classifier(backbone(x).float())
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (loss / len(chosen)).backward()
        correct = (logits.argmax(1) == y).sum()
        sums = all_reduce_gradients(params, torch.stack([loss.detach(), correct.float()]), comm)
        optimizer.step()
        if (step + 1) % worker.config.train.log_every == 0 or step + 1 == settings.steps:
            loss_sum, correct_sum = (sums / len(chosen)).tolist()
            on_log(step + 1, {"pretrain_loss": loss_sum, "pretrain_acc": correct_sum})
    for p, grad in zip(trainable, had_grad, strict=True):
        p.requires_grad_(grad)
    method.train()  # back to the method's own modes (a frozen backbone stays in eval)
