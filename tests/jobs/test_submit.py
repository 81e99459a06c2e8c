"""`fewshot submit COMMAND [ARGS]` for real: jobs on a real Ray head with its Jobs
server that run the submitted copy of the package, a mistake refused on this machine
with nothing submitted, and the jobs/ folder in step with the commands a job can run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import typer
import yaml

from fewshot.cli import app
from fewshot.jobs import COMMANDS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head():
    """One Ray node of 2 CPUs started with `ray start --head`, not the 3-node `cluster`:
    nodes on one machine share one folder of unpacked runtime_envs, and each node that
    unpacks a job's working_dir first deletes the copy another node unpacked (Ray 2.60,
    `overwrite=True`), the job driver's working directory with it; a search's driver
    reads relative paths after its trials start, and then fails where no real cluster
    would."""
    from fewshot.ray_cluster import LocalCluster

    fast = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    cluster = LocalCluster([], head_cpus=2, env=fast).start()
    yield cluster
    cluster.stop()


def submit(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "submit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "token", **env},
    )


def job_ids(head) -> set[str]:
    from ray.job_submission import JobSubmissionClient

    return {job.submission_id for job in JobSubmissionClient(head.dashboard).list_jobs()}


def test_every_job_command_is_a_command_with_an_entry_in_jobs():
    """COMMANDS is the one list: each a command of the app, each with its jobs/ script
    (`bench methods`: jobs/bench_methods.py) for users of `ray job submit` itself."""
    root = typer.main.get_command(app)
    for command in COMMANDS:
        target = root
        for word in command.split():
            assert word in target.commands, command
            target = target.commands[word]
    scripts = {p.stem for p in (REPO / "jobs").glob("*.py")} - {"_entry"}
    assert sorted(scripts) == sorted(c.replace(" ", "_") for c in COMMANDS)


@pytest.mark.cluster
def test_submitted_search_runs_its_trials_on_the_cluster(head, synthetic_store, tmp_path):
    """`fewshot submit tune`: the search runs as a job and logs its parent run and its
    trials."""
    out = tmp_path / "out"
    spec = {
        "name": "submitted",
        "base": {
            "name": "base",
            "data": {"path": str(synthetic_store), "image_size": 16},
            "backbone": {"width": 8},
            "episode": {"q_query": 3, "meta_batch": 2},
            "train": {"optimizer": "sgd", "momentum": 0.0, "schedule": "constant"},
            "evaluate": {"episodes": 10},
            "distributed": {"workers": 1, "storage_path": str(out / "ray")},
        },
        "space": {"train.lr": {"grid": [0.05, 0.1]}},
        "search": {"num_samples": 1, "scheduler": "none"},
    }
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    db = tmp_path / "mlflow.db"
    tiny = ["train.steps=4", "train.eval_every=2", "train.val_episodes=4", "train.threads=1"]
    done = submit(
        "tune",
        "--config",
        str(tmp_path / "tune.yaml"),
        *[a for s in [f"train.output_dir={out}", *tiny] for a in ("--set", s)],
        "--address",
        head.dashboard,
        "--working-dir",
        str(REPO),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--follow",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    search = out / "submitted"
    trials = [d for d in search.glob("submitted-*") if (d / "model.pt").is_file()]
    assert len(trials) == 2
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    parent = client.get_run((search / "mlflow_run_id").read_text().strip())
    assert parent.info.status == "FINISHED" and "best_val_acc" in parent.data.metrics


@pytest.mark.cluster
def test_the_job_runs_the_submitted_copy_of_the_package(head, tmp_path):
    """A copy of the package, changed to say where it was imported from, runs `fewshot
    submit`: the job imports the copy shipped with it, not the version the cluster's
    Python has installed (this checkout, here)."""
    shipped = tmp_path / "shipped"
    copy = shutil.copytree(
        REPO / "platform" / "fewshot",
        shipped / "platform" / "fewshot",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    with open(copy / "__init__.py", "a") as init:
        init.write('\nprint(f"fewshot imported from {__file__}")\n')
    done = submit(
        *["train", "--dry-run", "--address", head.dashboard, "--follow"],
        cwd=shipped,
        PYTHONPATH=str(shipped / "platform"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    imported = re.findall(r"fewshot imported from (\S+)", done.stdout)
    assert imported[0] == str(copy / "__init__.py")  # here: `fewshot submit` itself
    assert "/runtime_resources/py_modules_files/" in imported[1]  # there: the job


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trian"], "error: no job runs 'trian'; submit one of: train, tune, evaluate, "),
        (
            ["jobs/configs/train/omniglot_protonet_5w1s.yaml"],  # the old form
            "a config goes after the command: train --config jobs/configs/train/omniglot_",
        ),
        (["bench"], "error: no job runs 'bench'"),
        (["train", "--set", "episode.n_way=1"], "error: episode.n_way: must be >= 2 (got 1)"),
        (["train", "--config", "missing.yaml"], "error: config file missing.yaml does not exist"),
        (["tune", "--config", "missing.yaml"], "error: tune file missing.yaml does not exist"),
        (["evaluate", "--episodes", "600"], "error: fewshot evaluate: Missing option '--run'"),
        (["train", "--bogus"], "error: fewshot train: No such option: --bogus"),
        (["train", "--working-dir", "nowhere"], "error: --working-dir nowhere is not a dir"),
    ],
)
def test_a_mistake_is_one_line_and_nothing_is_submitted(head, tmp_path, args, message):
    before = job_ids(head)
    done = submit(*args, "--address", head.dashboard, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1, done.stderr
    assert message in done.stderr
    assert done.stdout == ""
    assert job_ids(head) == before


@pytest.mark.slow
@pytest.mark.cluster
def test_submitted_headline_job_trains_registers_and_promotes(
    head, omniglot_store, omniglot_zips, tmp_path
):
    """`fewshot submit omniglot` with the tiny settings of tests/jobs/test_omniglot_job.py."""
    db = tmp_path / "mlflow.db"
    tiny = [
        f"data.path={omniglot_store}",  # prepared already: the job's prepare step is a no-op
        f"train.output_dir={tmp_path / 'runs'}",
        "data.image_size=16",
        "backbone.width=4",
        "train.steps=2",
        "train.eval_every=2",
        "train.threads=1",
        "evaluate.episodes=4",
        "method.test_views=2",
    ]
    done = submit(
        "omniglot",
        "--data",
        str(omniglot_zips[0].parent),
        "--minutes",
        "5",
        *[a for s in tiny for a in ("--set", s)],
        "--address",
        head.dashboard,
        "--working-dir",
        str(REPO),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--follow",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    champion = mlflow.MlflowClient(f"sqlite:///{db}").get_model_version_by_alias(
        "omniglot", "champion"
    )
    assert str(champion.version) == "1"
