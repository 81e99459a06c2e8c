"""CUB-200-2011 from a miniature of the official CUB_200_2011/ tree."""

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewshot.data.sources import cub
from fewshot.data.store import MANIFEST
from fewshot.errors import DataError

BIRDS = [f"{i + 1:03d}.Bird_{chr(65 + i)}" for i in range(8)]
PER_CLASS = 2


def make_cub(parent: Path) -> Path:
    """The release's layout: txt files with its columns, images/CLASS/NAME.jpg."""
    root = parent / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, boxes = [], [], []
    image_id = 0
    for class_id, bird in enumerate(BIRDS, start=1):
        (root / "images" / bird).mkdir(parents=True)
        for i in range(PER_CLASS):
            image_id += 1
            relative = f"{bird}/{bird[4:]}_{i:04d}_{image_id}.jpg"
            pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / relative)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            boxes.append(f"{image_id} 5.0 4.0 20.0 16.0")
    (root / "classes.txt").write_text("".join(f"{i} {b}\n" for i, b in enumerate(BIRDS, 1)))
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def classes_of(out: Path, split: str) -> list[str]:
    return sorted(set(pq.read_table(out / f"split={split}").column("class_name").to_pylist()))


def test_split_by_the_index_of_the_sorted_class_folders(tmp_path):
    make_cub(tmp_path)
    out = tmp_path / "cub"
    manifest = cub.prepare(tmp_path, out, partial=True)  # the folder above CUB_200_2011 works too
    assert classes_of(out, "train") == [BIRDS[i] for i in (0, 2, 4, 6)]
    assert classes_of(out, "val") == [BIRDS[1], BIRDS[5]]
    assert classes_of(out, "test") == [BIRDS[3], BIRDS[7]]
    assert manifest["splits"]["val"]["images"] == 2 * PER_CLASS
    source = tmp_path / "CUB_200_2011" / "images" / BIRDS[1] / f"{BIRDS[1][4:]}_0000_3.jpg"
    assert pq.read_table(out / "split=val").column("image")[0].as_py() == source.read_bytes()
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert cub.prepare(tmp_path / "CUB_200_2011", out, partial=True) == manifest
    assert (out / MANIFEST).stat().st_mtime_ns == stamp


def test_crop_boxes(tmp_path):
    root = make_cub(tmp_path)
    manifest = cub.prepare(root, tmp_path / "cub", crop_boxes=True, partial=True)
    assert manifest["crop_boxes"] is True
    data = pq.read_table(tmp_path / "cub" / "split=train").column("image")[0].as_py()
    assert Image.open(io.BytesIO(data)).size == (20, 16)
    # A cropped store is another source: it does not silently replace the uncropped one.
    cub.prepare(root, tmp_path / "plain", partial=True)
    with pytest.raises(DataError, match="--overwrite"):
        cub.prepare(root, tmp_path / "plain", crop_boxes=True, partial=True)


def test_a_small_copy_needs_partial(tmp_path):
    root = make_cub(tmp_path)
    with pytest.raises(DataError, match=r"8 classes and 16 images, the release 200 and 11788"):
        cub.prepare(root, tmp_path / "cub")
    assert not (tmp_path / "cub").exists()


def test_missing_file_and_missing_image(tmp_path):
    root = make_cub(tmp_path)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match=r"image_class_labels\.txt does not exist"):
        cub.prepare(root, tmp_path / "cub", partial=True)
    root = make_cub(tmp_path / "b")
    next((root / "images" / BIRDS[2]).iterdir()).unlink()
    with pytest.raises(DataError, match=r"\.jpg does not exist; it is listed in images\.txt"):
        cub.prepare(root, tmp_path / "cub", partial=True)
    (make_cub(tmp_path / "c") / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match=r"bounding_boxes\.txt does not exist"):
        cub.prepare(tmp_path / "c", tmp_path / "cub", crop_boxes=True, partial=True)
    assert not (tmp_path / "cub").exists()


def test_mislabelled_and_truncated_files(tmp_path):
    root = make_cub(tmp_path)
    labels = (root / "image_class_labels.txt").read_text().replace("1 1\n", "1 2\n", 1)
    (root / "image_class_labels.txt").write_text(labels)
    with pytest.raises(DataError, match=r"image 1 \(001\.Bird_A/.*\) is labelled 002\.Bird_B"):
        cub.prepare(root, tmp_path / "cub", partial=True)
    (root / "image_class_labels.txt").write_text(labels.replace("1 2\n", "1 1\n", 1))
    text = (root / "images.txt").read_text()
    (root / "images.txt").write_text(text[: text.index(" ", text.index("\n"))])  # "...\n2"
    with pytest.raises(DataError, match=r"images\.txt:2: 1 columns, expected 2"):
        cub.prepare(root, tmp_path / "cub", partial=True)


def test_unreadable_image_leaves_nothing(tmp_path):
    root = make_cub(tmp_path)
    broken = next((root / "images" / BIRDS[7]).iterdir())
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(DataError, match="not a readable image"):
        cub.prepare(root, tmp_path / "cub", partial=True)
    assert not (tmp_path / "cub").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cub")]
