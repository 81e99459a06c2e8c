import pytest
import yaml

from fewshot.bench import omniglot
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.errors import ConfigError
from fewshot.evaluate import episode_accuracies, evaluate_method, mean_ci
from fewshot.methods.ensemble import Ensemble
from fewshot.model_file import from_run, with_settings
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
