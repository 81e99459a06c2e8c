"""The on-disk dataset store: one directory per dataset.

    DIR/manifest.json               name, image shape, channels, normalisation,
                                    splits with class and image counts, source checksum
    DIR/split=NAME/part-00000.parquet   label:int32, class_name:string, group:string,
                                        image:binary (encoded PNG or JPEG)

A store is built in a hidden sibling directory and renamed into place only once
its manifest is written, so a directory with a manifest is always complete and
an interrupted conversion leaves nothing that looks done. Converting the same
source twice is a no-op (the source checksum is in the manifest).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

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


def existing_store(out: Path, checksum: str, overwrite: bool) -> bool:
    """True when `out` already holds this source; refuses to clobber another one. Every
    conversion starts here, so it also clears what killed ones left."""
    remove_stale_staging(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a directory; choose another --out")
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
            name: _write_split(staging / f"split={name}", examples)
            for name, examples in rows.items()
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


def _write_split(directory: Path, examples: Iterable[Example]) -> dict:
    rows = sorted(examples, key=lambda e: e.class_name)  # stable: keeps file order per class
    if not rows:
        raise DataError(f"split {directory.name[6:]} has no images; check the source")
    classes = sorted({e.class_name for e in rows})
    label_of = {name: i for i, name in enumerate(classes)}
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


# What PIL raises for bytes that are not a decodable image of a sane size.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, DecompressionBombError)


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open (header only), refusing more pixels than Image.MAX_IMAGE_PIXELS: PIL
    itself only warns below twice that, and the pixels would be decoded. A server lowers
    the limit to its own setting (serve/limits.py)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise DecompressionBombError(
            f"{width}x{height} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} (max_pixels)"
        )
    return image


def check_image(data: bytes, where: str) -> None:
    """Refuse bytes that PIL cannot decode, naming the file: `verify` checks the chunks'
    checksums, `load` decodes the pixels, which a PNG with valid checksums can still fail."""
    try:
        with open_image(data) as image:
            image.verify()
        with open_image(data) as image:
            image.load()
    except IMAGE_ERRORS as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise DataError(f"{where}: not a readable image ({reason}); remove or replace it") from None


# ---------------------------------------------------------------------------------
# Loading: a split as one uint8 tensor decoded up front, or kept encoded and decoded
# per episode (`EncodedImages`) when the decoded set would not fit in memory.

DECODE_THREADS = min(4, os.cpu_count() or 1)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory, never a copy (read-only arrays included)."""
    with warnings.catch_warnings():
        # Read-only arrays come from Ray's object store (shared memory). Nothing here
        # writes to image or label tensors (episodes index them into new tensors), so
        # torch's warning that writing would be undefined does not apply.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(array)


