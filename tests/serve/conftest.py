"""What the serving tests share: the malformed requests that both servers must refuse
with a 4xx (`malformed`), a raw POST that can leave out the Content-Type (`send`), and a
process's memory now and at its peak."""

from __future__ import annotations

import base64
import http.client
import json
from dataclasses import dataclass
from pathlib import Path

from tests.test_bad_inputs import BOMB, png_declaring

JSON = "application/json"


@dataclass(frozen=True)
class Malformed:
    body: bytes
    content_type: str | None  # None: no Content-Type header at all
    status: int  # the answer of every route that reads what it spoils
    spoils: str | None  # the input it spoils; None: the whole request, for every route
    limit: str | None = None  # the limit a 413 (or 400) names


def malformed(inputs: dict) -> dict[str, Malformed]:
    """Malformed variants, by case, of a well-formed request whose "inputs" are `inputs`
    (with 2 or more support classes)."""
    labels, one_query = inputs["support_labels"], inputs["query_images"][0]

    def spoiled(name: str, values: list[str], status: int, limit: str | None = None):
        body = json.dumps({"inputs": {**inputs, name: values}}).encode()
        return Malformed(body, JSON, status, name, limit)

    def whole(body: bytes, status: int, content_type: str | None = JSON, limit=None):
        return Malformed(body, content_type, status, None, limit)

    def encoded(image: bytes) -> str:
        return base64.b64encode(image).decode()

    return {
        "truncated JSON": whole(b'{"inputs": ', 400),
        "plain text": whole(b"support,query", 415, "text/plain"),
        "no Content-Type": whole(json.dumps({"inputs": inputs}).encode(), 415, None),
        "JSON nested too deep": whole(b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        "no classes, no queries, no support id": whole(
            json.dumps({"inputs": {"support_images": [], "support_labels": []}}).encode(), 400
        ),
        "21 MB body": whole(b"x" * (21 * 2**20), 413, limit="max_body_bytes"),
        "one label too few": spoiled("support_labels", labels[1:], 400),
        # MLflow's own 400 quotes the request: at most a few hundred characters come back.
        "500 labels too many": spoiled("support_labels", [*labels[1:], *["z"] * 500], 400),
        "a label of 100,000 characters": spoiled(
            "support_labels", ["L" * 100_000, *labels[1:]], 400, "max_label_chars"
        ),
        "a query not base64": spoiled("query_images", ["%%%"], 400),
        "a query not an image": spoiled("query_images", [encoded(b"not an image")], 400),
        "a decompression bomb": spoiled("query_images", [encoded(BOMB)], 400),
        "a query declaring 5000x5000 pixels": spoiled(
            "query_images", [encoded(png_declaring(5000, 5000, b"\0" * 100))], 400
        ),
        "10,000 queries": spoiled("query_images", [one_query] * 10_000, 413, "max_images"),
        # One long string among 200 short ones: a 785 MB numpy array of padded strings.
        "one query of 1 MB among 200": spoiled(
            "query_images", ["x" * 1_000_000, *[one_query] * 199], 413, "max_array_bytes"
        ),
    }


def send(port: int, path: str, body: bytes, content_type: str | None = JSON) -> tuple[int, dict]:
    """(status, JSON answer) of a POST to 127.0.0.1; http.client adds no Content-Type of
    its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS), or at its peak (VmHWM) since `reset_peak`."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def reset_peak(pid: int) -> None:
    """Start a process's peak resident memory (VmHWM) again from what it holds now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
