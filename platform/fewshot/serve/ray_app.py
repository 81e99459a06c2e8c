"""`fewshot serve NAME --ray`: a registered model on Ray Serve, replicated.

Routes (JSON in and out, the same limits as the scoring server: `limits.check_request`):

    POST /invocations   {"inputs": {"support_images", "support_labels", "query_images"}}
                        -> {"predictions": [...], "model_version": V}: the scoring
                        server's contract, so `fewshot.serve.Client` works against both
    POST /supports      {"inputs": {"support_images", "support_labels"}}
                        -> {"support_id", "classes", "model_version"}
    POST /classify      {"inputs": {"support_id", "query_images"}}
                        -> {"predictions": [...], "model_version": V}, without embedding
                        the supports again; an unknown or expired id is a 404 that says
                        to post the supports again
    POST /galleries/NAME/classify, POST /galleries/NAME/classes
                        queries against a gallery's latest version, and a class added to
                        it: serve/galleries.py
    GET  /ping, /version

Every answer names the model version that produced it and the test views it computed
(`--test-views`; default: as trained), in the body and in the headers
`x-fewshot-model-version` and `x-fewshot-test-views`, and the replica that answered in
`x-fewshot-replica`.

- **Replicas** (`Replica`) each load the version's MLflow pyfunc once, answer one
  request of the model's own input example, and only then report ready.
- **Batching**: the images of concurrent requests to a replica go through the backbone
  in one forward pass (`serve.batch`, at most `MAX_BATCH` requests, waiting at most
  `BATCH_WAIT_S` for them), for models whose prediction splits into per-image features
  and a support-set step (`Predictor.splits_prediction`: every method but MAML, and an
  ensemble of such methods). MAML adapts with batch statistics of the whole task and is
  answered request by request (`Runtime.predict`, as the pyfunc answers); it cannot
  cache a support set, and /supports says so.
- **Cached support sets** live in one `SupportStore` deployment that every replica asks
  (serve/supports.py), so a support set posted through one replica is found by all; each
  replica keeps the sets it used in a cache of its own in front of it (an id names fixed
  content, so a copy is never stale), which saves the store's round trip on a stream of
  queries against the same set.
- **Galleries** (serve/galleries.py) are kept by each replica in a `Book`: those of its
  model are loaded and embedded at start, and every `poll_s` the replica follows each
  gallery it knows to its latest version, so a class added through another replica or
  the CLI is answered within seconds.
- **Champion hot-swap** (`follow_alias`): each replica checks the alias every
  `poll_s`; on a change it loads and warms the new version beside the old one, embeds
  its galleries with it, and then swaps, so no request waits for a load or fails.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fewshot.errors import FewShotError, RequestError
from fewshot.methods.base import Features, Prepared, split_rows
from fewshot.ray_cluster import connect as join_ray
from fewshot.registry.pyfunc import FewShotModel, SupportSet, answers, decode_base64, input_example
from fewshot.registry.versions import CHAMPION, alias_version, connect, load
from fewshot.runtime import Runtime
from fewshot.serve import galleries
from fewshot.serve.galleries import VERSION_HEADER, VIEWS_HEADER, Book
from fewshot.serve.limits import Limits, Refused, check_request, read_body
from fewshot.serve.server import POLL_S, Options, resolve
from fewshot.serve.supports import Entry, SupportCache, support_id
from fewshot.tracking import tracking_uri

MAX_BATCH = 16  # requests whose images share one forward pass
BATCH_WAIT_S = 0.002  # how long a replica waits to fill a batch
REPLICA_HEADER = "x-fewshot-replica"
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Loaded:
    version: str
    model: FewShotModel


def load_version(name: str, version: str, uri: str | None, test_views: int | None) -> Loaded:
    """Version `version` of `name`, loaded (computing `test_views` views, when given) and
    warmed with its own input example."""
    model = load(f"models:/{name}/{version}", uri)
    if test_views:
        model.method.with_test_views(test_views)
    example = input_example(model.config, model.preprocessing)
    support = model.support_set(
        decode_base64(example["support_images"], "support_images"), example["support_labels"]
    )
    queries = model.queries(decode_base64(example["query_images"], "query_images"))
    model.predict_task(support, queries)
    return Loaded(version, model)


async def computed(loaded: Loaded, function: Callable, *args):
    """`function(*args)` as the model computes (`Runtime.computed`), in a worker thread:
    the replica's event loop goes on taking requests, and filling the next batch, while
    torch computes."""
    return await asyncio.to_thread(loaded.model.runtime.computed, function, *args)


class NotFound(Exception):
    """An unknown or expired support id (404)."""


# The deployments are plain classes made deployments in `application`: so the class
# pickles by reference (its module is importable on every node) instead of by value.
class SupportStore:
    """The cached support sets of one application (serve/supports.py), shared by its
    replicas."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.cache = SupportCache(max_bytes, ttl_s)

    def put(self, key: str, entry: Entry) -> None:
        self.cache.put(key, entry)

    def add_prepared(self, key: str, version: str, prepared: Prepared) -> None:
        self.cache.add_prepared(key, version, prepared)

    def get(self, key: str) -> Entry | None:
        return self.cache.get(key)


