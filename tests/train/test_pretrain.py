import numpy as np
import pytest
import torch

from fewshot.config import load_config
from fewshot.evaluate import evaluate_method
from fewshot.train.loop import Worker, fit
from fewshot.train.pretrain import batch_indices


@pytest.fixture
def config(tiny_config):
    return lambda *overrides: tiny_config(
        "train.log_every=10", "tracking.enabled=false", *overrides
    )


def test_batches_are_fixed_by_seed_and_step_without_repeats():
    a = batch_indices(100, 32, seed=0, step=5)
    assert len(set(a.tolist())) == 32 and a.max() < 100
    assert np.array_equal(a, batch_indices(100, 32, seed=0, step=5))
    assert not np.array_equal(a, batch_indices(100, 32, seed=0, step=6))
    assert len(batch_indices(10, 32, seed=0, step=0)) == 10


def test_pretraining_learns_the_base_classes_and_leaves_the_backbone_frozen(config):
    """36 base classes: chance is 2.8%. 120 steps of 64 images reach 78% on the last
    logged batch here (67% ten steps earlier); 40% leaves room for a batch's noise
    (+-5 points) and other CPUs' numerics, and is still 14x chance."""
    worker = Worker(config("method.name=mtl", "pretrain.steps=120", "pretrain.lr=0.003"))
    before = [p.detach().clone() for p in worker.method.backbone.parameters()]
    logged = []
    worker.pretrain(lambda step, metrics: logged.append((step, metrics)))
    assert [step for step, _ in logged] == list(range(10, 121, 10))
    assert logged[-1][1]["pretrain_acc"] >= 0.4, logged[-1]
    after = list(worker.method.backbone.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(not p.requires_grad for p in after)  # MTL meta-trains on a frozen backbone
    worker.method.train()
    assert not worker.method.backbone.training  # and keeps its batch-norm statistics
    assert worker.pretrained and not worker.needs_pretraining()


def test_pretraining_alone_lifts_few_shot_accuracy_on_fixed_episodes_of_new_alphabets(
    omniglot_store,
):
    """ProtoNet on a conv4 (width 16) pre-trained for 150 steps on small1's characters,
    before any episode, against the same backbone untrained: 5-way 1-shot on small2's
    own alphabets. Measured: 35% -> 69%, 33% -> 68%, 37% -> 66% for seeds 0, 1, 2 (a
    fixed episode set's noise is +-2 points); +20 points is the bar."""
    config = load_config(
        None,
        [
            f"data.path={omniglot_store}",
            "data.train_split=small1",
            "data.val_split=null",
            "data.test_split=small2",
            "backbone.width=16",
            "tracking.enabled=false",
            "train.threads=1",
            "pretrain.steps=150",
            "pretrain.lr=0.003",
            "evaluate.episodes=100",
        ],
    )
    worker = Worker(config)
    start = evaluate_method(worker.method, config).mean
    worker.pretrain(lambda step, metrics: None)
    assert evaluate_method(worker.method, config).mean >= start + 0.2


def test_fit_pretrains_once_then_checkpoints_before_meta_training(config):
    worker = Worker(
        config(
            "method.name=cfn",
            "pretrain.steps=10",
            "train.steps=2",
            "train.eval_every=2",
            "train.val_episodes=2",
        )
    )
    events = []
    fit(
        worker,
        lambda step, metrics: events.append(("log", step, sorted(metrics))),
        lambda w, metrics: events.append(("round", w.step, w.pretrained)),
    )
    assert events[0] == ("log", 10, ["pretrain_acc", "pretrain_loss"])
    assert events[1] == ("round", 0, True)  # the pre-trained backbone is checkpointed
    assert events[-1] == ("round", 2, True)
    assert not worker.needs_pretraining()
