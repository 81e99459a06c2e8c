from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data.reader import load_split
from fewshot.data.sources import folder
from fewshot.errors import DataError


def make_tree(root: Path, groups: int, classes: int, images: int, grouped: bool) -> None:
    rng = np.random.default_rng(0)
    for g in range(groups):
        for c in range(classes):
            directory = root / f"g{g}" / f"c{c}" if grouped else root / f"g{g}c{c}"
            directory.mkdir(parents=True)
            for i in range(images):
                pixels = rng.integers(0, 255, size=(12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(directory / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_ratio_split_gives_disjoint_classes(tmp_path):
    make_tree(tmp_path / "tree", 5, 2, 3, grouped=False)
    manifest = folder.prepare(tmp_path / "tree", tmp_path / "out", ratios=(0.6, 0.2, 0.2))
    counts = {name: s["classes"] for name, s in manifest["splits"].items()}
    assert counts == {"train": 6, "val": 2, "test": 2}
    names = [set(load_split(tmp_path / "out", s, 8).class_names) for s in counts]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert load_split(tmp_path / "out", "train", 8).images.shape == (18, 3, 8, 8)


def test_split_by_group_keeps_groups_whole(tmp_path):
    make_tree(tmp_path / "tree", 5, 3, 2, grouped=True)
    manifest = folder.prepare(
        tmp_path / "tree", tmp_path / "out", ratios=(3, 1, 1), split_by_group=True
    )
    assert {n: s["groups"] for n, s in manifest["splits"].items()} == {
        "train": 3,
        "val": 1,
        "test": 1,
    }
    groups = [set(load_split(tmp_path / "out", s, 8).class_groups) for s in ("train", "test")]
    assert not groups[0] & groups[1]


def test_empty_class_folder_and_missing_root_are_refused(tmp_path):
    make_tree(tmp_path / "tree", 3, 1, 2, grouped=False)
    (tmp_path / "tree" / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        folder.prepare(tmp_path / "tree", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="is not a folder"):
        folder.prepare(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        folder.prepare(tmp_path / "bare", tmp_path / "out")


def test_unreadable_image_is_named(tmp_path):
    make_tree(tmp_path / "tree", 3, 1, 2, grouped=False)
    (tmp_path / "tree" / "g0c0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        folder.prepare(tmp_path / "tree", tmp_path / "out")
    assert not (tmp_path / "out").exists()
