"""Fit a training run into a wall-clock budget, measured on the machine at hand.

A job with a time limit (`make omniglot`: under an hour on any CPU) cannot know how
fast the machine is before it runs: the same recipe trains at about 26 steps/s on a
2-core Intel Xeon with AMX (bf16) and at 6 to 7 on a 2-core AMD EPYC with AVX2 only
(fp32). The rule:

1. time `TIMED_STEPS` training steps of the run's own config, after `WARMUP_STEPS`
   untimed ones (which include the runtime's probe);
2. if `train.steps` at that speed fits in the budget, train as configured;
3. else train for as many steps as fit, rounded down to a multiple of 100 (at least
   100), with the schedule scaled by the same factor (`step_every`, `milestones`,
   `eval_every`; cosine follows `train.steps` by itself), so the learning rate decays
   at the same fractions of training.

The steps used are the run's `train.steps` (logged with its config) and are printed.
A budget that is not a finite number of minutes above 0 (`abc`, empty, `nan`, `-5`) is
refused in one line (`budget_minutes`), not turned into 100 steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fewshot.config import Config
from fewshot.errors import ConfigError
from fewshot.train.loop import Worker

WARMUP_STEPS = 5
TIMED_STEPS = 30


def steps_per_second(config: Config) -> float:
    """Training steps per second of `config` here and now (a throwaway worker)."""
    worker = Worker(config)
    for _ in range(WARMUP_STEPS):
        worker.train_step()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        worker.train_step()
    return TIMED_STEPS / (time.perf_counter() - started)


def budget_minutes(value: str | float, source: str = "minutes") -> float:
    """`value`, a number or its text (an environment variable's), as a training budget in
    minutes: a finite number above 0, else a one-line ConfigError naming `source`."""
    try:
        minutes = float(value)
    except ValueError:
        minutes = math.nan
    if not math.isfinite(minutes) or minutes <= 0:
        raise ConfigError(
            f"{source}={value!r}: give the training budget as a number of minutes above 0, e.g. 40"
        )
    return minutes


@dataclass(frozen=True)
class Budget:
    config: Config  # the config to train: the original, or scaled to fit
    steps_per_second: float
    minutes: float  # the budget
    wanted: int  # train.steps before scaling

    @property
    def scaled(self) -> bool:
        return self.config.train.steps < self.wanted

    def summary(self) -> str:
        t = self.config.train
        need = self.wanted / self.steps_per_second / 60
        if not self.scaled:
            return (
                f"budget: {self.wanted} steps at {self.steps_per_second:.1f} steps/s take about "
                f"{need:.0f} min, within {self.minutes:g} min"
            )
        return (
            f"budget: {self.wanted} steps at {self.steps_per_second:.1f} steps/s would take "
            f"{need:.0f} min, over {self.minutes:g}; training {t.steps} steps with the "
            f"schedule scaled by {t.steps / self.wanted:.3f}"
        )


def scaled_to(config: Config, steps: int) -> Config:
    """`config` trained for `steps` steps, its schedule scaled by the same factor."""
    t = config.train
    factor = steps / t.steps
    return config.updated(
        {
            "train.steps": steps,
            "train.step_every": max(1, round(t.step_every * factor)),
            "train.eval_every": max(1, min(steps, round(t.eval_every * factor))),
            "train.milestones": [max(1, round(m * factor)) for m in t.milestones],
        }
    )


def fit_to_budget(config: Config, minutes: float, speed: float | None = None) -> Budget:
    """`config`, or `config` scaled to the steps that fit in `minutes` at `speed` steps/s
    (measured here when not given)."""
    minutes = budget_minutes(minutes)
    speed = speed or steps_per_second(config)
    wanted = config.train.steps
    fit = int(minutes * 60 * speed) // 100 * 100
    if wanted <= fit:
        return Budget(config, speed, minutes, wanted)
    return Budget(scaled_to(config, max(100, fit)), speed, minutes, wanted)
