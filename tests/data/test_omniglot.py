import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fewshot.data.reader import EncodedImages, ImageSet, load_split
from fewshot.data.selection import leave_groups_out
from fewshot.data.sources import omniglot
from fewshot.data.store import MANIFEST, read_manifest, sha256_files
from fewshot.errors import DataError


def test_small1_gives_136_characters_of_20_drawings_grouped_by_alphabet(tmp_path, omniglot_zips):
    out = tmp_path / "omni"
    manifest = omniglot.prepare([omniglot_zips[0]], out)
    assert manifest["splits"]["small1"] == {
        "classes": 136,
        "images": 2720,
        "groups": 5,
        "min_images_per_class": 20,
    }
    table = pq.read_table(out / "split=small1")
    assert table.num_rows == 2720
    for row in table.select(["class_name", "group"]).to_pylist()[::97]:
        assert row["class_name"].split("/")[0] == row["group"]  # alphabet/characterNN
    labels = table.column("label").to_numpy()
    assert labels.min() == 0 and labels.max() == 135
    assert manifest["invert"] and manifest["channels"] == 1


def test_preparing_twice_does_not_duplicate(tmp_path, omniglot_zips):
    out = tmp_path / "omni"
    first = omniglot.prepare([omniglot_zips[0]], out)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    second = omniglot.prepare([omniglot_zips[0]], out)
    assert first == second
    assert (out / MANIFEST).stat().st_mtime_ns == stamp  # untouched
    assert len(list((out / "split=small1").glob("*.parquet"))) == 1
    assert pq.read_table(out / "split=small1").num_rows == 2720


def test_decoded_images_are_inverted_and_resized(omniglot_store):
    images = load_split(omniglot_store, "small1", 28)
    assert images.images.shape == (2720, 1, 28, 28)
    # Ink is high after inversion: most pixels (background) are zero.
    assert (images.images == 0).float().mean() > 0.5
    assert len(images.groups()) == 5
    both = load_split(omniglot_store, ["small1", "small2"], 28)
    # small2's 50 Greek and Latin characters copy small1's and are stored once.
    assert both.n_classes == 136 + 156 - 50 and int(both.labels.max()) == 241
    assert sorted(len(labels) for labels in both.groups().values()) == [
        17,
        22,
        24,
        24,
        26,
        40,
        42,
        47,
    ]


