"""`fewshot bench serve`: latency and throughput of the two servers against the bare
model's, and where one request's time goes.

The model is the one `make omniglot` promotes (recipes/omniglot.py): an ensemble of two
ProtoNets (conv4 of width 64 at 28 px, 5 test views each), its members trained for a few
steps only (serving speed does not depend on how long they trained), combined, registered
and promoted in a scratch tracking store. The request is what a caller sends:
within-alphabet 20-way 1-shot with 20 queries, the original 105 px Omniglot PNGs, base64
in JSON. A gallery of the task's 20 support images answers the same queries alone.

The file holds two tables:
1. Latency and throughput. Each server cell sends `requests` requests from `concurrency`
   client threads (after a warm-up) and reports the median and 99th percentile latency,
   requests and images per second. The client shares the machine's cores with the
   servers. The bare-model rows are the floor: the task's images as tensors, already
   decoded, straight into the loaded model in this process (`FewShotModel.predict_task`),
   and four tasks in one pass, as a server that batches 4 clients' requests at best
   computes them.
2. The stages of one full request, each timed in this process with the same loaded model
   (`staged_request`), and each server's empty route (GET /ping) timed from the client:
   what a server adds beyond the model.
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
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from ray import serve
from rich.console import Console

from fewshot.bench import machine, table
from fewshot.methods.base import split_rows
from fewshot.ray_cluster import connect, free_port
from fewshot.recipes import omniglot as recipe
from fewshot.registry import galleries
from fewshot.registry.pyfunc import FewShotModel, SupportSet, answers, decode_base64
from fewshot.registry.versions import load
from fewshot.runtime import available_cpus, using_threads
from fewshot.serve.client import Client, classify_body, gallery_body, request_body
from fewshot.serve.limits import Limits
from fewshot.serve.ray_app import Scale, application
from fewshot.serve.server import resolve

CONCURRENCY = (1, 4, 16)
WARM_UP = 3  # untimed requests before each cell's
MODEL = "omniglot"  # the name recipes/omniglot.yaml registers the ensemble under
GALLERY = "bench-serve"
# The recipe's training, cut to a few steps (its `--set` overrides, which come last); its
# budget in minutes is far more than they take.
TRAINING = ["train.steps=20", "train.eval_every=20", "train.step_every=20", "evaluate.episodes=20"]
MINUTES = 10
BARE_TASKS = 4  # tasks in one pass of the bare model: what 4 clients' requests batch into
PARSE, BASE64, DECODE = "parse the JSON body", "decode base64", "decode and preprocess images"
SCORE, SERIALISE = "prepare and score", "serialise the answer (JSON)"
SUMMED = "all stages, summed per request"
BARE = "bare model (tensors, in-process)"
WHOLE = "the whole request in-process, as the scoring server's model answers it (pyfunc predict)"

Task = tuple[dict[str, list[bytes]], list[bytes]]  # ({label: support images}, queries)


@dataclass(frozen=True)
class Cell:
    server: str
    request: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    per_s: float  # requests per second
    images: int  # images a request carries

    def row(self) -> list:
        return [
            self.server, self.request, self.concurrency, f"{self.p50_ms:.1f}",
            f"{self.p99_ms:.1f}", f"{self.per_s:.1f}", f"{self.per_s * self.images:.0f}",
        ]  # fmt: skip


def request_task(store: Path, n_way: int = 20) -> Task:
    """20 characters of one alphabet of split small2: one support drawing each, and one
    other drawing each as a query."""
    rows = pq.read_table(sorted((store / "split=small2").glob("*.parquet"))[0]).to_pylist()
    by_class: dict[str, list[bytes]] = {}
    for row in rows:
        by_class.setdefault(row["class_name"], []).append(row["image"])
    chosen = list(by_class.items())[:n_way]
    return {name: images[:1] for name, images in chosen}, [images[1] for _, images in chosen]


def make_omniglot(data: Path, workdir: Path, uri: str) -> Path:
    """What `make omniglot` does (`fewshot omniglot`: store, members, ensemble, registered
    and promoted to models:/MODEL@champion), with `TRAINING` steps, into `workdir` and the
    tracking store at `uri`; done already, nothing. Returns the prepared store."""
    store = workdir / "omniglot"
    settings = [f"data.path={store}", f"train.output_dir={workdir / 'runs'}", f"tracking.uri={uri}"]
    err = Console(stderr=True)
    recipe.run(data, MINUTES, [*settings, *TRAINING], lambda line: err.print(line, highlight=False))
    return store


def create_gallery(task: Task, uri: str) -> None:
    """Gallery GALLERY for models:/MODEL@champion: the task's support images as its classes
    (kept if a previous run made it)."""
    if GALLERY in {v.gallery for v in galleries.galleries(uri)}:
        return
    galleries.create(GALLERY, f"models:/{MODEL}@champion", *flattened(task[0]), uri=uri)


def flattened(support: dict[str, list[bytes]]) -> tuple[list[bytes], list[str]]:
    """{label: images} -> (the images, one label per image)."""
    images = [image for group in support.values() for image in group]
    return images, [label for label, group in support.items() for _ in group]


def measure(
    send: Callable[[], object], requests: int, concurrency: int
) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) of `requests` calls of `send` from `concurrency`
    threads, after WARM_UP calls. One client calls from this thread, so a model computing
    in this process computes with its torch threads."""
    for _ in range(WARM_UP):
        send()

    def timed(_: int) -> float:
        start = time.perf_counter()
        send()
        return time.perf_counter() - start

    started = time.perf_counter()
    if concurrency == 1:
        seconds = [timed(i) for i in range(requests)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            seconds = list(pool.map(timed, range(requests)))
    wall = time.perf_counter() - started
    return (*percentiles(seconds), requests / wall)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50 ms, p99 ms)."""
    ordered = sorted(seconds)
    return 1000 * statistics.median(ordered), 1000 * ordered[int(0.99 * (len(ordered) - 1))]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()


def ping(url: str) -> None:
    with urllib.request.urlopen(f"{url}/ping", timeout=60) as answer:
        answer.read()


# A server's requests by name: (route, body, images it carries).
Bodies = dict[str, tuple[str, bytes, int]]


def cells(server: str, url: str, bodies: Bodies, requests: int) -> list[Cell]:
    rows = []
    for kind, (path, body, images) in bodies.items():
        for c in CONCURRENCY:
            p50, p99, per_s = measure(lambda: post(url + path, body), requests, c)  # noqa: B023
            rows.append(Cell(server, kind, c, p50, p99, per_s, images))
            print(rows[-1].row(), file=sys.stderr, flush=True)
    return rows


def empty_route(server: str, url: str, requests: int) -> list:
    """[server, p50 ms, p99 ms] of `server`'s GET /ping, from one client."""
    p50, p99, _ = measure(lambda: ping(url), requests, 1)
    return [server, p50, p99]


