"""`fewshot bench serve`: request latency and throughput of the two servers.

The models are the headline recipe (recipes/omniglot.yaml: ProtoNet, conv4 of
width 64 at 28 px, 5 test views) and the same with one test view, trained for a few steps
only (serving speed does not depend on how long it trained), registered and promoted in
a scratch tracking store.
The request is what a caller sends: within-alphabet 20-way 1-shot with 20 queries, the
original 105 px Omniglot PNGs, base64 in JSON.

Each cell sends `requests` requests from `concurrency` client threads (after a warm-up)
and reports the median and 99th percentile latency and the requests per second. The
client runs on the same machine as the servers and shares its cores.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from ray import serve

from fewshot.bench import machine, write_table
from fewshot.config import load_config
from fewshot.data.sources import omniglot
from fewshot.pipeline import train
from fewshot.ray_cluster import connect, free_port
from fewshot.recipes.omniglot import RECIPE
from fewshot.registry.gate import promote
from fewshot.runtime import Runtime, available_cpus
from fewshot.serve.client import Client, classify_body, request_body
from fewshot.serve.limits import Limits
from fewshot.serve.ray_app import Scale, application

CONCURRENCY = (1, 4, 16)


@dataclass(frozen=True)
class Cell:
    server: str
    request: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    per_s: float

    def row(self) -> list:
        return [
            self.server, self.request, self.concurrency,
            f"{self.p50_ms:.1f}", f"{self.p99_ms:.1f}", f"{self.per_s:.1f}",
        ]  # fmt: skip


def request_task(store: Path, n_way: int = 20) -> tuple[dict[str, list[bytes]], list[bytes]]:
    """20 characters of one alphabet of split small2: one support drawing each, and one
    other drawing each as a query."""
    table = pq.read_table(sorted((store / "split=small2").glob("*.parquet"))[0]).to_pylist()
    by_class: dict[str, list[bytes]] = {}
    for row in table:
        by_class.setdefault(row["class_name"], []).append(row["image"])
    chosen = list(by_class.items())[:n_way]
    return {name: images[:1] for name, images in chosen}, [images[1] for _, images in chosen]


# Models by registered name: the headline recipe, and the same with one test view (a
# fifth of the compute per image), which shows what is the server's and what the model's.
MODELS = {"bench-serve": [], "bench-serve-1view": ["method.test_views=1"]}


def prepared_store(workdir: Path, zips: list[Path]) -> Path:
    store = workdir / "omniglot"
    omniglot.prepare(zips, store)
    return store


def register_model(name: str, overrides: list[str], store: Path, workdir: Path, uri: str) -> None:
    """The recipe (with `overrides`), trained a few steps, registered and promoted."""
    settings = [
        f"name={name}", f"data.path={store}", f"train.output_dir={workdir / 'runs'}",
        "train.steps=20", "train.eval_every=20", "train.step_every=20", "evaluate.episodes=20",
        f"tracking.uri={uri}", f"registry.name={name}", *overrides,
    ]  # fmt: skip
    train(load_config(RECIPE, settings), restart=True)
    promote(name, uri=uri, force="serving benchmark")


def measure(send, requests: int, concurrency: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) of `requests` calls of `send` from `concurrency`
    threads."""
    for _ in range(3):
        send()

    def timed(_: int) -> float:
        start = time.perf_counter()
        send()
        return time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        seconds = sorted(pool.map(timed, range(requests)))
    wall = time.perf_counter() - started
    p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
    return 1000 * statistics.median(seconds), 1000 * p99, requests / wall


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()


def cells(server: str, url: str, bodies: dict[str, bytes], requests: int) -> list[Cell]:
    rows = []
    for kind, (path, body) in bodies.items():
        for c in CONCURRENCY:
            p50, p99, per_s = measure(lambda: post(url + path, body), requests, c)  # noqa: B023
            rows.append(Cell(server, kind, c, p50, p99, per_s))
            print(rows[-1].row(), file=sys.stderr, flush=True)
    return rows


def scoring_server_cells(name: str, uri: str, full: bytes, requests: int) -> list[Cell]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen(
        [sys.executable, "-m", "fewshot.cli", "serve", name, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        Client(url).wait_ready(timeout=180)
        return cells(
            f"MLflow scoring server ({name})", url, {"full": ("/invocations", full)}, requests
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def ray_serve_cells(
    name: str, uri: str, url: str, task: tuple[dict, list[bytes]], requests: int
) -> list[Cell]:
    """Ray Serve with 1 and 2 replicas, the machine's CPUs shared out among them."""
    support, queries = task
    full = json.dumps(request_body(support, queries)).encode()
    rows = []
    for replicas in (1, 2):
        cpus = max(1, available_cpus() // replicas)
        app = application(
            name, "1", uri=uri, scale=Scale(replicas), limits=Limits(), cpus_per_replica=cpus
        )
        serve.run(app, name=f"fewshot-{name}")
        support_id = Client(url).post_supports(support)["support_id"]
        cached = json.dumps(classify_body(support_id, queries)).encode()
        bodies = {"full": ("/invocations", full), "cached supports": ("/classify", cached)}
        label = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''} ({name})"
        rows += cells(label, url, bodies, requests)
        # Gone before the next deployment: a rolling update would wait for the CPUs that
        # this one's replicas hold.
        serve.delete(f"fewshot-{name}")
    return rows


def run(workdir: Path, out: Path, zips: list[Path], requests: int = 100) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    store = prepared_store(workdir, zips)
    task = request_task(store)
    full = json.dumps(request_body(*task)).encode()
    rows: list[Cell] = []
    for name, overrides in MODELS.items():
        register_model(name, overrides, store, workdir, uri)
        rows += scoring_server_cells(name, uri, full, requests)
    port = free_port()
    connect(None)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name in MODELS:
            rows += ray_serve_cells(name, uri, f"http://127.0.0.1:{port}", task, requests)
    finally:
        serve.shutdown()

    runtime = Runtime.for_inference()
    intro = (
        f"Measured on {machine()}; models compute as `auto` picks here ({runtime.execution}). "
        "The request: within-alphabet 20-way 1-shot, 20 queries, the original 105 px "
        f"Omniglot PNGs (base64 JSON, {len(full) / 1024:.0f} KB). The model: the headline "
        "recipe (ProtoNet, conv4 of width 64 at 28 px), with its 5 test views "
        "(`bench-serve`: 200 images through the backbone per full request) and with one "
        "(`bench-serve-1view`). 'cached supports' posts the support set once to /supports, "
        "then sends only the queries to /classify. "
        f"{requests} requests per cell after 3 warm-up requests, from client threads that "
        "share the machine's cores with the servers. The scoring server is one uvicorn "
        "worker with every CPU; one Ray Serve replica gets every CPU, two get half each."
    )
    header = ["server (model)", "request", "concurrency", "p50 ms", "p99 ms", "requests/s"]
    write_table(out, "Serving: latency and throughput", intro, header, [c.row() for c in rows])
