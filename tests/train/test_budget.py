"""A run fitted to a wall-clock budget, `train.minutes` (train/budget.py): the plan's
rule on a clock the test drives, the schedule a re-plan leaves, the checkpointed plan,
and a real run that slows down halfway."""

import io
import time

import pytest
import torch
from mlflow import MlflowClient

from fewshot.config import load_config
from fewshot.errors import ConfigError
from fewshot.methods.base import METHODS, register
from fewshot.methods.protonet import ProtoNet
from fewshot.pipeline import train
from fewshot.tracking import tracking_uri
from fewshot.train.budget import (
    PLANNED,
    USED,
    Plan,
    budget_minutes,
    fastest_window,
    scaled_to,
)
from fewshot.train.loop import Worker


def recipe(tiny_config, *overrides):
    return tiny_config(
        "train.steps=15000",
        "train.step_every=3750",
        "train.eval_every=1500",
        "train.schedule=multistep",
        "train.milestones=[7500, 12000]",
        *overrides,
    )


def drive(plan: Plan, seconds_of_step, start: int = 0, clock: float = 0.0) -> float:
    """Step `plan`'s run on a clock the test drives: step i takes seconds_of_step(i), and
    a validation round 1 s; returns the clock when the run ends."""
    step = start
    while step < plan.steps:
        step += 1
        clock += seconds_of_step(step)
        plan.observe(step, clock)
        if step % plan.config.train.eval_every == 0 or step == plan.steps:
            clock += 1.0
    return clock


def test_scaling_keeps_the_schedule_at_the_same_fractions_of_training(tiny_config):
    t = scaled_to(recipe(tiny_config), 11700).train
    factor = 11700 / 15000
    assert t.steps == 11700
    assert t.step_every == round(3750 * factor) and t.eval_every == round(1500 * factor)
    assert t.milestones == [round(7500 * factor), round(12000 * factor)]


def test_scaling_never_adds_an_evaluation_round(tiny_config):
    config = recipe(tiny_config)  # 10 rounds
    for steps in (101, 999, 1234, 7001, 14999):
        t = scaled_to(config, steps).train
        assert steps // t.eval_every + (steps % t.eval_every != 0) <= 10, steps


@pytest.mark.parametrize("text", ["abc", "", "nan", "inf", "-5", "0"])
def test_a_budget_that_is_not_minutes_above_zero_is_one_line(text):
    with pytest.raises(ConfigError) as refused:
        budget_minutes(text, "OMNIGLOT_TRAIN_MINUTES")
    assert str(refused.value) == (
        f"OMNIGLOT_TRAIN_MINUTES={text!r}: give the training budget as a number of minutes "
        "above 0, e.g. 40"
    )


def test_a_budget_of_minutes_is_read_as_a_number():
    assert budget_minutes(" 12.5 ") == 12.5


@pytest.mark.parametrize("value", ["abc", "''", "0", "-1", ".nan", ".inf", "true", "[5]"])
def test_train_minutes_that_are_not_minutes_above_zero_are_one_line(value):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"train.minutes={value}"])
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "train.minutes: give the training budget as a number of minutes above 0, e.g. 40 (got "
    )


def test_train_minutes_default_to_no_budget():
    assert load_config(None, []).train.minutes is None
    assert load_config(None, ["train.minutes=2.5"]).train.minutes == 2.5


def test_the_fastest_window_counts():
    seconds = [0.2] * 10 + [0.05] * 10 + [0.1] * 10  # the first slowed by other work
    assert fastest_window(seconds) == pytest.approx(20.0)
    assert fastest_window([0.1] * 10 + [0.01] * 9) == pytest.approx(10.0)  # whole windows


def test_the_start_up_plan_takes_the_fastest_of_three_windows(tiny_config):
    plan = Plan(recipe(tiny_config, "train.minutes=10"))
    busy = [0.2] * 10 + [0.05] * 10 + [0.1] * 10  # steps 2 to 31; step 1 starts the clock
    clock = 0.0
    for step, seconds in enumerate([0.0, *busy], start=1):
        clock += seconds
        plan.observe(step, clock)
    assert plan.speed == pytest.approx(20.0) and plan.measured_at == plan.changed_at == 31
    # 600 s less the 3.5 s gone, at 20 steps/s: 11,930 steps, not the 15,000 configured
    assert plan.first == plan.steps == 31 + int((600 - clock) * 20) < 15000
    assert plan.config.train.milestones == [round(m * plan.steps / 15000) for m in (7500, 12000)]


def test_a_run_that_slows_down_halfway_ends_within_its_budget(tiny_config):
    plan = Plan(recipe(tiny_config, "train.minutes=10"))
    # All 15,000 steps fit at start (375 s); from step 6000 on, steps take 8 times longer.
    end = drive(plan, lambda step: 0.025 if step <= 6000 else 0.2)
    assert end <= 1.1 * 600
    assert end >= 0.9 * 600  # and uses it
    assert plan.first == 15000 and 6000 < plan.steps < 15000
    assert plan.replans >= 1