def scoring_server_cells(
    bodies: Bodies, uri: str, requests: int, test_views: int | None = None
) -> tuple[list[Cell], list]:
    """The scoring server's cells (computing `test_views` views, when given), and its
    empty route (`empty_route`)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    views = ["--test-views", str(test_views)] if test_views else []
    server = subprocess.Popen(
        [sys.executable, "-m", "fewshot.cli", "serve", MODEL, "--port", str(port), *views],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        Client(url).wait_ready(timeout=180)
        label = "MLflow scoring server" + (f", --test-views {test_views}" if views else "")
        return cells(label, url, bodies, requests), empty_route(label, url, requests)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def ray_serve_cells(
    bodies: Bodies, task: Task, uri: str, url: str, requests: int
) -> tuple[list[Cell], list]:
    """Ray Serve's cells with 1 and 2 replicas, the machine's CPUs shared out among them,
    and the empty route (`empty_route`) of 1 replica."""
    support, queries = task
    rows, ping_row = [], []
    for replicas in (1, 2):
        cpus = max(1, available_cpus() // replicas)
        app = application(
            MODEL,
            resolve(MODEL, uri=uri),
            uri=uri,
            scale=Scale(replicas),
            limits=Limits(),
            cpus_per_replica=cpus,
        )
        serve.run(app, name=f"fewshot-{MODEL}")
        support_id = Client(url).post_supports(support)["support_id"]
        cached = json.dumps(classify_body(support_id, queries)).encode()
        label = f"Ray Serve, {plural(replicas, 'replica')}"
        queries_only = ("/classify", cached, len(queries))
        rows += cells(label, url, {**bodies, "cached supports": queries_only}, requests)
        if replicas == 1:
            ping_row = empty_route(label, url, requests)
        # Gone before the next deployment: a rolling update would wait for the CPUs that
        # this one's replicas hold.
        serve.delete(f"fewshot-{MODEL}")
    return rows, ping_row


def scored(model: FewShotModel, support_z, support_y: torch.Tensor, query_z) -> torch.Tensor:
    """A task's features -> its logits [M, N]: the support set prepared, the queries
    scored against it, as the model's runtime computes."""
    method, runtime = model.method, model.runtime
    prepared = runtime.computed(method.prepare, support_z, support_y)
    return runtime.computed(method.score, prepared, query_z)


