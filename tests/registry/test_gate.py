"""The promotion gate: paired test, alias moves, and every decision in the version tags."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats

from fewshot.errors import RegistryError
from fewshot.registry.gate import paired_test, promote
from fewshot.registry.versions import register


def test_paired_test_agrees_with_scipy_and_respects_the_margin():
    rng = np.random.default_rng(0)
    champion = rng.uniform(0.4, 0.8, 200)
    challenger = np.clip(champion + rng.normal(0.03, 0.05, 200), 0, 1)
    result = paired_test(challenger, champion, margin=0.0, confidence=0.95)
    reference = stats.ttest_rel(challenger, champion, alternative="greater")
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.passed and 0 < result.lower < result.difference
    # The same difference does not clear a margin above it.
    assert not paired_test(challenger, champion, margin=0.05, confidence=0.95).passed
    # Worse, or equal on every episode: refused.
    assert not paired_test(champion, challenger, 0.0, 0.95).passed
    same = paired_test(champion, champion, 0.0, 0.95)
    assert not same.passed and same.difference == 0 and same.p_value == 1.0


def tags(uri: str, name: str, version: str) -> dict[str, str]:
    return MlflowClient(uri).get_model_version(name, version).tags


def aliases(uri: str, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in MlflowClient(uri).get_registered_model(name).aliases.items()}


@pytest.mark.slow
def test_worse_challenger_is_refused_better_one_promoted_and_both_recorded(omniglot_runs):
    runs = omniglot_runs
    uri = runs.uri
    register(runs.ids["untrained"], "gate", uri=uri)
    first = promote("gate", uri=uri)
    assert first.outcome == "first" and aliases(uri, "gate") == {"champion": "1"}
    assert tags(uri, "gate", "1")["gate.champion_acc"] == "none"

    register(runs.ids["good"], "gate", uri=uri)
    better = promote("gate", uri=uri)
    assert better.outcome == "promoted", better.summary()
    assert aliases(uri, "gate") == {"champion": "2"}  # the challenger alias is spent
    recorded = tags(uri, "gate", "2")
    assert recorded["gate.decision"] == "promoted" and recorded["gate.champion_version"] == "1"
    assert float(recorded["gate.challenger_acc"]) > float(recorded["gate.champion_acc"]) + 0.1
    assert float(recorded["gate.p_value"]) < 0.05 and recorded["gate.passed"] == "true"
    assert recorded["gate.episodes"] == "100" and recorded["gate.split"] == "small2"

    # A worse challenger, through the command line: refused, exit status 1, champion stays.
    register(runs.ids["untrained"], "gate", uri=uri)
    refused = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "promote", "gate"],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert refused.returncode == 1, refused.stderr
    assert "gate version 3: refused" in refused.stdout
    assert aliases(uri, "gate") == {"champion": "2", "challenger": "3"}
    recorded = tags(uri, "gate", "3")
    assert recorded["gate.decision"] == "refused" and recorded["gate.passed"] == "false"
    # The champion's score is the one it had as a challenger: the same fixed episodes.
    assert recorded["gate.champion_acc"] == tags(uri, "gate", "2")["gate.challenger_acc"]
    assert float(recorded["gate.challenger_acc"]) < float(recorded["gate.champion_acc"])

    forced = promote("gate", force="rollback drill", uri=uri)
    assert forced.outcome == "forced" and aliases(uri, "gate") == {"champion": "3"}
    recorded = tags(uri, "gate", "3")
    assert recorded["gate.decision"] == "forced" and recorded["gate.reason"] == "rollback drill"
    assert recorded["gate.passed"] == "false"  # what the test said, kept beside the override


def test_champion_and_challenger_are_scored_on_the_same_episodes(tiny_runs):
    """The same run registered twice scores identically episode by episode: a difference of
    exactly zero, so the gate refuses (it needs a real improvement)."""
    uri = tiny_runs.uri
    for _ in range(2):
        register(tiny_runs.ids["tiny"], "twins", uri=uri)
    promote("twins", version="1", uri=uri)
    decision = promote("twins", uri=uri)
    assert decision.outcome == "refused"
    assert decision.test.difference == 0.0 and decision.test.p_value == 1.0
    assert decision.challenger_score == decision.champion_score


def test_models_of_other_input_sizes_are_not_compared_unless_forced(tiny_runs):
    uri = tiny_runs.uri
    register(tiny_runs.ids["tiny"], "sizes", uri=uri)
    promote("sizes", uri=uri)
    register(tiny_runs.ids["tiny28"], "sizes", uri=uri)
    with pytest.raises(RegistryError, match="takes 16px 1-channel images, the challenger 28px"):
        promote("sizes", uri=uri)
    forced = promote("sizes", force="new input size", uri=uri)
    assert forced.outcome == "forced" and forced.champion_score is None
    assert tags(uri, "sizes", "2")["gate.champion_acc"] == "none"


@pytest.fixture(scope="module")
def options(tiny_runs) -> str:
    """A registered model with a challenger, for the option checks."""
    register(tiny_runs.ids["tiny"], "options", uri=tiny_runs.uri)
    return "options"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "absent"}, "registered model 'absent' does not exist"),
        ({"name": "bad/name"}, "model name 'bad/name': use 1 to 100 letters"),
        ({"version": "9"}, "options has no version '9'"),
        ({"force": " "}, "--force needs a reason"),
        ({"confidence": 1.5}, "--confidence 1.5: use a value in [0.5, 1)"),
        ({"margin": -0.1}, "--margin -0.1: use an accuracy difference in [0, 1)"),
        ({"episodes": 1}, "--episodes 1: a paired test needs at least 2"),
    ],
)
def test_bad_gate_requests_are_one_line_errors(tiny_runs, options, kwargs, message):
    arguments = {"name": options, **kwargs}
    with pytest.raises(RegistryError) as caught:
        promote(arguments.pop("name"), uri=tiny_runs.uri, **arguments)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