def test_a_run_that_fits_is_never_shortened(tiny_config):
    plan = Plan(recipe(tiny_config, "train.minutes=10"))
    drive(plan, lambda step: 0.02)  # 15,000 steps: 300 s and 10 rounds
    assert plan.first == plan.steps == 15000 and plan.replans == 0


def test_a_run_out_of_time_stops_after_the_step_it_is_on(tiny_config):
    plan = Plan(recipe(tiny_config, "train.minutes=1"))
    end = drive(plan, lambda step: 30.0)  # no start-up plan yet: the clock decides
    assert plan.steps == 2 and plan.first == 2 and end <= 60 + 30 + 1


def test_without_minutes_the_plan_is_the_config(tiny_config):
    config = recipe(tiny_config)
    plan = Plan(config)
    drive(plan, lambda step: 0.2 if step > 100 else 0.01)
    assert plan.config is config and plan.first is None and plan.changed_at is None


@pytest.mark.parametrize(
    "schedule",
    [
        ["train.schedule=multistep", "train.milestones=[10, 16]"],
        ["train.schedule=step", "train.step_every=5"],
        ["train.schedule=cosine"],
    ],
    ids=["multistep", "step", "cosine"],
)
def test_a_re_planned_run_follows_the_scaled_schedule_from_the_step_it_re_plans(
    tiny_config, schedule
):
    config = tiny_config("train.steps=20", "train.lr=0.1", "train.minutes=10", *schedule)
    worker = Worker(config)
    for _ in range(4):
        worker.train_step()
    worker.plan.plan(10, worker.step)  # halve the run at step 4
    worker.follow_plan()
    rates = [worker.train_step()["lr"] for _ in range(6)]
    planned = Worker(scaled_to(config, 10))  # the run planned so from the start
    expected = [planned.train_step()["lr"] for _ in range(10)][4:]
    assert rates == pytest.approx(expected)
    assert worker.step == worker.config.train.steps == 10


def test_a_resumed_run_continues_its_plan(tiny_config):
    config = tiny_config("train.steps=20", "train.schedule=cosine", "train.minutes=10")
    worker = Worker(config)
    for _ in range(3):
        worker.train_step()
    for steps in (16, 12):  # planned at start, then re-planned
        worker.plan.plan(steps, worker.step)
    worker.follow_plan()
    worker.train_step()
    state = worker.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = Worker(config)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.config == worker.config == scaled_to(config, 12)
    assert resumed.plan.clock() > state["budget"]["clock"]  # goes on from the checkpoint's
    assert resumed.plan.first == worker.plan.first and resumed.plan.replans == 1
    assert [resumed.train_step() for _ in range(8)] == [worker.train_step() for _ in range(8)]
    assert resumed.step == 12


MINUTES = 0.15  # 9 s


class SlowAfterHalf(ProtoNet):
    """ProtoNet whose training steps take SLOW seconds more once 40% of the budget has
    passed since it was built (with the run's Worker): a machine that gets busy partway
    through a run. A sleep, so no contention from other work can flip the result."""

    name = "slow_after_half"
    SLOW, AFTER = 0.3, 0.4 * MINUTES * 60
    born: list[float] = []  # when each was built
    slowed: list[int] = []  # the steps it slowed

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        SlowAfterHalf.born.append(time.time())

    def loss(self, episode, start=0):
        if self.training and time.time() - self.born[-1] > self.AFTER:
            self.slowed.append(1)  # one task a step (episode.meta_batch=1)
            time.sleep(self.SLOW)
        return super().loss(episode, start)


@pytest.fixture
def slowing():
    register(SlowAfterHalf)
    yield
    del METHODS[SlowAfterHalf.name]


def test_a_run_slowed_halfway_ends_within_its_minutes_and_logs_its_steps(
    workdir, synthetic_store, slowing
):
    config = load_config(
        None,
        [
            f"data.path={synthetic_store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            "episode.meta_batch=1",
            f"method.name={SlowAfterHalf.name}",
            "train.steps=100000",  # at full speed (20 to 40 steps/s here) an hour or more
            "train.eval_every=20000",
            "train.log_every=1000",
            "train.val_episodes=2",
            "evaluate.episodes=2",
            # One execution, so no runtime probe calls the method's loss.
            "train.precision=fp32",
            "train.channels_last=false",
            f"train.minutes={MINUTES}",
            "name=budget",
        ],
    )
    result = train(config)
    client = MlflowClient(tracking_uri())
    (used,) = client.get_metric_history(result.run_id, USED)
    planned = [m.value for m in client.get_metric_history(result.run_id, PLANNED)]
    # From the Worker's start (its method built) to the end of training, the final
    # round included: within the minutes plus 10%.
    assert used.timestamp / 1000 - SlowAfterHalf.born[-1] <= 1.1 * MINUTES * 60
    assert SlowAfterHalf.slowed  # it trained on after the slow-down
    assert used.value == used.step < 100000
    # Planned at start, then only ever shrunk, to the steps it trained.
    assert planned == sorted(planned, reverse=True) and planned[-1] == used.value
