"""register, promote, models list and predict through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot.registry.gate import promote
from fewshot.registry.versions import register

ROOT = Path(__file__).resolve().parents[2]


def fewshot(*args: str, uri: str | None = None, cwd: Path | None = None):
    # One torch thread: the machine's 2 cores are shared (see tests/registry/conftest.py).
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"MLFLOW_TRACKING_URI": uri} if uri else {})}
    return subprocess.run(
        [sys.executable, "-m", "fewshot.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "command",
    [["register"], ["promote"], ["models"], ["models", "list"], ["predict"]],
    ids=" ".join,
)
def test_every_registry_command_has_help(command):
    result = fewshot(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_promote_job_entrypoint_runs_the_command():
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "promote.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--force" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["register", "--run", "nope", "--name", "m"], "error: run nope: no such MLflow run"),
        (["register", "--run", "r", "--name", "a/b"], "error: model name 'a/b': use 1 to 100"),
        (["promote", "absent"], "error: registered model 'absent' does not exist"),
        (["models", "list", "absent"], "error: registered model 'absent' does not exist"),
        (
            ["predict", "--model", "models:/absent@champion", "--support", "s", "--query", "q"],
            "error: --support s: not a directory",
        ),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, tiny_runs, args, message):
    result = fewshot(*args, uri=tiny_runs.uri, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_registry_commands_refuse_a_missing_database_instead_of_creating_one(tmp_path):
    result = fewshot("promote", "any", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: no MLflow database at {tmp_path / 'mlflow.db'}; run where you trained, "
        "or set MLFLOW_TRACKING_URI to the tracking store\n"
    )
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def champion(tiny_runs) -> str:
    register(tiny_runs.ids["tiny"], "folders", uri=tiny_runs.uri)
    promote("folders", uri=tiny_runs.uri)
    return "models:/folders@champion"


def test_predict_answers_one_json_line_per_query_file_in_name_order(
    tmp_path, tiny_runs, champion, glyph
):
    support, query = tmp_path / "support", tmp_path / "query"
    sizes = {"alpha": (40, 40), "beta": (57, 91), "gamma": (105, 30)}
    for seed, (label, size) in enumerate(sizes.items()):
        (support / label).mkdir(parents=True)
        (support / label / "one.png").write_bytes(glyph(seed, size))
    query.mkdir()
    # Exact copies of the support images in other modes, and a lossy JPEG.
    (query / "b_rgba.png").write_bytes(glyph(0, sizes["alpha"], "RGBA"))
    (query / "a_palette.png").write_bytes(glyph(1, sizes["beta"], "P"))
    (query / "c_rgb.png").write_bytes(glyph(2, sizes["gamma"], "RGB"))
    (query / "d_photo.jpg").write_bytes(glyph(1, (33, 47), "RGB", "JPEG"))
    (query / ".DS_Store").write_bytes(b"ignored")

    result = fewshot(
        "predict", "--model", champion, "--support", str(support), "--query", str(query),
        uri=tiny_runs.uri,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [
        "a_palette.png", "b_rgba.png", "c_rgb.png", "d_photo.jpg"
    ]  # fmt: skip
    assert [line["label"] for line in lines[:3]] == ["beta", "alpha", "gamma"]
    for line in lines:
        assert set(line) == {"file", "label", "probabilities"}
        assert list(line["probabilities"]) == ["alpha", "beta", "gamma"]
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    (query / "notes.txt").write_text("not an image")
    refused = fewshot(
        "predict", "--model", champion, "--support", str(support), "--query", str(query),
        uri=tiny_runs.uri,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: {query / 'notes.txt'}: not a readable image")


def test_models_list_shows_versions_aliases_and_scores(tiny_runs, champion):
    result = fewshot("models", "list", "folders", uri=tiny_runs.uri)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ 1 "))
    assert "champion" in row and "protonet" in row and "first" in row and "+-" in row
