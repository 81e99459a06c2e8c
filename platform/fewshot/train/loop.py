"""One worker's meta-training loop, the same on one process and under Ray Train.

A step takes the meta-batch of `episode.meta_batch` tasks; this worker computes
its share (`tasks_for_rank`), back-propagates sum(loss_i) / B, and the gradients
are summed over workers in one all-reduce, together with the step's metrics. So
W workers with B/W tasks each take exactly the step one worker takes with B.

Everything random in a step is derived from (seed, step, task): episodes from
the sampler's key, and torch's generator reseeded per step for anything else.
A checkpoint therefore needs only weights, optimiser, scheduler and the step
number to continue exactly as an unbroken run would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fewshot.config import Config
from fewshot.data.episodes import TRAIN, VAL, EpisodeSampler, tasks_for_rank
from fewshot.data.store import ImageSet, load_split
from fewshot.evaluate import episode_accuracies
from fewshot.methods import FewShotMethod, build_method


class Comm:
    """How workers combine results. One process: nothing to combine."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        return flat


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed, from `train.device/precision/channels_last`."""

    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32
    memory_format: torch.memory_format

    @classmethod
    def of(cls, config: Config) -> Runtime:
        """The runtime of `config`; also applies `train.threads` (a process-wide setting)."""
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        device = pick_device(t.device)
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        return cls(device, autocast_dtype(t.precision, device), memory_format)


def build_optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(config: Config, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    t = config.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_every, gamma=t.gamma)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class Datasets:
    train: ImageSet
    val: ImageSet | None

    @classmethod
    def load(cls, config: Config) -> Datasets:
        d = config.data
        train = load_split(d.path, d.train_split, d.image_size)
        val = load_split(d.path, d.val_split, d.image_size) if d.val_split else None
        return cls(train, val)


class Worker:
    """A method, its optimiser and its episodes, stepped one meta-batch at a time."""

    def __init__(
        self, config: Config, comm: Comm | None = None, data: Datasets | None = None
    ) -> None:
        self.config = config
        self.comm = comm or Comm()
        self.runtime = Runtime.of(config)
        self.device, self.amp = self.runtime.device, self.runtime.amp
        self.memory_format = self.runtime.memory_format
        data = data or Datasets.load(config)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.method: FewShotMethod = build_method(config, data.train.images.shape[1])
        self.method.to(self.device, memory_format=self.memory_format)
        e = config.episode
        self.sampler = EpisodeSampler(
            data.train, e.n_way, e.k_shot, e.q_query, within_group=config.data.within_group
        )
        self.val_sampler = None
        if data.val is not None:
            v = config.eval_episode()
            self.val_sampler = EpisodeSampler(
                data.val, v.n_way, v.k_shot, v.q_query, within_group=config.eval_within_group()
            )
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, self.params)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.step = 0

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the meta-batch; returns metrics averaged over its tasks."""
        config, comm = self.config, self.comm
        meta_batch = config.episode.meta_batch
        torch.manual_seed(
            int(np.random.SeedSequence([config.seed, self.step, comm.rank]).generate_state(1)[0])
        )
        self.method.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for task in tasks_for_rank(meta_batch, comm.rank, comm.world_size):
            episode = self.sampler.episode(TRAIN, config.seed, self.step, task)
            episode = episode.to(self.device, self.memory_format)
            with self.autocast():
                loss = self.method.loss(episode)
            (loss.total / meta_batch).backward()
            values = {"loss": loss.total, "acc": loss.accuracy(episode.query_y), **loss.parts}
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        names = sorted(sums)
        # One buffer, one all-reduce per step: gradients (zeros where a parameter got
        # none, so every rank sends the same layout) followed by the metric sums.
        grads = [
            p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in self.params
        ]
        flat = torch.cat(grads + [torch.stack([sums[n] for n in names]).to(grads[0].dtype)])
        flat = comm.all_reduce_sum(flat)
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        if config.train.grad_clip:
            nn.utils.clip_grad_norm_(self.params, config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = (flat[offset:] / meta_batch).tolist()
        return {**dict(zip(names, metrics, strict=True)), "lr": self.scheduler.get_last_lr()[0]}

    def validate(self) -> float:
        """Mean accuracy on the fixed validation episodes, split over the workers."""
        if self.val_sampler is None:
            return float("nan")
        comm, count = self.comm, self.config.train.val_episodes
        mine = [i for i in range(count) if i % comm.world_size == comm.rank]
        episodes = (self.val_sampler.episode(VAL, self.config.evaluate.seed, 0, i) for i in mine)
        accuracies = episode_accuracies(self.method, episodes, self.runtime)
        total = comm.all_reduce_sum(
            torch.tensor([sum(accuracies)], dtype=torch.float64, device=self.device)
        )
        return float(total.item()) / count

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


RoundHook = Callable[[Worker, dict[str, float]], None]
LogHook = Callable[[int, dict[str, float]], None]


def fit(worker: Worker, on_log: LogHook, on_round: RoundHook) -> None:
    """Step until `train.steps`; log every `log_every`, validate and checkpoint every
    `eval_every` (and at the end) through the hooks."""
    t = worker.config.train
    window: dict[str, list[float]] = {}
    round_start, round_first_step = time.perf_counter(), worker.step
    while worker.step < t.steps:
        for name, value in worker.train_step().items():
            window.setdefault(name, []).append(value)
        step = worker.step
        if step % t.log_every == 0 or step == t.steps:
            on_log(step, {f"train_{k}": float(np.mean(v)) for k, v in window.items()})
            window.clear()
        if step % t.eval_every == 0 or step == t.steps:
            # Training throughput of the round (all workers' episodes), before validation.
            seconds = time.perf_counter() - round_start
            episodes = (step - round_first_step) * worker.config.episode.meta_batch
            metrics = {"val_acc": worker.validate(), "train_episodes_per_s": episodes / seconds}
            on_round(worker, metrics)
            round_start, round_first_step = time.perf_counter(), worker.step
