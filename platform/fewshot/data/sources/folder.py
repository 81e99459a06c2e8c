"""Any image folder tree: `ROOT/class/image` or, grouped, `ROOT/group/class/image`.

Classes (or, with `split_by_group`, whole groups) are shuffled with a fixed seed
and cut into splits by `ratios`, so base and novel classes never overlap and
the same tree always gives the same splits. PNG and JPEG files are stored as
they are; other formats are re-encoded to PNG.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from fewshot.data.sources.common import SPLIT_NAMES, encoded_file, image_files
from fewshot.data.store import Example, SourceInfo, sha256_files, write_store
from fewshot.errors import DataError


def _classes(root: Path, split_by_group: bool) -> list[tuple[str, str, Path]]:
    """(class name, group, directory) for every class folder."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subdirs:
        raise DataError(f"{root} has no class folders; expected ROOT/class/image files")
    if not split_by_group:
        return [(d.name, d.name, d) for d in subdirs]
    classes = []
    for group in subdirs:
        inner = sorted(p for p in group.iterdir() if p.is_dir())
        if not inner:
            raise DataError(
                f"{group} has no class folders; --split-by-group expects ROOT/group/class/image"
            )
        classes.extend((f"{group.name}/{d.name}", group.name, d) for d in inner)
    return classes


def _assign(units: list[str], ratios: tuple[float, ...], seed: int) -> dict[str, str]:
    """unit (class or group) -> split name, by shuffled ratio cut."""
    if len(units) < len(ratios):
        raise DataError(
            f"{len(units)} classes/groups cannot fill {len(ratios)} splits; "
            "add classes or pass fewer --ratios"
        )
    shuffled = units[:]
    random.Random(seed).shuffle(shuffled)
    total = sum(ratios)
    bounds, acc = [], 0.0
    for ratio in ratios:
        acc += ratio / total
        bounds.append(round(acc * len(shuffled)))
    out, start = {}, 0
    for name, end in zip(SPLIT_NAMES, bounds, strict=False):
        end = max(end, start + 1)  # every split gets at least one unit
        for unit in shuffled[start:end]:
            out[unit] = name
        start = end
    return out


def prepare(
    root: Path,
    out: Path,
    *,
    ratios: tuple[float, ...] = (0.64, 0.16, 0.2),
    split_by_group: bool = False,
    channels: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass --root DIR holding class folders")
    if not 1 <= len(ratios) <= 3 or any(r <= 0 for r in ratios):
        raise DataError(f"--ratios {ratios}: give 1 to 3 positive numbers (train,val,test)")
    classes = _classes(root, split_by_group)
    files = {name: image_files(directory) for name, _, directory in classes}
    for name, _, directory in classes:
        if not files[name]:
            raise DataError(f"class folder {directory} holds no images; remove it or add images")
    units = (
        sorted({group for _, group, _ in classes})
        if split_by_group
        else [name for name, _, _ in classes]
    )
    split_of = _assign(units, ratios, seed)
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES[: len(ratios)]}
    for name, group, _ in classes:
        split = split_of[group if split_by_group else name]
        splits[split].extend(Example(name, group, encoded_file(p)) for p in files[name])
    all_files = [p for name, _, _ in classes for p in files[name]]
    with Image.open(all_files[0]) as first:
        shape = (first.height, first.width)
    info = SourceInfo(
        name=root.name,
        source="folder",
        checksum=sha256_files(all_files) + f"-{ratios}-{split_by_group}-{seed}-{channels}",
        channels=channels,
        image_shape=shape,
        extra={"ratios": list(ratios), "split_by_group": split_by_group, "split_seed": seed},
    )
    return write_store(out, info, splits, overwrite=overwrite)
