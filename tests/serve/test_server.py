"""`fewshot serve`: a real MLflow scoring server on 127.0.0.1, and the Python client."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tests.serve.conftest import malformed, memory_mb, send

from fewshot.cli import main
from fewshot.config import load_config
from fewshot.errors import RequestError, ServeError
from fewshot.pipeline import train
from fewshot.ray_cluster import free_port
from fewshot.registry.gate import promote
from fewshot.registry.versions import load
from fewshot.serve import Client
from fewshot.serve.client import _error_message, request_body
from fewshot.train.runner import RunResult


def fewshot(*args: str, uri: str, **kwargs):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}  # shared cores
    return subprocess.Popen([sys.executable, "-m", "fewshot.cli", *args], env=env, **kwargs)


@dataclass(frozen=True)
class Served:
    client: Client
    uri: str  # tracking URI
    port: int
    store: Path
    server_pid: int  # uvicorn, one worker: the process that holds the model


def tracking_store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def tiny_run(name: str, root: Path, store: Path, *settings: str) -> RunResult:
    """A tiny model trained under `settings`, tracked in `tracking_store(root)`."""
    tiny = [
        f"name={name}",
        f"data.path={store}",
        "data.image_size=16",
        "backbone.width=8",
        "episode.q_query=3",
        "train.steps=2",
        "train.val_episodes=2",
        "train.threads=1",
        "evaluate.episodes=10",
        f"train.output_dir={root / 'runs'}",
        f"tracking.uri={tracking_store(root)}",
    ]
    return train(load_config(None, [*tiny, *settings]))


def champion_of_tiny_run(name: str, root: Path, store: Path) -> tuple[str, str]:
    """A tiny model trained with `registry.register` in a tracking store under `root`, and
    promoted: (tracking URI, training run id)."""
    result = tiny_run(name, root, store, "registry.register=true")
    uri = tracking_store(root)
    promote(name, uri=uri)
    return uri, result.run_id


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_store):
    """A tiny model trained with `registry.register`, promoted, and served by the CLI."""
    root = tmp_path_factory.mktemp("serve")
    uri, _ = champion_of_tiny_run("served", root, synthetic_store)
    port = free_port()
    with open(root / "server.log", "wb") as log:
        # Its own session: the server and its uvicorn child are stopped as one group.
        server = fewshot(
            "serve", "served", "--port", str(port),
            uri=uri, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        client = Client(f"http://127.0.0.1:{port}")
        client.wait_ready(timeout=120)
        yield Served(client, uri, port, synthetic_store, server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def task(store: Path, n_way: int = 5) -> tuple[dict[str, list[bytes]], list[bytes]]:
    """A 5-way 1-shot support set of raw test images by class name, and one query per class."""
    table = pq.read_table(sorted((store / "split=test").glob("*.parquet"))[0]).to_pylist()
    by_class: dict[str, list[bytes]] = {}
    for row in table:
        by_class.setdefault(row["class_name"], []).append(row["image"])
    chosen = list(by_class.items())[:n_way]
    return {name: images[:1] for name, images in chosen}, [images[1] for _, images in chosen]


@pytest.mark.cluster
def test_server_answers_like_the_local_model(served):
    support, queries = task(served.store)
    answers = served.client.predict(support, queries)
    labels = [label for label, images in support.items() for _ in images]
    images = [image for group in support.values() for image in group]
    local = load("models:/served@champion", served.uri).classify(images, labels, queries)
    assert [a["label"] for a in answers] == [a["label"] for a in local]
    for remote, here in zip(answers, local, strict=True):
        assert list(remote["probabilities"]) == list(support)
        assert remote["probabilities"] == pytest.approx(here["probabilities"], abs=1e-6)


@pytest.mark.cluster
def test_bad_requests_get_4xx_never_500(served):
    support, queries = task(served.store, n_way=2)
    body = request_body(support, queries)
    for case, bad in malformed(body["inputs"]).items():
        status, answer = send(served.port, "/invocations", bad.body, bad.content_type)
        assert status == bad.status, (case, answer)
        assert len(answer["message"]) < 500, case  # the request is not echoed back
        assert answer.get("limit") == bad.limit or not bad.limit, (case, answer)

    body["inputs"]["support_labels"] = ["only one label"]
    with pytest.raises(RequestError) as caught:
        served.client.invoke(body)
    assert str(caught.value) == (
        "server refused the request (400): support_labels: 1 labels for 2 support_images; "
        "give one label per support image"
    )
    body["inputs"]["support_labels"] = ["a", "b"]
    body["inputs"]["query_images"] = [base64.b64encode(b"not an image").decode()]
    with pytest.raises(RequestError, match=r"query_images\[0\]: not a readable image"):
        served.client.invoke(body)


def serve_error(*args: str, uri: str) -> str:
    """stderr of a `fewshot serve` that is expected to refuse."""
    process = fewshot("serve", *args, uri=uri, stderr=subprocess.PIPE, text=True)
    return process.communicate(timeout=120)[1]


@pytest.mark.cluster
def test_serve_refuses_a_taken_port_and_unknown_names_in_one_line(served):
    assert serve_error("served", "--port", str(served.port), uri=served.uri) == (
        f"error: --port {served.port} on 127.0.0.1: cannot listen (Address already in use); "
        "pass a free --port\n"
    )
    assert serve_error("absent", uri=served.uri).startswith(
        "error: registered model 'absent' does not exist"
    )
    assert serve_error("served", "--alias", "canary", uri=served.uri) == (
        "error: served has no alias 'canary'; run `fewshot promote served` or pass --alias\n"
    )


NOT_A_PORT = "not a TCP port; pass one from 1 to 65535, e.g. 5001"


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (["--ray", "--port", "70000"], f"--port 70000: {NOT_A_PORT}"),
        (["--ray", "--port", "-1"], f"--port -1: {NOT_A_PORT}"),
        (["--ray", "--port", "0"], f"--port 0: {NOT_A_PORT}"),
        (["--port", "0"], f"--port 0: {NOT_A_PORT}"),
        (["--ray", "--replicas", "0"], "--replicas 0: give a whole number >= 1"),
        (["--ray", "--replicas", "-1"], "--replicas -1: give a whole number >= 1"),
        (["--workers", "0"], "--workers 0: give a whole number >= 1"),
        (["--ray", "--cache-mb", "nan"], "--cache-mb nan: give a finite number > 0"),
        (["--ray", "--cache-mb=-1"], "--cache-mb -1.0: give a finite number > 0"),
        (["--ray", "--cache-ttl=-1"], "--cache-ttl -1.0: give a finite number > 0"),
        (["--ray", "--cache-ttl", "inf"], "--cache-ttl inf: give a finite number > 0"),
        (["--ray", "--cpus-per-replica", "0"], "--cpus-per-replica 0.0: give a finite number > 0"),
        (["--test-views", "6"], "--test-views 6: give 1 (none) to 5"),
        (["--ray", "--test-views", "0"], "--test-views 0: give 1 (none) to 5"),
        (
            ["--ray", "--host", "no.such.host.invalid"],
            "--host 'no.such.host.invalid': not an address (Name or service not known); "
            "pass one of this machine, e.g. 127.0.0.1",
        ),
        (
            ["--host", "192.0.2.1"],  # TEST-NET-1: never an address of this machine
            "--host '192.0.2.1': not an address of this machine; pass one that is, e.g. 127.0.0.1",
        ),
    ],
)
def test_a_serve_option_that_cannot_work_is_one_line_before_the_registry_or_ray(
    options, line, tmp_path, monkeypatch, capsys
):
    """Refused before the model is looked up (it does not exist) or Ray starts: nothing
    is written, neither the tracking store nor a Ray session ($RAY_TMPDIR)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    monkeypatch.setattr(sys, "argv", ["fewshot", "serve", "absent", *options])
    with pytest.raises(SystemExit) as exited:
        main()
    assert (exited.value.code, capsys.readouterr().err) == (2, f"error: {line}\n")
    assert list(tmp_path.iterdir()) == []


