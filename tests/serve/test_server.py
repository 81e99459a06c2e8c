"""`fewshot serve`: a real MLflow scoring server on 127.0.0.1, and the Python client."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fewshot.config import load_config
from fewshot.errors import RequestError, ServeError
from fewshot.registry.gate import promote
from fewshot.registry.versions import load
from fewshot.serve import Client
from fewshot.serve.client import _error_message, request_body
from fewshot.train.runner import train


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fewshot(*args: str, uri: str, **kwargs):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}  # shared cores
    return subprocess.Popen([sys.executable, "-m", "fewshot.cli", *args], env=env, **kwargs)


@dataclass(frozen=True)
class Served:
    client: Client
    uri: str  # tracking URI
    port: int
    store: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_store):
    """A tiny model trained with `registry.register`, promoted, and served by the CLI."""
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    train(
        load_config(
            None,
            [
                "name=served",
                f"data.path={synthetic_store}",
                "data.image_size=16",
                "backbone.width=8",
                "episode.q_query=3",
                "train.steps=2",
                "train.val_episodes=2",
                "train.threads=1",
                "evaluate.episodes=10",
                f"train.output_dir={root / 'runs'}",
                f"tracking.uri={uri}",
                "registry.register=true",
            ],
        )
    )
    promote("served", uri=uri)
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
        yield Served(client, uri, port, synthetic_store)
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


def post(port: int, body: bytes, content_type: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body,
        headers={"Content-Type": content_type},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


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
    status, kind, body = post(served.port, b'{"inputs": ', "application/json")
    assert status == 400 and kind == "application/json"
    assert json.loads(body)["error_code"] == "BAD_REQUEST"

    status, _, _ = post(served.port, b"support,query", "text/plain")
    assert status == 415  # MLflow answers this one in plain text

    missing = json.dumps({"inputs": {"support_images": [], "support_labels": []}}).encode()
    status, kind, body = post(served.port, missing, "application/json")
    assert status == 400 and "query_images" in json.loads(body)["message"]

    support, queries = task(served.store, n_way=2)
    body = request_body(support, queries)
    body["inputs"]["support_labels"] = ["only one label"]
    status, kind, answer = post(served.port, json.dumps(body).encode(), "application/json")
    assert status == 400 and kind == "application/json"
    assert json.loads(answer)["error_code"] == "INVALID_PARAMETER_VALUE"
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
