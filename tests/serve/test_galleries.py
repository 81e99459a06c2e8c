"""Galleries served (serve/galleries.py): a real `fewshot serve` scoring server answers
queries against a gallery kept in the tracking store, takes a class online, follows a
change made elsewhere within seconds, refuses bad changes without writing, and after a
restart answers the same; a `Book` embeds a new version from the one before it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests.registry.test_pyfunc import in_memory
from tests.serve.conftest import send
from tests.serve.test_server import champion_of_tiny_run, fewshot, task

from fewshot.ray_cluster import free_port
from fewshot.registry import galleries
from fewshot.registry.pyfunc import answers
from fewshot.registry.versions import load
from fewshot.serve import Client
from fewshot.serve.galleries import embed, route

NAME = "gallery-served"


def encoded(images: list[bytes]) -> list[str]:
    return [base64.b64encode(i).decode() for i in images]


def flat(support: dict[str, list[bytes]]) -> tuple[list[bytes], list[str]]:
    return [i for g in support.values() for i in g], [c for c, g in support.items() for _ in g]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [a["label"] for a in got] == [a["label"] for a in expected]
    for a, b in zip(got, expected, strict=True):
        assert list(a["probabilities"]) == list(b["probabilities"])
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


@dataclass
class Server:
    """`fewshot serve NAME` in its own session, started and stopped by the tests."""

    root: Path
    uri: str
    process: subprocess.Popen | None = None
    client: Client | None = None

    def start(self) -> Client:
        port = free_port()
        with open(self.root / f"server-{port}.log", "wb") as log:
            self.process = fewshot(
                "serve", NAME, "--port", str(port), uri=self.uri,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.client = Client(f"http://127.0.0.1:{port}")
        self.client.wait_ready(timeout=120)
        return self.client

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def classify(self, gallery: str, queries: list[bytes]) -> dict:
        return self.client.classify_gallery(gallery, queries)


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_store):
    """A tiny promoted model with gallery `shop` of 5 classes (one image each), served by
    the scoring server; `task` is 7 classes: the last two are added by the tests."""
    root = tmp_path_factory.mktemp("gallery-serve")
    uri, _ = champion_of_tiny_run(NAME, root, synthetic_store)
    support, queries = task(synthetic_store, n_way=7)
    images, labels = flat({c: support[c] for c in list(support)[:5]})
    galleries.create("shop", f"models:/{NAME}@champion", images, labels, uri)
    server = Server(root, uri)
    server.start()
    yield server, support, queries
    server.stop()


@pytest.mark.cluster
def test_the_scoring_server_answers_from_a_gallery_and_follows_its_changes(served):
    server, support, queries = served
    model = load(f"models:/{NAME}/1", server.uri)
    classes = list(support)

    def local(count: int) -> list[dict]:
        return model.classify(*flat({c: support[c] for c in classes[:count]}), queries)

    first = server.classify("shop", queries)
    assert (first["gallery"], first["gallery_version"], first["model_version"]) == ("shop", 1, "1")
    assert_same(first["predictions"], local(5))

    added = server.client.add_class("shop", classes[5], support[classes[5]])
    assert added["gallery_version"] == 2 and added["classes"] == 6
    assert added["change"] == f"added 1 image(s) as new class {classes[5]!r}"
    second = server.classify("shop", queries)
    assert second["gallery_version"] == 2
    assert_same(second["predictions"], local(6))

    # A change made elsewhere (the CLI, another server) reaches the server by itself.
    galleries.add("shop", classes[6], support[classes[6]], server.uri)
    start = time.monotonic()
    while (answer := server.classify("shop", queries))["gallery_version"] != 3:
        assert time.monotonic() - start < 15, "the server did not follow version 3"
        time.sleep(0.2)
    print(f"the server answered version 3 {time.monotonic() - start:.1f} s after it was written")
    assert_same(answer["predictions"], local(7))


@pytest.mark.cluster
def test_a_refused_gallery_request_is_a_4xx_and_writes_no_version(served):
    server, support, queries = served
    port = int(server.client.url.rpartition(":")[2])
    before = galleries.get("shop", uri=server.uri).version

    def post(path: str, inputs: dict) -> tuple[int, dict]:
        return send(port, path, json.dumps({"inputs": inputs}).encode())

    image = encoded(support[next(iter(support))])
    cases = {
        "unknown gallery": ("/galleries/nowhere/classify", {"query_images": image}, 404),
        "no queries": ("/galleries/shop/classify", {"query_images": []}, 400),
        "a query not an image": (
            "/galleries/shop/classify", {"query_images": encoded([b"not an image"])}, 400
        ),
        "a class with no images": ("/galleries/shop/classes", {"label": "x", "images": []}, 400),
        "an image that does not decode": (
            "/galleries/shop/classes", {"label": "x", "images": encoded([b"nope"])}, 400
        ),
        "no label": ("/galleries/shop/classes", {"images": image}, 400),
        "a label of 10,000 characters": (
            "/galleries/shop/classes", {"label": "L" * 10_000, "images": image}, 400
        ),
        "a class added to no gallery": (
            "/galleries/nowhere/classes", {"label": "x", "images": image}, 404
        ),
    }  # fmt: skip
    for case, (path, inputs, status) in cases.items():
        got, answer = post(path, inputs)
        assert got == status, (case, answer)
        assert "\n" not in answer["message"] and len(answer["message"]) < 400, (case, answer)
    assert galleries.get("shop", uri=server.uri).version == before


@pytest.mark.cluster
def test_after_a_restart_the_server_answers_the_same_as_a_full_request(served):
    server, support, queries = served
    version = galleries.get("shop", uri=server.uri)
    before = server.classify("shop", queries)
    server.stop()
    server.start()  # a new process: nothing in memory, the gallery read from the store
    after = server.classify("shop", queries)
    assert after["gallery_version"] == before["gallery_version"] == version.version
    assert_same(after["predictions"], before["predictions"])
    full = server.client.predict(
        {
            c: [e.image for e in galleries.entries(version, server.uri) if e.label == c]
            for c in support
        },
        queries,
    )
    assert_same(after["predictions"], full)


def test_a_new_version_is_embedded_from_the_one_before(synthetic_store):
    """Only the images a version adds go through the backbone: the others' features are
    the earlier version's, and the result equals embedding the new version afresh."""
    model = in_memory()
    support, queries = task(synthetic_store, n_way=4)
    rows = [galleries.entry(c, i) for c, images in support.items() for i in images]
    v1 = galleries.Version("g", 1, "m", "created", 3, 3, "run1", 0)
    v2 = galleries.Version("g", 2, "m", "added", 4, 4, "run2", 0)
    first = embed(model, v1, rows[:3], None)
    second = embed(model, v2, rows, first)
    fresh = embed(model, v2, rows, None)
    assert all(second.rows[e.sha256] is first.rows[e.sha256] for e in rows[:3])
    assert second.classes == fresh.classes == list(support)
    x = model.queries(queries)
    assert torch.allclose(second.logits(model, x), fresh.logits(model, x), atol=1e-5)
    expected = model.classify(*flat(support), queries)
    assert_same(answers(second.classes, second.logits(model, x)), expected)


def test_gallery_routes_are_parsed_and_others_are_not():
    assert route("/galleries/shop/classify") == ("shop", "/galleries/classify")
    assert route("/galleries/my%20shop/classes/") == ("my shop", "/galleries/classes")
    for other in ("/galleries/shop", "/galleries//classify", "/galleries/shop/delete", "/x/y/z"):
        assert route(other) is None
