import math
import statistics
from pathlib import Path

import pytest
import yaml

from fewshot.bench import omniglot
from fewshot.config import load_config, validate
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.data.selection import leave_groups_out
from fewshot.errors import ConfigError
from fewshot.evaluate import episode_accuracies, evaluate_method, mean_ci
from fewshot.methods.ensemble import Ensemble
from fewshot.model_file import from_run, with_settings
from fewshot.recipes.omniglot import RECIPE
from fewshot.streams import Stream


@pytest.fixture
def bench_file(workdir, synthetic_store):
    spec = {
        "name": "tiny",
        "base": {
            "data": {"path": str(synthetic_store), "image_size": 16, "val_split": "val"},
            "backbone": {"width": 8},
            "episode": {"n_way": 3, "q_query": 3, "meta_batch": 2},
            "method": {"name": "protonet", "test_views": 3},
            "augment": {"rotations": True, "degrees": 10},
            "train": {"steps": 4, "eval_every": 2, "val_episodes": 2},
            "evaluate": {"episodes": 20, "n_way": 3, "q_query": 1, "within_group": True},
            "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}"},
        },
        "rows": [
            {"name": "recipe", "curve": True},
            {"name": "one view", "test_set": {"method.test_views": 1}},
            {"name": "pair", "ensemble": [{}, {"seed": 1}]},
        ],
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_rows_share_models_and_their_figures_are_the_fixed_test_episodes(workdir, bench_file):
    out = workdir / "omniglot.md"
    results = omniglot.run(bench_file, out)
    # Three rows, two models: the test-time row and the first member reuse the recipe's.
    runs = sorted(p for p in (workdir / "runs").iterdir() if (p / "model.pt").is_file())
    assert len(runs) == 2
    config, method = from_run(results_run(runs, seed=0))
    recipe, one_view, pair = (r["accuracy"]["20w1s"] for r in results)
    assert recipe.mean == pytest.approx(evaluate_method(method, config).mean)
    tested, rebuilt = with_settings(config, method, ["method.test_views=1"])
    assert one_view.mean == pytest.approx(evaluate_method(rebuilt, tested).mean)
    # The ensemble's figure: both members' mean log-probabilities on the same episodes.
    members = [from_run(r)[1] for r in runs]
    images = load_split(config.data.path, config.data.test_split, 16)
    episodes = EpisodeSampler(images, 3, 1, 1, within_group=True).fixed_episodes(20, 0, Stream.TEST)
    assert pair.mean == pytest.approx(mean_ci(episode_accuracies(Ensemble(members), episodes)).mean)
    # The curve: one validation error per round, over minutes since the run started.
    curve = results[0]["curve"]
    assert len(curve) == 2 and all(0 <= e <= 100 and m >= 0 for m, e in curve)
    assert "| recipe |" in out.read_text() and out.with_suffix(".png").stat().st_size > 1000


def results_run(runs, seed):
    return next(r for r in runs if yaml.safe_load((r / "config.yaml").read_text())["seed"] == seed)


def test_a_row_with_an_unknown_key_is_refused(workdir, bench_file):
    spec = yaml.safe_load(bench_file.read_text())
    spec["rows"].append({"name": "typo", "sett": {}})
    bench_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="typo"):
        omniglot.run(bench_file, workdir / "o.md")


@pytest.fixture
def folds_file(workdir, bench_file):
    spec = yaml.safe_load(bench_file.read_text())
    spec["base"]["data"].update(train_split="train", val_split=None)
    spec["base"]["evaluate"].update(n_way=4, episodes=5)
    spec["folds"] = 3
    spec["rows"] = [
        {"name": "recipe"},
        {"name": "transductive", "test_set": {"evaluate.transductive": True}},
    ]
    bench_file.write_text(yaml.safe_dump(spec))
    return bench_file


def test_folds_train_one_model_per_fold_without_its_groups_and_pool_the_fixed_episodes(
    workdir, folds_file, synthetic_store
):
    out = workdir / "folds.md"
    recipe, transductive = omniglot.run(folds_file, out)
    runs = sorted(p for p in (workdir / "runs").iterdir() if (p / "model.pt").is_file())
    assert len(runs) == 3  # one per fold; the transductive row reuses them
    images = load_split(synthetic_store, "train", 16)
    group_of = dict(zip(images.class_names, images.class_groups, strict=True))
    folds = leave_groups_out(images, 3)
    pooled = []
    for fold, row in zip(folds, recipe["folds"], strict=True):
        assert row["held_out"] == fold.held_out and len(fold.held_out) == 2
        run = next(
            r
            for r in runs
            if {group_of[n] for n in from_run(r)[0].data.train_classes}.isdisjoint(fold.held_out)
        )
        config, method = from_run(run)
        assert sorted(config.data.train_classes) == sorted(
            images.class_names[c] for c in fold.train
        )
        accuracies = omniglot.fold_accuracies(method, config, images, fold)
        assert len(accuracies) == 2 * 5 and row["accuracy"][0] == pytest.approx(
            mean_ci(accuracies).mean
        )
        tested, _ = with_settings(config, method, ["evaluate.transductive=true"])
        again = omniglot.fold_accuracies(method, tested, images, fold)
        assert transductive["folds"][folds.index(fold)]["accuracy"][0] == pytest.approx(
            mean_ci(again).mean
        )
        pooled += accuracies
    assert recipe["accuracy"]["20w1s"].mean == pytest.approx(mean_ci(pooled).mean)
    assert recipe["accuracy"]["20w1s"].episodes == 30 and transductive["transductive"]
    # The fold mean is the mean of the folds' errors: the same episodes in each fold.
    fold_means = [f["accuracy"][0] for f in recipe["folds"]]
    assert recipe["accuracy"]["20w1s"].mean == pytest.approx(sum(fold_means) / 3)
    text = out.read_text()
    assert "**recipe: fold mean**" in text and "transductive (test-time only" in text
    # Its error change against the first row: errors minus the recipe's, in points, with
    # the CI of the per-episode differences (paired).
    a, t = recipe["accuracy"]["20w1s"], transductive["accuracy"]["20w1s"]
    pairs = zip(omniglot.pooled(recipe), omniglot.pooled(transductive), strict=True)
    differences = [100 * (r - e) for r, e in pairs]
    ci95 = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences))
    line = text.split("(test-time only, the models above): fold mean**")[1].splitlines()[0]
    assert f"| {100 * (a.mean - t.mean):+.2f} ± {ci95:.2f} |" in line


