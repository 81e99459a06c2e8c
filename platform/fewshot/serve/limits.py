"""What one request may ask of a server, checked before MLflow reads the body.

MLflow's scoring server parses any JSON it is sent and turns each input list into a
numpy array of fixed-width strings: a request's cost is set by the client, not by the
server. So every request to `/invocations` passes `check_request` first, in an ASGI
middleware (`Guard`) in front of MLflow's app, and is refused with a 413 or 400 whose
JSON names the limit (`"limit": "max_images"`), before it costs more than the body
itself. Any 4xx answer, ours or MLflow's, quotes at most `QUOTE` characters of the
request. The Ray Serve path (serve/ray_app.py) reads each body with the same `read_body`
and calls the same `check_request` on each of its routes (`ROUTES`).

Each limit is a setting of `fewshot serve` and travels to the server's processes as
an environment variable (FEWSHOT_SERVE_MAX_IMAGES, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from fewshot.config import limits_from_env
from fewshot.errors import ServeError

INPUTS = ("support_images", "support_labels", "query_images")
# The string lists each route's body holds under "inputs" (a gallery's routes by their
# kind: serve/galleries.py).
ROUTES = {
    "/invocations": INPUTS,
    "/supports": ("support_images", "support_labels"),
    "/classify": ("query_images",),
    "/galleries/classify": ("query_images",),
    "/galleries/classes": ("images",),
}
# The single strings a route's "inputs" also hold, with what to send.
STRINGS = {
    "/classify": ("support_id", "the string that POST /supports answered"),
    "/galleries/classes": ("label", "the class's label"),
}
IMAGES = ("support_images", "query_images", "images")
QUOTE = 300  # characters of the request a 4xx answer may quote
PADDED_BYTES_PER_CHAR = 4  # numpy's fixed-width unicode: every string as long as the longest


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20
    max_images: int = 1000  # support plus query images in one request
    max_label_chars: int = 200
    max_pixels: int = 4096 * 4096  # per image, as its header declares it
    # An input list as MLflow holds it: strings padded to the longest of the list.
    max_array_bytes: int = 256 * 2**20

    @staticmethod
    def variable(name: str) -> str:
        return f"FEWSHOT_SERVE_{name.upper()}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Limits:
        return limits_from_env(cls, cls.variable, ServeError, env)

    def env(self) -> dict[str, str]:
        return {self.variable(f.name): str(getattr(self, f.name)) for f in fields(self)}


class Refused(Exception):
    """A request past a limit or malformed: `status` and the one-line JSON answer."""

    def __init__(self, status: int, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.limit = status, limit

    def answer(self) -> dict[str, Any]:
        code = {413: "REQUEST_LIMIT_EXCEEDED", 415: "BAD_REQUEST"}.get(self.status, "BAD_REQUEST")
        answer: dict[str, Any] = {"error_code": code, "message": str(self)}
        if self.limit:
            answer["limit"] = self.limit
        return answer

    def body(self) -> bytes:
        return json.dumps(self.answer()).encode()


def quote(text: str, limit: int = QUOTE) -> str:
    """`text` if short, else its start and end (where MLflow puts the reason)."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return (
        f"{text[:head]} ...[{len(text) - limit} characters left out]... {text[-(limit - head) :]}"
    )


