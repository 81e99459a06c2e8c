"""Ray Tune over Ray Train for real, on a local head: a 4-trial search end to end with
ASHA, the values each trial really trained with, and an interrupted search resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import yaml

from fewshot.config import load_config

pytestmark = pytest.mark.cluster


def tune_file(tmp_path: Path, store: Path, name: str, space: dict, search: dict) -> Path:
    """A tiny search on the synthetic store: width-8 conv4 at 16 px, 1 worker x 1 CPU,
    validated on the store's val split, tested on its test split."""
    spec = {
        "name": name,
        "base": {
            "name": "base",
            "data": {"path": str(store), "image_size": 16},  # val_split: val
            "backbone": {"width": 8},
            "episode": {"q_query": 3, "meta_batch": 2},
            "train": {
                "optimizer": "sgd",
                "momentum": 0.0,
                "schedule": "constant",
                "val_episodes": 12,
                "log_every": 2,
                "threads": 1,
                "output_dir": str(tmp_path / "runs"),
            },
            "evaluate": {"episodes": 20},
            # On one machine every node sees workdir: the shared storage a cluster needs.
            "distributed": {"workers": 1, "storage_path": str(tmp_path / "runs" / "ray")},
        },
        "space": space,
        "search": {"seed": 0, **search},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def nested_runs(parent_id: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        output_format="list",
    )


def test_small_search_end_to_end(cluster, synthetic_store, workdir):
    from fewshot.tune.search import run_search

    path = tune_file(
        workdir,
        synthetic_store,
        "e2e",
        space={
            "train.lr": {"grid": [1.0e-6, 0.1]},  # one rate that learns, one that cannot
            "method.temperature": {"loguniform": [0.5, 2.0]},
        },
        search={
            "num_samples": 2,
            "max_concurrent_trials": 2,
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
        },
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_search(path, ["train.steps=12", "train.eval_every=3"])
    deprecated = [
        str(w.message)
        for w in caught
        if issubclass(w.category, DeprecationWarning | FutureWarning)
        and "ray" in (w.filename or "")
    ]
    assert not deprecated, deprecated

    assert len(result.rows) == 4
    assert all(r["max_rounds"] == 4 and r["run_id"] for r in result.rows)
    stopped = [r for r in result.rows if r["stopped_early"]]
    assert stopped, result.rows  # ASHA stopped at least one trial
    assert all(r["rounds"] < r["max_rounds"] for r in stopped)
    assert all(
        (result.search_dir / r["trial"] / "model.pt").is_file() != r["stopped_early"]
        for r in result.rows
    )

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = nested_runs(result.parent_run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    # Trials of 1 worker each on two 1-CPU nodes: both nodes trained trials.
    nodes = set()
    for run in runs:
        placement = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/placement/step_0.json")
        nodes |= set(placement["ranks"].values())
    assert nodes == {cluster.node_id(n.name) for n in cluster.nodes}
    # A trial ASHA stops may log a round more to MLflow while its Train run winds down;
    # the best is chosen on the rounds Tune received, so compare on those.
    seen = {row["run_id"]: row["rounds"] for row in result.rows}

    def rounds_seen(run_id: str) -> list[float]:
        history = sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)
        return [m.value for m in history[: seen[run_id]]]

    curve_best = {r.info.run_id: max(rounds_seen(r.info.run_id)) for r in runs}
    top = max(curve_best.values())
    assert result.best["run_id"] in {i for i, v in curve_best.items() if v == top}
    assert result.best["val_acc"] == pytest.approx(top)

    by_run = {r["run_id"]: r for r in result.rows}
    for run in runs:
        row = by_run[run.info.run_id]
        params = run.data.params
        used = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/effective.json")
        # Logged config == what Tune sampled == what the built method and optimiser held.
        for path in ("train.lr", "method.temperature"):
            assert float(params[path]) == row["values"][path] == used[path], path
        assert run.data.tags["fewshot.stopped_early"] == str(row["stopped_early"]).lower()
        assert "test_acc" not in run.data.metrics  # trials never see the test classes

    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["best_val_acc"] == pytest.approx(top)
    assert parent.data.metrics["test_acc"] == pytest.approx(result.test.mean)
    assert float(parent.data.params["best.train.lr"]) == result.best["values"]["train.lr"]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"best_config.yaml", "objective_vs_params.png", "trials.json", "model"} <= artifacts
    best_yaml = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/best_config.yaml")
    (workdir / "best.yaml").write_text(best_yaml)
    best = load_config(workdir / "best.yaml")  # ready for `fewshot train --config`
    assert best.name == result.best["trial"]
    assert best.train.lr == result.best["values"]["train.lr"]
    assert best.method.params()["temperature"] == result.best["values"]["method.temperature"]


def run_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`fewshot ARGS` in a subprocess, its output to `log` (a pipe nobody reads while
    polling could fill up and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fewshot.cli", *args],
            cwd=cwd,
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finished_trials(search_dir: Path) -> dict[str, tuple[float, int]]:
    """trial -> (its model's mtime, how many times it started training)."""
    return {
        d.name: ((d / "model.pt").stat().st_mtime, len((d / "starts").read_text().splitlines()))
        for d in search_dir.glob("resume-*")
        if (d / "result.json").is_file()
    }


def test_interrupted_search_resumes_without_redoing_finished_trials(
    cluster, synthetic_store, workdir
):
    path = tune_file(
        workdir,
        synthetic_store,
        "resume",
        space={
            "train.lr": {"loguniform": [0.01, 0.1]},
            "method.temperature": {"choice": [0.5, 1.0, 2.0]},
        },
        search={"num_samples": 4, "max_concurrent_trials": 1, "scheduler": "none"},
    )
    args = ["tune", "--config", str(path), "--set", "train.steps=12", "--set", "train.eval_every=3"]
    first = run_cli(args, workdir, workdir / "first.log")
    search_dir, storage = workdir / "runs" / "resume", workdir / "runs" / "ray"

    def in_flight() -> list[str]:
        """Unfinished trials with a Train checkpoint (interrupted, they continue from it)."""
        done = finished_trials(search_dir)
        return [
            d.name
            for d in search_dir.glob("resume-*")
            if d.name not in done and list((storage / d.name).glob("checkpoint_*"))
        ]

    deadline = time.time() + 300
    while len(finished_trials(search_dir)) < 2 or not in_flight():
        assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no two trials finished and a third under way"
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)  # Ctrl+C
    first.wait(timeout=180)
    output = (workdir / "first.log").read_text()
    assert first.returncode == 2, output[-3000:]
    before = finished_trials(search_dir)
    interrupted = [t for t in in_flight() if t not in before]
    assert 2 <= len(before) < 4
    assert (
        f"interrupted with {len(before)} of 4 trials done; continue it with: "
        "fewshot tune --resume resume"
    ) in output
    parent_id = (search_dir / "mlflow_run_id").read_text()

    again = run_cli(["tune", "--resume", "resume"], workdir, workdir / "again.log")
    again.wait(timeout=600)
    output = (workdir / "again.log").read_text()
    assert again.returncode == 0, output[-3000:]
    assert "deprecat" not in output.lower(), output
    after = finished_trials(search_dir)
    assert len(after) == 4  # every trial finished
    for trial, (mtime, starts) in before.items():
        assert after[trial] == (mtime, starts) and starts == 1, trial  # not run again
    assert (search_dir / "mlflow_run_id").read_text() == parent_id  # the same parent run
    assert "# best config" in output and "top trials" in output
    best = load_config(search_dir / "best_config.yaml")
    assert best.name.startswith("resume-") and best.distributed.workers == 1

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = nested_runs(parent_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    for trial in interrupted:  # continued from its checkpoint, in the same nested run
        assert after[trial][1] == 2, trial
        run_id = (search_dir / trial / "mlflow_run_id").read_text()
        resumed = mlflow.MlflowClient().get_metric_history(run_id, "resumed_from_step")
        assert resumed and resumed[-1].value >= 3, trial


def test_a_trial_that_fails_leaves_no_mlflow_run_running(cluster, synthetic_store, workdir):
    from fewshot.errors import FewShotError
    from fewshot.tune.search import run_search

    # A learning rate no weights survive: the trial's training stops on non-finite weights.
    path = tune_file(
        workdir,
        synthetic_store,
        "fails",
        space={"train.lr": {"grid": [1.0e30]}},
        search={"num_samples": 1, "max_concurrent_trials": 1, "scheduler": "none"},
    )
    with pytest.raises(FewShotError, match="every trial failed"):
        run_search(path, ["train.steps=4", "train.eval_every=2"])

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    parent_id = (workdir / "runs" / "fails" / "mlflow_run_id").read_text()
    trials = nested_runs(parent_id)
    assert len(trials) == 1 and trials[0].info.status == "FAILED"
    assert client.get_run(parent_id).info.status == "FAILED"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "attributes.status = 'RUNNING'")