def test_a_folds_ensemble_row_averages_each_folds_members(workdir, folds_file):
    spec = yaml.safe_load(folds_file.read_text())
    spec["rows"] = [{"name": "recipe"}, {"name": "pair", "ensemble": [{}, {"seed": 1}]}]
    folds_file.write_text(yaml.safe_dump(spec))
    recipe, pair = omniglot.run(folds_file, workdir / "o.md")
    runs = sorted(p for p in (workdir / "runs").iterdir() if (p / "model.pt").is_file())
    assert len(runs) == 6  # 3 folds x 2 members; the recipe row's are the first members
    images = load_split(synthetic_store_of(spec), "train", 16)
    fold = leave_groups_out(images, 3)[0]
    trained = [from_run(r) for r in runs]
    members = [
        (c, m)
        for c, m in trained
        if set(c.data.train_classes) == {images.class_names[k] for k in fold.train}
    ]
    assert sorted(c.seed for c, _ in members) == [0, 1]
    ensemble = Ensemble([m for _, m in sorted(members, key=lambda cm: cm[0].seed)])
    accuracies = omniglot.fold_accuracies(ensemble, members[0][0], images, fold)
    assert pair["folds"][0]["accuracy"][0] == pytest.approx(mean_ci(accuracies).mean)
    assert pair["minutes"] > recipe["minutes"]  # both members' training


def test_a_folds_distilled_row_is_taught_by_each_folds_teachers(workdir, folds_file):
    spec = yaml.safe_load(folds_file.read_text())
    teachers = [{}, {"seed": 1}]
    spec["rows"] = [
        {"name": "recipe"},
        {"name": "pair", "ensemble": teachers},
        {"name": "student", "set": {"seed": 2}, "teachers": teachers},
    ]
    folds_file.write_text(yaml.safe_dump(spec))
    _, pair, student = omniglot.run(folds_file, workdir / "o.md")
    runs = [from_run(p) for p in (workdir / "runs").iterdir() if (p / "model.pt").is_file()]
    assert len(runs) == 9  # 3 folds x (2 teachers, reused from the ensemble row, + 1 student)
    students = [(c, m) for c, m in runs if c.distill.teachers]
    assert len(students) == 3 and all(m.name == "protonet" for _, m in students)
    by_name = {p.name: from_run(p)[0] for p in (workdir / "runs").iterdir()}
    for config, _ in students:  # taught by the two teachers of its own fold
        taught_by = [by_name[Path(t).name] for t in config.distill.teachers]
        assert sorted(t.seed for t in taught_by) == [0, 1]
        assert all(t.data.train_classes == config.data.train_classes for t in taught_by)
    assert student["minutes"] > pair["minutes"]  # the teachers' training, and its own
    assert "student: fold mean" in (workdir / "o.md").read_text()


def synthetic_store_of(spec: dict) -> Path:
    return Path(spec["base"]["data"]["path"])


def test_a_folds_bench_refuses_a_curve_row(workdir, folds_file):
    spec = yaml.safe_load(folds_file.read_text())
    spec["rows"].append({"name": "plot", "curve": True})
    folds_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="'plot' has `curve`"):
        omniglot.run(folds_file, workdir / "o.md")


def test_the_folds_bench_measures_the_headline_recipe():
    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    spec = omniglot.read_spec(configs / "bench" / "omniglot_folds.yaml")
    bench, recipe = validate(spec["base"]), load_config(RECIPE)
    assert spec["folds"] == 4 and bench.data.val_split is None  # nothing held-out is seen
    for section in ("episode", "backbone", "method", "augment"):
        assert getattr(bench, section) == getattr(recipe, section), section
    assert bench.data.train_split == recipe.data.train_split == ["small1", "small2"]
    assert (bench.data.image_size, bench.data.within_group) == (28, True)
    assert bench.evaluate == recipe.evaluate.model_copy(update={"episodes": 200})
    assert not bench.evaluate.transductive
