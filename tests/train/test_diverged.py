"""A run whose loss or weights stop being finite ends with one line, and nothing
non-finite is saved, marked finished or registered (train/loop.py)."""

import math

import pytest
from mlflow import MlflowClient
from ray.train import WorkerGroupError
from ray.train.v2._internal.util import construct_user_exception_with_traceback

from fewshot.config import load_config
from fewshot.errors import ConfigError
from fewshot.methods.base import METHODS, register
from fewshot.methods.protonet import ProtoNet
from fewshot.model_file import load_checkpoint
from fewshot.pipeline import train
from fewshot.train.distributed import worker_mistake
from fewshot.train.loop import Worker, fit

TASKS_PER_STEP = 2  # episode.meta_batch below


class NanFromStep3(ProtoNet):
    """ProtoNet whose training loss turns NaN at the third step: a run that diverges."""

    name = "nan_from_step_3"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses = 0

    def loss(self, episode, start=0):
        loss = super().loss(episode, start)
        self.losses += 1
        if self.losses > 2 * TASKS_PER_STEP:
            loss.total = loss.total * math.nan
        return loss


class NanGradients(ProtoNet):
    """ProtoNet whose loss stays finite but whose gradients are NaN (0 * the infinite
    slope of sqrt at 0): the weights, not the loss, go non-finite."""

    name = "nan_gradients"

    def loss(self, episode, start=0):
        loss = super().loss(episode, start)
        weight = next(iter(self.parameters()))
        loss.total = loss.total + (0 * weight.sum()).sqrt()
        return loss


@pytest.fixture
def diverging():
    """The methods registered by name, as a plug-in method would be, for one test only."""
    for cls in (NanFromStep3, NanGradients):
        register(cls)
    yield
    for cls in (NanFromStep3, NanGradients):
        del METHODS[cls.name]


def config(store, *overrides):
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            f"episode.meta_batch={TASKS_PER_STEP}",
            "train.steps=6",
            "train.eval_every=2",
            "train.val_episodes=4",
            "evaluate.episodes=4",
            # One execution, so no runtime probe calls the method's loss.
            "train.precision=fp32",
            "train.channels_last=false",
            "name=unit",
            *overrides,
        ],
    )


def test_a_loss_made_nan_at_step_3_stops_the_run_and_nothing_is_finished_or_registered(
    workdir, synthetic_store, diverging
):
    cfg = config(synthetic_store, f"method.name={NanFromStep3.name}", "registry.register=true")
    with pytest.raises(ConfigError) as stopped:
        train(cfg)
    message = str(stopped.value)
    assert message.startswith("train.lr: the training loss is nan at step 3, so training stopped")
    assert "(train.lr = 0.001)" in message and "\n" not in message
    run_dir = workdir / "runs" / "unit"
    assert not (run_dir / "model.pt").exists()  # the run does not look finished
    # The checkpoint of step 2, before the loss went NaN, stays, all finite.
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 2
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
    client = MlflowClient("sqlite:///mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fewshot").experiment_id])
    assert run.info.status == "FAILED" and "test_acc" not in run.data.metrics
    assert client.search_registered_models() == []


def test_weights_made_non_finite_by_the_last_step_are_refused_before_the_round_saves_them(
    synthetic_store, diverging
):
    worker = Worker(config(synthetic_store, f"method.name={NanGradients.name}", "train.steps=1"))
    rounds = []
    expected = r"^train.lr: the weights are not finite at step 1, .*\(train.lr = 0.001\)"
    with pytest.raises(ConfigError, match=expected):
        fit(worker, lambda step, metrics: None, lambda w, metrics: rounds.append(metrics))
    assert rounds == []  # nothing validated or checkpointed


def test_a_ray_workers_one_line_error_is_raised_as_it_was():
    try:  # wrapped as Ray wraps what a worker raised: with its traceback, as text
        raise ConfigError("train.lr: the training loss is nan at step 3, so training stopped")
    except ConfigError as raised:
        wrapped = construct_user_exception_with_traceback(raised)
    failed = WorkerGroupError("rank 0 failed", {0: wrapped, 1: wrapped})
    assert str(worker_mistake(failed)).startswith("train.lr: the training loss is nan at step 3")
    assert worker_mistake(WorkerGroupError("lost", {0: RuntimeError("gloo")})) is None
