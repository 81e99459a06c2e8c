"""data.val_groups: validation classes held out of the train split, whole groups apart."""

import pytest

from fewshot.config import load_config
from fewshot.errors import ConfigError, DataError
from fewshot.train.datasets import Datasets
from fewshot.train.loop import Worker


def small_config(store, *overrides):
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.image_size=16",
            "data.val_split=null",
            "backbone.width=8",
            "episode.q_query=3",
            "episode.meta_batch=2",
            "train.val_episodes=4",
            "train.threads=1",
            *overrides,
        ],
    )


def groups(images) -> set[str]:
    return set(images.class_groups)


def test_held_out_groups_are_disjoint_from_training_and_fixed_by_the_seed(synthetic_store):
    data = Datasets.load(small_config(synthetic_store, "data.val_groups=2"))
    assert len(groups(data.val)) == 2 and len(groups(data.train)) == 4  # of 6 train scripts
    assert not groups(data.val) & groups(data.train)
    assert data.val.n_classes == 12 and data.train.n_classes == 24
    assert not set(data.val.class_names) & set(data.train.class_names)
    assert sorted(data.val.labels.unique().tolist()) == list(range(12))  # relabelled
    again = Datasets.load(small_config(synthetic_store, "data.val_groups=2"))
    assert groups(again.val) == groups(data.val)
    held = {
        frozenset(
            groups(
                Datasets.load(
                    small_config(synthetic_store, "data.val_groups=2", f"seed={seed}")
                ).val
            )
        )
        for seed in range(4)
    }
    assert len(held) > 1  # the seed picks them


def test_train_classes_are_drawn_from_the_remaining_groups(synthetic_store):
    data = Datasets.load(small_config(synthetic_store, "data.val_groups=2", "data.train_classes=6"))
    assert data.train.n_classes == 6 and data.val.n_classes == 12
    assert not groups(data.val) & groups(data.train)


def test_worker_validates_on_the_held_out_classes(synthetic_store):
    worker = Worker(small_config(synthetic_store, "data.val_groups=1"))
    assert worker.val_sampler is not None
    assert worker.val_sampler.images.n_classes == 6
    assert 0.0 <= worker.validate() <= 1.0


def test_val_groups_refusals(synthetic_store):
    with pytest.raises(ConfigError, match=r"^data\.val_groups: .*set data\.val_split: null"):
        load_config(None, [f"data.path={synthetic_store}", "data.val_groups=1"])  # val_split val
    with pytest.raises(ConfigError, match=r"^data\.val_groups: must be >= 1"):
        small_config(synthetic_store, "data.val_groups=0")
    with pytest.raises(DataError, match=r"^data\.val_groups: 6 but \['train'\] has 6 groups"):
        Datasets.load(small_config(synthetic_store, "data.val_groups=6"))
