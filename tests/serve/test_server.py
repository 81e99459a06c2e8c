"""`fewshot serve`: a real MLflow scoring server on 127.0.0.1, and the Python client."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fewshot.config import load_config
from fewshot.errors import RequestError, ServeError
from fewshot.pipeline import train
from fewshot.ray_cluster import free_port
from fewshot.registry.gate import promote
from fewshot.registry.versions import load
from fewshot.serve import Client
from fewshot.serve.client import _error_message, request_body


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


def champion_of_tiny_run(name: str, root: Path, store: Path) -> tuple[str, str]:
    """A tiny model trained with `registry.register` in a tracking store under `root`, and
    promoted: (tracking URI, training run id)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = [
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
        f"tracking.uri={uri}",
        "registry.register=true",
    ]
    result = train(load_config(None, settings))
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


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def limit_answer(port: int, body: bytes, content_type: str | None = "application/json"):
    """(status, JSON answer) of a POST; http.client adds no Content-Type of its own."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", "/invocations", body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


@pytest.mark.cluster
def test_requests_past_a_limit_are_refused_and_the_server_stays_up(served):
    support, queries = task(served.store)
    before = [a["label"] for a in served.client.predict(support, queries)]
    good = request_body(support, queries)
    one_image = good["inputs"]["query_images"][0]

    def body(**inputs) -> bytes:
        return json.dumps({"inputs": {**good["inputs"], **inputs}}).encode()

    status, answer = limit_answer(served.port, body(), content_type=None)
    assert status == 415 and "send application/json" in answer["message"]
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = limit_answer(served.port, deep)
    assert status == 400 and answer["message"] == (
        "body: JSON nested too deep; send the documented form"
    )

    # 10,000 queries (3.5 MB) against the limit of 1,000 images: refused at once, unparsed by
    # MLflow, and the server does not grow.
    many = body(query_images=[one_image] * 10_000)
    assert len(many) > 3_000_000
    grown = rss_mb(served.server_pid)
    start = time.monotonic()
    status, answer = limit_answer(served.port, many)
    assert time.monotonic() - start < 1.0
    assert status == 413 and answer["limit"] == "max_images"
    assert answer["message"].startswith("10005 images in one request, over the limit of 1000")
    assert rss_mb(served.server_pid) - grown < 100

    # One long string among 200 short ones would be a 785 MB numpy array of padded strings.
    padded = body(query_images=["x" * 1_000_000] + [one_image] * 199)
    status, answer = limit_answer(served.port, padded)
    assert status == 413 and answer["limit"] == "max_array_bytes"

    status, answer = limit_answer(served.port, b"x" * (21 * 2**20))
    assert status == 413 and answer["limit"] == "max_body_bytes"

    labels = list(good["inputs"]["support_labels"])
    labels[0] = "L" * 100_000
    status, answer = limit_answer(served.port, body(support_labels=labels))
    assert status == 400 and answer["limit"] == "max_label_chars"
    assert len(json.dumps(answer)) < 1000  # the label is not echoed back

    huge = base64.b64encode(png_declaring(5000, 5000)).decode()
    status, answer = limit_answer(served.port, body(query_images=[huge]))
    assert status == 400 and "query_images[0]: not a readable image (5000x5000" in answer["message"]
    assert "max_pixels" in answer["message"]

    # MLflow's own 400 quotes the request: at most a few hundred characters of it come back.
    status, answer = limit_answer(served.port, body(support_labels=labels[1:] + ["z"] * 500))
    assert status == 400 and len(answer["message"]) < 500

    assert [a["label"] for a in served.client.predict(support, queries)] == before


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height grey pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
