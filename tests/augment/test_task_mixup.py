import numpy as np
import pytest
import torch

from fewshot.augment.task_mixup import balance, kmeans, mix, mmd2
from fewshot.errors import ConfigError
from fewshot.train.datasets import Datasets
from fewshot.train.loop import Worker


@pytest.fixture(scope="module")
def data(tiny_config):
    return Datasets.load(tiny_config())


@pytest.fixture(scope="module")
def worker(tiny_config, data):
    def make(*overrides) -> Worker:
        w = Worker(tiny_config("tracking.enabled=false", *overrides), data=data)
        if w.mixup.due(0):
            w.recluster()
        return w

    return make


def test_mmd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert mmd2(x, x).item() == pytest.approx(0.0, abs=1e-6)
    shifted = [mmd2(x, x + shift).item() for shift in (0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(shifted, shifted[1:], strict=False)), shifted
    assert shifted[0] > 0


def test_mix_is_the_convex_combination():
    a, b = torch.full((2, 3), 2.0), torch.full((2, 3), 10.0)
    assert torch.equal(mix(a, b, 1.0), a)
    torch.testing.assert_close(mix(a, b, 0.25), torch.full((2, 3), 8.0))


def test_kmeans_finds_two_blobs_and_balance_fills_small_clusters():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0, 0.1, (6, 2)), rng.normal(5, 0.1, (2, 2))])
    labels = kmeans(blobs, 2, seed=0)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    centres = np.stack([blobs[labels == c].mean(0) for c in range(2)])
    balanced = balance(labels, blobs, centres, min_size=4)
    assert sorted(np.bincount(balanced)) == [4, 4]
    assert (balanced[6:] == labels[6]).all()  # the small cluster keeps its own classes


def test_lambda_one_reproduces_the_first_task(worker, monkeypatch):
    w = worker("task_mixup.strategy=mlti")
    for layer in range(w.method.mixup_layers() + 1):
        monkeypatch.setattr(w.mixup, "draws", lambda step, task, top, layer=layer: (layer, 1.0))
        torch.manual_seed(0)
        mixed, first = w.mixup.loss(w.method, 0, 0, w.to_device)
        torch.manual_seed(0)
        plain = w.method.loss(first)
        torch.testing.assert_close(mixed.total, plain.total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed.logits, plain.logits, rtol=1e-5, atol=1e-5)


def test_mixed_tasks_keep_the_episode_shape(worker, monkeypatch):
    w = worker("task_mixup.strategy=mlti")
    seen = []
    loss_of = w.method.loss
    monkeypatch.setattr(w.method, "loss", lambda e, start=0: seen.append(e) or loss_of(e, start))
    for task in range(4):
        w.mixup.loss(w.method, 3, task, w.to_device)
    for episode in seen:
        assert len(episode.support_x) == 5 * 1 and len(episode.query_x) == 5 * 3
        assert episode.support_y.tolist() == list(range(5))


def test_cluster_pairing_never_mixes_tasks_of_one_cluster(worker, data):
    w = worker("task_mixup.strategy=cluster", "task_mixup.clusters=3")
    cluster_of = {c: i for i, members in enumerate(w.mixup.clusters) for c in members}
    assert len(cluster_of) == data.train.n_classes
    assert min(len(members) for members in w.mixup.clusters) >= 5
    for step in range(10):
        homes = set()
        for task in range(4):
            first, second = w.mixup.pair(step, task)
            home = {cluster_of[c] for c in first.classes.tolist()}
            away = {cluster_of[c] for c in second.classes.tolist()}
            assert len(home) == 1 and len(away) == 1 and home != away
            homes |= home
        assert len(homes) == 1  # one meta-batch, one cluster


def test_mlti_pairs_at_random_and_datg_adds_the_weighted_mmd(worker):
    mlti = worker("task_mixup.strategy=mlti")
    loss, _ = mlti.mixup.loss(mlti.method, 0, 0, mlti.to_device)
    assert set(loss.parts) == {"ce"}
    datg = worker("task_mixup.strategy=datg", "task_mixup.mmd_weight=3")
    loss, _ = datg.mixup.loss(datg.method, 0, 0, datg.to_device)
    assert loss.parts["mmd"].item() > 0
    expected = loss.parts["ce"] + 3 * loss.parts["mmd"]
    torch.testing.assert_close(loss.total, expected)


def test_probability_zero_trains_on_real_tasks_only(worker):
    w = worker("task_mixup.strategy=datg", "task_mixup.probability=0")
    for task in range(3):
        first, second = w.mixup.pair(0, task)
        assert second is None
        assert torch.equal(first.classes, w.sampler.episode(0, 0, 0, task).classes)


def test_maml_mixes_below_its_adapted_layers(worker):
    last = worker(
        "method.name=maml",
        "method.adapt=last_block",
        "task_mixup.strategy=mlti",
        "method.inner_steps=1",
    )
    assert last.method.mixup_layers() == last.method.backbone.n_layers - 1
    every = worker(
        "method.name=maml",
        "task_mixup.strategy=mlti",
        "method.inner_steps=1",
    )
    assert every.method.mixup_layers() == 0
    loss, _ = last.mixup.loss(last.method, 0, 1, last.to_device)
    assert torch.isfinite(loss.total)


def test_bad_combinations_are_refused(worker):
    with pytest.raises(ConfigError, match="task_mixup.clusters"):
        worker("task_mixup.strategy=datg", "task_mixup.clusters=8")
    with pytest.raises(ConfigError, match="task_mixup.strategy"):
        worker("method.name=cfn", "pretrain.steps=1", "task_mixup.strategy=mlti")
