"""A run's training and validation images, loaded once per process (or once per node
and shared through Ray's object store), as the config's data section asks.

Whether images are decoded up front or per episode (`decode_mode`) follows from the
decoded size of the splits against a memory budget; the classes kept are chosen by
data/selection.py, and rotations added by augment/images.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from fewshot.augment.images import rotated_classes
from fewshot.config import Config
from fewshot.data.reader import ImageSet, choose_decode, decoded_bytes, load_split
from fewshot.data.selection import choose_train_classes, hold_out_groups


def memory_budget(config: Config, cap: float | None = None) -> float:
    """Bytes that decoded images may take: `data.memory_budget_gb`, else half the memory
    available now, at most `cap` (the caller's limit, e.g. Ray's object store)."""
    if config.data.memory_budget_gb is not None:
        return config.data.memory_budget_gb * 1e9
    budget = 0.5 * psutil.virtual_memory().available
    return budget if cap is None else min(budget, cap)


def decode_mode(config: Config, cap: float | None = None) -> str:
    """`data.decode` with auto resolved: "memory" when the decoded train and validation
    images fit in `memory_budget`, else "episode" (reader.choose_decode)."""
    d = config.data
    if d.decode != "auto":
        return d.decode
    splits = d.train_split + ([d.val_split] if d.val_split else [])
    needed = decoded_bytes(d.path, splits, d.image_size)
    return choose_decode("auto", needed, memory_budget(config, cap))


@dataclass
class Datasets:
    """The images a worker trains on, and validates on (None without validation)."""

    train: ImageSet
    val: ImageSet | None

    @classmethod
    def load(cls, config: Config, cap: float | None = None) -> Datasets:
        """Read the splits of `config`, decoded or encoded as `decode_mode` says."""
        d = config.data
        mode = decode_mode(config, cap)
        train = load_split(d.path, d.train_split, d.image_size, mode)
        val = load_split(d.path, d.val_split, d.image_size, mode) if d.val_split else None
        if d.val_groups:
            train, val = hold_out_groups(train, d.val_groups, config.seed, d.train_split)
        if d.train_classes:
            train = train.take_classes(
                choose_train_classes(train, d.train_classes, config.seed, d.train_split)
            )
        if config.augment.rotations:
            train = rotated_classes(train)
        return cls(train, val)

    def shared(self) -> dict:
        """Numpy arrays and plain values for `ray.put` (see `ImageSet.shared`)."""
        return {"train": self.train.shared(), "val": self.val and self.val.shared()}

    @classmethod
    def from_shared(cls, tree: dict) -> Datasets:
        """The inverse of `shared`, over the same (object store) memory."""
        val = tree["val"] and ImageSet.from_shared(tree["val"])
        return cls(ImageSet.from_shared(tree["train"]), val)