def stored_characters(store: Path) -> dict[str, list[str]]:
    """ "split/character" -> the sha256 of each of its stored drawings, read from the
    parquet files: what a character is by content, whatever its folder is called."""
    drawings: dict[str, list[str]] = {}
    for split in read_manifest(store)["splits"]:
        table = pq.read_table(store / f"split={split}", columns=["class_name", "image"])
        for name, image in zip(
            table.column("class_name").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            drawings.setdefault(f"{split}/{name}", []).append(hashlib.sha256(image).hexdigest())
    return drawings


def zip_characters(zip_path: Path) -> dict[str, list[str]]:
    """ "alphabet/character" -> the sha256 of each of its drawings in the zip."""
    drawings: dict[str, list[str]] = {}
    with zipfile.ZipFile(zip_path) as archive:
        for member in sorted(archive.namelist()):
            if member.endswith(".png"):
                name = "/".join(PurePosixPath(member).parts[-3:-1])
                drawings.setdefault(name, []).append(
                    hashlib.sha256(archive.read(member)).hexdigest()
                )
    return drawings


def test_both_small_sets_hold_242_distinct_characters_of_8_alphabets(omniglot_store, omniglot_zips):
    stored = stored_characters(omniglot_store)
    every_drawing = [h for hashes in stored.values() for h in hashes]
    assert len(every_drawing) == len(set(every_drawing)) == 242 * 20  # no drawing twice
    by_content = {frozenset(hashes) for hashes in stored.values()}
    assert len(stored) == len(by_content) == 242
    # The two zips by content: their union is what the store holds, each character once.
    small1, small2 = (zip_characters(z) for z in omniglot_zips)
    in_zips = {frozenset(h) for h in small1.values()} | {frozenset(h) for h in small2.values()}
    assert in_zips == by_content
    shared = {frozenset(h) for h in small1.values()} & {frozenset(h) for h in small2.values()}
    assert len(shared) == 50
    alphabet_of = {frozenset(h): name.split("/")[1] for name, h in stored.items()}
    assert len(set(alphabet_of.values())) == 8
    per_alphabet = Counter(alphabet_of[c] for c in by_content)
    assert per_alphabet["Greek"] == 24 and per_alphabet["Latin"] == 26
    assert per_alphabet["Tagalog"] == 17
    # The manifest names each dropped copy and the character it copies.
    merged = read_manifest(omniglot_store)["merged"]
    assert (merged["characters_dropped"], merged["images_dropped"]) == (50, 1000)
    for entry in merged["dropped"]:
        copy = small2[entry["character"]]
        original = stored[f"{entry['duplicate_of']['split']}/{entry['duplicate_of']['character']}"]
        assert entry["split"] == "small2" and sorted(copy) == sorted(original)
    assert {frozenset(small2[e["character"]]) for e in merged["dropped"]} == shared


def test_folds_hold_out_every_alphabet_once_and_never_train_on_a_test_character(
    omniglot_store,
):
    images = load_split(omniglot_store, ["small1", "small2"], 28, decode="episode")
    stored = stored_characters(omniglot_store)
    character = {label: frozenset(stored[name]) for label, name in enumerate(images.class_names)}
    alphabet = dict(enumerate(images.class_groups))
    folds = leave_groups_out(images, 4)
    held = [name for fold in folds for name in fold.held_out]
    assert sorted(held) == sorted(set(alphabet.values())) and len(held) == 8  # once each
    for fold in folds:
        assert len(fold.held_out) == 2
        assert sorted(fold.train + fold.test) == list(range(242))
        assert {alphabet[c] for c in fold.test} == set(fold.held_out)
        assert not {alphabet[c] for c in fold.train} & set(fold.held_out)
        train_drawings = {h for c in fold.train for h in character[c]}
        assert not {h for c in fold.test for h in character[c]} & train_drawings
        assert not {character[c] for c in fold.test} & {character[c] for c in fold.train}
    assert [len(f.test) for f in leave_groups_out(images, 8)] == [24, 22, 24, 47, 40, 26, 42, 17]
    with pytest.raises(DataError, match="folds: 9"):
        leave_groups_out(images, 9)


@pytest.mark.parametrize("decode", ["memory", "episode"])
def test_folds_refuse_a_store_that_holds_a_character_twice(omniglot_store, decode):
    """As a store written before the merge did (small1's Greek and Latin again in small2):
    a held-out alphabet would then be tested on drawings of trained characters."""
    images = load_split(omniglot_store, ["small1", "small2"], 28, decode=decode)
    first = images.by_class[0]  # its drawings, stored again as one more character
    if decode == "memory":
        stored = torch.cat([images.images, images.images[first]])
    else:
        encoded = images.images
        spans = np.concatenate([encoded.spans, encoded.spans[first.numpy()]])
        stored = EncodedImages(encoded.blobs, spans, 28, 1, True)
    doubled = ImageSet(
        images=stored,
        labels=torch.cat([images.labels, torch.full((len(first),), images.n_classes)]),
        class_names=[*images.class_names, "small2/copy"],
        class_groups=[*images.class_groups, images.class_groups[0]],
        mean=images.mean,
        std=images.std,
    )
    with pytest.raises(DataError, match=r"same image is stored under classes .*'small2/copy'"):
        leave_groups_out(doubled, 4)


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_truncated_zip_is_refused_and_leaves_nothing(tmp_path, omniglot_zips):
    data = omniglot_zips[0].read_bytes()
    broken = tmp_path / "images_background_small1.zip"
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "omni"
    with pytest.raises(DataError, match="not a readable zip"):
        omniglot.prepare([broken], out)
    _assert_nothing_left(out)


def test_corrupt_member_is_refused(tmp_path, omniglot_zips):
    data = bytearray(omniglot_zips[0].read_bytes())
    with zipfile.ZipFile(omniglot_zips[0]) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".png"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    data[start : start + 20] = bytes(20)  # damage the compressed bytes of one drawing
    corrupt = tmp_path / "images_background_small1.zip"
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "omni"
    with pytest.raises(DataError) as err:
        omniglot.prepare([corrupt], out)
    assert "\n" not in str(err.value)
    _assert_nothing_left(out)


def test_missing_zip_and_missing_characters(tmp_path, omniglot_zips):
    with pytest.raises(DataError, match="does not exist"):
        omniglot.prepare([tmp_path / "nope.zip"], tmp_path / "o")
    partial = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(omniglot_zips[0]) as src, zipfile.ZipFile(partial, "w") as dst:
        for name in src.namelist()[:200]:
            dst.writestr(name, src.read(name))
    with pytest.raises(DataError, match="partial"):
        omniglot.prepare([partial], tmp_path / "o")
    _assert_nothing_left(tmp_path / "o")
    manifest = omniglot.prepare([partial], tmp_path / "o", partial=True)
    assert manifest["partial"] is True
    assert read_manifest(tmp_path / "o")["splits"]["small1"]["images"] < 2720


def test_a_different_source_is_not_overwritten_silently(tmp_path, omniglot_zips):
    out = tmp_path / "omni"
    omniglot.prepare([omniglot_zips[0]], out)
    with pytest.raises(DataError, match="--overwrite"):
        omniglot.prepare([omniglot_zips[1]], out)
    assert list(read_manifest(out)["splits"]) == ["small1"]
    omniglot.prepare([omniglot_zips[1]], out, overwrite=True)
    assert list(read_manifest(out)["splits"]) == ["small2"]


def test_a_character_that_copies_only_some_drawings_is_refused(tmp_path, omniglot_zips):
    with zipfile.ZipFile(omniglot_zips[0]) as src:
        greek = sorted(
            n for n in src.namelist() if "/Greek/character01/" in n and n.endswith(".png")
        )
        other = next(n for n in src.namelist() if "/Greek/character02/" in n and n.endswith(".png"))
        mixed = tmp_path / "images_background_mixed.zip"
        with zipfile.ZipFile(mixed, "w") as dst:
            for i, name in enumerate(greek):
                source = other if i == 0 else name  # 19 of 20 drawings copied
                dst.writestr(f"mixed/Greek/character01/{i:02d}.png", src.read(source))
    with pytest.raises(DataError, match="shares 19 of its 20 drawings") as err:
        omniglot.prepare([omniglot_zips[0], mixed], tmp_path / "o")
    assert "\n" not in str(err.value)
    _assert_nothing_left(tmp_path / "o")


def test_a_store_of_the_same_zips_written_before_merging_is_rebuilt(tmp_path, omniglot_zips):
    out = tmp_path / "omni"
    omniglot.prepare(list(omniglot_zips), out)
    # What a store written before merging says: the zips' checksum, no `merged`.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["source_checksum"] = sha256_files(omniglot_zips)
    del manifest["merged"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    rebuilt = omniglot.prepare(list(omniglot_zips), out)
    assert rebuilt["merged"]["characters_dropped"] == 50
    assert read_manifest(out)["splits"]["small2"]["classes"] == 106