def bare_cells(
    model: FewShotModel, support: SupportSet, queries: torch.Tensor, requests: int, note: str = ""
) -> list[Cell]:
    """The task's tensors straight into the model in this process: one task at a time
    with 1 thread and with the process's CPUs, and BARE_TASKS copies of it in one pass
    (their images' features together, then each task's prepare and score: how Ray Serve
    batches concurrent requests) with the process's CPUs."""
    images, cpus = len(support.x) + len(queries), available_cpus()
    sizes = [len(support.x), len(queries)] * BARE_TASKS

    def tasks_in_one_pass() -> None:
        x = torch.cat([support.x, queries] * BARE_TASKS)
        z = model.runtime.computed(model.method.features, x)
        parts = split_rows(z, sizes)
        for support_z, query_z in zip(parts[::2], parts[1::2], strict=True):
            scored(model, support_z, support.y, query_z)

    rows = []
    for threads in sorted({1, cpus}):
        with using_threads(threads):
            p50, p99, per_s = measure(lambda: model.predict_task(support, queries), requests, 1)
        label = f"{BARE}, {plural(threads, 'thread')}{note}"
        rows.append(Cell(label, "full", 1, p50, p99, per_s, images))
    with using_threads(cpus):
        p50, p99, passes_per_s = measure(tasks_in_one_pass, requests, 1)
    request = f"full, {BARE_TASKS} tasks in one pass"
    per_s = passes_per_s * BARE_TASKS
    label = f"{BARE}, {plural(cpus, 'thread')}{note}"
    rows.append(Cell(label, request, BARE_TASKS, p50, p99, per_s, images))
    for row in rows:
        print(row.row(), file=sys.stderr, flush=True)
    return rows


class Stages:
    """Seconds of each stage, one entry a request, in the order the stages first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def timed(self, stage: str, function: Callable, *args):
        start = time.perf_counter()
        result = function(*args)
        self.seconds[stage].append(time.perf_counter() - start)
        return result

    def totals(self) -> list[float]:
        """Each request's stages summed."""
        return [sum(each) for each in zip(*self.seconds.values(), strict=True)]


def staged_request(model: FewShotModel, body: bytes, stages: Stages) -> bytes:
    """A full request's body -> the answer's body, as Ray Serve's replica computes it
    (features of supports and queries in one pass, then prepare and score), each stage
    timed into `stages`, the ensemble's features member by member."""
    inputs = stages.timed(PARSE, json.loads, body)["inputs"]
    support_blobs, query_blobs = stages.timed(
        BASE64,
        lambda: [decode_base64(inputs[name], name) for name in ("support_images", "query_images")],
    )

    def decoded() -> tuple[SupportSet, torch.Tensor, torch.Tensor]:
        support = model.support_set(support_blobs, inputs["support_labels"])
        queries = model.queries(query_blobs)
        return support, queries, torch.cat([support.x, queries])

    support, queries, x = stages.timed(DECODE, decoded)
    members = model.method.members
    z = tuple(
        stages.timed(
            f"features, member {k + 1} of {len(members)} ({member.name})",
            model.runtime.computed,
            member.features,
            x,
        )
        for k, member in enumerate(members)
    )
    support_z, query_z = split_rows(z, [len(support.x), len(queries)])
    logits = stages.timed(SCORE, scored, model, support_z, support.y, query_z)
    return stages.timed(
        SERIALISE, lambda: json.dumps({"predictions": answers(support.classes, logits)}).encode()
    )


def whole_request(model: FewShotModel, body: bytes) -> bytes:
    """A full request's body -> the answer's body, as the scoring server computes it: the
    inputs as numpy string arrays into the pyfunc's `predict` (whole task)."""
    inputs = json.loads(body)["inputs"]
    predictions = model.predict(None, {name: np.array(v) for name, v in inputs.items()})
    return json.dumps({"predictions": predictions}).encode()


def profile_rows(model: FewShotModel, body: bytes, requests: int) -> list[list]:
    """[stage, p50 ms, p99 ms] of each stage of `requests` staged requests (after
    WARM_UP), of their sum, and of the whole request as the scoring server's model answers
    it, all with the process's CPUs."""
    with using_threads(available_cpus()):
        for _ in range(WARM_UP):
            staged_request(model, body, Stages())
        stages = Stages()
        for _ in range(requests):
            staged_request(model, body, stages)
        whole = measure(lambda: whole_request(model, body), requests, 1)
    rows = [[stage, *percentiles(seconds)] for stage, seconds in stages.seconds.items()]
    rows.append([SUMMED, *percentiles(stages.totals())])
    return [*rows, [WHOLE, *whole[:2]]]


def served_rows(rows: list[Cell], pings: list[list]) -> list[list]:
    """The profile's rows of the servers: each one's empty route ([server, p50 ms, p99
    ms], `empty_route`), and its full request from 1 client (table 1)."""
    servers = {server for server, *_ in pings}
    full = [
        [f"{c.server}: full request, 1 client (table 1)", c.p50_ms, c.p99_ms]
        for c in rows
        if c.server in servers and c.request == "full" and c.concurrency == 1
    ]
    return [[f"{server}: GET /ping (the HTTP path, no model)", *ms] for server, *ms in pings] + full


