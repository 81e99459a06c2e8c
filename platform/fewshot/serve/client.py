"""A small Python client of the servers that `fewshot serve` starts.

    from fewshot.serve import Client

    client = Client("http://127.0.0.1:5001")
    client.wait_ready()
    answers = client.predict({"alpha": ["a1.png"], "beta": ["b1.png"]}, ["x.png", "y.png"])
    answers[0]["label"], answers[0]["probabilities"]

Against a gallery kept in the tracking store (`fewshot gallery`), queries only:

    answer = client.classify_gallery("shop", ["x.png"])
    answer["predictions"], answer["gallery_version"], answer["model_version"]
    client.add_class("shop", "gamma", ["g1.png", "g2.png"])   # a new gallery version

Against Ray Serve (`fewshot serve NAME --ray`) a support set can also be posted once and
then named by its id:

    support_id = client.post_supports({"alpha": [...], "beta": [...]})["support_id"]
    answers = client.classify(support_id, ["x.png", "y.png"])
    client.model_version   # the version that gave the last answer (Ray Serve, galleries)

Images are file paths or encoded bytes (PNG or JPEG). Standard library only.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from fewshot.errors import RequestError, ServeError

Image = str | Path | bytes  # a file path, or the file's bytes


def encoded(image: Image) -> str:
    """An image as a request carries it: its file's bytes, base64."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def support_inputs(support: Mapping[str, Sequence[Image]]) -> dict:
    """A support set {label: images} as the request's `support_images` and `support_labels`."""
    return {
        "support_images": [encoded(i) for images in support.values() for i in images],
        "support_labels": [label for label, images in support.items() for _ in images],
    }


def request_body(support: Mapping[str, Sequence[Image]], query: Sequence[Image]) -> dict:
    """The JSON body of `POST /invocations` for a support set {label: images} and queries."""
    return {"inputs": {**support_inputs(support), "query_images": [encoded(i) for i in query]}}


def classify_body(support_id: str, query: Sequence[Image]) -> dict:
    """The JSON body of `POST /classify`: queries against a cached support set."""
    return {"inputs": {"support_id": support_id, "query_images": [encoded(i) for i in query]}}


def gallery_body(query: Sequence[Image]) -> dict:
    """The JSON body of `POST /galleries/NAME/classify`: queries only."""
    return {"inputs": {"query_images": [encoded(i) for i in query]}}


def _error_message(body: bytes) -> str:
    """The server's one-line reason: MLflow's JSON `message`, without the echo of the input
    that MLflow puts before the model's own error."""
    try:
        message = json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    lines = message.rpartition("Error: ")[2].strip().splitlines()
    return lines[0] if lines else "no reason given"


class Client:
    def __init__(self, url: str = "http://127.0.0.1:5001", timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.model_version: str | None = None

    def ping(self) -> bool:
        """True when the server is up and its model loaded."""
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until /ping answers; returns the seconds waited. The first answer comes
        once the model is loaded (several seconds)."""
        start = time.monotonic()
        while not self.ping():
            if time.monotonic() - start > timeout:
                raise ServeError(
                    f"no scoring server answered at {self.url} within {timeout:.0f} s; "
                    "start one with `fewshot serve NAME`"
                )
            time.sleep(0.2)
        return time.monotonic() - start

    def predict(self, support: Mapping[str, Sequence[Image]], query: Sequence[Image]) -> list[dict]:
        """Support images by label, query images -> one {"label", "probabilities"} per query."""
        return self.invoke(request_body(support, query))

    def invoke(self, body: dict) -> list[dict]:
        """POST a prepared body to /invocations; a refused request raises `RequestError`."""
        return self.post("/invocations", body)["predictions"]

    def post_supports(self, support: Mapping[str, Sequence[Image]]) -> dict:
        """Cache a support set {label: images} on the server (Ray Serve): returns
        {"support_id", "classes"}; the same set always gets the same id."""
        return self.post("/supports", {"inputs": support_inputs(support)})

    def classify(self, support_id: str, query: Sequence[Image]) -> list[dict]:
        """Queries against a cached support set -> one {"label", "probabilities"} each."""
        return self.post("/classify", classify_body(support_id, query))["predictions"]

    def classify_gallery(self, gallery: str, query: Sequence[Image]) -> dict:
        """Queries against a gallery's latest version (both servers) -> {"predictions",
        "gallery", "gallery_version", "model_version"}."""
        return self.post(f"/galleries/{quote(gallery, safe='')}/classify", gallery_body(query))

    def add_class(self, gallery: str, label: str, images: Sequence[Image]) -> dict:
        """Add class `label` with `images` to a gallery (a new gallery version) -> {"gallery",
        "gallery_version", "change", "classes", "images", "model_version"}."""
        body = {"inputs": {"label": label, "images": [encoded(i) for i in images]}}
        return self.post(f"/galleries/{quote(gallery, safe='')}/classes", body)

    def post(self, path: str, body: dict) -> dict:
        """POST `body` as JSON to `path`; the answer's JSON. A refused request raises
        `RequestError`, a server failure `ServeError`."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                content = json.loads(answer.read())
                self.model_version = content.get("model_version")
                return content
        except urllib.error.HTTPError as exc:
            reason = _error_message(exc.read())
            if 400 <= exc.code < 500:
                raise RequestError(f"server refused the request ({exc.code}): {reason}") from None
            raise ServeError(f"server error {exc.code} at {self.url}: {reason}") from None
        except urllib.error.URLError as exc:
            raise ServeError(
                f"no scoring server at {self.url} ({exc.reason}); "
                "start one with `fewshot serve NAME`"
            ) from None