class Replica:
    def __init__(
        self,
        store,
        name: str,
        alias: str,
        version: str,
        uri: str | None,
        limits: Limits,
        max_cache_bytes: int,
        cache_ttl_s: float,
        follow_alias: bool,
        poll_s: float,
        test_views: int | None,
    ) -> None:
        self.store, self.name, self.alias, self.uri = store, name, alias, uri
        self.test_views = test_views
        self.limits = limits
        self.max_cache_bytes = max_cache_bytes
        self.near = SupportCache(max_cache_bytes, cache_ttl_s)
        # Decoding refuses an image whose header declares more pixels (data/decode.py).
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels
        # The replica's process computes with its share of the CPUs.
        Runtime.for_inference(
            ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        ).apply()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loaded = load_version(name, version, uri, test_views)
        self.book = Book(uri)
        self.book.load(name, self.loaded.model, self.loaded.version)
        self.book.start(poll_s, lambda: (self.loaded.model, self.loaded.version))
        if follow_alias:
            threading.Thread(target=self.follow, args=(poll_s,), daemon=True).start()

    def follow(self, poll_s: float) -> None:
        """Load the version the alias moves to and embed the galleries with it, beside the
        version in use, then swap."""
        while True:
            time.sleep(poll_s)
            try:
                version = alias_version(connect(self.uri), self.name, self.alias)
                if version and version != self.loaded.version:
                    loaded = load_version(self.name, version, self.uri, self.test_views)
                    self.book.embed_all(loaded.model, loaded.version)
                    self.loaded = loaded
                    self.book.keep_only(version)
                    log.info("now serving %s version %s", self.name, version)
            except FewShotError as exc:  # the registry is down or the alias gone: keep serving
                log.warning("alias %s of %s: %s", self.alias, self.name, exc)

    async def __call__(self, request: Request) -> Response:
        loaded = self.loaded  # one version for the whole request, swap or not
        route = request.url.path.rstrip("/") or "/"
        try:
            if request.method == "GET" and route in ("/ping", "/version"):
                return self.answer(loaded, {"name": self.name, "alias": self.alias})
            # A gallery's routes are named by their kind, with the gallery's name apart.
            gallery, kind = galleries.route(route) or (None, route)
            handler = (GALLERY_HANDLERS if gallery else HANDLERS).get(kind)
            if request.method != "POST" or handler is None:
                raise Refused(404, f"{request.method} {route}: not a route; see the README")
            # Not `request.body()`, which holds the whole body, however large, before it
            # can be measured.
            body = await read_body(
                request.headers.get("content-length"), request.receive, self.limits
            )
            inputs = check_request(body, request.headers.get("content-type", ""), self.limits, kind)
            arguments = (gallery,) if gallery else ()
            return self.answer(loaded, await getattr(self, handler)(loaded, *arguments, inputs))
        except Refused as exc:
            return Response(exc.body(), exc.status, media_type="application/json")
        except NotFound as exc:
            return self.error(loaded, 404, {"error_code": "NOT_FOUND", "message": str(exc)})
        except FewShotError as exc:
            return self.error(loaded, *galleries.error(exc))

    def headers(self, loaded: Loaded) -> dict[str, str]:
        views = str(loaded.model.method.test_views)
        return {VERSION_HEADER: loaded.version, REPLICA_HEADER: self.replica, VIEWS_HEADER: views}

    def answer(self, loaded: Loaded, content: dict) -> JSONResponse:
        named = {"model_version": loaded.version, "test_views": loaded.model.method.test_views}
        return JSONResponse({**content, **named}, headers=self.headers(loaded))

    def error(self, loaded: Loaded, status: int, answer: dict) -> JSONResponse:
        return JSONResponse(answer, status, headers=self.headers(loaded))

    async def invocations(self, loaded: Loaded, inputs: dict) -> dict:
        model, method = loaded.model, loaded.model.method
        support = model.support_set(
            decode_base64(inputs["support_images"], "support_images"), inputs["support_labels"]
        )
        queries = model.queries(decode_base64(inputs["query_images"], "query_images"))
        if method.splits_prediction:  # the task's images join the replica's batch
            support_z, query_z = await self.features((loaded, [support.x, queries]))
            prepared = await computed(loaded, method.prepare, support_z, support.y)
            logits = await computed(loaded, method.score, prepared, query_z)
        else:
            logits = await asyncio.to_thread(model.predict_task, support, queries)
        return {"predictions": answers(support.classes, logits)}

    async def supports(self, loaded: Loaded, inputs: dict) -> dict:
        method = loaded.model.method
        if not method.splits_prediction:
            raise RequestError(
                f"this model's method, {method.name}, adapts to each whole task (support and "
                "queries together), so it has no support set to cache; POST full requests "
                "to /invocations"
            )
        images = decode_base64(inputs["support_images"], "support_images")
        labels = inputs["support_labels"]
        support = loaded.model.support_set(images, labels)  # refuses a label count that differs
        key = support_id(images, labels)
        entry = Entry(images, list(labels), support.classes)
        entry.prepared[loaded.version] = await self.prepare(loaded, support)
        if entry.size() > self.max_cache_bytes:
            raise Refused(
                413,
                f"support set of {entry.size()} bytes, over the cache's {self.max_cache_bytes} "
                "(--cache-mb); send it with each request to /invocations instead",
                "max_cache_bytes",
            )
        await self.store.put.remote(key, entry)
        self.near.put(key, entry)
        return {"support_id": key, "classes": support.classes}

    async def classify(self, loaded: Loaded, inputs: dict) -> dict:
        key = inputs["support_id"]
        entry = self.near.get(key)
        if entry is None:
            entry = await self.store.get.remote(key)
            if entry is not None:
                self.near.put(key, entry)
        if entry is None:
            raise NotFound(
                f"support_id {key[:80]!r}: unknown, expired or evicted; POST the support set "
                "to /supports again (the same images give the same id)"
            )
        prepared = entry.prepared.get(loaded.version)
        if prepared is None:  # posted under another version: prepare again from its images
            prepared = await self.prepare(
                loaded, loaded.model.support_set(entry.images, entry.labels)
            )
            self.near.add_prepared(key, loaded.version, prepared)
            await self.store.add_prepared.remote(key, loaded.version, prepared)
        return {"predictions": answers(entry.classes, await self.scored(loaded, prepared, inputs))}

    async def gallery_classify(self, loaded: Loaded, name: str, inputs: dict) -> dict:
        """Queries against gallery `name`, their features batched with other requests'."""
        model = loaded.model
        embedded = await asyncio.to_thread(self.book.embedding, name, model, loaded.version)
        if embedded.prepared is None:  # a model that adapts to each whole task
            queries = model.queries(decode_base64(inputs["query_images"], "query_images"))
            logits = await asyncio.to_thread(embedded.logits, model, queries)
        else:
            logits = await self.scored(loaded, embedded.prepared, inputs)
        return embedded.answer(answers(embedded.classes, logits))

    async def gallery_add(self, loaded: Loaded, name: str, inputs: dict) -> dict:
        return await asyncio.to_thread(self.book.add, name, loaded.model, loaded.version, inputs)

    async def scored(self, loaded: Loaded, prepared: Prepared, inputs: dict) -> torch.Tensor:
        """The request's query_images against a prepared support set -> logits [M, N],
        their features batched with other requests'."""
        queries = loaded.model.queries(decode_base64(inputs["query_images"], "query_images"))
        (query_z,) = await self.features((loaded, [queries]))
        return await computed(loaded, loaded.model.method.score, prepared, query_z)

    async def prepare(self, loaded: Loaded, support: SupportSet) -> Prepared:
        (support_z,) = await self.features((loaded, [support.x]))
        return await computed(loaded, loaded.model.method.prepare, support_z, support.y)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def features(
        self, items: list[tuple[Loaded, list[torch.Tensor]]]
    ) -> list[list[Features]]:
        """Per-image features (`Predictor.features`) of the images of every request in the
        batch, one list of images [B, C, H, W] each, in one forward pass per model version
        among them (two only while a swap is under way)."""
        results: list[list[Features] | None] = [None] * len(items)
        for loaded in {id(item[0]): item[0] for item in items}.values():
            mine = [i for i, (other, _) in enumerate(items) if other is loaded]
            images = [x for i in mine for x in items[i][1]]
            z = await computed(loaded, loaded.model.method.features, torch.cat(images))
            parts = iter(split_rows(z, [len(x) for x in images]))
            for i in mine:
                results[i] = [next(parts) for _ in items[i][1]]
        return results


