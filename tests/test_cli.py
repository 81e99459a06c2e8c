"""The CLI through its real entry point, as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

FEWSHOT = [sys.executable, "-m", "fewshot.cli"]
COMMANDS = [
    [],
    ["data"],
    ["data", "prepare"],
    ["data", "prepare", "omniglot"],
    ["data", "prepare", "folder"],
    ["data", "prepare", "synthetic"],
    ["data", "prepare", "mini-imagenet"],
    ["data", "prepare", "tiered-imagenet"],
    ["data", "prepare", "cub"],
    ["data", "prepare", "cifar-fs"],
    ["data", "prepare", "fc100"],
    ["data", "info"],
    ["train"],
    ["evaluate"],
    ["demo"],
    ["submit"],
    ["jobs"],
    ["jobs", "status"],
    ["jobs", "logs"],
    ["jobs", "stop"],
    ["bench"],
    ["bench", "distributed"],
    ["bench", "gpu"],
    ["tune"],
]


def fewshot(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FEWSHOT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fewshot")
def test_every_command_has_help(command):
    result = fewshot(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_prepare_lists_every_converter():
    listed = fewshot("data", "prepare", "--help").stdout
    for name in ("omniglot", "folder", "synthetic", "mini-imagenet", "tiered-imagenet", "cub"):
        assert name in listed
    assert "cifar-fs" in listed and "fc100" in listed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "episode.n_way=1"], "error: episode.n_way: must be >= 2 (got 1)"),
        (["train", "--set", "trian.steps=3"], "error: trian: unknown key"),
        (["train", "--config", "missing.yaml"], "error: config file missing.yaml does not exist"),
        (["train", "--config", "."], "error: config file . is a directory"),
        (["data", "info", "nowhere"], "error: dataset nowhere: it does not exist"),
        (
            ["data", "prepare", "omniglot", "--out", "o", "--from-zip", "x.zip"],
            "error: x.zip does not exist",
        ),
        (
            ["data", "prepare", "mini-imagenet", "--out", "m", "--from-pickles", "nowhere"],
            "error: nowhere/mini-imagenet-cache-train.pkl does not exist",
        ),
        (["data", "prepare", "fc100", "--out", "f"], "error: give --root DIR holding"),
        (["evaluate", "--run", "runs/none"], "error: runs/none: no such model file"),
        (["tune", "--config", "missing.yaml"], "error: tune file missing.yaml does not exist"),
        (["tune", "--resume", "gone"], "error: --resume gone: no search in runs/gone"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    result = fewshot(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_prepare_info_train_evaluate(tmp_path, omniglot_zips):
    prepared = fewshot(
        "data",
        "prepare",
        "omniglot",
        "--out",
        "omni",
        "--from-zip",
        str(omniglot_zips[0]),
        cwd=tmp_path,
    )
    assert prepared.returncode == 0, prepared.stderr
    info = fewshot("data", "info", "omni", cwd=tmp_path)
    assert "small1" in info.stdout and "136" in info.stdout and "2720" in info.stdout
    trained = fewshot(
        "train",
        "--set",
        "data.path=omni",
        "--set",
        "data.train_split=small1",
        "--set",
        "data.val_split=null",
        "--set",
        "data.test_split=small1",
        "--set",
        "train.steps=2",
        "--set",
        "evaluate.episodes=5",
        "--set",
        "tracking.enabled=false",
        "--set",
        "name=cli",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert "train 2/2" in trained.stderr  # progress lines also when the output is not a terminal
    assert (tmp_path / "runs" / "cli" / "model.pt").is_file()
    evaluated = fewshot(
        "evaluate",
        "--run",
        "runs/cli",
        "--episodes",
        "5",
        "--set",
        "evaluate.n_way=3",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "3-way 1-shot" in evaluated.stdout and "5" in evaluated.stdout
