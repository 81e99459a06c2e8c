"""tieredImageNet from miniatures of the original pickles and of a folder tree."""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.data.reader import load_split
from fewshot.data.sources import tiered_imagenet
from fewshot.data.store import MANIFEST
from fewshot.errors import DataError

# split -> super-category -> its classes (wnids)
LAYOUT = {
    "train": {"artifact": ["n001", "n002"], "animal": ["n003", "n004"]},
    "val": {"plant": ["n101", "n102"]},
    "test": {"food": ["n201", "n202"], "tool": ["n203"]},
}
PER_CLASS = 3


def png_array(rng) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(84, 84, 3), dtype=np.uint8)).save(buffer, "PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)  # as cv2.imencode gave them


def make_pickles(directory: Path) -> None:
    """{split}_images_png.pkl (a list of encoded PNGs) and {split}_labels.pkl."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, categories in LAYOUT.items():
        general_str = sorted(categories)
        specific_str = [w for g in general_str for w in categories[g]]
        images, specific, general = [], [], []
        for g, category in enumerate(general_str):
            for wnid in categories[category]:
                for _ in range(PER_CLASS):
                    images.append(png_array(rng))
                    specific.append(specific_str.index(wnid))
                    general.append(g)
        labels = {
            "label_specific": np.array(specific),
            "label_general": np.array(general),
            "label_specific_str": specific_str,
            "label_general_str": general_str,
        }
        with open(directory / f"{split}_images_png.pkl", "wb") as handle:
            pickle.dump(images, handle)
        with open(directory / f"{split}_labels.pkl", "wb") as handle:
            pickle.dump(labels, handle)


def make_tree(root: Path, grouped: bool) -> None:
    rng = np.random.default_rng(1)
    for split, categories in LAYOUT.items():
        for category, classes in categories.items():
            for wnid in classes:
                directory = root / split / category / wnid if grouped else root / split / wnid
                directory.mkdir(parents=True)
                for i in range(PER_CLASS):
                    pixels = rng.integers(0, 256, size=(84, 84, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(directory / f"{i}.jpg")


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_pickles_give_classes_grouped_by_super_category(tmp_path):
    make_pickles(tmp_path / "src")
    out = tmp_path / "tiered"
    manifest = tiered_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    assert {s: (m["classes"], m["groups"], m["images"]) for s, m in manifest["splits"].items()} == {
        "train": (4, 2, 12),
        "val": (2, 1, 6),
        "test": (3, 2, 9),
    }
    train = load_split(out, "train", 84)
    assert train.class_names == ["n001", "n002", "n003", "n004"]
    assert train.groups() == {"artifact": [0, 1], "animal": [2, 3]}
    with open(tmp_path / "src" / "train_labels.pkl", "rb") as handle:
        labels = pickle.load(handle)
    index = labels["label_specific"].tolist().index(labels["label_specific_str"].index("n001"))
    with open(tmp_path / "src" / "train_images_png.pkl", "rb") as handle:
        first = Image.open(io.BytesIO(bytes(pickle.load(handle)[index])))
    assert (train.images[0].numpy() == np.asarray(first).transpose(2, 0, 1)).all()
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert tiered_imagenet.prepare(out, pickles=tmp_path / "src", partial=True) == manifest
    assert (out / MANIFEST).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("grouped", [True, False])
def test_folder_tree_with_or_without_the_category_level(tmp_path, grouped):
    make_tree(tmp_path / "tree", grouped)
    manifest = tiered_imagenet.prepare(tmp_path / "out", root=tmp_path / "tree", partial=True)
    assert manifest["splits"]["test"]["classes"] == 3
    assert manifest["splits"]["test"]["groups"] == (2 if grouped else 3)
    names = load_split(tmp_path / "out", "val", 8).class_names
    assert names == ["n101", "n102"]


def test_a_small_copy_needs_partial(tmp_path):
    make_pickles(tmp_path / "src")
    with pytest.raises(DataError, match=r"split train has 4 classes, the release 351; .*--partial"):
        tiered_imagenet.prepare(tmp_path / "out", pickles=tmp_path / "src")
    assert_nothing_left(tmp_path / "out")


def test_missing_labels_file(tmp_path):
    make_pickles(tmp_path / "src")
    (tmp_path / "src" / "test_labels.pkl").unlink()
    with pytest.raises(DataError, match=r"test_labels\.pkl does not exist; pass --from-pickles"):
        tiered_imagenet.prepare(tmp_path / "out", pickles=tmp_path / "src", partial=True)
    assert_nothing_left(tmp_path / "out")


def test_wrong_label_key(tmp_path):
    make_pickles(tmp_path / "src")
    path = tmp_path / "src" / "val_labels.pkl"
    with open(path, "rb") as handle:
        labels = pickle.load(handle)
    labels["label_fine"] = labels.pop("label_specific")
    with open(path, "wb") as handle:
        pickle.dump(labels, handle)
    with pytest.raises(DataError, match=r"val_labels\.pkl: no key 'label_specific'"):
        tiered_imagenet.prepare(tmp_path / "out", pickles=tmp_path / "src", partial=True)
    assert_nothing_left(tmp_path / "out")


def test_truncated_images_pickle_and_corrupt_png(tmp_path):
    make_pickles(tmp_path / "src")
    path = tmp_path / "src" / "train_images_png.pkl"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) - 100])
    with pytest.raises(DataError, match="not a readable release pickle.*truncated") as err:
        tiered_imagenet.prepare(tmp_path / "out", pickles=tmp_path / "src", partial=True)
    assert "\n" not in str(err.value)
    with open(path, "wb") as handle:
        images = pickle.loads(good)
        pickle.dump(images[:-2], handle)  # two images short of the labels
    with pytest.raises(DataError, match="10 images but 12 labels"):
        tiered_imagenet.prepare(tmp_path / "out", pickles=tmp_path / "src", partial=True)
    images[5] = images[5][:40]
    with open(path, "wb") as handle:
        pickle.dump(images, handle)
    with pytest.raises(DataError, match=r"train_images_png\.pkl\[5\]: not a readable image"):
        tiered_imagenet.prepare(tmp_path / "out", pickles=tmp_path / "src", partial=True)
    assert_nothing_left(tmp_path / "out")


def test_a_class_in_two_splits_is_refused(tmp_path):
    make_tree(tmp_path / "tree", grouped=False)
    (tmp_path / "tree" / "val" / "n101").rename(tmp_path / "tree" / "val" / "n001")
    with pytest.raises(DataError, match="class 'n001' is in both train and val"):
        tiered_imagenet.prepare(tmp_path / "out", root=tmp_path / "tree", partial=True)
    assert_nothing_left(tmp_path / "out")