def check_request(
    body: bytes, content_type: str, limits: Limits, route: str = "/invocations"
) -> dict[str, Any]:
    """Refuse a request to `route` (one of ROUTES) that is malformed or past a limit;
    return its "inputs"."""
    names = ROUTES[route]
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json":
        raise Refused(415, f"Content-Type {quote(content_type, 80)!r}: send application/json")
    if len(body) > limits.max_body_bytes:
        raise Refused(413, too_big(len(body), limits), "max_body_bytes")
    try:
        tree = json.loads(body)
    except RecursionError:
        raise Refused(400, "body: JSON nested too deep; send the documented form") from None
    except ValueError as exc:  # JSON and UTF-8 errors
        raise Refused(400, f"body: not valid JSON ({quote(str(exc), 120)})") from None
    inputs = tree.get("inputs") if isinstance(tree, dict) else None
    string, what = STRINGS.get(route, (None, None))
    if not isinstance(inputs, dict):
        expected = ", ".join(
            [*([f'"{string}": "..."'] if string else []), *(f'"{n}": [...]' for n in names)]
        )
        raise Refused(400, f'body: expected {{"inputs": {{{expected}}}}}')
    for name in names:
        values = inputs.get(name)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise Refused(400, f"{name}: expected a list of strings")
    if string and not isinstance(inputs.get(string), str):
        raise Refused(400, f"{string}: expected {what}")
    images = sum(len(inputs[n]) for n in IMAGES if n in names)
    if images > limits.max_images:
        raise Refused(
            413,
            f"{images} images in one request, over the limit of {limits.max_images} "
            f"(max_images); send fewer per request",
            "max_images",
        )
    labels = inputs["support_labels"] if "support_labels" in names else []
    named = [(f"support_labels[{i}]", label) for i, label in enumerate(labels)]
    if string == "label":
        named.append(("label", inputs["label"]))
    for where, label in named:
        if len(label) > limits.max_label_chars:
            raise Refused(
                400,
                f"{where}: {len(label)} characters, over the limit of "
                f"{limits.max_label_chars} (max_label_chars); send shorter labels",
                "max_label_chars",
            )
    for name in names:
        values = inputs[name]
        padded = len(values) * max(map(len, values), default=0) * PADDED_BYTES_PER_CHAR
        if padded > limits.max_array_bytes:
            raise Refused(
                413,
                f"{name}: {len(values)} strings padded to the longest take {padded >> 20} MB, "
                f"over the limit of {limits.max_array_bytes >> 20} MB (max_array_bytes); "
                "send images of similar size, or fewer per request",
                "max_array_bytes",
            )
    return inputs


def too_big(size: int, limits: Limits) -> str:
    return (
        f"body of {size} bytes, over the limit of {limits.max_body_bytes} (max_body_bytes); "
        "send fewer or smaller images per request"
    )


async def read_body(content_length: str | None, receive, limits: Limits) -> bytes:
    """The body of a request from its ASGI `receive`, read only up to `max_body_bytes`: one
    declared larger is refused unread, a chunked one as soon as it passes the limit, so what
    a request holds in memory never depends on what the client sends."""
    cap = limits.max_body_bytes
    if content_length and content_length.isdigit() and int(content_length) > cap:
        raise Refused(413, too_big(int(content_length), limits), "max_body_bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise Refused(413, too_big(size, limits), "max_body_bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def read_request(scope, receive, limits: Limits, route: str) -> tuple[bytes, dict[str, Any]]:
    """An ASGI request to `route` (one of ROUTES): its body, read within the limits
    (`read_body`), and its checked "inputs" (`check_request`)."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    body = await read_body(headers.get("content-length"), receive, limits)
    return body, check_request(body, headers.get("content-type", ""), limits, route)


async def respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An ASGI answer of JSON `body`, with `headers` besides its type and length."""
    start = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": body})


def shorten_error(body: bytes) -> bytes:
    """A 4xx answer with its `message` (or the whole body) quoting at most QUOTE characters."""
    try:
        answer = json.loads(body)
    except ValueError:
        return quote(body.decode("utf-8", "replace")).encode()
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        answer["message"] = quote(answer["message"])
        return json.dumps(answer).encode()
    return body if len(body) <= QUOTE else quote(body.decode("utf-8", "replace")).encode()


class Guard:
    """ASGI middleware: `check_request` before the app sees a POST /invocations, and every
    4xx answer of the app shortened (MLflow's echo the request body)."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._shortening(send)
        if scope["method"] != "POST" or scope["path"].rstrip("/") != "/invocations":
            return await self.app(scope, receive, send)
        try:
            body, _ = await read_request(scope, receive, self.limits, "/invocations")
        except Refused as exc:
            return await respond(send, exc.status, exc.body())
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _shortening(self, send):
        held: dict[str, Any] = {}

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                held.update(start=message, body=b"")
                return
            if held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                body = shorten_error(held["body"])
                headers = [
                    (k, v) for k, v in held["start"]["headers"] if k.lower() != b"content-length"
                ]
                headers.append((b"content-length", b"%d" % len(body)))
                await send({**held["start"], "headers": headers})
                await send({"type": "http.response.body", "body": body})
                held.clear()
                return
            await send(message)

        return wrapped
