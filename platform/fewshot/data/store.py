"""The on-disk dataset store: one directory per dataset.

    DIR/manifest.json               name, image shape, channels, normalisation,
                                    splits with class and image counts, source checksum
    DIR/split=NAME/part-00000.parquet   label:int32, class_name:string, group:string,
                                        image:binary (encoded PNG or JPEG)

A store is built in a hidden sibling directory and renamed into place only once
its manifest is written, so a directory with a manifest is always complete and
an interrupted conversion leaves nothing that looks done. Converting the same
source twice is a no-op (the source checksum is in the manifest).

This module writes stores and owns their layout and manifest; loading a split's images
is data/reader.py, and decoding an image data/decode.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fewshot.data.decode import decode_image
from fewshot.errors import DataError
from fewshot.safety import remove_inside

MANIFEST = "manifest.json"
STORE_VERSION = 1
ROWS_PER_PART = 4096
SCHEMA = pa.schema(
    [
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("group", pa.string()),
        ("image", pa.binary()),
    ]
)


@dataclass(frozen=True)
class Example:
    """One image as a converter yields it."""

    class_name: str
    group: str
    image: bytes  # encoded PNG or JPEG


@dataclass
class SourceInfo:
    """What a converter knows about its dataset beyond the images."""

    name: str
    source: str  # converter name, e.g. "omniglot"
    checksum: str  # sha256 of the raw input, decides idempotence
    channels: int
    image_shape: tuple[int, int]
    invert: bool = False  # dark strokes on white paper: invert so ink is high
    partial: bool = False
    extra: dict = field(default_factory=dict)


def sha256_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def split_directory(root: Path, split: str) -> Path:
    """Where split `split` of the store at `root` keeps its parquet parts."""
    return root / f"split={split}"


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = "it is not a prepared dataset" if root.exists() else "it does not exist"
        raise DataError(f"dataset {root}: {hint}; run `fewshot data prepare ...` first")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSON or UTF-8 errors are ValueErrors
        raise DataError(
            f"{path}: not a readable manifest ({type(exc).__name__}); the store is "
            "corrupt, prepare it again with --overwrite"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not a dataset manifest; prepare the store again with --overwrite")
    return manifest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Delete what conversions into `out` that were killed left behind (a staging or
    swapped-out directory whose process is gone); a running conversion's is kept."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = stale.name.removeprefix(f".{out.name}.").partition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            remove_inside(stale, out.parent)


def check_out(out: Path) -> None:
    """Refuse an `out` that is a file or lies under one: a store cannot be written there."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "" if path == out else f"{path} "
                raise DataError(
                    f"--out {out}: {what}is a file, not a directory; choose another --out"
                )
            return


def existing_store(out: Path, checksum: str, overwrite: bool) -> bool:
    """True when `out` already holds this source; refuses to clobber another one. Every
    conversion starts here, so it also clears what killed ones left."""
    check_out(out)
    remove_stale_staging(out)
    if not out.exists():
        return False
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()):
            raise DataError(f"{out} exists and is not a dataset; choose another --out")
        out.rmdir()
        return False
    if read_manifest(out).get("source_checksum") == checksum and not overwrite:
        return True
    if not overwrite:
        raise DataError(
            f"{out} holds a dataset from another source; pass --overwrite or choose another --out"
        )
    return False


def write_store(
    out: str | Path,
    info: SourceInfo,
    splits: dict[str, Iterable[Example]],
    overwrite: bool = False,
) -> dict:
    """Write `splits` to `out` atomically and return the manifest.

    Labels are 0..C-1 per split in sorted class-name order, so the same source
    always gives the same labels.
    """
    out = Path(out)
    if existing_store(out, info.checksum, overwrite):
        return read_manifest(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        rows = {name: list(examples) for name, examples in splits.items()}
        split_meta = {
            name: _write_split(staging, name, examples) for name, examples in rows.items()
        }
        mean, std = _normalisation([e for split in rows.values() for e in split], info)
        manifest = {
            "name": info.name,
            "source": info.source,
            "store_version": STORE_VERSION,
            "source_checksum": info.checksum,
            "channels": info.channels,
            "image_shape": list(info.image_shape),
            "normalisation": {"mean": mean, "std": std},
            "invert": info.invert,
            "partial": info.partial,
            "splits": split_meta,
            **info.extra,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():  # --overwrite: swap, never leaving `out` half-written
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_split(root: Path, split: str, examples: Iterable[Example]) -> dict:
    rows = sorted(examples, key=lambda e: e.class_name)  # stable: keeps file order per class
    if not rows:
        raise DataError(f"split {split} has no images; check the source")
    classes = sorted({e.class_name for e in rows})
    label_of = {name: i for i, name in enumerate(classes)}
    directory = split_directory(root, split)
    directory.mkdir(parents=True)
    for part, start in enumerate(range(0, len(rows), ROWS_PER_PART)):
        chunk = rows[start : start + ROWS_PER_PART]
        table = pa.table(
            {
                "label": [label_of[e.class_name] for e in chunk],
                "class_name": [e.class_name for e in chunk],
                "group": [e.group for e in chunk],
                "image": [e.image for e in chunk],
            },
            schema=SCHEMA,
        )
        pq.write_table(table, directory / f"part-{part:05d}.parquet")
    per_class = np.bincount([label_of[e.class_name] for e in rows])
    return {
        "classes": len(classes),
        "images": len(rows),
        "groups": len({e.group for e in rows}),
        "min_images_per_class": int(per_class.min()),
    }


def _normalisation(examples: list[Example], info: SourceInfo) -> tuple[list, list]:
    """Per-channel mean and std in [0, 1] after inversion, from up to 512 images spread
    over all splits, decoded at 64 px. Approximate at other resolutions (resizing changes
    the std a little), which the batch-norm of every backbone absorbs."""
    step = max(1, len(examples) // 512)
    pixels = (
        np.stack(
            [decode_image(e.image, 64, info.channels, info.invert) for e in examples[::step]]
        ).astype(np.float64)
        / 255.0
    )
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3)) + 1e-6
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]
