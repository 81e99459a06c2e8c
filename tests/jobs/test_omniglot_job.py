"""`fewshot omniglot` (what `make omniglot` and jobs/omniglot.py run) end to end, with a
tiny training budget."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fewshot.methods.ensemble import Ensemble
from fewshot.model_file import from_run

ROOT = Path(__file__).resolve().parents[2]


def tiny(workdir: Path, store: Path) -> list[str]:
    """--set options that make every member train 2 steps at 16 px on `store`."""
    settings = [
        f"data.path={store}",  # prepared already: the command's prepare step is a no-op
        f"train.output_dir={workdir / 'runs'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        "data.image_size=16",
        "backbone.width=4",
        "train.steps=2",
        "train.eval_every=2",
        "train.threads=1",
        "evaluate.episodes=4",
        "method.test_views=2",
    ]
    return [option for s in settings for option in ("--set", s)]


def run(workdir: Path, *args: str, job: bool = False) -> subprocess.CompletedProcess:
    """`fewshot omniglot ARGS`, or `python jobs/omniglot.py ARGS` with `job`, run in
    `workdir`."""
    command = [str(ROOT / "jobs" / "omniglot.py")] if job else ["-m", "fewshot.cli", "omniglot"]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:")
    return last


@pytest.mark.slow
def test_the_command_trains_each_member_once_promotes_once_and_is_idempotent(
    workdir, omniglot_store, omniglot_zips
):
    args = [
        "--data",
        str(omniglot_zips[0].parent),
        "--minutes",
        "30",
        *tiny(workdir, omniglot_store),
    ]
    # The second member's directory holds another run: refused like any training run,
    # after the first member trained.
    blocked = workdir / "runs" / "omniglot-40way"
    blocked.mkdir(parents=True)
    (blocked / "config.yaml").write_text("name: other\n")
    stopped = run(workdir, *args)
    assert "different config" in one_error_line(stopped)
    assert (workdir / "runs" / "omniglot-stroke" / "model.pt").is_file()
    assert not (workdir / "runs" / "omniglot").exists()

    shutil.rmtree(blocked)
    first = run(workdir, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    # Resumed per member: the finished one is not trained again.
    assert "trained already" in first.stderr and "train omniglot-40way" in first.stderr
    assert "train omniglot-stroke" not in first.stderr
    assert "resumes" not in first.stderr  # the 40-way member had no checkpoint to resume
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("omniglot", "champion")
    assert str(champion.version) == "1"
    assert "first" in first.stderr  # the gate's decision: nothing to beat yet
    assert "train 2/2" in first.stderr  # progress lines when not on a terminal
    config = (workdir / "runs" / "omniglot" / "config.yaml").read_text()
    assert "- small1\n  - small2" in config and "rotations: true" in config
    # The champion is one model of the two members of recipes/omniglot_members.yaml.
    _, model = from_run(workdir / "runs" / "omniglot")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    members = [from_run(workdir / "runs" / n)[0] for n in ("omniglot-stroke", "omniglot-40way")]
    assert members[0].augment.stroke == 0.5 and members[0].episode.n_way == 20
    assert members[1].episode.n_way == 40 and not members[1].data.within_group
    assert members[1].train.steps == members[0].train.steps == 2  # the overrides come last
    assert members[0].train.minutes == members[1].train.minutes == 15  # equal shares of 30

    again = run(workdir, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("trained already") == 2 and "combined already" in again.stderr
    assert "champion is this run's model" in again.stderr
    assert len(client.search_model_versions("name='omniglot'")) == 1


def test_a_missing_zip_is_one_line_and_nothing_is_trained(workdir, omniglot_store, tmp_path):
    result = run(workdir, "--data", str(tmp_path / "nowhere"), *tiny(workdir, omniglot_store))
    assert "images_background_small1.zip does not exist; pass --data DIR" in one_error_line(result)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("minutes", ["abc", "nan", "0", "-5"])
def test_a_budget_that_is_not_minutes_is_one_line_and_nothing_runs(workdir, omniglot_zips, minutes):
    result = run(workdir, "--data", str(omniglot_zips[0].parent), "--minutes", minutes)
    assert result.stderr == (
        f"error: --minutes={minutes!r}: give the training budget as a number of minutes "
        "above 0, e.g. 40\n"
    )
    assert list(workdir.iterdir()) == []  # no store prepared, no run, no MLflow store


def test_the_job_entry_runs_the_command_with_its_arguments(workdir, omniglot_zips):
    untracked = ["--set", "tracking.enabled=false"]
    result = run(workdir, "--data", str(omniglot_zips[0].parent), *untracked, job=True)
    assert "registers and promotes its model in MLflow" in one_error_line(result)
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(workdir.iterdir()) == []
