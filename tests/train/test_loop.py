import io

import pytest
import torch

from fewshot.errors import DataError
from fewshot.train.comm import Comm
from fewshot.train.datasets import Datasets
from fewshot.train.loop import Worker

LOOP = [
    "train.steps=6",
    "train.eval_every=3",
    "train.val_episodes=4",
    "train.lr=0.01",
    "train.schedule=step",
    "train.step_every=2",
    "train.gamma=0.5",
]
# Pre-training, then hard tasks from a buffer of failure classes: part of the state.
MTL = ["method.name=mtl", "pretrain.steps=3", "method.inner_steps=1", "method.hard_tasks=2"]


@pytest.fixture(scope="module")
def small_config(tiny_config):
    return lambda *overrides: tiny_config(*LOOP, *overrides)


@pytest.fixture(scope="module")
def data(small_config):
    return Datasets.load(small_config())


def run(worker: Worker, steps: int) -> list[dict]:
    if worker.needs_pretraining():
        worker.pretrain(lambda step, metrics: None)
    return [worker.train_step() for _ in range(steps)]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=protonet"],
        ["method.name=maml", "method.inner_steps=1"],
        # Clusters recomputed on the embeddings at steps 0, 2, 4: part of the state.
        ["task_mixup.strategy=datg", "task_mixup.recluster_every=2"],
        MTL,
    ],
    ids=["protonet", "maml", "datg", "mtl"],
)
def test_resumed_run_equals_unbroken_run(small_config, data, overrides):
    config = small_config(*overrides)
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


def test_schedule_and_metrics(small_config, data):
    worker = Worker(small_config(), data=data)
    metrics = run(worker, 5)
    assert [round(m["lr"], 6) for m in metrics] == [0.01, 0.005, 0.005, 0.0025, 0.0025]
    assert {"loss", "acc", "ce", "lr"} <= set(metrics[0])
    assert all(0.0 <= m["acc"] <= 1.0 for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["ce"])


def test_multistep_schedule_decays_at_its_milestones(small_config, data):
    config = small_config("train.schedule=multistep", "train.milestones=[1, 3]")
    metrics = run(Worker(config, data=data), 4)
    assert [round(m["lr"], 6) for m in metrics] == [0.005, 0.005, 0.0025, 0.0025]


def test_meta_batch_gradient_is_the_mean_of_task_gradients(small_config, data):
    """The loop's step on B tasks uses the mean of the B per-task gradients."""
    config = small_config(
        "train.precision=fp32",  # the reference below computes in fp32
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


def test_validation_is_deterministic_and_restores_train_mode(small_config, data):
    worker = Worker(small_config(), data=data)
    a, b = worker.validate(), worker.validate()
    assert a == b and 0.0 <= a <= 1.0
    assert worker.method.training


def test_hard_tasks_are_built_from_exactly_the_recorded_failure_classes(small_config, data):
    config = small_config(
        "method.name=mtl",
        "pretrain.steps=2",
        "method.inner_steps=1",
        "method.hard_tasks=3",
        "episode.n_way=3",
        "episode.meta_batch=3",
    )
    worker = Worker(config, data=data)
    step_classes = []
    task_loss = worker.tasks.loss

    def recording(*task):
        loss, episode = task_loss(*task)
        step_classes.append(set(episode.classes.tolist()))
        return loss, episode

    worker.tasks.loss = recording
    hard_classes = []
    hard_loss = worker.hard_tasks.loss

    def recording_hard(*task):
        loss, episode = hard_loss(*task)
        hard_classes.append(episode.classes.tolist())
        return loss, episode

    worker.hard_tasks.loss = recording_hard
    for _ in range(4):
        before = len(hard_classes)
        metrics = worker.train_step()
        failures = list(worker.hard_tasks.failures)
        # every recorded failure class belongs to a task the model just trained on
        assert all(any(c in classes for classes in step_classes) for c in failures)
        if len(failures) >= 3:
            assert "hard_acc" in metrics
            for classes in hard_classes[before:]:
                assert len(classes) == 3 and set(classes) <= set(failures)
    assert hard_classes, "no hard meta-batch ran"


def test_a_checkpoint_of_the_old_format_resumes_exactly(small_config, data):
    """Checkpoints written while the failure classes lived in the Worker (keys step, model,
    optimizer, scheduler, pretrained, failures, mixup) continue as an unbroken run."""
    config = small_config(*MTL)
    full = run(Worker(config, data=data), 6)
    first = Worker(config, data=data)
    run(first, 3)
    state = first.state_dict()
    old = {k: state[k] for k in ("step", "model", "optimizer", "scheduler", "pretrained", "mixup")}
    old["failures"] = state["hard_tasks"]["failures"]
    assert old["failures"]  # the memory is part of what must carry over
    resumed = Worker(config, data=data)
    resumed.load_state_dict(old)
    assert run(resumed, 3) == full[3:]


def test_a_run_without_hard_tasks_all_reduces_only_gradients_and_metrics(small_config, data):
    worker = Worker(small_config(), data=data)
    sizes = []

    def all_reduce_sum(flat):
        sizes.append(flat.numel())
        return flat

    worker.comm.all_reduce_sum = all_reduce_sum
    metrics = worker.train_step()
    metric_sums = len(metrics) - 1  # every metric but the learning rate is a sum of tasks'
    assert sizes == [sum(p.numel() for p in worker.params) + metric_sums]


def test_train_classes_restricts_the_base_classes(small_config):
    config = small_config("data.train_classes=12")
    few = Datasets.load(config)
    full = Datasets.load(small_config())
    assert few.train.n_classes == 12 and len(few.train.labels) == 12 * 10
    assert set(few.train.class_names) < set(full.train.class_names)
    assert Datasets.load(config).train.class_names == few.train.class_names  # fixed by seed
    with pytest.raises(DataError, match="data.train_classes"):
        Datasets.load(small_config("data.train_classes=999"))


def test_a_budgeted_run_adds_only_its_clock_to_the_all_reduce(small_config, data):
    worker = Worker(small_config("train.minutes=5"), data=data)
    sizes = []

    def all_reduce_sum(flat):
        sizes.append(flat.numel())
        return flat

    worker.comm.all_reduce_sum = all_reduce_sum
    metrics = worker.train_step()
    metric_sums = len(metrics) - 1
    assert sizes == [sum(p.numel() for p in worker.params) + metric_sums + 1]


class RankOneOfTwo(Comm):
    """Rank 1 of 2 whose partner, rank 0, sends what this rank sends, but its clock: 100 s
    since the clock last agreed (this rank adds 0)."""

    rank, world_size = 1, 2

    def all_reduce_sum(self, flat):
        partner = flat.clone()
        partner[-1] = 100.0
        return flat + partner


def test_every_rank_plans_on_rank_0s_clock(small_config, data):
    worker = Worker(small_config("train.minutes=1"), RankOneOfTwo(), data=data)
    worker.train_step()
    assert worker.plan.clock() < 60  # this rank's own clock: a second or so
    assert worker.plan.agreed == pytest.approx(100.0)  # rank 0's
    assert worker.config.train.steps == worker.step == 1  # so it stops with rank 0
