import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fewshot.data.reader import load_split
from fewshot.data.sources import omniglot
from fewshot.data.store import MANIFEST, read_manifest
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
    assert both.n_classes == 136 + 156 and int(both.labels.max()) == 291


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
