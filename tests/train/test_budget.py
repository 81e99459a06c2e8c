"""A run fitted to a time budget (train/budget.py): the rule, and the measured speed."""

import pytest

from fewshot.errors import ConfigError
from fewshot.train.budget import budget_minutes, fit_to_budget, scaled_to, steps_per_second


def recipe(tiny_config):
    return tiny_config(
        "train.steps=15000",
        "train.step_every=3750",
        "train.eval_every=1500",
        "train.schedule=multistep",
        "train.milestones=[7500, 12000]",
    )


def test_a_recipe_that_fits_is_left_as_it_is(tiny_config):
    config = recipe(tiny_config)
    budget = fit_to_budget(config, minutes=40, speed=26.0)  # 15,000 steps: 9.6 min
    assert budget.config == config and not budget.scaled
    assert "within 40 min" in budget.summary()


def test_a_recipe_that_would_overrun_is_scaled_to_the_budget(tiny_config):
    budget = fit_to_budget(recipe(tiny_config), minutes=30, speed=6.5)  # 38.5 min wanted
    t = budget.config.train
    assert t.steps == 11700  # 30 * 60 * 6.5 = 11,700 steps fit, a multiple of 100
    factor = 11700 / 15000
    # the learning rate decays at the same fractions of training
    assert t.step_every == round(3750 * factor) and t.eval_every == round(1500 * factor)
    assert t.milestones == [round(7500 * factor), round(12000 * factor)]
    assert budget.scaled and "training 11700 steps" in budget.summary()


def test_scaling_is_repeatable_so_a_resumed_run_gets_the_same_config(tiny_config):
    config = recipe(tiny_config)
    assert scaled_to(config, 11700) == fit_to_budget(config, 30, speed=6.5).config


def test_a_hopelessly_slow_machine_still_trains_a_hundred_steps(tiny_config):
    assert fit_to_budget(recipe(tiny_config), minutes=1, speed=0.5).config.train.steps == 100


def test_the_speed_is_measured_on_the_runs_own_steps(tiny_config):
    one_task = steps_per_second(tiny_config("episode.meta_batch=1"))
    eight_tasks = steps_per_second(tiny_config("episode.meta_batch=8"))
    assert one_task > 1.5 * eight_tasks  # eight times the work per step


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


@pytest.mark.parametrize("minutes", [0, -1.0, float("nan")])
def test_no_budget_is_scaled_to_a_hundred_steps(tiny_config, minutes):
    # Before, any of these trained 100 steps, and the job promoted the result.
    with pytest.raises(ConfigError, match=r"^minutes=.*: give the training budget as a number"):
        fit_to_budget(recipe(tiny_config), minutes=minutes, speed=26.0)
