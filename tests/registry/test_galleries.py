"""Galleries: versioned support sets in a real MLflow store (SQLite plus a local artifact
folder), changed through the library and the command line, two clients at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tests.registry.conftest import TINY, train_runs

from fewshot.errors import FewShotError
from fewshot.registry import galleries
from fewshot.registry.gate import promote
from fewshot.registry.versions import connect, register


def fewshot(*args: str, uri: str, cwd: Path) -> subprocess.Popen:
    # One torch thread: the machine's 2 cores are shared (see tests/registry/conftest.py).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri, "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "fewshot.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(*args: str, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    return finished(fewshot(*args, uri=uri, cwd=cwd))


@pytest.fixture(scope="module")
def model(tiny_runs) -> str:
    """A ProtoNet (it answers any number of classes), registered and champion."""
    register(tiny_runs.ids["tiny"], "gallery-model", uri=tiny_runs.uri)
    promote("gallery-model", uri=tiny_runs.uri)
    return "models:/gallery-model@champion"


@pytest.fixture
def uri(tiny_runs, workdir, monkeypatch) -> str:
    """The runs' store, the process's tracking store; galleries' artifacts land in this
    test's directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_runs.uri)
    return tiny_runs.uri


@pytest.fixture
def images(glyph):
    """images(label) -> two distinct images of that class."""

    def of(label: str, count: int = 2) -> list[bytes]:
        seed = sum(map(ord, label)) * 10
        return [glyph(seed + i) for i in range(count)]

    return of


def support_dir(root: Path, images, labels: list[str]) -> Path:
    for label in labels:
        (root / label).mkdir(parents=True)
        for i, image in enumerate(images(label)):
            (root / label / f"{i}.png").write_bytes(image)
    return root


def make(name: str, model: str, images, labels=("alpha", "beta", "gamma"), uri=None):
    found = [(image, label) for label in labels for image in images(label)]
    return galleries.create(name, model, [i for i, _ in found], [la for _, la in found], uri)


def content(version) -> list[tuple[str, bytes]]:
    return [(e.label, e.image) for e in galleries.entries(version)]


