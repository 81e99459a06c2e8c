"""`make omniglot` (jobs/omniglot.py) end to end, with a tiny training budget."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fewshot.methods.ensemble import Ensemble
from fewshot.model_file import from_run

JOB = Path(__file__).resolve().parents[2] / "jobs" / "omniglot.py"


def run_job(workdir: Path, store: Path, zips, **env: str) -> subprocess.CompletedProcess:
    overrides = [
        f"data.path={store}",  # prepared already: the job's prepare step is a no-op
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
    env = {"OMNIGLOT_DIR": str(zips[0].parent), "PATH": "/usr/bin:/bin", **env}
    return subprocess.run(
        [sys.executable, str(JOB), *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_job_trains_on_both_sets_promotes_once_and_is_idempotent(
    workdir, omniglot_store, omniglot_zips
):
    first = run_job(workdir, omniglot_store, omniglot_zips)
    assert first.returncode == 0, first.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("omniglot", "champion")
    assert str(champion.version) == "1"
    assert "first" in first.stderr  # the gate's decision: nothing to beat yet
    assert "train 2/2" in first.stderr  # progress lines when not on a terminal
    config = (workdir / "runs" / "omniglot" / "config.yaml").read_text()
    assert "- small1\n  - small2" in config and "rotations: true" in config
    # The champion is one model of the two members of jobs/configs/train/omniglot_members.yaml.
    _, model = from_run(workdir / "runs" / "omniglot")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    members = [from_run(workdir / "runs" / n)[0] for n in ("omniglot-stroke", "omniglot-40way")]
    assert members[0].augment.stroke == 0.5 and members[0].episode.n_way == 20
    assert members[1].episode.n_way == 40 and not members[1].data.within_group
    assert members[1].train.steps == members[0].train.steps == 2  # the overrides come last

    again = run_job(workdir, omniglot_store, omniglot_zips)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trained already" in again.stderr and "champion is this run's model" in again.stderr
    assert len(client.search_model_versions("name='omniglot'")) == 1


def test_a_missing_zip_is_one_line_and_nothing_is_trained(workdir, omniglot_store, tmp_path):
    result = run_job(workdir, workdir / "omniglot-store", [tmp_path / "nowhere.zip"])
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    )
    assert not (workdir / "runs").exists()


def test_a_budget_that_is_not_minutes_is_one_line_and_nothing_runs(workdir, omniglot_zips):
    result = run_job(workdir, workdir / "store", omniglot_zips, OMNIGLOT_TRAIN_MINUTES="abc")
    assert result.returncode == 2
    assert result.stderr == (
        "error: OMNIGLOT_TRAIN_MINUTES='abc': give the training budget as a number of minutes "
        "above 0, e.g. 40\n"
    )
    assert list(workdir.iterdir()) == []  # no store prepared, no run, no MLflow store