class EncodedImages:
    """A split's images kept encoded, decoded when indexed: what the sampler needs of the
    uint8 tensor [N, C, S, S] (`shape`, `len`, indexing by an index tensor) at the memory
    cost of the PNG/JPEG bytes. Indexing decodes with a small thread pool (PIL releases
    the GIL while it decodes and resizes) through `decode_image`, so the pixels are
    exactly those that `load_split(..., decode="memory")` holds.

    blobs: uint8 [total bytes], every image's encoded bytes back to back
    spans: int64 [N, 2], (start, end) of image i in `blobs`
    """

    def __init__(
        self, blobs: np.ndarray, spans: np.ndarray, size: int, channels: int, invert: bool
    ) -> None:
        self.blobs, self.spans = blobs, spans
        self.size, self.channels, self.invert = size, channels, invert
        self._pool: ThreadPoolExecutor | None = None  # made on first use, never pickled

    @classmethod
    def of(
        cls, columns: list[pa.ChunkedArray], size: int, channels: int, invert: bool
    ) -> EncodedImages:
        """The images of Arrow binary columns, in order. Arrow already holds a column as
        one byte buffer plus offsets, so this copies bytes once and makes no Python
        object per image."""
        blobs, spans, start = [], [], 0
        for column in columns:
            array = column.combine_chunks()
            offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)
            offsets = offsets[array.offset : array.offset + len(array) + 1].astype(np.int64)
            blobs.append(
                np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            )
            offsets += start - offsets[0]
            spans.append(np.stack([offsets[:-1], offsets[1:]], axis=1))
            start = int(offsets[-1])
        return cls(np.concatenate(blobs), np.concatenate(spans), size, channels, invert)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.spans), self.channels, self.size, self.size))

    @property
    def nbytes(self) -> int:
        return self.blobs.nbytes + self.spans.nbytes

    def __len__(self) -> int:
        return len(self.spans)

    def decode(self, i: int) -> np.ndarray:
        start, end = self.spans[i]
        data = self.blobs[start:end].tobytes()
        try:
            return decode_image(data, self.size, self.channels, self.invert)
        except IMAGE_ERRORS as exc:  # a store written before prepare decoded every image
            raise DataError(
                f"image {i} of the loaded split cannot be decoded ({str(exc)[:120]}); "
                "prepare the store again with --overwrite, which names the bad file"
            ) from None

    def _decode_into(self, index: np.ndarray, pool: ThreadPoolExecutor) -> torch.Tensor:
        out = np.empty((len(index), self.channels, self.size, self.size), dtype=np.uint8)

        def put(k: int) -> None:
            out[k] = self.decode(index[k])

        list(pool.map(put, range(len(index))))
        return torch.from_numpy(out)

    def __getitem__(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """index: int64 [B] -> uint8 [B, C, S, S], decoded now."""
        if self._pool is None:  # kept for the next episode: threads are not free to start
            self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
        return self._decode_into(np.asarray(index, dtype=np.int64).reshape(-1), self._pool)

    def decode_all(self) -> torch.Tensor:
        """All images: uint8 [N, C, S, S], decoded straight into one array, so decoding
        peaks at one decoded copy, not a list of images plus their stack."""
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
            return self._decode_into(np.arange(len(self)), pool)

    def subset(self, index: torch.Tensor | np.ndarray) -> EncodedImages:
        """Images `index` only, sharing this one's bytes (no copy of the blobs)."""
        spans = self.spans[np.asarray(index, dtype=np.int64)]
        return EncodedImages(self.blobs, spans, self.size, self.channels, self.invert)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


@dataclass
class ImageSet:
    """A split (or several, concatenated), decoded or encoded.

    images: uint8 [N, C, H, W] at the training resolution, ink high when inverted: a
            tensor (decoded up front) or `EncodedImages` (decoded when indexed)
    labels: int64 [N], 0..C-1
    """

    images: torch.Tensor | EncodedImages
    labels: torch.Tensor
    class_names: list[str]
    class_groups: list[str]
    mean: list[float]
    std: list[float]
    by_class: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        self.by_class = list(torch.split(order, counts))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def groups(self) -> dict[str, list[int]]:
        """group name -> class labels in it."""
        out: dict[str, list[int]] = {}
        for label, group in enumerate(self.class_groups):
            out.setdefault(group, []).append(label)
        return out

    def take_classes(self, labels: list[int]) -> ImageSet:
        """Only the given classes, relabelled 0..len(labels)-1 in that order."""
        keep = torch.cat([self.by_class[c] for c in labels])
        relabel = torch.full((self.n_classes,), -1, dtype=torch.int64)
        relabel[torch.as_tensor(labels)] = torch.arange(len(labels))
        return ImageSet(
            images=self.images.subset(keep) if self.encoded else self.images[keep],
            labels=relabel[self.labels[keep]],
            class_names=[self.class_names[c] for c in labels],
            class_groups=[self.class_groups[c] for c in labels],
            mean=self.mean,
            std=self.std,
        )

    @property
    def encoded(self) -> bool:
        return isinstance(self.images, EncodedImages)

    def shared(self) -> dict:
        """This set as numpy arrays and plain values, for `ray.put`: numpy arrays in Ray's
        object store are read back (`from_shared`) as zero-copy views of shared memory."""
        if self.encoded:
            e = self.images
            pixels = {"blobs": e.blobs, "spans": e.spans, "size": e.size}
            pixels.update(channels=e.channels, invert=e.invert)
        else:
            pixels = {"decoded": self.images.numpy()}
        return {
            "pixels": pixels,
            "labels": self.labels.numpy(),
            "class_names": self.class_names,
            "class_groups": self.class_groups,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_shared(cls, tree: dict) -> ImageSet:
        """The inverse of `shared`, over the same memory (no copy of images or labels)."""
        pixels = tree["pixels"]
        images = as_tensor(pixels["decoded"]) if "decoded" in pixels else EncodedImages(**pixels)
        return cls(
            images=images,
            labels=as_tensor(tree["labels"]),
            class_names=tree["class_names"],
            class_groups=tree["class_groups"],
            mean=tree["mean"],
            std=tree["std"],
        )

    def require_images_per_class(self, needed: int, what: str) -> None:
        for label, idx in enumerate(self.by_class):
            if len(idx) < needed:
                raise DataError(
                    f"class {self.class_names[label]!r} has {len(idx)} images, fewer than "
                    f"{what} = {needed}; lower the shots/queries or drop the class"
                )


def decode_image(data: bytes, size: int, channels: int, invert: bool) -> np.ndarray:
    """Encoded bytes -> uint8 [C, size, size] (antialiased resize)."""
    with open_image(data) as image:
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # Transparent pixels are paper: composite onto white before dropping alpha.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    if invert:
        array = 255 - array
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, standardised per channel. Training (the sampler) and
    serving (the pyfunc) both call this, so a model always sees what it was trained on."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _iter_tables(root: Path, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    directory = root / f"split={split}"
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        raise DataError(
            f"dataset {root}: split {split!r} has no parquet files; prepare the store again "
            "with --overwrite"
        )
    for part in parts:
        try:
            yield pq.read_table(part, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{part}: not a readable parquet file ({type(exc).__name__}); the store is "
                "truncated or corrupt, prepare it again with --overwrite"
            ) from None


def split_census(root: str | Path, split: str) -> tuple[list[int], dict[str, int]]:
    """Images per class, and classes per group, of a split, read from its label and group
    columns only (no image is read): enough to know before training whether the split can
    give the episodes a config asks for. Also reads every part, so a missing or truncated
    file is found now."""
    require_splits(root, [split])
    group_of: dict[int, str] = {}
    images: Counter[int] = Counter()
    for table in _iter_tables(Path(root), split, ["label", "group"]):
        labels = table.column("label").to_pylist()
        images.update(labels)
        group_of.update(zip(labels, table.column("group").to_pylist(), strict=True))
    return [images[label] for label in sorted(images)], dict(Counter(group_of.values()))


def _check_splits(root: Path, manifest: dict, names: list[str]) -> None:
    known = manifest["splits"]
    for name in names:
        if name not in known:
            raise DataError(
                f"dataset {root} has no split {name!r}; it has {sorted(known)} "
                "(set data.train_split / data.test_split)"
            )


def require_splits(root: str | Path, names: list[str]) -> None:
    """Refuse a store that is missing, unreadable or lacks one of the splits `names`."""
    root = Path(root)
    _check_splits(root, read_manifest(root), names)


def decoded_bytes(root: str | Path, splits: list[str], image_size: int) -> int:
    """Bytes that `splits` take decoded at `image_size` (from the manifest, no decoding)."""
    root = Path(root)
    manifest = read_manifest(root)
    _check_splits(root, manifest, splits)
    images = sum(manifest["splits"][name]["images"] for name in splits)
    return images * manifest["channels"] * image_size * image_size


def choose_decode(mode: str, needed: int, budget: float) -> str:
    """How to hold images: "memory" (decoded once, up front) or "episode" (kept encoded,
    decoded per episode). auto: "memory" when the decoded images (`needed` bytes) fit in
    `budget` bytes."""
    if mode == "auto":
        return "memory" if needed <= budget else "episode"
    if mode not in ("memory", "episode"):
        raise DataError(f"data.decode: {mode!r} is not one of auto, memory, episode")
    return mode


def load_split(
    root: str | Path, split: str | list[str], image_size: int, decode: str = "memory"
) -> ImageSet:
    """One split, or several concatenated with labels offset, read once: decoded into one
    uint8 tensor (decode="memory") or kept encoded, decoded per episode ("episode")."""
    root = Path(root)
    manifest = read_manifest(root)
    names = [split] if isinstance(split, str) else list(split)
    _check_splits(root, manifest, names)
    if decode not in ("memory", "episode"):  # "auto" is resolved by the caller (budget)
        raise DataError(f"decode: {decode!r} is not memory or episode; resolve auto first")
    channels, invert = manifest["channels"], manifest.get("invert", False)
    columns: list[pa.ChunkedArray] = []
    labels: list[np.ndarray] = []
    class_names: list[str] = []
    class_groups: list[str] = []
    for name in names:
        offset = len(class_names)
        first_seen: dict[int, tuple[str, str]] = {}
        for table in _iter_tables(root, name):
            split_labels = table.column("label").to_numpy()
            for label, cls, group in zip(
                split_labels.tolist(),
                table.column("class_name").to_pylist(),
                table.column("group").to_pylist(),
                strict=True,
            ):
                first_seen.setdefault(label, (cls, group))
            labels.append(split_labels.astype(np.int64) + offset)
            columns.append(table.column("image"))
        for label in range(len(first_seen)):
            cls, group = first_seen[label]
            class_names.append(cls if len(names) == 1 else f"{name}/{cls}")
            class_groups.append(group)
    encoded = EncodedImages.of(columns, image_size, channels, invert)
    del columns
    images = encoded.decode_all() if decode == "memory" else encoded
    # Arrow's allocator keeps the freed tables' memory for reuse; give it back now, as
    # a process that holds a large data set has no other use for it.
    pa.default_memory_pool().release_unused()
    norm = manifest["normalisation"]
    return ImageSet(
        images=images,
        labels=torch.from_numpy(np.concatenate(labels)),
        class_names=class_names,
        class_groups=class_groups,
        mean=norm["mean"],
        std=norm["std"],
    )
