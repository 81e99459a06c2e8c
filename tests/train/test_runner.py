import json
from pathlib import Path

import mlflow
import pytest

from fewshot.config import load_config, resolved_yaml
from fewshot.errors import CheckpointError, ConfigError, DataError
from fewshot.evaluate import evaluate_method, mean_ci
from fewshot.model_file import from_run
from fewshot.registry.versions import current
from fewshot.runtime import usable_cpus
from fewshot.train.runner import train


def config(store, *overrides):
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            "train.steps=4",
            "train.eval_every=2",
            "train.val_episodes=4",
            "evaluate.episodes=20",
            "name=unit",
            *overrides,
        ],
    )


def test_run_is_tracked_in_mlflow_and_reloads_to_the_same_accuracy(workdir, synthetic_store):
    cfg = config(synthetic_store)
    result = train(cfg)
    assert (workdir / "mlflow.db").is_file()
    # Scoped: a process-wide URI would also be exported to the tests that follow.
    with current("sqlite:///mlflow.db"):
        run = mlflow.get_run(result.run_id)
        assert run.data.params["episode.n_way"] == "5" and run.data.params["train.steps"] == "4"
        assert run.data.tags["fewshot.method"] == "protonet"
        assert run.data.tags["git.commit"] and run.data.tags["version.torch"]
        assert run.data.metrics["test_acc"] == pytest.approx(result.test.mean)
        history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_acc")
        assert [m.step for m in history] == [2, 4]
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
        assert {"config.yaml", "evaluation.json", "model"} <= artifacts
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/evaluation.json"))
        assert table[0]["accuracy"] == round(result.test.mean, 4)
        # The logged model and the run directory give back the same accuracy on the same episodes.
        for source in (result.run_id, str(result.run_dir)):
            loaded_config, method = from_run(source)
            assert loaded_config == cfg
            assert evaluate_method(method, loaded_config).mean == pytest.approx(result.test.mean)


def test_finished_and_mismatched_runs_are_refused(workdir, synthetic_store):
    train(config(synthetic_store, "tracking.enabled=false"))
    with pytest.raises(CheckpointError, match="already finished"):
        train(config(synthetic_store, "tracking.enabled=false"))
    with pytest.raises(CheckpointError, match="different config"):
        train(config(synthetic_store, "tracking.enabled=false", "train.lr=0.5"))
    result = train(config(synthetic_store, "tracking.enabled=false", "train.lr=0.5"), restart=True)
    assert result.steps == 4


def test_unknown_model_source(workdir):
    with pytest.raises(CheckpointError, match="no such model file"):
        from_run("runs/none/model.pt")


def test_mean_ci_formula():
    accuracy = mean_ci([0.5, 1.0, 0.75, 0.75])
    std = (sum((x - 0.75) ** 2 for x in [0.5, 1.0, 0.75, 0.75]) / 4) ** 0.5
    assert accuracy.mean == 0.75
    assert accuracy.ci95 == pytest.approx(1.96 * std / 2)


def test_a_config_refused_at_build_time_leaves_no_run_behind(workdir, synthetic_store):
    bad = config(synthetic_store, "method.name=trml", "tracking.enabled=false")
    with pytest.raises(ConfigError, match="conv4_nopool"):
        train(bad)
    assert not (workdir / "runs" / "unit").exists()  # the corrected config may reuse the name
    good = config(
        synthetic_store,
        "method.name=trml",
        "backbone.name=conv4_nopool",
        "tracking.enabled=false",
        "train.steps=1",
    )
    assert train(good).steps == 1


@pytest.fixture
def store_copy(tmp_path, synthetic_store):
    import shutil

    return Path(shutil.copytree(synthetic_store, tmp_path / "store"))


@pytest.mark.parametrize(
    ("overrides", "damage", "message"),
    [
        (["data.test_split=nope"], None, "has no split 'nope'"),
        (
            ["evaluate.n_way=20"],
            None,
            "evaluate.n_way: 20 classes per test episode, but split 'test'",
        ),
        ([], "remove", "split 'test' has no parquet files"),
        ([], "truncate", "part-00000.parquet: not a readable parquet file"),
    ],
)
def test_test_split_mistakes_are_refused_before_training(
    workdir, store_copy, overrides, damage, message
):
    part = store_copy / "split=test" / "part-00000.parquet"
    if damage == "remove":
        part.unlink()
    elif damage == "truncate":
        part.write_bytes(part.read_bytes()[:300])
    with pytest.raises(DataError, match=message):
        train(config(store_copy, *overrides))
    # Refused before the tracker started (so before any step): no run, no MLflow store.
    assert not (workdir / "runs" / "unit").exists() and not (workdir / "mlflow.db").exists()


def test_a_truncated_checkpoint_is_one_line_and_kept(workdir, synthetic_store):
    cfg = config(synthetic_store, "tracking.enabled=false")
    run_dir = workdir / "runs" / "unit"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(resolved_yaml(cfg))
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="checkpoint.pt: not a fewshot checkpoint, it is"):
        train(cfg)
    assert (run_dir / "checkpoint.pt").is_file()


@pytest.mark.parametrize("episodes", [-3, 0])
def test_a_count_of_episodes_below_one_is_refused_not_replaced(synthetic_store, episodes):
    from fewshot.methods import build_method
    from fewshot.registry.gate import GateEpisodes

    cfg = config(synthetic_store)
    message = f"--episodes {episodes}: score at least 1 test episode"
    with pytest.raises(ConfigError, match=message):
        evaluate_method(build_method(cfg, 1), cfg, episodes)
    with pytest.raises(ConfigError, match=message):  # what `fewshot promote --episodes` sets
        GateEpisodes.of(cfg, None, None, episodes)


@pytest.mark.parametrize("file", ["runs", "runs/unit"])
def test_an_output_dir_through_a_file_is_one_line_and_nothing_is_written(
    workdir, synthetic_store, file
):
    (workdir / file).parent.mkdir(parents=True, exist_ok=True)
    (workdir / file).write_text("a file")
    with pytest.raises(ConfigError, match=f"^train.output_dir: {file} is a file, not a directory"):
        train(config(synthetic_store, "train.output_dir=runs"), restart=True)
    assert (workdir / file).read_text() == "a file"
    assert not (workdir / "mlflow.db").exists()


def test_more_threads_than_cpus_are_refused_before_the_run_starts(workdir, synthetic_store):
    cpus = usable_cpus()
    with pytest.raises(ConfigError, match=f"^train.threads: {cpus + 1} but this process may"):
        train(config(synthetic_store, f"train.threads={cpus + 1}"))
    assert list(workdir.iterdir()) == []  # no run directory, no MLflow store
