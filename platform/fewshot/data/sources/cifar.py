"""CIFAR-FS and FC100 from CIFAR-100's python files, as torchvision reads them.

    ROOT/cifar-100-python/train, test   pickled dicts: `data` uint8 [N, 3072] (RGB planes
                                        of 32x32), `fine_labels`, `coarse_labels`
    ROOT/cifar-100-python/meta          `fine_label_names`, `coarse_label_names`

Both use all 600 images of a class (train and test files together); they differ in
how classes are split, by the published lists kept in `splits/`:
- CIFAR-FS (Bertinetto et al. 2019): 64/16/20 fine classes, chosen at random.
- FC100 (Oreshkin et al. 2018): 12/4/4 whole superclasses (60/20/20 classes), so
  test classes share no superclass with training ones.
A class's group is its CIFAR-100 superclass. Images are stored as PNG (lossless).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fewshot.data.sources.common import (
    SPLIT_NAMES,
    Release,
    check_release,
    checksum,
    convert,
    load_pickle,
    names,
    package_json,
    png,
    require_keys,
)
from fewshot.data.store import Example, SourceInfo
from fewshot.errors import DataError

FOLDER = "cifar-100-python"
HINT = f"pass --root DIR holding {FOLDER}/ (or --download)"
KNOWN = {
    "cifar-fs": {
        "train": Release(64, images_per_class=600),
        "val": Release(16, images_per_class=600),
        "test": Release(20, images_per_class=600),
    },
    "fc100": {
        "train": Release(60, groups=12, images_per_class=600),
        "val": Release(20, groups=4, images_per_class=600),
        "test": Release(20, groups=4, images_per_class=600),
    },
}


def superclass_of() -> dict[str, str]:
    """CIFAR-100 fine class -> its superclass."""
    hierarchy = package_json("cifar100.json")["superclasses"]
    return {fine: coarse for coarse, classes in hierarchy.items() for fine in classes}


def class_splits(variant: str) -> dict[str, str]:
    """fine class -> split, from the published lists."""
    if variant == "cifar-fs":
        lists = package_json("cifar_fs.json")
        return {c: split for split in SPLIT_NAMES for c in lists[split]}
    lists = package_json("fc100.json")
    split_of_super = {s: split for split in SPLIT_NAMES for s in lists[split]}
    return {fine: split_of_super[coarse] for fine, coarse in superclass_of().items()}


def find_root(root: Path) -> Path:
    root = Path(root)
    return root if root.name == FOLDER else root / FOLDER


def read_cifar100(folder: Path) -> list[Example]:
    """All 60,000 images, each with its fine class and superclass names."""
    meta_path = folder / "meta"
    meta = load_pickle(meta_path, HINT)
    require_keys(meta, ("fine_label_names", "coarse_label_names"), meta_path, "CIFAR-100's meta")
    fine_names, coarse_names = names(meta["fine_label_names"]), names(meta["coarse_label_names"])
    expected = superclass_of()
    for name in fine_names:
        if name not in expected:
            raise DataError(f"{meta_path}: {name!r} is not a CIFAR-100 class; is it CIFAR-10's?")
    examples: list[Example] = []
    for part in ("train", "test"):
        path = folder / part
        entry = load_pickle(path, HINT)
        require_keys(entry, ("data", "fine_labels", "coarse_labels"), path, "a CIFAR-100 file")
        data, fine, coarse = entry["data"], entry["fine_labels"], entry["coarse_labels"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
            raise DataError(
                f"{path}: data is {getattr(data, 'dtype', type(data).__name__)} "
                f"{list(getattr(data, 'shape', []))}, expected uint8 [N, 3072]; copy it again"
            )
        if not len(data) == len(fine) == len(coarse):
            raise DataError(
                f"{path}: {len(data)} images but {len(fine)} fine and {len(coarse)} coarse "
                "labels; the file is truncated, copy it again"
            )
        pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, f, c in zip(pixels, fine, coarse, strict=True):
            name, group = fine_names[f], coarse_names[c]
            if expected[name] != group:
                raise DataError(
                    f"{path}: {name!r} is labelled with superclass {group!r}, CIFAR-100 has "
                    f"{expected[name]!r}; the copy is mislabelled, copy it again"
                )
            examples.append(Example(name, group, png(image)))
    return examples


def download(root: Path) -> None:
    """Fetch CIFAR-100's python version through torchvision (needs internet)."""
    from torchvision.datasets import CIFAR100

    CIFAR100(str(root), download=True)


def prepare(
    variant: str,
    root: Path,
    out: Path,
    *,
    partial: bool = False,
    overwrite: bool = False,
) -> dict:
    if variant not in KNOWN:
        raise DataError(f"unknown CIFAR variant {variant!r}; use one of {sorted(KNOWN)}")
    folder = find_root(root)
    files = [folder / name for name in ("meta", "train", "test")]
    for path in files:
        if not path.is_file():
            raise DataError(f"{path} does not exist; {HINT}")
    split_of = class_splits(variant)

    def read() -> dict[str, list[Example]]:
        splits: dict[str, list[Example]] = {split: [] for split in SPLIT_NAMES}
        for example in read_cifar100(folder):
            splits[split_of[example.class_name]].append(example)
        check_release(str(folder), splits, KNOWN[variant], partial=partial)
        return splits

    info = SourceInfo(
        name=variant,
        source=variant,
        checksum=checksum(files, variant=variant, partial=partial),
        channels=3,
        image_shape=(32, 32),
        partial=partial,
    )
    return convert(out, info, read, overwrite)