def test_create_add_show_list_and_remove_through_the_command_line(uri, workdir, model, images):
    support = support_dir(workdir / "support", images, ["beta", "alpha"])
    created = run(
        "gallery",
        "create",
        "shop",
        "--model",
        model,
        "--support",
        str(support),
        uri=uri,
        cwd=workdir,
    )
    assert created.returncode == 0, created.stderr
    assert "gallery shop version 1: created (2 classes, 4 images)" in created.stdout
    for i, image in enumerate(images("teapot", 3)):
        (workdir / f"teapot{i}.png").write_bytes(image)
    added = run(
        "gallery",
        "add",
        "shop",
        "--class",
        "teapot",
        *(str(workdir / f"teapot{i}.png") for i in range(3)),
        uri=uri,
        cwd=workdir,
    )
    assert added.returncode == 0, added.stderr
    assert "version 2: added 3 image(s) as new class 'teapot' (3 classes, 7 images)" in added.stdout

    latest = galleries.get("shop")
    assert (latest.version, latest.model, latest.classes, latest.images) == (2, model, 3, 7)
    # Classes in label order, a class's images in the order given: what --support reads.
    assert content(latest) == [
        *(("alpha", i) for i in images("alpha")),
        *(("beta", i) for i in images("beta")),
        *(("teapot", i) for i in images("teapot", 3)),
    ]
    # More images of a class it holds: only the new ones are added.
    extended = galleries.add("shop", "teapot", [*images("teapot", 3), images("teapot", 4)[3]])
    assert extended.change == "added 1 image(s) to 'teapot'" and extended.images == 8

    shown = run("gallery", "show", "shop", "--version", "2", uri=uri, cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert "gallery shop version 2" in shown.stdout and "teapot" in shown.stdout
    assert "added 1 image(s) to 'teapot'" in shown.stdout  # the history lists version 3
    listed = run("gallery", "list", uri=uri, cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "│ shop " in line)
    assert [cell.strip() for cell in row.split("│")[1:6]] == ["shop", "3", "3", "8", model]

    removed = run("gallery", "remove", "shop", "--class", "beta", uri=uri, cwd=workdir)
    assert removed.returncode == 0, removed.stderr
    assert [e.label for e in galleries.entries(galleries.get("shop"))] == ["alpha"] * 2 + [
        "teapot"
    ] * 4
    assert [v.version for v in galleries.history("shop")] == [1, 2, 3, 4]


def test_rollback_restores_an_earlier_versions_classes(uri, model, images):
    first = make("rollback", model, images)
    galleries.remove("rollback", "gamma")
    galleries.add("rollback", "delta", images("delta"))
    restored = galleries.rollback("rollback", 1)
    assert restored.version == 4 and restored.change == "rolled back to version 1"
    assert content(restored) == content(first)
    # The versions in between stay readable: a rollback can itself be rolled back.
    assert [e.label for e in galleries.entries(galleries.get("rollback", 3))] == [
        "alpha",
        "alpha",
        "beta",
        "beta",
        "delta",
        "delta",
    ]


def test_a_version_is_claimed_once_so_a_late_writer_cannot_overwrite_it(uri, model, images):
    """The compare-and-set under every change: two writers on top of the same version,
    one wins; the other's run belongs to no version."""
    head = make("claims", model, images)
    client = connect(uri)
    experiment = client.get_run(head.run_id).info.experiment_id
    rows = galleries.entries(head)
    ours, theirs = (
        galleries._write(client, experiment, "claims", 2, model, change, rows)
        for change in ("ours", "theirs")
    )
    assert galleries._claim(client, head, ours)
    assert not galleries._claim(client, head, theirs)
    assert [v.change for v in galleries.history("claims")] == ["created", "ours"]


ADDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fewshot.registry import galleries
    start, name, *labels = sys.argv[1:]
    time.sleep(max(0.0, float(start) - time.time()))
    for label in labels:
        galleries.add(name, label, [Path(f"{label}.png").read_bytes()])
    """
)


def test_concurrent_adds_from_two_processes_all_land(uri, workdir, model, images):
    make("busy", model, images, ["alpha", "beta"])
    for i, image in enumerate(images("teapot")):
        (workdir / f"teapot{i}.png").write_bytes(image)
    (workdir / "kettle.png").write_bytes(images("kettle")[0])
    commands = [
        fewshot(
            "gallery",
            "add",
            "busy",
            "--class",
            "teapot",
            "teapot0.png",
            "teapot1.png",
            uri=uri,
            cwd=workdir,
        ),
        fewshot("gallery", "add", "busy", "--class", "kettle", "kettle.png", uri=uri, cwd=workdir),
    ]
    assert [finished(c).returncode for c in commands] == [0, 0]
    assert galleries.get("busy").version == 3
    assert {e.label for e in galleries.entries(galleries.get("busy"))} == {
        "alpha",
        "beta",
        "kettle",
        "teapot",
    }

    # Two processes, three adds each, released at the same instant: every add lands.
    labels = [["a1", "a2", "a3"], ["b1", "b2", "b3"]]
    for label in labels[0] + labels[1]:
        (workdir / f"{label}.png").write_bytes(images(label)[0])
    start = str(time.time() + 8)  # both processes have imported by then
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", ADDER, start, "busy", *group],
            env=env,
            cwd=workdir,
            stderr=subprocess.PIPE,
            text=True,
        )
        for group in labels
    ]
    for p in processes:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    history = galleries.history("busy")
    assert [v.version for v in history] == list(range(1, 10))
    assert {e.label for e in galleries.entries(history[-1])} == {
        "alpha",
        "beta",
        "kettle",
        "teapot",
        *labels[0],
        *labels[1],
    }


def versions_of(name: str) -> int | None:
    try:
        return len(galleries.history(name))
    except FewShotError:
        return None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: galleries.add("refuse", "delta", []), "class 'delta': no images"),
        (
            lambda i: galleries.add("refuse", "delta", [i("delta")[0], b"\x89PNG not really"]),
            "class 'delta' image 2: not a readable image",
        ),
        (lambda i: galleries.add("refuse", "", i("x")), "label '': give a one-line label"),
        (lambda i: galleries.add("refuse", "alpha", i("alpha")), "are already in gallery"),
        (lambda i: galleries.add("refuse", "delta", i("delta")), "4 classes, over the limit of 3"),
        (lambda i: galleries.add("refuse", "beta", i("x", 3)), "9 images, over the limit of 6"),
        (lambda i: galleries.remove("refuse", "omega"), "class 'omega': not in gallery"),
        (lambda i: galleries.rollback("refuse", 7), "gallery 'refuse' has no version 7"),
        (
            lambda i: galleries.create(
                "refuse", "models:/gallery-model@champion", i("a"), ["a"] * 2
            ),
            "gallery 'refuse' already exists",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_every_refusal_is_one_line_and_writes_no_version(
    uri, model, images, monkeypatch, change, message
):
    if versions_of("refuse") is None:
        make("refuse", model, images)
    monkeypatch.setenv("FEWSHOT_GALLERY_MAX_CLASSES", "3")
    monkeypatch.setenv("FEWSHOT_GALLERY_MAX_IMAGES", "6")
    experiment = connect(uri).get_experiment_by_name(galleries.PREFIX + "refuse").experiment_id
    runs = len(connect(uri).search_runs([experiment]))
    with pytest.raises(FewShotError) as refused:
        change(images)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert versions_of("refuse") == 1
    assert len(connect(uri).search_runs([experiment])) == runs  # not even an unclaimed run


def test_a_refused_create_writes_nothing_and_says_so_in_one_line(uri, workdir, model, images):
    support = support_dir(workdir / "support", images, ["alpha", "beta"])
    (support / "empty").mkdir()
    result = run(
        "gallery",
        "create",
        "never",
        "--model",
        model,
        "--support",
        str(support),
        uri=uri,
        cwd=workdir,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: --support {support / 'empty'}: no images; put at least one image in it\n"
    )
    (support / "empty" / "x.png").write_bytes(b"not an image")
    result = run(
        "gallery",
        "create",
        "never",
        "--model",
        model,
        "--support",
        str(support),
        uri=uri,
        cwd=workdir,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {support / 'empty' / 'x.png'}: not a readable image")
    assert connect(uri).get_experiment_by_name(galleries.PREFIX + "never") is None


@pytest.fixture(scope="module")
def maml(tmp_path_factory, synthetic_store) -> str:
    """A MAML trained on 3-way tasks: it answers 3 classes, no other number."""
    runs = train_runs(
        tmp_path_factory.mktemp("gallery-maml"),
        synthetic_store,
        {"maml": [*TINY, "method.name=maml", "episode.n_way=3"]},
    )
    register(runs.ids["maml"], "maml3", uri=runs.uri)
    return runs.uri


def test_a_model_that_cannot_answer_the_class_count_is_refused(maml, tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    model = "models:/maml3/1"
    with pytest.raises(
        FewShotError,
        match="2 classes, but model models:/maml3/1 \\(maml\\) answers only 3-way tasks",
    ):
        make("maml", model, images, ["alpha", "beta"], uri=maml)
    assert connect(maml).get_experiment_by_name(galleries.PREFIX + "maml") is None
    make("maml", model, images, uri=maml)
    with pytest.raises(FewShotError, match="4 classes, but model"):
        galleries.add("maml", "delta", images("delta"), uri=maml)
    galleries.add("maml", "gamma", images("delta"), uri=maml)  # a class it holds: 3 classes
    assert [v.version for v in galleries.history("maml", uri=maml)] == [1, 2]


def test_predict_with_a_gallery_equals_predict_with_its_images(uri, workdir, model, images):
    support = support_dir(workdir / "support", images, ["alpha", "beta", "gamma"])
    make("same", model, images, ["alpha", "beta"])
    galleries.add("same", "gamma", images("gamma"))
    query = workdir / "query"
    query.mkdir()
    for i, label in enumerate(["gamma", "alpha", "beta"]):
        (query / f"q{i}.png").write_bytes(images(label, 3)[2])

    common = ("predict", "--model", model, "--query", str(query))
    by_folder = run(*common, "--support", str(support), uri=uri, cwd=workdir)
    by_gallery = run(*common, "--gallery", "same", uri=uri, cwd=workdir)
    assert by_folder.returncode == 0 and by_gallery.returncode == 0, by_gallery.stderr
    expected = [json.loads(line) for line in by_folder.stdout.splitlines()]
    got = [json.loads(line) for line in by_gallery.stdout.splitlines()]
    assert [g["file"] for g in got] == ["q0.png", "q1.png", "q2.png"]
    for e, g in zip(expected, got, strict=True):
        assert g["label"] == e["label"] and g["probabilities"].keys() == e["probabilities"].keys()
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
        assert (g["model_version"], g["gallery_version"]) == ("1", 2)

    neither = run(*common, uri=uri, cwd=workdir)
    assert neither.returncode == 2
    assert neither.stderr == "error: give the classes with either --support DIR or --gallery NAME\n"
