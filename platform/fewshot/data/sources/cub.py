"""CUB-200-2011 (Wah et al.) from the official `CUB_200_2011/` tree.

    images.txt               `image_id relative/path.jpg`
    classes.txt              `class_id 001.Black_footed_Albatross`
    image_class_labels.txt   `image_id class_id`
    bounding_boxes.txt       `image_id x y width height` (only for --crop-boxes)
    images/CLASS/IMAGE.jpg

The usual few-shot split (Hilliard et al., Chen et al.) of 100/50/50 classes by the
zero-based index of the sorted class folders: even -> train, index mod 4 == 1 ->
val, index mod 4 == 3 -> test. Birds have no groups here: each class is its own.
Images are stored as they are; cropped ones are re-encoded as JPEG (quality 95).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from fewshot.data.decode import check_image
from fewshot.data.sources.common import Release, check_release, checksum, convert, require_file
from fewshot.data.store import Example, SourceInfo
from fewshot.errors import DataError

KNOWN = {
    "train": Release(100),
    "val": Release(50),
    "test": Release(50),
}
TOTAL_IMAGES = 11_788
HINT = "pass --root DIR, the official CUB_200_2011 folder"


def split_of(index: int) -> str:
    return "train" if index % 2 == 0 else ("val" if index % 4 == 1 else "test")


def read_table(path: Path, columns: int) -> dict[str, list[str]]:
    """id -> the other columns of a CUB txt file, refusing a malformed line."""
    require_file(path, HINT)
    table = {}
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise DataError(
                f"{path}:{line}: {len(fields)} columns, expected {columns}; the file is "
                "truncated or not from the release, copy it again"
            )
        table[fields[0]] = fields[1:]
    return table


def crop(data: bytes, box: list[str], where: str) -> bytes:
    x, y, width, height = (float(v) for v in box)
    with Image.open(io.BytesIO(data)) as image:
        left, top = max(0, int(x)), max(0, int(y))
        right, bottom = min(image.width, int(x + width)), min(image.height, int(y + height))
        if right <= left or bottom <= top:
            raise DataError(f"{where}: bounding box {box} is empty; fix bounding_boxes.txt")
        buffer = io.BytesIO()
        image.crop((left, top, right, bottom)).convert(image.mode).save(
            buffer, format="JPEG" if image.mode in ("RGB", "L") else "PNG", quality=95
        )
    return buffer.getvalue()


def find_root(root: Path) -> Path:
    root = Path(root)
    if (root / "CUB_200_2011").is_dir():
        return root / "CUB_200_2011"
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; {HINT}")
    return root


def prepare(
    root: Path,
    out: Path,
    *,
    crop_boxes: bool = False,
    partial: bool = False,
    overwrite: bool = False,
) -> dict:
    root = find_root(root)
    classes = read_table(root / "classes.txt", 2)
    images = read_table(root / "images.txt", 2)
    labels = read_table(root / "image_class_labels.txt", 2)
    boxes = read_table(root / "bounding_boxes.txt", 5) if crop_boxes else {}
    folders = sorted(name for (name,) in classes.values())
    split_by_folder = {name: split_of(i) for i, name in enumerate(folders)}
    entries = []  # (image id, path, class folder)
    for image_id, (relative,) in sorted(images.items(), key=lambda item: int(item[0])):
        where = f"{root / 'images.txt'} image {image_id}"
        if image_id not in labels:
            raise DataError(f"{where} has no line in image_class_labels.txt; copy it again")
        class_id = labels[image_id][0]
        if class_id not in classes:
            raise DataError(f"{where} has class {class_id}, not in classes.txt; copy it again")
        folder = classes[class_id][0]
        if relative.split("/")[0] != folder:
            raise DataError(
                f"{where} ({relative}) is labelled {folder}; image_class_labels.txt is "
                "mislabelled, copy the release's own"
            )
        if crop_boxes and image_id not in boxes:
            raise DataError(f"{where} has no line in bounding_boxes.txt; copy it again")
        path = require_file(root / "images" / relative, f"it is listed in images.txt; {HINT}")
        entries.append((image_id, path, folder))
    if not partial and (len(classes), len(entries)) != (200, TOTAL_IMAGES):
        raise DataError(
            f"{root}: {len(classes)} classes and {len(entries)} images, the release 200 and "
            f"{TOTAL_IMAGES}; the copy is partial (pass --partial to accept a smaller copy)"
        )

    def read() -> dict[str, list[Example]]:
        splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
        for image_id, path, folder in entries:
            data = path.read_bytes()
            check_image(data, str(path))
            if crop_boxes:
                data = crop(data, boxes[image_id], str(path))
            splits[split_by_folder[folder]].append(Example(folder, folder, data))
        check_release(str(root), splits, KNOWN, partial=partial)
        return splits

    info = SourceInfo(
        name="cub",
        source="cub",
        checksum=checksum(
            [root / "images.txt", root / "image_class_labels.txt", *(p for _, p, _ in entries)],
            crop_boxes=crop_boxes,
            partial=partial,
        ),
        channels=3,
        image_shape=(84, 84),
        partial=partial,
        extra={"crop_boxes": crop_boxes, "split": "even/1 mod 4/3 mod 4 of sorted classes"},
    )
    return convert(out, info, read, overwrite)
