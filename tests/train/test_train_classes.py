"""data.train_classes: few base classes (miniImageNet-S), by count or by name, logged."""

import json

import pytest

from fewshot.config import load_config
from fewshot.errors import ConfigError, DataError
from fewshot.tracking import download_artifact
from fewshot.train.datasets import Datasets
from fewshot.train.runner import train


def small_config(store, *overrides):
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            "episode.meta_batch=2",
            "train.threads=1",
            *overrides,
        ],
    )


def test_named_classes_are_exactly_the_base_classes(synthetic_store):
    everything = Datasets.load(small_config(synthetic_store)).train.class_names
    wanted = [everything[7], everything[2], everything[30]]
    data = Datasets.load(small_config(synthetic_store, f"data.train_classes=[{','.join(wanted)}]"))
    assert data.train.class_names == sorted(wanted)  # in label order, whatever the list order
    assert data.train.n_classes == 3 and len(data.train.labels) == 3 * 10
    assert sorted(data.train.labels.unique().tolist()) == [0, 1, 2]
    assert data.val.n_classes == 12  # the validation split is untouched


def test_an_unknown_or_repeated_name_is_refused(synthetic_store):
    with pytest.raises(DataError, match=r"^data\.train_classes: 'nope' is not a training class"):
        Datasets.load(small_config(synthetic_store, "data.train_classes=[script00/char00,nope]"))
    with pytest.raises(ConfigError, match=r"^data\.train_classes: name at least 2 classes"):
        small_config(synthetic_store, "data.train_classes=[script00/char00,script00/char00]")
    with pytest.raises(ConfigError, match=r"^data\.train_classes: must be >= 2"):
        small_config(synthetic_store, "data.train_classes=1")


def test_the_chosen_classes_are_logged_with_the_run(workdir, synthetic_store):
    config = small_config(
        synthetic_store,
        "data.train_classes=12",
        "train.steps=2",
        "train.eval_every=2",
        "train.val_episodes=2",
        "evaluate.episodes=4",
        "name=few-base",
    )
    result = train(config)
    # This directory's store, by absolute path: MLflow caches stores by URI, so a relative
    # sqlite:///mlflow.db could reach an earlier test's database.
    logged = json.loads(download_artifact(result.run_id, "train_classes.json").read_text())
    assert logged == Datasets.load(config).train.class_names and len(logged) == 12
