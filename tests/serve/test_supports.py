"""The support-set cache: content ids, a byte bound (least recently used out), a TTL."""

import pytest
import torch

from fewshot.serve.limits import Limits, Refused, check_request
from fewshot.serve.supports import Entry, SupportCache, support_id


def entry(image_bytes: int, prepared_floats: int = 0) -> Entry:
    e = Entry([b"x" * image_bytes], ["a"], ["a"])
    if prepared_floats:
        e.prepared["1"] = {"prototypes": torch.zeros(prepared_floats)}
    return e


def test_the_id_is_a_hash_of_labels_and_images_in_order():
    same = support_id([b"A", b"B"], ["cat", "dog"])
    assert same == support_id([b"A", b"B"], ["cat", "dog"])
    assert same != support_id([b"A", b"B"], ["dog", "cat"])
    assert same != support_id([b"B", b"A"], ["cat", "dog"])
    # Length prefixes: moving a byte from label to image is another set.
    assert support_id([b"bc"], ["a"]) != support_id([b"c"], ["ab"])


def test_entries_are_evicted_least_recently_used_first_past_the_byte_bound():
    cache = SupportCache(max_bytes=1000, ttl_s=60)
    cache.put("a", entry(400))
    cache.put("b", entry(400))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", entry(400))  # 1200 bytes: b goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.bytes() == 800
    cache.get("a")  # as /classify does before it adds a version's preparation
    cache.add_prepared("a", "2", {"prototypes": torch.zeros(100)})  # 400 more bytes: c goes
    assert cache.get("c") is None and cache.bytes() == 800


def test_an_entry_unused_for_the_ttl_expires():
    now = [0.0]
    cache = SupportCache(max_bytes=10**6, ttl_s=10, clock=lambda: now[0])
    cache.put("a", entry(10))
    now[0] = 9.0
    assert cache.get("a") is not None  # used at 9: lives until 19
    now[0] = 18.0
    assert cache.get("a") is not None
    now[0] = 28.5
    assert cache.get("a") is None


def test_each_route_checks_its_own_inputs():
    limits = Limits(max_images=3)
    body = b'{"inputs": {"support_images": ["a"], "support_labels": ["x"]}}'
    assert check_request(body, "application/json", limits, "/supports")["support_labels"] == ["x"]
    with pytest.raises(Refused, match="query_images: expected a list of strings"):
        check_request(body, "application/json", limits, "/invocations")
    with pytest.raises(Refused, match="support_id: expected the string"):
        check_request(b'{"inputs": {"query_images": []}}', "application/json", limits, "/classify")
    many = b'{"inputs": {"support_id": "s-1", "query_images": ["q", "q", "q", "q"]}}'
    with pytest.raises(Refused, match="4 images in one request") as refused:
        check_request(many, "application/json", limits, "/classify")
    assert refused.value.status == 413 and refused.value.limit == "max_images"
