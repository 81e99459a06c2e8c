import statistics

import pytest
import yaml
from mlflow import MlflowClient

from fewshot.bench import methods, omniglot
from fewshot.config import validate
from fewshot.errors import ConfigError
from fewshot.evaluate import evaluate_method
from fewshot.model_file import from_run


@pytest.fixture
def bench_file(workdir, synthetic_store):
    spec = {
        "name": "tiny",
        "base": {
            "data": {"path": str(synthetic_store), "image_size": 16},
            "backbone": {"width": 8},
            "episode": {"n_way": 3, "q_query": 3, "meta_batch": 2},
            "train": {"steps": 4, "eval_every": 4, "val_episodes": 2},
            "evaluate": {"episodes": 20, "q_query": 3},
            "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}"},
        },
        "tasks": [[3, 1], [4, 1]],
        "rows": [
            {"name": "ProtoNet", "set": {"method.name": "protonet"}},
            {"name": "MAML", "set": {"method.name": "maml", "method.inner_steps": 1}},
        ],
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_row_is_tested_on_every_task_with_a_second_model_where_tied(workdir, bench_file):
    out = workdir / "methods.md"
    results = methods.run(bench_file, out)
    assert [r["name"] for r in results] == ["ProtoNet", "MAML"]
    # ProtoNet tests 4-way with its 3-way model; MAML's head is 3-way, so it trained a 4-way one.
    assert (workdir / "runs" / "tiny-maml-4w" / "model.pt").is_file()
    assert not (workdir / "runs" / "tiny-protonet-4w").exists()
    # The table's figures are the fixed test episodes of each task, recomputed here.
    config, method = from_run(workdir / "runs" / "tiny-protonet")
    raw = config.model_dump(mode="json")
    raw["evaluate"]["n_way"] = 4
    again = evaluate_method(method, validate(raw))
    assert results[0]["accuracy"]["4w1s"].mean == pytest.approx(again.mean)
    table = out.read_text()
    assert "| ProtoNet |" in table and "| MAML |" in table and "4-way 1-shot" in table
    # ... and the same figures are in MLflow, in one run named after the bench.
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'tiny'", max_results=5
    )
    assert len(runs) == 1
    assert runs[0].data.metrics["maml.4w1s"] == pytest.approx(results[1]["accuracy"]["4w1s"].mean)


def test_only_redoes_the_named_rows_and_keeps_the_others(workdir, bench_file):
    out = workdir / "methods.md"
    first = methods.run(bench_file, out)
    spec = yaml.safe_load(bench_file.read_text())
    spec["rows"][0]["set"]["train.steps"] = 2  # ProtoNet changes; MAML must be kept as is
    bench_file.write_text(yaml.safe_dump(spec))
    second = methods.run(bench_file, out, only=["ProtoNet"])
    assert [r["name"] for r in second] == ["ProtoNet", "MAML"]
    assert second[1]["accuracy"] == first[1]["accuracy"]
    assert (workdir / "runs" / "tiny-protonet" / "config.yaml").read_text().count("steps: 2")
    assert "| MAML |" in out.read_text()


def test_an_unknown_row_or_bad_file_is_refused(workdir, bench_file):
    with pytest.raises(ConfigError, match="--only"):
        methods.run(bench_file, workdir / "m.md", only=["Nope"])
    bad = workdir / "bad.yaml"
    bad.write_text("rows: []\n")
    with pytest.raises(ConfigError, match="bench file"):
        methods.run(bad, workdir / "m.md")


def test_a_row_that_fails_leaves_no_mlflow_run_running(workdir, bench_file):
    spec = yaml.safe_load(bench_file.read_text())
    # TRML needs conv4_nopool: refused when its row's model is built, mid-bench.
    spec["rows"] = [spec["rows"][0], {"name": "TRML", "set": {"method.name": "trml"}}]
    bench_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="conv4_nopool"):
        methods.run(bench_file, workdir / "methods.md")

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    status = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    # The bench's own run spans its rows: it ended FAILED with the row that failed.
    assert status == {"tiny": "FAILED", "tiny-protonet": "FINISHED", "tiny-trml": "FAILED"}
    assert not (workdir / "methods.md").exists()


@pytest.fixture
def folds_file(workdir, synthetic_store):
    """Three rows under a time budget on 3 folds of the synthetic scripts, with claims."""
    spec = {
        "name": "tiny-folds",
        "folds": 3,
        "base": {
            "data": {"path": str(synthetic_store), "image_size": 16, "train_split": "train",
                     "val_split": None, "within_group": True},
            "backbone": {"width": 8},
            "episode": {"n_way": 3, "q_query": 2, "meta_batch": 1},
            "train": {"steps": 400, "minutes": 0.02, "eval_every": 400},
            "evaluate": {"episodes": 6, "n_way": 3, "q_query": 2, "within_group": True},
            "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}"},
        },
        "rows": [
            {"name": "ProtoNet", "set": {"method.name": "protonet"}},
            {"name": "ProtoNet + MLTI", "set": {"task_mixup.strategy": "mlti"}},
            {"name": "MAML", "set": {"method.name": "maml", "method.inner_steps": 1}},
        ],
        "claims": [
            {"claim": "MLTI helps", "source": "a", "better": "ProtoNet + MLTI",
             "than": "ProtoNet"},
            {"claim": "MAML beats ProtoNet", "source": "b", "better": "MAML", "than": "ProtoNet"},
            {"claim": "not run", "source": "c", "better": "Absent", "than": "ProtoNet"},
        ],
    }  # fmt: skip
    path = workdir / "folds.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_folds_protocol_pairs_every_row_on_the_same_episodes_and_judges_the_claims(
    workdir, folds_file
):
    out = workdir / "methods_folds.md"
    protonet, mlti, maml = methods.run(folds_file, out)
    for row in (protonet, mlti, maml):
        # Every fold's episodes: 6 per held-out script, the same for every row.
        assert [len(f["episodes"]) for f in row["folds"]] == [
            6 * len(f["held_out"]) for f in row["folds"]
        ]
        # A time budget: what fitted, at most train.steps, and reported.
        assert all(1 <= s <= 400 for f in row["folds"] for s in f["steps"])
    # The paired change is the mean of the per-episode differences, with their CI.
    differences = [
        100 * (p - m) for p, m in zip(omniglot.pooled(protonet), omniglot.pooled(maml), strict=True)
    ]
    change, ci95 = omniglot.paired(omniglot.pooled(maml), omniglot.pooled(protonet))
    assert change == pytest.approx(statistics.mean(differences))
    assert ci95 == pytest.approx(1.96 * statistics.stdev(differences) / len(differences) ** 0.5)
    text = out.read_text()
    assert "| **MAML: fold mean** | all 6 alphabets | " in text
    assert f"{change:+.2f} ± {ci95:.2f}" in text
    (line,) = [x for x in text.splitlines() if x.startswith("| MAML beats ProtoNet |")]
    assert line.endswith(f"| {omniglot.verdict(change, ci95)} |")
    assert "| not run | c | Absent vs ProtoNet | - | not run |" in text
    assert [omniglot.verdict(-2, 1), omniglot.verdict(2, 1), omniglot.verdict(0.5, 1)] == [
        "confirmed", "refuted", "cannot tell (the CI spans 0)"
    ]  # fmt: skip
