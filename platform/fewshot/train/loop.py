"""One worker's meta-training loop, the same on one process and under Ray Train.

A step takes the meta-batch of `episode.meta_batch` tasks; this worker computes
its share (`tasks_for_rank`), back-propagates sum(loss_i) / B, and the gradients
are summed over workers in one all-reduce, together with the step's metrics. So
W workers with B/W tasks each take exactly the step one worker takes with B.

Everything random in a step is derived from (seed, step, task): episodes from
the sampler's key, and torch's generator reseeded per step for anything else.
A checkpoint therefore needs only weights, optimiser, scheduler and the step
number to continue exactly as an unbroken run would.

A run that diverges stops with one line (a ConfigError naming the step and the
learning rate) instead of training on to a model of NaNs: the step's loss, summed in
the all-reduce it already makes, must be finite before the optimiser steps, and the
weights must be finite before each round validates and checkpoints them (one check
per round, not per step). So no checkpoint and no model file holds a NaN.

A run with `train.minutes` follows its `Plan` (budget.py): after every step the plan may
shrink the steps left and scale the schedule to them (`Worker.follow_plan`); `fit` reads
`worker.config`, the config as planned, at every step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot import model_file
from fewshot.augment.images import training_jitter
from fewshot.augment.task_mixup import TaskMixup
from fewshot.config import Config, TrainConfig
from fewshot.data.episodes import Episode, EpisodeSampler, tasks_for_rank
from fewshot.errors import ConfigError
from fewshot.evaluate import episode_accuracies
from fewshot.methods import FewShotMethod, build_method
from fewshot.methods.hard_tasks import HardTasks, failure_class
from fewshot.runtime import Execution, Probe, Runtime, confirm_cache, module_probe
from fewshot.streams import Stream
from fewshot.train.budget import PLANNED, USED, Plan
from fewshot.train.comm import Comm, all_reduce_gradients
from fewshot.train.datasets import Datasets
from fewshot.train.distill import Distillation
from fewshot.train.pretrain import pretrain
from fewshot.train.tasks import Episodes, TaskSource


def build_optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(config: Config, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    t = config.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_every, gamma=t.gamma)
    if t.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, t.milestones, gamma=t.gamma)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def schedule_factor(train: TrainConfig, step: int) -> float:
    """The factor of the learning rate at `step` under the schedule of `train`: what
    `build_scheduler`'s scheduler has reached by then."""
    if train.schedule == "step":
        return train.gamma ** (step // train.step_every)
    if train.schedule == "multistep":
        return train.gamma ** sum(m <= step for m in train.milestones)
    if train.schedule == "cosine":
        return (1 + math.cos(math.pi * step / train.steps)) / 2
    return 1.0


def agreed(runtime: Runtime, comm: Comm) -> Runtime:
    """Rank 0's execution on every rank (rank 0 alone probes): ranks that computed a step
    in different precisions or layouts would sum gradients of different roundings."""
    if comm.world_size == 1:
        return runtime
    every = [Execution(p, c) for p in ("bf16", "fp32") for c in (True, False)]
    vote = torch.zeros(len(every), dtype=torch.float64, device=runtime.device)
    if comm.rank == 0:
        vote[every.index(runtime.execution)] = 1.0
    chosen = every[int(comm.all_reduce_sum(vote).argmax())]
    return runtime.with_execution(chosen)


LogHook = Callable[[int, dict[str, float]], None]


class Worker:
    """A method, its optimiser and its episodes, stepped one meta-batch at a time."""

    def __init__(
        self,
        config: Config,
        comm: Comm | None = None,
        data: Datasets | None = None,
        cpus: float | None = None,
    ) -> None:
        """`cpus`: the CPUs Ray gave this worker, which set its threads (runtime.py)."""
        self.config = config
        self.comm = comm or Comm()
        data = data or Datasets.load(config)
        self.train_images = data.train
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.method: FewShotMethod = build_method(config, data.train.images.shape[1])
        e = config.episode
        self.sampler = EpisodeSampler(
            data.train,
            e.n_way,
            e.k_shot,
            e.q_query,
            within_group=config.data.within_group,
            jitter=training_jitter(config.augment),
        )
        self.mixup = None
        if config.task_mixup.strategy != "none":
            self.mixup = TaskMixup(config.task_mixup, self.sampler, config.seed, self.method)
        # The meta-batch's tasks, and MTL's extra meta-batch of hard tasks (None: none).
        self.tasks: TaskSource = self.mixup or Episodes(self.sampler, config.seed)
        hard = self.method.hard_tasks()
        self.hard_tasks = HardTasks(self.sampler, config.seed, hard, e.meta_batch) if hard else None
        probe = self.probe() if self.comm.rank == 0 else None
        self.runtime = agreed(Runtime.of(config.train, cpus, probe), self.comm).apply()
        self.device, self.amp = self.runtime.device, self.runtime.amp
        self.memory_format = self.runtime.memory_format
        self.method.to(self.device, memory_format=self.memory_format)
        if config.distill.teachers:
            self.tasks = self.distillation(config)
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
        self.pretrained = False
        # The steps to train and their schedule (train.minutes); `config` as planned.
        self.plan = Plan(config)

    def distillation(self, config: Config) -> Distillation:
        """The plain tasks, taught by `distill.teachers` on this worker's device."""
        sources = config.distill.teachers
        teacher = model_file.predictor(sources, config.tracking.uri)
        Distillation.check(teacher, self.method.shape, sources)
        teacher.to(self.device, memory_format=self.memory_format)
        return Distillation(config.distill, teacher, self.tasks)

    def probe(self) -> Probe:
        """The step the runtime's candidates are timed on: the method's loss on this run's
        first training episode, forward and backward."""
        c = self.config
        episode = self.sampler.episode(Stream.TRAIN, c.seed, 0, 0)
        work = {
            "method": c.method.model_dump(mode="json"),
            "backbone": c.backbone.model_dump(mode="json"),
            "input": list(episode.query_x.shape[1:]),
            "episode": c.episode.model_dump(mode="json"),
        }

        def loss(method: FewShotMethod, runtime: Runtime) -> torch.Tensor:
            return method.loss(episode.to(runtime.device, runtime.memory_format)).total

        return module_probe(self.method, json.dumps(work, sort_keys=True), loss)

    def autocast(self):
        return self.runtime.autocast()

    def to_device(self, episode: Episode) -> Episode:
        return episode.to(self.device, self.memory_format)

    def needs_pretraining(self) -> bool:
        return self.config.pretrain.steps > 0 and self.step == 0 and not self.pretrained

    def pretrain(self, on_log: LogHook) -> None:
        pretrain(self, self.config.pretrain, self.train_images, on_log)
        self.pretrained = True

    def train_step(self) -> dict[str, float]:
        """One meta-batch (plus MTL's hard-task meta-batch); returns metrics averaged over
        its tasks."""
        config, comm = self.config, self.comm
        torch.manual_seed(
            int(np.random.SeedSequence([config.seed, self.step, comm.rank]).generate_state(1)[0])
        )
        if self.mixup and self.mixup.due(self.step):
            self.recluster()
        self.method.train()
        metrics, failures, clock = self.optimise(config.episode.meta_batch, self.tasks)
        if self.hard_tasks:
            self.hard_tasks.remember(failures)
            if self.hard_tasks.ready():
                hard_metrics, _, clock = self.optimise(self.hard_tasks.count, self.hard_tasks)
                metrics.update({f"hard_{name}": value for name, value in hard_metrics.items()})
        self.scheduler.step()
        self.step += 1
        self.plan.observe(self.step, clock)
        if self.plan.measured_at == self.step and comm.rank == 0:
            tasks = len(tasks_for_rank(config.episode.meta_batch, comm.rank, comm.world_size))
            dropped = confirm_cache(self.runtime, self.plan.speed * tasks)
            if dropped:
                print(dropped, file=sys.stderr, flush=True)
        if self.plan.changed_at == self.step:
            self.follow_plan()
        # The optimiser's rate, which a re-plan sets (the scheduler's last one would not say).
        return {**metrics, "lr": self.optimizer.param_groups[0]["lr"]}

    def follow_plan(self) -> None:
        """Train as the plan says from this step on: its steps, and its scaled schedule
        with the learning rate at its value for this step, as if the run had been planned
        so from the start. The torch schedulers compute each rate from the previous one,
        so setting their step size, milestones or length and today's rate is enough."""
        self.config = self.plan.config
        t, scheduler = self.config.train, self.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
            scheduler.step_size = t.step_every
        elif isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
            scheduler.milestones = Counter(t.milestones)
        elif isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            scheduler.T_max = t.steps
        factor = schedule_factor(t, self.step)
        for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    def optimise(self, count: int, tasks: TaskSource) -> tuple[dict[str, float], list[int], float]:
        """One optimiser step on `count` tasks of `tasks` shared by the workers:
        back-propagate sum(loss_i) / count, then one all-reduce of gradients, metric sums,
        in runs with hard tasks each task's failure class, and in runs with a budget the
        clock. Returns (metrics averaged over tasks, failure classes: [] without hard
        tasks, the run's clock: rank 0's in a budgeted run, so every rank plans alike)."""
        comm, plan = self.comm, self.plan
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        # Every meta-batch of a hard-task run carries the slots, the hard one too (its
        # classes go unused): the all-reduce keeps one layout, and so its roundings.
        failures = torch.zeros(count if self.hard_tasks else 0, device=self.device)
        for task in tasks_for_rank(count, comm.rank, comm.world_size):
            with self.autocast():
                loss, episode = tasks.loss(self.method, self.step, task, self.to_device)
            (loss.total / count).backward()
            values = {"loss": loss.total, "acc": loss.accuracy(episode.query_y), **loss.parts}
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if self.hard_tasks:
                failures[task] = failure_class(loss.logits.detach(), episode).float()
        names = sorted(sums)
        unagreed = [plan.unagreed() if comm.rank == 0 else 0.0] if plan.minutes else []
        slot = torch.tensor(unagreed, device=self.device)
        extras = torch.cat([torch.stack([sums[n] for n in names]), failures, slot])
        summed = all_reduce_gradients(self.params, extras, comm).tolist()
        # Every rank holds the same sums, so all stop together (none waits in an all-reduce).
        loss = summed[names.index("loss")]
        if not math.isfinite(loss):
            raise self.diverged(f"the training loss is {loss}", self.step + 1)
        if self.config.train.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
        self.optimizer.step()
        metrics = {n: value / count for n, value in zip(names, summed[: len(names)], strict=True)}
        classes = [int(c) for c in summed[len(names) : len(names) + len(failures)]]
        clock = plan.agreed + summed[-1] if unagreed else plan.clock()
        return metrics, classes, clock

    def diverged(self, what: str, step: int) -> ConfigError:
        """The one line of a run stopped by a non-finite loss or weights at `step` (counted
        from 1, as logged; 0: after pre-training)."""
        pre = step == 0
        setting = "pretrain.lr" if pre else "train.lr"
        lr = self.config.pretrain.lr if pre else self.config.train.lr
        where = "the end of pre-training" if pre else f"step {step}"
        return ConfigError(
            f"{setting}: {what} at {where}, so training stopped: it diverged, likely from too "
            f"high a learning rate ({setting} = {lr:g}); lower it or set train.grad_clip, and "
            "train again with --restart (nothing non-finite was saved)"
        )

    @torch.no_grad()
    def check_weights(self) -> None:
        """Refuse weights (and buffers: batch-norm statistics) that are not all finite."""
        state = [t for t in self.method.state_dict().values() if t.is_floating_point()]
        if not bool(torch.stack([t.isfinite().all() for t in state]).all()):
            raise self.diverged("the weights are not finite", self.step)

    @torch.no_grad()
    def recluster(self) -> None:
        """Task mixup's clusters, on pixels or on the current embeddings."""
        if self.config.task_mixup.recluster_every is None and not self.pretrained:
            self.mixup.cluster(None)
            return
        self.method.eval()  # leave batch-norm running statistics alone
        self.mixup.cluster(lambda x: self.method.embed(x.to(self.device)))
        self.method.train()

    def validate(self) -> float:
        """Mean accuracy on the fixed validation episodes, split over the workers."""
        if self.val_sampler is None:
            return float("nan")
        comm, count = self.comm, self.config.train.val_episodes
        mine = [i for i in range(count) if i % comm.world_size == comm.rank]
        episodes = (
            self.val_sampler.episode(Stream.VAL, self.config.evaluate.seed, 0, i) for i in mine
        )
        accuracies = episode_accuracies(self.method, episodes, self.runtime)
        total = comm.all_reduce_sum(
            torch.tensor([sum(accuracies)], dtype=torch.float64, device=self.device)
        )
        return float(total.item()) / count

    def effective(self) -> dict[str, Any]:
        """The searchable settings as the built objects hold them (dotted paths): the
        method's params, the optimiser's learning rate and task mixup's settings. What a
        run really trained with, to check against what it was asked for."""
        used: dict[str, Any] = {
            f"method.{k}": v for k, v in self.method.params.model_dump(mode="json").items()
        }
        used["train.lr"] = self.optimizer.defaults["lr"]
        if self.mixup:
            settings = self.mixup.settings.model_dump(mode="json")
            used.update({f"task_mixup.{k}": v for k, v in settings.items()})
        return used

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pretrained": self.pretrained,
            "mixup": self.mixup.state_dict() if self.mixup else None,
            "hard_tasks": self.hard_tasks.state_dict() if self.hard_tasks else None,
            "budget": self.plan.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "failures" in state:  # written before hard tasks kept their own state
            state = {**state, "hard_tasks": {"failures": state["failures"]}}
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.pretrained = state["pretrained"]
        if self.mixup:
            self.mixup.load_state_dict(state["mixup"])
        if self.hard_tasks:
            self.hard_tasks.load_state_dict(state["hard_tasks"])
        if "budget" in state:  # none in checkpoints written before train.minutes
            self.plan.load_state_dict(state["budget"])
            # The scheduler's state, loaded above, already holds the plan's schedule.
            self.config = self.plan.config


RoundHook = Callable[[Worker, dict[str, float]], None]


def eval_rounds(config: Config, step: int | None = None) -> int:
    """How many evaluation rounds `fit` has run once at `step` (default: the end of
    training), the round after pre-training included."""
    t = config.train
    step = t.steps if step is None else step
    last = step == t.steps and t.steps % t.eval_every != 0
    return step // t.eval_every + int(last) + int(config.pretrain.steps > 0)


def fit(worker: Worker, on_log: LogHook, on_round: RoundHook) -> None:
    """Pre-train if the config asks for it; then step until `train.steps` (as planned,
    with `train.minutes`); log every `log_every`, validate and checkpoint every
    `eval_every` (and at the end) through the hooks. A budgeted run also logs its plan
    (`planned_steps`, when made or changed, and when resumed) and the steps it trained
    (`steps_used`), and rank 0 prints a line at each."""
    plan = worker.plan

    def end_round(metrics: dict[str, float]) -> None:
        worker.check_weights()  # before they are validated and checkpointed
        on_round(worker, {"val_acc": worker.validate(), **metrics})

    def say(line: str) -> None:
        if worker.comm.rank == 0:
            print(line, file=sys.stderr, flush=True)

    if plan.first is not None:  # resumed with a plan: the progress bar and logs follow it
        on_log(worker.step, {PLANNED: plan.steps})
    if worker.needs_pretraining():
        worker.pretrain(on_log)
        end_round({})  # checkpoint the pre-trained backbone
    window: dict[str, list[float]] = {}
    round_start, round_first_step = time.perf_counter(), worker.step
    while worker.step < worker.config.train.steps:
        for name, value in worker.train_step().items():
            window.setdefault(name, []).append(value)
        t, step = worker.config.train, worker.step  # as planned after this step
        if plan.changed_at == step:
            on_log(step, {PLANNED: t.steps})
            say(plan.line(step))
        if step % t.log_every == 0 or step == t.steps:
            on_log(step, {f"train_{k}": float(np.mean(v)) for k, v in window.items()})
            window.clear()
        if step % t.eval_every == 0 or step == t.steps:
            # Training throughput of the round (all workers' episodes), before validation.
            seconds = time.perf_counter() - round_start
            episodes = (step - round_first_step) * worker.config.episode.meta_batch
            end_round({"train_episodes_per_s": episodes / seconds})
            round_start, round_first_step = time.perf_counter(), worker.step
    if plan.minutes is not None:
        on_log(worker.step, {USED: worker.step})
        say(plan.summary(worker.step))