def run(workdir: Path, out: Path, data: Path, requests: int = 100) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    store = make_omniglot(data, workdir, uri)
    task = request_task(store)
    create_gallery(task, uri)
    support, queries = task
    full = json.dumps(request_body(support, queries)).encode()

    # In this process first, while no server computes beside it, computing as a server's
    # process does (`Runtime.apply`): without freed memory kept, a request here took 85
    # instead of 46 ms (AMD EPYC Zen 4, 2 threads).
    model = load(f"models:/{MODEL}@champion", uri)
    model.runtime.apply()
    support_set = model.support_set(*flattened(support))
    images = len(support_set.x) + len(queries)
    rows = bare_cells(model, support_set, model.queries(queries), requests)
    profile = profile_rows(model, full, requests)

    bodies = {
        "full": ("/invocations", full, images),
        f"gallery of {len(support)} classes": (
            f"/galleries/{GALLERY}/classify",
            json.dumps(gallery_body(queries)).encode(),
            len(queries),
        ),
    }
    served, scoring_ping = scoring_server_cells(bodies, uri, requests)
    views = model.method.test_views
    # The cheaper serving of the same model: one view of each image (`--test-views 1`).
    model.method.with_test_views(1)
    one_view = bare_cells(model, support_set, model.queries(queries), requests, ", 1 test view")
    one_view += scoring_server_cells(bodies, uri, requests, test_views=1)[0]
    port = free_port()
    connect(None)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        url = f"http://127.0.0.1:{port}"
        ray_served, ray_ping = ray_serve_cells(bodies, task, uri, url, requests)
    finally:
        serve.shutdown()
    rows += served + ray_served + one_view
    profile += served_rows(rows, [scoring_ping, ray_ping])
    write(out, model, views, rows, profile, len(full), requests)


def write(
    out: Path,
    model: FewShotModel,
    views: int,
    rows: list[Cell],
    profile: list[list],
    size: int,
    requests: int,
) -> None:
    members = model.method.members
    intro = (
        f"Measured on {machine()}; the model computes as `auto` picks here "
        f"({model.runtime.execution}). The model: what `make omniglot` promotes, an ensemble "
        f"of {len(members)} ProtoNets (conv4 of width 64 at 28 px, {views} test views each: "
        f"{len(members) * views} backbone passes per image), each trained a few steps only. "
        "The request: within-alphabet 20-way 1-shot, 20 queries, the original 105 px "
        f"Omniglot PNGs (base64 JSON, {size / 1024:.0f} KB); 'cached supports' posts the "
        "support set once to /supports, then sends only the queries to /classify; "
        f"'gallery' sends only the queries to /galleries/{GALLERY}/classify, a gallery of "
        "the task's support images. images/s counts the images requests carry (40 for a "
        "full request, 20 for queries only). The bare model is the floor: the task's images "
        "as decoded tensors straight into the loaded model in this process "
        f"(`FewShotModel.predict_task`), and {BARE_TASKS} tasks in one pass (their images' "
        "features together, as Ray Serve batches concurrent requests), the reference for "
        f"the servers' throughput at concurrency 4. {requests} requests per cell after "
        f"{WARM_UP} warm-up requests, from client threads that share the machine's cores "
        "with the servers. The scoring server is one uvicorn worker with every CPU; one Ray "
        "Serve replica gets every CPU, two get half each. The last rows serve the same "
        "model computing 1 test view instead (`fewshot serve --test-views 1`)."
    )
    header = ["server", "request", "concurrency", "p50 ms", "p99 ms", "requests/s", "images/s"]
    total = next(ms for stage, ms, _ in profile if stage == SUMMED)
    profile_intro = (
        f"One full request's stages, each timed in this process with the loaded model, "
        f"{requests} times after {WARM_UP} warm-ups, with {plural(available_cpus(), 'thread')}, as "
        "Ray Serve's replica computes them (features of supports and queries in one pass, "
        "member by member, then prepare and score); then each server's empty route, timed "
        "from the client: the HTTP path a request takes with no model behind it. A "
        "server's full request less its empty route and the in-process stages is what it "
        "spends elsewhere (queueing, batching waits, copies). '% of stages' is p50 against "
        "the stages' summed p50."
    )
    lines = [
        "# Serving: latency and throughput", "", intro, "",
        *table(header, [c.row() for c in rows]), "",
        "## Where one full request's time goes", "", profile_intro, "",
        *table(
            ["stage", "p50 ms", "p99 ms", "% of stages"],
            [[stage, f"{p50:.2f}", f"{p99:.2f}", f"{100 * p50 / total:.0f}"]
             for stage, p50, p99 in profile],
        ),
    ]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