HANDLERS = {"/invocations": "invocations", "/supports": "supports", "/classify": "classify"}
GALLERY_HANDLERS = {galleries.CLASSIFY: "gallery_classify", galleries.CLASSES: "gallery_add"}


@dataclass(frozen=True)
class Scale:
    """Fixed replicas, or Ray Serve's autoscaling between min and max."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None

    def options(self) -> dict:
        if self.autoscale:
            low, high = self.autoscale
            config = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 2}
            return {"autoscaling_config": config}
        return {"num_replicas": self.replicas}


def application(
    name: str,
    version: str,
    *,
    alias: str = CHAMPION,
    uri: str | None = None,
    scale: Scale = Scale(),
    limits: Limits | None = None,
    cache_mb: float = 256,
    cache_ttl_s: float = 3600,
    follow_alias: bool = False,
    poll_s: float = POLL_S,
    cpus_per_replica: float = 1.0,
    test_views: int | None = None,
):
    """The Ray Serve application of `name` at `version` (bind, not yet run)."""
    max_bytes = int(cache_mb * 2**20)
    store = serve.deployment(SupportStore, num_replicas=1, ray_actor_options={"num_cpus": 0})
    replica = serve.deployment(
        Replica,
        ray_actor_options={"num_cpus": cpus_per_replica},
        # Room for a full batch while the one before it computes.
        max_ongoing_requests=2 * MAX_BATCH,
        **scale.options(),
    )
    return replica.bind(
        store.bind(max_bytes, cache_ttl_s), name, alias, version, tracking_uri(uri),
        limits or Limits.from_env(), max_bytes, cache_ttl_s, follow_alias, poll_s, test_views,
    )  # fmt: skip


def run(
    name: str,
    alias: str = CHAMPION,
    options: Options = Options(),
    *,
    uri: str | None = None,
    follow_alias: bool = False,
) -> None:
    """Serve `models:/NAME@alias` on Ray Serve (this machine's Ray, or $RAY_ADDRESS's
    cluster) until interrupted."""
    options.check()  # before the registry is asked or Ray starts
    limits = Limits.from_env()
    version = resolve(name, alias, uri)
    app = application(
        name, version, alias=alias, uri=uri, scale=Scale(options.replicas, options.autoscale),
        limits=limits, cache_mb=options.cache_mb, cache_ttl_s=options.cache_ttl_s,
        follow_alias=follow_alias, cpus_per_replica=options.cpus_per_replica,
        test_views=options.test_views,
    )  # fmt: skip
    join_ray(None)
    # SIGTERM (a supervisor, `kill`) ends the server as Ctrl-C does: through the cleanup
    # below, so a Ray this process started does not outlive it. Set after Ray starts,
    # whose core worker installs a SIGTERM handler of its own that exits at once.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    app_name = f"fewshot-{name}"
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        # Blocks until every replica has loaded and warmed its model.
        serve.run(app, name=app_name)
        print(
            f"serving {name} version {version} (@{alias}) on Ray Serve at "
            f"http://{options.host}:{options.port}/invocations (/supports, /classify); "
            "Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(app_name)
        ray.shutdown()
