"""Fit a training run into a wall-clock budget, `train.minutes`, re-planned as it goes.

The same recipe trains at about 26 steps/s on a 2-core Intel Xeon with AMX (bf16) and
at 6 to 7 on a 2-core AMD EPYC with AVX2 only (fp32), and any other heavy process on
those cores slows a run 2 to 7 times, at start-up or at any time later. A plan made
once, from one window of steps at start, trained 500 and 3,400 steps instead of 15,000
after contended start-ups, and far past its budget when the machine got busy later.
So a `Plan` follows the run's own clock, after every training step:

1. Start-up: the first `STARTUP_WINDOWS` windows of `WINDOW_STEPS` training steps are
   timed and the fastest counts (`fastest_window`: other work only ever slows a window
   down); the run plans the steps that fit in what is left of the budget at that speed.
2. Then the plan is checked after every step (a few additions; no extra collective)
   against the recent speed: the mean step time over a moving window of the last
   `WINDOW_STEPS` steps, longer when those took under `WINDOW_SHARE` of the budget (so
   a fast run's estimate is not noise). When the planned steps would end more than
   `REPLAN_BAND` of the budget past it, the run re-plans to the steps that fit.
3. Validation rounds take time too: the step interval that held a round is left out of
   the speed, and the latest round's extra time is reserved for each round left.
4. A run whose clock passes the budget stops after the step it is on, whatever the
   estimate said; its final round still runs, and the final test evaluation follows.

Steps only ever shrink from `train.steps`, the maximum: a plan is `scaled_to(config,
steps)`, whose `step_every`, `milestones` and `eval_every` are scaled by steps /
train.steps (cosine follows the planned steps), and the learning rate takes the scaled
schedule's value at the current step (`Worker.follow_plan`). So it decays at the same
fractions of the training the run will do, and only ever moves forwards. `eval_every`
is rounded up, so a plan never has more rounds than the configured run.

The clock is seconds since the run's Worker was built, plus those of the run before a
resume. Under Ray Train rank 0's clock is the run's: its seconds since the clock last
agreed are one more value of the step's all-reduce (the other ranks add 0; a difference,
not the clock itself, so float32 keeps it to microseconds), so every rank sees the same
clock and makes the same plan at the same step. A checkpoint holds the plan
(`Plan.state_dict`: planned steps, clock, steps planned at start), so a resumed run
trains to the same plan (the time between its last checkpoint and the restart is not
counted); a checkpoint without one (older ones) resumes as its config plans.

Logged: the MLflow metric `planned_steps` at start, at each re-plan and when a run
resumes, and `steps_used` at the end; rank 0 prints one line at each.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

from fewshot.config import MINUTES_RULE, Config, parse_minutes
from fewshot.errors import ConfigError

WINDOW_STEPS = 10
STARTUP_WINDOWS = 3
WINDOW_SHARE = 0.02  # the moving window covers at least this share of the budget
REPLAN_BAND = 0.03  # re-plan when the plan would end this share of the budget past it
PLANNED, USED = "planned_steps", "steps_used"  # MLflow metrics


def budget_minutes(value: str | float, source: str = "minutes") -> float:
    """`value`, a number or its text (an environment variable's), as a training budget in
    minutes (config.parse_minutes), else a one-line ConfigError naming `source`."""
    minutes = parse_minutes(value)
    if minutes is None:
        raise ConfigError(f"{source}={value!r}: {MINUTES_RULE}")
    return minutes


def scaled_to(config: Config, steps: int) -> Config:
    """`config` trained for `steps` steps, its schedule scaled by the same factor."""
    t = config.train
    factor = steps / t.steps
    return config.updated(
        {
            "train.steps": steps,
            "train.step_every": max(1, round(t.step_every * factor)),
            # Rounded up (in integers), so the plan never has more rounds than the config.
            "train.eval_every": max(1, min(steps, -(-t.eval_every * steps // t.steps))),
            "train.milestones": [max(1, round(m * factor)) for m in t.milestones],
        }
    )


def fastest_window(seconds: Sequence[float], size: int = WINDOW_STEPS) -> float:
    """Steps per second of the fastest run of `size` consecutive steps whose times are
    `seconds` (whole windows only; at least one)."""
    windows = [sum(seconds[i : i + size]) for i in range(0, len(seconds) - size + 1, size)]
    return size / min(windows)


class Plan:
    """The steps a run trains and their schedule (`config`), planned to fit
    `train.minutes` (module docstring); without minutes, the config as it is."""

    def __init__(self, config: Config) -> None:
        self.asked = config
        self.config = config  # as planned
        self.minutes = config.train.minutes
        self.budget = (self.minutes or math.inf) * 60  # seconds
        self.started = time.monotonic()
        self.before = 0.0  # seconds the run trained before this process (a resumed run)
        self.agreed = 0.0  # the clock at the last step, as every rank saw it
        self.first: int | None = None  # the steps planned at start
        self.replans = 0
        # Set by `observe`: the step at which the start-up speed was measured and the
        # step at which the plan was last made or changed.
        self.measured_at: int | None = None
        self.changed_at: int | None = None
        self.speed: float | None = None  # the start-up speed, steps/s
        self.last: tuple[int, float] | None = None  # the previous step and its clock
        self.startup: list[float] = []  # seconds of the first steps
        self.recent: deque[float] = deque()  # seconds of the moving window's steps
        self.recent_sum = 0.0
        self.round_seconds = 0.0  # the latest round's time beyond its step's

    @property
    def steps(self) -> int:
        return self.config.train.steps

    def clock(self) -> float:
        """Seconds of the run so far, on this process's clock."""
        return self.before + time.monotonic() - self.started

    def unagreed(self) -> float:
        """Seconds since the clock last agreed: what rank 0 adds to the all-reduce."""
        return self.clock() - self.agreed

    def step_seconds(self) -> float:
        return self.recent_sum / len(self.recent)

    def asked_step(self, step: int) -> int:
        """The step of the configured run at the same fraction of training as `step` of
        the planned one: progress that only grows, as steps only shrink."""
        return self.asked.train.steps * step // self.steps

    def observe(self, step: int, clock: float) -> None:
        """Take the run's `clock` after `step`, and re-plan if the budget asks for it."""
        previous, self.last, self.agreed = self.last, (step, clock), clock
        if previous is not None:
            self.timed(previous[0], clock - previous[1], step)
        if self.minutes is None:
            return
        if clock >= self.budget:  # out of time, whatever the estimate said
            self.plan(step, step)
        elif self.first is None:
            if self.speed is not None:
                self.plan(self.fit(step, clock, 1 / self.speed), step)
        elif len(self.recent) >= WINDOW_STEPS:
            end = clock + (self.steps - step) * self.step_seconds() + self.reserve(step)
            if end > self.budget * (1 + REPLAN_BAND):
                self.plan(self.fit(step, clock, self.step_seconds()), step)

    def timed(self, previous: int, seconds: float, step: int) -> None:
        """Count `seconds` between the steps `previous` and `step`: a step's time, or a
        step's and a validation round's, when one ran after `previous` and rounds are
        rarer than the window (otherwise their time is part of each step's)."""
        eval_every = self.config.train.eval_every
        if previous % eval_every == 0 and eval_every > WINDOW_STEPS:
            usual = self.step_seconds() if self.recent else 0.0
            self.round_seconds = max(0.0, seconds - usual)
            return
        if self.speed is None:
            self.startup.append(seconds)
            if len(self.startup) == STARTUP_WINDOWS * WINDOW_STEPS:
                self.speed, self.measured_at = fastest_window(self.startup), step
        if self.minutes is None:
            return
        self.recent.append(seconds)
        self.recent_sum += seconds
        window = self.budget * WINDOW_SHARE
        while len(self.recent) > WINDOW_STEPS and self.recent_sum - self.recent[0] >= window:
            self.recent_sum -= self.recent.popleft()

    def reserve(self, step: int) -> float:
        """Seconds of the validation rounds left, the final one included."""
        return math.ceil((self.steps - step) / self.config.train.eval_every) * self.round_seconds

    def fit(self, step: int, clock: float, step_seconds: float) -> int:
        """The planned steps that fit in the budget at `step_seconds` a step."""
        left = self.budget - clock - self.reserve(step)
        return step + max(0, int(left / step_seconds))

    def plan(self, steps: int, step: int) -> None:
        """Train `steps` (never more than planned, so never more than train.steps)."""
        steps = min(steps, self.steps)
        if self.first is None:
            self.first = steps
        elif steps == self.steps:
            return
        else:
            self.replans += 1  # steps < self.steps: they only shrink
        if steps != self.steps:
            self.config = scaled_to(self.asked, steps)
        self.changed_at = step

    def summary(self, step: int) -> str:
        """The steps trained, in one line, at the end."""
        start = f"{self.first} planned at start" if self.first else "no plan made"
        return (
            f"budget: trained {step} of {self.asked.train.steps} steps in "
            f"{self.clock() / 60:.2f} of {self.minutes:g} min ({start}, re-planned "
            f"{self.replans} times)"
        )

    def line(self, step: int) -> str:
        """The plan made or changed at `step`, in one line."""
        asked, minutes = self.asked.train.steps, f"{self.minutes:g} min"
        if step == self.steps:
            return f"budget: no time left in {minutes}: training stops at step {step} of {asked}"
        if self.replans == 0:
            how = (
                f"{self.speed:.1f} steps/s, the fastest of {STARTUP_WINDOWS} windows of "
                f"{WINDOW_STEPS} steps"
            )
        else:
            how = f"{1 / self.step_seconds():.1f} steps/s over the last {len(self.recent)} steps"
        if self.steps == asked:
            return f"budget: all {asked} steps fit in {minutes} at {how}"
        return (
            f"budget: training {self.steps} of {asked} steps to fit in {minutes} at {how} "
            f"(schedule scaled by {self.steps / asked:.3f})"
        )

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "clock": self.clock(),
            "first": self.first,
            "replans": self.replans,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["steps"] != self.steps:
            self.config = scaled_to(self.asked, state["steps"])
        self.before = self.agreed = state["clock"]
        self.first, self.replans = state["first"], state["replans"]
