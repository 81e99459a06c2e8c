"""`fewshot serve --ray`: a real Ray Serve application on 127.0.0.1, two replicas, the
real MLflow registry; against it the scoring server's contract, cached support sets,
the limits, load, and a champion hot-swap under traffic. The model served first is an
ensemble of two tiny runs (the kind `make omniglot` promotes), the one swapped in a
single ProtoNet: cached support sets are tested for both."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from tests.serve.conftest import malformed, memory_mb, reset_peak, send
from tests.serve.test_server import fewshot, task, tiny_run, tracking_store

from fewshot.errors import RequestError
from fewshot.pipeline import ensemble
from fewshot.ray_cluster import free_port
from fewshot.registry import galleries
from fewshot.registry.gate import promote
from fewshot.registry.versions import load, register
from fewshot.serve import Client
from fewshot.serve.client import encoded, gallery_body, request_body
from fewshot.serve.limits import ROUTES, Limits

NAME = "rayserved"
LIMITS = Limits(max_images=1000, max_body_bytes=2 * 2**20)


@dataclass(frozen=True)
class RayServed:
    client: Client
    uri: str
    port: int
    store: Path
    run_id: str


def champion_ensemble(root: Path, store: Path) -> tuple[str, str]:
    """Two tiny ProtoNets (seeds 0 and 1) and their ensemble, registered as version 1 of
    NAME and promoted: (tracking URI, the first member's run id)."""
    members = [tiny_run(f"member{seed}", root, store, f"seed={seed}") for seed in (0, 1)]
    registry = ["registry.register=true", f"registry.name={NAME}"]
    ensemble([str(m.run_dir) for m in members], [f"name={NAME}", *registry])
    uri = tracking_store(root)
    promote(NAME, uri=uri)
    return uri, members[0].run_id


@pytest.fixture(scope="module")
def ray_served(tmp_path_factory, synthetic_store):
    """A two-member ensemble, registered and promoted, on Ray Serve with 2 replicas that
    follow the champion alias (checked every 0.5 s); `run_id` is its first member's run."""
    import ray
    from ray import serve

    from fewshot.ray_cluster import connect
    from fewshot.serve.ray_app import Scale, application

    uri, run_id = champion_ensemble(tmp_path_factory.mktemp("ray-serve"), synthetic_store)
    port = free_port()
    connect(None)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application(
            NAME, "1", uri=uri, scale=Scale(2), limits=LIMITS,
            follow_alias=True, poll_s=0.5, cpus_per_replica=0.5,
        )  # fmt: skip
        serve.run(app, name=f"fewshot-{NAME}")
        client = Client(f"http://127.0.0.1:{port}")
        client.wait_ready(timeout=60)
        yield RayServed(client, uri, port, synthetic_store, run_id)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def shelf(ray_served) -> dict[str, list[bytes]]:
    """Gallery `shelf` of NAME's champion, created after the replicas started: 5 classes
    of 1 image; returns the 6 classes of the task (the tests add the sixth)."""
    support, _ = task(ray_served.store, n_way=6)
    images, labels = flat({c: support[c] for c in list(support)[:5]})
    galleries.create("shelf", f"models:/{NAME}@champion", images, labels, ray_served.uri)
    return support


def from_gallery(name: str, model_uri: str, uri: str, queries: list[bytes]) -> list[dict]:
    """What the model answers locally with the gallery's latest version as the supports."""
    return load(model_uri, uri).classify(
        *galleries.support(galleries.get(name, uri=uri), uri), queries
    )


def post(port: int, path: str, body: bytes) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a raw POST."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def flat(support: dict[str, list[bytes]]) -> tuple[list[bytes], list[str]]:
    labels = [label for label, images in support.items() for _ in images]
    return [image for group in support.values() for image in group], labels


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    assert [a["label"] for a in got] == [a["label"] for a in expected]
    for a, b in zip(got, expected, strict=True):
        assert list(a["probabilities"]) == list(b["probabilities"])
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


@pytest.mark.cluster
def test_answers_equal_the_local_model_and_the_scoring_server(ray_served, tmp_path):
    support, queries = task(ray_served.store)
    images, labels = flat(support)
    answers = ray_served.client.predict(support, queries)
    assert ray_served.client.model_version == "1"
    local = load(f"models:/{NAME}@champion", ray_served.uri).classify(images, labels, queries)
    assert_same_answers(answers, local)

    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        server = fewshot(
            "serve", NAME, "--port", str(port), uri=ray_served.uri,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        scoring = Client(f"http://127.0.0.1:{port}")
        scoring.wait_ready(timeout=120)
        assert_same_answers(answers, scoring.predict(support, queries))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.cluster
def test_a_cached_support_set_answers_as_the_full_request(ray_served):
    """Of the ensemble: its members' prepared supports, each member scoring the queries."""
    support, queries = task(ray_served.store)
    assert load(f"models:/{NAME}/1", ray_served.uri).method.name == "ensemble"
    posted = ray_served.client.post_supports(support)
    assert posted["classes"] == list(support)
    assert ray_served.client.post_supports(support)["support_id"] == posted["support_id"]
    assert_same_answers(
        ray_served.client.classify(posted["support_id"], queries),
        ray_served.client.predict(support, queries),
    )
    status, answer, headers = post(
        ray_served.port,
        "/classify",
        json.dumps({"inputs": {"support_id": "s-unknown", "query_images": []}}).encode(),
    )
    assert status == 404 and "POST the support set to /supports again" in answer["message"]
    assert headers["x-fewshot-model-version"] == "1"


@pytest.mark.cluster
def test_a_class_added_through_one_replica_is_answered_by_the_other(ray_served, shelf):
    """Both replicas find a gallery created after they started; a class POSTed to one
    replica is answered by the other within seconds (it follows the store), and every
    answer equals the local model's with the gallery's images as the supports."""
    _, queries = task(ray_served.store, n_way=6)
    port, classes = ray_served.port, list(shelf)
    status, first, _ = post(
        port, "/galleries/shelf/classify", json.dumps(gallery_body(queries)).encode()
    )
    assert status == 200, first
    assert (first["gallery"], first["gallery_version"], first["model_version"]) == (
        "shelf", 1, "1"
    )  # fmt: skip
    expected = from_gallery("shelf", f"models:/{NAME}/1", ray_served.uri, queries)
    assert_same_answers(first["predictions"], expected)

    body = {"inputs": {"label": classes[5], "images": [encoded(shelf[classes[5]][0])]}}
    status, added, headers = post(port, "/galleries/shelf/classes", json.dumps(body).encode())
    assert status == 200 and added["gallery_version"] == 2 and added["classes"] == 6, added
    adder = headers["x-fewshot-replica"]
    written, seen = time.monotonic(), {}
    while len(seen) < 2:  # until the other replica has answered with the new class
        assert time.monotonic() - written < 15, f"only {seen} answered version 2"
        status, answer, headers = post(
            port, "/galleries/shelf/classify", json.dumps(gallery_body(queries)).encode()
        )
        assert status == 200, answer
        if answer["gallery_version"] == 2:
            seen[headers["x-fewshot-replica"]] = answer
    print(f"both replicas answered version 2 {time.monotonic() - written:.1f} s after the add")
    assert adder in seen
    expected = from_gallery("shelf", f"models:/{NAME}/1", ray_served.uri, queries)
    for answer in seen.values():
        assert list(answer["predictions"][0]["probabilities"]) == classes
        assert_same_answers(answer["predictions"], expected)


@pytest.mark.cluster
def test_every_route_answers_every_malformed_request_with_its_4xx(ray_served, shelf):
    """The scoring server's malformed requests (tests/serve/conftest.py) to each route
    that reads what they spoil: the same 4xx, never a 500, and serving goes on."""
    support, queries = task(ray_served.store, n_way=2)
    good = request_body(support, queries)
    inputs = {
        **good["inputs"],
        "support_id": ray_served.client.post_supports(support)["support_id"],
    }
    path = {r: r.replace("/galleries/", "/galleries/shelf/") for r in ROUTES}
    for case, bad in malformed(inputs).items():
        for route, reads in ROUTES.items():
            if bad.spoils is not None and bad.spoils not in reads:
                continue
            status, answer = send(ray_served.port, path[route], bad.body, bad.content_type)
            assert status == bad.status, (case, route, answer)
            assert answer["error_code"] in ("BAD_REQUEST", "REQUEST_LIMIT_EXCEEDED"), case
            assert len(answer["message"]) < 500, (case, route)
    # /supports checks the label count before it names the set (it was a 500).
    status, answer = send(ray_served.port, "/supports", malformed(inputs)["one label too few"].body)
    assert (status, answer["message"]) == (
        400,
        "support_labels: 1 labels for 2 support_images; give one label per support image",
    )
    assert len(ray_served.client.invoke(good)) == len(queries)  # still serving
    assert galleries.get("shelf", uri=ray_served.uri).version == 2  # no change was written


def serve_processes() -> list[psutil.Process]:
    """The HTTP proxy and the replicas of the Ray that this test process started (its
    children: never another Ray on the machine)."""
    names = ("ray::ProxyActor", f"ray::ServeReplica:fewshot-{NAME}:Replica")
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.cmdline() and p.cmdline()[0].startswith(names)
    ]


def send_large(port: int, size: int, chunked: bool) -> int:
    """Status of a POST /invocations of `size` bytes, declared (Content-Length) or chunked,
    sent whole whatever the server answers meanwhile (as urllib does), at most 1 MB per 5 ms:
    what Ray Serve buffers before its answer then depends little on how busy the machine is,
    while a server that waits for the whole body still holds all of it."""
    piece = b"x" * 2**20
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n%s\r\n\r\n" % framing
        )
        try:
            for _ in range(size // len(piece)):
                connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                time.sleep(0.005)
            if chunked:
                connection.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: fine, the answer is what counts
        return int(connection.makefile("rb").readline().split()[1])


@pytest.mark.cluster
def test_a_large_body_is_refused_unread_and_memory_does_not_grow_with_it(ray_served):
    """200 MB, declared or chunked, against the 2 MB limit: a 413, and no Serve process
    (the proxy, the replicas) grows by more than a fraction of it at its peak (VmHWM).
    What growth there is comes from Ray Serve itself: its proxy (`proxy_asgi_receive`)
    and its replica (`ASGIReceiveProxy.fetch_until_disconnect`) read a request's body
    ahead of the app, into unbounded queues, until the app answers."""
    processes = serve_processes()
    assert len(processes) == 3  # the proxy and 2 replicas
    for chunked in (False, True):  # first allocations of a large request, not measured
        assert send_large(ray_served.port, 20 * 2**20, chunked) == 413
    for chunked in (False, True):
        before = {p.pid: memory_mb(p.pid) for p in processes}
        for p in processes:
            reset_peak(p.pid)
        assert send_large(ray_served.port, 200 * 2**20, chunked) == 413
        grown = {p.pid: memory_mb(p.pid, "VmHWM") - before[p.pid] for p in processes}
        print(f"200 MB, chunked={chunked}: peak growth by process (MB): {grown}")
        assert max(grown.values()) < 64, grown


@pytest.mark.cluster
def test_two_replicas_answer_400_requests_from_8_threads(ray_served):
    support, queries = task(ray_served.store)
    body = request_body(support, queries)
    expected = ray_served.client.invoke(body)

    def one(_: int) -> list[dict]:
        return Client(ray_served.client.url).invoke(body)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(400)))
    assert len(results) == 400
    for answers in results:
        assert_same_answers(answers, expected)


