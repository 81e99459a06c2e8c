import io

import pytest
import torch

from fewshot.config import load_config
from fewshot.train.loop import Datasets, Worker


def small_config(store, *overrides):
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            "episode.meta_batch=2",
            "train.steps=6",
            "train.eval_every=3",
            "train.val_episodes=4",
            "train.lr=0.01",
            "train.schedule=step",
            "train.step_every=2",
            "train.gamma=0.5",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def data(synthetic_store):
    return Datasets.load(small_config(synthetic_store))


def run(worker: Worker, steps: int) -> list[dict]:
    return [worker.train_step() for _ in range(steps)]


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_resumed_run_equals_unbroken_run(synthetic_store, data, method):
    config = small_config(
        synthetic_store,
        f"method.name={method}",
        "method.inner_steps=1" if method == "maml" else "method.distance=euclidean",
    )
    unbroken = Worker(config, data=data)
    full = run(unbroken, 6)
    first = Worker(config, data=data)
    run(first, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = Worker(config, data=data)  # a new process would start from fresh weights
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    rest = run(resumed, 3)
    assert rest == full[3:]  # identical losses, accuracies and learning rates
    for (name, a), b in zip(
        unbroken.method.state_dict().items(), resumed.method.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_schedule_and_metrics(synthetic_store, data):
    worker = Worker(small_config(synthetic_store), data=data)
    metrics = run(worker, 5)
    assert [round(m["lr"], 6) for m in metrics] == [0.01, 0.005, 0.005, 0.0025, 0.0025]
    assert {"loss", "acc", "ce", "lr"} <= set(metrics[0])
    assert all(0.0 <= m["acc"] <= 1.0 for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["ce"])


def test_meta_batch_gradient_is_the_mean_of_task_gradients(synthetic_store, data):
    """The loop's step on B tasks uses the mean of the B per-task gradients."""
    config = small_config(
        synthetic_store,
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.lr=1.0",
        "train.schedule=constant",
    )
    worker = Worker(config, data=data)
    before = {n: p.detach().clone() for n, p in worker.method.named_parameters()}
    worker.train_step()
    reference = Worker(config, data=data)
    torch.manual_seed(0)
    grads = []
    for task in range(2):
        reference.method.zero_grad()
        episode = reference.sampler.episode(0, config.seed, 0, task)
        reference.method.loss(episode).total.backward()
        grads.append({n: p.grad.clone() for n, p in reference.method.named_parameters()})
    for name, param in worker.method.named_parameters():
        expected = before[name] - (grads[0][name] + grads[1][name]) / 2
        torch.testing.assert_close(param.detach(), expected, rtol=1e-4, atol=1e-5)


def test_validation_is_deterministic_and_restores_train_mode(synthetic_store, data):
    worker = Worker(small_config(synthetic_store), data=data)
    a, b = worker.validate(), worker.validate()
    assert a == b and 0.0 <= a <= 1.0
    assert worker.method.training