def test_serve_has_help():
    helped = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "serve", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--alias" in helped.stdout


def test_request_body_and_client_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A")
    body = request_body({"cat": [tmp_path / "a.png", b"B"], "dog": [b"C"]}, [b"Q"])["inputs"]
    assert body["support_labels"] == ["cat", "cat", "dog"]
    assert [base64.b64decode(s) for s in body["support_images"]] == [b"A", b"B", b"C"]
    assert [base64.b64decode(s) for s in body["query_images"]] == [b"Q"]
    mlflow_style = json.dumps({"message": "Failed to predict data '{...}'. \nError: bad label"})
    assert _error_message(mlflow_style.encode()) == "bad label"
    nobody = Client(f"http://127.0.0.1:{free_port()}")
    assert not nobody.ping()
    with pytest.raises(ServeError, match="no scoring server at"):
        nobody.predict({"a": [b"A"], "b": [b"B"]}, [b"Q"])
    with pytest.raises(ServeError, match="no scoring server answered"):
        nobody.wait_ready(timeout=0.3)


@pytest.mark.cluster
def test_requests_past_a_limit_are_refused_and_the_server_stays_up(served):
    support, queries = task(served.store)
    before = [a["label"] for a in served.client.predict(support, queries)]
    cases = malformed(request_body(support, queries)["inputs"])

    def answer(case: str) -> tuple[int, dict]:
        return send(served.port, "/invocations", cases[case].body, cases[case].content_type)

    status, refused = answer("no Content-Type")
    assert status == 415 and "send application/json" in refused["message"]
    status, refused = answer("JSON nested too deep")
    assert refused["message"] == "body: JSON nested too deep; send the documented form"

    # 10,000 queries (3.5 MB) against the limit of 1,000 images: refused at once, unparsed by
    # MLflow, and the server does not grow.
    assert len(cases["10,000 queries"].body) > 3_000_000
    grown = memory_mb(served.server_pid)
    start = time.monotonic()
    status, refused = answer("10,000 queries")
    assert time.monotonic() - start < 1.0
    assert status == 413 and refused["limit"] == "max_images"
    assert refused["message"].startswith("10005 images in one request, over the limit of 1000")
    assert memory_mb(served.server_pid) - grown < 100

    for case in ("one query of 1 MB among 200", "21 MB body", "a label of 100,000 characters"):
        status, refused = answer(case)
        assert (status, refused["limit"]) == (cases[case].status, cases[case].limit), case
    status, refused = answer("a query declaring 5000x5000 pixels")
    assert "query_images[0]: not a readable image (5000x5000" in refused["message"]
    assert "max_pixels" in refused["message"]

    assert [a["label"] for a in served.client.predict(support, queries)] == before


