"""tieredImageNet (Ren et al. 2018): 351/97/160 classes in 20/6/8 super-categories.

Two forms on disk:

- the original release: `DIR/{split}_images_png.pkl`, a list of encoded PNGs
  (uint8 arrays or bytes), and `DIR/{split}_labels.pkl`, a dict with
  `label_specific` and `label_general` (per image) and `label_specific_str` and
  `label_general_str` (their names). PNGs are stored as they are.
- a folder tree `ROOT/{train,val,test}/class/image`, or, with the super-categories,
  `ROOT/{split}/category/class/image` (found by its depth).

A class is its wnid (`label_specific_str`); its group is its super-category
(`label_general_str`), so within-group episodes are the hard, fine-grained ones.
A tree without the category level has no groups: each class is its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fewshot.data.decode import check_image
from fewshot.data.sources.common import (
    SPLIT_NAMES,
    Release,
    check_release,
    checksum,
    convert,
    encoded_file,
    image_files,
    load_pickle,
    names,
    require_file,
    require_keys,
)
from fewshot.data.store import Example, SourceInfo
from fewshot.errors import DataError

KNOWN = {
    "train": Release(351, groups=20, images=448_695),
    "val": Release(97, groups=6, images=124_261),
    "test": Release(160, groups=8, images=206_209),
}
LABEL_KEYS = ("label_specific", "label_general", "label_specific_str", "label_general_str")
PICKLE_HINT = "pass --from-pickles DIR holding {split}_images_png.pkl and {split}_labels.pkl"


def read_pickles(directory: Path, split: str) -> list[Example]:
    images_path = Path(directory) / f"{split}_images_png.pkl"
    labels_path = Path(directory) / f"{split}_labels.pkl"
    labels = load_pickle(labels_path, PICKLE_HINT)
    require_keys(labels, LABEL_KEYS, labels_path, "a tieredImageNet labels pickle")
    images = load_pickle(images_path, PICKLE_HINT)
    if not isinstance(images, list | tuple | np.ndarray):
        raise DataError(
            f"{images_path}: holds a {type(images).__name__}, not a list of encoded PNGs; "
            "is it a tieredImageNet images pickle?"
        )
    specific = np.asarray(labels["label_specific"]).astype(np.int64)
    general = np.asarray(labels["label_general"]).astype(np.int64)
    specific_str, general_str = (
        names(labels["label_specific_str"]),
        names(labels["label_general_str"]),
    )
    if not len(images) == len(specific) == len(general):
        raise DataError(
            f"{images_path}: {len(images)} images but {len(specific)} labels in "
            f"{labels_path.name}; one of them is truncated, copy both again"
        )
    for key, values, table in (
        ("label_specific", specific, specific_str),
        ("label_general", general, general_str),
    ):
        if len(values) and not (values.min() >= 0 and values.max() < len(table)):
            raise DataError(
                f"{labels_path}: {key} goes up to {values.max()} but {key}_str has "
                f"{len(table)} names; copy it again"
            )
    examples = []
    for index, item in enumerate(images):
        data = bytes(np.asarray(item, dtype=np.uint8)) if not isinstance(item, bytes) else item
        check_image(data, f"{images_path}[{index}]")
        examples.append(Example(specific_str[specific[index]], general_str[general[index]], data))
    return examples


def read_tree(split_dir: Path) -> tuple[list[Example], bool]:
    """(examples, whether the tree has the category level)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is not a folder; pass --root DIR holding train/, val/, test/")
    top = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not top:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/class/image")
    grouped = not image_files(top[0]) and any(p.is_dir() for p in top[0].iterdir())
    classes = (
        [(c, g.name) for g in top for c in sorted(p for p in g.iterdir() if p.is_dir())]
        if grouped
        else [(c, c.name) for c in top]
    )
    examples = []
    for directory, group in classes:
        files = image_files(directory)
        if not files:
            raise DataError(f"class folder {directory} holds no images; remove it or add images")
        examples.extend(Example(directory.name, group, encoded_file(p)) for p in files)
    return examples, grouped


def prepare(
    out: Path,
    *,
    pickles: Path | None = None,
    root: Path | None = None,
    partial: bool = False,
    overwrite: bool = False,
) -> dict:
    if (pickles is None) == (root is None):
        raise DataError("give one of --from-pickles DIR or --root DIR (a split/class/image tree)")
    if pickles is not None:
        files = [
            require_file(Path(pickles) / f"{split}_{kind}.pkl", PICKLE_HINT)
            for split in SPLIT_NAMES
            for kind in ("images_png", "labels")
        ]
    else:
        for split in SPLIT_NAMES:
            if not (Path(root) / split).is_dir():
                raise DataError(
                    f"{Path(root) / split} is not a folder; pass --root DIR holding train/, val/, "
                    "test/"
                )
        files = sorted(p for p in Path(root).rglob("*") if p.is_file())

    def read() -> dict[str, list[Example]]:
        grouped = True  # a tree without the category level has no groups to check
        if pickles is not None:
            splits = {split: read_pickles(pickles, split) for split in SPLIT_NAMES}
        else:
            trees = {split: read_tree(Path(root) / split) for split in SPLIT_NAMES}
            splits = {split: examples for split, (examples, _) in trees.items()}
            grouped = all(g for _, g in trees.values())
        check_release(str(pickles or root), splits, KNOWN, partial=partial, check_groups=grouped)
        return splits

    form = "pickles" if pickles is not None else "tree"
    info = SourceInfo(
        name="tiered-imagenet",
        source="tiered-imagenet",
        checksum=checksum(files, form=form, partial=partial),
        channels=3,
        image_shape=(84, 84),
        partial=partial,
        extra={"form": form},
    )
    return convert(out, info, read, overwrite)
