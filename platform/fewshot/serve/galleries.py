"""The servers' side of galleries (registry/galleries.py): both answer

    POST /galleries/NAME/classify   {"inputs": {"query_images": [...]}}
                                    -> {"predictions": [...], "model_version": V,
                                        "gallery": NAME, "gallery_version": G}
    POST /galleries/NAME/classes    {"inputs": {"label": "...", "images": [...]}}
                                    -> {"gallery": NAME, "gallery_version": G, "change",
                                        "classes", "images", "model_version": V}

from the gallery's latest version, embedded by the model version in use.

A server keeps a `Book`: the latest version it knows of each gallery it has answered
(those created for its model are loaded at start), and each gallery as a model version
embedded it (`Embedded`, kept per gallery version and model version). `follow` asks the
tracking store every `poll_s` whether a known gallery has a newer version (one lookup
per gallery, `galleries.following`), so a class added through another replica, another
server or the CLI is answered within a few seconds, with no restart. A new version is
embedded from the previous one: only the images it adds go through the backbone, since
features are a function of each image alone (`Predictor.features`). A model that adapts
to each whole task (MAML) keeps the gallery's decoded images instead and answers each
request as a whole task.

The routes' limits are the servers' (`limits.check_request`); an unknown gallery is a
404, a refused change a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import torch

from fewshot.errors import FewShotError
from fewshot.methods.base import Features, Prepared, cat_rows, split_rows
from fewshot.registry import galleries
from fewshot.registry.pyfunc import FewShotModel, SupportSet, answers, decode_base64
from fewshot.serve.limits import Refused, read_request, respond

CLASSIFY, CLASSES = "/galleries/classify", "/galleries/classes"  # as `limits.ROUTES` names them
VERSION_HEADER = "x-fewshot-model-version"  # the model version that answered
VIEWS_HEADER = "x-fewshot-test-views"  # the test views it computed (--test-views)
log = logging.getLogger("fewshot.serve")


def route(path: str) -> tuple[str, str] | None:
    """`/galleries/NAME/classify` -> (NAME, CLASSIFY), `.../classes` -> (NAME, CLASSES);
    any other path -> None."""
    parts = path.strip("/").split("/")
    if len(parts) != 3 or parts[0] != "galleries" or not parts[1]:
        return None
    kind = {"classify": CLASSIFY, "classes": CLASSES}.get(parts[2])
    return (unquote(parts[1]), kind) if kind else None


@dataclass(frozen=True)
class Embedded:
    """A gallery version as one model version answers from it."""

    gallery: galleries.Version
    classes: list[str]  # class i of the answer's logits
    rows: dict[str, Features]  # image sha256 -> its features [1, ...] (splitting models)
    prepared: Prepared | None  # the support set as `score` takes it; None for MAML
    support: SupportSet | None  # the decoded images, for a model that does not split

    def logits(self, model: FewShotModel, queries: torch.Tensor) -> torch.Tensor:
        """Queries [M, C, H, W] -> logits [M, N] over `classes`."""
        if self.prepared is None:
            return model.predict_task(self.support, queries)
        query_z = model.runtime.computed(model.method.features, queries)
        return model.runtime.computed(model.method.score, self.prepared, query_z)

    def answer(self, predictions: list[dict]) -> dict:
        return {
            "predictions": predictions,
            "gallery": self.gallery.gallery,
            "gallery_version": self.gallery.version,
        }


def embed(
    model: FewShotModel,
    version: galleries.Version,
    entries: list[galleries.Entry],
    before: Embedded | None,
) -> Embedded:
    """Gallery `version` (its `entries`) as `model` answers from it, reusing the features
    of images that `before` (an earlier version, same model version) already embedded."""
    classes, y = model.classes_of([e.label for e in entries])  # refuses what it cannot answer
    method = model.method
    if not method.splits_prediction:
        x = model.preprocessing.tensor([e.image for e in entries], "gallery image")
        return Embedded(version, classes, {}, None, SupportSet(classes, x, y))
    known = before.rows if before else {}
    new = list({e.sha256: e for e in entries if e.sha256 not in known}.values())
    rows = {e.sha256: known[e.sha256] for e in entries if e.sha256 in known}
    if new:
        x = model.preprocessing.tensor([e.image for e in new], "gallery image")
        z = model.runtime.computed(method.features, x)
        rows.update(zip((e.sha256 for e in new), split_rows(z, [1] * len(new)), strict=True))
    support_z = cat_rows([rows[e.sha256] for e in entries])
    prepared = model.runtime.computed(method.prepare, support_z, y)
    return Embedded(version, classes, rows, prepared, None)


class Book:
    """The galleries one server answers from, each at the latest version it knows and
    embedded by the model versions in use (at most two: during a champion hot-swap)."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self.heads: dict[str, galleries.Version] = {}
        self.embedded: dict[tuple[str, str], Embedded] = {}  # (gallery, model version)
        self.lock = threading.Lock()  # one embedding at a time; readers do not wait

    def head(self, name: str) -> galleries.Version:
        """The latest version known of gallery `name`, looked up on its first use."""
        known = self.heads.get(name)
        if known is None:
            known = self.advance(galleries.get(name, uri=self.uri))
        return known

    def advance(self, version: galleries.Version) -> galleries.Version:
        """Know `version` (this server's own change, or one `follow` found) unless a later
        one of its gallery is known already; returns the latest known."""
        with self.lock:
            known = self.heads.get(version.gallery)
            if known is None or known.version < version.version:
                self.heads[version.gallery] = known = version
        return known

    def embedding(self, name: str, model: FewShotModel, model_version: str) -> Embedded:
        """Gallery `name` at its latest known version as `model_version` answers from it."""
        version = self.head(name)
        found = self.embedded.get((name, model_version))
        if found is not None and found.gallery.version >= version.version:
            return found
        with self.lock:
            found = self.embedded.get((name, model_version))
            if found is not None and found.gallery.version >= version.version:
                return found
            made = embed(model, version, galleries.entries(version, self.uri), found)
            self.embedded[(name, model_version)] = made
        return made

    def embed_all(self, model: FewShotModel, model_version: str) -> None:
        """Embed every known gallery with `model_version` (a server starting, a new
        champion before it answers); a gallery it cannot answer is logged and skipped
        (its requests get the reason)."""
        for name in list(self.heads):
            try:
                self.embedding(name, model, model_version)
            except FewShotError as exc:
                log.warning("gallery %s: %s", name, exc)

    def keep_only(self, model_version: str) -> None:
        """Forget the embeddings of other model versions (after a hot-swap)."""
        with self.lock:
            self.embedded = {k: v for k, v in self.embedded.items() if k[1] == model_version}

    def load(self, model_name: str, model: FewShotModel, model_version: str) -> None:
        """At start: know and embed every gallery created for `model_name`."""
        for version in galleries.for_model(model_name, self.uri):
            self.advance(version)
        self.embed_all(model, model_version)

    def refresh(self) -> list[galleries.Version]:
        """Follow each known gallery to its latest version; returns the ones that moved."""
        moved = []
        for known in list(self.heads.values()):
            latest = galleries.following(known, self.uri)
            if latest.version > known.version:
                moved.append(self.advance(latest))
        return moved

    def follow(self, poll_s: float, in_use: Callable[[], tuple[FewShotModel, str]]) -> None:
        """Forever: every `poll_s`, move to the galleries' newer versions and embed them
        with the model in use (`in_use()`: model, version) before a request needs them."""
        while True:
            time.sleep(poll_s)
            try:
                if self.refresh():
                    self.embed_all(*in_use())
            except Exception as exc:  # noqa: BLE001 (the store is down: keep answering)
                log.warning("galleries: %s", exc)

    def start(self, poll_s: float, in_use: Callable[[], tuple[FewShotModel, str]]) -> None:
        threading.Thread(target=self.follow, args=(poll_s, in_use), daemon=True).start()

    def classify(self, name: str, model: FewShotModel, model_version: str, inputs: dict) -> dict:
        """POST /galleries/NAME/classify, as the scoring server answers it (Ray Serve
        batches the queries' features with other requests')."""
        embedded = self.embedding(name, model, model_version)
        queries = model.queries(decode_base64(inputs["query_images"], "query_images"))
        return embedded.answer(answers(embedded.classes, embedded.logits(model, queries)))

    def add(self, name: str, model: FewShotModel, model_version: str, inputs: dict) -> dict:
        """POST /galleries/NAME/classes: a new version of gallery `name` with class
        `label`'s images added (created if new), embedded here before the answer."""
        images = decode_base64(inputs["images"], "images")
        version = self.advance(galleries.add(name, inputs["label"], images, self.uri))
        self.embedding(name, model, model_version)
        return {
            "gallery": version.gallery,
            "gallery_version": version.version,
            "change": version.change,
            "classes": version.classes,
            "images": version.images,
        }