@pytest.mark.cluster
def test_a_promoted_champion_is_swapped_in_without_a_failed_request(ray_served, shelf):
    """Under traffic to /invocations and to a gallery; the gallery is embedded by the new
    version before it answers, so its answers name the new version at once."""
    support, queries = task(ray_served.store)
    body = request_body(support, queries)
    cached = ray_served.client.post_supports(support)["support_id"]
    versions: list[str] = []
    by_gallery: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        client = Client(ray_served.client.url)
        deadline = time.monotonic() + 120  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                client.invoke(body)
                versions.append(client.model_version)
                answer = client.classify_gallery("shelf", queries)
                assert answer["gallery_version"] == 2 and len(answer["predictions"]) == 5
                by_gallery.append(answer["model_version"])
            except Exception as exc:  # noqa: BLE001 (any failure counts)
                failures.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        version = register(ray_served.run_id, NAME, uri=ray_served.uri).version
        promote(NAME, str(version), force="hot-swap test", uri=ray_served.uri)
        deadline = time.monotonic() + 90
        while versions[-20:] != ["2"] * 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        swapped = len(versions)
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(
        f"hot-swap: {len(versions)} answers, {versions.count('1')} by version 1, "
        f"{versions.count('2')} by version 2, {len(failures)} failed, swap seen at {swapped}; "
        f"{len(by_gallery)} gallery answers, {by_gallery.count('2')} by version 2"
    )
    assert failures == []
    assert versions[0] == "1" and set(versions) == {"1", "2"}
    assert set(versions[swapped:]) == {"2"} and len(versions) - swapped >= 10
    assert by_gallery[0] == "1" and by_gallery[-10:] == ["2"] * 10
    assert_same_answers(
        ray_served.client.classify_gallery("shelf", queries)["predictions"],
        from_gallery("shelf", f"models:/{NAME}/2", ray_served.uri, queries),
    )
    # A support set cached under version 1 (the ensemble) is prepared again by version 2
    # (a ProtoNet), and answers as a full request to it.
    assert_same_answers(
        ray_served.client.classify(cached, queries), ray_served.client.predict(support, queries)
    )
    assert ray_served.client.model_version == "2"
    assert load(f"models:/{NAME}/2", ray_served.uri).method.name == "protonet"
    with pytest.raises(RequestError, match="unknown, expired or evicted"):
        ray_served.client.classify("s-never-posted", queries)


