"""CIFAR-FS and FC100 from a miniature of CIFAR-100's python files, and their class lists."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from fewshot.data.reader import load_split
from fewshot.data.sources import cifar
from fewshot.data.sources.common import package_json
from fewshot.data.store import MANIFEST
from fewshot.errors import DataError

# CIFAR-100's meta, as the release lists them (alphabetical).
FINE = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
]
COARSE = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]
# The miniature's classes and their superclasses: two per split of either variant.
CLASSES = {
    "apple": "fruit_and_vegetables",
    "bear": "large_carnivores",
    "otter": "aquatic_mammals",
    "camel": "large_omnivores_and_herbivores",
    "baby": "people",
    "bed": "household_furniture",
}
SPLITS = {
    "cifar-fs": {"train": ["apple", "bear"], "val": ["camel", "otter"], "test": ["baby", "bed"]},
    "fc100": {"train": ["apple", "bed"], "val": ["bear", "camel"], "test": ["baby", "otter"]},
}
PER_FILE = {"train": 2, "test": 1}


def make_cifar100(root: Path, coarse_of=CLASSES) -> dict[str, np.ndarray]:
    """ROOT/cifar-100-python/{train,test,meta}: pickled dicts with bytes keys."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    meta = {
        b"fine_label_names": [n.encode() for n in FINE],
        b"coarse_label_names": [n.encode() for n in COARSE],
    }
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle)
    rng = np.random.default_rng(0)
    rows = {}
    for part, count in PER_FILE.items():
        labels = [name for name in CLASSES for _ in range(count)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        entry = {
            b"batch_label": f"{part} batch 1 of 1".encode(),
            b"filenames": [f"{n}_{i}.png".encode() for i, n in enumerate(labels)],
            b"fine_labels": [FINE.index(n) for n in labels],
            b"coarse_labels": [COARSE.index(coarse_of[n]) for n in labels],
            b"data": data,
        }
        with open(folder / part, "wb") as handle:
            pickle.dump(entry, handle)
        rows[part] = data
    return rows


def rewrite(path: Path, change) -> None:
    with open(path, "rb") as handle:
        entry = pickle.load(handle)
    with open(path, "wb") as handle:
        pickle.dump(change(entry), handle)


@pytest.mark.parametrize(
    ("name", "counts"), [("cifar_fs.json", (64, 16, 20)), ("fc100.json", (60, 20, 20))]
)
def test_published_class_lists(name, counts):
    split_of = cifar.class_splits(name.split(".")[0].replace("_", "-"))
    assert sorted(split_of) == FINE  # every class once: disjoint, all real CIFAR-100 names
    assert tuple(list(split_of.values()).count(s) for s in ("train", "val", "test")) == counts
    if name == "fc100.json":
        lists = package_json(name)
        assert [len(lists[s]) for s in ("train", "val", "test")] == [12, 4, 4]
        assert sorted(lists["train"] + lists["val"] + lists["test"]) == COARSE
        assert lists["test"] == ["aquatic_mammals", "insects", "medium_mammals", "people"]
        superclass = cifar.superclass_of()
        assert {superclass[c] for c, s in split_of.items() if s == "val"} == set(lists["val"])


@pytest.mark.parametrize("variant", ["cifar-fs", "fc100"])
def test_variants_split_the_same_files_by_their_lists(tmp_path, variant):
    rows = make_cifar100(tmp_path)
    out = tmp_path / variant
    manifest = cifar.prepare(variant, tmp_path, out, partial=True)
    assert manifest["name"] == variant and manifest["image_shape"] == [32, 32]
    for split, classes in SPLITS[variant].items():
        images = load_split(out, split, 32)
        assert images.class_names == classes
        assert images.class_groups == [CLASSES[c] for c in classes]
        assert manifest["splits"][split]["min_images_per_class"] == 3  # train and test files
    apple = load_split(out, "train", 32)
    first = rows["train"][0].reshape(3, 32, 32)  # the first row of train is an apple
    assert (apple.images[0].numpy() == first).all()
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert cifar.prepare(variant, tmp_path / "cifar-100-python", out, partial=True) == manifest
    assert (out / MANIFEST).stat().st_mtime_ns == stamp


def test_a_small_copy_needs_partial(tmp_path):
    make_cifar100(tmp_path)
    with pytest.raises(DataError, match=r"split train has 2 classes, the release 64; .*--partial"):
        cifar.prepare("cifar-fs", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_meta(tmp_path):
    make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match=r"cifar-100-python/meta does not exist; pass --root"):
        cifar.prepare("fc100", tmp_path, tmp_path / "out", partial=True)


def test_wrong_key_wrong_shape_truncated_and_mislabelled(tmp_path):
    make_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    good = train.read_bytes()
    out = tmp_path / "out"
    rewrite(train, lambda e: {**{k: v for k, v in e.items() if k != b"fine_labels"}, b"fine": 1})
    with pytest.raises(DataError, match=r"train: no key 'fine_labels'"):
        cifar.prepare("fc100", tmp_path, out, partial=True)
    train.write_bytes(good)
    rewrite(train, lambda e: {**e, b"data": e[b"data"][:, :1024]})
    with pytest.raises(DataError, match=r"uint8 \[12, 1024\], expected uint8 \[N, 3072\]"):
        cifar.prepare("fc100", tmp_path, out, partial=True)
    train.write_bytes(good[:-500])
    with pytest.raises(DataError, match="not a readable release pickle") as err:
        cifar.prepare("fc100", tmp_path, out, partial=True)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_mislabelled_superclass_is_refused(tmp_path):
    make_cifar100(tmp_path, coarse_of={**CLASSES, "bear": "people"})
    with pytest.raises(DataError, match="'bear' is labelled with superclass 'people'"):
        cifar.prepare("fc100", tmp_path, tmp_path / "out", partial=True)
    assert not (tmp_path / "out").exists()