@pytest.mark.cluster
def test_test_views_are_computed_as_asked_and_named_in_every_answer(served, tmp_path):
    """The served model was trained with 1 test view: `--test-views 3` makes the server
    compute 3 (the answers equal the local model's with 3 views, not with 1), and every
    answer's header names what was computed."""
    support, queries = task(served.store)
    images, labels = [i for g in support.values() for i in g], list(support)
    body = json.dumps(request_body(support, queries)).encode()
    _, _, headers = raw_post(served.port, "/invocations", body)
    assert headers["x-fewshot-test-views"] == "1"
    local = load("models:/served@champion", served.uri)
    as_trained = local.classify(images, labels, queries)
    local.method.with_test_views(3)
    three = local.classify(images, labels, queries)
    assert three[0]["probabilities"] != pytest.approx(as_trained[0]["probabilities"], abs=1e-5)

    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        server = fewshot(
            "serve", "served", "--port", str(port), "--test-views", "3", uri=served.uri,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        Client(f"http://127.0.0.1:{port}").wait_ready(timeout=120)
        status, answer, headers = raw_post(port, "/invocations", body)
        assert status == 200 and headers["x-fewshot-test-views"] == "3"
        for remote, here in zip(answer["predictions"], three, strict=True):
            assert remote["probabilities"] == pytest.approx(here["probabilities"], abs=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def raw_post(port: int, path: str, body: bytes) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers, lower-cased) of a POST to 127.0.0.1."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        headers = {k.lower(): v for k, v in answer.getheaders()}
        return answer.status, json.loads(answer.read()), headers
    finally:
        connection.close()