class Routes:
    """ASGI middleware of the scoring server: answers POST /galleries/NAME/... with the
    server's model and passes every other request on to `app` (MLflow's); every answer
    names the test views the model computed (VIEWS_HEADER)."""

    def __init__(self, app, book: Book, model: FewShotModel, model_version: str, limits) -> None:
        self.app, self.book, self.model, self.model_version = app, book, model, model_version
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        found = route(scope["path"]) if scope["type"] == "http" else None
        views = (VIEWS_HEADER.encode(), str(self.model.method.test_views).encode())
        if found is None or scope["method"] != "POST":

            async def naming_views(message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), views]}
                await send(message)

            return await self.app(scope, receive, naming_views)
        name, kind = found
        handle = self.book.classify if kind == CLASSIFY else self.book.add
        try:
            _, inputs = await read_request(scope, receive, self.limits, kind)
            # In a worker thread: the event loop goes on taking requests (and /ping).
            content = await asyncio.to_thread(handle, name, self.model, self.model_version, inputs)
            status, answer = 200, {**content, "model_version": self.model_version}
            answer["test_views"] = self.model.method.test_views
        except Refused as exc:
            status, answer = exc.status, exc.answer()
        except FewShotError as exc:
            status, answer = error(exc)
        version = (VERSION_HEADER.encode(), self.model_version.encode())
        await respond(send, status, json.dumps(answer).encode(), [version, views])


def error(exc: FewShotError) -> tuple[int, dict]:
    """A refused gallery request's status and JSON answer: 404 for an unknown gallery."""
    if isinstance(exc, galleries.UnknownGallery):
        return 404, {"error_code": "NOT_FOUND", "message": str(exc)}
    return 400, {"error_code": "BAD_REQUEST", "message": str(exc)}
