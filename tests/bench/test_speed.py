import torch
import torch.nn.functional as F

from fewshot.bench.speed import (
    EpisodeDataset,
    L2LStyleMAML,
    clone_module,
    easyfsl_sampler_shim,
)
from fewshot.config import load_config
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.methods import build_method
from fewshot.streams import Stream


def test_the_learn2learn_style_loop_computes_our_maml_loss_and_gradients(synthetic_store):
    """The speed comparison is fair only if both loops compute the same thing."""
    config = load_config(
        None,
        [
            f"data.path={synthetic_store}",
            "data.image_size=16",
            "backbone.width=4",
            "method.name=maml",
            "method.inner_steps=2",
            "episode.n_way=3",
            "episode.q_query=2",
        ],
    )
    torch.manual_seed(0)
    method = build_method(config, 1).train()
    images = load_split(synthetic_store, ["train"], 16)
    episode = EpisodeSampler(images, 3, 1, 2).episode(Stream.TRAIN, 0, 0)

    ours = method.loss(episode).total
    ours_grads = torch.autograd.grad(ours, list(method.parameters()))

    maml = L2LStyleMAML(method, lr=method.params.inner_lr)
    learner = clone_module(method)
    for _ in range(2):
        maml.adapt(learner, F.cross_entropy(learner(episode.support_x), episode.support_y))
    theirs = F.cross_entropy(learner(episode.query_x), episode.query_y)
    their_grads = torch.autograd.grad(theirs, list(method.parameters()))

    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(ours_grads, their_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_easyfsl_task_sampler_runs_under_the_shim_and_draws_episodes(synthetic_store):
    from easyfsl.samplers import TaskSampler

    easyfsl_sampler_shim()
    dataset = EpisodeDataset(load_split(synthetic_store, ["train"], 16))
    sampler = TaskSampler(dataset, n_way=4, n_shot=1, n_query=2, n_tasks=3)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=sampler.episodic_collate_fn
    )
    support_x, support_y, query_x, query_y, classes = next(iter(loader))
    assert support_x.shape == (4, 1, 16, 16) and query_x.shape == (8, 1, 16, 16)
    assert sorted(support_y.tolist()) == [0, 1, 2, 3] and len(set(classes)) == 4
