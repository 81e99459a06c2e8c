import numpy as np
import pytest
import torch

from fewshot.data.episodes import EpisodeSampler, tasks_for_rank
from fewshot.data.reader import load_split
from fewshot.errors import DataError
from fewshot.streams import Stream


@pytest.fixture(scope="module")
def small1(omniglot_store):
    return load_split(omniglot_store, "small1", 28)


def test_episode_shapes_labels_and_disjointness(small1):
    sampler = EpisodeSampler(small1, n_way=5, k_shot=2, q_query=3)
    classes, indices = sampler.sample_indices(np.random.default_rng(0))
    episode = sampler.build(classes, indices)
    assert episode.support_x.shape == (10, 1, 28, 28) and episode.query_x.shape == (15, 1, 28, 28)
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sorted(set(episode.query_y.tolist())) == [0, 1, 2, 3, 4]
    assert len(set(classes.tolist())) == 5  # no class repeats
    assert len(set(indices.reshape(-1).tolist())) == 25  # support and query disjoint
    for row, cls in zip(indices, classes, strict=True):  # every image is of its class
        assert set(small1.labels[row].tolist()) == {int(cls)}
    # Normalised with the dataset's statistics.
    expected = (small1.images[indices[0, 0]].float() / 255 - small1.mean[0]) / small1.std[0]
    torch.testing.assert_close(episode.support_x[0], expected)


def test_same_key_same_episode_other_keys_differ(small1):
    sampler = EpisodeSampler(small1, 5, 1, 5)
    a, b = sampler.episode(Stream.TRAIN, 7, 3, 0), sampler.episode(Stream.TRAIN, 7, 3, 0)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.query_x, b.query_x)
    others = [
        sampler.episode(Stream.TRAIN, 7, 3, 1),
        sampler.episode(Stream.TRAIN, 7, 4, 0),
        sampler.episode(Stream.TRAIN, 8, 3, 0),
        sampler.episode(Stream.TEST, 7, 3, 0),
    ]
    assert all(not torch.equal(a.support_x, o.support_x) for o in others)


def test_ranks_split_the_meta_batch_and_union_is_the_prescribed_batch():
    assert list(tasks_for_rank(8, 0, 1)) == list(range(8))
    halves = [list(tasks_for_rank(8, r, 2)) for r in range(2)]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(8))
    thirds = [list(tasks_for_rank(7, r, 3)) for r in range(3)]
    assert sorted(sum(thirds, [])) == list(range(7))


def test_within_group_keeps_every_episode_in_one_alphabet(small1):
    sampler = EpisodeSampler(small1, 20, 1, 1, within_group=True)
    seen = set()
    for task in range(30):
        episode = sampler.episode(Stream.TRAIN, 0, 0, task)
        groups = {small1.class_groups[c] for c in episode.classes.tolist()}
        assert len(groups) == 1
        seen |= groups
    assert len(seen) > 1  # but different episodes visit different alphabets


def test_class_pool_and_given_classes(small1):
    pool = list(range(10, 20))
    sampler = EpisodeSampler(small1, 5, 1, 2, class_pool=pool)
    for task in range(20):
        assert set(sampler.episode(Stream.TRAIN, 0, 0, task).classes.tolist()) <= set(pool)
    episode = sampler.episode_of_classes([3, 1, 4, 15, 9], Stream.TRAIN, 0, 0)
    assert episode.classes.tolist() == [3, 1, 4, 15, 9]


def test_fixed_test_episodes_do_not_depend_on_anything_but_their_seed(small1):
    a = list(EpisodeSampler(small1, 5, 1, 3).fixed_episodes(4, seed=0))
    b = list(EpisodeSampler(small1, 5, 1, 3).fixed_episodes(4, seed=0))
    assert all(torch.equal(x.query_x, y.query_x) for x, y in zip(a, b, strict=True))


def test_impossible_requests_are_refused(small1):
    with pytest.raises(DataError, match="fewer than k_shot \\+ q_query = 25"):
        EpisodeSampler(small1, 5, 5, 20)
    with pytest.raises(DataError, match="n_way = 60 but any single group"):
        EpisodeSampler(small1, 60, 1, 1, within_group=True)
    with pytest.raises(DataError, match="n_way = 200"):
        EpisodeSampler(small1, 200, 1, 1)
