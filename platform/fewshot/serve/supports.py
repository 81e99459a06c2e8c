"""Cached support sets: post a support set once, classify many queries against it.

A support set is named by a content hash of its labels and images (`support_id`), so
posting the same set again gives the same id. The cache keeps, per id, the encoded
images with their labels and, per model version, the support set as the model
prepared it (`Predictor.prepare`: ProtoNet's prototypes, MTL's fine-tuned classifier,
an ensemble's tuple of its members' preparations, ...). A replica of a newer version
that finds only another version's preparation prepares the set again from the kept
images, so a champion hot-swap invalidates nothing the caller holds.

The cache is bounded twice: `max_bytes` over all entries (the images plus every
preparation), least recently used out first, and `ttl_s` since an entry's last use.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fewshot.methods.base import Prepared, tensors


def support_id(images: Sequence[bytes], labels: Sequence[str]) -> str:
    """The content hash of a support set: the same images with the same labels, in the
    same order, give the same id."""
    digest = hashlib.sha256()
    for label, image in zip(labels, images, strict=True):
        encoded = label.encode()
        for part in (encoded, image):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return f"s-{digest.hexdigest()[:32]}"


@dataclass
class Entry:
    images: list[bytes]
    labels: list[str]
    classes: list[str]
    prepared: dict[str, Prepared] = field(default_factory=dict)  # by model version
    used: float = 0.0

    def size(self) -> int:
        kept = (t for p in self.prepared.values() for t in tensors(p))
        return sum(map(len, self.images)) + sum(t.numel() * t.element_size() for t in kept)


class SupportCache:
    """Entries by support id, bounded in bytes (LRU) and in idle time (TTL).

    `entries` is ordered by last use, oldest first, so both bounds only ever remove from
    its front; `total` is the entries' bytes, kept as they change."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes, self.ttl_s, self.clock = max_bytes, ttl_s, clock
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.total = 0

    def put(self, key: str, entry: Entry) -> None:
        """Store (or replace) `entry`, then evict least recently used ones past the bound."""
        if key in self.entries:
            self.total -= self.entries.pop(key).size()
        entry.used = self.clock()
        self.entries[key] = entry
        self.total += entry.size()
        self._evict()

    def add_prepared(self, key: str, version: str, prepared: Prepared) -> None:
        """Another version's preparation of an entry that is still here."""
        entry = self.entries.get(key)
        if entry is not None:
            self.total -= entry.size()
            entry.prepared[version] = prepared
            self.total += entry.size()
            self._evict()

    def get(self, key: str) -> Entry | None:
        """The entry, marked used; None when unknown, expired or evicted."""
        self._expire()
        entry = self.entries.get(key)
        if entry is not None:
            entry.used = self.clock()
            self.entries.move_to_end(key)
        return entry

    def bytes(self) -> int:
        return self.total

    def _expire(self) -> None:
        now = self.clock()
        while self.entries and now - next(iter(self.entries.values())).used > self.ttl_s:
            self._drop_oldest()

    def _evict(self) -> None:
        self._expire()
        while self.entries and self.total > self.max_bytes:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self.total -= self.entries.popitem(last=False)[1].size()
