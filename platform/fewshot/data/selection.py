"""Which classes of the train split a run trains on and validates on.

Pure functions of (ImageSet, setting, seed): the same seed always picks the same classes,
on every worker, so workers that each load the data agree without talking.

- `choose_train_classes`: the base classes to train on (data.train_classes), a number
  drawn with the seed or a list of names;
- `hold_out_groups`: validation classes held out of the train split, whole groups
  apart (data.val_groups), drawn from their own stream `Stream.HOLD_OUT`;
- `leave_groups_out`: the folds of leave-groups-out cross-validation (`fewshot bench
  omniglot` with `folds:`), each group held out exactly once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from fewshot.data.reader import ImageSet
from fewshot.errors import DataError
from fewshot.streams import Stream


def choose_train_classes(
    images: ImageSet, wanted: int | list[str], seed: int, split: list[str]
) -> list[int]:
    """The labels of the base classes to train on: `wanted` of them drawn with `seed`, or
    the classes named in `wanted` (data.train_classes)."""
    if isinstance(wanted, list):
        index = {name: label for label, name in enumerate(images.class_names)}
        unknown = [name for name in wanted if name not in index]
        if unknown:
            raise DataError(
                f"data.train_classes: {unknown[0]!r} is not a training class of {split} (it has "
                f"{images.n_classes}, e.g. {images.class_names[:3]}); check the name with "
                "`fewshot data info` or the run's train_classes.json"
            )
        return sorted(index[name] for name in wanted)
    if wanted > images.n_classes:
        raise DataError(
            f"data.train_classes: {wanted} but {split} has {images.n_classes} classes; lower it "
            "or unset it"
        )
    chosen = np.random.default_rng(seed).choice(images.n_classes, wanted, replace=False)
    return sorted(chosen.tolist())


def hold_out_groups(
    images: ImageSet, count: int, seed: int, split: list[str]
) -> tuple[ImageSet, ImageSet]:
    """(the classes of all but `count` groups, the classes of those `count` groups), the
    held-out groups drawn with `seed`: validation classes disjoint from the training
    classes, whole groups apart, as a store's own validation split would be."""
    groups = images.groups()
    if count >= len(groups):
        raise DataError(
            f"data.val_groups: {count} but {split} has {len(groups)} groups; hold out fewer "
            "so that some remain for training"
        )
    names = sorted(groups)
    rng = np.random.default_rng([Stream.HOLD_OUT, seed])
    held = {names[i] for i in rng.choice(len(names), count, replace=False).tolist()}
    val = [c for name in names if name in held for c in groups[name]]
    train = [c for name in names if name not in held for c in groups[name]]
    return images.take_classes(sorted(train)), images.take_classes(sorted(val))


@dataclass(frozen=True)
class Fold:
    """One fold: the groups it tests on, and the class labels it trains and tests on."""

    held_out: list[str]
    train: list[int]
    test: list[int]


def require_distinct_images(images: ImageSet) -> None:
    """Refuse images whose pixels appear under two classes (a character stored twice, as
    an Omniglot store written before `prepare` merged the small sets' shared alphabets
    holds): a held-out class would then be tested on drawings trained on, or a test
    episode would hold one character as two classes."""
    stored = images.images
    if isinstance(stored, torch.Tensor):  # decoded: the pixels
        contents = (row.tobytes() for row in stored.reshape(len(stored), -1).numpy())
    else:  # kept encoded: the file's bytes (the small sets' copies are byte-identical)
        contents = (stored.blobs[start:end].tobytes() for start, end in stored.spans)
    first_class: dict[bytes, int] = {}
    for content, label in zip(contents, images.labels.tolist(), strict=True):
        seen = first_class.setdefault(hashlib.sha1(content).digest(), label)
        if seen != label:
            names = images.class_names
            raise DataError(
                f"the same image is stored under classes {names[seen]!r} and "
                f"{names[label]!r}; prepare the dataset again so that each is stored once "
                "(`fewshot data prepare omniglot` merges the small sets' copies)"
            )


def leave_groups_out(images: ImageSet, folds: int) -> list[Fold]:
    """Leave-groups-out cross-validation over every group of `images`: the groups sorted
    by name, fold f holds out groups f, f + folds, f + 2 * folds, ... and trains on all
    the others. Each group is held out exactly once, and no class of a held-out group is
    trained on. A fixed rule, not a seeded draw, so a fold names the same groups on every
    machine and after the store is prepared again. Omniglot's merged small sets
    (8 alphabets) with 4 folds: (Balinese, Korean), (Early_Aramaic, Latin), (Greek,
    Sanskrit), (Japanese_(katakana), Tagalog)."""
    require_distinct_images(images)
    groups = images.groups()
    if not 2 <= folds <= len(groups):
        raise DataError(
            f"folds: {folds}, but the data has {len(groups)} groups; use 2 to {len(groups)} "
            "folds (each holds out at least one group)"
        )
    names = sorted(groups)
    out = []
    for f in range(folds):
        held = names[f::folds]
        out.append(
            Fold(
                held_out=held,
                train=sorted(c for name in names if name not in held for c in groups[name]),
                test=sorted(c for name in held for c in groups[name]),
            )
        )
    return out
