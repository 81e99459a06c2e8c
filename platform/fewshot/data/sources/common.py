"""What the converters of published releases share.

Reading a release's pickles without running code from them, encoding pixel arrays,
checking a copy against the release's known numbers (so a partial or mislabelled
copy is refused with one line, unless `--partial` lets a smaller one through), and
converting only when the store does not already hold the same source.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewshot.data.decode import check_image, check_size, eight_bit
from fewshot.data.store import (
    Example,
    SourceInfo,
    existing_store,
    read_manifest,
    sha256_files,
    write_store,
)
from fewshot.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PARTIAL_HINT = "the copy is partial or mislabelled (pass --partial to accept a smaller copy)"

# What a release pickle may build: numpy arrays and plain containers, nothing that runs code.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
}


def _bytearray(*args: Any) -> bytearray:
    """bytearray of the bytes in the file only: bytearray(n) would allocate n bytes that
    the file does not hold (bytearray(10**15) is a MemoryError, or the machine's memory)."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError(f"it asks for bytearray({args[0]}), not data it holds")
    return bytearray(*args)


class _ReleaseUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, not only arrays")
        if (module, name) == ("builtins", "bytearray"):
            return _bytearray
        return super().find_class(module, name)


def require_file(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} does not exist; {hint}")
    return path


def load_pickle(path: Path, hint: str) -> Any:
    """A release pickle (Python 2 ones included), refusing anything but arrays and
    containers; bytes keys of dicts become str."""
    require_file(path, hint)
    try:
        with open(path, "rb") as handle:
            data = _ReleaseUnpickler(handle, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        MemoryError,
    ) as exc:
        raise DataError(
            f"{path}: not a readable release pickle ({exc}); it is truncated or corrupt, "
            "copy it again"
        ) from None
    return _str_keys(data)


def _str_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}
    return data


def require_keys(data: Any, keys: Iterable[str], path: Path, what: str) -> None:
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}, not a dict; is it {what}?")
    for key in keys:
        if key not in data:
            raise DataError(f"{path}: no key {key!r} (it has {sorted(data)}); is it {what}?")


def names(values: Iterable[Any]) -> list[str]:
    """Class names as a release pickled them (str, or bytes from Python 2)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def encoded_file(path: Path) -> bytes:
    """An image file's bytes: PNG and JPEG as they are, other formats re-encoded to an
    8-bit PNG of the same picture (`eight_bit`: a PNG holds no CMYK, float or 32-bit
    pixels), which decodes to the pixels the original would."""
    check_size(path.stat().st_size, str(path))
    data = path.read_bytes()
    check_image(data, str(path))
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return data
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        eight_bit(image).save(buffer, format="PNG")
        return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes (lossless: pixels round-trip)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def package_json(name: str) -> Any:
    """A data file shipped in fewshot/data/sources/splits/, e.g. published class lists."""
    return json.loads(resources.files("fewshot.data.sources").joinpath("splits", name).read_text())


@dataclass(frozen=True)
class Release:
    """The known numbers of one split of a published release (None: not checked)."""

    classes: int
    groups: int | None = None
    images: int | None = None
    images_per_class: int | None = None


def check_release(
    where: str,
    splits: Mapping[str, list[Example]],
    known: Mapping[str, Release],
    *,
    partial: bool,
    check_groups: bool = True,
) -> None:
    """Refuse a copy whose splits overlap, and (unless partial) one that misses a split
    or whose counts differ from the release's."""
    owner: dict[str, str] = {}
    for split, examples in splits.items():
        for name in {e.class_name for e in examples}:
            if owner.setdefault(name, split) != split:
                raise DataError(
                    f"{where}: class {name!r} is in both {owner[name]} and {split}; the split "
                    "files are mislabelled, use the release's own"
                )
    for split, expected in known.items():
        examples = splits.get(split, [])
        if not examples:
            raise DataError(f"{where}: split {split} has no images; {PARTIAL_HINT}")
        if partial:
            continue
        counts: dict[str, int] = {}
        for e in examples:
            counts[e.class_name] = counts.get(e.class_name, 0) + 1
        found = {
            "classes": (len(counts), expected.classes),
            "groups": (len({e.group for e in examples}), expected.groups if check_groups else None),
            "images": (len(examples), expected.images),
        }
        for what, (have, want) in found.items():
            if want is not None and have != want:
                raise DataError(
                    f"{where}: split {split} has {have} {what}, the release {want}; {PARTIAL_HINT}"
                )
        per_class = expected.images_per_class
        short = sorted(name for name, n in counts.items() if per_class and n != per_class)
        if short:
            raise DataError(
                f"{where}: class {short[0]!r} of {split} has {counts[short[0]]} images, the "
                f"release {per_class}; {PARTIAL_HINT}"
            )


def checksum(paths: Iterable[Path], **settings: Any) -> str:
    """sha256 of the input files and of the settings that change the store."""
    recipe = json.dumps(settings, sort_keys=True, default=str)
    return sha256_files(paths) + "-" + hashlib.sha256(recipe.encode()).hexdigest()[:16]


def convert(
    out: str | Path,
    info: SourceInfo,
    read: Callable[[], dict[str, list[Example]]],
    overwrite: bool,
) -> dict:
    """`read()` and write the store, unless `out` already holds this very source."""
    if existing_store(Path(out), info.checksum, overwrite):  # reading is the slow part
        return read_manifest(out)
    return write_store(out, info, read(), overwrite=overwrite)
