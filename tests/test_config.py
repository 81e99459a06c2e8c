from pathlib import Path

import pytest

from fewshot.config import config_hash, load_config, parse_overrides, resolved_yaml
from fewshot.errors import ConfigError


def test_defaults_resolve_with_method_params_filled_in():
    config = load_config()
    assert config.method.name == "protonet"
    assert config.method.params() == {
        "distance": "euclidean",
        "temperature": 1.0,
        "learn_temperature": False,
        "test_views": 1,
    }
    assert "inner_steps" in load_config(None, ["method.name=maml"]).method.params()


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nepisode: {n_way: 20}\ndata: {train_split: small1}\n")
    config = load_config(path, ["episode.k_shot=5", "train.lr=0.01", "data.train_split=[a, b]"])
    assert (config.episode.n_way, config.episode.k_shot, config.train.lr) == (20, 5, 0.01)
    assert config.data.train_split == ["a", "b"]
    assert load_config(path).data.train_split == ["small1"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("episode.n_way=1", "episode.n_way: must be >= 2 (got 1)"),
        ("train.stpes=5", "train.stpes: unknown key"),
        ("method.inner_steps=0", "method.inner_steps: must be >= 1"),
        ("method.name=nope", "method.name: unknown method 'nope'"),
        ("train.optimizer=lbfgs", "train.optimizer: must be one of"),
        ("train.lr=fast", "train.lr: input should be a valid number"),
        ("episode", "--set 'episode': expected key=value"),
        ("distributed.workers=8", "episode.meta_batch: 4 tasks cannot be shared"),
        ("train.schedule=multistep", "train.milestones: the multistep schedule needs"),
        ("distributed.use_gpu=true", "train.device: cpu with distributed.use_gpu"),
        ("distributed.workers=2", "train.device: cuda but Ray workers get no GPU"),
        # Every number is finite: lr=inf trained a model of NaNs and exited 0.
        ("train.lr=inf", "train.lr: input should be a finite number (got 'inf')"),
        ("train.lr=.nan", "train.lr: input should be a finite number (got nan)"),
        ("method.temperature=.inf", "method.temperature: input should be a finite number"),
        ("seed=-1", "seed: must be >= 0 (got -1)"),
        ("seed=99999999999999999999", "seed: must be <= 4294967295 (got 99999999999999999999)"),
        ("evaluate.seed=-1", "evaluate.seed: must be >= 0 (got -1)"),
        # Refused before training, not by MLflow after the whole run.
        ("registry.name=..", "registry.name: use 1 to 100 letters, digits, _, - and ., not "),
        ("registry.name=.", "registry.name: use 1 to 100 letters, digits, _, - and ., not "),
    ],
)
def test_bad_values_name_their_path(override, message):
    overrides = [override] + (["method.name=maml"] if "inner" in override else [])
    overrides += {
        "distributed.use_gpu=true": ["train.device=cpu"],
        "distributed.workers=2": ["train.device=cuda"],
    }.get(override, [])
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_yaml_round_trips_and_hash_tracks_changes(tmp_path: Path):
    config = load_config(None, ["method.name=maml", "train.steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved_yaml(config))
    again = load_config(path)
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert config_hash(load_config(None, ["method.name=maml", "train.steps=8"])) != config_hash(
        config
    )


def test_the_edges_of_the_ranges_are_accepted():
    config = load_config(None, ["seed=4294967295", "registry.name=my-model.v2", "train.lr=1e-9"])
    assert (config.seed, config.registry.name) == (4294967295, "my-model.v2")


def test_updated_is_a_validated_copy_with_the_changes():
    config = load_config(None, ["train.steps=500"])
    changed = config.updated({"train.steps": 7500, "method.temperature": 8})
    assert (changed.train.steps, changed.method.settings.temperature) == (7500, 8)
    assert config.train.steps == 500  # the original is untouched
    with pytest.raises(ConfigError, match=r"^train\.steps: must be >= 1 \(got 0\)"):
        config.updated({"train.steps": 0})
    # The same rules as a file: a later --set of one path wins.
    assert parse_overrides(["seed=1", "train.lr=0.1", "seed=2"]) == {"train.lr": 0.1, "seed": 2}
