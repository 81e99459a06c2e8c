"""Reading a store (data/store.py) for training and evaluation: never writes one.

A split is held as one uint8 tensor [N, C, S, S] decoded up front (decode="memory"), or
kept encoded and decoded per episode (`EncodedImages`, decode="episode") when the decoded
set would not fit in memory; `choose_decode` picks one from the manifest's image counts.
Either way the pixels are those of `decode_image`, so episodes are identical. An
`ImageSet` also travels to Ray workers as numpy arrays (`shared`/`from_shared`) that
the object store hands back as zero-copy views.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fewshot.data.decode import IMAGE_ERRORS, decode_image
from fewshot.data.store import read_manifest, split_directory
from fewshot.errors import DataError

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


def _iter_tables(root: Path, split: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    parts = sorted(split_directory(root, split).glob("part-*.parquet"))
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
