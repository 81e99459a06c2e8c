"""The tune file: parsing, the domains given to Ray Tune, and every refusal (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fewshot.errors import ConfigError
from fewshot.tune.space import read_tune_file

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "name": "base",
    "data": {"path": "data/synthetic", "val_split": None, "val_groups": 1},
    "method": {"name": "subspace"},
    "train": {"steps": 40, "eval_every": 10},
}


def write(tmp_path: Path, **changes) -> Path:
    """A tune file over BASE (in base.yaml beside it), with top-level keys replaced."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {
        "name": "search",
        "base": "base.yaml",
        "set": {"train.lr": 0.01},
        "space": {
            "method.lambda1": {"loguniform": [0.001, 1.0]},
            "method.lambda2": {"uniform": [0.0, 0.5]},
            "method.n_subspaces": {"choice": [1, 2, 4]},
            "method.subspace_dim": {"randint": [8, 17]},
            "train.lr": {"grid": [0.001, 0.003]},
        },
        "search": {"num_samples": 3, "grace_period": 2},
    }
    spec.update(changes)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tune_file_is_resolved_against_its_base(tmp_path):
    spec = read_tune_file(write(tmp_path), ["train.steps=50", "seed=3"])
    assert spec.name == "search"
    assert spec.base.train.lr == 0.01  # `set`
    assert spec.base.train.steps == 50 and spec.base.seed == 3  # --set
    assert spec.base.distributed.workers == 1  # every trial is a Ray Train run
    assert spec.base.data.path.is_absolute()  # trials run in other directories
    assert spec.max_rounds == 5  # 50 steps, a round every 10
    assert spec.trials() == 3 * 2  # num_samples x the grid
    assert spec.search.scheduler == "asha" and spec.search.algorithm == "random"
    config = spec.trial_config({"method.lambda1": 0.5, "train.lr": 0.003}, "search-t1")
    assert config.name == "search-t1"
    assert config.method.params()["lambda1"] == 0.5 and config.train.lr == 0.003