@pytest.mark.cluster
def test_the_cli_serves_on_ray_and_stops_what_it_started(ray_served, tmp_path):
    """`fewshot serve NAME --ray` in its own process and its own Ray: it answers, and
    SIGTERM stops it and the Ray it started."""
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        server = fewshot(
            "serve", NAME, "--ray", "--port", str(port), uri=ray_served.uri,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        client = Client(f"http://127.0.0.1:{port}")
        client.wait_ready(timeout=180)
        support, queries = task(ray_served.store)
        assert len(client.predict(support, queries)) == len(queries)
        assert client.model_version == "2"  # the champion after the hot-swap test
        # A new server (its own process and Ray) loaded the gallery at start: it answers
        # as the server that saw it change, as `fewshot predict --gallery` and as a full
        # request with the gallery's images.
        fresh = client.classify_gallery("shelf", queries)
        running = ray_served.client.classify_gallery("shelf", queries)
        assert (fresh["gallery_version"], fresh["model_version"]) == (2, "2")
        assert_same_answers(fresh["predictions"], running["predictions"])
        folder = tmp_path / "queries"
        folder.mkdir()
        for i, query in enumerate(queries):
            (folder / f"q{i}.png").write_bytes(query)
        predicted = subprocess.run(
            [sys.executable, "-m", "fewshot.cli", "predict", "--model",
             f"models:/{NAME}@champion", "--gallery", "shelf", "--query", str(folder)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": ray_served.uri},
        )  # fmt: skip
        assert_same_answers(
            fresh["predictions"], [json.loads(line) for line in predicted.stdout.splitlines()]
        )
        images, labels = galleries.support(
            galleries.get("shelf", uri=ray_served.uri), ray_served.uri
        )
        full = client.invoke({"inputs": {
            "support_images": [encoded(i) for i in images], "support_labels": labels,
            "query_images": [encoded(q) for q in queries],
        }})  # fmt: skip
        assert_same_answers(fresh["predictions"], full)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    session = subprocess.run(["pgrep", "-s", str(server.pid)], capture_output=True, text=True)
    assert session.stdout.split() == []  # nothing of its session is left


def test_a_bad_autoscale_range_is_refused_in_one_line():
    refused = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "serve", NAME, "--ray", "--autoscale", "3,1"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert refused.stderr == (
        "error: --autoscale '3,1': give MIN,MAX replicas with 1 <= MIN <= MAX, e.g. 1,4\n"
    )
