"""miniImageNet from miniatures of its two on-disk forms: pickle caches and csv splits."""

import csv
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewshot.data.reader import load_split
from fewshot.data.sources import mini_imagenet
from fewshot.data.store import MANIFEST, read_manifest
from fewshot.errors import DataError

CLASSES = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 4


def wnids(split: str) -> list[str]:
    offset = {"train": 0, "val": 100, "test": 200}[split]
    return [f"n{offset + c:08d}" for c in range(CLASSES[split])]


def make_caches(directory: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """mini-imagenet-cache-{split}.pkl as the widely used caches hold them."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in CLASSES:
        n = CLASSES[split] * PER_CLASS
        image_data = rng.integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8)
        class_dict = {
            wnid: list(range(c * PER_CLASS, (c + 1) * PER_CLASS))
            for c, wnid in enumerate(wnids(split))
        }
        with open(directory / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, handle)
        pixels[split] = image_data
    return pixels


def make_csv_form(directory: Path) -> None:
    """DIR/{train,val,test}.csv (filename,label) and DIR/images/*.jpg, as Ravi's release."""
    images = directory / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split in CLASSES:
        with open(directory / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for wnid in wnids(split):
                for i in range(PER_CLASS):
                    name = f"{wnid}{i + 1:08d}.jpg"
                    pixels = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(images / name)
                    writer.writerow([name, wnid])


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_pickles_give_the_splits_with_pixels_intact(tmp_path):
    pixels = make_caches(tmp_path / "src")
    out = tmp_path / "mini"
    manifest = mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    assert manifest["partial"] is True and manifest["form"] == "pickles"
    for split, classes in CLASSES.items():
        assert manifest["splits"][split] == {
            "classes": classes,
            "images": classes * PER_CLASS,
            "groups": classes,
            "min_images_per_class": PER_CLASS,
        }
    train = load_split(out, "train", 84)
    assert train.class_names == wnids("train")
    assert torch_equal(train.images[:PER_CLASS], pixels["train"][:PER_CLASS])
    names = [set(load_split(out, s, 8).class_names) for s in CLASSES]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def torch_equal(images, expected: np.ndarray) -> bool:
    return bool((images.numpy() == expected.transpose(0, 3, 1, 2)).all())


def test_csv_form_stores_the_jpegs_as_they_are(tmp_path):
    make_csv_form(tmp_path / "ravi")
    out = tmp_path / "mini"
    manifest = mini_imagenet.prepare(out, csv_dir=tmp_path / "ravi", partial=True)
    assert {s: m["classes"] for s, m in manifest["splits"].items()} == CLASSES
    first = pq.read_table(out / "split=val").to_pylist()[0]
    source = tmp_path / "ravi" / "images" / f"{wnids('val')[0]}00000001.jpg"
    assert first["image"] == source.read_bytes() and first["class_name"] == wnids("val")[0]


def test_preparing_twice_is_a_no_op(tmp_path):
    make_caches(tmp_path / "src")
    out = tmp_path / "mini"
    first = mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True) == first
    assert (out / MANIFEST).stat().st_mtime_ns == stamp


def test_a_small_copy_needs_partial(tmp_path):
    make_caches(tmp_path / "src")
    out = tmp_path / "mini"
    with pytest.raises(DataError, match=r"split train has 3 classes, the release 64; .*--partial"):
        mini_imagenet.prepare(out, pickles=tmp_path / "src")
    assert_nothing_left(out)


def test_missing_split_file(tmp_path):
    make_caches(tmp_path / "src")
    (tmp_path / "src" / "mini-imagenet-cache-val.pkl").unlink()
    with pytest.raises(DataError, match=r"mini-imagenet-cache-val\.pkl does not exist"):
        mini_imagenet.prepare(tmp_path / "mini", pickles=tmp_path / "src", partial=True)
    assert_nothing_left(tmp_path / "mini")
    make_csv_form(tmp_path / "ravi")
    (tmp_path / "ravi" / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv does not exist"):
        mini_imagenet.prepare(tmp_path / "mini", csv_dir=tmp_path / "ravi", partial=True)


def rewrite_cache(path: Path, change) -> None:
    with open(path, "rb") as handle:
        cache = pickle.load(handle)
    with open(path, "wb") as handle:
        pickle.dump(change(cache), handle)


def test_wrong_key_wrong_shape_and_truncated_pickle(tmp_path):
    make_caches(tmp_path / "src")
    path = tmp_path / "src" / "mini-imagenet-cache-train.pkl"
    good = path.read_bytes()
    out = tmp_path / "mini"
    rewrite_cache(path, lambda c: {"images": c["image_data"], "class_dict": c["class_dict"]})
    with pytest.raises(DataError, match=r"no key 'image_data' \(it has \['class_dict', 'images'"):
        mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    path.write_bytes(good)
    rewrite_cache(path, lambda c: {**c, "image_data": c["image_data"][:, :32, :32]})
    with pytest.raises(
        DataError, match=r"uint8 \[12, 32, 32, 3\], expected uint8 \[N, 84, 84, 3\]"
    ):
        mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="not a readable release pickle") as err:
        mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    assert "\n" not in str(err.value)
    assert_nothing_left(out)


def test_a_class_in_two_splits_is_refused(tmp_path):
    make_caches(tmp_path / "src")
    path = tmp_path / "src" / "mini-imagenet-cache-val.pkl"
    stolen = wnids("train")[0]
    relabel = {wnids("val")[0]: stolen}  # a val class labelled as a train class
    rewrite_cache(
        path,
        lambda c: {**c, "class_dict": {relabel.get(w, w): i for w, i in c["class_dict"].items()}},
    )
    with pytest.raises(DataError, match=f"class '{stolen}' is in both train and val"):
        mini_imagenet.prepare(tmp_path / "mini", pickles=tmp_path / "src", partial=True)
    assert_nothing_left(tmp_path / "mini")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    make_caches(tmp_path / "src")
    path = tmp_path / "src" / "mini-imagenet-cache-test.pkl"
    rewrite_cache(path, lambda c: {**c, "class_dict": Path("x")})
    with pytest.raises(DataError, match=r"refers to pathlib\.\w+, not only arrays"):
        mini_imagenet.prepare(tmp_path / "mini", pickles=tmp_path / "src", partial=True)


def test_a_previous_store_survives_a_bad_source(tmp_path):
    make_caches(tmp_path / "src")
    out = tmp_path / "mini"
    mini_imagenet.prepare(out, pickles=tmp_path / "src", partial=True)
    make_caches(tmp_path / "other", seed=1)
    (tmp_path / "other" / "mini-imagenet-cache-train.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable release pickle"):
        mini_imagenet.prepare(out, pickles=tmp_path / "other", partial=True, overwrite=True)
    assert read_manifest(out)["splits"]["train"]["images"] == 12