def test_domains_given_to_ray_tune(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    space = read_tune_file(write(tmp_path)).param_space()
    assert isinstance(space["method.lambda1"], Float)
    assert isinstance(space["method.lambda1"].get_sampler(), LogUniform)
    assert (space["method.lambda1"].lower, space["method.lambda1"].upper) == (0.001, 1.0)
    assert isinstance(space["method.lambda2"].get_sampler(), Uniform)
    assert isinstance(space["method.n_subspaces"], Categorical)
    assert space["method.n_subspaces"].categories == [1, 2, 4]
    integer = space["method.subspace_dim"]
    assert isinstance(integer, Integer) and (integer.lower, integer.upper) == (8, 17)
    assert space["train.lr"] == {"grid_search": [0.001, 0.003]}


def test_inline_base_and_scheduler_none(tmp_path):
    path = write(tmp_path, base=BASE, search={"scheduler": None, "algorithm": "optuna"})
    path.write_text(path.read_text().replace("grid:", "choice:"))
    spec = read_tune_file(path)
    assert spec.search.scheduler == "none" and spec.search.algorithm == "optuna"
    assert spec.trials() == 8


def test_saved_spec_reads_back_the_same(tmp_path):
    from fewshot.tune.space import parse_tune

    spec = read_tune_file(write(tmp_path), ["train.steps=30"])
    again = parse_tune(yaml.safe_load(spec.as_yaml()), tmp_path / "elsewhere")
    assert again.as_dict() == spec.as_dict()


def space(**entries):
    return {"space": entries}


REFUSALS = [
    ({"serch": {}}, r"^serch: unknown key"),
    ({"search": {"num_sample": 2}}, r"^search\.num_sample: unknown key"),
    ({"search": {"scheduler": "hyperband"}}, r"^search\.scheduler: must be one of"),
    ({"name": "a b"}, r"^name: use 1 to 100 letters, digits"),
    ({"name": ".."}, r"^name: use 1 to 100 letters, digits.*\(got '\.\.'\)"),
    ({"base": "missing.yaml"}, r"^base: .*missing\.yaml does not exist"),
    ({"space": {}}, r"^space: dictionary should have at least 1 item"),
    (space(**{"method.lamda1": {"uniform": [0, 1]}}), r"^space\.method\.lamda1: not a field"),
    (space(**{"train.steps.x": {"choice": [1]}}), r"^space\.train\.steps\.x: not a field"),
    (space(name={"choice": ["a", "b"]}), r"^space\.name: not a field"),
    (space(**{"train.lr": {"logunif": [0.1, 1]}}), r"^space\.train\.lr\.logunif: unknown key"),
    (
        space(**{"train.lr": {"uniform": [0.1, 1], "choice": [0.1]}}),
        r"^space\.train\.lr: give exactly one of uniform, loguniform, randint, choice, grid",
    ),
    (space(**{"train.lr": {}}), r"^space\.train\.lr: give exactly one of"),
    (
        space(**{"train.lr": {"uniform": [1.0, 0.1]}}),
        r"^space\.train\.lr\.uniform: low 1\.0 must be below high 0\.1",
    ),
    (
        space(**{"method.subspace_dim": {"randint": [8, 8]}}),
        r"^space\.method\.subspace_dim\.randint: low 8 must be below high 8.*high is exclusive",
    ),
    (
        space(**{"train.lr": {"loguniform": [0, 0.1]}}),
        r"^space\.train\.lr\.loguniform: low must be > 0",
    ),
    (
        space(**{"train.lr": {"uniform": [0.1]}}),
        r"^space\.train\.lr\.uniform: give \[low, high\] \(got \[0\.1\]\)",
    ),
    (space(**{"train.lr": {"choice": []}}), r"^space\.train\.lr\.choice: give at least one value"),
    (
        space(**{"train.lr": {"choice": [0.1, "fast"]}}),
        r"^space\.train\.lr: input should be a valid number.*\(got 'fast'\)",
    ),
    (
        space(**{"train.lr": {"grid": ["0.1"]}}),
        r"^space\.train\.lr\.grid: '0\.1' is a string but train\.lr is a float; write the value",
    ),
    (
        space(**{"method.lambda1": {"choice": ["big"]}}),
        r"^space\.method\.lambda1: input should be a valid number",
    ),
    (
        space(**{"train.lr": {"uniform": [-1.0, 1.0]}}),
        r"^space\.train\.lr: must be > 0\.0 \(got -1\.0\)",
    ),
    (
        space(**{"episode.n_way": {"randint": [1, 5]}}),
        r"^space\.episode\.n_way: must be >= 2 \(got 1\)",
    ),
    (
        space(**{"method.n_subspaces": {"uniform": [1, 4]}}),
        r"^space\.method\.n_subspaces\.uniform: method\.n_subspaces is an integer; .*randint",
    ),
    (
        space(**{"train.optimizer": {"choice": ["adam", "adagrad"]}}),
        r"^space\.train\.optimizer: must be one of",
    ),
    (
        space(**{"method.subspace_dim": {"choice": [1, 8]}}),
        r"^space\.method\.subspace_dim: .*k_shot",
    ),
    (
        {"search": {"algorithm": "optuna"}},
        r"^space\.train\.lr\.grid: optuna does not take a grid",
    ),
    (
        {"search": {"grace_period": 9}},
        r"^search\.grace_period: 9 rounds, but a trial runs at most 4 evaluation rounds",
    ),
    ({"set": {"data.val_groups": None}}, r"^data\.val_split: tune needs validation classes"),
    ({"set": {"data.val_split": "val"}}, r"^data\.val_groups: holds validation classes out"),
    ({"set": {"train.stepz": 3}}, r"^train\.stepz: unknown key"),
]


@pytest.mark.parametrize(("changes", "message"), REFUSALS, ids=[m for _, m in REFUSALS])
def test_bad_tune_files_are_refused_in_one_line(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        read_tune_file(write(tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_a_bad_space_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from fewshot.tune import search

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a bad space")

    monkeypatch.setattr("fewshot.tune.search.connect", no_ray)
    path = write(tmp_path, **space(**{"train.lr": {"choice": ["fast"]}}))
    with pytest.raises(ConfigError, match=r"^space\.train\.lr: "):
        search.run_search(path)
    assert not ray.is_initialized()


def test_resume_needs_a_started_search(workdir):
    from fewshot.tune.search import run_search

    with pytest.raises(ConfigError, match=r"^--resume nothing: no search in runs/nothing"):
        run_search(None, resume="nothing")
    with pytest.raises(ConfigError, match=r"^--set: a resumed search keeps its settings"):
        run_search(None, ["train.steps=3"], resume="nothing")
    with pytest.raises(ConfigError, match=r"^--config: give a tune file"):
        run_search(None)
    # --resume looks where train.output_dir says, not in a fixed runs/.
    with pytest.raises(ConfigError, match=r"^--resume nothing: no search in elsewhere/nothing"):
        run_search(None, ["train.output_dir=elsewhere"], resume="nothing")


def test_a_started_search_is_not_started_again(tmp_path, monkeypatch):
    from fewshot.tune.search import run_search
    from fewshot.tune.space import SEARCH_FILE

    monkeypatch.chdir(tmp_path)
    spec = read_tune_file(write(tmp_path))
    spec.search_dir().mkdir(parents=True)
    (spec.search_dir() / SEARCH_FILE).write_text(spec.as_yaml())
    with pytest.raises(ConfigError, match=r"^name: search 'search' already exists.*--resume"):
        run_search(tmp_path / "tune.yaml")
    other = write(tmp_path, search={"num_samples": 5, "grace_period": 2})
    with pytest.raises(ConfigError, match=r"^--resume search: .* differs from the search"):
        run_search(other, resume="search")


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs" / "tune").glob("*.yaml")))
def test_ready_made_tune_files_are_valid(path):
    """Scored on whole alphabets held out of the training split (one of small1's for the
    methods, two of the merged sets' for the Omniglot recipe), never on the test split."""
    spec = read_tune_file(path)
    assert spec.name == f"tune_{path.stem}"  # the search is named for what it tunes
    assert spec.base.data.val_groups in (1, 2) and spec.base.data.val_split is None
    assert spec.base.data.test_split == "small2"
    assert spec.max_rounds >= 2 and spec.trials() >= 6


def test_objective_plot_has_a_panel_per_field(tmp_path):
    from PIL import Image

    from fewshot.tune.search import plot_objective

    spec = read_tune_file(write(tmp_path))
    rows = [
        {
            "values": {
                "method.lambda1": 10.0**-i,
                "method.lambda2": 0.1 * i,
                "method.n_subspaces": [1, 2, 4][i % 3],
                "method.subspace_dim": 8 + i,
                "train.lr": 0.001,
            },
            "val_acc": 0.5 + 0.1 * i,
        }
        for i in range(4)
    ]
    out = tmp_path / "plot.png"
    plot_objective(spec, rows, rows[-1], out)
    with Image.open(out) as image:
        width, height = image.size
    assert width >= 5 * 300 and height > 200  # five panels side by side


def test_a_missing_test_split_is_refused_before_ray_starts(tmp_path, monkeypatch, synthetic_store):
    import ray

    from fewshot.errors import DataError
    from fewshot.tune import search

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a search whose best model cannot be tested")

    monkeypatch.setattr("fewshot.tune.search.connect", no_ray)
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, set={"data.path": str(synthetic_store), "data.test_split": "nope"})
    with pytest.raises(DataError, match=r"has no split 'nope'"):
        search.run_search(path)
    assert not ray.is_initialized()
