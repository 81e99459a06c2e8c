"""miniImageNet (Vinyals et al.), the Ravi & Larochelle split: 64/16/20 classes of 600.

Two forms on disk:

- split files: `DIR/{train,val,test}.csv` with header `filename,label` (e.g.
  `n0153282900000005.jpg,n01532829`) and the images in one folder; files are
  stored as they are (JPEG), resized only when a split is loaded.
- pickle caches: `DIR/mini-imagenet-cache-{train,val,test}.pkl`, each a dict with
  `image_data` (uint8 [N, 84, 84, 3]) and `class_dict` (wnid -> image indices);
  images are stored as PNG, so pixels round-trip.

A class is its wnid; miniImageNet has no super-categories, so its group is the
class itself (as for an ungrouped folder tree).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fewshot.data.sources.common import (
    SPLIT_NAMES,
    Release,
    check_release,
    checksum,
    convert,
    encoded_file,
    load_pickle,
    png,
    require_file,
    require_keys,
)
from fewshot.data.store import Example, SourceInfo
from fewshot.errors import DataError

KNOWN = {
    "train": Release(64, images_per_class=600),
    "val": Release(16, images_per_class=600),
    "test": Release(20, images_per_class=600),
}
IMAGE_SHAPE = (84, 84, 3)
CSV_HEADER = ["filename", "label"]


def cache_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"mini-imagenet-cache-{split}.pkl"


def read_cache(path: Path) -> list[Example]:
    cache = load_pickle(path, "pass --from-pickles DIR holding mini-imagenet-cache-*.pkl")
    require_keys(cache, ("image_data", "class_dict"), path, "a mini-imagenet cache")
    images, class_dict = cache["image_data"], cache["class_dict"]
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.shape[1:] != IMAGE_SHAPE
    ):
        shape = getattr(images, "shape", None)
        raise DataError(
            f"{path}: image_data is {type(images).__name__} {getattr(images, 'dtype', '')} "
            f"{list(shape) if shape is not None else ''}, expected uint8 [N, 84, 84, 3]; "
            "is it a mini-imagenet cache?"
        )
    if not isinstance(class_dict, dict):
        raise DataError(f"{path}: class_dict is not a dict of wnid -> indices; copy it again")
    seen: dict[int, str] = {}
    examples = []
    for wnid in sorted(class_dict):
        for index in (int(i) for i in class_dict[wnid]):
            if not 0 <= index < len(images):
                raise DataError(
                    f"{path}: class_dict[{wnid!r}] points at image {index} of {len(images)}; "
                    "the cache is truncated, copy it again"
                )
            if seen.setdefault(index, wnid) != wnid:
                raise DataError(
                    f"{path}: image {index} is in both {seen[index]!r} and {wnid!r}; copy it again"
                )
            examples.append(Example(str(wnid), str(wnid), png(images[index])))
    return examples


def read_csv(csv_path: Path, images: Path) -> list[Example]:
    require_file(csv_path, "pass --from-csv DIR holding train.csv, val.csv and test.csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] != CSV_HEADER:
        raise DataError(
            f"{csv_path}: header {rows[0] if rows else []}, expected {CSV_HEADER}; "
            "is it a Ravi & Larochelle split file?"
        )
    examples = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise DataError(f"{csv_path}:{line}: {row} is not `filename,label`; fix or remove it")
        filename, wnid = row
        path = images / filename
        require_file(path, f"named at {csv_path}:{line}; pass --images DIR holding all images")
        examples.append(Example(wnid, wnid, encoded_file(path)))
    return examples


def prepare(
    out: Path,
    *,
    pickles: Path | None = None,
    csv_dir: Path | None = None,
    images: Path | None = None,
    partial: bool = False,
    overwrite: bool = False,
) -> dict:
    if (pickles is None) == (csv_dir is None):
        raise DataError("give one of --from-pickles DIR or --from-csv DIR (with --images DIR)")
    if pickles is not None:
        hint = "pass --from-pickles DIR holding mini-imagenet-cache-{train,val,test}.pkl"
        inputs = {s: require_file(cache_path(pickles, s), hint) for s in SPLIT_NAMES}
        files = list(inputs.values())

        def read_split(split: str) -> list[Example]:
            return read_cache(inputs[split])
    else:
        images = Path(images if images is not None else Path(csv_dir) / "images")
        if not images.is_dir():
            raise DataError(f"{images} is not a folder; pass --images DIR holding the images")
        hint = "pass --from-csv DIR holding train.csv, val.csv and test.csv"
        inputs = {s: require_file(Path(csv_dir) / f"{s}.csv", hint) for s in SPLIT_NAMES}
        files = [*inputs.values(), *sorted(p for p in images.iterdir() if p.is_file())]

        def read_split(split: str) -> list[Example]:
            return read_csv(inputs[split], images)

    def read() -> dict[str, list[Example]]:
        splits = {split: read_split(split) for split in SPLIT_NAMES}
        check_release(str(pickles or csv_dir), splits, KNOWN, partial=partial)
        return splits

    info = SourceInfo(
        name="mini-imagenet",
        source="mini-imagenet",
        checksum=checksum(files, form="pickles" if pickles else "csv", partial=partial),
        channels=3,
        image_shape=IMAGE_SHAPE[:2],
        partial=partial,
        extra={"form": "pickles" if pickles else "csv"},
    )
    return convert(out, info, read, overwrite)
